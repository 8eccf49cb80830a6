"""k distinct items per row without replacement, ∝ exp(log-weights): the
Gumbel-top-k trick (Vieira 2014; Kool et al. 2019), one ``topk`` per call."""

import math
from typing import Optional, Tuple

import torch
from torch import Tensor


def gumbel_like(x: Tensor) -> Tensor:
    """Standard Gumbel noise of the shape, dtype and device of ``x``."""
    return -torch.empty_like(x).exponential_().log()


def gumbel_topk(log_weights: Tensor, k: int, mask: Optional[Tensor] = None,
                perturb: bool = True) -> Tuple[Tensor, Tensor]:
    """Indices ``[N, k]`` drawn without replacement ∝ exp(``log_weights [N, V]``).

    ``mask`` (bool, broadcastable to ``log_weights``) marks the entries that
    may be drawn; ``perturb=False`` gives the plain top-k.  Returns
    ``(keys, ids)``: ``keys`` is -inf in the columns of rows with fewer than k
    drawable entries (their ids are then arbitrary and must be ignored).
    """
    keys = log_weights.float()
    if perturb:
        keys = keys + gumbel_like(keys)
    if mask is not None:
        keys = keys.masked_fill(~mask, -math.inf)
    return keys.topk(min(k, keys.size(-1)), dim=-1)
