"""Exact, batched n-gram match counting with sacrebleu's clipping.

The k-th occurrence of an n-gram in the hypothesis is a match iff
``k <= max_r count_ref_r(g)``; summing per position gives sacrebleu's clipped
count, and a cumulative sum gives every prefix's (for ``prefix_bleu``).
Backends: ``"bitset"`` (default, int64 bitsets) and ``"pairwise"`` (a simple
cross-check); both exact, in row chunks under ``PAIRWISE_ELEMENT_BUDGET``.

Design: docs/rewards.md, "N-gram matching".
"""

import functools
from typing import Optional

import torch
from torch import Tensor

from ._common import DIRECT_ID_LIMIT, chunk_rows, equal_token_bitsets

#: Max elements of the largest per-chunk intermediate (bitset words or
#: pairwise booleans); larger batches are processed in chunks of rows.
#: 2^18 int64 words (2 MiB) keeps the bitset working set cache-sized, which
#: measured fastest on CPU; results never depend on it.
PAIRWISE_ELEMENT_BUDGET = 1 << 18

COUNTING_METHODS = ("bitset", "pairwise")

#: Codes / keys stay below this so ``code * base + token`` never overflows int64.
_CODE_LIMIT = 1 << 62

# Bitsets use 56 of the 64 bits of a word: values stay non-negative (no sign
# bit under shifts) and the popcount's final byte fold cannot overflow.
_WORD_BITS = 56
_WORD_MASK = (1 << _WORD_BITS) - 1


def _end_position_valid(hyp_mask: Tensor, max_order: int) -> Tensor:
    """``[N, B, T]``: the n-gram ending at ``t`` exists (t >= n-1, token valid)."""
    length = hyp_mask.size(-1)
    orders = torch.arange(max_order, device=hyp_mask.device).view(-1, 1, 1)
    long_enough = torch.arange(length, device=hyp_mask.device).view(1, 1, -1) >= orders
    # Masks are prefixes, so an n-gram is valid iff its last token is.
    return long_enough & hyp_mask.unsqueeze(0)


# -------------------------------------------------------------- bitset backend

def _row_local_ids(tokens: Tensor, max_id: int) -> Tensor:
    """Rename the ids of each row to ``0..L-1`` (equal <=> equal within the row).

    Args:
        tokens: LongTensor ``[B, L]`` of ids in ``[0, max_id]``.
    Returns:
        LongTensor ``[B, L]``.
    """
    batch = tokens.size(0)
    base = 1 + max_id
    if batch * base > _CODE_LIMIT:  # huge ids (e.g. hashed words): densify first
        tokens = torch.unique(tokens, return_inverse=True)[1]
        base = tokens.numel() + 1
    rows = torch.arange(batch, device=tokens.device)
    # Keys sort by row first, so each row's unique ids are a contiguous range.
    keys = tokens + rows.unsqueeze(1) * base
    if batch * base < (1 << 31):
        keys, rows = keys.int(), rows.int()  # sorting int32 keys is ~2-3x faster
    unique_keys, inverse = torch.unique(keys, return_inverse=True)
    row_start = torch.searchsorted(unique_keys // base, rows)  # first unique id of each row
    return inverse - row_start.unsqueeze(1)


def _shift_bits_down(words: Tensor, shift: int) -> Tensor:
    """Bit ``j`` of the result = bit ``j + shift`` of ``words [..., W]`` (0 < shift < 56)."""
    out = words >> shift
    if words.size(-1) > 1:  # carry bits in from the next word
        out[..., :-1] |= (words[..., 1:] << (_WORD_BITS - shift)) & _WORD_MASK
    return out


def _popcount_(words: Tensor) -> Tensor:
    """Number of set bits of each int64 in ``[0, 2^56)``, computed in place
    (SWAR bit tricks; in-place ops avoid re-allocating large tensors)."""
    scratch = words >> 1
    words -= scratch.bitwise_and_(0x5555555555555555)
    torch.bitwise_right_shift(words, 2, out=scratch)
    words.bitwise_and_(0x3333333333333333).add_(scratch.bitwise_and_(0x3333333333333333))
    torch.bitwise_right_shift(words, 4, out=scratch)
    words.add_(scratch).bitwise_and_(0x0F0F0F0F0F0F0F0F)  # per-byte counts <= 8
    for shift in (8, 16, 32):  # fold the 7 byte counts into the lowest byte
        words.add_(torch.bitwise_right_shift(words, shift, out=scratch))
    return words.bitwise_and_(0x7F)


@functools.lru_cache(maxsize=64)
def _low_bits(length: int, num_words: int, device: torch.device) -> Tensor:
    """``[length, W]`` bitsets with bits ``0..i`` set in row ``i``."""
    j = torch.arange(num_words * _WORD_BITS, device=device)
    below = j.unsqueeze(0) <= torch.arange(length, device=device).unsqueeze(1)
    return (below.long() << (j % _WORD_BITS)).view(length, num_words, _WORD_BITS).sum(-1)


def _unigram_bitsets(hyp: Tensor, hyp_mask: Tensor, refs: Tensor, ref_mask: Tensor) -> Tensor:
    """Position bitsets of each hypothesis token in every sequence.

    Args:
        hyp: LongTensor ``[B, T]`` (non-negative ids); refs ``[B, R, T']``;
            masks of valid tokens alongside.
    Returns:
        LongTensor ``[B, R+1, T, W]`` with ``W = ceil(max(T, T') / 56)``;
        sequence 0 is the hypothesis, 1..R the references.  Bit ``j`` of
        ``[b, k, i]`` is set iff position ``j`` of sequence ``k`` is valid and
        holds the same token as hypothesis position ``i``.
    """
    batch, length = hyp.shape
    num_refs, ref_length = refs.shape[1:]
    width = max(length, ref_length)
    max_id = int(torch.cat([hyp.reshape(-1), refs.reshape(-1)]).max())  # one host sync per call (hyp is not empty)
    if max_id >= DIRECT_ID_LIMIT:  # hashed word ids: per-row names 0..T+R*T'-1 keep the tables small
        local = _row_local_ids(torch.cat([hyp, refs.reshape(batch, -1)], dim=1), max_id)
        hyp, refs = local[:, :length], local[:, length:].view(refs.shape)
        max_id = local.size(1) - 1
    # rows (b, k): the hypothesis queried against sequence k, all padded to one width
    keys = torch.cat([torch.nn.functional.pad(hyp, (0, width - length)).unsqueeze(1),
                      torch.nn.functional.pad(refs, (0, width - ref_length))], dim=1)
    key_mask = torch.cat([torch.nn.functional.pad(hyp_mask, (0, width - length)).unsqueeze(1),
                          torch.nn.functional.pad(ref_mask, (0, width - ref_length))], dim=1)
    query = hyp.unsqueeze(1).expand(batch, num_refs + 1, length)
    bitsets = equal_token_bitsets(query.reshape(-1, length), keys.view(-1, width), _WORD_BITS,
                                  key_mask.view(-1, width), max_id=max_id)
    return bitsets.view(batch, num_refs + 1, length, -1)


def _bitset_ranks_and_counts(hyp: Tensor, hyp_mask: Tensor, refs: Tensor, ref_mask: Tensor, max_order: int):
    """Occurrence ranks and max reference counts, ``[N, B, T]`` each, of the
    n-gram ending at every hypothesis position (garbage where invalid)."""
    length = hyp.size(1)
    unigram = _unigram_bitsets(hyp, hyp_mask, refs, ref_mask)  # [B, K, T, W]

    # by_order[n-1][b, k, t]: start positions j in sequence k of the n-grams
    # equal to the hypothesis n-gram ending at t.  Recurrence on end
    # positions: order n at t = order n-1 at t-1 AND unigram at t shifted by n-1.
    by_order = unigram.new_empty((max_order,) + unigram.shape)
    by_order[0].copy_(unigram)
    # For the rank only earlier-or-same occurrences count: j <= start of the
    # n-gram.  Masking order 1 suffices, the recurrence keeps the property.
    by_order[0, :, 0] &= _low_bits(length, unigram.size(-1), hyp.device)
    for n in range(2, max_order + 1):
        by_order[n - 1, :, :, : n - 1] = 0  # no n-gram ends before position n-1
        if length >= n:
            shifted = _shift_bits_down(unigram[:, :, n - 1:], n - 1)
            torch.bitwise_and(by_order[n - 2, :, :, n - 2:-1], shifted, out=by_order[n - 1, :, :, n - 1:])
    counts = _popcount_(by_order)
    counts = counts.squeeze(-1) if counts.size(-1) == 1 else counts.sum(-1)  # [N, B, K, T]
    return counts[:, :, 0], counts[:, :, 1:].amax(dim=2)


def _bitset_matches(hyp: Tensor, hyp_mask: Tensor, refs: Tensor, ref_mask: Tensor, max_order: int) -> Tensor:
    ranks, ref_counts = _bitset_ranks_and_counts(hyp, hyp_mask, refs, ref_mask, max_order)
    return (ranks <= ref_counts) & _end_position_valid(hyp_mask, max_order)


# ------------------------------------------------------------ pairwise backend

def _renumber_densely(hyp_codes: Tensor, ref_codes: Tensor):
    """Map the codes of both tensors jointly onto ``0..U-1``; returns (hyp, ref, U)."""
    joint = torch.cat([hyp_codes.reshape(-1), ref_codes.reshape(-1)])
    uniq, inverse = torch.unique(joint, return_inverse=True)
    split = hyp_codes.numel()
    return inverse[:split].view(hyp_codes.shape), inverse[split:].view(ref_codes.shape), max(1, uniq.numel())


def ngram_codes(hyp_tokens: Tensor, ref_tokens: Tensor, max_order: int):
    """Exact integer codes of all n-grams, n = 1..max_order.

    Args:
        hyp_tokens: LongTensor ``[B, T]`` of non-negative ids.
        ref_tokens: LongTensor ``[B, R, T']``, same convention.
    Yields:
        ``(n, hyp_codes [B, T-n+1], ref_codes [B, R, T'-n+1])`` indexed by
        n-gram start position; equal codes <=> equal n-grams (within the call).
    """
    base = 1 + max([int(t.max()) for t in (hyp_tokens, ref_tokens) if t.numel()] + [0])
    if base * base > _CODE_LIMIT:  # huge ids: renumber before packing
        hyp_tokens, ref_tokens, base = _renumber_densely(hyp_tokens, ref_tokens)
    hyp_codes, ref_codes, bound = hyp_tokens, ref_tokens, base
    yield 1, hyp_codes, ref_codes
    for n in range(2, max_order + 1):
        if bound * base > _CODE_LIMIT:
            hyp_codes, ref_codes, bound = _renumber_densely(hyp_codes, ref_codes)
        hyp_codes = hyp_codes[..., :-1] * base + hyp_tokens[..., n - 1:]
        ref_codes = ref_codes[..., :-1] * base + ref_tokens[..., n - 1:]
        bound *= base
        yield n, hyp_codes, ref_codes


def occurrence_rank_pairwise(codes: Tensor) -> Tensor:
    """1-based rank of each code among equal codes at or before its position.

    ``[N, L] -> [N, L]`` via an ``[N, L, L]`` comparison; e.g. ``[7, 3, 7, 7] -> [1, 1, 2, 3]``.
    """
    length = codes.size(-1)
    same = codes.unsqueeze(-1) == codes.unsqueeze(-2)  # [N, L(query), L(earlier)]
    earlier_or_self = torch.ones(length, length, dtype=torch.bool, device=codes.device).tril()
    return (same & earlier_or_self).sum(dim=-1)


def max_reference_count_pairwise(hyp_codes: Tensor, ref_codes: Tensor) -> Tensor:
    """``[B, L]``: max over references of the count of each hypothesis code,
    via ``[B, R, L, L']`` booleans (``ref_codes``: ``[B, R, L']``)."""
    if ref_codes.size(-1) == 0 or hyp_codes.size(-1) == 0:
        return torch.zeros_like(hyp_codes)
    same = hyp_codes[:, None, :, None] == ref_codes[:, :, None, :]
    return same.sum(dim=-1).max(dim=1).values


def _pairwise_matches(hyp: Tensor, hyp_mask: Tensor, refs: Tensor, ref_mask: Tensor, max_order: int) -> Tensor:
    length = hyp.size(-1)
    matches = []
    for n, hyp_codes, ref_codes in ngram_codes(hyp, refs, max_order):
        # Invalid n-grams get codes that match nothing (valid codes are >= 0).
        hyp_codes = hyp_codes.masked_fill(~hyp_mask[..., n - 1:], -1)
        ref_codes = ref_codes.masked_fill(~ref_mask[..., n - 1:], -2)
        match = occurrence_rank_pairwise(hyp_codes) <= max_reference_count_pairwise(hyp_codes, ref_codes)
        # Re-index by end position: the first n-1 positions end no n-gram.
        matches.append(torch.nn.functional.pad(match, (n - 1, 0), value=False)[..., :length])
    return torch.stack(matches) & _end_position_valid(hyp_mask, max_order)


# ------------------------------------------------------------------ public API

def _elements_per_row(method: str, length: int, num_refs: int, ref_length: int, max_order: int) -> int:
    """Size of the largest intermediate per batch row."""
    if method == "bitset":
        words = -(-max(length, ref_length, 1) // _WORD_BITS)
        return max_order * (num_refs + 1) * length * words
    return length * (length + num_refs * ref_length)


def clipped_match_indicators(
    hyp: Tensor,
    refs: Tensor,
    hyp_mask: Tensor,
    ref_mask: Tensor,
    max_order: int = 4,
    method: str = "bitset",
    budget: Optional[int] = None,
) -> Tensor:
    """Per-position clipped n-gram match indicators.

    Args:
        hyp: LongTensor ``[B, T]``; ``hyp_mask`` BoolTensor ``[B, T]`` (valid
            tokens, a prefix of each row).
        refs: LongTensor ``[B, R, T']``; ``ref_mask`` BoolTensor ``[B, R, T']``.
        method: ``"bitset"`` or ``"pairwise"`` (see module docstring).
        budget: max elements of the largest intermediate per chunk of rows
            (defaults to :data:`PAIRWISE_ELEMENT_BUDGET`).
    Returns:
        BoolTensor ``[max_order, B, T]``; entry ``[n-1, b, t]`` is True iff the
        n-gram *ending* at position ``t`` is valid and its occurrence rank is
        within the clip, so ``.sum(-1)`` gives sacrebleu's clipped match
        counts and ``.cumsum(-1)`` those of every prefix.
    Memory:
        ``"bitset"``: O(B * max_order * (R+1) * T * ceil(max(T, T')/56)) int64
        words; ``"pairwise"``: O(B * T * (T + R*T')) booleans per order;
        both capped by chunking the batch to ``budget`` elements.
    """
    if method not in COUNTING_METHODS:
        raise ValueError(f"unknown counting method {method!r}; expected one of {COUNTING_METHODS}")
    if method == "bitset" and max_order > _WORD_BITS:
        method = "pairwise"  # bit shifts by n-1 must stay within one word
    budget = PAIRWISE_ELEMENT_BUDGET if budget is None else budget
    batch, length = hyp.shape
    if batch == 0 or length == 0:
        return torch.zeros(max_order, batch, length, dtype=torch.bool, device=hyp.device)
    # Neutralise invalid tokens (e.g. a negative pad id) so ids stay >= 0.
    hyp = torch.where(hyp_mask, hyp.long(), 0)
    refs = torch.where(ref_mask, refs.long(), 0)
    counting = _bitset_matches if method == "bitset" else _pairwise_matches
    per_row = _elements_per_row(method, length, refs.size(1), refs.size(2), max_order)
    chunks = chunk_rows(batch, per_row, budget)
    if len(chunks) == 1:
        return _count_without_padding(counting, hyp, hyp_mask, refs, ref_mask, max_order)
    # Chunks of similar hypothesis lengths waste less work on padding.
    order = torch.argsort(hyp_mask.sum(-1))
    pieces = [_count_without_padding(counting, hyp[rows], hyp_mask[rows], refs[rows], ref_mask[rows], max_order)
              for rows in (order[c] for c in chunks)]
    return torch.cat(pieces, dim=1)[:, torch.argsort(order)]


def _count_without_padding(counting, hyp: Tensor, hyp_mask: Tensor, refs: Tensor, ref_mask: Tensor,
                           max_order: int) -> Tensor:
    """Run ``counting`` on the columns that hold valid tokens, pad the result
    back to ``[N, B, T]`` (one host sync)."""
    length = hyp.size(-1)
    used, ref_used = (int(x) for x in torch.stack([hyp_mask.sum(-1).max(), ref_mask.sum(-1).max()]).tolist())
    if used == 0:
        return torch.zeros(max_order, hyp.size(0), length, dtype=torch.bool, device=hyp.device)
    matches = counting(hyp[:, :used], hyp_mask[:, :used], refs[..., :ref_used], ref_mask[..., :ref_used],
                       max_order)
    return torch.nn.functional.pad(matches, (0, length - used))
