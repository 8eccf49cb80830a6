"""Shared helpers for padded token tensors: validity masks, reference layout,
closest reference lengths and batch chunking.

Conventions used throughout ``fairseq_seqlevel.rewards``:

* ``hyp`` is a LongTensor ``B x T``; references are ``B x T'`` (one reference
  per example) or ``B x R x T'`` (up to ``R`` references per example).
* Sequences are right-padded with ``pad``.  A sentence ends at its first
  ``pad`` token, or at its first ``eos`` token when ``eos`` is given; everything
  from there on is ignored.
* In the ``B x R x T'`` layout a reference row of length 0 (all pad, or
  starting with ``eos``) is an *absent* reference (like ``None`` in sacrebleu),
  which lets examples have fewer than ``R`` references.  If every row of an
  example is empty, the example is scored against a single *empty* reference
  (sacrebleu's behaviour for ``[""]``); with no reference at all sacrebleu
  would crash.  Consequence: an empty reference next to non-empty ones cannot
  be expressed in the ``B x R x T'`` layout.
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

