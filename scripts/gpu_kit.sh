#!/usr/bin/env bash
# Build gpu_kit/: exactly the files scripts/gpu_check.sh installs from on an
# air-gapped CUDA node (Python 3.12, x86_64, torch with CUDA preinstalled, no
# fairseq, no network).  Run it here, on a machine with the package registries;
# then a GPU check is "carry gpu_kit/ with the working tree, run
# scripts/gpu_check.sh".  gpu_kit/ is git-ignored.
#
# What the node lacks (its image has torch, numpy, cython, setuptools, wheel,
# regex, pyyaml, packaging, scikit-learn, sacrebleu, sentencepiece, tqdm,
# pytest, ninja and a C++ compiler), found by importing fairseq, the plugin,
# tests/test_gpu.py, tests/test_gpu_precision.py and benchmarks/gpu_speed.py
# with only those present:
#   fairseq_fixed-0.12.3.1.tar.gz   the source distribution: its extensions are
#                                   built on the node against the node's torch
#   hydra_core-1.3.2 + omegaconf-2.3.0 + antlr4_python3_runtime-4.9.3
#                                   (fairseq's config system; omegaconf pins
#                                   antlr4 4.9.*, which PyPI has only as an
#                                   sdist: built here into a py3-none-any wheel)
#   bitarray-3.12.3 cp312 manylinux x86_64   (a C extension; `import fairseq`
#                                   needs it)
#   rxlm-0.3.80                     TensorBLEU (rxlm.metrics.tensorbleu, torch
#                                   only), the reference of the reward rows
# Not carried: cffi (a fairseq requirement that nothing imported here uses),
# torchaudio (preinstalled on the node; unused), sacremoses / subword-nmt (the
# WMT/IWSLT recipes only), rapidfuzz (CPU reward baselines only).
#
#   GPU_KIT   where the kit goes (default: <repo>/gpu_kit)
#   PYTHON    the pip to download with (default: <repo>/.venv/bin/python, made
#             by scripts/install.sh: preparing the fairseq sdist's metadata
#             imports torch, numpy and cython, so it runs without build isolation)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KIT="${GPU_KIT:-$ROOT/gpu_kit}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
LIMIT_MIB=64  # what travels with a device call: working tree + carried folders

log() { printf '[gpu_kit] %s\n' "$*" >&2; }
[ -x "$PY" ] || command -v "$PY" >/dev/null 2>&1 \
  || { log "error: no python at $PY (run scripts/install.sh, or set PYTHON)"; exit 1; }
"$PY" -c "import torch, numpy, Cython, setuptools" 2>/dev/null \
  || { log "error: $PY lacks torch/numpy/cython/setuptools (needed to read the fairseq sdist's metadata)"; exit 1; }

TMP="$(mktemp -d "${TMPDIR:-/tmp}/gpu_kit.XXXXXX")"

mkdir -p "$TMP"
trap 'rm -rf "$TMP"' EXIT
# pip's local-index warnings of this machine's configuration: noise here
quiet() { "$@" 2> >(grep -vE "is ignored: it is neither a file nor a directory" >&2); }
PIP=("$PY" -m pip --disable-pip-version-check)

log "binary wheels for CPython 3.12 manylinux x86_64"
quiet "${PIP[@]}" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --abi cp312 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d "$TMP" \
  hydra-core==1.3.2 omegaconf==2.3.0 bitarray==3.12.3 rxlm==0.3.80
log "antlr4-python3-runtime 4.9.3 (sdist only on PyPI) -> a py3-none-any wheel"
quiet "${PIP[@]}" wheel -q --no-deps -w "$TMP" antlr4-python3-runtime==4.9.3
log "fairseq-fixed 0.12.3.1 source distribution"
quiet "${PIP[@]}" download -q --no-deps --no-binary fairseq-fixed --no-build-isolation -d "$TMP" \
  fairseq-fixed==0.12.3.1

# exactly these files, nothing else
want=(fairseq_fixed-0.12.3.1.tar.gz hydra_core-1.3.2-py3-none-any.whl omegaconf-2.3.0-py3-none-any.whl
      antlr4_python3_runtime-4.9.3-py3-none-any.whl "bitarray-3.12.3-cp312-cp312-*.whl" rxlm-0.3.80-py3-none-any.whl)
for pattern in "${want[@]}"; do
  # shellcheck disable=SC2206
  match=($TMP/$pattern)
  [ -f "${match[0]}" ] && [ "${#match[@]}" -eq 1 ] || { log "error: expected one $pattern, got: ${match[*]}"; exit 1; }
done
n_files=$(find "$TMP" -type f | wc -l)
[ "$n_files" -eq "${#want[@]}" ] || { log "error: unexpected files in the kit: $(ls "$TMP")"; exit 1; }
(cd "$TMP" && sha256sum -- * > MANIFEST)

kit_bytes=$(du -cb "$TMP"/* | tail -1 | cut -f1)
tree_bytes=$(cd "$ROOT" && { git ls-files -z; git ls-files -z --others --exclude-standard; } \
  | xargs -0 -r du -cb 2>/dev/null | awk '$2 == "total" {s += $1} END {print s + 0}')
total=$((kit_bytes + tree_bytes))
if [ "$total" -gt $((LIMIT_MIB * 1024 * 1024)) ]; then
  log "error: kit $((kit_bytes / 1024)) KiB + working tree $((tree_bytes / 1024)) KiB > $LIMIT_MIB MiB"
  exit 1
fi
rm -rf "$KIT"
mv "$TMP" "$KIT"
trap - EXIT
(cd "$KIT" && ls -l --time-style=+ -- * | awk '{printf "  %9d  %s\n", $5, $NF}')
awk -v k="$kit_bytes" -v t="$tree_bytes" -v l="$LIMIT_MIB" -v kit="$KIT" -v n="$((n_files + 1))" 'BEGIN {
  printf "[gpu_kit] %s: %.1f MiB in %d files (MANIFEST included); with the working tree (%.1f MiB) %.1f of %d MiB\n",
         kit, k / 1048576, n, t / 1048576, (k + t) / 1048576, l }' >&2
log "check: carry $(realpath --relative-to="$ROOT" "$KIT" 2>/dev/null || echo "$KIT") and run: bash scripts/gpu_check.sh"
