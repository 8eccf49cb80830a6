"""``token_smooth``: token-level loss smoothing (Elbayad et al. 2018, §3.3).

Each gold token y*_t gets the target r(y|y*_t) ∝ exp(s(y, y*_t)/τ) (eq. 13),
with s the cosine similarity of token embeddings, optionally minus
β·min(f(y)/f(y*), f(y*)/f(y)) to promote rare tokens (eq. 14).  The loss is
α·CE(r, p_θ) + (1-α)·NLL(y*) per token (eq. 16; CE and KL differ by the
entropy of r, which has no gradient — we log the CE, like fairseq's label
smoothing does).  Only the top-k neighbours of each token are kept
(``--token-smooth-topk``); every other token has probability exactly 0 under r.

The same per-token loss is what ``raml`` applies to the reference and its
samples for Tok-Seq (eq. 17), through :func:`smoothed_sequence_loss`.
"""

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq import utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass
from fairseq.logging import metrics
from omegaconf import II

from fairseq_seqlevel.errors import check
from fairseq_seqlevel.sampling.token_similarity import SparseTokenTargets, smoothed_token_loss_many


@dataclass
class TokenSmoothConfig(FairseqDataclass):
    token_smooth_alpha: float = field(
        default=0.3, metadata={"help": "α of eq. 16: weight of the smoothed target (0 = MLE)"}
    )
    token_smooth_temperature: float = field(
        default=0.1, metadata={"help": "τ of eq. 13 (similarities are cosines in [-1, 1])"}
    )
    token_smooth_beta: float = field(
        default=0.0, metadata={"help": "β of eq. 14: rare-token promotion (0 = off)"}
    )
    token_smooth_topk: int = field(
        default=20, metadata={"help": "neighbours kept per token (the rest has probability 0)"}
    )
    token_embeddings: Optional[str] = field(
        default=None,
        metadata={"help": "word2vec/GloVe text file of target-token embeddings "
                  "(examples/build_token_embeddings.py builds one from the training data)"},
    )
    sentence_avg: bool = II("optimization.sentence_avg")


def check_token_smooth_config(cfg, alpha_flag="--token-smooth-alpha"):
    check(0.0 <= cfg.token_smooth_alpha <= 1.0,
          f"{alpha_flag} must be in [0, 1], got {cfg.token_smooth_alpha}")
    check(cfg.token_smooth_temperature > 0,
          f"--token-smooth-temperature must be > 0, got {cfg.token_smooth_temperature}")
    check(cfg.token_smooth_beta >= 0, f"--token-smooth-beta must be >= 0, got {cfg.token_smooth_beta}")
    check(cfg.token_smooth_topk >= 1, f"--token-smooth-topk must be >= 1, got {cfg.token_smooth_topk}")


def build_token_targets(cfg, dictionary):
    """The sparse smoothing table for ``dictionary`` (None when α = 0)."""
    if cfg.token_smooth_alpha == 0:
        return None
    check(cfg.token_embeddings is not None,
          "--token-embeddings FILE is required when --token-smooth-alpha > 0 "
          "(build one with examples/build_token_embeddings.py)")
    from fairseq_seqlevel.embeddings import load_text_embeddings

    embeddings, report = load_text_embeddings(cfg.token_embeddings, dictionary)
    import logging

    logging.getLogger(__name__).info(f"token embeddings: {report}")
    freqs = torch.tensor(dictionary.count, dtype=torch.float)
    special = torch.zeros(len(dictionary), dtype=torch.bool)
    special[[dictionary.bos(), dictionary.pad(), dictionary.eos(), dictionary.unk()]] = True
    return SparseTokenTargets.from_embeddings(
        embeddings, k=min(cfg.token_smooth_topk, len(dictionary)), freqs=freqs,
        beta=cfg.token_smooth_beta, candidate_mask=~special,
    )


def smoothed_sequence_loss(lprobs, target, pad, token_targets=None, alpha=0.0, temperature=1.0):
    """Per-token loss N x T of eq. 16 and the plain NLL N x T (pad -> 0).

    With ``token_targets`` None or α = 0 both are the NLL.
    """
    loss, nll = _token_losses(lprobs, target.unsqueeze(-1), pad, token_targets, alpha, temperature)
    return loss.squeeze(-1), nll.squeeze(-1)


def lazy_sample_losses(lprobs, samples, pad, token_targets=None, alpha=0.0, temperature=1.0):
    """Per-token loss and NLL [B, L, T] of L sequences per row scored with the
    row's own distributions (eq. 19): ``lprobs`` [B, T, V], ``samples`` [B, L, T].

    The same values as :func:`smoothed_sequence_loss` on ``lprobs`` expanded
    to [B, L, T, V], but the samples are gathered along the vocabulary axis,
    so the backward pass scatters into [B, T, V] instead of [B, L, T, V].
    """
    loss, nll = _token_losses(lprobs, samples.transpose(1, 2), pad, token_targets, alpha, temperature)
    return loss.transpose(1, 2), nll.transpose(1, 2)


def _token_losses(lprobs, targets_many, pad, token_targets, alpha, temperature):
    """Eq. 16 loss and NLL of M targets per distribution: lprobs [*, V], targets [*, M]."""
    nll = -lprobs.gather(-1, targets_many).masked_fill(targets_many.eq(pad), 0.0)
    if token_targets is None or alpha == 0:
        return nll, nll
    ce = smoothed_token_loss_many(lprobs, targets_many, token_targets, temperature, ignore_index=pad)
    return alpha * ce + (1.0 - alpha) * nll, nll


def log_stock_metrics(logging_outputs):
    """loss / nll_loss / ppl exactly as fairseq's label_smoothed_cross_entropy."""
    loss_sum = sum(log.get("loss", 0) for log in logging_outputs)
    nll_loss_sum = sum(log.get("nll_loss", 0) for log in logging_outputs)
    ntokens = sum(log.get("ntokens", 0) for log in logging_outputs)
    sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
    metrics.log_scalar("loss", loss_sum / sample_size / math.log(2), sample_size, round=3)
    metrics.log_scalar("nll_loss", nll_loss_sum / ntokens / math.log(2), ntokens, round=3)
    metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["nll_loss"].avg))


@register_criterion("token_smooth", dataclass=TokenSmoothConfig)
class TokenSmoothCriterion(FairseqCriterion):
    def __init__(self, task, cfg: TokenSmoothConfig):
        super().__init__(task)
        check_token_smooth_config(cfg)
        self.alpha = cfg.token_smooth_alpha
        self.temperature = cfg.token_smooth_temperature
        self.sentence_avg = cfg.sentence_avg
        self.token_targets = build_token_targets(cfg, task.target_dictionary)

    def forward(self, model, sample, reduce=True):
        net_output = model(**sample["net_input"])
        lprobs = model.get_normalized_probs(net_output, log_probs=True)
        target = model.get_targets(sample, net_output)
        loss, nll = smoothed_sequence_loss(lprobs, target, self.padding_idx, self.token_targets,
                                           self.alpha, self.temperature)
        loss, nll = loss.sum(), nll.sum()
        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        logging_output = {
            "loss": loss.data, "nll_loss": nll.data, "ntokens": sample["ntokens"],
            "nsentences": sample["target"].size(0), "sample_size": sample_size,
        }
        return loss, sample_size, logging_output

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        log_stock_metrics(logging_outputs)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
