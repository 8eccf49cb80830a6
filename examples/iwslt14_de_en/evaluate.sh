#!/usr/bin/env bash
# Translate a split with fairseq-generate (beam 5, --remove-bpe) and print one JSON line
# with tokenized BLEU (the papers' number) and sacrebleu on detokenized output (score.py).
#
#   examples/iwslt14_de_en/evaluate.sh [--cpu] CHECKPOINT [DATA]
#
# Environment (all optional):
#   DATA        data directory (default <repo>/data-bin/iwslt14_de_en; the 2nd argument wins)
#   SPLIT       test | valid (default test)
#   BEAM        beam size (default 5)
#   BATCH_SIZE  sentences per batch (default 128)
#   GEN_OUT     keep fairseq-generate's output in this file (default: a temporary file)
#   EXTRA       more fairseq-generate flags (e.g. "--lenpen 1.2"), split on spaces
#   PYTHON      interpreter with fairseq and the plugin (default python)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
PYTHON="${PYTHON:-python}"
die() { echo "error: $*" >&2; exit 2; }

DEVICE=()
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) DEVICE=(--cpu) ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option $1 (known: --cpu, --help)" ;;
    *) ARGS+=("$1") ;;
  esac
  shift
done
[ ${#ARGS[@]} -ge 1 ] && [ ${#ARGS[@]} -le 2 ] || die "usage: evaluate.sh [--cpu] CHECKPOINT [DATA]"
CKPT="${ARGS[0]}"
DATA="${ARGS[1]:-${DATA:-$REPO/data-bin/iwslt14_de_en}}"
SPLIT="${SPLIT:-test}"
BEAM="${BEAM:-5}"
[ -f "$CKPT" ] || die "$CKPT: no such checkpoint"
[ -f "$DATA/manifest.json" ] || die "$DATA: not a data directory of the recipes' prepare.py (no manifest.json)"
read -r -a EXTRA_FLAGS <<< "${EXTRA:-}"

if [ -n "${GEN_OUT:-}" ]; then
  OUT="$GEN_OUT"
else
  OUT="$(mktemp)"
  trap 'rm -f "$OUT"' EXIT
fi
# the languages come from the data directory; fairseq infers them from the file names
"$PYTHON" -m fairseq_cli.generate "$DATA" --user-dir "$REPO/fairseq_seqlevel" --task seqlevel_translation \
  --path "$CKPT" --gen-subset "$SPLIT" --beam "$BEAM" --batch-size "${BATCH_SIZE:-128}" --remove-bpe \
  "${DEVICE[@]}" "${EXTRA_FLAGS[@]}" > "$OUT" 2> "$OUT.log" \
  || { tail -n 20 "$OUT.log" >&2; rm -f "$OUT.log"; die "fairseq-generate failed on $CKPT"; }
rm -f "$OUT.log"
"$PYTHON" "$HERE/score.py" --data "$DATA" --gen "$OUT" --split "$SPLIT" --checkpoint "$CKPT" --beam "$BEAM"
