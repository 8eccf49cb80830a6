"""Mixed rewards: ``--reward bleu:0.8,edit:0.2`` (any reward flag).

``NAME:WEIGHT,NAME:WEIGHT,...``: every part a registry reward or ``python:MODULE:FUNCTION``,
every weight a positive number (not normalized).  Each part keeps its own scale (bleu,
bleu_add1 in [0, 1]; edit, hamming in [-inf, 0]; a user reward in its declared range), so
the weights trade those scales off:

* value  = Σ w_i r_i
* cost   = Σ w_i cost_i (each part's own cost: high_i - r_i, so high = Σ w_i high_i)
* prefix = Σ w_i prefix_i, only when every part has a prefix variant (no user parts)
* bleu_stats (validation's greedy_bleu) is BLEU's, whatever the mix.
"""

import math
from typing import List, Optional, Tuple

from fairseq_seqlevel.errors import ConfigError


def is_mixed_spec(spec) -> bool:
    """A spec with a ``:WEIGHT`` (several parts, or one weighted part)."""
    if not isinstance(spec, str):
        return False
    if "," in spec:
        return True
    return spec.count(":") == (3 if spec.startswith("python:") else 1)


def parse_mixed_spec(spec: str, flag: str) -> List[Tuple[str, float]]:
    """``"bleu:0.8,edit:0.2"`` -> ``[("bleu", 0.8), ("edit", 0.2)]`` (names unchecked)."""
    parts = []
    for part in spec.split(","):
        name, colon, weight = part.strip().rpartition(":")
        if not colon or not name or (name.startswith("python:") and name.count(":") != 2):
            raise ConfigError(f"{flag} {spec}: every part of a mixed reward needs a weight, NAME:WEIGHT "
                              f"(got {part.strip()!r})")
        try:
            value = float(weight)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{flag} {spec}: the weight of '{name}' must be a positive number, got {weight!r}")
        parts.append((name, value))
    names = [name for name, _ in parts]
    if len(set(names)) != len(names):
        raise ConfigError(f"{flag} {spec}: a reward appears twice")
    return parts


class MixedReward:
    """Σ w_i r_i of bound rewards (the interface of a bound reward).

    Args:
        spec: the flag value (the reward's name).
        parts: ``[(bound reward, weight)]``; every part higher-is-better.
        bleu: a bound BLEU reward for :meth:`bleu_stats`.
    """

    higher_is_better = True

    def __init__(self, spec: str, parts, bleu, flag: str = "--reward"):
        self.name, self.parts, self.bleu, self.flag = spec, list(parts), bleu, flag
        for reward, _ in self.parts:
            if not reward.higher_is_better:
                raise ConfigError(f"{flag} {spec}: '{reward.name}' is lower-is-better; a mix adds rewards "
                                  "where higher is better")
        self.has_prefix = all(getattr(reward, "has_prefix", False) for reward, _ in self.parts)
        self.low = sum(w * getattr(r, "low", -math.inf) for r, w in self.parts)
        self.high = sum(w * getattr(r, "high", math.inf) for r, w in self.parts)

    def _sum(self, method: str, hyp, refs):
        total: Optional[object] = None
        for reward, weight in self.parts:
            value = weight * getattr(reward, method)(hyp, refs).float()
            total = value if total is None else total + value
        return total

    def __call__(self, hyp, refs):
        return self._sum("__call__", hyp, refs)

    def cost(self, hyp, refs):
        return self._sum("cost", hyp, refs)

    def prefix(self, hyp, refs):
        if not self.has_prefix:
            raise ConfigError(f"{self.flag} {self.name}: a mixed reward has a prefix variant only when every "
                              "part has one (no python: parts)")
        return self._sum("prefix", hyp, refs)

    def bleu_stats(self, hyp, refs):
        return self.bleu.bleu_stats(hyp, refs)
