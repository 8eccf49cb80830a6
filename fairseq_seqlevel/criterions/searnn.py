"""``searnn_kl``: SeaRnn, learning-to-search losses for RNN training (Leblond et al. 2018).

Algorithm 1 per batch:

1. **Roll-in** (``--searnn-roll-in``): ``reference`` copies the target (teacher
   forcing, Appendix A.2); ``learned`` decodes greedily with the model (eval
   mode, no grad), capped at ``len(target) + --searnn-max-len-b`` tokens with
   eos forced at the cap; ``mixed`` picks reference with probability
   ``--searnn-mix-prob`` per sequence, learned otherwise.  Cells are the
   roll-in positions 0..len(roll-in)-1, the eos position included.
2. **Cells and tokens** (§5): ``--searnn-cells N`` cells per sequence drawn
   uniformly without replacement (0: all); at each cell the ground-truth token
   (the target token at that position; eos past the target's end) and
   ``--searnn-tokens K`` tokens drawn without replacement (0: every token) by
   ``--searnn-token-sampling``: ``uniform``; ``policy`` (the model's
   distribution at the cell); ``biased`` (the policy mixed half-half with the
   uniform distribution, which boosts low-probability tokens, §5); ``topk``
   (the model's K best).  ``--searnn-neighbours w`` adds the ground-truth
   tokens within ±w positions (Appendix C.2 samples top-15 plus 10 neighbours:
   ``--searnn-tokens 15 --searnn-token-sampling topk --searnn-neighbours 5``).
   Special symbols (bos, pad, unk, madeupword fillers) are never scored unless
   they are the ground truth; duplicates are scored once.  eos is a candidate
   like any token (``--searnn-eos-candidate always``; its roll-out is the
   prefix + eos), or only where it is the ground truth (``gt``: the
   fixed-length setting of the paper's OCR task, see below).
3. **Roll-outs** (``--searnn-roll-out``, same three policies, drawn per
   sequence): ``learned`` = greedy decoding from the cell with the token forced
   (eval mode, no grad, same length cap).  ``reference``: copy the rest of the
   ground truth, ``target[t+1:]`` (optimal for Hamming), or for BLEU rewards
   the paper's heuristic (Appendix C.2): append the ground-truth suffix
   ``target[j:]`` that maximizes BLEU-1 of the whole output
   (``--searnn-ref-policy``; ``auto`` = best-suffix for ``bleu*`` rewards,
   copy otherwise; ties go to the suffix starting closest to t+1).
4. **Costs** from the reward library: ``reward.cost`` of every roll-out against
   all references, i.e. 1 - BLEU, or edit / Hamming distance divided by the
   reference length (as in the paper's experiments).  The reward is the
   task's ``--reward``, or ``--searnn-reward NAME`` (default ``hamming`` in a
   task without a reward, e.g. stock ``translation``).  Reference roll-outs
   and the ``token`` cost unit use the sample's target (the first reference).
5. **Loss** per cell, summed over cells (``--searnn-loss``): ``kl`` =
   cross-entropy of the model to p_C = softmax(-α·c_t) (eq. 4, α =
   ``--searnn-scale``); ``ll`` = -log p_M(a*) with a* the arg-min-cost token
   (eq. 3; ties go to the ground truth, then to the earlier candidate).  With
   K = 0 p_M is the model's softmax over the whole vocabulary; with K > 0 it
   is renormalized over the scored tokens (sKL / sLL, §5).

Cost units (``--searnn-cost-unit``).  α multiplies the cost vector, so its
scale matters.  ``sentence`` (default) uses the library's normalized costs as
they are, like the paper's experiments (edit distance / reference length for
spelling; 1 - smoothed BLEU with α = 200 for NMT).  ``token`` multiplies them by
the target length |y*| (tokens without eos), so Hamming and edit costs count
token errors.  That is the form of Appendix C.1 ("KL and label smoothing"):
with reference roll-in and roll-out under the Hamming loss "the vector of
costs can be written as a vector with equal coordinates minus a one-hot
vector" on the ground truth, so p_C puts 1/(1+(V'-1)e^{-α}) on the ground
truth and e^{-α}/(1+(V'-1)e^{-α}) on each of the V'-1 other scored tokens:
label smoothing with ε = (V'-1)e^{-α}/(1+(V'-1)e^{-α}).  With normalized
costs the same holds with α/|y*| in place of α (ε then depends on the
sentence length).  The argument assumes every wrong token costs one error: an
eos before the end of the target costs the whole missing tail, so the exact
equivalence needs ``--searnn-eos-candidate gt``.  Costs are shifted by their
per-cell minimum (as the reference implementation does); softmax and arg-min
do not change.

Engine (:mod:`fairseq_seqlevel.decoding.rollouts`): the source is encoded once
for the search; learned roll-ins are decoded greedily; then the roll-ins are
replayed step by step with an incremental decoder state, and at each step t
that has cells, the state is expanded to one row per (cell, token) roll-out
of the whole batch (``reorder_incremental_state_scripting``, as fairseq's
generator does for beams) and all of them are decoded together, dropping
finished rows (a learned roll-in's own greedy token reuses the roll-in's
continuation; reference roll-outs and eos need no decoding).  A Python loop
over time steps, none over cells × tokens or sentences.  Cost: at most
Σ_t (#roll-outs from step t) × (cap - t) decoder row-steps, plus one replay of
the roll-ins.  The loss pass re-encodes and teacher-forces the roll-ins in the
model's own (train) mode.

Task layout (:mod:`fairseq_seqlevel.decoding.layout`, ``output_layout``): "eos"
above is the task's end symbol (mBART's ``[lang]``); roll-ins, roll-outs and
the loss pass start from the task's decoder start symbol; a learned roll-in
forces the task's prefix (the target-language token of multilingual tasks) as
its ``inference_step`` does, and the reference roll-in has it (the target).
Forced positions are no cells (no cost, no loss: the model does not choose
them), reference roll-outs never repeat them, and costs score what the task
outputs (prefix dropped, end symbol as eos).  ``nll_loss`` and the
``--searnn-mle-weight`` term count them, as MLE does.

Logging: ``loss`` in base 2 per sample_size = number of scored cells (the
number of sentences with ``--sentence-avg``); with all cells and reference
roll-in that is ntokens, so LL + Hamming logs exactly what MLE logs.
``nll_loss`` = NLL of the ground-truth tokens at every roll-in cell per such
cell (MLE's nll_loss with reference roll-in); ``searnn_rollin_cost`` = mean
cost (library units) of the roll-in sequences; ``searnn_gt_best`` = fraction
of scored cells whose min-cost token is the ground truth (ties count).
"""

import math
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch
from fairseq.criterions import register_criterion
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.logging import metrics
from omegaconf import II
from torch import Tensor

from fairseq_seqlevel import rewards
from fairseq_seqlevel.criterions.base import (SeqlevelCriterion, log_mean, log_stock_metrics, pad_right, references_of,
                                              worker_rng)
from fairseq_seqlevel.decoding import rollouts
from fairseq_seqlevel.decoding.layout import OutputLayout
from fairseq_seqlevel.decoding.model import eval_mode
from fairseq_seqlevel.decoding.teacher_forcing import (encode, prev_output_tokens_from_target, reorder_encoder_out,
                                                       rows_lprobs, token_nll)
from fairseq_seqlevel.errors import check
from fairseq_seqlevel.rewards._common import valid_token_mask
from fairseq_seqlevel.rewards.output_view import OutputView, viewed
from fairseq_seqlevel.decoding.gumbel import gumbel_topk
from fairseq_seqlevel.perturbation.vocab import never_sampled_ids

POLICIES = ["reference", "learned", "mixed"]
LOSSES = ["kl", "ll"]
TOKEN_SAMPLINGS = ["uniform", "policy", "biased", "topk"]
REFERENCE_POLICIES = ["auto", "copy", "best-suffix"]
COST_UNITS = ["sentence", "token"]
EOS_CANDIDATES = ["always", "gt"]
#: weight of the uniform distribution in ``--searnn-token-sampling biased``.
BIASED_UNIFORM_WEIGHT = 0.5


@dataclass
class SearnnConfig(FairseqDataclass):
    searnn_loss: ChoiceEnum(LOSSES) = field(
        default="kl", metadata={"help": "kl: cross-entropy to softmax(-α·cost) (eq. 4); "
                                "ll: log-loss of the min-cost token (eq. 3)"}
    )
    searnn_scale: float = field(
        default=200.0, metadata={"help": "α of eq. 4 (the paper uses 200 with 1 - BLEU costs)"}
    )
    searnn_roll_in: ChoiceEnum(POLICIES) = field(
        default="learned", metadata={"help": "roll-in policy: reference (teacher forcing), learned (greedy), "
                                     "mixed (per sequence)"}
    )
    searnn_roll_out: ChoiceEnum(POLICIES) = field(
        default="mixed", metadata={"help": "roll-out policy: reference (see --searnn-ref-policy), "
                                   "learned (greedy), mixed (per sequence)"}
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
                                  "biased (policy mixed with uniform), topk (model's best)"}
    )
    searnn_neighbours: int = field(
        default=0, metadata={"help": "w: also score the ground-truth tokens within ±w positions (K > 0)"}
    )
    searnn_max_len_b: int = field(
        default=5, metadata={"help": "learned roll-ins and roll-outs stop at len(target) + b tokens "
                             "(eos included, forced at the cap)"}
    )
    searnn_ref_policy: ChoiceEnum(REFERENCE_POLICIES) = field(
        default="auto", metadata={"help": "reference roll-out: copy the rest of the target, or best-suffix "
                                  "(append the target suffix maximizing BLEU-1, Appendix C.2); "
                                  "auto: best-suffix for bleu rewards, copy otherwise"}
    )
    searnn_cost_unit: ChoiceEnum(COST_UNITS) = field(
        default="sentence", metadata={"help": "sentence: the reward library's normalized cost; token: times "
                                      "the target length (Hamming/edit count errors, Appendix C.1)"}
    )
    searnn_eos_candidate: ChoiceEnum(EOS_CANDIDATES) = field(
        default="always", metadata={"help": "always: eos is scored at every cell; gt: only where it is "
                                    "the ground truth (fixed-length setting)"}
    )
    searnn_reward: Optional[str] = field(
        default=None, metadata={"help": "reward for the costs (default: the task's --reward; hamming in a "
                                "task without one)"}
    )
    searnn_mle_weight: float = field(
        default=0.0, metadata={"help": "w: loss = (1 - w)·SeaRnn + w·NLL(y*), a sentence's mean token NLL "
                               "counted once per scored cell of it; anchors the tokens a restricted "
                               "softmax (K > 0) never scores"}
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
    check(cfg.searnn_max_len_b >= 0, f"--searnn-max-len-b must be >= 0, got {cfg.searnn_max_len_b}")
    check(0.0 <= cfg.searnn_mle_weight <= 1.0, f"--searnn-mle-weight must be in [0, 1], got {cfg.searnn_mle_weight}")


# ------------------------------------------------------------------ pure math


def choose_reference(policy, batch_size, mix_prob, device):
    """BoolTensor ``[B]``: which sequences follow the reference policy."""
    if policy == "reference":
        return torch.ones(batch_size, dtype=torch.bool, device=device)
    if policy == "learned":
        return torch.zeros(batch_size, dtype=torch.bool, device=device)
    return torch.rand(batch_size, device=device) < mix_prob


def select_cells(lengths: Tensor, num_cells: int, width: int, first: int = 0) -> Tensor:
    """BoolTensor ``[B, width]``: ``num_cells`` positions in ``first ..
    lengths[b] - 1`` drawn uniformly without replacement (all of them if 0 or
    too few); ``first``: the task's forced prefix length (no cell there)."""
    positions = torch.arange(width, device=lengths.device).unsqueeze(0)
    inside = positions < lengths.unsqueeze(1)
    if first > 0:
        inside &= positions >= first
    if num_cells == 0:
        return inside
    keys = torch.rand(inside.shape, device=lengths.device).masked_fill(~inside, 2.0)
    rank = keys.argsort(dim=1).argsort(dim=1)
    return inside & (rank < num_cells)


def aligned_ground_truth(target: Tensor, rollin: Tensor, pad: int, eos: int) -> Tensor:
    """``[B, L]`` ground-truth token of every roll-in cell: the target token at
    that position, eos past the target's end, pad past the roll-in's end."""
    width = rollin.size(1)
    gt = torch.full_like(rollin, eos)
    shared = min(width, target.size(1))
    gt[:, :shared] = target[:, :shared]
    gt = gt.masked_fill(gt.eq(pad), eos)
    return gt.masked_fill(rollin.eq(pad), pad)


def neighbour_tokens(target: Tensor, position: int, width: int, pad: int):
    """Ground-truth tokens at positions ``position ± 1..width`` of each row of
    ``target`` ``[m, T]``: (tokens ``[m, 2w]``, valid ``[m, 2w]``)."""
    offsets = torch.cat([torch.arange(-width, 0), torch.arange(1, width + 1)]).to(target.device)
    pos = position + offsets.unsqueeze(0).expand(target.size(0), -1)
    tokens = target.gather(1, pos.clamp(0, target.size(1) - 1))
    valid = (pos >= 0) & (pos < target.size(1)) & tokens.ne(pad)
    return tokens, valid


def select_tokens(gt: Tensor, lprobs: Optional[Tensor], allowed: Tensor, k: int, strategy: str,
                  neighbours: Optional[Tensor] = None, neighbours_valid: Optional[Tensor] = None):
    """Tokens scored at ``m`` cells: (candidates ``[m, C]``, valid ``[m, C]``).

    Column 0 is the ground truth ``gt`` ``[m]`` (always valid).  k = 0: every
    ``allowed`` token (``[V]`` bool) after it.  k > 0: k allowed tokens other
    than gt, without replacement (Gumbel-top-k): ``uniform``, ``policy``
    (∝ exp(lprobs)), ``biased`` (∝ the policy mixed with uniform),
    ``topk`` (the k most probable, in decreasing order); then the optional
    ``neighbours`` ``[m, 2w]``.  Invalid columns (duplicates, tokens not
    allowed, fewer than k tokens available) are marked in ``valid``.
    """
    m = gt.size(0)
    first = gt.unsqueeze(1)
    if k == 0:
        ids = allowed.nonzero(as_tuple=False).squeeze(1)
        cand = torch.cat([first, ids.unsqueeze(0).expand(m, -1)], dim=1)
        valid = torch.cat([torch.ones_like(first, dtype=torch.bool), ids.unsqueeze(0) != first], dim=1)
        return cand, valid
    mask = allowed.unsqueeze(0).expand(m, -1).clone()
    mask.scatter_(1, first, False)
    if strategy == "uniform":
        log_weights = torch.zeros(mask.shape, device=mask.device)
    else:
        log_weights = lprobs.float().masked_fill(~allowed.unsqueeze(0), -math.inf)
        log_weights = log_weights - torch.logsumexp(log_weights, dim=1, keepdim=True)
        if strategy == "biased":
            w = BIASED_UNIFORM_WEIGHT
            uniform = -math.log(max(int(allowed.sum()), 1))
            log_weights = torch.logaddexp(log_weights + math.log(1.0 - w),
                                          torch.full_like(log_weights, uniform + math.log(w)))
    top_keys, top_ids = gumbel_topk(log_weights, k, mask, perturb=strategy != "topk")
    cand = torch.cat([first, top_ids], dim=1)
    valid = torch.cat([torch.ones_like(first, dtype=torch.bool), top_keys > -math.inf], dim=1)
    if neighbours is not None and neighbours.size(1) > 0:
        nvalid = neighbours_valid & allowed[neighbours]
        same = neighbours.unsqueeze(2) == cand.unsqueeze(1)  # [m, 2w, C]
        nvalid = nvalid & ~(same & valid.unsqueeze(1)).any(dim=2)
        for j in range(1, neighbours.size(1)):  # 2w columns: earlier duplicates
            earlier = (neighbours[:, :j] == neighbours[:, j:j + 1]) & nvalid[:, :j]
            nvalid[:, j] &= ~earlier.any(dim=1)
        cand = torch.cat([cand, neighbours], dim=1)
        valid = torch.cat([valid, nvalid], dim=1)
    return cand, valid


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


class SearchResult(NamedTuple):
    """Roll-ins, scored cells and cost vectors of a batch (no gradient).

    Attributes:
        rollin: ``[B, L]`` roll-in tokens (right-padded, ending in eos).
        gt: ``[B, L]`` ground-truth token of each roll-in cell (pad outside).
        cell_rows, cell_pos: ``[M]`` sentence and position of each scored cell.
        candidates, valid: ``[M, C]`` scored tokens (column 0: ground truth).
        costs: ``[M, C]`` cost of each candidate's roll-out (inf if invalid),
            in ``--searnn-cost-unit``.
        rollin_cost: ``[B]`` library cost of each roll-in.
        reference_in, reference_out: ``[B]`` policy drawn per sequence.
        hyps: ``[P, W]`` the full output of every roll-out (prefix, token,
            continuation), for candidate ``hyp_cells``, ``hyp_columns`` ``[P]``.
        num_decoded: number of roll-outs decoded by the model.
    """

    rollin: Tensor
    gt: Tensor
    cell_rows: Tensor
    cell_pos: Tensor
    candidates: Tensor
    valid: Tensor
    costs: Tensor
    rollin_cost: Tensor
    reference_in: Tensor
    reference_out: Tensor
    hyps: Tensor
    hyp_cells: Tensor
    hyp_columns: Tensor
    num_decoded: int


@register_criterion("searnn_kl", dataclass=SearnnConfig)
class SearnnCriterion(SeqlevelCriterion):
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

    # -------------------------------------------------------------- search

    def _bleu1(self, hyp, refs, words: Optional[OutputView] = None):
        if words is not None:  # the task's end symbol as eos, stripped symbols out
            hyp, refs = words(hyp), words(refs)
        return rewards.sentence_bleu(hyp, refs, self.padding_idx, self.eos, max_order=1)

    def _reference_suffix(self, prefix, target, position, layout: OutputLayout):
        """The reference roll-out after ``prefix`` ``[m, position + 1]`` (the roll-in
        up to the cell and the cell's token): a suffix of the target's free part
        (after the task's forced prefix, which a suffix never repeats), ending
        with the task's end symbol."""
        forced, eos, pad = layout.prefix_len, layout.eos, self.padding_idx
        free = target[:, forced:]
        start = torch.full((prefix.size(0),), position + 1 - forced, dtype=torch.long, device=prefix.device)
        if self.best_suffix:
            view = layout.view
            score = self._bleu1
            if not view.identity:  # BLEU-1 of the words the task outputs (the prefix is left out)
                words = OutputView(0, view.end, view.strip, view.eos, view.pad)
                score = lambda hyp, refs: self._bleu1(hyp, refs, words)  # noqa: E731
            start = rollouts.best_suffix_starts(prefix[:, forced:], free, pad, eos, score, start)
        return rollouts.gather_suffix(free, start, pad, eos)

    def _allowed(self, layout: OutputLayout, device):
        """``[V]`` tokens that may be scored at a cell: the task's end symbol is a
        candidate as eos is (``--searnn-eos-candidate``)."""
        allowed = self.allowed.to(device)
        if layout.eos != self.eos:
            allowed = allowed.clone()
            allowed[layout.eos] = self.cfg.searnn_eos_candidate == "always"
        return allowed

    def _rollin(self, model, encoder_out, target, caps, reference_in, layout: OutputLayout):
        """Roll-in tokens ``[B, L]``: the target or the model's greedy output
        (from the task's start symbol, its forced prefix first)."""
        pad, eos = self.padding_idx, layout.eos
        learned = (~reference_in).nonzero(as_tuple=False).squeeze(1)
        rollin = target
        if learned.numel() > 0:
            enc = reorder_encoder_out(model, encoder_out, learned)
            greedy = rollouts.greedy_rollin(model, enc, caps.index_select(0, learned), pad, eos,
                                            bos=layout.bos.to(learned.device).index_select(0, learned),
                                            prefix=layout.prefix.to(learned.device).index_select(0, learned))
            width = max(target.size(1), greedy.size(1))
            rollin = pad_right(target, width, pad).index_copy(0, learned, pad_right(greedy, width, pad))
        used = int(rollin.ne(pad).sum(dim=1).max())
        return rollin[:, :used]

    def search(self, model, sample, layout: Optional[OutputLayout] = None) -> SearchResult:
        """Roll-ins, cells, tokens, roll-outs and costs (eval mode, no grad), in
        the task's output layout (default: ``self.output_layout``)."""
        if layout is None:
            layout = self.output_layout(model, sample)
        with eval_mode(model):
            return self._search(model, sample, layout)

    def _search(self, model, sample, layout: OutputLayout) -> SearchResult:
        cfg, pad, eos = self.cfg, self.padding_idx, layout.eos
        forced, bos = layout.prefix_len, layout.bos.to(sample["target"].device)
        reward = viewed(self.reward, layout.view)
        target, refs = sample["target"], references_of(sample)
        batch_size, device = target.size(0), target.device
        target_len = target.ne(pad).sum(dim=1)  # eos included
        caps = (target_len + cfg.searnn_max_len_b).clamp(max=max(int(model.max_decoder_positions()), 1))
        caps = torch.maximum(caps, target_len)
        reference_in = choose_reference(cfg.searnn_roll_in, batch_size, cfg.searnn_mix_prob, device)
        reference_out = choose_reference(cfg.searnn_roll_out, batch_size, cfg.searnn_mix_prob, device)
        encoder_out = encode(model, sample["net_input"])

        rollin = self._rollin(model, encoder_out, target, caps, reference_in, layout)
        lengths = rollin.ne(pad).sum(dim=1)
        gt = aligned_ground_truth(target, rollin, pad, eos)
        # the forced prefix is the task's, not the model's choice: no cell there
        cells = select_cells(lengths, cfg.searnn_cells, rollin.size(1), forced)
        cell_rows, cell_pos = cells.nonzero(as_tuple=True)
        num_cells = cell_rows.numel()
        cell_id = torch.full(cells.shape, -1, dtype=torch.long, device=device)
        cell_id[cell_rows, cell_pos] = torch.arange(num_cells, device=device)
        allowed = self._allowed(layout, device)

        k, w = cfg.searnn_tokens, cfg.searnn_neighbours if cfg.searnn_tokens > 0 else 0
        width = 1 + (int(allowed.sum()) if k == 0 else min(k, allowed.numel()) + 2 * w)
        candidates = torch.full((num_cells, width), pad, dtype=torch.long, device=device)
        valid = torch.zeros((num_cells, width), dtype=torch.bool, device=device)
        blocks, num_decoded = [], 0
        last = int(cell_pos.max()) if num_cells else -1
        for t, lprobs, state in rollouts.replay(model, encoder_out, rollin, pad, eos, bos):
            if t > last:
                break
            rows = cells[:, t].nonzero(as_tuple=False).squeeze(1)
            if rows.numel() == 0:
                continue
            ids = cell_id[rows, t]
            nb = nb_valid = None
            if w > 0:
                nb, nb_valid = neighbour_tokens(target.index_select(0, rows), t, w, pad)
            cand, ok = select_tokens(gt[rows, t], lprobs.index_select(0, rows), allowed, k,
                                     cfg.searnn_token_sampling, nb, nb_valid)
            candidates[ids], valid[ids] = cand, ok
            pair, column = ok.nonzero(as_tuple=True)
            pair_rows, tokens = rows[pair], cand[pair, column]
            prefix = torch.cat([rollin[pair_rows, :t], tokens.unsqueeze(1)], dim=1)
            go_on = tokens.ne(eos)
            suffixes = []
            by_reference = (go_on & reference_out[pair_rows]).nonzero(as_tuple=False).squeeze(1)
            if by_reference.numel() > 0:
                suffixes.append((by_reference, self._reference_suffix(
                    prefix[by_reference], target[pair_rows[by_reference]], t, layout)))
            learned_out = go_on & ~reference_out[pair_rows]
            # The greedy token of a learned roll-in continues as the roll-in did.
            own = learned_out & ~reference_in[pair_rows] & tokens.eq(rollin[pair_rows, t])
            if bool(own.any()):
                by_rollin = own.nonzero(as_tuple=False).squeeze(1)
                suffixes.append((by_rollin, rollin[pair_rows[by_rollin], t + 1:]))
            by_model = (learned_out & ~own).nonzero(as_tuple=False).squeeze(1)
            if by_model.numel() > 0:
                model_rows = pair_rows[by_model]
                num_decoded += model_rows.numel()
                expanded = rollouts.expand_incremental_state(model, state, model_rows)
                enc = reorder_encoder_out(model, encoder_out, model_rows)
                start = torch.cat([bos.index_select(0, model_rows).unsqueeze(1), prefix[by_model]], dim=1)
                suffixes.append((by_model, rollouts.greedy_continue(
                    model, enc, start, expanded, caps[model_rows], pad, eos)))
            cont_width = max([s.size(1) for _, s in suffixes], default=0)
            cont = prefix.new_full((prefix.size(0), cont_width), pad)
            for where, suffix in suffixes:
                cont[where, :suffix.size(1)] = suffix
            blocks.append((ids[pair], column, pair_rows, torch.cat([prefix, cont], dim=1)))

        # Every sentence has a cell (its roll-in has at least the end symbol after the
        # forced prefix): blocks is not empty.
        hyp_width = max(b[3].size(1) for b in blocks)
        hyp_cells, hyp_columns, hyp_rows, hyps = (torch.cat(x) for x in zip(
            *[(i, c, r, pad_right(h, hyp_width, pad)) for i, c, r, h in blocks]))
        costs = torch.full((num_cells, width), math.inf, device=device)
        costs[hyp_cells, hyp_columns] = reward.cost(hyps, refs.index_select(0, hyp_rows)).float()
        costs = scale_costs(costs, self._reference_length(target, layout).index_select(0, cell_rows),
                            cfg.searnn_cost_unit)
        rollin_cost = reward.cost(rollin, refs).float()
        return SearchResult(rollin, gt, cell_rows, cell_pos, candidates, valid, costs, rollin_cost,
                            reference_in, reference_out, hyps, hyp_cells, hyp_columns, num_decoded)

    def _reference_length(self, target, layout: OutputLayout):
        """``[B]`` |y*|: the words of the target the task outputs (no forced
        prefix, no end symbol), as the reward library counts them."""
        pad = self.padding_idx
        if layout.view.identity:
            return target.ne(pad).sum(dim=1) - 1
        return valid_token_mask(layout.view(target), pad, layout.view.eos).sum(dim=1)

    # ---------------------------------------------------------------- loss

    def forward(self, model, sample, reduce=True):
        layout = self.output_layout(model, sample)  # also makes self.reward score what the task outputs
        with worker_rng():  # roll-ins, cells, roll-out tokens: this worker's own draws
            found = self.search(model, sample, layout)
        # the loss pass is a stock forward of the wrapped model (data parallelism sees it)
        pad, w = self.padding_idx, self.cfg.searnn_mle_weight
        if w > 0:  # the reference beside each roll-in, in the same forward
            target = sample["target"]
            width = max(found.rollin.size(1), target.size(1))
            rows = torch.stack([pad_right(target, width, pad), pad_right(found.rollin, width, pad)], dim=1)
            both = rows_lprobs(model, sample["net_input"], rows.view(-1, width), 2, pad, layout.bos)
            ref_lprobs, lprobs = both.view(target.size(0), 2, width, -1).split([1, 1], dim=1)
            # per sentence: its mean token NLL, weighted below by its scored cells
            ref_nll = token_nll(ref_lprobs.squeeze(1), pad_right(target, width, pad), pad).sum(dim=1)
            ref_nll = ref_nll / target.ne(pad).sum(dim=1).clamp(min=1)
            lprobs = lprobs.squeeze(1)[:, :found.rollin.size(1)]
        else:
            prev = prev_output_tokens_from_target(found.rollin, pad, layout.bos)
            net_output = model(**{**sample["net_input"], "prev_output_tokens": prev})
            lprobs = model.get_normalized_probs(net_output, log_probs=True)
        cell_lprobs = lprobs[found.cell_rows, found.cell_pos]
        cand_lprobs = candidate_log_probs(cell_lprobs, found.candidates, found.valid,
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
        if w > 0:
            # each sentence's mean token NLL counts as many times as it has scored cells: a
            # sum over sentences (data parallelism splits it exactly), and at w = 1 with all
            # cells and reference roll-in, MLE
            cells_per_sentence = torch.bincount(found.cell_rows, minlength=ref_nll.size(0))
            loss = (1.0 - w) * loss + w * (cells_per_sentence * ref_nll).sum()
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
        log_mean(logging_outputs, "searnn_gt_best", "searnn_gt_best", "searnn_cells")
        log_mean(logging_outputs, "searnn_rollin_cost", "searnn_rollin_cost", "nsentences")
