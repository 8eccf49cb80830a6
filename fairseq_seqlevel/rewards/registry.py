"""Named sequence-level rewards with a uniform calling convention.

``reward(hyp, refs, pad, eos=None) -> FloatTensor[B]``; ``reward.prefix(...)``
scores every hypothesis prefix and ``reward.cost(...)`` is the matching
non-negative cost.  Names: bleu, bleu_add1, chrf, chrf_pp, edit, hamming.
chrF needs the dictionary's symbols: ``Reward.bind(dictionary, subword_style)``.

Design: docs/rewards.md, "Registry".
"""

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

from torch import Tensor

from .bleu import prefix_bleu, sentence_bleu
from .chrf import ChrF
from .edit import (normalized_edit_distance, normalized_hamming, prefix_normalized_edit_distance,
                   prefix_normalized_hamming)

#: ``fn(hyp [B, T], refs, pad, eos) -> FloatTensor [B]`` (``[B, T]`` for prefix_fn).
RewardFn = Callable[[Tensor, Tensor, int, Optional[int]], Tensor]


@dataclass(frozen=True)
class Reward:
    """A sequence-level reward.

    Attributes:
        name: registry key.
        fn: ``fn(hyp, refs, pad, eos) -> FloatTensor[B]``.
        prefix_fn: same signature, ``-> FloatTensor[B, T]`` (value of each
            prefix ``hyp[:, :t+1]``), or None if there is no prefix variant.
        higher_is_better: direction of ``fn``.
        low, high: range of ``fn`` (may be infinite).
        description: one line for humans.
        bind: for rewards that read the symbols of the ids (chrF), ``bind(dictionary,
            subword_style) -> Reward`` on that dictionary's ids; None: ids are enough.
    """

    name: str
    fn: RewardFn
    prefix_fn: Optional[RewardFn]
    higher_is_better: bool
    low: float
    high: float
    description: str
    bind: Optional[Callable[[Any, str], "Reward"]] = None

    def __call__(self, hyp: Tensor, refs: Tensor, pad: int, eos: Optional[int] = None) -> Tensor:
        """FloatTensor ``[B]``."""
        return self.fn(hyp, refs, pad, eos)

    def prefix(self, hyp: Tensor, refs: Tensor, pad: int, eos: Optional[int] = None) -> Tensor:
        """FloatTensor ``[B, T]``: the reward of every hypothesis prefix."""
        if self.prefix_fn is None:
            raise NotImplementedError(f"reward '{self.name}' has no prefix variant")
        return self.prefix_fn(hyp, refs, pad, eos)

    def _to_cost(self, value: Tensor) -> Tensor:
        bound = self.high if self.higher_is_better else self.low
        if not math.isfinite(bound):
            raise ValueError(f"reward '{self.name}' has an infinite bound; its cost is undefined")
        return bound - value if self.higher_is_better else value - bound

    def cost(self, hyp: Tensor, refs: Tensor, pad: int, eos: Optional[int] = None) -> Tensor:
        """Non-negative cost ``high - reward`` (``reward - low`` if lower is
        better).  FloatTensor ``[B]``."""
        return self._to_cost(self(hyp, refs, pad, eos))

    def prefix_cost(self, hyp: Tensor, refs: Tensor, pad: int, eos: Optional[int] = None) -> Tensor:
        """:meth:`cost` of every prefix.  FloatTensor ``[B, T]``."""
        return self._to_cost(self.prefix(hyp, refs, pad, eos))


_REGISTRY: Dict[str, Reward] = {}


def register_reward(reward: Reward, overwrite: bool = False) -> Reward:
    """Add ``reward`` under ``reward.name``; re-registering a name needs
    ``overwrite=True``.  Returns the reward."""
    if reward.name in _REGISTRY and not overwrite:
        raise ValueError(f"reward '{reward.name}' is already registered")
    _REGISTRY[reward.name] = reward
    return reward


def available_rewards() -> List[str]:
    """Sorted names of the registered rewards."""
    return sorted(_REGISTRY)


def get_reward(name: str) -> Reward:
    """The registered reward called ``name`` (``ValueError`` if unknown)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(available_rewards())}") from None


# ------------------------------------------------------------ built-in rewards

def _bleu_exp(hyp, refs, pad, eos=None):
    return sentence_bleu(hyp, refs, pad, eos, smooth="exp")


def _prefix_bleu_exp(hyp, refs, pad, eos=None):
    return prefix_bleu(hyp, refs, pad, eos, smooth="exp")


def _bleu_add1(hyp, refs, pad, eos=None):
    return sentence_bleu(hyp, refs, pad, eos, smooth="add1-all")


def _prefix_bleu_add1(hyp, refs, pad, eos=None):
    return prefix_bleu(hyp, refs, pad, eos, smooth="add1-all")


def _negative_normalized_edit(hyp, refs, pad, eos=None):
    return -normalized_edit_distance(hyp, refs, pad, eos)


def _prefix_negative_normalized_edit(hyp, refs, pad, eos=None):
    return -prefix_normalized_edit_distance(hyp, refs, pad, eos)


def _negative_normalized_hamming(hyp, refs, pad, eos=None):
    return -normalized_hamming(hyp, refs, pad, eos)


def _prefix_negative_normalized_hamming(hyp, refs, pad, eos=None):
    return -prefix_normalized_hamming(hyp, refs, pad, eos)


def _chrf_reward(name: str, word_order: int, description: str, chrf: Optional[ChrF] = None) -> Reward:
    """Unbound (``chrf`` None: ids in decimal) or bound to a dictionary's symbols."""
    scorer = ChrF(word_order=word_order) if chrf is None else chrf
    bind = None if chrf is not None else functools.partial(_bind_chrf, name, word_order, description)
    return Reward(name, scorer.__call__, scorer.prefix, True, 0.0, 1.0, description, bind)


def _bind_chrf(name: str, word_order: int, description: str, dictionary, subword_style: str) -> Reward:
    return _chrf_reward(name, word_order, description, ChrF.from_dictionary(dictionary, subword_style, word_order))


register_reward(Reward("bleu", _bleu_exp, _prefix_bleu_exp, True, 0.0, 1.0,
                       "sentence BLEU (sacrebleu, exp smoothing, effective order)"))
register_reward(Reward("bleu_add1", _bleu_add1, _prefix_bleu_add1, True, 0.0, 1.0,
                       "sentence BLEU with +1 on every order's matches and totals (ERAC/VAML)"))
register_reward(_chrf_reward("chrf", 0, "sentence chrF (sacrebleu CHRF()) of the detokenized text"))
register_reward(_chrf_reward("chrf_pp", 2, "sentence chrF++ (sacrebleu CHRF(word_order=2)) of the detokenized text"))
register_reward(Reward("edit", _negative_normalized_edit, _prefix_negative_normalized_edit, True,
                       -math.inf, 0.0, "negative token edit distance / reference length"))
register_reward(Reward("hamming", _negative_normalized_hamming, _prefix_negative_normalized_hamming, True,
                       -math.inf, 0.0, "negative token Hamming distance / reference length"))
