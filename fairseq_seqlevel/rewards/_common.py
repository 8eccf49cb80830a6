"""Shared helpers for padded token tensors: validity masks, reference layout,
closest reference lengths, batch chunking and position bitsets of equal tokens.

``hyp`` is ``B x T``; references are ``B x T'`` or ``B x R x T'``.  A sentence
ends at its first ``pad`` (or ``eos``, when given).  In ``B x R x T'`` an empty
reference row is an *absent* reference; an example with no non-empty row is
scored against one empty reference.

Design: docs/rewards.md, "Conventions".
"""

from typing import Optional, Sequence

import torch
from torch import Tensor

#: Larger than any length or count we ever handle; used as "+infinity" for
#: integer min-reductions so absent references never win.
INT_INF = 1 << 62


def valid_token_mask(tokens: Tensor, pad: int, eos: Optional[int] = None) -> Tensor:
    """True for tokens strictly before the first ``pad`` (or ``eos``).

    Args:
        tokens: LongTensor ``[..., T]``.
    Returns:
        BoolTensor ``[..., T]``; for each row a prefix of True values.
    """
    stop = tokens == pad
    if eos is not None:
        stop = stop | (tokens == eos)
    # A running count of stop tokens is 0 exactly on the prefix before the
    # first stop token; this also ignores any non-pad garbage after padding.
    return stop.cumsum(dim=-1) == 0


def as_multi_reference(refs: Tensor) -> Tensor:
    """View ``B x T'`` references as ``B x 1 x T'``; pass ``B x R x T'`` through."""
    if refs.dim() == 2:
        return refs.unsqueeze(1)
    if refs.dim() != 3:
        raise ValueError(f"references must be B x T' or B x R x T', got shape {tuple(refs.shape)}")
    return refs


def check_batch(hyp: Tensor, refs: Tensor) -> None:
    """Raise a clear error for mismatched shapes or dtypes (cheap, no sync)."""
    if hyp.dim() != 2:
        raise ValueError(f"hyp must be B x T, got shape {tuple(hyp.shape)}")
    if refs.size(0) != hyp.size(0):
        raise ValueError(f"batch size mismatch: hyp has {hyp.size(0)} rows, refs {refs.size(0)}")
    if refs.dim() == 3 and refs.size(1) == 0:
        raise ValueError("refs has no reference rows (R = 0)")
    if hyp.dtype.is_floating_point or refs.dtype.is_floating_point:
        raise TypeError("hyp and refs must be integer token-id tensors")


def present_references(ref_lens: Tensor) -> Tensor:
    """Which references take part in scoring.

    Args:
        ref_lens: LongTensor ``[B, R]`` of reference lengths.
    Returns:
        BoolTensor ``[B, R]``: non-empty references; for an example whose
        references are all empty, only reference 0 (an empty reference).
    """
    present = ref_lens > 0
    none_present = ~present.any(dim=-1)
    first = torch.zeros_like(present)
    first[:, 0] = True
    return present | (first & none_present.unsqueeze(-1))


def closest_reference_length(hyp_len: Tensor, ref_lens: Tensor, present: Tensor) -> Tensor:
    """sacrebleu's effective reference length: the present reference length
    closest to the hypothesis length, ties broken towards the shorter one.

    Args:
        hyp_len: LongTensor ``[B]`` or ``[B, T]`` (e.g. one length per prefix).
        ref_lens: LongTensor ``[B, R]``.
        present: BoolTensor ``[B, R]``.
    Returns:
        LongTensor shaped like ``hyp_len``.
    """
    extra_dims = hyp_len.dim() - 1
    shape = (ref_lens.size(0),) + (1,) * extra_dims + (ref_lens.size(1),)
    lens = ref_lens.view(shape)
    # Lexicographic (distance, length) encoded in one integer, so a single
    # min-reduction picks the closest and, among ties, the shortest reference.
    # Lengths are far below 2**30, so (distance, length) never overflows.
    scale = 1 << 30
    key = (hyp_len.unsqueeze(-1) - lens).abs() * scale + lens
    key = key.masked_fill(~present.view(shape), INT_INF)
    return key.min(dim=-1).values % scale


def chunk_rows(num_rows: int, elements_per_row: int, budget: int) -> Sequence[slice]:
    """Split ``num_rows`` into contiguous slices of at most ``budget`` elements
    (at least one row per slice)."""
    rows_per_chunk = max(1, budget // max(1, elements_per_row))
    return [slice(start, min(start + rows_per_chunk, num_rows))
            for start in range(0, num_rows, rows_per_chunk)] or [slice(0, 0)]



#: ``equal_token_bitsets`` indexes tables by the halves of ids below this; larger
#: ids (hashed words) are renumbered densely first.
DIRECT_ID_LIMIT = 1 << 20


def equal_token_bitsets(query: Tensor, keys: Tensor, word_bits: int, key_mask: Optional[Tensor] = None,
                        max_id: Optional[int] = None, budget: int = 1 << 22) -> Tensor:
    """Where each query token occurs in its row of ``keys``, as bitsets.

    Args:
        query: LongTensor ``[N, T]``; keys: LongTensor ``[N, L]``; non-negative ids.
        word_bits: positions per int64 word (64 for Myers' Peq, 56 for the n-gram
            counts, which keep the sign bit clear).
        key_mask: BoolTensor ``[N, L]``; positions where it is False set no bit.
        max_id: an upper bound of the ids, if the caller knows one (saves a host sync).
    Returns:
        LongTensor ``[N, T, W]``, ``W = ceil(L / word_bits)``: bit ``i`` of word
        ``w`` of ``[n, t]`` is set iff ``keys[n, word_bits·w + i] == query[n, t]``.
    Cost:
        An id splits into its high and low halves of bits (``b`` ≈ √V values
        each), and two ids are equal exactly when both halves are, so the bitset
        of ``x`` is the AND of two per-row tables of ``b`` entries, each built by
        one scatter: O(N * (T + L + b) * W), no sort (a per-row renaming by
        ``torch.unique`` or an N x V table were 4x slower at 5,000 rows).  Ids
        from ``DIRECT_ID_LIMIT`` on are first renumbered densely (one sort).  Rows
        go in chunks of at most ``budget`` table entries.
    """
    num_rows, width = keys.shape
    words = max(1, -(-width // word_bits))
    device = keys.device
    if max_id is None:
        zero = keys.new_zeros(())
        max_id = int(torch.maximum(keys.max() if keys.numel() else zero, query.max() if query.numel() else zero))
    if max_id >= DIRECT_ID_LIMIT:  # e.g. hashed word ids: tables of 2^31 entries otherwise
        dense = torch.unique(torch.cat([keys.reshape(-1), query.reshape(-1)]), return_inverse=True)[1]
        keys, query = dense[:keys.numel()].view(keys.shape), dense[keys.numel():].view(query.shape)
        max_id = keys.numel() + query.numel()
    shift = (max_id.bit_length() + 1) // 2  # hi = id >> shift and lo = id & (base - 1) are < base
    base = 1 << shift
    positions = torch.arange(width, device=device)
    bits = (torch.ones_like(positions) << positions % word_bits).expand(num_rows, width)
    if key_mask is not None:
        bits = bits.masked_fill(~key_mask, 0)
    word_of, key_word = torch.arange(words, device=device), positions // word_bits
    out = torch.empty(num_rows, query.size(1) * words, dtype=torch.long, device=device)
    chunk = max(1, budget // (base * words))
    for start in range(0, num_rows, chunk):
        rows = slice(start, start + chunk)
        key_rows, query_rows = keys[rows], query[rows]
        size = key_rows.size(0)
        for k, (key_half, query_half) in enumerate([(key_rows >> shift, query_rows >> shift),
                                                     (key_rows & (base - 1), query_rows & (base - 1))]):
            if words > 1:  # column = half * W + word
                key_half = key_half * words + key_word
                query_half = ((query_half * words).unsqueeze(-1) + word_of).view(size, -1)
            table = torch.zeros(size, base * words, dtype=torch.long, device=device)
            # one bit per position, so the sum over a row's positions of one half-id is their OR
            table.scatter_add_(1, key_half, bits[rows])
            if k == 0:
                torch.gather(table, 1, query_half, out=out[rows])
            else:
                out[rows].bitwise_and_(table.gather(1, query_half))
    return out.view(num_rows, query.size(1), words)
