#!/usr/bin/env bash
# WMT'14 En->De / En->Fr: transformer MLE, then the cheaper sequence-level criterions.
#
#   examples/wmt14/train.sh [--cpu] [--dry-run] NAME [NAME ...]
#
# NAME (run in the order given; "all" = every one, in this order):
#   mle            transformer_wmt_en_de (Vaswani et al. 2017 base), label smoothing 0.1,
#                  inverse-sqrt warm-up, ~32k tokens per update (4096 x UPDATE_FREQ 8 on 1 GPU)
#   raml           elbayad2018 "Seq Hamming V_batch" fine-tuning from the MLE checkpoint
#   token_smooth   elbayad2018 "tok sim" (PPMI-SVD target embeddings instead of GloVe)
#   interpolation  tan2019's interpolation algorithm
#
# --dry-run prints the commands (one per line, shell-quoted) instead of running them.
# --cpu adds fairseq's --cpu.
#
# Environment (all optional):
#   PAIR        en-de | en-fr (default en-de)
#   DATA        data directory of prepare.py (default <repo>/data-bin/wmt14_en_de or _en_fr)
#   SAVE_ROOT   checkpoints go to SAVE_ROOT/NAME (default <repo>/checkpoints/wmt14_en_de or _en_fr)
#   MLE_CKPT    checkpoint the criterions start from (default SAVE_ROOT/mle/checkpoint_best.pt)
#   UPDATE_FREQ gradient accumulation (default 8: one GPU; 1 on eight)
#   ARCH_FLAGS  replaces the model flags of every command (e.g. a tiny model for a smoke test)
#   MAX_UPDATE, MAX_EPOCH   added as --max-update / --max-epoch to every command
#   EXTRA       more fairseq-train flags, appended last (so they win); split on spaces
#   TOKEN_EMBEDDINGS  target-side embeddings for token_smooth (default: built once into
#               SAVE_ROOT/token_embeddings.TGT.txt with examples/build_token_embeddings.py)
#   PYTHON      interpreter with fairseq and the plugin (default python)
#   SEED        --seed (default 1)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
# shellcheck source=../recipe_args.sh
source "$REPO/examples/recipe_args.sh"  # die, parse_recipe_args
PYTHON="${PYTHON:-python}"
PAIR="${PAIR:-en-de}"
case "$PAIR" in en-de|en-fr) ;; *) die "PAIR=$PAIR: use en-de or en-fr" ;; esac
SRC="${PAIR%-*}"
TGT="${PAIR#*-}"
DATA="${DATA:-$REPO/data-bin/wmt14_${SRC}_${TGT}}"
SAVE_ROOT="${SAVE_ROOT:-$REPO/checkpoints/wmt14_${SRC}_${TGT}}"
MLE_CKPT="${MLE_CKPT:-$SAVE_ROOT/mle/checkpoint_best.pt}"
TOKEN_EMBEDDINGS="${TOKEN_EMBEDDINGS:-$SAVE_ROOT/token_embeddings.$TGT.txt}"
ALL=(mle raml token_smooth interpolation)

parse_recipe_args "$@"

read -r -a EXTRA_FLAGS <<< "${EXTRA:-}"
STOP=()
[ -z "${MAX_UPDATE:-}" ] || STOP+=(--max-update "$MAX_UPDATE")
[ -z "${MAX_EPOCH:-}" ] || STOP+=(--max-epoch "$MAX_EPOCH")
if [ -n "${ARCH_FLAGS:-}" ]; then
  read -r -a ARCH <<< "$ARCH_FLAGS"
else
  # the joint BPE and --joined-dictionary of prepare.py allow sharing all embeddings
  ARCH=(--arch transformer_wmt_en_de --share-all-embeddings --dropout 0.1)
fi

TASK=(--user-dir "$REPO/fairseq_seqlevel" --task seqlevel_translation -s "$SRC" -t "$TGT"
      --reward bleu --reward-level word --eval-reward)
COMMON=(--no-progress-bar --log-format simple --log-interval 100 --no-epoch-checkpoints
        --seed "${SEED:-1}" --max-tokens 4096 --update-freq "${UPDATE_FREQ:-8}")
# fine-tuning: Adam restarted at 1e-4 for one epoch, the checkpoint with the best
# validation reward (greedy sentence BLEU)
FINETUNE=(--optimizer adam --adam-betas "(0.9, 0.98)" --lr 1e-4 --clip-norm 1.0 --max-epoch 1
          --best-checkpoint-metric reward --maximize-best-checkpoint-metric)

show() { printf '%q ' "$@" | sed 's/ $//'; echo; }

run() {
  if [ "$DRY" = 1 ]; then show "$@"; return; fi
  echo "+ $(show "$@")" >&2
  "$@"
}

train() {  # train NAME FLAGS...
  local name="$1"; shift
  run "$PYTHON" -m fairseq_cli.train "$DATA" "${TASK[@]}" "${COMMON[@]}" --save-dir "$SAVE_ROOT/$name" \
    "${ARCH[@]}" "$@" "${DEVICE[@]}" "${STOP[@]}" "${EXTRA_FLAGS[@]}"
}

from_mle() {  # from_mle NAME FLAGS...
  [ "$DRY" = 1 ] || [ -f "$MLE_CKPT" ] || die "$MLE_CKPT not found: train the MLE model first (train.sh mle) or set MLE_CKPT"
  train "$1" "${FINETUNE[@]}" --finetune-from-model "$MLE_CKPT" "${@:2}"
}

for name in "${NAMES[@]}"; do
  case "$name" in
    mle)
      train mle --optimizer adam --adam-betas "(0.9, 0.98)" --clip-norm 0.0 --lr 7e-4 \
        --lr-scheduler inverse_sqrt --warmup-updates 4000 --warmup-init-lr 1e-07 --weight-decay 0.0 \
        --criterion label_smoothed_cross_entropy --label-smoothing 0.1 --max-update 100000 ;;
    raml)
      # tau 0.09: about one substitution per sample with 4096-token batches (check the
      # logged raml_dist); L = 5, alpha 0.3 as the IWSLT recipe
      from_mle raml --criterion raml --raml-sampler hamming --raml-vocab batch --raml-samples 5 \
        --raml-alpha 0.3 --raml-temperature 0.09 ;;
    token_smooth)
      if [ ! -f "$TOKEN_EMBEDDINGS" ]; then
        [ "$DRY" = 1 ] || mkdir -p "$(dirname "$TOKEN_EMBEDDINGS")"
        run "$PYTHON" "$REPO/examples/build_token_embeddings.py" --data "$DATA" --lang "$TGT" \
          --out "$TOKEN_EMBEDDINGS"
      fi
      from_mle token_smooth --criterion token_smooth --token-smooth-alpha 0.3 \
        --token-smooth-temperature 0.1 --token-smooth-topk 20 --token-embeddings "$TOKEN_EMBEDDINGS" ;;
    interpolation)
      from_mle interpolation --criterion interpolation --interpolation-lambdas 0.04,0,0.96 \
        --interpolation-anneal validation --interpolation-temperature 1 ;;
  esac
done
