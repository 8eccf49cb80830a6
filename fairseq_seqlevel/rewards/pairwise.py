"""Distances between the outputs of one source, all ordered pairs in one call
(the diversity term of chen2019 §4.3: 1 − (BLEU-3 + BLEU-4)/2, or edit distance)."""

from typing import Optional

import torch
from torch import Tensor

from .bleu import BleuStats, bleu_from_stats, bleu_stats
from .edit import normalized_edit_distance

PAIRWISE_DISTANCES = ("bleu34", "edit")


def bleu34_distance(hyp: Tensor, ref: Tensor, pad: int, eos: Optional[int] = None) -> Tensor:
    """1 − (BLEU-3 + BLEU-4)/2 per row [N] (sentence BLEU, exp smoothing), one n-gram count."""
    stats = bleu_stats(hyp, ref, pad, eos, max_order=4)
    bleu4 = bleu_from_stats(stats)
    bleu3 = bleu_from_stats(BleuStats(stats.matches[:, :3], stats.totals[:, :3], stats.hyp_len, stats.ref_len))
    return (1.0 - 0.5 * (bleu3 + bleu4)).float()


def pairwise_distances(samples: Tensor, pad: int, eos: Optional[int] = None, kind: str = "bleu34") -> Tensor:
    """d(y_j, y_k) for every ordered pair of the ``s`` outputs of each source.

    ``samples`` [B, s, T] → [B, s, s], 0 on the diagonal; row j is scored as
    the hypothesis against k as the reference (BLEU is not symmetric).
    """
    if kind not in PAIRWISE_DISTANCES:
        raise ValueError(f"unknown pairwise distance {kind!r}; expected one of {PAIRWISE_DISTANCES}")
    batch, s, width = samples.shape
    out = samples.new_zeros((batch, s, s), dtype=torch.float)
    if s < 2:
        return out
    j, k = torch.triu_indices(s, s, offset=1, device=samples.device)
    j, k = torch.cat([j, k]), torch.cat([k, j])  # every ordered pair with j != k
    hyp = samples[:, j].reshape(-1, width)
    ref = samples[:, k].reshape(-1, width)
    if kind == "bleu34":
        d = bleu34_distance(hyp, ref, pad, eos)
    else:
        d = normalized_edit_distance(hyp, ref, pad, eos).float()
    out[:, j, k] = d.view(batch, -1)
    return out
