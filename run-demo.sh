#!/usr/bin/env bash
# One command: install, prepare the Bible data, train MLE, fine-tune, evaluate.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
bash scripts/install.sh
VENV="${FAIRSEQ_SEQLEVEL_VENV:-$PWD/.venv}"
exec "$VENV/bin/python" examples/run_demo.py "$@"
