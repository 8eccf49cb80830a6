"""Batched token-level edit (Levenshtein) and Hamming distances.

Padding/eos/multi-reference conventions are those of :mod:`._common`.  With
several references the raw distances are the minimum over present
references, and the normalized distances are the minimum over present
references of ``distance / max(len(reference), 1)`` (which may come from a
different reference than the raw minimum).

Every function also has a ``prefix_`` variant giving the value for each
hypothesis prefix ``hyp[:, :t+1]``; positions at or after the hypothesis end
hold the full-sentence value.  For edit distance the prefixes are free: the
dynamic program runs over the hypothesis, and its score after ``i`` tokens
*is* the distance of ``hyp[:, :i]``.
"""

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ._common import (INT_INF, as_multi_reference, check_batch, equal_token_bitsets, present_references,
                      valid_token_mask)


class _PerReference(NamedTuple):
    prefix: Optional[Tensor]  # LongTensor [B, R, T]: distance of each hypothesis prefix (None: not asked)
    full: Tensor      # LongTensor [B, R]
    ref_lens: Tensor  # LongTensor [B, R]
    present: Tensor   # BoolTensor [B, R]


def _prefix_lengths(hyp_len: Tensor, width: int) -> Tensor:
    """``[B, T]`` lengths ``min(t + 1, hyp_len)`` of the prefixes."""
    positions = torch.arange(1, width + 1, device=hyp_len.device)
    return torch.minimum(positions.unsqueeze(0), hyp_len.unsqueeze(-1))


def _levenshtein_rows(hyp: Tensor, refs: Tensor, ref_len: Tensor) -> Tensor:
    """Distances of every hypothesis prefix to each reference, bit-parallel
    (Myers 1999, Hyyrö 2001's global form): a DP column over the reference is
    W = ⌈T'/64⌉ int64 words of vertical +1/−1 deltas, advanced by one
    hypothesis token in ~15 word operations.

    Args:
        hyp: LongTensor ``[N, T]`` (N rows = B*R pairs).
        refs: LongTensor ``[N, T']``.
        ref_len: LongTensor ``[N]`` (tokens past it are ignored).
    Returns:
        LongTensor ``[N, T + 1]``; column ``i`` = distance(hyp[:, :i], ref),
        exact for ``i <= len(hyp)`` (the caller masks the rest).
    Cost:
        O(N * (T + T')) to build the match masks (``equal_token_bitsets``), then ``T`` steps of
        O(N * W) word operations; memory O(N * T * W).
    """
    num_rows, steps = hyp.shape
    words = max(1, -(-refs.size(1) // 64))
    # Bits past a reference's length may be set: carries and shifts only move
    # upwards, so they never reach the bit the distance is read from.
    match = equal_token_bitsets(hyp, refs, 64).transpose(0, 1).contiguous()  # Peq, [T, N, W]: steps read rows
    top = (ref_len - 1).clamp(min=0)
    top_word, top_bit = (top >> 6).unsqueeze(-1), (top & 63).unsqueeze(0)
    pos = torch.full((num_rows, words), -1, dtype=torch.long, device=hyp.device)  # Pv: column 0 is 0..m
    neg = torch.zeros_like(pos)                                                  # Mv
    up = torch.empty(steps, num_rows, dtype=torch.long, device=hyp.device)       # Ph, Mh at the top bit
    down = torch.empty_like(up)
    if words == 1:  # _myers_step_words at W = 1 without its carries, in place: ~15 ops per token
        match, pos, neg = match.squeeze(-1), pos.squeeze(-1), neg.squeeze(-1)
        xv, xh, shifted = torch.empty_like(pos), torch.empty_like(pos), torch.empty_like(pos)
        for i in range(steps):
            eq, ph, mh = match[i], up[i], down[i]  # Ph, Mh are written straight into up, down
            torch.bitwise_or(eq, neg, out=xv)
            torch.bitwise_and(eq, pos, out=xh).add_(pos).bitwise_xor_(pos).bitwise_or_(eq)
            torch.bitwise_or(xh, pos, out=ph).bitwise_not_().bitwise_or_(neg)
            torch.bitwise_and(pos, xh, out=mh)
            # row 0 of the table grows by one per hypothesis token: the 1 shifted in
            torch.bitwise_left_shift(ph, 1, out=shifted).bitwise_or_(1)
            torch.bitwise_or(xv, shifted, out=pos).bitwise_not_()  # Pv = (Mh << 1) | ~(Xv | Ph')
            torch.bitwise_and(shifted, xv, out=neg)                # Mv = Ph' & Xv
            pos.bitwise_or_(torch.bitwise_left_shift(mh, 1, out=shifted))
    else:
        for i in range(steps):
            pos, neg, up[i], down[i] = _myers_step_words(match[i], pos, neg, top_word)
    # the horizontal deltas at the top bit: +1, -1 or 0 (an arithmetic shift keeps bit 63 readable)
    delta = ((up >> top_bit) & 1) - ((down >> top_bit) & 1)
    rows = torch.cat([ref_len.unsqueeze(0), ref_len + delta.cumsum(dim=0)]).t()
    # an empty reference has no bit to read: the distance is the prefix length
    return torch.where(ref_len.eq(0).unsqueeze(-1), torch.arange(steps + 1, device=hyp.device), rows)


def _myers_step_words(eq, pos, neg, top_word):
    """One Myers step over W > 1 words: the addition's carry and the horizontal
    deltas' top bits move from word w to word w + 1.  Returns the new Pv, Mv
    and the words of Ph, Mh holding each row's top bit."""
    carry = torch.zeros_like(top_word.squeeze(-1))
    ph_in, mh_in = torch.ones_like(carry), torch.zeros_like(carry)
    new_pos, new_neg, ph_all, mh_all = [], [], [], []
    for w in range(eq.size(1)):
        e, p, n = eq[:, w], pos[:, w], neg[:, w]
        xv = e | n
        a = e & p
        total = a + p + carry
        # carry out of the unsigned 64-bit sum a + p + carry_in (its top bit)
        carry = ((a & p) | ((a | p) & ~total)).lt(0).long()
        xh = (total ^ p) | e
        ph = n | ~(xh | p)
        mh = p & xh
        ph_all.append(ph)
        mh_all.append(mh)
        ph_out, mh_out = ph.lt(0).long(), mh.lt(0).long()
        ph = (ph << 1) | ph_in
        mh = (mh << 1) | mh_in
        ph_in, mh_in = ph_out, mh_out
        new_pos.append(mh | ~(xv | ph))
        new_neg.append(ph & xv)
    ph_top = torch.stack(ph_all, dim=1).gather(1, top_word).squeeze(1)
    mh_top = torch.stack(mh_all, dim=1).gather(1, top_word).squeeze(1)
    return torch.stack(new_pos, dim=1), torch.stack(new_neg, dim=1), ph_top, mh_top


def _edit_per_reference(hyp: Tensor, ref: Tensor, pad: int, eos: Optional[int],
                        prefixes: bool = True) -> _PerReference:
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
    prefix = None
    if prefixes:  # column i of `rows` is the prefix of length i; prefix t has length t+1
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
        O(B * R * (T + T')) to build the match masks, then ``max(len(hyp))``
        bit-parallel steps of O(B * R * ⌈T'/64⌉) word operations; memory
        O(B * R * T * ⌈T'/64⌉) words.
    """
    per_ref = _edit_per_reference(hyp, ref, pad, eos, prefixes=False)
    return _min_over_present(per_ref.full, per_ref.present)


def normalized_edit_distance(hyp: Tensor, ref: Tensor, pad: int, eos: Optional[int] = None) -> Tensor:
    """Edit distance / max(reference length, 1); multi-reference: the min of
    the per-reference normalized values.  FloatTensor ``[B]``; cost as
    :func:`edit_distance`."""
    per_ref = _edit_per_reference(hyp, ref, pad, eos, prefixes=False)
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
