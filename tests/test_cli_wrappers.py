"""seqlevel-train / -generate / -interactive (fairseq_seqlevel/cli.py) work from any directory,
and seqlevel-evaluate's --refs/--metric defaults follow DATA/manifest.json."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, TINY_LSTM, USER_DIR

from benchmarks.evaluate import manifest_defaults
from fairseq_seqlevel import cli


def test_user_dir_is_added_exactly_when_absent():
    assert cli.USER_DIR == USER_DIR
    assert cli.with_user_dir(["data", "--beam", "5"]) == ["--user-dir", USER_DIR, "data", "--beam", "5"]
    assert cli.with_user_dir([]) == ["--user-dir", USER_DIR]
    assert cli.with_user_dir(["--help"]) == ["--user-dir", USER_DIR, "--help"]
    for given in (["data", "--user-dir", "/elsewhere/plugin"], ["--user-dir=/elsewhere/plugin", "data"]):
        assert cli.with_user_dir(given) == given
    # a value that merely mentions the flag is not the flag
    assert cli.with_user_dir(["--save-dir", "x--user-dir"])[:2] == ["--user-dir", USER_DIR]


def test_module_prints_the_user_dir(capsys):
    assert cli.main(["user-dir"]) == 0
    assert capsys.readouterr().out == USER_DIR + "\n"
    assert cli.main(["trian"]) == 2
    assert "user-dir | train | generate | interactive" in capsys.readouterr().err


def test_setup_declares_the_wrappers():
    setup = (REPO / "setup.py").read_text()
    for command in cli.COMMANDS:
        assert f'"seqlevel-{command} = fairseq_seqlevel.cli:{command}"' in setup
        assert callable(getattr(cli, command))


def wrapper(command):
    """The installed console script, else the same entry through ``python -m``."""
    script = Path(sys.executable).parent / f"seqlevel-{command}"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "fairseq_seqlevel.cli", command]


def run_wrapper(command, *args, cwd):
    # PYTHONPATH: this checkout's code even where the venv's install points at another copy
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([*wrapper(command), *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd)
    assert proc.returncode == 0, f"seqlevel-{command} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return proc


def test_train_then_generate_outside_the_repository(toy_data, tmp_path):
    """The README's trap: ``--user-dir fairseq_seqlevel`` only resolves in the repository root."""
    assert not (tmp_path / "fairseq_seqlevel").exists() and REPO not in tmp_path.parents
    run_wrapper("train", toy_data, "--task", "seqlevel_translation", *TINY_LSTM,
                "--criterion", "cross_entropy", "--optimizer", "adam", "--lr", "0.005", "--max-tokens", "400",
                "--max-update", "1", "--disable-validation", "--no-save-optimizer-state",
                "--no-progress-bar", "--seed", "1", "--num-workers", "0", "--save-dir", "ckpt", cwd=tmp_path)
    assert (tmp_path / "ckpt" / "checkpoint_last.pt").exists()
    gen = run_wrapper("generate", toy_data, "--task", "seqlevel_translation", "--path", "ckpt/checkpoint_last.pt",
                      "--beam", "2", "--gen-subset", "test", cwd=tmp_path)
    assert len(re.findall(r"^H-\d+\t", gen.stdout, re.M)) == 12, gen.stdout[-3000:]


def write_manifest(path, **manifest):
    path.mkdir(parents=True, exist_ok=True)
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def test_evaluate_defaults_follow_the_manifest(tmp_path):
    text = write_manifest(tmp_path / "text", script="prepare_text.py", src="de", tgt="fr",
                          extra_refs={"ref2": ["valid", "test"], "ref3": ["train"]})
    assert manifest_defaults(text) == {"refs": ["fr", "ref2"], "metric": "bleu"}
    assert manifest_defaults(text, "train") == {"refs": ["fr", "ref3"], "metric": "bleu"}
    spelling = write_manifest(tmp_path / "spelling", script="prepare_spelling.py", src="noisy", tgt="clean")
    assert manifest_defaults(spelling) == {"refs": ["clean"], "metric": "edit"}
    said = write_manifest(tmp_path / "said", src="a", tgt="b", metric="edit")
    assert manifest_defaults(said) == {"refs": ["b"], "metric": "edit"}
    with pytest.raises(SystemExit, match="metric 'ter'"):
        manifest_defaults(write_manifest(tmp_path / "bad", tgt="b", metric="ter"))


def test_evaluate_defaults_without_a_manifest(toy_data, tmp_path):
    assert manifest_defaults(toy_data) == {"refs": ["tgt"], "metric": "bleu"}  # from test.src-tgt.tgt.idx
    assert manifest_defaults(tmp_path) == {"refs": ["en"], "metric": "bleu"}  # the old default


def test_evaluate_flags_win_over_the_manifest(tmp_path, monkeypatch, capsys):
    import benchmarks.evaluate as ev

    data = write_manifest(tmp_path / "d", src="de", tgt="fr", extra_refs={"ref2": ["test"]})
    seen = []
    monkeypatch.setattr(ev, "evaluate", lambda data, ckpt, split, beam, langs, metric: seen.append((langs, metric)) or {})
    ev.main([str(data), "ckpt.pt"])
    ev.main([str(data), "ckpt.pt", "--refs", "ref2", "--metric", "edit"])
    ev.main([str(data), "ckpt.pt", "--metric", "edit"])
    assert seen == [(["fr", "ref2"], "bleu"), (["ref2"], "edit"), (["fr", "ref2"], "edit")]
