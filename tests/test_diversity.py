"""python -m fairseq_seqlevel.diversity on hand-made groups and bad files."""

import json
import subprocess
import sys

import pytest

from conftest import REPO


def _run(path, k):
    return subprocess.run([sys.executable, "-m", "fairseq_seqlevel.diversity", str(path), "--k", str(k)],
                          capture_output=True, text=True, cwd=REPO)


def test_identical_and_disjoint_groups(tmp_path):
    path = tmp_path / "hyps.txt"
    identical = ["the cat sat on the mat"] * 3
    disjoint = ["a b c d", "e f g h", "i j k l"]
    path.write_text("\n".join(identical + disjoint) + "\n")
    out = _run(path, 3)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    # identical: mbleu4 1; 5 distinct words / 18, 5 distinct bigrams / 18
    # disjoint: mbleu4 0; 12/12 distinct words, 9 bigrams / 12
    assert got["inputs"] == 2 and got["k"] == 3
    assert got["mbleu4"] == pytest.approx((1.0 + 0.0) / 2, abs=1e-6)
    assert got["div1"] == pytest.approx((5 / 18 + 1.0) / 2, abs=1e-6)
    assert got["div2"] == pytest.approx((5 / 18 + 9 / 12) / 2, abs=1e-6)


@pytest.mark.parametrize("content,k,message", [
    ("", 2, "empty file"),
    ("a\nb\nc\n", 2, "3 lines is not a multiple of --k 2"),
    ("a\nb\n", 1, "--k must be >= 2"),
])
def test_bad_file_is_one_line(tmp_path, capsys, content, k, message):
    from fairseq_seqlevel.diversity import main

    path = tmp_path / "hyps.txt"
    path.write_text(content)
    assert main([str(path), "--k", str(k)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
