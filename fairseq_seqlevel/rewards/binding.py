"""A registry reward bound to a target dictionary: ``reward(hyp, refs)`` on raw ids.

The task binds ``--reward`` once and criterions bind their own ``--<prefix>-reward``
the same way.  ``dictionary`` is duck-typed (``symbols``, ``pad()``, ``eos()``,
...): a ``fairseq.data.Dictionary`` works, and nothing here imports fairseq.
"""

import logging

import torch

from fairseq_seqlevel.errors import ConfigError, check

from .bleu import BleuStats, bleu_stats, corpus_bleu_from_stats
from .mixed import MixedReward, is_mixed_spec, parse_mixed_spec
from .registry import available_rewards, get_reward
from .user import UntrustedReward, bind_user_reward, is_user_spec, load_user_function, named_on_command_line
from .words import BPE_CONTINUATION, SP_SPACE, WordMerger

logger = logging.getLogger(__name__)


def detect_subword_style(symbols):
    """Guess the subword convention of a dictionary from its symbols."""
    if any(s.startswith(SP_SPACE) for s in symbols):
        return "sentencepiece"
    if any(s.endswith(BPE_CONTINUATION) for s in symbols):
        return "subword_nmt"
    return "none"


class BoundReward:
    """A registry reward bound to a dictionary: ``reward(hyp, refs)``.

    ``hyp``: B x T target ids; ``refs``: B x T' or B x R x T' (with eos and
    pad as in fairseq targets).  With a word merger, ids are first turned into
    word ids on the same device; the pad id is kept so rewards can mask.
    """

    def __init__(self, reward, pad, eos, merger=None):
        self.reward = reward
        self.merger = merger
        # After merging, words are padded with the merger's pad and carry no eos.
        self.pad = pad if merger is None else merger.pad
        self.eos = eos if merger is None else None

    @property
    def name(self):
        return self.reward.name

    @property
    def higher_is_better(self):
        return self.reward.higher_is_better

    @property
    def low(self):
        return self.reward.low

    @property
    def high(self):
        return self.reward.high

    @property
    def has_prefix(self):
        return self.reward.prefix_fn is not None and self.merger is None

    def _words(self, hyp, refs):
        if self.merger is None:
            return hyp, refs
        shape = refs.shape
        flat_refs = refs.reshape(-1, shape[-1]) if refs.dim() == 3 else refs
        words_refs = self.merger(flat_refs)
        if refs.dim() == 3:
            words_refs = words_refs.reshape(shape[0], shape[1], -1)
        return self.merger(hyp), words_refs

    def __call__(self, hyp, refs):
        hyp, refs = self._words(hyp, refs)
        return self.reward(hyp, refs, self.pad, eos=self.eos)

    def cost(self, hyp, refs):
        hyp, refs = self._words(hyp, refs)
        return self.reward.cost(hyp, refs, self.pad, eos=self.eos)

    def prefix(self, hyp, refs):
        check(self.merger is None,
              "--reward-level word: rewards of every prefix need token-level scoring; "
              "use --reward-level token with this criterion")
        return self.reward.prefix(hyp, refs, self.pad, eos=self.eos)

    def bleu_stats(self, hyp, refs):
        """Corpus BLEU statistics of the batch on the reward's tokens, as one
        flat vector [matches(4), totals(4), hyp_len, ref_len] (summable)."""
        hyp, refs = self._words(hyp, refs)
        stats = bleu_stats(hyp, refs, self.pad, eos=self.eos).sum()
        return torch.cat([stats.matches, stats.totals, stats.hyp_len.view(1), stats.ref_len.view(1)])


def bleu_from_flat_stats(flat):
    """Corpus BLEU in [0, 100] from summed :meth:`BoundReward.bleu_stats` vectors."""
    flat = torch.as_tensor(flat).long()
    stats = BleuStats(flat[0:4], flat[4:8], flat[8], flat[9])
    return 100.0 * float(corpus_bleu_from_stats(stats))


def validate_reward_name(name, flag):
    """ConfigError unless ``name`` is a registry reward, a ``python:`` reward or a mix of them
    (a ``python:`` part is imported here, at start-up, only if this command line names it)."""
    if is_mixed_spec(name) or is_user_spec(name):
        _check_spec(name, flag)
        return
    try:
        get_reward(name)
    except ValueError as e:
        raise ConfigError(f"{flag}: {e}") from None


def bind_reward(name, tgt_dict, reward_level="token", subword_style="auto", flag="--reward", *, needs_prefix=False):
    """Build reward ``name`` bound to ``tgt_dict`` (pad, eos, word merging).

    ``name``: a registry reward, ``python:MODULE:FUNCTION`` (:mod:`.user`) or a mix
    ``NAME:W,...`` (:mod:`.mixed`).  ``needs_prefix``: refuse, at once, a reward without a
    prefix variant (criterions that score every prefix)."""
    if is_mixed_spec(name) or is_user_spec(name):
        return _bind_spec(name, tgt_dict, reward_level, subword_style, flag, needs_prefix)
    validate_reward_name(name, flag)
    reward = get_reward(name)
    merger = None
    if reward.bind is not None:  # chrF: reads the characters of the dictionary's symbols, at any level
        style = detect_subword_style(tgt_dict.symbols) if subword_style == "auto" else subword_style
        reward = reward.bind(tgt_dict, style)
        logger.info(f"{flag} {name} on the characters of the target dictionary's symbols (subwords: {style})")
    elif reward_level == "word":
        style = detect_subword_style(tgt_dict.symbols) if subword_style == "auto" else subword_style
        if style != "none":
            merger = WordMerger.from_dictionary(tgt_dict, style)
        logger.info(f"{flag} {name} at word level (subwords: {style})")
    bound = BoundReward(reward, tgt_dict.pad(), tgt_dict.eos(), merger)
    if needs_prefix and not bound.has_prefix:
        raise ConfigError(f"{flag} {name}: this criterion scores every prefix; reward '{name}' has no prefix variant "
                          "at this reward level")
    return bound


# ------------------------------------------------ python: and mixed specs

def _parts(name, flag):
    """[(part name, weight)] of a spec: a mix, or one python: reward of weight 1."""
    return parse_mixed_spec(name, flag) if is_mixed_spec(name) else [(name, 1.0)]


def _check_spec(name, flag):
    parts = _parts(name, flag)
    for part, _ in parts:
        if not is_user_spec(part) and part not in available_rewards():
            raise ConfigError(f"{flag} {name}: unknown reward {part!r}; known rewards: "
                              f"{', '.join(available_rewards())}, python:MODULE:FUNCTION")
    users = [part for part, _ in parts if is_user_spec(part)]
    if users and named_on_command_line(name):
        for part in users:
            load_user_function(part, flag)
    return parts, users


def _bind_spec(name, tgt_dict, reward_level, subword_style, flag, needs_prefix):
    parts, users = _check_spec(name, flag)
    if users and needs_prefix:
        raise ConfigError(f"{flag} {name}: this criterion scores every prefix; a python: reward has no prefix "
                          "variant (use built-in rewards, or a mix of them)")
    if users and not named_on_command_line(name):
        # e.g. fairseq-validate / hub loading rebuild the task from a checkpoint's config:
        # never import a module that a file names
        logger.warning(f"{flag} {name}: not on this command line, not imported (a saved config names it)")
        return UntrustedReward(name, flag)
    bleu = bind_reward("bleu", tgt_dict, reward_level, subword_style, flag=flag)
    if subword_style == "auto":
        subword_style = detect_subword_style(tgt_dict.symbols)
    bound = [(bind_user_reward(part, tgt_dict, subword_style, flag, bleu=bleu) if is_user_spec(part)
              else bind_reward(part, tgt_dict, reward_level, subword_style, flag=flag), weight)
             for part, weight in parts]
    if not is_mixed_spec(name):
        return bound[0][0]
    mixed = MixedReward(name, bound, bleu, flag=flag)
    if needs_prefix and not mixed.has_prefix:
        raise ConfigError(f"{flag} {name}: this criterion scores every prefix; not every part of the mix has a "
                          "prefix variant at this reward level")
    return mixed
