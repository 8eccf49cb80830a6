"""``preference``: preference optimization on the model's own candidates.

Per source, n candidates (the shared sampler, or the task's beam n-best) are
ranked by the reward against the reference(s), or reference-free by their MBR
expected utility among each other; the best/worst pair (or every pair apart by
more than a margin) is trained with DPO (Rafailov et al. 2023), IPO (Azar et
al. 2023) or CPO (Xu et al. 2024).  DPO and IPO compare with π_ref, a frozen
fp32 copy of the model's starting weights held by the criterion as buffers
(never optimized, not all-reduced) and checkpointed through
``compat.keep_criterion_training_state``.  Equations, defaults and their
sources: docs/criterions/preference.md.
"""

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from fairseq.criterions import register_criterion
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from omegaconf import II
from torch.func import functional_call

from fairseq_seqlevel.criterions.base import (SeqlevelCriterion, log_mean, mle_mix, reference_and_samples,
                                              references_of, scored_part, worker_rng)
from fairseq_seqlevel.decoding.mbr import expected_utility, first_occurrences, utility_matrix
from fairseq_seqlevel.decoding.model import eval_mode, forward_through, unwrap
from fairseq_seqlevel.decoding.teacher_forcing import rows_objective, sequence_nll
from fairseq_seqlevel.errors import ConfigError, check

SEARCHES = ["sample", "beam"]
RANKS = ["reward", "mbr"]
PAIRS = ["best-worst", "all"]
LOSSES = ["dpo", "ipo", "cpo"]
WITH_REFERENCE_MODEL = ("dpo", "ipo")
REFERENCE_PREFIX = "pi_ref__"  # buffer names of π_ref: pi_ref__<parameter name, dots as __>


@dataclass
class PreferenceConfig(FairseqDataclass):
    preference_candidates: int = field(default=8, metadata={"help": "n: candidates per source (>= 2)"})
    preference_search: ChoiceEnum(SEARCHES) = field(
        default="sample", metadata={"help": "sample: n multinomial samples (the shared sampler); "
                                    "beam: the n-best of fairseq's beam search (beam n)"})
    preference_rank: ChoiceEnum(RANKS) = field(
        default="reward", metadata={"help": "reward: rank the candidates by the reward against the reference(s); "
                                    "mbr: by their MBR expected utility, the mean reward of a candidate against "
                                    "every candidate of its source as reference, itself included, as MBR decoding "
                                    "(reference-free: self-training)"})
    preference_pairs: ChoiceEnum(PAIRS) = field(
        default="best-worst", metadata={"help": "best-worst: one pair per source, the best and the worst candidate; "
                                        "all: every pair of distinct candidates (each source's loss is the mean "
                                        "over its pairs)"})
    preference_margin: float = field(
        default=0.0, metadata={"help": "a pair counts only if the chosen's reward (or expected utility) exceeds the "
                               "rejected's by more than this; a source without a pair adds 0"})
    preference_loss: ChoiceEnum(LOSSES) = field(
        default="dpo", metadata={"help": "dpo: -log σ(β·h) (Rafailov et al. 2023); ipo: (h - 1/(2β))² (Azar et al. "
                                 "2023, β = τ); h = log-ratio to π_ref of the chosen minus the rejected's. cpo: "
                                 "-log σ(β·(log π(y_w) - log π(y_l))) + per-token NLL of y_w (Xu et al. 2024, no "
                                 "π_ref)"})
    preference_beta: float = field(
        default=0.1, metadata={"help": "β (IPO's τ); 0.1: DPO's value for most of its experiments, ALMA-R's for "
                               "CPO, TRL's default for all three"})
    preference_mle_weight: float = field(
        default=0.0, metadata={"help": "w: (1 - w)·preference loss + w·NLL of the reference (the kit's mle_mix)"})
    preference_reward: Optional[str] = field(
        default=None, metadata={"help": "the reward that ranks the candidates (every reference; with --preference-"
                                "rank mbr the other candidates): default the task's --reward, bleu in a stock "
                                "task"})
    preference_max_len_src_a: float = field(
        default=1.2, metadata={"help": "candidates: at most a·|x| + b tokens, x the source "
                                 "(as fairseq-generate's --max-len-a/b)"})
    preference_max_len_src_b: int = field(
        default=10, metadata={"help": "candidates: at most a·|x| + b tokens, x the source "
                                 "(as fairseq-generate's --max-len-a/b)"})
    sentence_avg: bool = II("optimization.sentence_avg")


def check_preference_config(cfg):
    check(cfg.preference_candidates >= 2, f"--preference-candidates must be >= 2 (a pair), got "
                                          f"{cfg.preference_candidates}")
    for flag, value, known in (("--preference-search", cfg.preference_search, SEARCHES),
                               ("--preference-rank", cfg.preference_rank, RANKS),
                               ("--preference-pairs", cfg.preference_pairs, PAIRS),
                               ("--preference-loss", cfg.preference_loss, LOSSES)):
        check(str(value) in known, f"{flag} must be one of {', '.join(known)}, got {value}")
    check(math.isfinite(cfg.preference_beta) and cfg.preference_beta > 0,
          f"--preference-beta must be > 0, got {cfg.preference_beta}")
    check(math.isfinite(cfg.preference_margin) and cfg.preference_margin >= 0,
          f"--preference-margin must be >= 0, got {cfg.preference_margin}")
    check(0.0 <= cfg.preference_mle_weight < 1.0,
          f"--preference-mle-weight must be in [0, 1) (1 is MLE: --criterion cross_entropy), got "
          f"{cfg.preference_mle_weight}")
    check(cfg.preference_max_len_src_a >= 0 and cfg.preference_max_len_src_b >= 1,
          f"--preference-max-len-src-a must be >= 0 and --preference-max-len-src-b >= 1, "
          f"got {cfg.preference_max_len_src_a}, {cfg.preference_max_len_src_b}")


# ------------------------------------------------------------------ pure math


def utility(values, higher_is_better=True):
    """The reward as a utility (higher is better) [..], fp32."""
    values = values.float()
    return values if higher_is_better else -values


def ordered_pairs(n, device=None):
    """(j [P], k [P]): every ordered pair j != k of n candidates, P = n·(n − 1)."""
    j, k = torch.triu_indices(n, n, offset=1, device=device)
    return torch.cat([j, k]), torch.cat([k, j])


def preference_pairs(utilities, mode, margin, distinct=None):
    """(chosen [B, P], rejected [B, P], gap [B, P], valid [B, P]) from the candidates'
    utilities [B, n]: ``best-worst`` (P = 1: the first best and first worst), or ``all``
    ordered pairs of distinct candidates (``distinct`` [B, n], default all); a pair is
    valid when gap = u(chosen) − u(rejected) > ``margin``."""
    batch_size, n = utilities.shape
    if mode == "best-worst":
        chosen, rejected = utilities.argmax(dim=1, keepdim=True), utilities.argmin(dim=1, keepdim=True)
        keep = torch.ones_like(chosen, dtype=torch.bool)
    else:
        j, k = ordered_pairs(n, utilities.device)
        chosen, rejected = j.expand(batch_size, -1), k.expand(batch_size, -1)
        keep = torch.ones_like(chosen, dtype=torch.bool) if distinct is None else distinct[:, j] & distinct[:, k]
    gap = utilities.gather(1, chosen) - utilities.gather(1, rejected)
    return chosen, rejected, gap, keep & (gap > margin)


def paired_rows(chosen, rejected, valid, n):
    """[B, n] bool: the candidates that are the chosen or the rejected of a valid pair,
    the only ones whose log-probabilities the loss depends on (the others' pairs are
    masked by ``valid``, so they need not be scored)."""
    member = F.one_hot(chosen, n) | F.one_hot(rejected, n)  # [B, P, n]
    return (member.bool() & valid.unsqueeze(-1)).any(dim=1)


def log_ratio_margin(logp, chosen, rejected, ref_logp=None):
    """h [B, P] = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l)), or
    log π(y_w) − log π(y_l) without π_ref (CPO); ``logp``, ``ref_logp`` [B, n]."""
    h = logp.gather(1, chosen) - logp.gather(1, rejected)
    if ref_logp is not None:
        h = h - (ref_logp.gather(1, chosen) - ref_logp.gather(1, rejected))
    return h


def pair_losses(h, loss, beta):
    """The loss of each pair from its margin ``h``: DPO and CPO's preference term
    −log σ(β·h), IPO (h − 1/(2β))²."""
    if loss == "ipo":
        return (h - 1.0 / (2.0 * beta)).pow(2)
    return -F.logsigmoid(beta * h)


def per_source_loss(pair_loss, valid):
    """Each source's loss [B]: the mean over its valid pairs, 0 without one."""
    zero = pair_loss.new_zeros(())
    total = torch.where(valid, pair_loss, zero).sum(dim=1)
    return total / valid.sum(dim=1).clamp(min=1).to(total.dtype)


def preference_loss(logp, chosen, rejected, valid, loss, beta, ref_logp=None, token_nll=None):
    """(per-source loss [B], h [B, P]) of log-probabilities ``logp`` [B, n] (sums over
    each candidate's scored tokens); ``token_nll`` [B, n]: CPO's NLL term, each
    candidate's NLL per token (its pairs add that of their y_w)."""
    h = log_ratio_margin(logp, chosen, rejected, ref_logp if loss in WITH_REFERENCE_MODEL else None)
    losses = pair_losses(h, loss, beta)
    if loss == "cpo":
        losses = losses + token_nll.gather(1, chosen)
    return per_source_loss(losses, valid), h


# ------------------------------------------------------------------ criterion


class _Call(torch.nn.Module):
    """``body(model, ...)`` as a module's forward, so that ``functional_call`` can run it
    with other weights in the model (π_ref's)."""

    def __init__(self, model, body):
        super().__init__()
        self.model, self.body = model, body

    def forward(self, *args, **kwargs):
        return self.body(self.model, *args, **kwargs)


@register_criterion("preference", dataclass=PreferenceConfig)
class PreferenceCriterion(SeqlevelCriterion):
    def __init__(self, task, cfg: PreferenceConfig):
        check_preference_config(cfg)
        super().__init__(task, cfg)
        self.reward = self.resolve_reward(cfg.preference_reward, "--preference-reward", default="bleu")
        self.loss_name = str(cfg.preference_loss)
        self.reference_names = None  # {model parameter name: buffer name} once π_ref exists

    # ---- π_ref: a frozen fp32 copy of the starting weights ----------------
    @property
    def uses_reference_model(self) -> bool:
        return self.loss_name in WITH_REFERENCE_MODEL

    def _register_reference(self, weights):
        """π_ref's buffers from ``weights`` {parameter name: tensor}: fp32, on the
        criterion's device, non-persistent (the criterion's state_dict stays empty;
        the checkpoint carries them through :meth:`training_state_dict`)."""
        device = self.special_ids.device
        names = {}
        for name, value in weights.items():
            names[name] = REFERENCE_PREFIX + name.replace(".", "__")
            self.register_buffer(names[name], value.detach().to(device=device, dtype=torch.float32).clone(),
                                 persistent=False)
        self.__dict__.setdefault("fp32_buffers", set()).update(names.values())  # kept fp32 by the kit's _apply
        self.reference_names = names

    def reference_weights(self):
        """π_ref {model parameter name: fp32 tensor}, or None before the first step."""
        if self.reference_names is None:
            return None
        return {name: getattr(self, buffer) for name, buffer in self.reference_names.items()}

    def ensure_reference(self, model):
        """π_ref = the model's weights the first time the criterion sees it (after any
        checkpoint load: a resumed run brings its own, ``load_training_state_dict``)."""
        params = dict(unwrap(model).named_parameters())
        if self.reference_names is None:
            self._register_reference(params)
        elif self.reference_names.keys() != params.keys():
            missing = sorted(params.keys() - self.reference_names.keys())[:3]
            raise ConfigError(f"--preference-loss {self.loss_name}: the checkpoint's reference model π_ref does "
                              f"not match the model (e.g. {missing}); start a new run with --finetune-from-model")

    def training_state_dict(self):
        """π_ref, saved in the checkpoint's extra_state (compat.keep_criterion_training_state)."""
        weights = self.reference_weights()
        return {} if weights is None else {"reference_model": dict(weights)}

    def load_training_state_dict(self, state):
        weights = state.get("reference_model") if state else None
        if weights and self.uses_reference_model:
            self._register_reference(weights)

    def reference_log_probs(self, model, net_input, rows, per_source, bos, scored, keep=None):
        """log π_ref [N] of ``rows``: the policy's re-scoring (same code path, so π = π_ref
        gives the same numbers) with π_ref's weights, in eval mode, without gradients.
        ``keep`` [N] bool: score only these rows, 0 for the others (rows_objective's).  Under
        no_grad the chunked output layer runs once (no gradient pass)."""
        inner = unwrap(model)
        dtypes = {name: p.dtype for name, p in inner.named_parameters()}
        weights = {"model." + name: w.to(dtype=dtypes[name]) for name, w in self.reference_weights().items()}
        pad = self.padding_idx
        with eval_mode(inner):
            _, _, row_nll, _ = functional_call(
                _Call(inner, rows_objective), weights,
                (net_input, rows, per_source, pad, bos, partial(sequence_nll, pad=pad), torch.sum),
                {"fused": self.fused, "loss_target": scored, "keep": keep})
        return -row_nll.float()

    # ---- candidates and their ranking --------------------------------------
    def candidates(self, model, sample, layout=None):
        """[B·n, T] candidates (the kit's draw_candidates, no grad)."""
        cfg = self.cfg
        return self.draw_candidates(model, sample, cfg.preference_candidates, cfg.preference_search, cfg.preference_max_len_src_a,
                                    cfg.preference_max_len_src_b, layout)

    @torch.no_grad()
    def utilities(self, found, sample):
        """[B, n] fp32: each candidate's reward against the references, or (``mbr``) its
        mean reward against the source's candidates as references (decoding/mbr.py)."""
        batch_size, n = sample["target"].size(0), self.cfg.preference_candidates
        higher = getattr(self.reward, "higher_is_better", True)
        if self.cfg.preference_rank == "reward":
            values = self.reward(found, references_of(sample).repeat_interleave(n, dim=0))
            return utility(values, higher).view(batch_size, n)
        # MBR decoding's expected utility (decoding/mbr.py): the mean over the source's candidates as
        # references, itself included, as mbrs does (a constant for BLEU/chrF, so the ranking is the same)
        return expected_utility(utility(utility_matrix(found.view(batch_size, n, -1), self.reward), higher))

    # ---- the step ------------------------------------------------------------
    def training_loss(self, model, sample):
        cfg, pad, target = self.cfg, self.padding_idx, sample["target"]
        batch_size, n, loss_name = target.size(0), cfg.preference_candidates, self.loss_name
        layout = self.output_layout(model, sample)
        if self.uses_reference_model:
            self.ensure_reference(model)
        with worker_rng():
            found = self.candidates(model, sample)
        utilities = self.utilities(found, sample)
        rows = reference_and_samples(target, found, n, pad)  # [y*, c_1..c_n] per source
        grouped = rows.view(batch_size, n + 1, -1)[:, 1:]
        distinct = first_occurrences(grouped, torch.ones(grouped.shape[:2], dtype=torch.bool, device=grouped.device)) \
            if cfg.preference_pairs == "all" else None
        chosen, rejected, gap, valid = preference_pairs(utilities, str(cfg.preference_pairs), cfg.preference_margin,
                                                        distinct)
        # scored: y* (the logged nll, the MLE mix) and the candidates of a valid pair; the others reach the
        # loss as 0, masked (each of their pairs is invalid).  π_ref scores the same rows (the same length
        # buckets: π = π_ref gives bit-identical numbers), none without a pair (then every pair is invalid)
        paired = paired_rows(chosen, rejected, valid, n)
        keep = F.pad(paired, (1, 0), value=True).view(-1)
        scored = scored_part(rows, n, layout.prefix_len, pad)
        lengths = scored.ne(pad).sum(dim=1).clamp(min=1).view(batch_size, n + 1)[:, 1:].float()
        ref_logp = None
        if self.uses_reference_model:
            ref_logp = torch.zeros_like(utilities)
            if bool(paired.any()):
                ref_logp = self.reference_log_probs(model, sample["net_input"], rows, n + 1, layout.bos, scored,
                                                    keep).view(batch_size, n + 1)[:, 1:]
        weight = self.length_weights(target)

        def losses_of(row_nll):  # (per-source loss [B], h [B, P])
            nll = row_nll.view(batch_size, n + 1)[:, 1:]
            return preference_loss(-nll, chosen, rejected, valid, loss_name, cfg.preference_beta, ref_logp,
                                   token_nll=nll / lengths)

        def objective(row_nll):
            per_source = losses_of(row_nll)[0]
            return mle_mix((weight * per_source).sum(), row_nll.view(batch_size, n + 1)[:, 0].sum(),
                           cfg.preference_mle_weight)

        loss, _, row_nll, _ = forward_through(model, rows_objective, sample["net_input"], rows, n + 1, pad,
                                              layout.bos, partial(sequence_nll, pad=pad), objective,
                                              fused=self.fused, loss_target=scored, keep=keep)
        with torch.no_grad():
            per_source, h = losses_of(row_nll.float())
        nll = row_nll.view(batch_size, n + 1)[:, 0].sum()
        pairs = int(valid.sum())
        zero = h.new_zeros(())
        extra = {
            "preference_pairs": pairs, "preference_sources": batch_size,
            "preference_paired_sources": int(valid.any(dim=1).sum()),
            "preference_gap_sum": torch.where(valid, gap, zero).sum(),
            "preference_accuracy_sum": (valid & (h > 0)).sum().float(),
            "preference_logratio_sum": torch.where(valid, h, zero).sum(),
        }
        size = self.sample_size_of(sample)
        return loss, size, self.stock_logging_output(loss, nll, sample, size, **extra)

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        # reward (or expected utility) of the chosen minus the rejected, per pair: what the pairs teach
        log_mean(logging_outputs, "preference_reward_margin", "preference_gap_sum", "preference_pairs", round=4)
        # share of pairs whose h > 0: the policy already prefers the chosen (more than π_ref does)
        log_mean(logging_outputs, "preference_accuracy", "preference_accuracy_sum", "preference_pairs")
        # mean h per pair (nats): DPO/IPO's implicit reward margin / β, CPO's log π(y_w) − log π(y_l)
        log_mean(logging_outputs, "preference_logratio", "preference_logratio_sum", "preference_pairs")
        # share of sources with at least one pair, and pairs per source
        log_mean(logging_outputs, "preference_coverage", "preference_paired_sources", "preference_sources")
        log_mean(logging_outputs, "preference_pairs", "preference_pairs", "preference_sources", round=2)
