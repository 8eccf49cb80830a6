"""python -m fairseq_seqlevel.flags: a criterion's flags, which fairseq-train --help cannot list."""

import dataclasses
import re
import subprocess
import sys

import pytest

from conftest import REPO, USER_DIR
from fairseq_seqlevel.flags import DOCS, config_class, format_flags, generated_docs, main, own_fields, stale_tables

CRITERIONS = ["raml", "token_smooth", "searnn_kl", "risk", "seq_exploration", "interpolation", "erac", "vaml",
              "preference"]


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
    # old: new (the same flag renamed), or old: (new, value) (a switch that sets new to value)
    aliases = {old: new if isinstance(new, tuple) else (new, None)
               for old, new in criterion_class.deprecated_flags.items()}
    assert aliases
    listed = {flag for flag, _, _ in own_fields(config_class(name))}
    assert {new for new, _ in aliases.values()} <= listed and not set(aliases) & listed
    argv = [str(toy_data), "--user-dir", USER_DIR, "--task", "seqlevel_translation", "--arch", "lstm",
            "--criterion", name]
    parser = options.get_training_parser()
    new = options.parse_args_and_arch(options.get_training_parser(), argv)
    values = {}
    for old, (flag, fixed) in aliases.items():
        default = getattr(new, flag[2:].replace("-", "_"))
        values[old] = (None if fixed is not None else "none" if flag.endswith("-anneal") else  # switches: their own tests
                       str(default * 2 + 1) if isinstance(default, (int, float)) and not isinstance(default, bool)
                       else "bleu" if flag.endswith("-reward") else None)
    given = [a for old, v in values.items() if v is not None for a in (old, v)]
    with caplog.at_level("WARNING"):
        args = options.parse_args_and_arch(parser, [*argv, *given])
    for old, v in values.items():
        if v is None:
            continue
        flag = aliases[old][0]
        got = getattr(args, flag[2:].replace("-", "_"))
        assert str(got) == v or got == type(got)(v), (old, got, v)
        assert f"{old} is deprecated: use {flag}" in caplog.text


def test_the_flag_tables_of_docs_flags_md_are_the_generated_ones():
    """docs/flags.md's tables are what the config dataclasses generate: a help string or a
    default changed without ``python -m fairseq_seqlevel.flags --write-docs`` fails here.
    Hidden deprecated aliases are in no table."""
    from fairseq.registry import REGISTRIES

    assert DOCS == REPO / "docs" / "flags.md"
    text = DOCS.read_text()
    stale = stale_tables(text)
    assert not stale, f"stale tables {stale} in docs/flags.md: run python -m fairseq_seqlevel.flags --write-docs"
    assert generated_docs(text) == text
    tables = "".join(re.findall(r"<!-- flags:\S+ -->\n.*?<!-- /flags:\S+ -->", text, re.S))
    for name in CRITERIONS:
        for old in REGISTRIES["criterion"]["registry"][name].deprecated_flags:
            assert f"`{old}`" not in tables and f"`{old} " not in tables, old


def test_check_docs_names_the_table_a_changed_field_makes_stale(tmp_path, monkeypatch, capsys):
    copy = tmp_path / "flags.md"
    copy.write_text(DOCS.read_text())
    assert main(["--check-docs", str(copy)]) == 0
    field = next(f for f in dataclasses.fields(config_class("risk")) if f.name == "risk_candidates")
    monkeypatch.setattr(field, "default", 9)
    assert main(["--check-docs", str(copy)]) == 1
    assert "stale flag tables: risk;" in capsys.readouterr().err
    monkeypatch.setattr(field, "default", 8)
    monkeypatch.setattr(field, "metadata", {"help": "n: candidates | per source"})
    assert stale_tables(copy.read_text()) == ["risk"]
    assert main(["--write-docs", str(copy)]) == 0
    written = copy.read_text()
    assert "| `--risk-candidates` | `8` | n: candidates \\| per source |\n" in written
    assert stale_tables(written) == [] and len(written.splitlines()) == len(DOCS.read_text().splitlines())


def test_a_missing_or_unpaired_marker_is_refused(tmp_path, capsys):
    text = DOCS.read_text()
    unclosed = text.replace("<!-- /flags:risk -->\n", "", 1)
    with pytest.raises(ValueError, match="unpaired .*markers: risk$"):
        generated_docs(unclosed)
    no_vaml = re.sub(r"<!-- flags:vaml -->\n.*?<!-- /flags:vaml -->\n", "", text, flags=re.S)
    with pytest.raises(ValueError, match="table for vaml$"):
        generated_docs(no_vaml)
    copy = tmp_path / "flags.md"
    copy.write_text(unclosed)
    assert main(["--write-docs", str(copy)]) == 1 and copy.read_text() == unclosed
    assert "markers: risk" in capsys.readouterr().err


def test_each_criterion_page_links_to_the_section_of_its_flag_table():
    """docs/criterions/NAME.md links to the heading above NAME's table in docs/flags.md
    (GitHub's anchors: lower case, punctuation but - and _ dropped, spaces as -)."""
    section, heading = {}, None
    for line in DOCS.read_text().splitlines():
        if line.startswith("#"):
            heading = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        elif line.startswith("<!-- flags:"):
            section[line.split()[1][len("flags:"):]] = heading
    for name in CRITERIONS:
        page = (REPO / "docs" / "criterions" / f"{name}.md").read_text()
        assert f"](../flags.md#{section[name]})" in page, (name, section[name])
