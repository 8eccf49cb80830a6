"""Batched BLEU on token-id tensors, equal to sacrebleu on space-joined ids.

Like sacrebleu: ``bleu_stats`` / ``prefix_bleu_stats`` compute sufficient
statistics and ``bleu_from_stats`` turns them into scores (corpus BLEU:
``corpus_bleu_from_stats`` of summed statistics).  ``smooth="add1-all"`` is
the ERAC/VAML smoothing (add-1 on every order, no effective order), so every
non-empty hypothesis gets a positive score.

Design: docs/rewards.md, "BLEU".
"""

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ._common import (as_multi_reference, check_batch, closest_reference_length,
                      present_references, valid_token_mask)
from .ngrams import clipped_match_indicators

#: sacrebleu's default smoothing values (``BLEU.SMOOTH_DEFAULTS``).
SMOOTH_DEFAULTS = {"exp": None, "floor": 0.1, "add-k": 1, "none": None, "add1-all": None}
SMOOTH_METHODS = tuple(SMOOTH_DEFAULTS)


class BleuStats(NamedTuple):
    """BLEU sufficient statistics; any common leading shape ``S`` (``[B]`` for
    sentences, ``[B, T]`` for prefixes, ``[]`` for a corpus)."""

    matches: Tensor  # LongTensor [*S, max_order]: clipped n-gram matches
    totals: Tensor   # LongTensor [*S, max_order]: hypothesis n-gram counts
    hyp_len: Tensor  # LongTensor [*S]
    ref_len: Tensor  # LongTensor [*S]: closest reference length

    def sum(self) -> "BleuStats":
        """Corpus statistics: every field summed over all leading dims."""
        return BleuStats(self.matches.reshape(-1, self.matches.size(-1)).sum(0),
                         self.totals.reshape(-1, self.totals.size(-1)).sum(0),
                         self.hyp_len.sum(), self.ref_len.sum())


class _Prepared(NamedTuple):
    indicators: Tensor  # BoolTensor [max_order, B, T], end-position indexed
    hyp_len: Tensor    # [B]
    ref_lens: Tensor   # [B, R]
    present: Tensor    # [B, R]


def _prepare(hyp: Tensor, ref: Tensor, pad: int, eos: Optional[int], max_order: int,
             method: str, budget: Optional[int]) -> _Prepared:
    check_batch(hyp, ref)
    refs = as_multi_reference(ref)
    hyp_mask = valid_token_mask(hyp, pad, eos)
    ref_mask = valid_token_mask(refs, pad, eos)
    ref_lens = ref_mask.sum(-1)
    indicators = clipped_match_indicators(hyp, refs, hyp_mask, ref_mask, max_order,
                                          method=method, budget=budget)
    return _Prepared(indicators, hyp_mask.sum(-1), ref_lens, present_references(ref_lens))


def _ngram_totals(lengths: Tensor, max_order: int) -> Tensor:
    """Number of n-grams of a length-L sentence: max(L - n + 1, 0), n=1..N.

    ``[*S] -> [*S, N]``, laid out so that each order's slice is contiguous.
    """
    orders = torch.arange(max_order, device=lengths.device).view((-1,) + (1,) * lengths.dim())
    return (lengths.unsqueeze(0) - orders).clamp(min=0).movedim(0, -1)


def bleu_stats(hyp: Tensor, ref: Tensor, pad: int, eos: Optional[int] = None, max_order: int = 4,
               method: str = "bitset", budget: Optional[int] = None) -> BleuStats:
    """Sentence-level BLEU statistics (sacrebleu's ``_compute_segment_statistics``).

    Args:
        hyp: LongTensor ``[B, T]``; ref: ``[B, T']`` or ``[B, R, T']``
            (see :mod:`._common` for padding/eos/absent-reference rules).
        method, budget: n-gram counting backend and its per-chunk element
            budget (see :mod:`.ngrams`); results do not depend on them.
    Returns:
        :class:`BleuStats` with leading shape ``[B]``.
    Memory:
        O(B * max_order * (R+1) * T * ceil(max(T, T')/56)) int64 words with
        the default bitset counting, chunked over the batch above
        ``PAIRWISE_ELEMENT_BUDGET``.
    """
    prep = _prepare(hyp, ref, pad, eos, max_order, method, budget)
    matches = prep.indicators.sum(-1).transpose(0, 1)  # [B, N], order slices contiguous
    return BleuStats(matches, _ngram_totals(prep.hyp_len, max_order), prep.hyp_len,
                     closest_reference_length(prep.hyp_len, prep.ref_lens, prep.present))


def prefix_bleu_stats(hyp: Tensor, ref: Tensor, pad: int, eos: Optional[int] = None, max_order: int = 4,
                      method: str = "bitset", budget: Optional[int] = None) -> BleuStats:
    """BLEU statistics of every hypothesis prefix ``hyp[:, :t+1]`` at once.

    Clipped matches of a prefix are cumulative sums of per-position match
    indicators (see :mod:`.ngrams`).  Prefixes reaching past the sentence end
    (pad, or first eos) equal the full sentence.

    Returns:
        :class:`BleuStats` with leading shape ``[B, T]``.
    Memory:
        O(B * T * (max_order + R)) plus the counting cost of :func:`bleu_stats`.
    """
    prep = _prepare(hyp, ref, pad, eos, max_order, method, budget)
    matches = prep.indicators.cumsum(-1).permute(1, 2, 0)  # [B, T, N]
    positions = torch.arange(1, hyp.size(-1) + 1, device=hyp.device)
    prefix_len = torch.minimum(positions.unsqueeze(0), prep.hyp_len.unsqueeze(-1))  # [B, T]
    return BleuStats(matches, _ngram_totals(prefix_len, max_order), prefix_len,
                     closest_reference_length(prefix_len, prep.ref_lens, prep.present))


def _brevity_penalty(hyp_len: Tensor, ref_len: Tensor) -> Tensor:
    """sacrebleu's BP: 1 if hyp >= ref, exp(1 - ref/hyp) if 0 < hyp < ref, else 0."""
    penalty = torch.exp(1.0 - ref_len / hyp_len.clamp(min=1.0))
    penalty.masked_fill_(hyp_len == 0, 0.0)
    return penalty.masked_fill_(hyp_len >= ref_len, 1.0)


def _order_statistics(stats: BleuStats):
    """Yield ``(n, matches, totals)`` per order as float64 tensors of shape S.

    Looping over the (few) orders keeps every operation on contiguous
    ``S``-shaped tensors, which is much faster than ``[*S, N]`` tensors with
    a tiny last dimension.
    """
    for n in range(stats.matches.size(-1)):
        # Copies: the caller modifies them in place.
        yield (n, stats.matches[..., n].to(torch.float64, copy=True),
               stats.totals[..., n].to(torch.float64, copy=True))


def _add1_all_bleu(stats: BleuStats, brevity_penalty: Tensor) -> Tensor:
    """ERAC/VAML smoothing (module docstring): BP * geo-mean of (m+1)/(c+1)."""
    log_sum = torch.zeros_like(brevity_penalty)
    for _, matches, totals in _order_statistics(stats):
        log_sum += torch.log((matches + 1.0) / (totals + 1.0))
    return brevity_penalty * torch.exp(log_sum / stats.matches.size(-1))


def bleu_from_stats(stats: BleuStats, smooth: str = "exp", smooth_value: Optional[float] = None,
                    effective_order: bool = True) -> Tensor:
    """BLEU in [0, 1] from statistics: a vectorized sacrebleu ``compute_bleu``.

    Args:
        stats: :class:`BleuStats` with any leading shape ``S``.
        smooth: "exp", "floor", "add-k", "none" (sacrebleu) or "add1-all".
        smooth_value: for floor / add-k; None -> sacrebleu defaults (0.1 / 1).
        effective_order: sacrebleu's flag (True for sentence BLEU, sacrebleu's
            corpus default is False); ignored by "add1-all".
    Returns:
        DoubleTensor ``S``.
    """
    if smooth not in SMOOTH_DEFAULTS:
        raise ValueError(f"unknown smooth {smooth!r}; expected one of {SMOOTH_METHODS}")
    if smooth_value is None:
        smooth_value = SMOOTH_DEFAULTS[smooth]
    brevity_penalty = _brevity_penalty(stats.hyp_len.double(), stats.ref_len.double())
    if smooth == "add1-all":
        return _add1_all_bleu(stats, brevity_penalty)

    log_sum = torch.zeros_like(brevity_penalty)       # sum of log precisions (as fractions)
    num_orders = torch.zeros_like(brevity_penalty)    # effective order
    active = torch.ones_like(brevity_penalty, dtype=torch.bool)
    zero_orders = torch.zeros_like(brevity_penalty)   # exp smoothing's k
    for n, matches, totals in _order_statistics(stats):
        if smooth == "add-k" and n > 0:  # add-k leaves unigrams alone
            matches += smooth_value
            totals += smooth_value
        active &= totals > 0  # sacrebleu's loop breaks at the first order without n-grams
        no_match = matches == 0
        if smooth == "exp":
            # NIST: the k-th order without matches gets precision 1 / (2^k * total).
            zero_orders += no_match & active
            matches += no_match * torch.pow(0.5, zero_orders)
        elif smooth == "floor":
            matches += no_match * smooth_value
        # "none"/"add-k" without matches: log(0) = -inf, like sacrebleu's
        # floored my_log(0) it makes the score exactly 0.
        log_precision = torch.log(matches / totals)
        if effective_order:
            log_sum += log_precision.masked_fill_(~active, 0.0)
            num_orders += active
        else:  # orders after the break keep precision 0
            log_sum += log_precision.masked_fill_(~active, -math.inf)
    if not effective_order:
        num_orders.fill_(stats.matches.size(-1))
    score = brevity_penalty * torch.exp(log_sum / num_orders.clamp(min=1.0))
    # sacrebleu's "early stop if there are no matches" (checked before add-k).
    return score.masked_fill_(stats.matches.amax(-1) == 0, 0.0)


def corpus_bleu_from_stats(stats: BleuStats, smooth: str = "exp", smooth_value: Optional[float] = None,
                           effective_order: bool = False) -> Tensor:
    """Corpus BLEU in [0, 1] (scalar DoubleTensor) from per-sentence statistics.

    Equals ``sacrebleu.metrics.BLEU(tokenize="none", smooth_method=smooth,
    effective_order=effective_order).corpus_score(...).score / 100``;
    sacrebleu's corpus default is ``effective_order=False``.
    """
    return bleu_from_stats(stats.sum(), smooth, smooth_value, effective_order)


def sentence_bleu(hyp: Tensor, ref: Tensor, pad: int, eos: Optional[int] = None, max_order: int = 4,
                  smooth: str = "exp") -> Tensor:
    """Per-sentence BLEU in [0, 1], equal to sacrebleu sentence BLEU with
    ``tokenize="none", effective_order=True`` (see module docstring).

    Args:
        hyp: LongTensor ``[B, T]``, right-padded with ``pad``.
        ref: LongTensor ``[B, T']`` or ``[B, R, T']`` (all-pad rows of the
            3-d layout are absent references).
        eos: if given, tokens from the first ``eos`` on are ignored.
        smooth: "exp", "floor", "add-k", "none" or "add1-all".
    Returns:
        FloatTensor ``[B]`` on ``hyp``'s device.
    Memory / time:
        See :func:`bleu_stats`: about B * 4 * (R+1) * T int64 words for
        sentences up to 56 tokens, processed in chunks of rows of at most
        ``PAIRWISE_ELEMENT_BUDGET`` (2^18) words.  A few host syncs per call
        (two per chunk of rows, to trim padding and size the exact token
        renumbering), none per sentence.
    """
    return bleu_from_stats(bleu_stats(hyp, ref, pad, eos, max_order), smooth).float()


def prefix_bleu(hyp: Tensor, ref: Tensor, pad: int, eos: Optional[int] = None, max_order: int = 4,
                smooth: str = "exp") -> Tensor:
    """BLEU of every hypothesis prefix treated as a finished sentence.

    Entry ``[b, t]`` equals ``sentence_bleu(hyp[:, :t+1], ref, ...)[b]``.
    Positions at or after the end of hypothesis ``b`` (its first pad, or first
    eos when ``eos`` is given) hold the full sentence's BLEU.  Computed in one
    pass from cumulative clipped match counts, not T calls.

    Returns:
        FloatTensor ``[B, T]``.
    Memory:
        O(B * T * (max_order + R)) on top of :func:`sentence_bleu`'s.
    """
    return bleu_from_stats(prefix_bleu_stats(hyp, ref, pad, eos, max_order), smooth).float()

