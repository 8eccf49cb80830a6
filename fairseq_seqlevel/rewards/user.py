"""User rewards: ``--reward python:MODULE:FUNCTION`` (any reward flag, or a part of a mix).

Contract: ``FUNCTION(hyps: list[str], refs: list[list[str]]) -> Tensor | sequence of float``,
one value per hypothesis, higher is better.  ``hyps[i]``: a hypothesis detokenized as fairseq's
``--remove-bpe`` would (pad/eos/bos stripped); ``refs[i]``: its 1..R references.  A call gets the
distinct (hypothesis, references) pairs of one reward call, at most ``FUNCTION.batch_size``.
Optional attributes (or :func:`user_reward`): ``low``/``high`` its range (default 0, 1; the cost
is ``high - value``, so ``high`` must be finite), ``inputs = "ids"`` for token-id lists.
Wrong shape, NaN/inf, non-numbers, values outside [low, high]: a one-line :class:`UserRewardError`
naming it.  No prefix variant: erac, vaml and interpolation refuse user rewards at start-up.
Security: a spec is imported only if this process's command line (``sys.argv``) names it or
:func:`trust_reward_spec` allowed it; a spec that only a loaded checkpoint's config names binds
an :class:`UntrustedReward` that imports nothing and fails in one line if it is ever called.
"""

import importlib
import math
import re
import sys
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from fairseq_seqlevel.errors import ConfigError

from ._common import as_multi_reference
from .words import SENTENCEPIECE, SUBWORD_NMT


PREFIX = "python:"
INPUTS = ("text", "ids")
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")

#: specs trusted by this process besides its command line (see :func:`trust_reward_spec`)
_TRUSTED = set()
#: spec -> loaded function, so task and criterions share one import
_LOADED: Dict[str, object] = {}


class UserRewardError(ConfigError):
    """A user reward broke its contract (printed as one line)."""


def is_user_spec(spec) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def user_reward(low: float = 0.0, high: float = 1.0, inputs: str = "text", batch_size: Optional[int] = None):
    """Decorator declaring a user reward's range (for the cost), its inputs and batch size."""
    def declare(fn):
        fn.low, fn.high, fn.inputs, fn.batch_size = low, high, inputs, batch_size
        return fn
    return declare


# ------------------------------------------------------------------ trust

def trust_reward_spec(spec: str) -> None:
    """Let this process import ``spec`` although its command line does not name it
    (for programs that build fairseq configs themselves, and tests)."""
    _TRUSTED.add(spec)


def named_on_command_line(spec: str, argv: Optional[Sequence[str]] = None) -> bool:
    """True if this process was started with ``spec`` as a flag value (``--reward SPEC``,
    ``--reward=SPEC``, hydra's ``task.reward=SPEC``, quoted in ``--model-overrides
    "{'reward': 'SPEC'}"``) or :func:`trust_reward_spec` allowed it.  Spawned data-parallel
    workers inherit ``sys.argv`` from their parent."""
    argv = sys.argv[1:] if argv is None else argv
    quoted = (f"'{spec}'", f'"{spec}"')
    return spec in _TRUSTED or any(a == spec or a.endswith("=" + spec) or any(q in a for q in quoted)
                                   for a in map(str, argv))


# ------------------------------------------------------------------ loading

def parse_user_spec(spec: str, flag: str) -> Tuple[str, str]:
    """``python:MODULE:FUNCTION`` -> (MODULE, FUNCTION); ConfigError if malformed."""
    fields = spec[len(PREFIX):].split(":")
    if len(fields) != 2 or not all(_DOTTED.match(f) for f in fields):
        raise ConfigError(f"{flag} {spec}: expected python:MODULE:FUNCTION (dotted Python names)")
    return fields[0], fields[1]


def _declared(fn, flag, spec):
    """(low, high, inputs, batch_size) of ``fn``, checked."""
    try:
        low, high = float(getattr(fn, "low", 0.0)), float(getattr(fn, "high", 1.0))
    except (TypeError, ValueError):
        raise ConfigError(f"{flag} {spec}: low/high must be numbers, got {getattr(fn, 'low', 0.0)!r}, "
                          f"{getattr(fn, 'high', 1.0)!r}") from None
    if not (math.isfinite(high) and low < high):
        raise ConfigError(f"{flag} {spec}: declared range [{low}, {high}] needs low < high and a finite high "
                          "(the cost is high - value)")
    inputs = getattr(fn, "inputs", "text")
    if inputs not in INPUTS:
        raise ConfigError(f"{flag} {spec}: inputs must be one of {', '.join(INPUTS)}, got {inputs!r}")
    batch_size = getattr(fn, "batch_size", None)
    if batch_size is not None and not (isinstance(batch_size, int) and batch_size > 0):
        raise ConfigError(f"{flag} {spec}: batch_size must be a positive int or None, got {batch_size!r}")
    return low, high, inputs, batch_size


def load_user_function(spec: str, flag: str):
    """Import MODULE and return FUNCTION (cached per spec).  Every failure is a one-line
    ConfigError naming ``flag`` and ``spec``.  Callers check trust first."""
    if spec in _LOADED:
        return _LOADED[spec]
    module_name, attr = parse_user_spec(spec, flag)
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001  (any error of user code is reported in one line)
        raise ConfigError(f"{flag} {spec}: cannot import module '{module_name}': "
                          f"{type(e).__name__}: {_one_line(e)}") from None
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ConfigError(f"{flag} {spec}: module '{module_name}' has no attribute '{attr}'")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ConfigError(f"{flag} {spec}: '{module_name}.{attr}' is not callable (a {type(fn).__name__})")
    _declared(fn, flag, spec)
    _LOADED[spec] = fn
    return fn


def _one_line(e) -> str:
    return " ".join(str(e).split())[:300]


# ------------------------------------------------------------ detokenizing

class Detokenizer:
    """Token-id rows -> strings as fairseq prints them with ``--remove-bpe``.

    A row ends at its first pad or eos; ``drop_ids`` (bos) are removed; ids name
    ``symbols`` (unknown ids read as ``unk_string``); then subwords are joined:
    sentencepiece: pieces concatenated, "▁" -> space; subword_nmt: "@@ " removed.
    """

    def __init__(self, symbols: Sequence[str], style: str, pad: int, eos: int, drop_ids=(),
                 unk_string: str = "<unk>"):
        self.symbols, self.style = list(symbols), style
        self.stop, self.drop = {pad, eos}, set(drop_ids)
        self.unk_string = unk_string

    @classmethod
    def from_dictionary(cls, dictionary, style: str) -> "Detokenizer":
        """From a fairseq ``Dictionary`` (duck-typed; fairseq is not imported)."""
        return cls(dictionary.symbols, style, dictionary.pad(), dictionary.eos(), drop_ids={dictionary.bos()},
                   unk_string=dictionary.symbols[dictionary.unk()])

    def ids(self, row: Sequence[int]) -> Tuple[int, ...]:
        out = []
        for token in row:
            if token in self.stop:
                break
            if token not in self.drop:
                out.append(token)
        return tuple(out)

    def text(self, ids: Sequence[int]) -> str:
        n = len(self.symbols)
        sent = " ".join(self.symbols[i] if 0 <= i < n else self.unk_string for i in ids)
        if self.style == SENTENCEPIECE:
            return sent.replace(" ", "").replace("\u2581", " ").strip()
        if self.style == SUBWORD_NMT:
            return (sent + " ").replace("@@ ", "").rstrip()
        return sent


# --------------------------------------------------------------- the reward

class UserReward:
    """A user function bound to a dictionary: the interface of a bound reward
    (``reward(hyp, refs)``, ``cost``, ``bleu_stats``; ``prefix`` refused).

    ``bleu``: a bound BLEU reward that ``bleu_stats`` (validation's greedy_bleu) delegates to.
    """

    has_prefix = False
    higher_is_better = True

    def __init__(self, spec: str, fn, detokenizer: Detokenizer, bleu=None, flag: str = "--reward"):
        self.name, self.fn, self.detokenizer, self.bleu, self.flag = spec, fn, detokenizer, bleu, flag
        self.low, self.high, self.inputs, self.batch_size = _declared(fn, flag, spec)

    def _distinct_pairs(self, hyp: Tensor, refs: Tensor):
        """(index of each row's pair [B], distinct hypotheses, their references)."""
        detok, text = self.detokenizer, self.inputs == "text"
        strings: Dict[Tuple[int, ...], str] = {}  # refs repeat across rows: detokenize once

        def convert(ids):
            if not text:
                return list(ids)
            if ids not in strings:
                strings[ids] = detok.text(ids)
            return strings[ids]

        index, keys, hyps, references = {}, [], [], []
        for h, rs in zip(hyp.tolist(), as_multi_reference(refs).tolist()):
            h_ids = detok.ids(h)
            r_ids = [r for r in map(detok.ids, rs) if r] or [()]  # absent rows out; none: one empty
            key = (h_ids, tuple(r_ids)) if not text else (convert(h_ids), tuple(map(convert, r_ids)))
            position = index.get(key)
            if position is None:
                position = index[key] = len(hyps)
                hyps.append(convert(h_ids))
                references.append([convert(r) for r in r_ids])
            keys.append(position)
        return keys, hyps, references

    def __call__(self, hyp: Tensor, refs: Tensor) -> Tensor:
        """FloatTensor ``[B]`` on ``hyp``'s device."""
        if hyp.size(0) == 0:
            return torch.zeros(0, device=hyp.device)
        keys, hyps, references = self._distinct_pairs(hyp, refs)
        step = self.batch_size or len(hyps)
        values = torch.cat([self._checked(hyps[i:i + step], references[i:i + step])
                            for i in range(0, len(hyps), step)])
        return values[torch.tensor(keys)].to(device=hyp.device, dtype=torch.float32)

    def _checked(self, hyps, references) -> Tensor:
        where = f"user reward {self.name}"
        out = self.fn(hyps, references)
        try:
            values = out.detach() if isinstance(out, Tensor) else torch.as_tensor(out)
        except Exception as e:  # noqa: BLE001
            raise UserRewardError(f"{where} returned {type(out).__name__}, not numbers: {_one_line(e)}") from None
        if values.dtype.is_complex or not (values.dtype.is_floating_point or values.dtype in _NUMERIC):
            raise UserRewardError(f"{where} returned {values.dtype} values, not real numbers")
        if tuple(values.shape) != (len(hyps),):
            raise UserRewardError(f"{where} returned shape {tuple(values.shape)} for {len(hyps)} hypotheses; "
                                  f"expected {len(hyps)} values (1-D)")
        values = values.to(device="cpu", dtype=torch.float64)
        bad = ~torch.isfinite(values)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise UserRewardError(f"{where} returned {float(values[i])} for hypothesis {_short(hyps[i])}")
        outside = (values < self.low) | (values > self.high)
        if outside.any():
            i = int(outside.nonzero()[0])
            raise UserRewardError(f"{where} returned {float(values[i])} for hypothesis {_short(hyps[i])}, outside "
                                  f"its declared range [{self.low}, {self.high}] (declare low/high on the function)")
        return values

    def cost(self, hyp: Tensor, refs: Tensor) -> Tensor:
        """Non-negative ``high - reward``, FloatTensor ``[B]``."""
        return self.high - self(hyp, refs)

    def prefix(self, hyp, refs):
        raise ConfigError(f"{self.flag} {self.name}: a user reward has no prefix variant")

    def bleu_stats(self, hyp, refs):
        if self.bleu is None:
            raise ConfigError(f"{self.flag} {self.name}: no BLEU statistics bound")
        return self.bleu.bleu_stats(hyp, refs)


_NUMERIC = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _short(value, limit=80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class UntrustedReward:
    """Stands in for a spec with a ``python:`` part that this process's command line does not
    name (e.g. read from a checkpoint's config): nothing is imported; any use fails in one line."""

    has_prefix = False
    higher_is_better = True

    def __init__(self, spec: str, flag: str):
        self.name, self.flag = spec, flag

    def _refuse(self, *args, **kwargs):
        raise ConfigError(f"{self.flag} {self.name}: this user reward comes from a saved config, not from this "
                          f"command line, so it was not imported; to use it, name it: {self.flag} {self.name}")

    __call__ = cost = prefix = bleu_stats = _refuse


def bind_user_reward(spec: str, tgt_dict, subword_style: str, flag: str, bleu=None) -> UserReward:
    """Load ``spec`` (trust is the caller's check) and bind it to ``tgt_dict``."""
    fn = load_user_function(spec, flag)
    return UserReward(spec, fn, Detokenizer.from_dictionary(tgt_dict, subword_style), bleu=bleu, flag=flag)
