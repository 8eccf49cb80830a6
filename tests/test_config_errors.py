"""Bad --token-embeddings files: one ConfigError line naming the file and the problem."""

import pytest

from conftest import TINY_LSTM, USER_DIR, build_training, run_cli
from fairseq_seqlevel.errors import ConfigError, InputFileError

SMOOTH = ["--criterion", "token_smooth", "--token-smooth-alpha", "0.3"]


def _argv(toy_data, path):
    return [toy_data, "--user-dir", USER_DIR, "--task", "seqlevel_translation", *TINY_LSTM,
            *SMOOTH, "--token-embeddings", path]


@pytest.mark.parametrize("kind,problem", [
    ("missing", "No such file or directory"),
    ("directory", "Is a directory"),
    ("malformed", "expected a word and 4 numbers, found 3 fields"),
    ("not utf-8", "not valid utf-8 text"),
])
def test_bad_embeddings_file_is_one_config_error(toy_data, tmp_path, kind, problem):
    path = tmp_path / "vectors.txt"
    if kind == "directory":
        path.mkdir()
    elif kind == "malformed":
        path.write_text("w1 0.1 0.2 0.3 0.4\nw2 0.1 0.2\n")
    elif kind == "not utf-8":
        path.write_bytes(b"w1 0.1 0.2\n\xff\xfe 0.3 0.4\n")
    with pytest.raises(InputFileError) as err:
        build_training(_argv(toy_data, path))
    message = str(err.value)
    assert isinstance(err.value, ConfigError) and "\n" not in message
    assert message.startswith(f"--token-embeddings {path}") and problem in message, message


def test_bad_embeddings_file_cli_prints_one_line(toy_data, tmp_path):
    path = tmp_path / "vectors.txt"
    path.write_text("w1 0.1 0.2 0.3 0.4\nw2 0.1 0.2\n")
    out = run_cli("train", *_argv(toy_data, path), "--max-epoch", "1", "--save-dir", tmp_path / "ckpt",
                  "--optimizer", "adam", "--lr", "1e-3", "--max-tokens", "500", check=False)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: --token-embeddings {path}:2: "), out.stderr[-2000:]
