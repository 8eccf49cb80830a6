"""``scripts/gpu_check.sh`` cannot rot: its dry run on this CPU machine.

``--dry-run`` hides the GPUs (``CUDA_VISIBLE_DEVICES=''``): the CUDA steps
must say "skipped: no CUDA" after collecting their tests, the rest must run
(the kit check, the interpreter, the install step, which finds everything in
this venv, the imports, ``benchmarks/gpu_speed.py`` at toy sizes on the CPU)
and the speed table must be written and printed last.  The kit is a stand-in:
files of the names ``gpu_check.sh`` requires (the real ``gpu_kit/`` is
git-ignored, built by ``scripts/gpu_kit.sh``), with a MANIFEST of their
checksums.  A missing or incomplete kit stops the script at once with one
line naming what is missing.
"""

import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import time

import pytest

from conftest import REPO

CHECK = REPO / "scripts" / "gpu_check.sh"
KIT_SCRIPT = REPO / "scripts" / "gpu_kit.sh"


def _bash_array(script, name):
    """The elements of the bash array ``name=(...)`` assigned in ``script``."""
    out = subprocess.run(["bash", "-c", f'eval "$(sed -n "/^{name}=(/,/)$/p" "$1")"; printf "%s\\n" "${{{name}[@]}}"',
                          "_", str(script)], capture_output=True, text=True, check=True).stdout
    return out.split()


def kit_names():
    return [p.replace("*", "manylinux2014_x86_64") for p in _bash_array(CHECK, "KIT_FILES")]


def make_kit(path, leave_out=(), manifest=True):
    path.mkdir(parents=True)
    lines = []
    for name in kit_names():
        data = f"stand-in for {name}\n".encode()
        lines.append(f"{hashlib.sha256(data).hexdigest()}  {name}")
        if not any(name.startswith(x) for x in leave_out):
            (path / name).write_bytes(data)
    if manifest:
        (path / "MANIFEST").write_text("\n".join(lines) + "\n")
    return path


def run_check(tmp_path, kit, *args, timeout=300):
    env = dict(os.environ, GPU_KIT=str(kit), GPU_CHECK_OUT=str(tmp_path / "out"), GPU_CHECK_PYTHON=sys.executable,
               GPU_CHECK_VENV=str(tmp_path / "venv"), OMP_NUM_THREADS="1")
    start = time.perf_counter()
    proc = subprocess.run(["bash", str(CHECK), *args], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=str(tmp_path))
    return proc, time.perf_counter() - start


def test_kit_lists_agree():
    """gpu_check.sh requires exactly what gpu_kit.sh downloads."""
    assert _bash_array(CHECK, "KIT_FILES") == _bash_array(KIT_SCRIPT, "want")
    assert len(kit_names()) == 6


PROBED = ("hydra", "omegaconf", "antlr4", "bitarray", "fairseq", "rxlm.metrics.tensorbleu")  # its install step's


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    lacking = [m for m in PROBED if importlib.util.find_spec(m.split(".")[0]) is None]
    if lacking:  # the dry run would install them from the stand-in kit
        pytest.skip(f"this environment lacks {lacking} (scripts/install.sh installs them)")
    tmp = tmp_path_factory.mktemp("gpu_check")
    proc, seconds = run_check(tmp, make_kit(tmp / "kit"), "--dry-run")
    return proc, tmp / "out", seconds


def test_dry_run_skips_the_cuda_steps_and_runs_the_rest(dry_run):
    proc, out, seconds = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    log = proc.stdout
    for step in ("test_gpu", "precision"):
        match = re.search(rf"\] {step}: skipped: no CUDA \((\d+) tests collected\)", log)
        assert match and int(match.group(1)) > 0, f"{step}:\n{log[-3000:]}"
    assert re.search(r"\] speed: skipped: no CUDA; CPU smoke run ok", log), log[-3000:]
    assert "] python: ok (torch" in log and "no CUDA device visible" in log
    assert "] install: ok (nothing to install)" in log
    assert re.search(r"\] imports: ok \(fairseq [\d.]+ .*9 criterions", log)
    assert re.search(r"\[gpu_check \d+:\d\d / 8:00\] == speed \(budget 2:00\) ==", log)  # the budget as it goes
    assert "FAILED" not in log
    # well inside the minute it is planned for (a loaded 2-core machine: twice that)
    assert seconds < 120, f"the dry run took {seconds:.0f} s"


def test_dry_run_writes_the_reports_and_prints_the_table_last(dry_run):
    proc, out, _ = dry_run
    table = (out / "gpu_speed.txt").read_text()
    assert proc.stdout.rstrip().endswith(table.rstrip())
    assert "TINY SIZES" in table and "Bible model shape" in table and "TensorBLEU" in table
    data = json.loads((out / "gpu_speed.json").read_text())
    assert data["meta"]["device"] == "cpu" and data["meta"]["tiny"]
    crit = data["criterions"]
    assert set(crit) == {"mle", "raml_lazy", "erac"} and all("ms_per_step" in r for r in crit.values()), crit
    assert crit["mle"]["vs_mle"] == 1.0
    assert {(r["tokens"], r["batch"]) for r in data["rewards"]} == {(16, 4), (32, 4)}
    assert all("sentence_bleu_ms" in r and "tensorbleu_ms" in r for r in data["rewards"]), data["rewards"]
    assert "ratio" in data["sampler"], data["sampler"]
    summary = (out / "summary.txt").read_text()
    for step in ("python", "install", "imports", "test_gpu", "precision", "speed"):
        assert re.search(rf"^  {step} ", summary, re.M), summary


@pytest.mark.parametrize("broken,named", [
    ("no_folder", "kit"),
    ("no_manifest", "MANIFEST"),
    ("no_bitarray", "bitarray-3.12.3-cp312-cp312-*.whl"),
    ("no_sdist", "fairseq_fixed-0.12.3.1.tar.gz"),
    ("damaged", "hydra_core-1.3.2-py3-none-any.whl"),
])
def test_missing_or_incomplete_kit_is_one_line_naming_it(tmp_path, broken, named):
    kit = tmp_path / "kit"
    if broken != "no_folder":
        make_kit(kit, leave_out={"no_bitarray": ["bitarray"], "no_sdist": ["fairseq_fixed"]}.get(broken, ()),
                 manifest=broken != "no_manifest")
    if broken == "damaged":
        (kit / named).write_text("changed\n")
    proc, seconds = run_check(tmp_path, kit, "--dry-run", timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: error: "), proc.stderr
    assert f"{kit}/{named}" in lines[0] if broken != "no_folder" else str(kit) in lines[0]
    assert proc.stdout == ""  # nothing ran
    assert not (tmp_path / "out").exists()
