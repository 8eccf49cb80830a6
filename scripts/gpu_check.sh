#!/usr/bin/env bash
# The GPU check in one command, for an air-gapped CUDA node: Python 3.12 with
# torch (CUDA), sacrebleu, sentencepiece and pytest preinstalled, no fairseq,
# no network, a few minutes of GPU time.  Carry gpu_kit/ (built by
# scripts/gpu_kit.sh where the package registries are) with the working tree:
#
#   bash scripts/gpu_check.sh [--dry-run]
#
# Steps, each with its share of the time budget (target: 8 minutes in all,
# printed as it goes; a hard stop keeps the whole run under 9.5 minutes):
#   kit        gpu_kit/ complete and matching its MANIFEST (else: one-line error, exit 2)
#   python     interpreter, torch, CUDA device
#   install    what the interpreter lacks, into a virtualenv that sees its packages
#              ($GPU_CHECK_VENV): the kit's wheels (hydra-core, omegaconf, antlr4
#              runtime, bitarray, rxlm = TensorBLEU) and fairseq-fixed built from its
#              sdist against the node's torch (--no-build-isolation --no-deps, C++
#              and Cython extensions, no CUDA ones; about 2-3 minutes).  If that
#              build fails, it is built again without the torch C++ extensions
#              (said so; nothing here uses libbase or libnat; GPU_CHECK_TORCH_EXT=0
#              builds it so at once, about 2 minutes sooner).  Skipped when the interpreter
#              already imports all of it; reused when the virtualenv does.
#   imports    fairseq, the plugin and its criterions
#   test_gpu   tests/test_gpu.py: one CUDA update of every criterion, host-device
#              syncs counted (the counts go to gpu_tests.json to calibrate the budgets)
#   precision  tests/test_gpu_precision.py: --bf16, and --fp16 with fairseq's loss
#              scaler, one Trainer update of every criterion on CUDA
#   speed      python -m benchmarks.gpu_speed: criterions vs MLE on the Bible model shape,
#              rewards vs TensorBLEU at 256 / 1,024 tokens, sampler vs SequenceGenerator
# then the summary, and the speed table last.  Without CUDA (and always with
# --dry-run, which hides the GPUs) the CUDA steps print "skipped: no CUDA" after
# collecting their tests, and the speed script runs at toy sizes on the CPU (a
# smoke test, not a measurement).  Exit status: 0 when no step failed, 1 when
# one did, 2 when the kit is missing or incomplete.
#
# Environment:
#   GPU_KIT            the kit folder (default: <repo>/gpu_kit)
#   GPU_CHECK_OUT      where the reports go (default: <repo>/gpu_check_out): summary.txt,
#                      gpu_speed.txt (the table), gpu_speed.json, gpu_tests.json,
#                      install.log, test_gpu.log, precision.log
#   GPU_CHECK_PYTHON   the interpreter that holds torch (default: python3)
#   GPU_CHECK_VENV     the virtualenv for what it lacks (default: $TMPDIR/fairseq_seqlevel_gpu_venv)
#   GPU_CHECK_BUDGET_S target in seconds (default 480); GPU_CHECK_HARD_S hard stop (default 570)
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2

DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check: error: unknown argument '$arg' (usage: scripts/gpu_check.sh [--dry-run])" >&2; exit 2 ;;
  esac
done

KIT="${GPU_KIT:-$ROOT/gpu_kit}"
OUT="${GPU_CHECK_OUT:-$ROOT/gpu_check_out}"
PY="${GPU_CHECK_PYTHON:-python3}"
VENV="${GPU_CHECK_VENV:-${TMPDIR:-/tmp}/fairseq_seqlevel_gpu_venv}"
BUDGET="${GPU_CHECK_BUDGET_S:-480}"
HARD="${GPU_CHECK_HARD_S:-570}"
export PYTHONUNBUFFERED=1
[ "$DRY" = 1 ] && export CUDA_VISIBLE_DEVICES=""

die() { echo "gpu_check: error: $*" >&2; exit 2; }

# ----------------------------------------------------------------- the kit
# exactly what scripts/gpu_kit.sh downloads (keep the two lists together)
KIT_FILES=(fairseq_fixed-0.12.3.1.tar.gz hydra_core-1.3.2-py3-none-any.whl omegaconf-2.3.0-py3-none-any.whl
           antlr4_python3_runtime-4.9.3-py3-none-any.whl "bitarray-3.12.3-cp312-cp312-*.whl"
           rxlm-0.3.80-py3-none-any.whl)
REBUILD="build it with scripts/gpu_kit.sh on a machine with the package registries and carry it"
[ -d "$KIT" ] || die "kit folder $KIT missing ($REBUILD)"
[ -f "$KIT/MANIFEST" ] || die "kit incomplete: $KIT/MANIFEST missing ($REBUILD)"
for pattern in "${KIT_FILES[@]}"; do
  # shellcheck disable=SC2206
  match=($KIT/$pattern)
  [ -f "${match[0]}" ] || die "kit incomplete: $KIT/$pattern missing ($REBUILD)"
done
while read -r sum name; do
  [ -n "$name" ] || continue
  [ -f "$KIT/$name" ] || die "kit incomplete: $KIT/$name missing (listed in its MANIFEST; $REBUILD)"
  [ "$(sha256sum < "$KIT/$name" | cut -d' ' -f1)" = "$sum" ] \
    || die "kit damaged: $KIT/$name does not match its MANIFEST checksum ($REBUILD)"
done < "$KIT/MANIFEST"
# shellcheck disable=SC2206  # $1 is a glob on purpose
kit_file() { local m=("$KIT"/$1); echo "${m[0]}"; }

mkdir -p "$OUT" || die "cannot create $OUT"
rm -f "$OUT"/{summary.txt,gpu_speed.txt,gpu_speed.json,gpu_tests.json,install.log,test_gpu.log,precision.log}
export GPU_CHECK_REPORT="$OUT/gpu_tests.json"
TMP="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

# ------------------------------------------------------------ budget, steps
T0=$SECONDS
STEPS=()
FAILED=0
mmss() { printf '%d:%02d' $(($1 / 60)) $(($1 % 60)); }
elapsed() { echo $((SECONDS - T0)); }
begin() {
  STEP=$1 STEP_BUDGET=$2 STEP_T0=$SECONDS
  printf '\n[gpu_check %s / %s] == %s (budget %s) ==\n' "$(mmss "$(elapsed)")" "$(mmss "$BUDGET")" "$1" "$(mmss "$2")"
}
end() {  # end STATUS: a word (ok, FAILED, skipped) and what follows it
  local took=$((SECONDS - STEP_T0)) over=""
  [ "$took" -gt "$STEP_BUDGET" ] && over=" (OVER its budget)"
  printf '[gpu_check %s / %s] %s: %s in %s of %s%s\n' "$(mmss "$(elapsed)")" "$(mmss "$BUDGET")" "$STEP" "$1" \
    "$(mmss "$took")" "$(mmss "$STEP_BUDGET")" "$over"
  STEPS+=("$STEP|$1|$took|$STEP_BUDGET")
  case "$1" in FAILED*) FAILED=1 ;; esac
}
limit() {  # seconds a step may run: its cap, or what is left before the hard stop
  local cap=$1 left=$((HARD - (SECONDS - T0) - 15))
  [ "$left" -lt "$cap" ] && cap=$left
  [ "$cap" -lt 5 ] && cap=5
  echo "$cap"
}
time_left() { [ $((HARD - (SECONDS - T0) - 15)) -ge "$1" ]; }

# a pytest plugin: the sync counts of test_gpu.py's updates and test_gpu_precision.py's
# REPORT into $GPU_CHECK_REPORT (what calibrates their budgets and tolerances)
cat > "$TMP/gpu_check_report.py" <<'EOF'
import json, os, sys

_syncs = {}


def pytest_collection_finish(session):
    mod = sys.modules.get("test_gpu")
    if mod is not None and hasattr(mod, "_update") and not hasattr(mod._update, "_gpu_check"):
        original = mod._update

        def _update(case):
            out = original(case)
            _syncs[case.name] = max(_syncs.get(case.name, 0), out[3])
            return out

        _update._gpu_check = True
        mod._update = _update


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("GPU_CHECK_REPORT")
    if not path:
        return
    data = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    gpu = sys.modules.get("test_gpu")
    if _syncs:
        data["test_gpu_syncs"] = dict(sorted(_syncs.items()))
        data["test_gpu_budget"] = {"SYNC_SLACK": getattr(gpu, "SYNC_SLACK", None),
                                   "MAX_DECODE_STEPS": getattr(gpu, "MAX_DECODE_STEPS", None)}
    precision = sys.modules.get("test_gpu_precision")
    if precision is not None and getattr(precision, "REPORT", None):
        data["test_gpu_precision"] = dict(sorted(precision.REPORT.items()))
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
EOF

# ------------------------------------------------------------------ python
begin python 10
if ! command -v "$PY" > /dev/null 2>&1; then
  end "FAILED: no interpreter $PY"
  echo "gpu_check: error: no python at '$PY' (set GPU_CHECK_PYTHON to the interpreter that holds torch)" >&2
  exit 1
fi
PYINFO="$("$PY" - 2>&1 <<'EOF'
import platform, sys
print(f"python {platform.python_version()} ({sys.executable})")
try:
    import torch
except Exception as e:
    print(f"NO_TORCH {type(e).__name__}: {e}")
    raise SystemExit(0)
print(f"torch {torch.__version__}, CUDA runtime {torch.version.cuda}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU {p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}, {torch.cuda.device_count()} device(s)")
    print("CUDA_OK")
else:
    print("no CUDA device visible")
EOF
)" || true
echo "$PYINFO" | grep -v '^CUDA_OK$'
if echo "$PYINFO" | grep -q '^NO_TORCH'; then
  end "FAILED: $PY cannot import torch"
  echo "gpu_check: error: $PY cannot import torch (set GPU_CHECK_PYTHON to the interpreter that has it)" >&2
  exit 1
fi
CUDA=0
echo "$PYINFO" | grep -q '^CUDA_OK$' && CUDA=1
[ "$DRY" = 1 ] && echo "dry run: CUDA_VISIBLE_DEVICES='' hides the GPUs"
DEVICE_LINE="$(echo "$PYINFO" | grep -E '^(GPU|no CUDA)' | head -1)"
end "ok ($(echo "$PYINFO" | sed -n 2p); ${DEVICE_LINE:-?})"

# ----------------------------------------------------------------- install
KIT_MODULES="hydra omegaconf antlr4 bitarray fairseq rxlm.metrics.tensorbleu"
missing_of() {  # the modules of the kit that interpreter $1 cannot import (all of them if it cannot run)
  local out
  out="$("$1" - $KIT_MODULES 2>/dev/null <<'EOF'
import importlib, sys
missing = []
for module in sys.argv[1:]:
    try:
        importlib.import_module(module)
    except Exception:
        missing.append(module)
print("probed:", *missing)
EOF
)"
  case "$out" in *"probed:"*) out="${out##*probed:}"; echo "${out# }" ;; *) echo "$KIT_MODULES" ;; esac
}
begin install 180
RUN_PY="$PY"
STAMP="$(cat "$KIT/MANIFEST" <(command -v "$PY") | sha256sum | cut -d' ' -f1)"
MISSING="$(missing_of "$PY")"
if [ -z "$MISSING" ]; then
  echo "$PY already imports fairseq, hydra, omegaconf, antlr4, bitarray and rxlm: nothing to install"
  end "ok (nothing to install)"
elif [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/.gpu_check_stamp" 2>/dev/null)" = "$STAMP" ] \
     && [ -z "$(missing_of "$VENV/bin/python")" ]; then
  RUN_PY="$VENV/bin/python"
  echo "reusing $VENV (installed from this kit before)"
  end "ok (reused $VENV)"
else
  echo "$PY lacks: $MISSING -> installing into $VENV (log: $OUT/install.log)"
  INSTALL_NOTE=""
  install_all() {
    rm -rf "$VENV"
    "$PY" -m venv "$VENV" || { echo "python -m venv failed"; return 1; }
    local site
    site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" || return 1
    # the new environment sees everything the interpreter has (torch first of all), after its own packages
    "$PY" -c 'import site; print("\n".join(site.getsitepackages() + [site.getusersitepackages()]))' \
      | while read -r dir; do [ -d "$dir" ] && echo "import site; site.addsitedir('$dir')"; done \
      > "$site/_gpu_check_parent.pth"
    local pip=("$VENV/bin/python" -m pip install --no-index --no-deps --no-cache-dir --disable-pip-version-check)
    local wheels=() module
    for module in $MISSING; do
      case "$module" in
        hydra) wheels+=("$(kit_file 'hydra_core-*.whl')") ;;
        omegaconf) wheels+=("$(kit_file 'omegaconf-*.whl')") ;;
        antlr4) wheels+=("$(kit_file 'antlr4_python3_runtime-*.whl')") ;;
        bitarray) wheels+=("$(kit_file 'bitarray-*.whl')") ;;
        rxlm.metrics.tensorbleu) wheels+=("$(kit_file 'rxlm-*.whl')") ;;
      esac
    done
    if [ "${#wheels[@]}" -gt 0 ]; then
      echo "+ pip install ${wheels[*]##*/}"
      "${pip[@]}" "${wheels[@]}" || { echo "installing the wheels failed (bitarray's is for CPython 3.12 x86_64)"; return 1; }
    fi
    case " $MISSING " in *" fairseq "*)
      local sdist
      sdist="$(kit_file 'fairseq_fixed-*.tar.gz')"
      echo "+ building ${sdist##*/} against $("$PY" -c 'import torch; print("torch", torch.__version__)')"
      # no CUDA_HOME: fairseq's setup.py would add its CUDA extensions (minutes of nvcc, unused here)
      if [ "${GPU_CHECK_TORCH_EXT:-1}" = 0 ]; then
        echo "GPU_CHECK_TORCH_EXT=0: without fairseq's torch C++ extensions (Cython and libbleu only)"
      elif (cd "$TMP" && env -u CUDA_HOME "${pip[@]}" --no-build-isolation "$sdist"); then
        :
      else
        # the plugin needs the Cython ones (fairseq's batch_by_size); the torch C++ ones (libbase,
        # libnat, the alignment example: BASE layers, Levenshtein NAT) are what a new torch can break
        echo "!! the build failed; again without fairseq's torch C++ extensions (Cython and libbleu only)"
      fi
      if ! "$VENV/bin/python" -c "import fairseq" 2>/dev/null; then
        rm -rf "$TMP/src" && mkdir -p "$TMP/src" && tar -xzf "$sdist" -C "$TMP/src" || return 1
        local src=("$TMP"/src/fairseq_fixed-*)
        "$PY" -c '
import sys
path = sys.argv[1]
text = open(path).read()
start = text.index("extensions.extend(\n    [\n        cpp_extension.CppExtension(\n            \"fairseq.libbase\"")
end = text.index("\n)\n", start) + 3
open(path, "w").write(text[:start] + "# (scripts/gpu_check.sh: torch C++ extensions left out)\n" + text[end:])
' "${src[0]}/setup.py" || return 1
        (cd "$TMP" && env -u CUDA_HOME "${pip[@]}" --no-build-isolation "${src[0]}") || return 1
        echo "FALLBACK_NO_TORCH_EXTENSIONS"
      fi ;;
    esac
    "$VENV/bin/python" -c "import fairseq" || return 1
  }
  if install_all > "$OUT/install.log" 2>&1 && [ -z "$(missing_of "$VENV/bin/python")" ]; then
    RUN_PY="$VENV/bin/python"
    echo "$STAMP" > "$VENV/.gpu_check_stamp"
    if grep -q '^FALLBACK_NO_TORCH_EXTENSIONS' "$OUT/install.log"; then
      if [ "${GPU_CHECK_TORCH_EXT:-1}" = 0 ]; then
        echo "GPU_CHECK_TORCH_EXT=0: fairseq built without its torch C++ extensions, as asked"
      else
        echo "WARNING: fairseq's torch C++ extensions did not build against this torch (see install.log):"
      fi
      echo "         libbase and libnat are missing (BASE layers, Levenshtein NAT; nothing here uses them)"
      INSTALL_NOTE=", fairseq WITHOUT its torch C++ extensions"
    fi
    end "ok (installed: $MISSING$INSTALL_NOTE)"
  else
    tail -n 25 "$OUT/install.log"
    echo "(a C++ compiler is needed for fairseq's Cython extensions, which the plugin uses)"
    end "FAILED: install (see install.log)"
  fi
fi

# ----------------------------------------------------------------- imports
begin imports 10
if [ "$FAILED" = 0 ] && IMPORTS="$(PYTHONPATH="$ROOT" "$RUN_PY" - 2>/dev/null <<'EOF'
import fairseq
import fairseq_seqlevel  # noqa: F401  (registers the criterions)
from fairseq.criterions import CRITERION_REGISTRY
import rxlm.metrics.tensorbleu  # noqa: F401
ours = ["raml", "token_smooth", "searnn_kl", "risk", "seq_exploration", "interpolation", "erac", "vaml",
        "preference"]
absent = [c for c in ours if c not in CRITERION_REGISTRY]
assert not absent, f"criterions not registered: {absent}"
import importlib
ext = []
for module in ("fairseq.data.data_utils_fast", "fairseq.libbleu", "fairseq.libnat", "fairseq.libbase"):
    try:
        importlib.import_module(module)
        ext.append(module.rsplit(".", 1)[1])
    except ImportError:
        pass
print(f"fairseq {fairseq.__version__} (extensions: {', '.join(ext) or 'none'}), "
      f"fairseq_seqlevel with {len(ours)} criterions, TensorBLEU")
EOF
)"; then
  echo "$IMPORTS"
  end "ok ($IMPORTS)"
else
  [ "$FAILED" = 0 ] && PYTHONPATH="$ROOT" "$RUN_PY" -c "import fairseq_seqlevel" 2>&1 | tail -n 5
  end "FAILED: imports"
fi
[ "$FAILED" = 0 ] || {
  echo "gpu_check: error: nothing to test without fairseq and the plugin (see $OUT/install.log)" >&2
  printf '%s\n' "${STEPS[@]}" > "$OUT/summary.txt"
  exit 1
}

# ------------------------------------------------------------ CUDA tests
PYTEST=(-m pytest -q -p no:cacheprovider -p gpu_check_report -W ignore::DeprecationWarning -W ignore::UserWarning)
TEST_FILES=(tests/test_gpu.py tests/test_gpu_precision.py)
COLLECT_RC=""
run_tests() {  # run_tests NAME FILE BUDGET CAP
  local name=$1 file=$2 log="$OUT/$1.log" rc last n
  begin "$name" "$3"
  if [ "$CUDA" = 0 ]; then
    echo "skipped: no CUDA"
    if [ -z "$COLLECT_RC" ]; then  # collect both files once: they still import and parametrize
      PYTHONPATH="$TMP" "$RUN_PY" "${PYTEST[@]}" --collect-only "${TEST_FILES[@]}" > "$TMP/collect.log" 2>&1
      COLLECT_RC=$?
    fi
    n=$(grep -c "^$file::" "$TMP/collect.log")
    if [ "$COLLECT_RC" = 0 ] && [ "$n" -gt 0 ]; then
      end "skipped: no CUDA ($n tests collected)"
    else
      tail -n 15 "$TMP/collect.log"
      end "FAILED: $file does not collect"
    fi
    return
  fi
  if ! time_left 20; then end "skipped: time budget"; return; fi
  PYTHONPATH="$TMP" timeout "$(limit "$4")" "$RUN_PY" "${PYTEST[@]}" -rfE --durations=5 "$file" > "$log" 2>&1
  rc=$?
  grep -E '^(FAILED|ERROR) ' "$log" | head -n 12
  last="$(tail -n 1 "$log")"
  if [ "$rc" = 0 ]; then end "ok (${last//=/})"
  elif [ "$rc" = 124 ]; then end "FAILED: timed out (${last//=/})"
  else end "FAILED (${last//=/}; see $name.log)"
  fi
}
run_tests test_gpu "${TEST_FILES[0]}" 75 150
run_tests precision "${TEST_FILES[1]}" 75 150

# ------------------------------------------------------------------- speed
begin speed 120
if [ "$CUDA" = 1 ]; then
  SPEED=(--device cuda)
else
  echo "GPU speed rows skipped: no CUDA; the script at toy sizes on the CPU instead (a smoke test)"
  SPEED=(--device cpu --tiny)
fi
if time_left 30; then
  cap="$(limit 180)"
  timeout "$cap" "$RUN_PY" -m benchmarks.gpu_speed "${SPEED[@]}" --time-budget $((cap - 45)) \
    --json "$OUT/gpu_speed.json" --table "$OUT/gpu_speed.txt" > "$TMP/speed.log" 2>&1
  rc=$?
  if [ "$rc" = 0 ] && [ -s "$OUT/gpu_speed.txt" ]; then
    errors=$(grep -c ' error: ' "$OUT/gpu_speed.txt")
    note=""; [ "$CUDA" = 0 ] && note="skipped: no CUDA; CPU smoke run ok"
    [ "$errors" -gt 0 ] && end "FAILED ($errors rows with errors)" || end "${note:-ok}"
  else
    tail -n 15 "$TMP/speed.log"
    [ "$rc" = 124 ] && end "FAILED: timed out" || end "FAILED (exit $rc)"
  fi
else
  end "skipped: time budget"
fi

# ----------------------------------------------------------------- summary
{
  printf '\n== gpu_check summary: %s of the %s budget%s ==\n' "$(mmss "$(elapsed)")" "$(mmss "$BUDGET")" \
    "$([ "$DRY" = 1 ] && echo ', dry run')"
  printf '  %-10s %6s %6s  %s\n' step time budget status
  for row in "${STEPS[@]}"; do
    IFS='|' read -r name status took budget <<< "$row"
    printf '  %-10s %6s %6s  %s\n' "$name" "$(mmss "$took")" "$(mmss "$budget")" "$status"
  done
  [ -s "$GPU_CHECK_REPORT" ] && "$RUN_PY" - "$GPU_CHECK_REPORT" <<'EOF'
import json, sys

data = json.load(open(sys.argv[1]))
syncs = data.get("test_gpu_syncs")
if syncs:
    budget = data.get("test_gpu_budget", {})
    base = syncs.get("mle", 0)
    print(f"  test_gpu host-device syncs per update (budget: MLE's {base} + {budget.get('MAX_DECODE_STEPS')} "
          f"decode steps + {budget.get('SYNC_SLACK')} slack): "
          + ", ".join(f"{k} {v}" for k, v in sorted(syncs.items(), key=lambda kv: -kv[1])))
rows = data.get("test_gpu_precision")
if rows:
    for precision in ("fp16", "bf16"):
        diffs = {k.split("/")[0]: v["rel_diff"] for k, v in rows.items() if k.endswith(precision) and "rel_diff" in v}
        skipped = sum(v.get("skipped_updates", 0) for k, v in rows.items() if k.endswith(precision))
        if diffs:
            worst = max(diffs, key=diffs.get)
            scales = sorted({v["loss_scale"] for k, v in rows.items() if k.endswith(precision) and "loss_scale" in v})
            print(f"  {precision}: first-update loss vs fp32, max relative difference {diffs[worst]:.2e} ({worst}), "
                  f"{len(diffs)} settings, {skipped} update(s) skipped on overflow"
                  + (f", loss scales {scales}" if scales else ""))
EOF
  echo "  reports: $OUT"
} | tee "$OUT/summary.txt"
echo
if [ -s "$OUT/gpu_speed.txt" ]; then cat "$OUT/gpu_speed.txt"; else echo "(no speed table)"; fi
exit "$FAILED"
