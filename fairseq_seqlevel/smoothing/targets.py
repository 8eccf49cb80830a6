"""Sparse token-level smoothing targets (Elbayad et al. 2018, eq. 13-14): each
gold token's top-k embedding neighbours with their softmax weights, and the
cross-entropy / KL of a model to them by ``gather`` (no ``N x V`` target).
Documented choices (truncation to the top-k with a bound on the dropped mass,
the gold token outside the rarity penalty, which loss to log): docs/smoothing.md.
"""

import math
from typing import Dict, Optional, Tuple

import torch

__all__ = [
    "topk_cosine_neighbours",
    "rare_token_penalty",
    "SparseTokenTargets",
    "smoothed_token_loss",
    "smoothed_token_loss_many",
    "smoothed_token_kl",
    "smoothed_target_entropy",
]


def _float_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half/bfloat16/integer inputs, float64 kept as is."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _topk_neighbours_and_tail(
    embeddings: torch.Tensor,
    k: int,
    chunk_size: int = 4096,
    candidate_mask: Optional[torch.Tensor] = None,
):
    """Implementation of :func:`topk_cosine_neighbours`.

    Also returns, for the truncation bound, ``tail_sim[V]`` (the best cosine
    among eligible tokens left out of the list, ``-inf`` if none) and
    ``tail_count[V]`` (how many eligible tokens were left out).
    """
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be [V, D], got shape {tuple(embeddings.shape)}")
    V = embeddings.size(0)
    if not 1 <= k <= V:
        raise ValueError(f"k must be in [1, V={V}], got {k}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    device = embeddings.device
    emb = embeddings.to(_float_dtype(embeddings.dtype))
    if not torch.isfinite(emb).all():
        raise ValueError("embeddings contain NaN or inf")
    norms = emb.norm(dim=1)
    nonzero = norms > 0
    unit = emb / norms.clamp_min(torch.finfo(emb.dtype).tiny).unsqueeze(1)
    unit = unit * nonzero.unsqueeze(1)  # zero rows stay exactly zero

    # Which tokens may appear in *other* tokens' lists.
    eligible = nonzero
    if candidate_mask is not None:
        candidate_mask = candidate_mask.to(device=device, dtype=torch.bool)
        if candidate_mask.shape != (V,):
            raise ValueError(f"candidate_mask must have shape [{V}]")
        eligible = eligible & candidate_mask
    # Rows of ineligible tokens (special symbols) keep a one-hot target, like
    # tokens without a vector: they neither receive nor spread mass.
    smoothed_row = eligible
    n_eligible = int(eligible.sum())
    neg_inf = float("-inf")
    # Ineligible columns are pushed below any cosine through an extra
    # coordinate (row side 1, column side -4), so masking costs no pass over
    # the [chunk, V] block: their scores are <= -3 < -1 <= any real cosine.
    left = torch.cat([unit, torch.ones(V, 1, dtype=emb.dtype, device=device)], dim=1)
    col_bias = torch.zeros(V, 1, dtype=emb.dtype, device=device).masked_fill(~eligible.unsqueeze(1), -4.0)
    right_t = torch.cat([unit, col_bias], dim=1).T.contiguous()  # [D + 1, V]

    arange = torch.arange(V, device=device)
    ids = torch.empty(V, k, dtype=torch.long, device=device)
    sims = torch.empty(V, k, dtype=emb.dtype, device=device)
    tail_sim = torch.empty(V, dtype=emb.dtype, device=device)
    # k - 1 neighbours are kept; the k-th best is the best left-out one
    # (self is masked, so k <= V candidates always exist, possibly masked).
    for start in range(0, V, chunk_size):  # loop over row chunks, not tokens
        stop = min(start + chunk_size, V)
        rows = arange[start:stop]
        s = left[start:stop] @ right_t  # [c, V]
        s[torch.arange(stop - start, device=device), rows] = neg_inf  # self goes to slot 0
        vals, idx = s.topk(k, dim=1)
        # masked: ineligible column, self, or the whole row of an ineligible token
        masked = (vals < -2.0) | ~smoothed_row[start:stop].unsqueeze(1)
        vals = vals.clamp(-1.0, 1.0).masked_fill(masked, neg_inf)  # round-off: 1 + eps
        ids[start:stop, 0] = rows
        sims[start:stop, 0] = 1.0
        ids[start:stop, 1:] = torch.where(masked[:, : k - 1], rows.unsqueeze(1), idx[:, : k - 1])
        sims[start:stop, 1:] = vals[:, : k - 1]
        tail_sim[start:stop] = vals[:, k - 1]
    n_kept = torch.isfinite(sims[:, 1:]).sum(dim=1)
    own = (eligible & nonzero).long()  # a token is not its own "other" candidate
    tail_count = torch.where(smoothed_row, n_eligible - own - n_kept, torch.zeros_like(n_kept))
    tail_sim = torch.where(tail_count > 0, tail_sim, torch.full_like(tail_sim, neg_inf))
    return ids, sims.float(), tail_sim.float(), tail_count


def topk_cosine_neighbours(
    embeddings: torch.Tensor,
    k: int,
    chunk_size: int = 4096,
    candidate_mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most cosine-similar tokens of every token, itself included.

    Args:
        embeddings: ``FloatTensor[V, D]``; an all-zero row marks a token
            without a vector (unknown word).
        k: list length, ``1 <= k <= V``; slot 0 is always the token itself.
        chunk_size: rows per block; peak extra memory is about
            ``chunk_size * V`` floats (4096 x 40k x 4 B = 655 MB -- lower it on
            small machines).  The dense ``V x V`` matrix is never built.
        candidate_mask: optional ``BoolTensor[V]``; tokens with ``False`` take
            no part in smoothing (e.g. ``<pad>``, ``</s>``): they never appear
            in other tokens' lists and their own list is just themselves
            (a one-hot target, like a zero-embedding row).

    Returns:
        ``ids`` LongTensor[V, k] and ``sims`` FloatTensor[V, k].
        ``ids[i, 0] == i`` and ``sims[i, 0] == 1`` for every row; the other
        slots hold the ``k - 1`` most similar eligible tokens in decreasing
        cosine order, clamped to ``[-1, 1]``.  Slots that cannot be filled
        (zero-embedding and ineligible rows, which only get themselves, or fewer than
        ``k - 1`` eligible tokens) have ``sims == -inf`` and ``ids == i``
        (a valid index that gets probability 0).
    """
    ids, sims, _, _ = _topk_neighbours_and_tail(embeddings, k, chunk_size, candidate_mask)
    return ids, sims


def rare_token_penalty(
    ids: torch.Tensor,
    freqs: torch.Tensor,
    beta: float,
    gold: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The eq. 14 term ``-β · min(f(y) / f(y*), f(y*) / f(y))``.

    Args:
        ids: ``LongTensor[R, k]``; ``ids[r, j]`` is a candidate ``y``.
        freqs: ``Tensor[V]`` of non-negative term frequencies (counts).
        beta: non-negative weight β.
        gold: ``LongTensor[R]``, the gold token ``y*`` of each row; defaults to
            ``arange(R)`` (row ``r`` is token ``r``, as in the neighbour table).

    Returns:
        ``FloatTensor[R, k]`` (``<= 0``).  ``min(a/b, b/a)`` is computed as
        ``min(a, b) / max(a, b)``; it is taken as 0 (finite) when either
        frequency is 0.  The gold token itself gets ``-β`` when its
        frequency is positive -- :class:`SparseTokenTargets` by default does
        not apply the penalty to the self slot (see the module docstring).
    """
    if beta < 0:
        raise ValueError(f"beta must be non-negative, got {beta}")
    freqs = torch.as_tensor(freqs, device=ids.device).float()  # float32: MPS-safe
    if (freqs < 0).any():
        raise ValueError("frequencies must be non-negative")
    if gold is None:
        gold = torch.arange(ids.size(0), device=ids.device)
    f_y = freqs[ids]
    f_gold = freqs[gold].unsqueeze(-1).expand_as(f_y)
    lo = torch.minimum(f_y, f_gold)
    hi = torch.maximum(f_y, f_gold)
    both = (lo > 0) & (hi > 0)
    ratio = torch.where(both, lo / torch.where(both, hi, torch.ones_like(hi)), torch.zeros_like(hi))
    return (ratio * -float(beta)).float()


def _check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not (t > 0 and math.isfinite(t)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    return t


class SparseTokenTargets:
    """Truncated token-level smoothing table.

    Holds ``ids`` LongTensor[V, k] and ``scores`` FloatTensor[V, k]: row ``i``
    lists the tokens that may receive mass when the gold token is ``i``
    (``ids[i, 0] == i`` always) and their rewards ``s(y, i)``.  ``-inf``
    scores are unused slots (probability 0).  Tokens not listed in row ``i``
    get probability exactly 0; see the module docstring for why and for the
    handling of the gold token under the eq. 14 penalty.

    Optionally holds ``tail_sim[V]`` / ``tail_count[V]`` (best cosine and number
    of eligible tokens outside each row), used by :meth:`tail_mass_bound`.

    The object can live on any device; when called with tensors on another
    device it copies itself there once and caches the copy.
    """

    def __init__(
        self,
        ids: torch.Tensor,
        scores: torch.Tensor,
        tail_sim: Optional[torch.Tensor] = None,
        tail_count: Optional[torch.Tensor] = None,
    ):
        if ids.dim() != 2 or ids.shape != scores.shape:
            raise ValueError(
                f"ids and scores must both be [V, k], got {tuple(ids.shape)} and {tuple(scores.shape)}"
            )
        V = ids.size(0)
        if not torch.equal(ids[:, 0].long(), torch.arange(V, device=ids.device)):
            raise ValueError("ids[i, 0] must be i (every token first in its own list)")
        if not torch.isfinite(scores[:, 0]).all():
            raise ValueError("the self slot scores[:, 0] must be finite")
        if torch.isnan(scores).any() or torch.isposinf(scores).any():
            raise ValueError("scores must not contain NaN or +inf")
        self.ids = ids.long()
        self.scores = scores.float()
        if (tail_sim is None) != (tail_count is None):
            raise ValueError("give both tail_sim and tail_count, or neither")
        self.tail_sim = None if tail_sim is None else tail_sim.float().to(ids.device)
        self.tail_count = None if tail_count is None else tail_count.long().to(ids.device)
        self._cache: Dict[torch.device, Tuple[torch.Tensor, torch.Tensor]] = {
            self.ids.device: (self.ids, self.scores)
        }

    @classmethod
    def from_embeddings(
        cls,
        embeddings: torch.Tensor,
        k: int,
        freqs: Optional[torch.Tensor] = None,
        beta: float = 0.0,
        penalize_self: bool = False,
        candidate_mask: Optional[torch.Tensor] = None,
        chunk_size: int = 4096,
    ) -> "SparseTokenTargets":
        """Build the table: top-k cosine neighbours, plus eq. 14 if ``beta > 0``.

        ``freqs`` (``Tensor[V]``, e.g. ``torch.tensor(dictionary.count)``) is
        required when ``beta > 0``.  ``penalize_self=False`` (default) keeps the
        gold token's score at 1 so it stays the mode for every β.
        """
        ids, sims, tail_sim, tail_count = _topk_neighbours_and_tail(
            embeddings, k, chunk_size, candidate_mask
        )
        scores = sims
        if beta:
            if freqs is None:
                raise ValueError("beta > 0 needs token frequencies (freqs)")
            freqs = torch.as_tensor(freqs)
            if freqs.shape != (ids.size(0),):
                raise ValueError(f"freqs must have shape [{ids.size(0)}], got {tuple(freqs.shape)}")
            penalty = rare_token_penalty(ids, freqs, beta)
            if not penalize_self:
                penalty[:, 0] = 0.0
            scores = sims + penalty  # -inf slots stay -inf
        return cls(ids, scores, tail_sim, tail_count)

    # ------------------------------------------------------------------ utils
    @property
    def vocab_size(self) -> int:
        return self.ids.size(0)

    @property
    def k(self) -> int:
        return self.ids.size(1)

    def _on(self, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        device = torch.device(device)
        if device not in self._cache:
            self._cache[device] = (self.ids.to(device), self.scores.to(device))
        return self._cache[device]

    def to(self, device) -> "SparseTokenTargets":
        """A copy of the table on ``device``."""
        t = lambda x: None if x is None else x.to(device)  # noqa: E731
        return SparseTokenTargets(t(self.ids), t(self.scores), t(self.tail_sim), t(self.tail_count))

    def state_dict(self) -> Dict[str, Optional[torch.Tensor]]:
        return {
            "ids": self.ids,
            "scores": self.scores,
            "tail_sim": self.tail_sim,
            "tail_count": self.tail_count,
        }

    @classmethod
    def from_state_dict(cls, state: Dict[str, Optional[torch.Tensor]]) -> "SparseTokenTargets":
        return cls(state["ids"], state["scores"], state.get("tail_sim"), state.get("tail_count"))

    # ----------------------------------------------------------- distribution
    def log_distribution(
        self, target: torch.Tensor, temperature: float
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(ids[N, k], log_probs[N, k])`` of the smoothed target of each gold token.

        ``target`` must hold valid token ids (``0 <= t < V``), any shape ``[*]``;
        outputs have shape ``[*, k]``.  Unused slots have log-prob ``-inf``.
        Computed with ``log_softmax`` (max-subtracted), so τ = 1e-4 is safe.
        """
        tau = _check_temperature(temperature)
        ids, scores = self._on(target.device)
        tgt = target.long()
        logits = scores[tgt] / tau
        return ids[tgt], torch.log_softmax(logits, dim=-1)

    def distribution(
        self, target: torch.Tensor, temperature: float
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(ids[N, k], probs[N, k])``: softmax of ``s / τ`` over the kept
        neighbours of each gold token; probs are ``>= 0`` and sum to 1 per row;
        every token not in ``ids`` has probability exactly 0."""
        ids, logp = self.log_distribution(target, temperature)
        return ids, logp.exp()

    def tail_mass_bound(
        self, temperature: float, target: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Upper bound on the mass the *untruncated* eq. 13/14 distribution
        puts outside the kept list (= total-variation distance between the
        truncated and the full target), per vocabulary entry (``[V]``) or per
        ``target`` entry.

        With ``Z`` the kept mass ``Σ_kept exp(s/τ)``, ``n`` the number of left-out
        eligible tokens and ``c`` their best cosine (left-out scores are
        ``<= c`` because the eq. 14 term is ``<= 0``), the bound is
        ``n·exp(c/τ) / (Z + n·exp(c/τ))``.  Requires a table built by
        :meth:`from_embeddings` (which records ``n`` and ``c``).
        """
        if self.tail_sim is None:
            raise ValueError("tail statistics unavailable: build the table with from_embeddings()")
        tau = _check_temperature(temperature)
        rows = slice(None) if target is None else target.to(self.ids.device).long()
        log_z = torch.logsumexp(self.scores[rows] / tau, dim=-1)
        count = self.tail_count[rows]
        log_tail = torch.where(
            count > 0,
            count.clamp_min(1).float().log() + self.tail_sim[rows] / tau,
            torch.full_like(log_z, float("-inf")),
        )
        bound = torch.exp(log_tail - torch.logaddexp(log_z, log_tail))
        return bound if target is None else bound.to(target.device)


# ----------------------------------------------------------------- losses
def _plogq(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """``Σ p · log q`` with ``0 · anything = 0`` (no NaN from ``0 · -inf``)."""
    p = logp.exp()
    return torch.where(p > 0, p * logq, torch.zeros_like(logq)).sum(dim=-1)


def smoothed_token_loss(
    lprobs: torch.Tensor,
    target: torch.Tensor,
    targets: SparseTokenTargets,
    temperature: float,
    ignore_index: Optional[int] = None,
) -> torch.Tensor:
    """Per-token cross-entropy to the smoothed target.

    ``loss[n] = -Σ_j p_j · lprobs[n, ids_j]`` with ``(ids, p) =
    targets.distribution(target[n], τ)``, computed by ``gather`` (never an
    ``N x V`` target).  ``lprobs`` is ``[N, V]`` (or ``[*, V]`` with ``target``
    ``[*]``); returns ``[N]`` (resp. ``[*]``).  Positions whose target equals
    ``ignore_index`` give exactly 0 (and no gradient).  As ``τ -> 0`` this is
    ``-lprobs[n, target[n]]`` (the NLL), value and gradient.
    """
    if lprobs.shape[:-1] != target.shape:  # e.g. lprobs [B, T, V] with target [B·T]
        flat = lprobs.reshape(-1, lprobs.size(-1))
        if flat.size(0) != target.numel():
            raise ValueError(f"{flat.size(0)} rows of lprobs but {target.numel()} targets")
        lprobs, target_flat = flat, target.reshape(-1)
        return smoothed_token_loss_many(lprobs, target_flat.unsqueeze(-1), targets, temperature,
                                        ignore_index).view(target.shape)
    return smoothed_token_loss_many(lprobs, target.unsqueeze(-1), targets, temperature, ignore_index).squeeze(-1)


def smoothed_token_loss_many(
    lprobs: torch.Tensor,
    targets_many: torch.Tensor,
    targets: SparseTokenTargets,
    temperature: float,
    ignore_index: Optional[int] = None,
) -> torch.Tensor:
    """:func:`smoothed_token_loss` of M targets per distribution: ``lprobs``
    ``[*, V]``, ``targets_many`` ``[*, M]`` -> ``[*, M]``.

    One gather of ``M·k`` columns per row, so neither the forward nor the
    backward pass ever holds ``[*, M, V]`` (raml --raml-lazy: the L samples
    read the reference's distributions).
    """
    if targets.vocab_size != lprobs.size(-1):
        raise ValueError(f"lprobs has {lprobs.size(-1)} classes but the table has {targets.vocab_size}")
    tgt = targets_many.long()
    ignored = tgt == ignore_index if ignore_index is not None else torch.zeros_like(tgt, dtype=torch.bool)
    ids, logp = targets.log_distribution(tgt.masked_fill(ignored, 0), temperature)  # [*, M, k]
    lq = lprobs.gather(-1, ids.flatten(-2)).view(ids.shape)
    dtype = torch.promote_types(lprobs.dtype, torch.float32)
    loss = -_plogq(logp.to(dtype), lq.to(dtype))
    return loss.masked_fill(ignored, 0.0)


def smoothed_target_entropy(
    target: torch.Tensor,
    targets: SparseTokenTargets,
    temperature: float,
    ignore_index: Optional[int] = None,
) -> torch.Tensor:
    """Entropy ``H(r(· | y*))`` of each smoothed target (0 at ignored positions)."""
    tgt = target.reshape(-1).long()
    ignored = tgt == ignore_index if ignore_index is not None else torch.zeros_like(tgt, dtype=torch.bool)
    _, logp = targets.log_distribution(tgt.masked_fill(ignored, 0), temperature)
    ent = -_plogq(logp, logp)
    return ent.masked_fill(ignored, 0.0).reshape(target.shape)


def smoothed_token_kl(
    lprobs: torch.Tensor,
    target: torch.Tensor,
    targets: SparseTokenTargets,
    temperature: float,
    ignore_index: Optional[int] = None,
) -> torch.Tensor:
    """Per-token ``KL(r || p) = CE - H(r)`` (same gradient as
    :func:`smoothed_token_loss`; the value to log, see module docstring)."""
    ce = smoothed_token_loss(lprobs, target, targets, temperature, ignore_index)
    return ce - smoothed_target_entropy(target, targets, temperature, ignore_index)
