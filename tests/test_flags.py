"""python -m fairseq_seqlevel.flags: a criterion's flags, which fairseq-train --help cannot list."""

import subprocess
import sys

import pytest

from conftest import REPO, USER_DIR
from fairseq_seqlevel.flags import config_class, format_flags, own_fields

CRITERIONS = ["raml", "token_smooth", "searnn_kl", "risk", "seq_exploration", "interpolation", "erac", "vaml"]


@pytest.mark.parametrize("name", CRITERIONS)
def test_listed_flags_are_the_ones_fairseq_train_parses(toy_data, name):
    """Every listed flag is an option fairseq-train accepts with this criterion, with the
    listed default; and every option the criterion adds to fairseq's is listed."""
    from fairseq import options

    argv = [str(toy_data), "--user-dir", USER_DIR, "--task", "seqlevel_translation", "--arch", "lstm",
            "--criterion", name]
    args = options.parse_args_and_arch(options.get_training_parser(), argv)
    listed = own_fields(config_class(name))
    assert listed
    for flag, default, _ in listed:
        attr = flag[2:].replace("-", "_")
        assert hasattr(args, attr), f"{name}: {flag} is listed but fairseq-train has no such option"
        assert getattr(args, attr) == default, (flag, getattr(args, attr), default)
    plain = options.parse_args_and_arch(options.get_training_parser(), [*argv[:-1], "cross_entropy"])
    added = {k for k in vars(args) if k not in vars(plain) and not k.startswith("_")}
    assert added <= {flag[2:].replace("-", "_") for flag, _, _ in listed}, added


def test_cli_prints_a_criterion_s_flags_and_refuses_an_unknown_name():
    run = [sys.executable, "-m", "fairseq_seqlevel.flags"]
    out = subprocess.run([*run, "risk"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and "--risk-candidates" in out.stdout and "--risk-sharpness" in out.stdout
    table = format_flags("seqlevel_translation", markdown=True).splitlines()
    assert table[0] == "| flag | default | meaning |" and any(line.startswith("| `--reward` | `bleu` |") for line in table)
    bad = subprocess.run([*run, "riskk"], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].startswith("error: unknown criterion or task")


@pytest.mark.parametrize("name", ["risk", "seq_exploration", "interpolation", "erac", "searnn_kl"])
def test_deprecated_flag_names_set_the_new_fields(toy_data, name, caplog):
    """Recipes written with the names before issue 41 keep running: each old flag is a
    hidden option that sets the new flag's field (same type) and says it is deprecated."""
    from fairseq import options
    from fairseq.registry import REGISTRIES

    criterion_class = REGISTRIES["criterion"]["registry"][name]
    aliases = criterion_class.deprecated_flags
    assert aliases
    listed = {flag for flag, _, _ in own_fields(config_class(name))}
    assert set(aliases.values()) <= listed and not set(aliases) & listed
    argv = [str(toy_data), "--user-dir", USER_DIR, "--task", "seqlevel_translation", "--arch", "lstm",
            "--criterion", name]
    parser = options.get_training_parser()
    new = options.parse_args_and_arch(options.get_training_parser(), argv)
    values = {}
    for old, flag in aliases.items():
        default = getattr(new, flag[2:].replace("-", "_"))
        values[old] = ("none" if flag.endswith("-anneal") else
                       str(default * 2 + 1) if isinstance(default, (int, float)) and not isinstance(default, bool)
                       else "bleu" if flag.endswith("-reward") else None)
    given = [a for old, v in values.items() if v is not None for a in (old, v)]
    with caplog.at_level("WARNING"):
        args = options.parse_args_and_arch(parser, [*argv, *given])
    for old, v in values.items():
        if v is None:
            continue
        got = getattr(args, aliases[old][2:].replace("-", "_"))
        assert str(got) == v or got == type(got)(v), (old, got, v)
        assert f"{old} is deprecated: use {aliases[old]}" in caplog.text
