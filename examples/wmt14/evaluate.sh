#!/usr/bin/env bash
# WMT'14: the IWSLT recipe's evaluate.sh (beam 5, tokenized BLEU and sacrebleu as one JSON
# line) with the WMT data directory as default.
#
#   examples/wmt14/evaluate.sh [--cpu] CHECKPOINT [DATA]
#
# Environment: PAIR (en-de | en-fr, default en-de) picks the default DATA
# (<repo>/data-bin/wmt14_en_de or _en_fr); DATA, SPLIT, BEAM, BATCH_SIZE, GEN_OUT, EXTRA,
# PYTHON as in examples/iwslt14_de_en/evaluate.sh.  Not lowercased, so both BLEU numbers are
# case-sensitive; the tokenized one is on ``tokenizer.perl -a`` text, whose @-@ hyphen
# splitting is the "compound splitting" of Vaswani et al.'s En-De numbers.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
PAIR="${PAIR:-en-de}"
DATA="${DATA:-$REPO/data-bin/wmt14_${PAIR/-/_}}" exec "$HERE/../iwslt14_de_en/evaluate.sh" "$@"
