"""``raml``: sequence-level loss smoothing (Norouzi et al. 2016; Elbayad et al.
2018 §3.2, §3.4): ℓ = α·E_{y∼r(·|y*)}[ℓ(y)] + (1 − α)·ℓ(y*) (eq. 15), with
r ∝ exp(reward/τ) estimated from L samples around the reference (drawn from
r, or importance-weighted); ``--token-smooth-alpha`` gives Tok-Seq (eq. 17).
Samplers, the lazy variant and logging: docs/criterions/raml.md.
"""

from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq.criterions import register_criterion
from fairseq.dataclass import ChoiceEnum

from fairseq_seqlevel.criterions.base import (SeqlevelCriterion, log_mean, reference_and_samples, references_of,
                                              worker_rng)
from fairseq_seqlevel.decoding.layout import batch_layout, plain_layout
from fairseq_seqlevel.decoding.model import forward_through
from fairseq_seqlevel.decoding.teacher_forcing import (
    encode,
    expand_encoder_out,
    prev_output_tokens_from_target,
    weighted_row_losses,
)
from fairseq_seqlevel.errors import check
from fairseq_seqlevel.perturbation import samplers as raml_sampling
from fairseq_seqlevel.perturbation import vocab as raml_vocab
from fairseq_seqlevel.smoothing.config import TokenSmoothConfig
from fairseq_seqlevel.smoothing.losses import (
    build_token_targets,
    check_token_smooth_config,
    lazy_sample_losses,
    smoothed_sequence_loss,
)

SAMPLERS = {
    "hamming": raml_sampling.hamming_sampler,
    "edit": raml_sampling.edit_sampler,
    "ngram": raml_sampling.ngram_sampler,
}
SAME_LENGTH_SAMPLERS = {"hamming", "ngram"}


@dataclass
class RamlConfig(TokenSmoothConfig):
    raml_sampler: ChoiceEnum(list(SAMPLERS)) = field(
        default="hamming", metadata={"help": "how sequences around the reference are drawn: hamming, edit: "
                                     "stratified sampling of the Hamming / edit distance d from exp(-d/τ); "
                                     "ngram: one random n-gram (n ≤ 4) replaced"}
    )
    raml_vocab: ChoiceEnum(["full", "batch", "refs"]) = field(
        default="batch",
        metadata={"help": "substitution vocabulary: whole dictionary but special symbols (V), target tokens of "
                  "the mini-batch (V_batch) or of this example's references (V_refs)"},
    )
    raml_reward: Optional[str] = field(
        default=None,
        metadata={"help": "importance-sample r ∝ exp(reward/τ) with the sampler as proposal "
                  "(e.g. bleu; eq. 11-12; logs raml_ess); unset: hamming and edit sample r directly "
                  "(reward = -distance), "
                  "ngram (a proposal only) is weighted with the task's --reward (bleu in a stock task)"},
    )
    raml_samples: int = field(default=5, metadata={"help": "L: samples per example"})
    raml_temperature: float = field(
        default=0.1,
        metadata={"help": "τ of r ∝ exp(-d/τ) (the sampler's prior; p(d) ∝ C(T,d)(|V_sub|-1)^d "
                  "e^{-d/τ}, so τ must be below 1/ln(|V_sub|-1) for samples to stay near y*; "
                  "the mean distance is logged as raml_dist)"},
    )
    raml_reward_temperature: Optional[float] = field(
        default=None, metadata={"help": "τ of exp(reward/τ) for --raml-reward (default: --raml-temperature)"}
    )
    raml_weighting: ChoiceEnum(["importance", "reward"]) = field(
        default="importance",
        metadata={"help": "weights of the samples when a reward scores them: importance = exp(reward/τ_r) / q "
                  "(eq. 11, the paper); reward = softmax(reward/τ_r) over each example's samples, no 1/q "
                  "(Ma et al. 2017, texar's RAML): with ngram's exact q, 1/q ∝ |V_sub|^n hands nearly all "
                  "weight to 4-gram replacements"},
    )
    raml_alpha: float = field(default=0.3, metadata={"help": "α of eq. 15 (0 = MLE)"})
    raml_lazy: bool = field(
        default=False,
        metadata={"help": "score samples with the reference's hidden states (eq. 19): one forward "
                  "pass in all; same-length samplers (hamming, ngram) only"},
    )
    # Tok-Seq is off unless asked for (overrides token_smooth's default).
    token_smooth_alpha: float = field(
        default=0.0, metadata={"help": "Tok-Seq: α2 of eq. 17, token smoothing of the reference and of "
                               "every sample inside raml (0 = off)"}
    )


def check_raml_config(cfg):
    check(cfg.raml_samples >= 1, f"--raml-samples must be >= 1, got {cfg.raml_samples}")
    check(cfg.raml_temperature > 0, f"--raml-temperature must be > 0, got {cfg.raml_temperature}")
    check(cfg.raml_reward_temperature is None or cfg.raml_reward_temperature > 0,
          f"--raml-reward-temperature must be > 0, got {cfg.raml_reward_temperature}")
    check(0.0 <= cfg.raml_alpha <= 1.0, f"--raml-alpha must be in [0, 1], got {cfg.raml_alpha}")
    check(not cfg.raml_lazy or cfg.raml_sampler in SAME_LENGTH_SAMPLERS,
          f"--raml-lazy needs a same-length sampler (--raml-sampler "
          f"{' or '.join(sorted(SAME_LENGTH_SAMPLERS))}), got --raml-sampler {cfg.raml_sampler}")
    check_token_smooth_config(cfg)


def raml_loss(ref_loss, sample_loss, weights, alpha):
    """Eq. 15 per example: (1-α)·ℓ(y*) + α·Σ_l ω_l ℓ(y_l).

    ref_loss: [B]; sample_loss, weights: [B·L] (samples of example b at rows
    b·L..b·L+L-1, weights summing to 1 per example).  Returns [B].
    """
    batch_size = ref_loss.size(0)
    expected = (weights * sample_loss).view(batch_size, -1).sum(dim=1)
    return (1.0 - alpha) * ref_loss + alpha * expected


def raml_row_coefficients(weights, alpha, num_samples):
    """Eq. 15 as weights of the rows [y*_b, y_b1..y_bL]: (1-α) for the reference,
    α·ω_l for its samples.  weights: [B·L] → [B·(L+1)]."""
    grouped = alpha * weights.view(-1, num_samples)
    ref = grouped.new_full((grouped.size(0), 1), 1.0 - alpha)
    return torch.cat([ref, grouped], dim=1).view(-1)


#: samplers that are only a proposal: their samples are always importance-weighted
PROPOSAL_ONLY_SAMPLERS = {"ngram"}


@register_criterion("raml", dataclass=RamlConfig)
class RamlCriterion(SeqlevelCriterion):
    def __init__(self, task, cfg: RamlConfig):
        check_raml_config(cfg)
        super().__init__(task, cfg)
        self.sampler = SAMPLERS[cfg.raml_sampler]
        self.reward = None
        if cfg.raml_reward is not None or cfg.raml_sampler in PROPOSAL_ONLY_SAMPLERS:
            self.reward = self.resolve_reward(cfg.raml_reward, "--raml-reward", default="bleu")
        self.reward_temperature = cfg.raml_reward_temperature or cfg.raml_temperature
        self.token_targets = build_token_targets(cfg, task.target_dictionary)

    def substitution_vocab(self, target, refs):
        if self.cfg.raml_vocab == "batch":
            return raml_vocab.batch_vocab(target, self.special_ids)
        if self.cfg.raml_vocab == "refs":
            return raml_vocab.refs_vocab(refs, self.special_ids)
        return raml_vocab.full_vocab(self.num_tokens, self.special_ids, target.size(0), target.device)

    def draw_samples(self, sample, layout=None):
        """RAML samples of the batch and their weights [B·L].  The task's forced
        prefix (language tokens) is kept as it is; the rest of the reference, up
        to the task's end symbol, is perturbed."""
        target, refs = sample["target"], references_of(sample)
        if layout is None:  # the task's, once forward has probed it
            dictionary = self.task.target_dictionary
            layout = (plain_layout(target.size(0), dictionary, target.device) if self._task_output is None
                      else batch_layout(self._task_output, sample, dictionary))
        num_samples, prefix_len = self.cfg.raml_samples, layout.prefix_len
        vocab = self.substitution_vocab(target, refs)
        drawn = self.sampler(target[:, prefix_len:], self.padding_idx, layout.eos, num_samples,
                             self.cfg.raml_temperature, vocab)
        if prefix_len:
            drawn = drawn._replace(tokens=torch.cat([layout.prefix.repeat_interleave(num_samples, dim=0),
                                                     drawn.tokens], dim=1))
        if self.reward is None:
            weights = torch.full_like(drawn.log_q, 1.0 / num_samples)
            ess = None
        else:
            with torch.no_grad():
                scores = self.reward(drawn.tokens, refs.repeat_interleave(num_samples, dim=0))
            log_q = drawn.log_q if self.cfg.raml_weighting == "importance" else torch.zeros_like(drawn.log_q)
            weights = raml_sampling.importance_weights(scores / self.reward_temperature, log_q, num_samples)
            ess = raml_sampling.effective_sample_size(weights, num_samples)
        return drawn, weights, ess

    def sequence_losses(self, lprobs, target):
        """Per-row loss [N] (eq. 16 or NLL) and NLL [N]."""
        loss, nll = smoothed_sequence_loss(lprobs, target, self.padding_idx, self.token_targets,
                                           self.cfg.token_smooth_alpha, self.cfg.token_smooth_temperature)
        return loss.sum(dim=-1), nll.sum(dim=-1)

    def _score_rows(self, model, net_input, rows, coef, bos):
        """Σ coef·loss of the rows, each source's encoder output shared by its
        L+1 rows; run as the model's forward (:func:`forward_through`)."""
        per_source = self.cfg.raml_samples + 1
        encoder_out = expand_encoder_out(model, encode(model, net_input), per_source, net_input["src_tokens"].size(0))
        prev = prev_output_tokens_from_target(rows, self.padding_idx, bos.repeat_interleave(per_source))
        return weighted_row_losses(model, encoder_out, prev, rows, coef, self.sequence_losses, fused=self.fused)

    def training_loss(self, model, sample):
        target = sample["target"]
        batch_size, alpha, num_samples = target.size(0), self.cfg.raml_alpha, self.cfg.raml_samples
        extra = {}
        if alpha == 0:  # plain MLE (or token smoothing): no samples at all
            net_output = model(**sample["net_input"])
            lprobs = model.get_normalized_probs(net_output, log_probs=True)
            per_example, ref_nll = self.sequence_losses(lprobs, target)
            loss = per_example.sum()
        else:
            layout = self.output_layout(model, sample)
            with worker_rng():
                drawn, weights, ess = self.draw_samples(sample)
            if self.cfg.raml_lazy:
                net_output = model(**sample["net_input"])
                lprobs = model.get_normalized_probs(net_output, log_probs=True)
                ref_loss, ref_nll = self.sequence_losses(lprobs, target)
                # eq. 19: the reference's distributions read at the sampled tokens
                # (gathered along the vocabulary: nothing of size B·L·T·V, forward or backward)
                sample_loss, _ = lazy_sample_losses(
                    lprobs, drawn.tokens.view(batch_size, num_samples, -1), self.padding_idx,
                    self.token_targets, self.cfg.token_smooth_alpha, self.cfg.token_smooth_temperature)
                loss = raml_loss(ref_loss, sample_loss.sum(dim=-1).reshape(-1), weights, alpha).sum()
            else:
                # one decoder batch of B·(L+1) rows [y*_b, y_b1..y_bL]; the loss is the
                # constant-weighted sum of row losses of eq. 15, which lets the output
                # layer run chunked (weighted_row_losses) at large vocabularies
                rows = reference_and_samples(target, drawn.tokens, num_samples, self.padding_idx)
                coef = raml_row_coefficients(weights, alpha, num_samples)
                total, _, nll_rows = forward_through(model, self._score_rows, sample["net_input"], rows, coef,
                                                     layout.bos)
                loss, ref_nll = total, nll_rows.view(batch_size, -1)[:, 0]
            extra["raml_dist_sum"] = drawn.distance.sum().float().data
            extra["raml_nsamples"] = drawn.distance.numel()
            if ess is not None:
                extra["raml_ess_sum"] = ess.sum().data
        sample_size = self.sample_size_of(sample)
        return loss, sample_size, self.stock_logging_output(loss, ref_nll.sum(), sample, sample_size, **extra)

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        log_mean(logging_outputs, "raml_dist", "raml_dist_sum", "raml_nsamples")
        log_mean(logging_outputs, "raml_ess", "raml_ess_sum", "nsentences")
