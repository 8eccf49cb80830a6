"""Learning-to-search exploration (SeaRnn, Leblond et al. 2018): roll-ins, cells,
candidate tokens, roll-outs and the cost of every roll-out, without gradient.

:func:`search` takes what it needs explicitly: the model, the batch, its
:class:`~fairseq_seqlevel.decoding.layout.OutputLayout`, :class:`SearchSettings`,
the reward whose ``cost`` scores the roll-outs, and the tokens that may be
scored; it returns a :class:`SearchResult`.  Costs are the reward library's
(the caller rescales them).  The design (policies, cells, token sampling,
reference suffixes, the batched engine over :mod:`~fairseq_seqlevel.decoding.rollouts`)
is described in ``docs/criterions/searnn_kl.md``; ``searnn_kl`` is its user.
"""

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from fairseq_seqlevel import rewards
from fairseq_seqlevel.decoding import rollouts
from fairseq_seqlevel.decoding.gumbel import gumbel_topk
from fairseq_seqlevel.decoding.layout import OutputLayout
from fairseq_seqlevel.decoding.model import eval_mode
from fairseq_seqlevel.decoding.teacher_forcing import encode, pad_right, reorder_encoder_out
from fairseq_seqlevel.rewards._common import valid_token_mask
from fairseq_seqlevel.rewards.output_view import OutputView, viewed

#: weight of the uniform distribution in the ``biased`` token sampling.
BIASED_UNIFORM_WEIGHT = 0.5


@dataclass(frozen=True)
class SearchSettings:
    """How to search (the ``--searnn-*`` options of the same names)."""

    roll_in: str = "learned"      # reference | learned | mixed
    roll_out: str = "mixed"       # reference | learned | mixed
    mix_prob: float = 0.5         # mixed: probability of the reference policy for a sequence
    cells: int = 0                # N cells per sequence (0: all)
    tokens: int = 0               # K tokens per cell besides the ground truth (0: every allowed token)
    token_sampling: str = "topk"  # uniform | policy | biased | topk
    neighbours: int = 0           # w: ground-truth tokens within ±w positions (K > 0)
    max_len_b: int = 5            # learned roll-ins and roll-outs stop at len(target) + b
    eos_candidate: str = "always"  # always | gt: the task's end symbol as a candidate
    best_suffix: bool = False     # reference roll-out: best BLEU-1 target suffix, else copy


class SearchResult(NamedTuple):
    """Roll-ins, scored cells and cost vectors of a batch (no gradient).

    Attributes:
        rollin: ``[B, L]`` roll-in tokens (right-padded, ending in eos).
        gt: ``[B, L]`` ground-truth token of each roll-in cell (pad outside).
        cell_rows, cell_pos: ``[M]`` sentence and position of each scored cell.
        candidates, valid: ``[M, C]`` scored tokens (column 0: ground truth).
        costs: ``[M, C]`` cost of each candidate's roll-out (inf if invalid):
            the reward library's from :func:`search`, in ``--searnn-cost-unit``
            from the criterion's ``search``.
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


# ------------------------------------------------------- roll-ins, cells, tokens


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


def candidate_mask(allowed: Tensor, layout: OutputLayout, eos: int, eos_candidate: str, device) -> Tensor:
    """``[V]`` tokens that may be scored at a cell (``allowed``: the dictionary's,
    ``eos`` its eos): the task's end symbol is a candidate as eos is
    (``eos_candidate``)."""
    allowed = allowed.to(device)
    if layout.eos != eos:
        allowed = allowed.clone()
        allowed[layout.eos] = eos_candidate == "always"
    return allowed


def reference_length(target: Tensor, layout: OutputLayout, pad: int) -> Tensor:
    """``[B]`` |y*|: the words of the target the task outputs (no forced
    prefix, no end symbol), as the reward library counts them."""
    if layout.view.identity:
        return target.ne(pad).sum(dim=1) - 1
    return valid_token_mask(layout.view(target), pad, layout.view.eos).sum(dim=1)


# ------------------------------------------------------------------ roll-outs


def _bleu1(hyp, refs, pad: int, eos: int, words: Optional[OutputView] = None):
    if words is not None:  # the task's end symbol as eos, stripped symbols out
        hyp, refs = words(hyp), words(refs)
    return rewards.sentence_bleu(hyp, refs, pad, eos, max_order=1)


def reference_suffix(prefix, target, position, layout: OutputLayout, pad: int, eos: int, best_suffix: bool):
    """The reference roll-out after ``prefix`` ``[m, position + 1]`` (the roll-in
    up to the cell and the cell's token): a suffix of the target's free part
    (after the task's forced prefix, which a suffix never repeats), ending
    with the task's end symbol; ``best_suffix``: the one maximizing BLEU-1
    (scored with the dictionary's ``eos``), else the copy ``target[t+1:]``."""
    forced, end = layout.prefix_len, layout.eos
    free = target[:, forced:]
    start = torch.full((prefix.size(0),), position + 1 - forced, dtype=torch.long, device=prefix.device)
    if best_suffix:
        view = layout.view
        words = None
        if not view.identity:  # BLEU-1 of the words the task outputs (the prefix is left out)
            words = OutputView(0, view.end, view.strip, view.eos, view.pad)
        score = lambda hyp, refs: _bleu1(hyp, refs, pad, eos, words)  # noqa: E731
        start = rollouts.best_suffix_starts(prefix[:, forced:], free, pad, end, score, start)
    return rollouts.gather_suffix(free, start, pad, end)


def roll_in(model, encoder_out, target, caps, reference_in, layout: OutputLayout, pad: int):
    """Roll-in tokens ``[B, L]``: the target or the model's greedy output
    (from the task's start symbol, its forced prefix first)."""
    eos = layout.eos
    learned = (~reference_in).nonzero(as_tuple=False).squeeze(1)
    rows = target
    if learned.numel() > 0:
        enc = reorder_encoder_out(model, encoder_out, learned)
        greedy = rollouts.greedy_rollin(model, enc, caps.index_select(0, learned), pad, eos,
                                        bos=layout.bos.to(learned.device).index_select(0, learned),
                                        prefix=layout.prefix.to(learned.device).index_select(0, learned))
        width = max(target.size(1), greedy.size(1))
        rows = pad_right(target, width, pad).index_copy(0, learned, pad_right(greedy, width, pad))
    used = int(rows.ne(pad).sum(dim=1).max())
    return rows[:, :used]


# --------------------------------------------------------------------- search


def search(model, sample, refs: Tensor, layout: OutputLayout, settings: SearchSettings, reward,
           allowed: Tensor, pad: int, eos: int) -> SearchResult:
    """Roll-ins, cells, tokens, roll-outs and library costs of ``sample`` (eval
    mode, no grad).  ``refs`` ``[B, R, T]``: the references the costs use (the
    target is the first); ``reward``: scores the roll-outs (``reward.cost``) in
    the task's output view; ``allowed`` ``[V]``: the tokens that may be scored
    (:func:`candidate_mask` adds the task's end symbol); ``pad``, ``eos``: the
    dictionary's."""
    with eval_mode(model):
        return _search(model, sample, refs, layout, settings, reward, allowed, pad, eos)


def _search(model, sample, refs, layout, cfg: SearchSettings, reward, allowed, pad, dict_eos) -> SearchResult:
    eos, forced = layout.eos, layout.prefix_len
    bos = layout.bos.to(sample["target"].device)
    reward = viewed(reward, layout.view)
    target = sample["target"]
    batch_size, device = target.size(0), target.device
    target_len = target.ne(pad).sum(dim=1)  # eos included
    caps = (target_len + cfg.max_len_b).clamp(max=max(int(model.max_decoder_positions()), 1))
    caps = torch.maximum(caps, target_len)
    reference_in = choose_reference(cfg.roll_in, batch_size, cfg.mix_prob, device)
    reference_out = choose_reference(cfg.roll_out, batch_size, cfg.mix_prob, device)
    encoder_out = encode(model, sample["net_input"])

    rolled = roll_in(model, encoder_out, target, caps, reference_in, layout, pad)
    lengths = rolled.ne(pad).sum(dim=1)
    gt = aligned_ground_truth(target, rolled, pad, eos)
    # the forced prefix is the task's, not the model's choice: no cell there
    cells = select_cells(lengths, cfg.cells, rolled.size(1), forced)
    cell_rows, cell_pos = cells.nonzero(as_tuple=True)
    num_cells = cell_rows.numel()
    cell_id = torch.full(cells.shape, -1, dtype=torch.long, device=device)
    cell_id[cell_rows, cell_pos] = torch.arange(num_cells, device=device)
    allowed = candidate_mask(allowed, layout, dict_eos, cfg.eos_candidate, device)

    k, w = cfg.tokens, cfg.neighbours if cfg.tokens > 0 else 0
    width = 1 + (int(allowed.sum()) if k == 0 else min(k, allowed.numel()) + 2 * w)
    candidates = torch.full((num_cells, width), pad, dtype=torch.long, device=device)
    valid = torch.zeros((num_cells, width), dtype=torch.bool, device=device)
    blocks, num_decoded = [], 0
    last = int(cell_pos.max()) if num_cells else -1
    for t, lprobs, state in rollouts.replay(model, encoder_out, rolled, pad, eos, bos):
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
                                 cfg.token_sampling, nb, nb_valid)
        candidates[ids], valid[ids] = cand, ok
        pair, column = ok.nonzero(as_tuple=True)
        pair_rows, tokens = rows[pair], cand[pair, column]
        prefix = torch.cat([rolled[pair_rows, :t], tokens.unsqueeze(1)], dim=1)
        go_on = tokens.ne(eos)
        suffixes = []
        by_reference = (go_on & reference_out[pair_rows]).nonzero(as_tuple=False).squeeze(1)
        if by_reference.numel() > 0:
            suffixes.append((by_reference, reference_suffix(
                prefix[by_reference], target[pair_rows[by_reference]], t, layout, pad, dict_eos,
                cfg.best_suffix)))
        learned_out = go_on & ~reference_out[pair_rows]
        # The greedy token of a learned roll-in continues as the roll-in did.
        own = learned_out & ~reference_in[pair_rows] & tokens.eq(rolled[pair_rows, t])
        if bool(own.any()):
            by_rollin = own.nonzero(as_tuple=False).squeeze(1)
            suffixes.append((by_rollin, rolled[pair_rows[by_rollin], t + 1:]))
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
    rollin_cost = reward.cost(rolled, refs).float()
    return SearchResult(rolled, gt, cell_rows, cell_pos, candidates, valid, costs, rollin_cost,
                        reference_in, reference_out, hyps, hyp_cells, hyp_columns, num_decoded)
