#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv with everything the demo, the
# tests and the benchmarks need.  Idempotent: a second run with nothing changed
# only checks a stamp.  Offline except for the package registries.
#
#   FAIRSEQ_SEQLEVEL_VENV   where the venv lives (default: <repo>/.venv)
#   FAIRSEQ_SEQLEVEL_TORCH  torch requirement (default: torch==2.13.0, the CPU
#                           build; on a GPU machine use an existing CUDA env or
#                           set e.g. "torch==2.5.1")
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FAIRSEQ_SEQLEVEL_VENV:-$ROOT/.venv}"
TORCH_REQ="${FAIRSEQ_SEQLEVEL_TORCH:-torch==2.13.0}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3

STAMP="$VENV/.fairseq_seqlevel_stamp"
WANT="$(cat "$ROOT/setup.py" "$ROOT/scripts/install.sh" | sha1sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] \
   && "$VENV/bin/python" -c "import fairseq, fairseq_seqlevel, sentencepiece, sacremoses, subword_nmt, tensorboard" 2>/dev/null; then
  exit 0
fi

log() { printf '[install] %s\n' "$*" >&2; }
[ -x "$VENV/bin/python" ] || { log "creating venv $VENV"; "$PY" -m venv "$VENV"; }
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)

# The registry mirrors here print a warning per missing local index; hide them.
# pip's resolver also complains that fairseq-fixed wants torchaudio, which we
# leave out on purpose (see below).
quiet() {
  "$@" 2> >(grep -vE "is ignored: it is neither a file nor a directory|dependency resolver does not currently|requires torchaudio" >&2)
}

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  log "installing $TORCH_REQ"
  quiet "${PIP[@]}" "$TORCH_REQ"
fi
quiet "${PIP[@]}" "numpy" "cython" "setuptools" "wheel"
if ! "$VENV/bin/python" -c "import fairseq" 2>/dev/null; then
  # fairseq 0.12.2 does not import on Python 3.11; fairseq-fixed is the same
  # module with that fixed.  --no-build-isolation: build against the torch
  # above (isolation would fetch another torch); --no-deps: its torchaudio
  # requirement would pull a torch of its own and nothing here uses audio.
  quiet "${PIP[@]}" "hydra-core==1.3.2" "omegaconf==2.3.0" regex tqdm bitarray \
    scikit-learn packaging cffi "sacrebleu>=2.0"
  log "building fairseq-fixed==0.12.3.1 (about 2.5 minutes the first time)"
  quiet "${PIP[@]}" --no-build-isolation --no-deps "fairseq-fixed==0.12.3.1"
fi
# tensorboard: fairseq-train --tensorboard-logdir (docs/monitoring.md)
quiet "${PIP[@]}" -e "$ROOT[test,bench,recipes,tensorboard]"
# TensorBLEU (benchmarks/reward_speed.py compares against it): --no-deps, its
# package's other requirements are a training framework we do not use
"$VENV/bin/python" -c "import rxlm.metrics.tensorbleu" 2>/dev/null \
  || quiet "${PIP[@]}" --no-deps "rxlm==0.3.80" || log "rxlm (TensorBLEU) not installed: reward_speed.py skips it"
# mbrs (benchmarks/mbr_speed.py compares MBR decoding against it) and its Rust chrF: --no-deps, the
# package's requirements include COMET, BERTScore and BLEURT stacks that would replace numpy
"$VENV/bin/python" -c "import mbrs, fastchrf" 2>/dev/null \
  || quiet "${PIP[@]}" --no-deps "mbrs==0.1.8" fastchrf || log "mbrs not installed: mbr_speed.py skips it"
"$VENV/bin/python" -c "import fairseq, fairseq_seqlevel, sentencepiece, sacrebleu" 2>/dev/null \
  || { log "error: the venv at $VENV cannot import fairseq_seqlevel"; exit 1; }
echo "$WANT" > "$STAMP"
log "ready: $VENV"
