#!/usr/bin/env bash
# One command: install, then run the test suite (pytest).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
bash scripts/install.sh
VENV="${FAIRSEQ_SEQLEVEL_VENV:-$PWD/.venv}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning -W ignore::UserWarning tests "$@"
