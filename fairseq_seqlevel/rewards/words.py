"""Merge subword token ids into word ids, so rewards can be word-level.

``WordMerger`` maps a padded ``[..., T]`` subword tensor to a padded
``[..., W]`` word-id tensor such that equal word ids mean equal decoded
whitespace-separated words (sentencepiece or subword_nmt conventions), so
word-level ``sentence_bleu`` equals sacrebleu on the decoded strings.  Word
ids are polynomial hashes of the word's characters (two moduli packed into
one int64); padding is ``pad = -1``.

Design: docs/rewards.md, "Word-level rewards".
"""

import math
import random
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._common import valid_token_mask

SENTENCEPIECE = "sentencepiece"
SUBWORD_NMT = "subword_nmt"
CONVENTIONS = (SENTENCEPIECE, SUBWORD_NMT)

#: The one definition of the subword markers (tasks and smoothing import these).
SP_SPACE = "\u2581"  # sentencepiece: a piece starting with it starts a word
BPE_CONTINUATION = "@@"  # subword-nmt: a token ending with it continues into the next
_MODULI = (2147483647, 2147483629)  # primes 2^31 - 1 and 2^31 - 19
_BASES = tuple(random.Random(0x5EED).randrange(1 << 20, m - 1) for m in _MODULI)
#: Word ids of standalone tokens are ``_STANDALONE_OFFSET + token_id``.
_STANDALONE_OFFSET = _MODULI[0] * _MODULI[1]
_STANDALONE = object()  # marker segment text for a standalone token

Segment = Tuple[bool, object]  # (starts a new word, characters or _STANDALONE)


def _split_on_whitespace(text: str) -> List[str]:
    """Split at every whitespace character (as ``str.split()`` sees them),
    keeping empty parts so the number of boundaries is preserved."""
    parts, current = [], []
    for char in text:
        if char.isspace():
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def symbol_segments(symbol: str, convention: str) -> List[Segment]:
    """How one subword symbol contributes to the decoded word sequence.

    The first segment continues the current word; each later one starts a
    new word.  E.g. sentencepiece "▁ab" -> [(False, ""), (True, "ab")];
    subword_nmt "ab" -> [(False, "ab"), (True, "")] (the word ends after it).
    """
    if convention == SENTENCEPIECE:
        text, ends_word = symbol.replace(SP_SPACE, " "), False
    elif convention == SUBWORD_NMT:
        continues = symbol.endswith(BPE_CONTINUATION)
        text = symbol[: -len(BPE_CONTINUATION)] if continues else symbol
        ends_word = not continues
    else:
        raise ValueError(f"unknown convention {convention!r}; expected one of {CONVENTIONS}")
    parts = _split_on_whitespace(text)
    segments = [(False, parts[0])] + [(True, part) for part in parts[1:]]
    if ends_word:
        segments.append((True, ""))
    return segments


def _char_hash(text: str, base: int, modulus: int) -> int:
    value = 0
    for char in text:
        value = (value * base + ord(char) + 1) % modulus
    return value


def _build_tables(segments_per_symbol: Sequence[List[Segment]]) -> Dict[str, Tensor]:
    """Dense ``[V, K]`` tables: boundary, per-modulus hash, length, standalone id."""
    width = max(2, max((len(s) for s in segments_per_symbol), default=0))
    vocab = len(segments_per_symbol)
    boundary = torch.zeros(vocab, width, dtype=torch.bool)
    length = torch.zeros(vocab, width, dtype=torch.long)
    standalone = torch.full((vocab, width), -1, dtype=torch.long)
    hashes = [torch.zeros(vocab, width, dtype=torch.long) for _ in _MODULI]
    for idx, segments in enumerate(segments_per_symbol):
        for k, (starts_word, text) in enumerate(segments):
            boundary[idx, k] = starts_word
            if text is _STANDALONE:
                standalone[idx, k] = idx
                continue
            length[idx, k] = len(text)
            for table, base, modulus in zip(hashes, _BASES, _MODULI):
                table[idx, k] = _char_hash(text, base, modulus)
    tables = {"boundary": boundary, "length": length, "standalone": standalone}
    tables.update({f"hash{m}": table for m, table in enumerate(hashes)})
    return tables


def _powers(base: int, modulus: int, count: int) -> Tensor:
    """``[count]`` LongTensor of base^k mod modulus."""
    values, value = [], 1
    for _ in range(count):
        values.append(value)
        value = value * base % modulus
    return torch.tensor(values, dtype=torch.long)


class WordMerger:
    """Subword ids -> word ids (see module docstring for the exact rules).

    Args:
        symbols: symbol string of every id (fairseq ``Dictionary.symbols``).
        convention: ``"sentencepiece"`` or ``"subword_nmt"``.
        pad: padding id of the input; the sentence ends at the first pad
            (it need not be a valid symbol index).
        eos: if given, the sentence also ends at the first eos.
        drop_ids: ids removed wherever they occur (e.g. bos).
        standalone_ids: ids that are always a word by themselves (e.g. unk).

    Attributes:
        pad: the padding value of the returned word tensors (-1; never a word id).
    """

    pad = -1

    def __init__(self, symbols: Sequence[str], convention: str, pad: int, eos: Optional[int] = None,
                 drop_ids: Iterable[int] = (), standalone_ids: Iterable[int] = ()):
        if convention not in CONVENTIONS:
            raise ValueError(f"unknown convention {convention!r}; expected one of {CONVENTIONS}")
        self.convention = convention
        self.input_pad, self.eos = pad, eos
        dropped = set(drop_ids) | {pad} | ({eos} if eos is not None else set())
        standalone = set(standalone_ids)
        segments = []
        for idx, symbol in enumerate(symbols):
            if idx in dropped:
                segments.append([])
            elif idx in standalone:
                segments.append([(True, _STANDALONE), (True, "")])
            else:
                segments.append(symbol_segments(symbol, convention))
        segments.append([])  # an extra no-op symbol that ignored positions look up
        self.vocab_size = len(symbols)
        self.max_symbol_chars = max((len(s) for s in symbols), default=0)
        self._cpu_tables = _build_tables(segments)
        self._device_tables: Dict[torch.device, Dict[str, Tensor]] = {}
        self._powers: Dict[torch.device, List[Tensor]] = {}

    @classmethod
    def from_dictionary(cls, dictionary, convention: str, truncate_at_eos: bool = True) -> "WordMerger":
        """Build from a fairseq ``Dictionary`` (duck-typed; fairseq is not
        imported): pad/eos/bos dropped, unk standalone."""
        eos = dictionary.eos()
        return cls(dictionary.symbols, convention, pad=dictionary.pad(),
                   eos=eos if truncate_at_eos else None,
                   drop_ids={dictionary.bos(), eos}, standalone_ids={dictionary.unk()})

    def _tables(self, device: torch.device) -> Dict[str, Tensor]:
        if device not in self._device_tables:
            self._device_tables[device] = {k: v.to(device) for k, v in self._cpu_tables.items()}
        return self._device_tables[device]

    def _power_tables(self, device: torch.device, count: int) -> List[Tensor]:
        """P^k mod M for k < count, per modulus, cached per device (grown on demand)."""
        cached = self._powers.get(device)
        if cached is None or cached[0].numel() < count:
            size = max(count, 2 * (cached[0].numel() if cached else 0), 256)
            cached = [_powers(b, m, size).to(device) for b, m in zip(_BASES, _MODULI)]
            self._powers[device] = cached
        return cached

    def __call__(self, tokens: Tensor) -> Tensor:
        """Merge subwords into words.

        Args:
            tokens: LongTensor ``[..., T]`` of symbol ids in ``[0, len(symbols))``
                up to the first pad/eos, right-padded.
        Returns:
            LongTensor ``[..., W]`` of word ids (>= 0), right-padded with
            ``self.pad`` (-1); W = max word count in the batch.
        Cost:
            O(N * T * K) time and memory for N rows (K = max segments per
            symbol, 2 for ordinary vocabularies); one host sync to size W.
        """
        lead, length = tokens.shape[:-1], tokens.size(-1)
        rows = tokens.reshape(math.prod(lead), length)
        tables = self._tables(tokens.device)
        kept = valid_token_mask(rows, self.input_pad, self.eos)
        # Ignored positions (from the first pad/eos on) look up the no-op symbol.
        ids = torch.where(kept, rows, torch.full_like(rows, self.vocab_size))
        words = self._merge_rows({name: table[ids].flatten(1) for name, table in tables.items()})
        return words.view(*lead, words.size(-1))

    def _merge_rows(self, segments: Dict[str, Tensor]) -> Tensor:
        """Segments ``[N, S]`` -> padded word ids ``[N, W]``."""
        boundary, length = segments["boundary"], segments["length"]
        num_rows, num_segments = boundary.shape
        device = boundary.device
        word_of_segment = boundary.long().cumsum(-1)  # word 0 = text before any boundary
        num_slots = num_segments + 1
        word_length = torch.zeros(num_rows, num_slots, dtype=torch.long, device=device)
        word_length.scatter_add_(1, word_of_segment, length)
        # Characters of the same word after each segment: the exponent that
        # shifts this segment's hash into place (H(a+b) = H(a) P^|b| + H(b)).
        chars_so_far = length.cumsum(-1)
        word_end = torch.zeros_like(word_length).scatter_reduce_(1, word_of_segment, chars_so_far, "amax")
        chars_after = word_end.gather(1, word_of_segment) - chars_so_far
        max_chars = num_segments * max(1, self.max_symbol_chars) + 1  # static bound, no sync
        word_hash = []
        for m, (modulus, powers) in enumerate(zip(_MODULI, self._power_tables(device, max_chars))):
            shifted = segments[f"hash{m}"] * powers[chars_after] % modulus
            word_hash.append(torch.zeros_like(word_length).scatter_add_(1, word_of_segment, shifted) % modulus)
        standalone = torch.full_like(word_length, -1).scatter_reduce_(
            1, word_of_segment, segments["standalone"], "amax")
        word_id = torch.where(standalone >= 0, standalone + _STANDALONE_OFFSET,
                              word_hash[0] * _MODULI[1] + word_hash[1])
        return self._compact_words(word_id, (word_length > 0) | (standalone >= 0))

    def _compact_words(self, word_id: Tensor, keep: Tensor) -> Tensor:
        """Move kept word slots to the left; pad the rest with ``self.pad``."""
        position = keep.long().cumsum(-1) - 1
        width = int(keep.sum(-1).max()) if keep.numel() else 0
        out = torch.full((word_id.size(0), width + 1), self.pad, dtype=torch.long, device=word_id.device)
        # Dropped slots all land in the extra last column, which is cut off.
        out.scatter_(1, torch.where(keep, position, torch.full_like(position, width)), word_id)
        return out[:, :width]
