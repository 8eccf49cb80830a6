"""``searnn_kl``: SeaRnn, learning-to-search losses for RNN training (Leblond,
Alayrac, Osokin and Lacoste-Julien, "SEARNN: Training RNNs with global-local
losses", ICLR 2018).

Per batch (Algorithm 1): roll in (reference, learned or mixed), pick cells and
candidate tokens, roll out from every (cell, token) and cost each roll-out with
the reward library (:mod:`fairseq_seqlevel.decoding.search`); then per scored
cell ``kl`` = cross-entropy of the model to softmax(-α·costs) (eq. 4) or ``ll``
= -log p_M of the min-cost token (eq. 3), over the whole vocabulary or the
scored tokens only (sKL / sLL).  This module: the config, its check, the pure
loss math and the criterion.  The full design (policies, cells and token
sampling, cost units and label smoothing, the batched engine, task layouts,
logging): ``docs/criterions/searnn_kl.md``.
"""

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq.criterions import register_criterion
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from omegaconf import II
from torch import Tensor

from fairseq_seqlevel.criterions.base import (SeqlevelCriterion, log_mean, log_objective, log_stock_metrics,
                                              mle_mix, pad_right, references_of, worker_rng)
from fairseq_seqlevel.decoding import search as l2s
from fairseq_seqlevel.decoding.layout import OutputLayout
from fairseq_seqlevel.decoding.search import SearchResult, SearchSettings, reference_length
from fairseq_seqlevel.decoding.search import select_tokens  # noqa: F401 (public name, tests use searnn.select_tokens)
from fairseq_seqlevel.decoding.teacher_forcing import prev_output_tokens_from_target, rows_lprobs, token_nll
from fairseq_seqlevel.errors import check
from fairseq_seqlevel.perturbation.vocab import never_sampled_ids

POLICIES = ["reference", "learned", "mixed"]
LOSSES = ["kl", "ll"]
TOKEN_SAMPLINGS = ["uniform", "policy", "biased", "topk"]
REFERENCE_POLICIES = ["auto", "copy", "best-suffix"]
COST_UNITS = ["sentence", "token"]
EOS_CANDIDATES = ["always", "gt"]


@dataclass
class SearnnConfig(FairseqDataclass):
    searnn_loss: ChoiceEnum(LOSSES) = field(
        default="kl", metadata={"help": "kl: cross-entropy to softmax(-α·cost) (eq. 4); "
                                "ll: log-loss of the min-cost token (eq. 3)"}
    )
    searnn_scale: float = field(
        default=200.0, metadata={"help": "α of eq. 4 (the paper uses 200 with 1 - BLEU costs; "
                                 "on spelling's normalized edit costs 20 did worse than MLE, 200 better)"}
    )
    searnn_roll_in: ChoiceEnum(POLICIES) = field(
        default="learned", metadata={"help": "roll-in policy, the prefix the cells are taken from: reference "
                                     "(teacher forcing), learned (greedy), mixed (either, per sequence)"}
    )
    searnn_roll_out: ChoiceEnum(POLICIES) = field(
        default="mixed", metadata={"help": "roll-out policy, how a (cell, token) is completed: reference (see "
                                   "--searnn-ref-policy), learned (greedy), mixed (either, per sequence)"}
    )
    searnn_mix_prob: float = field(
        default=0.5, metadata={"help": "mixed roll-in/roll-out: probability of the reference policy "
                               "for a sequence"}
    )
    searnn_cells: int = field(
        default=0, metadata={"help": "N: cells scored per sequence, drawn uniformly (0 = all)"}
    )
    searnn_tokens: int = field(
        default=0, metadata={"help": "K: tokens sampled per cell besides the ground truth "
                             "(0 = the whole vocabulary); K > 0 restricts the softmax to them (sKL/sLL)"}
    )
    searnn_token_sampling: ChoiceEnum(TOKEN_SAMPLINGS) = field(
        default="topk", metadata={"help": "how the K tokens are drawn: uniform, policy (model), "
                                  "biased (half policy, half uniform), topk (model's best)"}
    )
    searnn_neighbours: int = field(
        default=0, metadata={"help": "w: also score the ground-truth tokens within ±w positions "
                             "(K > 0; the paper's NMT setting)"}
    )
    searnn_max_len_ref_b: int = field(
        default=5, metadata={"help": "learned roll-ins and roll-outs stop at |y*| + b tokens, y* the reference "
                             "(eos included, forced at the cap)"}
    )
    searnn_ref_policy: ChoiceEnum(REFERENCE_POLICIES) = field(
        default="auto", metadata={"help": "reference roll-out: copy the rest of the target, or best-suffix "
                                  "(append the target suffix maximizing BLEU-1, Appendix C.2); "
                                  "auto: best-suffix for bleu rewards, copy otherwise"}
    )
    searnn_cost_unit: ChoiceEnum(COST_UNITS) = field(
        default="sentence", metadata={"help": "sentence: the reward library's normalized cost; token: times "
                                      "the target length (Hamming/edit count token errors: the label-smoothing "
                                      "equivalence of Appendix C.1)"}
    )
    searnn_eos_candidate: ChoiceEnum(EOS_CANDIDATES) = field(
        default="always", metadata={"help": "always: eos is scored at every cell; gt: only where it is "
                                    "the ground truth (fixed-length setting)"}
    )
    searnn_reward: Optional[str] = field(
        default=None, metadata={"help": "reward for the costs, cost = the reward's cost (1 - BLEU, "
                                "normalized edit/Hamming distance); default: the task's --reward, hamming in a "
                                "task without one"}
    )
    searnn_mle_weight: float = field(
        default=0.0, metadata={"help": "w: loss = (1 - w)·SeaRnn + w·NLL(y*), a sentence's mean token NLL "
                               "counted once per scored cell of it (a sum over sentences, so data parallelism "
                               "splits it exactly; w = 1 with reference roll-in and all cells is MLE); "
                               "anchors the tokens a restricted softmax (K > 0) never scores"}
    )
    sentence_avg: bool = II("optimization.sentence_avg")


def _check_choice(value, choices, flag):
    check(str(value) in choices, f"{flag} must be one of {', '.join(choices)}, got {value}")


def check_searnn_config(cfg):
    _check_choice(cfg.searnn_loss, LOSSES, "--searnn-loss")
    _check_choice(cfg.searnn_roll_in, POLICIES, "--searnn-roll-in")
    _check_choice(cfg.searnn_roll_out, POLICIES, "--searnn-roll-out")
    _check_choice(cfg.searnn_token_sampling, TOKEN_SAMPLINGS, "--searnn-token-sampling")
    _check_choice(cfg.searnn_ref_policy, REFERENCE_POLICIES, "--searnn-ref-policy")
    _check_choice(cfg.searnn_cost_unit, COST_UNITS, "--searnn-cost-unit")
    _check_choice(cfg.searnn_eos_candidate, EOS_CANDIDATES, "--searnn-eos-candidate")
    check(cfg.searnn_scale > 0, f"--searnn-scale must be > 0, got {cfg.searnn_scale}")
    check(0.0 <= cfg.searnn_mix_prob <= 1.0, f"--searnn-mix-prob must be in [0, 1], got {cfg.searnn_mix_prob}")
    check(cfg.searnn_cells >= 0, f"--searnn-cells must be >= 0 (0 = all cells), got {cfg.searnn_cells}")
    check(cfg.searnn_tokens >= 0, f"--searnn-tokens must be >= 0 (0 = whole vocabulary), got {cfg.searnn_tokens}")
    check(cfg.searnn_neighbours >= 0, f"--searnn-neighbours must be >= 0, got {cfg.searnn_neighbours}")
    check(cfg.searnn_max_len_ref_b >= 0, f"--searnn-max-len-ref-b must be >= 0, got {cfg.searnn_max_len_ref_b}")
    check(0.0 <= cfg.searnn_mle_weight <= 1.0, f"--searnn-mle-weight must be in [0, 1], got {cfg.searnn_mle_weight}")


def search_settings(cfg, best_suffix: bool) -> SearchSettings:
    """The search that ``cfg`` asks for (``best_suffix``: the resolved ``--searnn-ref-policy``)."""
    return SearchSettings(roll_in=str(cfg.searnn_roll_in), roll_out=str(cfg.searnn_roll_out),
                          mix_prob=cfg.searnn_mix_prob, cells=cfg.searnn_cells, tokens=cfg.searnn_tokens,
                          token_sampling=str(cfg.searnn_token_sampling), neighbours=cfg.searnn_neighbours,
                          max_len_b=cfg.searnn_max_len_ref_b, eos_candidate=str(cfg.searnn_eos_candidate),
                          best_suffix=best_suffix)


# ------------------------------------------------------------------ pure math


def scale_costs(costs: Tensor, reference_length: Tensor, unit: str) -> Tensor:
    """``--searnn-cost-unit``: library costs as they are (sentence) or times
    ``max(|y*|, 1)`` (token), computed in double."""
    if unit == "sentence":
        return costs
    return (costs.double() * reference_length.clamp(min=1).double().unsqueeze(1)).to(costs.dtype)


def candidate_log_probs(lprobs: Tensor, cand: Tensor, valid: Tensor, restrict: bool) -> Tensor:
    """log p_M of the candidates ``[M, C]`` (-inf where invalid): the model's
    full-vocabulary softmax, or with ``restrict`` the softmax over the valid
    candidates only (sKL / sLL)."""
    lp = lprobs.gather(1, cand).masked_fill(~valid, -math.inf)
    if restrict:
        lp = lp - torch.logsumexp(lp, dim=1, keepdim=True)
    return lp


def cost_target(costs: Tensor, valid: Tensor, alpha: float) -> Tensor:
    """p_C = softmax(-α c) over the valid candidates (eq. 4), 0 elsewhere."""
    c = costs.masked_fill(~valid, math.inf)
    c = c - c.min(dim=1, keepdim=True).values
    return torch.softmax(-alpha * c, dim=1).masked_fill(~valid, 0.0)


def kl_loss(cand_lprobs: Tensor, costs: Tensor, valid: Tensor, alpha: float) -> Tensor:
    """Eq. 4 per cell ``[M]``: -Σ_a p_C(a) log p_M(a)."""
    q = cost_target(costs, valid, alpha)
    return -(q * cand_lprobs.masked_fill(~valid, 0.0)).sum(dim=1)


def best_candidate(costs: Tensor, valid: Tensor) -> Tensor:
    """Column ``[M]`` of the min-cost candidate; ties go to the earliest column
    (column 0 is the ground truth)."""
    return costs.masked_fill(~valid, math.inf).argmin(dim=1)


def ll_loss(cand_lprobs: Tensor, costs: Tensor, valid: Tensor) -> Tensor:
    """Eq. 3 per cell ``[M]``: -log p_M(a*), a* = arg-min cost."""
    return -cand_lprobs.gather(1, best_candidate(costs, valid).unsqueeze(1)).squeeze(1)


@register_criterion("searnn_kl", dataclass=SearnnConfig)
class SearnnCriterion(SeqlevelCriterion):
    deprecated_flags = {"--searnn-max-len-b": "--searnn-max-len-ref-b"}  # the name before issue 41

    def __init__(self, task, cfg: SearnnConfig):
        check_searnn_config(cfg)
        super().__init__(task, cfg)
        # eos is a candidate token (ending the sentence here) unless asked otherwise
        special = never_sampled_ids(task.target_dictionary, include_eos=cfg.searnn_eos_candidate == "gt")
        allowed = torch.ones(self.num_tokens, dtype=torch.bool)
        allowed[special] = False
        self.register_buffer("allowed", allowed, persistent=False)
        self.reward = self.resolve_reward(cfg.searnn_reward, "--searnn-reward", default="hamming")
        policy = cfg.searnn_ref_policy
        if policy == "auto":
            policy = "best-suffix" if self.reward.name.startswith("bleu") else "copy"
        self.best_suffix = policy == "best-suffix"

    def search(self, model, sample, layout: Optional[OutputLayout] = None) -> SearchResult:
        """Roll-ins, cells, tokens, roll-outs and costs in ``--searnn-cost-unit``
        (eval mode, no grad: :func:`fairseq_seqlevel.decoding.search.search`), in
        the task's output layout (default: ``self.output_layout``)."""
        if layout is None:
            layout = self.output_layout(model, sample)
        settings = search_settings(self.cfg, self.best_suffix)
        found = l2s.search(model, sample, references_of(sample), layout, settings, self.reward, self.allowed,
                           self.padding_idx, self.eos)
        lengths = reference_length(sample["target"], layout, self.padding_idx).index_select(0, found.cell_rows)
        return found._replace(costs=scale_costs(found.costs, lengths, self.cfg.searnn_cost_unit))

    # ---------------------------------------------------------------- loss

    def _loss_pass(self, model, sample, rollin, layout: OutputLayout):
        """log p_M ``[B, L, V]`` of the roll-ins, teacher-forced in the model's own
        (train) mode by a stock forward of the wrapped model (data parallelism sees
        it); with ``--searnn-mle-weight`` also each sentence's mean token NLL of
        the reference ``[B]`` (the reference beside each roll-in, in the same
        forward), else None."""
        pad = self.padding_idx
        if self.cfg.searnn_mle_weight > 0:
            target = sample["target"]
            width = max(rollin.size(1), target.size(1))
            rows = torch.stack([pad_right(target, width, pad), pad_right(rollin, width, pad)], dim=1)
            both = rows_lprobs(model, sample["net_input"], rows.view(-1, width), 2, pad, layout.bos)
            ref_lprobs, lprobs = both.view(target.size(0), 2, width, -1).split([1, 1], dim=1)
            ref_nll = token_nll(ref_lprobs.squeeze(1), pad_right(target, width, pad), pad).sum(dim=1)
            ref_nll = ref_nll / target.ne(pad).sum(dim=1).clamp(min=1)
            return lprobs.squeeze(1)[:, :rollin.size(1)], ref_nll
        prev = prev_output_tokens_from_target(rollin, pad, layout.bos)
        net_output = model(**{**sample["net_input"], "prev_output_tokens": prev})
        return model.get_normalized_probs(net_output, log_probs=True), None

    def training_loss(self, model, sample):
        layout = self.output_layout(model, sample)  # also makes self.reward score what the task outputs
        with worker_rng():  # roll-ins, cells, roll-out tokens: this worker's own draws
            found = self.search(model, sample, layout)
        lprobs, ref_nll = self._loss_pass(model, sample, found.rollin, layout)
        cand_lprobs = candidate_log_probs(lprobs[found.cell_rows, found.cell_pos], found.candidates, found.valid,
                                          restrict=self.cfg.searnn_tokens > 0)
        if self.cfg.searnn_loss == "kl":
            per_cell = kl_loss(cand_lprobs, found.costs, found.valid, self.cfg.searnn_scale)
        else:
            per_cell = ll_loss(cand_lprobs, found.costs, found.valid)
        loss = per_cell.sum()
        nll = token_nll(lprobs, found.gt, self.padding_idx).sum()
        gt_best = best_candidate(found.costs, found.valid).eq(0).sum()
        num_cells = found.cell_rows.numel()
        sample_size = self.sample_size_of(sample, tokens=num_cells)
        if ref_nll is not None:
            # each sentence's mean token NLL counts as many times as it has scored cells: a
            # sum over sentences (data parallelism splits it exactly), and at w = 1 with all
            # cells and reference roll-in, MLE
            cells_per_sentence = torch.bincount(found.cell_rows, minlength=ref_nll.size(0))
            loss = mle_mix(loss, (cells_per_sentence * ref_nll).sum(), self.cfg.searnn_mle_weight)
        logging_output = self.stock_logging_output(
            loss, nll, sample, sample_size,
            searnn_nll_cells=int(found.gt.ne(self.padding_idx).sum()),
            searnn_cells=num_cells, searnn_gt_best=gt_best.data,
            searnn_rollin_cost=found.rollin_cost.sum().data)
        return loss, sample_size, logging_output

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        # nll_loss is per roll-in cell: that is per target token with reference roll-in.
        log_stock_metrics([{**log, "ntokens": log.get("searnn_nll_cells", log.get("ntokens", 0))}
                           for log in logging_outputs])
        log_objective(logging_outputs)
        log_mean(logging_outputs, "searnn_gt_best", "searnn_gt_best", "searnn_cells")
        log_mean(logging_outputs, "searnn_rollin_cost", "searnn_rollin_cost", "nsentences")
