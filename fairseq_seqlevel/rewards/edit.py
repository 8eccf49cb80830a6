"""Batched token-level edit (Levenshtein) and Hamming distances.

Padding/eos/multi-reference conventions are those of :mod:`._common`.  With
several references the raw distances are the minimum over present
references, and the normalized distances are the minimum over present
references of ``distance / max(len(reference), 1)`` (which may come from a
different reference than the raw minimum).

Every function also has a ``prefix_`` variant giving the value for each
hypothesis prefix ``hyp[:, :t+1]``; positions at or after the hypothesis end
hold the full-sentence value.  For edit distance the prefixes are free: row
``i`` of the dynamic program *is* the distance table of ``hyp[:, :i]``.
"""

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ._common import INT_INF, as_multi_reference, check_batch, present_references, valid_token_mask


class _PerReference(NamedTuple):
    prefix: Tensor    # LongTensor [B, R, T]: distance of each hypothesis prefix
    full: Tensor      # LongTensor [B, R]
    ref_lens: Tensor  # LongTensor [B, R]
    present: Tensor   # BoolTensor [B, R]


def _prefix_lengths(hyp_len: Tensor, width: int) -> Tensor:
    """``[B, T]`` lengths ``min(t + 1, hyp_len)`` of the prefixes."""
    positions = torch.arange(1, width + 1, device=hyp_len.device)
    return torch.minimum(positions.unsqueeze(0), hyp_len.unsqueeze(-1))


def _prefix_min(values: Tensor, scratch: Tensor) -> Tensor:
    """Running minimum along dim 1 in log2(width) doubling steps, ping-ponging
    between ``values`` and ``scratch`` (both overwritten; much faster than
    ``torch.cummin``, which also computes indices)."""
    width, shift = values.size(1), 1
    while shift < width:
        torch.minimum(values[:, shift:], values[:, :-shift], out=scratch[:, shift:])
        scratch[:, :shift] = values[:, :shift]
        values, scratch = scratch, values
        shift *= 2
    return values


def _levenshtein_rows(hyp: Tensor, refs: Tensor, ref_len: Tensor) -> Tensor:
    """Distances of every hypothesis prefix to each reference.

    Args:
        hyp: LongTensor ``[N, T]`` (N rows = B*R pairs).
        refs: LongTensor ``[N, T']``.
        ref_len: LongTensor ``[N]``.
    Returns:
        LongTensor ``[N, T + 1]``; column ``i`` = distance(hyp[:, :i], ref),
        exact for ``i <= len(hyp)`` (the caller masks the rest).
    Cost:
        ``T`` iterations of O(N * T') work; memory O(N * (T + T')).
    """
    num_rows, ref_width = refs.shape
    device = refs.device
    cols = torch.arange(ref_width + 1, device=device, dtype=torch.int32)
    # Row 0 of the table: distance(empty, ref[:j]) = j.
    row = cols.expand(num_rows, ref_width + 1).contiguous()
    gather_at = ref_len.clamp(max=ref_width).unsqueeze(-1)
    out = [row.gather(1, gather_at)]
    candidate, scratch = torch.empty_like(row), torch.empty_like(row)
    for i in range(1, hyp.size(1) + 1):
        substitution_cost = (refs != hyp[:, i - 1: i]).to(torch.int32)
        # Diagonal (match / substitute) and vertical (delete a hyp token) moves.
        torch.minimum(row[:, :-1] + substitution_cost, row[:, 1:] + 1, out=candidate[:, 1:])
        candidate[:, 0] = i
        # Horizontal moves (insertions) chain within the row:
        #   row[j] = min_k<=j candidate[k] + (j - k) = j + prefix_min_k<=j(candidate[k] - k)
        candidate -= cols
        row = _prefix_min(candidate, scratch) + cols  # a new tensor: both buffers are free again
        out.append(row.gather(1, gather_at))
    return torch.cat(out, dim=1).long()


def _edit_per_reference(hyp: Tensor, ref: Tensor, pad: int, eos: Optional[int]) -> _PerReference:
    check_batch(hyp, ref)
    refs = as_multi_reference(ref)
    batch, num_refs, _ = refs.shape
    hyp_len = valid_token_mask(hyp, pad, eos).sum(-1)
    ref_lens = valid_token_mask(refs, pad, eos).sum(-1)
    width = hyp.size(1)
    # Rows past the longest hypothesis and columns past the longest reference
    # never matter: skip them (one host sync).
    steps, ref_width = (int(x) for x in torch.stack([hyp_len.max(), ref_lens.max()]).tolist()) if batch else (0, 0)
    rows = _levenshtein_rows(
        hyp[:, :steps].unsqueeze(1).expand(batch, num_refs, steps).reshape(batch * num_refs, steps),
        refs[..., :ref_width].reshape(batch * num_refs, ref_width),
        ref_lens.reshape(-1),
    ).view(batch, num_refs, steps + 1)
    full = rows.gather(2, hyp_len.view(batch, 1, 1).expand(batch, num_refs, 1)).squeeze(-1)
    # Column i of `rows` is the prefix of length i; prefix t has length t+1.
    prefix_len = _prefix_lengths(hyp_len, width)
    prefix = rows.gather(2, prefix_len.unsqueeze(1).expand(batch, num_refs, width))
    return _PerReference(prefix, full, ref_lens, present_references(ref_lens))


def _hamming_per_reference(hyp: Tensor, ref: Tensor, pad: int, eos: Optional[int]) -> _PerReference:
    check_batch(hyp, ref)
    refs = as_multi_reference(ref)
    hyp_mask = valid_token_mask(hyp, pad, eos)
    ref_mask = valid_token_mask(refs, pad, eos)
    hyp_len, ref_lens = hyp_mask.sum(-1), ref_mask.sum(-1)
    width = hyp.size(1)
    # Align references to the hypothesis width: positions beyond it can only
    # contribute through the length difference term.
    extra = width - refs.size(-1)
    refs_aligned = torch.nn.functional.pad(refs, (0, max(extra, 0)), value=pad)[..., :width]
    ref_mask_aligned = torch.nn.functional.pad(ref_mask, (0, max(extra, 0)), value=False)[..., :width]
    differ = hyp_mask.unsqueeze(1) & ref_mask_aligned & (hyp.unsqueeze(1) != refs_aligned)
    differ_so_far = differ.cumsum(-1)  # [B, R, T]
    prefix_len = _prefix_lengths(hyp_len, width).unsqueeze(1)
    # Positions where only one side has a token all differ: |len difference|.
    prefix = differ_so_far + (prefix_len - ref_lens.unsqueeze(-1)).abs()
    full = differ.sum(-1) + (hyp_len.unsqueeze(1) - ref_lens).abs()
    return _PerReference(prefix, full, ref_lens, present_references(ref_lens))


def _min_over_present(values: Tensor, present: Tensor) -> Tensor:
    """Min over dim 1 (references) of ``values [B, R, ...]`` among present ones."""
    mask = present.view(present.shape + (1,) * (values.dim() - 2))
    fill = INT_INF if not values.dtype.is_floating_point else float("inf")
    return values.masked_fill(~mask, fill).min(dim=1).values


def _normalize(distances: Tensor, ref_lens: Tensor) -> Tensor:
    """``distance / max(ref_len, 1)`` for ``distances [B, R, ...]``."""
    denom = ref_lens.clamp(min=1).double()
    return distances.double() / denom.view(denom.shape + (1,) * (distances.dim() - 2))


# ----------------------------------------------------------------- public API

def edit_distance(hyp: Tensor, ref: Tensor, pad: int, eos: Optional[int] = None) -> Tensor:
    """Token Levenshtein distance (unit costs), min over present references.

    Args:
        hyp: LongTensor ``[B, T]``; ref: ``[B, T']`` or ``[B, R, T']``.
    Returns:
        LongTensor ``[B]``.
    Cost:
        ``max(len(hyp))`` vectorized DP rows of O(B * R * T') each; memory
        O(B * R * (T + T')).
    """
    per_ref = _edit_per_reference(hyp, ref, pad, eos)
    return _min_over_present(per_ref.full, per_ref.present)


def normalized_edit_distance(hyp: Tensor, ref: Tensor, pad: int, eos: Optional[int] = None) -> Tensor:
    """Edit distance / max(reference length, 1); multi-reference: the min of
    the per-reference normalized values.  FloatTensor ``[B]``; cost as
    :func:`edit_distance`."""
    per_ref = _edit_per_reference(hyp, ref, pad, eos)
    return _min_over_present(_normalize(per_ref.full, per_ref.ref_lens), per_ref.present).float()


def prefix_edit_distance(hyp: Tensor, ref: Tensor, pad: int, eos: Optional[int] = None) -> Tensor:
    """Edit distance of every prefix ``hyp[:, :t+1]``.  LongTensor ``[B, T]``
    (cost as :func:`edit_distance` plus O(B * R * T) memory; past the end:
    full value)."""
    per_ref = _edit_per_reference(hyp, ref, pad, eos)
    return _min_over_present(per_ref.prefix, per_ref.present)


def prefix_normalized_edit_distance(hyp: Tensor, ref: Tensor, pad: int, eos: Optional[int] = None) -> Tensor:
    """:func:`normalized_edit_distance` of every prefix.  FloatTensor ``[B, T]``;
    cost as :func:`edit_distance` plus O(B * R * T) memory."""
    per_ref = _edit_per_reference(hyp, ref, pad, eos)
    return _min_over_present(_normalize(per_ref.prefix, per_ref.ref_lens), per_ref.present).float()


def hamming(hyp: Tensor, ref: Tensor, pad: int, eos: Optional[int] = None) -> Tensor:
    """Number of positions < max(len(hyp), len(ref)) where the sequences
    differ (a missing token differs from any token); min over present
    references.  LongTensor ``[B]``; memory O(B * R * T)."""
    per_ref = _hamming_per_reference(hyp, ref, pad, eos)
    return _min_over_present(per_ref.full, per_ref.present)


def normalized_hamming(hyp: Tensor, ref: Tensor, pad: int, eos: Optional[int] = None) -> Tensor:
    """Hamming distance / max(reference length, 1); multi-reference: min of the
    per-reference normalized values.  FloatTensor ``[B]``; memory O(B * R * T)."""
    per_ref = _hamming_per_reference(hyp, ref, pad, eos)
    return _min_over_present(_normalize(per_ref.full, per_ref.ref_lens), per_ref.present).float()


def prefix_hamming(hyp: Tensor, ref: Tensor, pad: int, eos: Optional[int] = None) -> Tensor:
    """Hamming distance of every prefix ``hyp[:, :t+1]``.  LongTensor ``[B, T]``;
    memory O(B * R * T)."""
    per_ref = _hamming_per_reference(hyp, ref, pad, eos)
    return _min_over_present(per_ref.prefix, per_ref.present)


def prefix_normalized_hamming(hyp: Tensor, ref: Tensor, pad: int, eos: Optional[int] = None) -> Tensor:
    """:func:`normalized_hamming` of every prefix.  FloatTensor ``[B, T]``;
    memory O(B * R * T)."""
    per_ref = _hamming_per_reference(hyp, ref, pad, eos)
    return _min_over_present(_normalize(per_ref.prefix, per_ref.ref_lens), per_ref.present).float()
