"""``risk``: minimum risk training (Shen et al. 2016; Edunov et al. 2018).

Per source, a candidate set U(x) (samples, or the task's beam n-best) is
re-scored with gradients; the loss is the expected cost under
Q ∝ exp(α·s(u|x)) over U(x), optionally mixed with the reference's
label-smoothed NLL.  Equations, normalization and flags:
docs/criterions/risk.md.
"""

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Optional

import torch
from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from omegaconf import II

from fairseq_seqlevel.criterions.base import (SeqlevelCriterion, log_mean, reference_and_samples, references_of,
                                              scored_part, worker_rng)
from fairseq_seqlevel.decoding.model import forward_through
from fairseq_seqlevel.decoding.teacher_forcing import rows_objective, token_nll
from fairseq_seqlevel.errors import check

SEARCHES = ["sample", "beam"]
SCORES = ["mean", "sum"]


@dataclass
class RiskConfig(FairseqDataclass):
    risk_candidates: int = field(default=8, metadata={"help": "n: candidates per source in U(x); "
                                                              "duplicates count once"})
    risk_search: ChoiceEnum(SEARCHES) = field(
        default="sample", metadata={"help": "sample: n multinomial samples (the shared sampler); "
                                    "beam: the n-best of fairseq's beam search (beam n)"})
    risk_include_reference: bool = field(default=False, metadata={"help": "add the reference y* to U(x)"})
    risk_sharpness: float = field(default=1.0, metadata={"help": "α of Q(u|x) ∝ exp(α·s(u|x)) over U(x)"})
    risk_score: ChoiceEnum(SCORES) = field(
        default="mean", metadata={"help": "s(u|x): mean = log-probability / length (Edunov et al. 2018, as fairseq's "
                                  "classic_seqlevel risk: Q spreads over U(x)); sum = the summed log-probability "
                                  "(Shen et al. 2016, with their sharpness 5e-3; at sharpness 1 Q is nearly "
                                  "one-hot). The default was sum before issue 44"})
    risk_mle_weight: float = field(
        default=0.0, metadata={"help": "w: (1-w)·risk + w·label-smoothed NLL of the reference (1 = stock "
                               "label_smoothed_cross_entropy)"})
    label_smoothing: float = field(default=0.0, metadata={"help": "ε of the NLL term (as label_smoothed_cross_entropy)"})
    risk_reward: Optional[str] = field(
        default=None, metadata={"help": "cost = the reward's cost (1 - BLEU, normalized edit/Hamming; every "
                                "reference); "
                                "default: the task's --reward, bleu in a stock task"})
    risk_max_len_src_a: float = field(
        default=1.2, metadata={"help": "candidates: at most a·|x| + b tokens, x the source "
                                 "(as fairseq-generate's --max-len-a/b)"})
    risk_max_len_src_b: int = field(
        default=10, metadata={"help": "candidates: at most a·|x| + b tokens, x the source "
                                 "(as fairseq-generate's --max-len-a/b)"})
    sentence_avg: bool = II("optimization.sentence_avg")


def check_risk_config(cfg):
    check(cfg.risk_candidates >= 1, f"--risk-candidates must be >= 1, got {cfg.risk_candidates}")
    check(str(cfg.risk_score) in SCORES, f"--risk-score must be one of {', '.join(SCORES)}, got {cfg.risk_score}")
    check(str(cfg.risk_search) in SEARCHES, f"--risk-search must be one of {', '.join(SEARCHES)}, got {cfg.risk_search}")
    check(math.isfinite(cfg.risk_sharpness) and cfg.risk_sharpness > 0,
          f"--risk-sharpness must be > 0, got {cfg.risk_sharpness}")
    check(0.0 <= cfg.risk_mle_weight <= 1.0, f"--risk-mle-weight must be in [0, 1], got {cfg.risk_mle_weight}")
    check(0.0 <= cfg.label_smoothing < 1.0, f"--label-smoothing must be in [0, 1), got {cfg.label_smoothing}")
    check(cfg.risk_max_len_src_a >= 0 and cfg.risk_max_len_src_b >= 1,
          f"--risk-max-len-src-a must be >= 0 and --risk-max-len-src-b >= 1, "
          f"got {cfg.risk_max_len_src_a}, {cfg.risk_max_len_src_b}")


# ------------------------------------------------------------------ pure math


def distinct_candidates(candidates, valid):
    """``valid`` [B, m] minus every candidate equal to an earlier valid one of its
    source (``candidates`` [B, m, T]): each distinct sequence counted once."""
    same = (candidates.unsqueeze(2) == candidates.unsqueeze(1)).all(dim=-1)  # [B, m, m]
    earlier = torch.ones_like(same[0]).tril(diagonal=-1)  # j < i
    duplicate = (same & earlier & valid.unsqueeze(1)).any(dim=2)
    return valid & ~duplicate


def nll_and_label_smoothed(lprobs, target, pad, epsilon):
    """``loss_fn`` with two components per row, ``([n, 2], [n])``: the sequence NLL and
    fairseq's label-smoothed NLL (``label_smoothed_nll_loss``, ε), both summed over
    non-pad tokens; then the NLL again. One scoring pass serves the risk (first
    component, every row) and the reference's NLL term (second, row y* only)."""
    nll = token_nll(lprobs, target, pad).sum(dim=-1)
    if epsilon == 0:
        return torch.stack([nll, nll], dim=-1), nll
    smooth = (-lprobs.sum(dim=-1)).masked_fill(target.eq(pad), 0.0).sum(dim=-1)
    eps_i = epsilon / (lprobs.size(-1) - 1)
    return torch.stack([nll, (1.0 - epsilon - eps_i) * nll + eps_i * smooth], dim=-1), nll


def expected_risk(scores, costs, valid, sharpness):
    """Σ_u Q(u)·cost(u) per source [B], Q = softmax(α·s) over the valid candidates
    (scores, costs, valid: [B, m]); also returns Q."""
    logits = (sharpness * scores.float()).masked_fill(~valid, -math.inf)
    q = torch.softmax(logits, dim=1).masked_fill(~valid, 0.0)
    return (q * costs.float().masked_fill(~valid, 0.0)).sum(dim=1), q


def q_spread(q, valid):
    """(max Q [B], H(Q)/log n [B]) per source, n = its valid candidates; sources with one
    candidate have no spread to measure and get NaN entropy. Max Q near 1 and a normalized
    entropy near 0 mean that Q is one-hot: the risk compares the top candidate, not an
    expectation over U(x) (issue 44)."""
    q = q.float()
    count = valid.sum(dim=1)
    entropy = -(q * q.clamp(min=1e-30).log()).masked_fill(~valid, 0.0).sum(dim=1)
    normalized = entropy / count.clamp(min=2).float().log()
    return q.max(dim=1).values, normalized.masked_fill(count < 2, math.nan)


# ------------------------------------------------------------------ criterion


@register_criterion("risk", dataclass=RiskConfig)
class RiskCriterion(SeqlevelCriterion):
    deprecated_flags = {  # the names before issue 41 (44: the score flag)
        "--risk-max-len-a": "--risk-max-len-src-a",
        "--risk-max-len-b": "--risk-max-len-src-b",
        "--risk-length-normalize": ("--risk-score", "mean"),
    }

    def __init__(self, task, cfg: RiskConfig):
        check_risk_config(cfg)
        super().__init__(task, cfg)
        self.reward = self.resolve_reward(cfg.risk_reward, "--risk-reward", default="bleu")

    def candidates(self, model, sample, layout=None):
        """U(x) before deduplication (the kit's draw_candidates, no grad)."""
        cfg = self.cfg
        return self.draw_candidates(model, sample, cfg.risk_candidates, cfg.risk_search, cfg.risk_max_len_src_a,
                                    cfg.risk_max_len_src_b, layout)

    def training_loss(self, model, sample):
        cfg, pad, target = self.cfg, self.padding_idx, sample["target"]
        batch_size, n, sample_size = target.size(0), cfg.risk_candidates, self.sample_size_of(sample)
        if cfg.risk_mle_weight == 1.0:  # stock label smoothing, no candidates
            lprobs = model.get_normalized_probs(model(**sample["net_input"]), log_probs=True)
            loss, nll = label_smoothed_nll_loss(lprobs, target, cfg.label_smoothing, ignore_index=pad)
            return loss, sample_size, self.stock_logging_output(loss, nll, sample, sample_size)
        layout = self.output_layout(model, sample)
        with worker_rng():
            found = self.candidates(model, sample)
        # rows per source: [y*, u_1..u_n]; y* is always scored (NLL term), a candidate only if asked
        rows = reference_and_samples(target, found, n, pad)
        width = rows.size(1)
        valid = torch.ones(batch_size, n + 1, dtype=torch.bool, device=rows.device)
        valid[:, 0] = cfg.risk_include_reference
        valid = distinct_candidates(rows.view(batch_size, n + 1, width), valid)
        with torch.no_grad():
            costs = self.reward.cost(rows, references_of(sample).repeat_interleave(n + 1, dim=0))
            costs = costs.float().view(batch_size, n + 1)
        scored = scored_part(rows, n, layout.prefix_len, pad)
        lengths = scored.ne(pad).sum(dim=1).clamp(min=1).view(batch_size, n + 1)
        weight = self.length_weights(target)

        def scores_of(log_likelihood):  # s(u|x) [B, n+1]
            scores = log_likelihood.view(batch_size, n + 1)
            return scores / lengths if str(cfg.risk_score) == "mean" else scores

        w = cfg.risk_mle_weight

        def objective(row_loss):  # mle_mix, split: (1 − w)·Σ_b weight_b·risk_b + w·label-smoothed NLL(y*)
            parts = row_loss.view(batch_size, n + 1, 2)
            risk = expected_risk(scores_of(-parts[..., 0]), costs, valid, cfg.risk_sharpness)[0]
            total = (1.0 - w) * (weight * risk).sum()
            return total + w * parts[:, 0, 1].sum() if w > 0 else total

        # duplicates (and y* when it is no candidate) have Q = 0: not re-scored, except y* for the NLL term
        keep = valid.clone()
        keep[:, 0] = True
        loss, _, row_nll = forward_through(model, self._score, sample["net_input"], rows, n + 1, objective,
                                           layout.bos, scored, keep.view(-1))
        risk, q = expected_risk(scores_of(-row_nll), costs, valid, cfg.risk_sharpness)
        q_max, q_entropy = q_spread(q.detach(), valid)
        spread = ~q_entropy.isnan()
        nll = row_nll.view(batch_size, n + 1)[:, 0].sum()
        extra = {
            "risk_sum": risk.sum().detach(), "risk_cost_sum": costs.masked_fill(~valid, 0.0).sum().detach(),
            "risk_candidates": int(valid.sum()), "risk_sources": batch_size,
            "risk_q_max_sum": q_max.sum(), "risk_q_entropy_sum": q_entropy[spread].sum(),
            "risk_spread_sources": int(spread.sum()),
        }
        return loss, sample_size, self.stock_logging_output(loss, nll, sample, sample_size, **extra)

    def _score(self, model, net_input, rows, per_source, objective, bos, scored, keep=None):
        """rows_objective with :func:`nll_and_label_smoothed` (the risk and the
        reference's NLL term from one pass of the chunked output layer); run as the
        model's forward (forward_through)."""
        pad = self.padding_idx
        epsilon = self.cfg.label_smoothing if self.cfg.risk_mle_weight > 0 else 0.0  # else the part is unused
        loss, row_loss, row_nll, _ = rows_objective(
            model, net_input, rows, per_source, pad, bos, partial(nll_and_label_smoothed, pad=pad, epsilon=epsilon),
            objective,
            fused=self.fused, loss_target=scored, keep=keep)
        return loss, row_loss, row_nll

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        log_mean(logging_outputs, "risk", "risk_sum", "risk_sources")  # expected cost under Q
        log_mean(logging_outputs, "risk_cost", "risk_cost_sum", "risk_candidates")  # mean candidate cost
        log_mean(logging_outputs, "risk_distinct", "risk_candidates", "risk_sources", round=2)
        # is Q an expectation over U(x) or one-hot? mean max Q, mean H(Q)/log n (sources with ≥ 2 candidates)
        log_mean(logging_outputs, "risk_q_max", "risk_q_max_sum", "risk_sources")
        log_mean(logging_outputs, "risk_q_entropy", "risk_q_entropy_sum", "risk_spread_sources")
