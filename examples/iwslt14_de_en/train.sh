#!/usr/bin/env bash
# IWSLT'14 De->En: MLE pre-training, then sequence-level fine-tuning with each criterion.
#
#   examples/iwslt14_de_en/train.sh [--cpu] [--dry-run] NAME [NAME ...]
#
# NAME (run in the order given; "all" = every one, in this order):
#   mle_transformer  fairseq's IWSLT'14 transformer recipe (transformer_iwslt_de_en)
#   mle_lstm         the papers' attentional LSTM (dai2018: bidirectional encoder 2x128,
#                    decoder 256 with input feeding, 256-d embeddings, dropout 0.3)
#   raml tok_seq token_smooth searnn_kl erac ac vaml interpolation ss seq_exploration scst risk
#                    fine-tuning from the MLE checkpoint of $BASE (see README.md for each
#                    criterion's hyperparameters and their sources)
#
# --dry-run prints the commands (one per line, shell-quoted) instead of running them.
# --cpu adds fairseq's --cpu.
#
# Environment (all optional):
#   DATA        data directory of prepare.py    (default <repo>/data-bin/iwslt14_de_en)
#   SAVE_ROOT   checkpoints go to SAVE_ROOT/NAME (default <repo>/checkpoints/iwslt14_de_en)
#   BASE        lstm | transformer: the MLE model the criterions fine-tune (default lstm)
#   MLE_CKPT    checkpoint they start from (default SAVE_ROOT/mle_$BASE/checkpoint_best.pt)
#   ARCH_FLAGS  replaces the model flags of every command (e.g. a tiny model for a smoke test)
#   MAX_UPDATE, MAX_EPOCH   added as --max-update / --max-epoch to every command (the
#               recipe's own epoch limits still apply; whichever comes first stops)
#   EXTRA       more fairseq-train flags, appended last (so they win); split on spaces
#   TOKEN_EMBEDDINGS  target-side embeddings for token_smooth / tok_seq (default: built
#               once with examples/build_token_embeddings.py into SAVE_ROOT/token_embeddings.en.txt)
#   PYTHON      interpreter with fairseq and the plugin (default python)
#   SEED        --seed (default 1)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
# shellcheck source=../recipe_args.sh
source "$REPO/examples/recipe_args.sh"  # die, parse_recipe_args
PYTHON="${PYTHON:-python}"
DATA="${DATA:-$REPO/data-bin/iwslt14_de_en}"
SAVE_ROOT="${SAVE_ROOT:-$REPO/checkpoints/iwslt14_de_en}"
BASE="${BASE:-lstm}"
MLE_CKPT="${MLE_CKPT:-$SAVE_ROOT/mle_$BASE/checkpoint_best.pt}"
TOKEN_EMBEDDINGS="${TOKEN_EMBEDDINGS:-$SAVE_ROOT/token_embeddings.en.txt}"
ALL=(mle_transformer mle_lstm raml tok_seq token_smooth searnn_kl erac ac vaml interpolation ss
     seq_exploration scst risk)

parse_recipe_args "$@"
case "$BASE" in lstm|transformer) ;; *) die "BASE=$BASE: use lstm or transformer" ;; esac

read -r -a EXTRA_FLAGS <<< "${EXTRA:-}"
STOP=()
[ -z "${MAX_UPDATE:-}" ] || STOP+=(--max-update "$MAX_UPDATE")
[ -z "${MAX_EPOCH:-}" ] || STOP+=(--max-epoch "$MAX_EPOCH")

# --reward-level word: sentence BLEU on words (subwords merged), the papers' pay-off
TASK=(--user-dir "$REPO/fairseq_seqlevel" --task seqlevel_translation -s de -t en
      --reward bleu --reward-level word --eval-reward)
COMMON=(--no-progress-bar --log-format simple --log-interval 100 --no-epoch-checkpoints
        --seed "${SEED:-1}")

ARCH_transformer=(--arch transformer_iwslt_de_en --share-decoder-input-output-embed --dropout 0.3)
# fairseq's lstm decoder always feeds the previous attentional output back in
# (input feeding, Luong et al. 2015), the variant of dai2018 Table 1's right half
ARCH_lstm=(--arch lstm --encoder-embed-dim 256 --encoder-hidden-size 128 --encoder-layers 1
           --encoder-bidirectional --decoder-embed-dim 256 --decoder-hidden-size 256
           --decoder-out-embed-dim 256 --decoder-layers 1 --decoder-attention True --dropout 0.3)
arch_flags() {  # the model flags of arch $1 (ARCH_FLAGS replaces them)
  if [ -n "${ARCH_FLAGS:-}" ]; then
    read -r -a ARCH <<< "$ARCH_FLAGS"
  else
    local -n src="ARCH_$1"
    ARCH=("${src[@]}")
  fi
}

# fine-tuning: Adam restarted at 1e-4 (dai2018's actor rate; critics start at 1e-3),
# the batches of the MLE run, the checkpoint with the best validation reward
FT_OPTIM_lstm=(--optimizer adam --lr 1e-4 --clip-norm 1.0 --batch-size 64)
FT_OPTIM_transformer=(--optimizer adam --adam-betas "(0.9, 0.98)" --lr 1e-4 --clip-norm 1.0
                      --weight-decay 0.0001 --max-tokens 4096)
FT_STOP=(--max-epoch 10)

show() { printf '%q ' "$@" | sed 's/ $//'; echo; }

train() {  # train SAVE_DIR FLAGS...: one fairseq-train run
  local save="$1"; shift
  local cmd=("$PYTHON" -m fairseq_cli.train "$DATA" "${TASK[@]}" "${COMMON[@]}" --save-dir "$save"
             "$@" "${DEVICE[@]}" "${STOP[@]}" "${EXTRA_FLAGS[@]}")
  if [ "$DRY" = 1 ]; then show "${cmd[@]}"; return; fi
  echo "+ $(show "${cmd[@]}")" >&2
  "${cmd[@]}"
}

need() {  # need CHECKPOINT HINT: fail early instead of inside fairseq
  [ "$DRY" = 1 ] || [ -f "$1" ] || die "$1 not found: $2"
}

finetune() {  # finetune NAME INIT_CHECKPOINT FLAGS...
  local name="$1" init="$2"; shift 2
  arch_flags "$BASE"
  local -n optim="FT_OPTIM_$BASE"
  train "$SAVE_ROOT/$name" "${ARCH[@]}" "${optim[@]}" "${FT_STOP[@]}" --finetune-from-model "$init" \
    --best-checkpoint-metric reward --maximize-best-checkpoint-metric "$@"
}

from_mle() {  # from_mle NAME FLAGS...
  need "$MLE_CKPT" "train the MLE model first (train.sh mle_$BASE) or set MLE_CKPT"
  finetune "$1" "$MLE_CKPT" "${@:2}"
}

two_phase() {  # two_phase NAME FIRST FIRST_FLAGS -- FLAGS: the critic phase into SAVE_ROOT/NAME_FIRST,
               # then NAME from its last checkpoint (which holds the critic)
  local name="$1" first_dir="$1_$2"; shift 2
  local first=()
  while [ "$1" != "--" ]; do first+=("$1"); shift; done
  shift
  from_mle "$first_dir" "${first[@]}"
  need "$SAVE_ROOT/$first_dir/checkpoint_last.pt" "the first phase of $name did not save a checkpoint"
  finetune "$name" "$SAVE_ROOT/$first_dir/checkpoint_last.pt" "$@"
}

EMB_SHOWN=0
embeddings() {  # token embeddings of the target side, built once
  if [ -f "$TOKEN_EMBEDDINGS" ] || [ "$EMB_SHOWN" = 1 ]; then return; fi
  local cmd=("$PYTHON" "$REPO/examples/build_token_embeddings.py" --data "$DATA" --lang en
             --out "$TOKEN_EMBEDDINGS")
  if [ "$DRY" = 1 ]; then show "${cmd[@]}"; EMB_SHOWN=1; return; fi
  mkdir -p "$(dirname "$TOKEN_EMBEDDINGS")"
  echo "+ $(show "${cmd[@]}")" >&2
  "${cmd[@]}"
}

# elbayad2018 sec. 3.3 "tok Glove sim" (PPMI-SVD embeddings instead of GloVe: offline)
TOKEN_SMOOTH=(--token-smooth-alpha 0.3 --token-smooth-temperature 0.1 --token-smooth-topk 20)
# elbayad2018 sec. 3.2 "Seq Hamming V_batch": tau ~ one substitution per sample with
# 64-sentence batches (README.md); --raml-reward bleu gives their "BLEU-4 V_batch" rows
RAML=(--criterion raml --raml-sampler hamming --raml-vocab batch --raml-samples 5 --raml-alpha 0.3
      --raml-temperature 0.1)
# dai2018 sec. 4.2 / Table 3 (beta 0.001, lambda_var 0.001) with the authors' code's
# tau 0.045, 2 critic samples, lambda_mle 0.1, +1-smoothed BLEU and rates
ERAC_CRITIC=(--criterion erac --erac-phase critic --erac-samples 2 --erac-target-rate 0.001
             --erac-var-weight 0.001 --erac-reward bleu_add1 --lr 1e-3)
ERAC_JOINT=(--criterion erac --erac-phase joint --erac-samples 1 --erac-target-rate 0.001
            --erac-var-weight 0.001 --erac-mle-weight 0.1 --erac-reward bleu_add1 --lr 1e-4)
# dai2018 sec. 4.1 with the authors' code's tau 0.4 (train_q.py), vaml_coeff 0.2 and 4 samples
VAML_Q=(--criterion vaml --vaml-phase q --vaml-tau 0.4 --vaml-samples 4 --vaml-sample-temperature 0.1
        --vaml-reward bleu_add1 --lr 1e-3)
VAML_ACTOR=(--criterion vaml --vaml-phase actor --vaml-tau 0.4 --vaml-alpha 0.2 --vaml-samples 4
            --vaml-sample-temperature 0.1 --vaml-reward bleu_add1 --lr 1e-4)

for name in "${NAMES[@]}"; do
  case "$name" in
    mle_transformer)
      arch_flags transformer
      train "$SAVE_ROOT/$name" "${ARCH[@]}" --optimizer adam --adam-betas "(0.9, 0.98)" --clip-norm 0.0 \
        --lr 5e-4 --lr-scheduler inverse_sqrt --warmup-updates 4000 --weight-decay 0.0001 \
        --criterion label_smoothed_cross_entropy --label-smoothing 0.1 --max-tokens 4096 --max-epoch 50 ;;
    mle_lstm)
      # Adam 1e-3, batches of 64 sentences (tan2019, leblond2018), halved on a plateau
      arch_flags lstm
      train "$SAVE_ROOT/$name" "${ARCH[@]}" --optimizer adam --lr 1e-3 --clip-norm 1.0 --batch-size 64 \
        --lr-scheduler reduce_lr_on_plateau --lr-shrink 0.5 \
        --criterion label_smoothed_cross_entropy --label-smoothing 0 --max-epoch 30 ;;
    raml) from_mle raml "${RAML[@]}" ;;
    tok_seq)
      embeddings
      from_mle tok_seq "${RAML[@]}" "${TOKEN_SMOOTH[@]}" --token-embeddings "$TOKEN_EMBEDDINGS" ;;
    token_smooth)
      embeddings
      from_mle token_smooth --criterion token_smooth "${TOKEN_SMOOTH[@]}" --token-embeddings "$TOKEN_EMBEDDINGS" ;;
    searnn_kl)
      # leblond2018 sec. 6 / App. C.2: reference roll-in, mixed roll-out, 15 top-k tokens plus
      # the ground truth within +-5 positions, KL with scale 200, BLEU-1 best-suffix reference
      # policy, smoothed BLEU costs
      from_mle searnn_kl --criterion searnn_kl --searnn-roll-in reference --searnn-roll-out mixed \
        --searnn-mix-prob 0.5 --searnn-loss kl --searnn-scale 200 --searnn-cells 0 --searnn-tokens 15 \
        --searnn-token-sampling topk --searnn-neighbours 5 --searnn-ref-policy best-suffix \
        --searnn-reward bleu_add1 ;;
    # tau 0.045 is the authors' with their L2-normalized entropy signal (docs/criterions/erac.md)
    erac) two_phase erac critic "${ERAC_CRITIC[@]}" --erac-tau 0.045 -- "${ERAC_JOINT[@]}" --erac-tau 0.045 \
            --erac-entropy-scale l2 ;;
    ac) two_phase ac critic "${ERAC_CRITIC[@]}" --erac-tau 0 -- "${ERAC_JOINT[@]}" --erac-tau 0 ;;
    vaml) two_phase vaml q "${VAML_Q[@]}" -- "${VAML_ACTOR[@]}" ;;
    interpolation)
      # tan2019 App. C.2: lambda (0.04, 0, 0.96), moved by 0.06 when the validation reward drops
      from_mle interpolation --criterion interpolation --interpolation-lambdas 0.04,0,0.96 \
        --interpolation-anneal validation --interpolation-temperature 1 ;;
    ss)
      # tan2019 App. C.2's scheduled-sampling baseline: inverse-sigmoid decay, k = 500
      from_mle ss --criterion interpolation --interpolation-anneal inverse_sigmoid --interpolation-ss-k 500 \
        --interpolation-temperature 1 ;;
    seq_exploration)
      # chen2019 eq. 15-16: 5 samples, alpha 0.75; lr 5e-5 as SCST (Rennie et al. 2017)
      from_mle seq_exploration --criterion seq_exploration --seq-exploration-samples 5 --seq-exploration-alpha 0.75 --lr 5e-5 ;;
    scst) from_mle scst --criterion seq_exploration --seq-exploration-samples 5 --seq-exploration-alpha 1 --lr 5e-5 ;;
    risk)
      # Edunov et al. 2018: 16 beam candidates, length-normalized scores, weighted with
      # label-smoothed NLL (0.3, eps 0.1)
      from_mle risk --criterion risk --risk-candidates 16 --risk-search beam --risk-score mean \
        --risk-mle-weight 0.3 --label-smoothing 0.1 ;;
  esac
done
