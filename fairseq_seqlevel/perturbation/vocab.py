"""Substitution vocabularies V_sub for RAML-style sequence sampling.

Elbayad et al. (2018, §3.2 "Restricted vocabulary sampling") replace the
tokens picked by the stratified sampler with tokens drawn uniformly from a
subset V_sub of the vocabulary:

* ``full_vocab``  -- V: every id except special symbols (default of RAML).
* ``batch_vocab`` -- V_batch: tokens of all targets of the mini-batch (same
  set for every row; approximates unigram statistics of the training set).
* ``refs_vocab``  -- V_refs: tokens of the references of each example (the set
  differs per row).

To keep sampling vectorized, a vocabulary is stored as a padded candidate
matrix, one row per example (see :class:`SubstitutionVocab`).  Pure torch, no
fairseq import; every tensor follows the device of the inputs.
"""

from typing import Iterable, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

# Value stored after the valid candidates of a row.  It is the largest int64 so
# that every row stays sorted (``torch.searchsorted`` needs that), and using it
# as a token id by mistake fails loudly (out-of-range embedding index).
CANDIDATE_FILLER = torch.iinfo(torch.long).max

SpecialIds = Union[Iterable[int], Tensor]


class SubstitutionVocab(NamedTuple):
    """Per-row substitution vocabulary, padded to a common width.

    Attributes:
        candidates: LongTensor[B, Kmax]. Row ``b`` holds its ``sizes[b]`` valid
            token ids, unique and sorted ascending, in ``candidates[b, :sizes[b]]``;
            the remaining entries are ``CANDIDATE_FILLER``. Rows may be an
            expanded (stride-0) view of one shared row: treat it as read-only.
        sizes: LongTensor[B], number of valid candidates of each row (|V_sub|).
    """

    candidates: Tensor
    sizes: Tensor


def never_sampled_ids(dictionary, include_eos: bool = True):
    """Ids a generated or sampled sentence never contains as a word (sorted list).

    bos, pad, unk (and eos unless ``include_eos`` is False), plus the
    "madeupword" fillers fairseq pads dictionaries with up to a multiple of 8.
    ``dictionary`` is duck-typed (a ``fairseq.data.Dictionary`` works).
    """
    ids = {dictionary.bos(), dictionary.pad(), dictionary.unk()}
    if include_eos:
        ids.add(dictionary.eos())
    ids |= {i for i, s in enumerate(dictionary.symbols) if s.startswith("madeupword")}
    return sorted(ids)


def _special_id_tensor(special_ids: SpecialIds, device: torch.device) -> Tensor:
    """1-D LongTensor of the special ids, on ``device``."""
    if isinstance(special_ids, Tensor):
        return special_ids.reshape(-1).to(device=device, dtype=torch.long)
    return torch.tensor(sorted({int(i) for i in special_ids}), dtype=torch.long, device=device)


def _shared_vocab(ids: Tensor, batch_size: int) -> SubstitutionVocab:
    """Same sorted candidate set ``ids`` [K] for all ``batch_size`` rows (no copy)."""
    candidates = ids.unsqueeze(0).expand(batch_size, ids.numel())
    sizes = torch.full((batch_size,), ids.numel(), dtype=torch.long, device=ids.device)
    return SubstitutionVocab(candidates, sizes)


def full_vocab(
    num_tokens: int,
    special_ids: SpecialIds,
    batch_size: int,
    device: Optional[torch.device] = None,
) -> SubstitutionVocab:
    """V: every id in ``[0, num_tokens)`` except ``special_ids``.

    ``special_ids`` should contain pad, eos, bos, unk and fairseq's
    ``madeupword`` fillers, i.e. every id a sampled sentence must not contain.

    Returns:
        SubstitutionVocab with candidates [batch_size, K] (an expanded view of
        one row) and sizes [batch_size] all equal to K.
    """
    ids = torch.arange(num_tokens, dtype=torch.long, device=device)
    ids = ids[~torch.isin(ids, _special_id_tensor(special_ids, ids.device))]
    return _shared_vocab(ids, batch_size)


def batch_vocab(target: Tensor, special_ids: SpecialIds) -> SubstitutionVocab:
    """V_batch: union of the (non-special) tokens of all rows of ``target``.

    Args:
        target: LongTensor[B, T] (any padding; pad must be in ``special_ids``).

    Returns:
        SubstitutionVocab with the same candidate set for the B rows.
    """
    ids = torch.unique(target)  # sorted ascending
    ids = ids[~torch.isin(ids, _special_id_tensor(special_ids, ids.device))]
    return _shared_vocab(ids, target.size(0))


def refs_vocab(refs: Tensor, special_ids: SpecialIds) -> SubstitutionVocab:
    """V_refs: per-row set of the (non-special) tokens of that example's references.

    Args:
        refs: LongTensor[B, R, T'] (R references per example) or [B, T'] (one
            reference); padding must be in ``special_ids``.

    Returns:
        SubstitutionVocab with candidates [B, Kmax] (Kmax = largest set) and
        sizes [B]; sizes differ between rows.
    """
    batch_size = refs.size(0)
    flat = refs.reshape(batch_size, -1)
    ordered = flat.sort(dim=1).values
    # A token is a new candidate where it differs from its left neighbour in
    # the sorted row (deduplication without a Python loop over rows).
    is_first = torch.ones_like(ordered, dtype=torch.bool)
    is_first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    specials = _special_id_tensor(special_ids, refs.device)
    is_candidate = is_first & ~torch.isin(ordered, specials)
    sizes = is_candidate.sum(dim=1)
    # Push non-candidates to the end of each row; the row stays sorted.
    keyed = ordered.masked_fill(~is_candidate, CANDIDATE_FILLER).sort(dim=1).values
    max_size = int(sizes.max()) if batch_size > 0 else 0
    return SubstitutionVocab(keyed[:, :max_size], sizes)


def _uniform_index(num_choices: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """Index uniform in ``[0, num_choices)`` elementwise (0 where num_choices == 0).

    Per-element upper bounds rule out ``torch.randint``; flooring a uniform
    float is exact up to float32 resolution (2^-24, far below any vocabulary).
    """
    u = torch.rand(num_choices.shape, generator=generator, device=num_choices.device)
    index = (u * num_choices).floor().long()
    # Guards the (rounding) case u * n == n.
    return torch.minimum(index, (num_choices - 1).clamp(min=0))


def draw_uniform_candidates(
    vocab: SubstitutionVocab, num_draws: int, generator: Optional[torch.Generator] = None
) -> Tensor:
    """Draw ``num_draws`` tokens per row, uniformly from that row's candidates.

    Returns:
        LongTensor[B, num_draws]. Rows with ``sizes[b] == 0`` have no candidate
        and get ``CANDIDATE_FILLER``: callers must mask them out.
    """
    batch_size = vocab.sizes.size(0)
    sizes = vocab.sizes.unsqueeze(1).expand(batch_size, num_draws)
    if vocab.candidates.size(1) == 0:
        return torch.full_like(sizes, CANDIDATE_FILLER)
    index = _uniform_index(sizes, generator)
    return vocab.candidates.gather(1, index)


def _position_in_candidates(vocab: SubstitutionVocab, tokens: Tensor) -> Tuple[Tensor, Tensor]:
    """Index of each token of ``tokens`` [B, N] in its row's candidates.

    Returns:
        (index LongTensor[B, N], is_member BoolTensor[B, N]); ``index`` is only
        meaningful where ``is_member``.
    """
    candidates = vocab.candidates
    if candidates.stride(0) == 0:
        # Shared row (expanded view): search it once instead of materializing B copies.
        index = torch.searchsorted(candidates[0].contiguous(), tokens)
    else:
        index = torch.searchsorted(candidates.contiguous(), tokens.contiguous())
    index = index.clamp(max=candidates.size(1) - 1)
    found = candidates.gather(1, index) == tokens
    is_member = found & (index < vocab.sizes.unsqueeze(1))
    return index, is_member


def draw_different_candidates(
    vocab: SubstitutionVocab, current: Tensor, generator: Optional[torch.Generator] = None
) -> Tuple[Tensor, Tensor]:
    """For every token of ``current`` draw a *different* token of its row's V_sub.

    The draw is uniform over the ``m = |V_sub| - [current in V_sub]`` candidates
    that differ from the current token: when the current token is a candidate,
    an index ``j`` uniform in ``[0, size - 1)`` is drawn and shifted by one past
    the current token's index; when it is not (e.g. unk with V, or a V_refs
    that does not contain the target), all ``size`` candidates differ from it
    and ``j`` is uniform in ``[0, size)``. ``m`` is returned so that samplers
    use the exact probability ``1/m`` in ``log_q``.

    Args:
        vocab: SubstitutionVocab with B rows.
        current: LongTensor[B, N]; row b is served by vocab row b.

    Returns:
        (tokens LongTensor[B, N], num_choices LongTensor[B, N]). Where
        ``num_choices == 0`` no different token exists and the current token is
        returned unchanged.
    """
    sizes = vocab.sizes.unsqueeze(1)
    if vocab.candidates.size(1) == 0 or current.numel() == 0:
        return current.clone(), torch.zeros_like(current)
    index_of_current, is_member = _position_in_candidates(vocab, current)
    num_choices = (sizes - is_member.long()).clamp(min=0)
    index = _uniform_index(num_choices, generator)
    # Skip over the current token's slot so that it can never be drawn.
    index = index + (is_member & (index >= index_of_current)).long()
    index = index.clamp(max=vocab.candidates.size(1) - 1)
    drawn = vocab.candidates.gather(1, index)
    return torch.where(num_choices > 0, drawn, current), num_choices
