"""chrF / chrF++ rewards on padded token ids: sacrebleu's sentence ``CHRF()`` / ``CHRF(word_order=2)``
score / 100 of the text fairseq shows for the ids: ``Dictionary.string`` (bos and eos dropped,
``<unk>`` shown as "<unk>", any other id -- a language token too -- as its symbol; a task's forced
language tokens are removed before scoring by :mod:`.output_view`) decoded per subword style
("sentencepiece": "▁" is a space, "subword_nmt": "@@ " removed, "none": tokens joined by spaces).
Without symbols (the registry's unbound rewards) ids are written in decimal, joined by spaces, as
:mod:`.bleu` reads them.  :meth:`ChrF.prefix` scores every prefix ``hyp[:, :t+1]``.

Design: each symbol's characters (dense ids) and the whitespace marks between them are tabulated
once; a call packs the batch's characters into one stream, each sequence ended by a symbol of its
side, and sorts all positions ONCE by (example, next 6 characters, side): every order's equal
n-grams are then contiguous runs, clipped run by run (exact, no hashing).  chrF++ words get exact
ids from one more sort of their characters.  Prefixes add per-order ranks of repeated n-grams.
Registry rewards reach their dictionary through ``Reward.bind`` (:mod:`.registry`).
"""

import copy
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import as_multi_reference, check_batch, valid_token_mask
from .words import BPE_CONTINUATION, SP_SPACE

SUBWORD_STYLES = ("sentencepiece", "subword_nmt", "none")
#: sacrebleu's ``CHRF._PUNCTS``: chrF++ splits one of them off the end (else the start) of a word.
PUNCTUATION = frozenset('!"#$%&\'()*+,-./:;<=>?@[\\]^_`{|}~')
CHAR_ORDER = 6
BETA = 2
_KEY_BITS = 62  # bits of one sort key (non-negative int64)
#: Characters (hypotheses and references together) per chunk of rows: larger batches are
#: scored in chunks, which keeps intermediates cache-sized (fastest on CPU in our measurements;
#: 4,000 Bible pairs in one piece took up to 1.6x as long).  Results never depend on it.
CHAR_BUDGET = 1 << 18


# ------------------------------------------------------------------ characters of the ids

def decode_symbol(symbol: str, style: str) -> Tuple[List[str], List[int], int]:
    """How a symbol shows in the decoded text: its non-whitespace characters, the number of
    whitespace "marks" before each of them within the symbol, and its marks in all (a word end
    after it included).  Two characters are in one word iff no mark lies between them.

    fairseq's decoding: sentencepiece ``.replace(" ", "").replace("▁", " ")``; subword_nmt
    ``(" ".join(tokens) + " ").replace("@@ ", "")``; none ``" ".join(tokens)``.
    """
    if style == "sentencepiece":
        text, trail = symbol.replace(" ", ""), 0
    elif style == "subword_nmt":
        continues = symbol.endswith(BPE_CONTINUATION)
        text, trail = (symbol[: -len(BPE_CONTINUATION)], 0) if continues else (symbol, 1)
    elif style == "none":
        text, trail = symbol, 1
    else:
        raise ValueError(f"unknown subword style {style!r}; expected one of {SUBWORD_STYLES}")
    chars, before, marks = [], [], 0
    for char in text:
        if char.isspace() or (style == "sentencepiece" and char == SP_SPACE):
            marks += 1
        else:
            chars.append(char)
            before.append(marks)
    return chars, before, marks + trail


class _SymbolChars:
    """Character tables of a vocabulary.  Rows: the symbols, then a no-op row (ignored and
    dropped positions: no characters, no marks), then the end marker (one character, id 0, with
    a mark before it).  Characters have dense ids 1..A in code-point order."""

    def __init__(self, symbols: Sequence[str], style: str, drop_ids=()):
        drop = set(drop_ids)
        decoded = [([], [], 0) if idx in drop else decode_symbol(s, style) for idx, s in enumerate(symbols)]
        alphabet = sorted({c for chars, _, _ in decoded for c in chars})
        dense = {c: k + 1 for k, c in enumerate(alphabet)}
        rows = [([dense[c] for c in chars], before, total) for chars, before, total in decoded]
        rows += [([], [], 0), ([0], [1], 1)]
        self.noop, self.marker = len(symbols), len(symbols) + 1
        self.alphabet = len(alphabet)
        count = [len(r[0]) for r in rows]
        self._cpu = {
            "flat_chars": torch.tensor([c for r in rows for c in r[0]], dtype=torch.long),
            "flat_marks": torch.tensor([m for r in rows for m in r[1]], dtype=torch.long),
            "count": torch.tensor(count, dtype=torch.long),
            "offset": torch.tensor([0] + count[:-1], dtype=torch.long).cumsum(0),
            "marks_total": torch.tensor([r[2] for r in rows], dtype=torch.long),
            "punct": torch.tensor([False] + [c in PUNCTUATION for c in alphabet]),
        }
        self.t = self._cpu
        self._device: Dict[torch.device, "_SymbolChars"] = {}

    def on(self, device) -> "_SymbolChars":
        """This table with its tensors on ``device`` (cached; the instance itself is not changed)."""
        if device not in self._device:
            moved = copy.copy(self)
            moved.t = {k: v.to(device) for k, v in self._cpu.items()}
            self._device[device] = moved
        return self._device[device]

    def _rows(self, name, ids):
        return self.t[name].index_select(0, ids.reshape(-1)).view(ids.shape)

    def count(self, ids):
        return self._rows("count", ids)

    def marks_total(self, ids):
        return self._rows("marks_total", ids)

    def expand(self, ids, first, token, with_marks):
        """Characters (and marks before them within their symbol) of the flat ``ids``, packed:
        element p is character ``p - first[token[p]]`` of ``ids[token[p]]``."""
        index = (self.t["offset"].index_select(0, ids) - first).index_select(0, token)
        index += torch.arange(token.numel(), device=ids.device)
        marks = self.t["flat_marks"].index_select(0, index) if with_marks else None
        return self.t["flat_chars"].index_select(0, index), marks

    def punct(self, chars):
        return self.t["punct"].index_select(0, chars)


class _DecimalChars:
    """The ids themselves in decimal, joined by spaces (ids >= 0; digit d has char id d + 1)."""

    noop, marker, alphabet = -1, -2, 10

    def __init__(self, device=None):
        self.powers = 10 ** torch.arange(19, device=device, dtype=torch.long)  # 10^0 .. 10^18
        self._device: Dict[torch.device, "_DecimalChars"] = {}

    def on(self, device) -> "_DecimalChars":
        if device not in self._device:
            self._device[device] = _DecimalChars(device)
        return self._device[device]

    def _digits(self, ids):
        return torch.searchsorted(self.powers, ids.clamp(min=0), right=True).clamp(min=1)

    def count(self, ids):
        return torch.where(ids >= 0, self._digits(ids), (ids == self.marker).long())

    def marks_total(self, ids):
        return (ids != self.noop).long()

    def expand(self, ids, first, token, with_marks):
        k = torch.arange(token.numel(), device=ids.device) - first.index_select(0, token)
        ids = ids.index_select(0, token)
        place = (self._digits(ids) - 1 - k).clamp(min=0)
        chars = torch.where(ids >= 0, ids.clamp(min=0) // self.powers[place] % 10 + 1, 0)
        return chars, (ids == self.marker).long() if with_marks else None

    def punct(self, chars):
        return torch.zeros_like(chars, dtype=torch.bool)


# ------------------------------------------------------------------ streams of symbols

class _Stream(NamedTuple):
    """Sequences ``b*(R+1) + side`` (side 0 the hypothesis, 1..R the references), packed in
    order.  Every sequence ends with one element holding its side (0..R), symbols are >= R+1:
    an n-gram running past a sequence's end matches nothing of another side."""

    sym: Tensor      # [N]
    seq_len: Tensor  # [S] symbols of each sequence, without its end
    bits: int        # symbols are < 2^bits
    sides: int       # R + 1


def _seq_offsets(stream: _Stream) -> Tensor:
    """``[S]``: index of each sequence's first element."""
    size = stream.seq_len + 1
    return size.cumsum(0) - size


def _hyp_elements(stream: _Stream):
    """(stream index of every hypothesis element, in order ``[H]``; ``[B]`` index of each
    example's first one among them)."""
    size = stream.seq_len.view(-1, stream.sides)[:, 0] + 1
    offset = size.cumsum(0) - size
    total = int(offset[-1] + size[-1])
    start = _seq_offsets(stream)[:: stream.sides] - offset
    index = torch.repeat_interleave(start, size, output_size=total) + torch.arange(total, device=start.device)
    return index, offset


def _pack_chars(source, ids: Tensor, sides: int, with_words: bool):
    """``ids [S, W]`` (``source.noop`` where ignored) -> (character stream, and for chrF++
    (whitespace marks before each element, punctuation flags), both ``[N]``)."""
    num_seqs, width = ids.shape
    device = ids.device
    ids = torch.cat([ids, ids.new_full((num_seqs, 1), source.marker)], dim=1)
    kept = ids != source.noop
    tokens = kept.sum(1)  # per sequence, its end marker included
    ids = ids.view(-1).index_select(0, kept.view(-1).nonzero().squeeze(1))
    count = source.count(ids)
    first = count.cumsum(0) - count
    total = int(first[-1] + count[-1])
    token = torch.repeat_interleave(torch.arange(ids.numel(), device=device), count, output_size=total)
    raw, marks = source.expand(ids, first, token, with_words)  # raw: 0 at the ends
    words = None
    if with_words:  # marks before each element (running over the batch: only differences count)
        per_token = source.marks_total(ids)
        marks += (per_token.cumsum(0) - per_token).index_select(0, token)
        words = (marks, source.punct(raw))
    ends = first.index_select(0, tokens.cumsum(0) - 1)  # each sequence's end element
    seq_len = _diff(ends + 1) - 1
    sym = raw.add_(sides)
    sym.index_put_((ends,), torch.arange(sides, device=device).repeat(num_seqs // sides))
    return _Stream(sym, seq_len, (source.alphabet + sides).bit_length(), sides), words


# ------------------------------------------------------------------ grouping by one sort

class _LexSort:
    """Rows sorted lexicographically by integer columns (most significant first; column ``j``
    in ``[0, 2^bits[j])``), for keys wider than one int64: columns are packed into 62-bit keys,
    sorted least significant key first with stable sorts."""

    def __init__(self, columns: List[Tensor], bits: List[int]):
        keys, place, used = [], [], _KEY_BITS
        for column, width in zip(reversed(columns), reversed(bits)):
            if used + width > _KEY_BITS:
                keys.append(column)
                used = 0
            else:
                keys[-1] = keys[-1] | (column << used)
            place.append((len(keys) - 1, used))
            used += width
        self.place = place[::-1]
        perm = values = None
        for key in keys:
            values, order = torch.sort(key if perm is None else key.index_select(0, perm), stable=True)
            perm = order if perm is None else perm.index_select(0, order)
        self.perm = perm
        self.sorted_keys = [key.index_select(0, perm) for key in keys[:-1]] + [values]

    def differs(self, j: int) -> Tensor:
        """BoolTensor [M-1], sorted order: rows i and i+1 differ in columns 0..j."""
        first_key, shift = self.place[j]
        out = None
        for k in range(first_key, len(self.sorted_keys)):
            key = self.sorted_keys[k]
            if k == first_key and shift:
                key = key >> shift
            d = key[1:] != key[:-1]
            out = d if out is None else out | d
        return out


class _Groups:
    """The elements of a stream (and optional query rows, which count for nothing) sorted by
    (example, s_1..s_orders, side): for every order n, equal (example, n-gram) rows are
    contiguous groups.  Elements past a sequence's end need no masking (their n-grams contain
    that sequence's end symbol, unique to its side)."""

    def __init__(self, stream: _Stream, num_orders: int, example_bits: int, queries: Optional[List[Tensor]] = None):
        sym, sides, bits = stream.sym, stream.sides, stream.bits
        device = sym.device
        n_data = sym.numel()
        size = stream.seq_len + 1
        num_examples = size.numel() // sides
        self.side_bits = sides.bit_length()  # room for side == sides (query rows)
        self.windows = None  # the n-gram at each element as one number (one-key case)
        if example_bits + num_orders * bits + self.side_bits <= _KEY_BITS:  # the usual case: one key
            gram = self.windows = _windows(sym, num_orders, bits)
            top = num_orders * bits + self.side_bits
            frame = ((torch.arange(num_examples, device=device) << top).unsqueeze(1)
                     | torch.arange(sides, device=device)).view(-1)
            key = torch.repeat_interleave(frame, size, output_size=n_data) | (gram << self.side_bits)
            if queries is not None:
                query_gram = queries[1]
                for column in queries[2:]:
                    query_gram = (query_gram << bits) | column
                key = torch.cat([key, (queries[0] << top) | (query_gram << self.side_bits) | sides])
            values, self.perm = torch.sort(key)
            self._change = values[1:] ^ values[:-1]
            lowest = values
        else:
            shifted = torch.cat([sym, sym.new_zeros(num_orders)])
            example = torch.repeat_interleave(torch.arange(num_examples, device=device),
                                              size.view(num_examples, sides).sum(1), output_size=n_data)
            side = torch.repeat_interleave(torch.arange(sides, device=device).repeat(num_examples), size,
                                           output_size=n_data)
            columns = [example] + [shifted[j: j + n_data] for j in range(num_orders)] + [side]
            if queries is not None:
                queries = queries + [torch.full_like(queries[0], sides)]
                columns = [torch.cat([c, q]) for c, q in zip(columns, queries)]
            self._lex = _LexSort(columns, [example_bits] + [bits] * num_orders + [self.side_bits])
            self.perm, self._change = self._lex.perm, None
            lowest = self._lex.sorted_keys[0]
        # one key: rows i, i+1 differ in columns 0..n iff change_i >= thresholds[n-1]
        self._thresholds = [1 << (self.side_bits + (num_orders - n) * bits) for n in range(1, num_orders + 1)]
        self._bits = bits
        side = lowest & ((1 << self.side_bits) - 1)  # the side is the lowest field
        # All sides' running counts in one cumulative sum: side k in bits [k*c, (k+1)*c) of a
        # pack, c wide enough for the count of all elements (so fields never carry).
        self.count_bits = max(1, n_data.bit_length())
        per_pack = _KEY_BITS // self.count_bits
        self.packs = [(a, min(a + per_pack, sides)) for a in range(0, sides, per_pack)]
        self.cums = []
        for a, b in self.packs:
            weight = torch.tensor([1 << (self.count_bits * (k - a)) if a <= k < b else 0
                                   for k in range(1 << self.side_bits)], device=device)
            self.cums.append(weight.index_select(0, side).cumsum(0))
        self.sides = sides

    def ends(self, n: int) -> Tensor:
        """BoolTensor [M], sorted order: the last row of its order-n group."""
        out = torch.empty(self.perm.numel(), dtype=torch.bool, device=self.perm.device)
        out[-1] = True
        if self._change is not None:
            torch.ge(self._change, self._thresholds[n - 1], out=out[:-1])
        else:
            out[:-1] = self._lex.differs(n)
        return out

    def coarseness(self, rows: Tensor) -> Tensor:
        """``[G]`` for ascending sorted rows ending with the last one: a value ``v`` such that
        the row ends its order-n group iff :meth:`ends_order` ``(v, n)``."""
        if self._change is not None:  # how the row differs from the next one (the last row: from all)
            return torch.cat([self._change.index_select(0, rows[:-1]), rows.new_full((1,), 1 << 62)])
        level = torch.zeros_like(rows)  # the first column in which the row differs from the next
        for j in range(len(self._thresholds) + 1):
            level[:-1] += ~self._lex.differs(j).index_select(0, rows[:-1])
        return level

    def ends_order(self, coarseness: Tensor, n: int) -> Tensor:
        if self._change is not None:
            return coarseness >= self._thresholds[n - 1]
        return coarseness <= n

    def cumulative_counts(self, rows: Tensor) -> List[Tensor]:
        """Each side's number of rows up to and including each of ``rows`` ``[G]``."""
        return self._unpack([cum.index_select(0, rows) for cum in self.cums])

    def _unpack(self, packed: List[Tensor]) -> List[Tensor]:
        """Each side's counts from the per-pack packed counts."""
        mask = (1 << self.count_bits) - 1
        return [(value >> (self.count_bits * (k - a))) & mask if k > a else value & mask
                for (a, b), value in zip(self.packs, packed) for k in range(a, b)]

    def group_counts(self, ends: Tensor):
        """(row -> group id ``[M]``, each side's count per group ``[G]``)."""
        end_rows = ends.nonzero().squeeze(1)
        gid = F.pad(ends[:-1].long().cumsum(0), (1, 0))
        packed = []
        for cum in self.cums:
            at_end = cum.index_select(0, end_rows)
            packed.append(torch.diff(at_end, prepend=at_end.new_zeros(1)))
        return gid, self._unpack(packed)


def _diff(x: Tensor) -> Tensor:
    """``x[i] - x[i-1]`` (``x[0]`` for i = 0)."""
    out = x.clone()
    out[1:] -= x[:-1]
    return out


def _clipped_matches(stream: _Stream, groups: "_Groups", num_orders: int) -> Tensor:
    """LongTensor ``[num_orders, R, B]``: sum over n-grams g of min(count_hyp(g), count_ref_r(g)).

    Groups of order n are unions of consecutive groups of order n+1, so the rows that end a
    group are compacted once for the highest order and then further per lower order."""
    rows = groups.ends(num_orders).nonzero().squeeze(1)
    cum, coarse = groups.cumulative_counts(rows), groups.coarseness(rows)
    example_end = (stream.seq_len + 1).view(-1, stream.sides).sum(1).cumsum(0) - 1  # same rows once sorted
    at = torch.searchsorted(rows, example_end)  # each example's last row among the kept rows
    out = []
    for n in range(num_orders, 0, -1):
        if n < num_orders:
            keep = groups.ends_order(coarse, n).nonzero().squeeze(1)
            cum, coarse = [c.index_select(0, keep) for c in cum], coarse.index_select(0, keep)
            at = torch.searchsorted(keep, at)
        hyp = _diff(cum[0])
        per_ref = [torch.minimum(hyp, _diff(ref)).cumsum(0).index_select(0, at) for ref in cum[1:]]
        out.append(_diff(torch.stack(per_ref, 1)))
    return torch.stack(out[::-1]).transpose(1, 2)


class _HypRanks:
    """Per order: a hypothesis n-gram is a clipped match for reference r iff its occurrence
    rank (by position) is within reference r's count.  Also counts, for query rows, a group's
    occurrences among the hypothesis elements before a compact index."""

    def __init__(self, groups: _Groups, hyp_index: Tensor):
        self.groups = groups
        perm = groups.perm
        self.inverse = torch.empty_like(perm).index_copy_(0, perm, torch.arange(perm.numel(), device=perm.device))
        self.hyp_sorted_pos = self.inverse.index_select(0, hyp_index)
        self.num_hyp = hyp_index.numel()

    def order(self, n: int, query_rows: Optional[Tensor] = None):
        """(matched BoolTensor [R, H] over the compact hypothesis elements, ``[sides, G]`` group
        counts, group ids of the query rows, sorted keys for :meth:`occurrences`)."""
        gid, counts = self.groups.group_counts(self.groups.ends(n))
        g = gid.index_select(0, self.hyp_sorted_pos)
        sorted_g, order = torch.sort(g, stable=True)  # by group, then position
        first = torch.empty(self.num_hyp, dtype=torch.bool, device=g.device)
        first[0] = True
        torch.ne(sorted_g[1:], sorted_g[:-1], out=first[1:])
        index = torch.arange(self.num_hyp, device=g.device)
        start = torch.cummax(index * first, 0).values
        rank = torch.empty_like(index).index_copy_(0, order, index - start + 1)
        matched = torch.stack([rank <= ref.index_select(0, g) for ref in counts[1:]])
        query_gid = None if query_rows is None else gid.index_select(0, self.inverse.index_select(0, query_rows))
        return matched, counts, query_gid, sorted_g * self.num_hyp + order

    def occurrences(self, keys: Tensor, gid: Tensor, limit: Tensor) -> Tensor:
        """Hypothesis elements of group ``gid`` with compact index < ``limit``."""
        base = gid * self.num_hyp
        return torch.searchsorted(keys, base + limit) - torch.searchsorted(keys, base)


def _prefix_counts(matched: Tensor, hyp_offset: Tensor, count: Tensor) -> Tensor:
    """``[R, C]``: matched elements among the first ``count [C]`` hypothesis elements of an
    example whose first one is at ``hyp_offset [C]`` (``matched [R, H]``: the compact
    hypothesis elements)."""
    cum = F.pad(matched.long().cumsum(1), (1, 0))
    return cum.index_select(1, hyp_offset + count) - cum.index_select(1, hyp_offset)


def _take(values: Tensor, index: Tensor) -> Tensor:
    """``values[index]`` for a 1-d ``values`` (index_select is much faster on CPU)."""
    return values.index_select(0, index.reshape(-1)).view(index.shape)


# ------------------------------------------------------------------ words of chrF++

def _windows(sym: Tensor, size: int, bits: int) -> Tensor:
    """``[N]``: symbols ``p .. p+size-1`` of the stream as one number (0 past its end)."""
    n = sym.numel()
    padded = torch.cat([sym, sym.new_zeros(size)])
    window = padded[:n].clone()
    for j in range(1, size):
        window.bitwise_left_shift_(bits).bitwise_or_(padded[j: j + n])
    return window


def _span_ids(sym: Tensor, start: Tensor, length: Tensor, bits: int, windows: Optional[Tensor] = None,
              per_limb: Optional[int] = None) -> Tensor:
    """Dense ids >= 1 of the strings ``sym[start:start+length]`` (symbols >= 1, lengths >= 1):
    equal iff the strings are.  Exact, no hashing: a string is its limbs of ``per_limb``
    symbols as numbers read off ``windows`` (:func:`_windows`); the last limb holds the r
    remaining symbols, a number in [2^((r-1) bits), 2^(r bits)), so lengths never collide.
    Strings of one limb (most words) take one sort; longer ones a sort per limb."""
    if start.numel() == 0:
        return start.clone()
    if windows is None:
        per_limb = _KEY_BITS // bits
        windows = _windows(sym, per_limb, bits)
    n = sym.numel()

    def limb(starts, lengths, j):
        left = (lengths - j * per_limb).clamp(0, per_limb)  # symbols in this limb (0: the limb is 0)
        return windows.index_select(0, (starts + j * per_limb).clamp(max=n - 1)) >> (bits * (per_limb - left))

    def dense(keys):  # ids 0.. of the distinct rows of ``keys`` (columns most significant first)
        if len(keys) == 1:
            values, perm = torch.sort(keys[0])
            change = values[1:] != values[:-1]
        else:
            order = _LexSort(keys, [per_limb * bits] * len(keys))
            perm, change = order.perm, order.differs(len(keys) - 1)
        ids = F.pad(change.long().cumsum(0), (1, 0))
        return torch.empty_like(ids).index_copy_(0, perm, ids), int(ids[-1]) + 1

    long_rows = (length > per_limb).nonzero().squeeze(1)
    if long_rows.numel() == 0:
        return dense([limb(start, length, 0)])[0] + 1
    short_rows = (length <= per_limb).nonzero().squeeze(1)
    ids = torch.empty_like(start)
    short_ids, num_short = dense([limb(start.index_select(0, short_rows), length.index_select(0, short_rows), 0)])
    ids.index_copy_(0, short_rows, short_ids + 1)
    long_start, long_length = start.index_select(0, long_rows), length.index_select(0, long_rows)
    limbs = -(-int(long_length.max()) // per_limb)
    ids.index_copy_(0, long_rows, dense([limb(long_start, long_length, j) for j in range(limbs)])[0] + 1 + num_short)
    return ids


class _WordTokens(NamedTuple):
    word_start: Tensor   # [W] stream positions where a whitespace word starts (each sequence end included)
    token_start: Tensor  # [K] positions where a chrF++ token starts (word starts + punctuation splits)
    punct: Tensor        # [N] bool


def _word_tokens(chars: _Stream, words) -> _WordTokens:
    """sacrebleu's ``CHRF._remove_punctuation`` on the character stream: a word of >= 2
    characters ending with punctuation gives (word[:-1], word[-1]), else one starting with it
    gives (word[0], word[1:])."""
    marks, punct = words
    n = chars.sym.numel()
    starts = torch.empty(n, dtype=torch.bool, device=marks.device)
    starts[0] = True
    torch.ne(marks[1:], marks[:-1], out=starts[1:])
    starts[1:] |= chars.sym[:-1] < chars.sides  # after a sequence end (the end is a word of its own)
    word_start = starts.nonzero().squeeze(1)
    word_end = torch.cat([word_start[1:], word_start.new_full((1,), n)]) - 1  # last character
    longer = word_end > word_start
    punct_first, punct_last = _take(punct, word_start) & longer, _take(punct, word_end) & longer
    split = torch.where(punct_last, word_end, word_start + 1)  # second token's start
    both = torch.stack([word_start, split], 1).view(-1)
    keep = torch.stack([torch.ones_like(longer), punct_last | punct_first], 1).view(-1)
    return _WordTokens(word_start, both.index_select(0, keep.nonzero().squeeze(1)), punct)


def _word_stream(chars: _Stream, tokens: _WordTokens, windows, per_limb, extra_spans=None):
    """The stream of chrF++ tokens (exact ids), and the ids of ``extra_spans`` (start, length)."""
    sides = chars.sides
    starts = tokens.token_start
    length = torch.diff(starts, append=starts.new_full((1,), chars.sym.numel()))
    sym = chars.sym.index_select(0, starts)
    is_end = sym < sides
    real = (~is_end).nonzero().squeeze(1)
    span_start, span_length = starts.index_select(0, real), length.index_select(0, real)
    if extra_spans is not None:
        span_start = torch.cat([span_start, extra_spans[0]])
        span_length = torch.cat([span_length, extra_spans[1]])
    ids = _span_ids(chars.sym, span_start, span_length, chars.bits, windows, per_limb) + (sides - 1)
    sym = sym.index_copy(0, real, ids[: real.numel()])
    ends = is_end.nonzero().squeeze(1)
    seq_len = torch.diff(ends, prepend=ends.new_full((1,), -1)) - 1
    bits = int(ids.max()).bit_length() if ids.numel() else sides.bit_length()
    return _Stream(sym, seq_len, bits, sides), ids[real.numel():]


# ------------------------------------------------------------------ scores

def chrf_from_counts(streams, beta: float = BETA) -> Tensor:
    """sacrebleu's sentence chrF (``eps_smoothing=False``) in [0, 1], best over references.

    Args:
        streams: ``[(hyp_len, ref_len, matches)]``, one per n-gram stream (characters, words):
            sequence lengths (order n has ``len - n + 1`` n-grams) and clipped matches
            ``[O, ...]``; all broadcastable, the reference dimension first (``[R, ...]``).
    Returns:
        DoubleTensor ``[...]``: max over references of F_beta of the precision and recall
        averaged over the effective orders (both sides have n-grams of that order).
    """
    precision = recall = effective = 0
    for hyp_len, ref_len, matches in streams:
        effective = effective + torch.minimum(hyp_len, ref_len).clamp(max=matches.size(0))
        for n, match in enumerate(matches.double()):
            precision = precision + match / (hyp_len - n).clamp(min=1)  # 0 where an order is not effective
            recall = recall + match / (ref_len - n).clamp(min=1)
    effective = effective.clamp(min=1)
    precision, recall = precision / effective, recall / effective
    factor = beta ** 2
    score = (1 + factor) * precision * recall / (factor * precision + recall).clamp(min=1e-300)  # 0 if both are
    return score.amax(0)


class ChrF:
    """chrF (``word_order=0``) / chrF++ (``word_order=2``) of token ids (module docstring).

    Args:
        symbols: the dictionary's symbol of every id; None: ids are scored as decimal numbers.
        subword_style: "sentencepiece", "subword_nmt" or "none" (how symbols decode to text).
        word_order: 0, 1 or 2 word n-gram orders (sacrebleu's ``word_order``).
        drop_ids: ids that fairseq removes from the text wherever they occur (bos).
    Cost:
        A few host syncs per call (stream sizes); one sort of all character positions of the
        batch (hypotheses and references) and O(positions) work per order.  chrF++ adds a sort
        of the words' characters (exact word ids) and one of the words.  The prefix variant adds
        one stable sort of the hypothesis positions per order (ranks of repeated n-grams).
    """

    def __init__(self, symbols: Optional[Sequence[str]] = None, subword_style: str = "none", word_order: int = 0,
                 drop_ids=(), char_order: int = CHAR_ORDER, beta: float = BETA):
        if subword_style not in SUBWORD_STYLES:
            raise ValueError(f"unknown subword style {subword_style!r}; expected one of {SUBWORD_STYLES}")
        if word_order not in (0, 1, 2) or char_order < 1:
            raise ValueError(f"chrF needs char_order >= 1 and word_order 0, 1 or 2, got {char_order}, {word_order}")
        self.word_order, self.char_order, self.beta = word_order, char_order, beta
        self._source = _DecimalChars() if symbols is None else _SymbolChars(symbols, subword_style, drop_ids)

    @classmethod
    def from_dictionary(cls, dictionary, subword_style: str, word_order: int = 0) -> "ChrF":
        """From a fairseq ``Dictionary`` (duck-typed): its symbols, bos and eos dropped (rows
        end at the first pad, and at the first eos when the call passes ``eos``)."""
        return cls(dictionary.symbols, subword_style, word_order, drop_ids={dictionary.bos(), dictionary.eos()})

    def _ids(self, hyp: Tensor, refs: Tensor, pad: int, eos: Optional[int]):
        """(character source, ids ``[B, R+1, W]``: hypothesis then references, ``noop`` where
        ignored, row chunks of about :data:`CHAR_BUDGET` characters)."""
        check_batch(hyp, refs)
        refs = as_multi_reference(refs)
        source = self._source.on(hyp.device)
        width = max(hyp.size(1), refs.size(2))
        hyp_ids = torch.where(valid_token_mask(hyp, pad, eos), hyp.long(), source.noop)
        ref_ids = torch.where(valid_token_mask(refs, pad, eos), refs.long(), source.noop)
        ids = torch.cat([F.pad(hyp_ids, (0, width - hyp.size(1)), value=source.noop).unsqueeze(1),
                         F.pad(ref_ids, (0, width - refs.size(2)), value=source.noop)], dim=1)
        row_chars = source.count(ids).sum((1, 2)).cumsum(0)
        chunk = (row_chars - 1).div(CHAR_BUDGET, rounding_mode="floor")  # a row above the budget: alone
        bounds = [0] + (torch.diff(chunk).nonzero().squeeze(1) + 1).tolist() + [ids.size(0)]
        return source, ids, [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]

    def _chars(self, source, ids: Tensor):
        batch, sides, width = ids.shape
        chars, words = _pack_chars(source, ids.view(-1, width), sides, self.word_order > 0)
        return sides, max(1, (batch - 1).bit_length()), chars, words

    def __call__(self, hyp: Tensor, refs: Tensor, pad: int, eos: Optional[int] = None) -> Tensor:
        """FloatTensor ``[B]`` in [0, 1] (refs: ``B x T'`` or ``B x R x T'``, as :mod:`._common`)."""
        if hyp.size(0) == 0:
            return torch.zeros(0, device=hyp.device)
        source, ids, chunks = self._ids(hyp, refs, pad, eos)
        return torch.cat([self._score(source, ids[rows]) for rows in chunks])

    def _score(self, source, ids: Tensor) -> Tensor:
        sides, example_bits, chars, words = self._chars(source, ids)
        groups = _Groups(chars, self.char_order, example_bits)
        counts = [self._counts(chars, groups, self.char_order)]
        if self.word_order:
            tokens = _word_tokens(chars, words)
            words = _word_stream(chars, tokens, groups.windows, self.char_order)[0]
            counts.append(self._counts(words, _Groups(words, self.word_order, example_bits), self.word_order))
        return chrf_from_counts(counts, self.beta).float()

    @staticmethod
    def _counts(stream: _Stream, groups: _Groups, orders: int):
        lengths = stream.seq_len.view(-1, stream.sides).t()  # [R+1, B]
        return lengths[:1], lengths[1:], _clipped_matches(stream, groups, orders)

    def prefix(self, hyp: Tensor, refs: Tensor, pad: int, eos: Optional[int] = None) -> Tensor:
        """FloatTensor ``[B, T]``: entry ``[b, t]`` equals ``self(hyp[:, :t+1], refs, ...)[b]``
        (positions from the end of a hypothesis on hold its full score)."""
        batch, length = hyp.shape
        if batch == 0 or length == 0:
            return torch.zeros(batch, length, device=hyp.device)
        source, ids, chunks = self._ids(hyp, refs, pad, eos)
        hyp_len = valid_token_mask(hyp, pad, eos).sum(1)
        positions = torch.arange(length, device=hyp.device)
        out = []
        for rows in chunks:
            lengths = hyp_len[rows]
            scores = self._prefix_scores(source, ids[rows], lengths)  # [b, longest]: prefixes up to each end
            # from the end on, a prefix is the whole hypothesis (an empty one scores 0 = scores[b, 0])
            out.append(scores.gather(1, torch.minimum(positions, (lengths - 1).clamp(min=0).unsqueeze(1))))
        return torch.cat(out)

    def _prefix_scores(self, source, ids: Tensor, lengths: Tensor) -> Tensor:
        """``[B, max(lengths)]``: the score of every prefix up to each hypothesis's length (0 after)."""
        batch = ids.size(0)
        used = max(1, int(lengths.max()))
        grid = torch.zeros(batch, used, device=ids.device)
        num_cells = int(lengths.sum())
        if num_cells == 0:
            return grid
        # cells: the prefixes (b, t) with t < lengths[b], flat
        cell_b = torch.repeat_interleave(torch.arange(batch, device=ids.device), lengths, output_size=num_cells)
        first = (lengths.cumsum(0) - lengths).index_select(0, cell_b)
        cell = torch.arange(num_cells, device=ids.device) + cell_b * used - first
        sides, example_bits, chars, words = self._chars(source, ids)
        prefix_chars = source.count(ids[:, 0, :used]).cumsum(-1).view(-1).index_select(0, cell)  # [C]
        hyp_index, hyp_offset = _hyp_elements(chars)
        groups = _Groups(chars, self.char_order, example_bits)
        ranks = _HypRanks(groups, hyp_index)
        offset = hyp_offset.index_select(0, cell_b)
        matches = torch.stack([_prefix_counts(ranks.order(n)[0], offset, (prefix_chars - n).clamp(min=-1) + 1)
                               for n in range(1, self.char_order + 1)])
        ref_len = chars.seq_len.view(batch, sides)[:, 1:].t().index_select(1, cell_b)  # [R, C]
        counts = [(prefix_chars, ref_len, matches)]
        if self.word_order:
            counts.append(self._prefix_words(chars, words, groups.windows, prefix_chars, cell_b, example_bits))
        grid.view(-1).index_copy_(0, cell, chrf_from_counts(counts, self.beta).float())
        return grid

    def _prefix_words(self, chars: _Stream, words, windows, prefix_chars: Tensor, cell_b: Tensor, example_bits: int):
        """chrF++ word statistics of the prefixes (cells): tokens ``[C]``, reference tokens
        ``[R, C]``, matches ``[O, R, C]``.  A prefix's tokens are those of the full hypothesis's
        words before its last word (clipped matches cumulative, as for characters) plus the 1-2
        tokens of its last, possibly cut, word: those are query rows of the sort (their group's
        reference counts, their occurrences among the earlier tokens)."""
        sides = chars.sides
        tokens = _word_tokens(chars, words)
        has = prefix_chars > 0
        last = _seq_offsets(chars)[::sides].index_select(0, cell_b) + (prefix_chars - 1).clamp(min=0)  # last character
        start = _take(tokens.word_start, torch.searchsorted(tokens.word_start, last, right=True) - 1)  # its word's
        size = last - start + 1
        punct_last, punct_first = _take(tokens.punct, last), _take(tokens.punct, start)
        two = has & (size >= 2) & (punct_last | punct_first)  # the cut word is two tokens
        first_length = torch.where((size >= 2) & punct_last, size - 1, torch.where(two, 1, size))
        with_one, with_two = has.nonzero().squeeze(1), two.nonzero().squeeze(1)
        second_start = torch.where(punct_last, last, start + 1).index_select(0, with_two)
        second_length = torch.where(punct_last, 1, size - 1).index_select(0, with_two)
        extra = (torch.cat([start.index_select(0, with_one), second_start]),
                 torch.cat([first_length.index_select(0, with_one), second_length]))
        word_stream, tail_ids = _word_stream(chars, tokens, windows, self.char_order, extra)
        id1 = torch.zeros_like(start).index_copy_(0, with_one, tail_ids[: with_one.numel()])
        id2 = torch.zeros_like(start).index_copy_(0, with_two, tail_ids[with_one.numel():])
        word_offset = _seq_offsets(word_stream)[::sides].index_select(0, cell_b)
        stable = (torch.searchsorted(tokens.token_start, start) - word_offset) * has  # tokens before the last word
        previous = _take(word_stream.sym, (word_offset + stable - 1).clamp(min=0))
        bridge = has & (stable >= 1)
        with_bridge = bridge.nonzero().squeeze(1)
        before_last = (stable - 1).clamp(min=0)
        # query kinds per order: (cells, (s1, s2), limit of earlier occurrences, duplicates within the tail)
        kinds = [[(with_one, (id1, id1 * 0), stable, None),
                  (with_two, (id2, id2 * 0), stable, (id1 == id2).long())],
                 [(with_bridge, (previous, id1), before_last, None),
                  (with_two, (id1, id2), before_last, ((previous == id1) & (id1 == id2) & bridge).long())]]
        kinds = kinds[: self.word_order]
        queries = [torch.cat([cell_b.index_select(0, cells) for kind in kinds for cells, _, _, _ in kind])]
        for j in range(self.word_order):
            queries.append(torch.cat([symbols[j].index_select(0, cells)
                                      for kind in kinds for cells, symbols, _, _ in kind]))
        hyp_index, hyp_offset = _hyp_elements(word_stream)
        ranks = _HypRanks(_Groups(word_stream, self.word_order, example_bits, queries), hyp_index)
        offset = hyp_offset.index_select(0, cell_b)
        row = word_stream.sym.numel()
        out = []
        for n, kind in enumerate(kinds, start=1):
            rows = torch.arange(row, row + sum(cells.numel() for cells, _, _, _ in kind), device=cell_b.device)
            row += rows.numel()
            matched, counts, gid, keys = ranks.order(n, rows)
            value = _prefix_counts(matched, offset, (stable - (n - 1)).clamp(min=0))  # [R, C]
            for cells, _, limit, duplicate in kind:
                g, gid = gid[: cells.numel()], gid[cells.numel():]
                rank = ranks.occurrences(keys, g, (offset + limit).index_select(0, cells)) + 1
                if duplicate is not None:
                    rank += duplicate.index_select(0, cells)
                value.index_add_(1, cells, torch.stack([rank <= ref.index_select(0, g) for ref in counts[1:]]).long())
            out.append(value)
        unigrams = has.long() * (stable + 1 + two)
        ref_len = word_stream.seq_len.view(-1, sides)[:, 1:].t().index_select(1, cell_b)
        return unigrams, ref_len, torch.stack(out)
