"""Word embeddings for token-level loss smoothing.

Two sources of the ``[V, D]`` matrix (indexed by the target dictionary) used
by ``topk_cosine_neighbours``: ``load_text_embeddings`` (pretrained text
vectors) and ``build_ppmi_svd_embeddings`` (PPMI + truncated SVD on the
training target side).  Rows without a vector are all-zero.  No fairseq
import: ``dictionary`` may be any sequence of symbols.

Design: docs/smoothing.md, "Embeddings".
"""

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

from fairseq_seqlevel.errors import InputFileError
from fairseq_seqlevel.rewards.words import BPE_CONTINUATION, SP_SPACE

if TYPE_CHECKING:  # pragma: no cover - types only
    from fairseq.data import Dictionary  # noqa: F401

__all__ = [
    "EmbeddingFileError",
    "EmbeddingCoverage",
    "lookup_keys",
    "load_text_embeddings",
    "build_ppmi_svd_embeddings",
]



class EmbeddingFileError(InputFileError):
    """A malformed embedding file; the message is one line ``path:line: why``."""


@dataclass
class EmbeddingCoverage:
    """Which dictionary entries received a vector from the file."""

    path: str
    dim: int
    file_vectors: int  # data lines in the file
    num_symbols: int  # dictionary entries (all of them, specials included)
    num_covered: int
    type_coverage: float  # num_covered / num_symbols
    token_coverage: Optional[float]  # share of training-token occurrences covered
    matched_exact: int  # symbol found as is
    matched_stripped: int  # after removing "▁" (or a trailing "@@")
    matched_lowercase: int  # only after lower-casing
    covered: torch.Tensor = field(repr=False)  # BoolTensor[V]
    missing_examples: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        tok = "n/a" if self.token_coverage is None else f"{100 * self.token_coverage:.2f}%"
        return (
            f"{self.path}: dim {self.dim}, {self.num_covered}/{self.num_symbols} dictionary "
            f"entries covered ({100 * self.type_coverage:.2f}% of types, {tok} of tokens; "
            f"exact {self.matched_exact}, stripped {self.matched_stripped}, "
            f"lowercased {self.matched_lowercase})"
        )


def _symbols_and_counts(dictionary) -> Tuple[List[str], Optional[List[float]]]:
    if not hasattr(dictionary, "symbols"):  # a plain sequence of symbols
        return list(dictionary), None
    symbols = list(dictionary.symbols)
    counts = getattr(dictionary, "count", None)
    if counts is not None and not callable(counts):
        counts = list(counts)
        if len(counts) != len(symbols):
            counts = None
    else:
        counts = None
    return symbols, counts


def lookup_keys(symbol: str, lowercase_fallback: bool = True) -> List[Tuple[str, int]]:
    """Keys tried for one dictionary symbol, best first, with their match kind.

    Kinds: 0 = the symbol itself, 1 = subword marker stripped, 2 = lower-cased.

    * ``"▁word"`` (sentencepiece, word-initial piece): ``"▁word"``, then ``"word"``.
    * ``"word@@"`` (subword-nmt, non-final piece): ``"word@@"``, then ``"word"``.
    * anything else, e.g. a non-initial piece ``"ing"``: only ``"ing"`` itself.
      A piece absent from the file gets a **zero vector** (unknown word): it
      is not composed from other vectors, since a word-level file has no
      meaningful vector for word-internal fragments.
    * each of the above lower-cased (if different), last, for uncased files
      such as GloVe 6B.

    The exact symbol is tried first so a file written from the dictionary
    itself (``examples/build_token_embeddings.py``) always matches exactly.
    """
    keys: List[Tuple[str, int]] = [(symbol, 0)]
    stripped = None
    if symbol.startswith(SP_SPACE) and len(symbol) > len(SP_SPACE):
        stripped = symbol[len(SP_SPACE):]
    elif symbol.endswith(BPE_CONTINUATION) and len(symbol) > len(BPE_CONTINUATION):
        stripped = symbol[: -len(BPE_CONTINUATION)]
    if stripped is not None:
        keys.append((stripped, 1))
    if lowercase_fallback:
        for key, _ in list(keys):
            low = key.lower()
            if low != key and all(low != k for k, _ in keys):
                keys.append((low, 2))
    return keys


def load_text_embeddings(
    path: str,
    dictionary: Union["Dictionary", Sequence[str]],
    counts: Optional[Sequence[float]] = None,
    lowercase_fallback: bool = True,
    encoding: str = "utf-8",
    max_missing_examples: int = 20,
) -> Tuple[torch.Tensor, EmbeddingCoverage]:
    """Read word2vec/GloVe text vectors for the symbols of ``dictionary``.

    Format: optional header line ``"<count> <dim>"``, then one line per word:
    the word, then ``dim`` space-separated numbers.  Words containing spaces
    (GloVe 840B has a few) are supported: the last ``dim`` fields are the
    vector.  If the word occurs more than once, the first occurrence wins.
    Symbols are mapped with :func:`lookup_keys` (sentencepiece ``"▁"`` and
    subword-nmt ``"@@"`` handled; unmatched pieces -> zero row).  Values are
    parsed only for words that are used (every line's field count is checked).

    Args:
        path: the text file.
        dictionary: a fairseq ``Dictionary`` (uses ``.symbols`` and ``.count``)
            or a sequence of symbols.
        counts: per-symbol training frequencies for the token coverage;
            defaults to ``dictionary.count`` when available.

    Returns:
        ``(FloatTensor[V, D], EmbeddingCoverage)`` with ``V = len(dictionary)``.

    Raises:
        EmbeddingFileError: one line ``"<path>:<line>: <reason>"`` for a
            malformed line, inconsistent dimensions, non-finite values, a
            header count that does not match (truncated file) or no vectors.
        OSError: the file cannot be opened.
    """
    symbols, dict_counts = _symbols_and_counts(dictionary)
    if counts is None:
        counts = dict_counts
    elif len(counts) != len(symbols):
        raise ValueError(f"counts has {len(counts)} entries, dictionary has {len(symbols)}")
    V = len(symbols)

    # key -> [(row, kind)]: which dictionary rows want the vector of `key`.
    wanted: Dict[str, List[Tuple[int, int]]] = {}
    for row, sym in enumerate(symbols):
        for key, kind in lookup_keys(sym, lowercase_fallback):
            wanted.setdefault(key, []).append((row, kind))

    best_kind = [3] * V  # 3 = not matched yet
    vectors: Optional[torch.Tensor] = None
    dim: Optional[int] = None
    header_count: Optional[int] = None
    n_vectors = 0
    lineno = 0

    def fail(msg: str, line: Optional[int] = None) -> EmbeddingFileError:
        where = f"{path}:{line if line is not None else lineno}"
        return EmbeddingFileError(f"{where}: {msg}")

    with open(path, "r", encoding=encoding, newline="\n") as f:
        while True:
            try:
                raw = f.readline()
            except UnicodeDecodeError as e:
                raise fail(f"not valid {encoding} text ({e.reason})", lineno + 1) from None
            if not raw:
                break
            lineno += 1
            line = raw.rstrip("\r\n").rstrip(" ")
            if not line.strip():
                continue
            n_fields = line.count(" ") + 1  # cheap: values are split only when used
            if lineno == 1 and n_fields == 2:
                first, second = line.split(" ")
                if first.isdigit() and second.isdigit():
                    header_count, dim = int(first), int(second)
                    if dim <= 0:
                        raise fail(f"header announces dimension {dim}")
                    vectors = torch.zeros(V, dim)
                    continue
            if dim is None:
                dim = n_fields - 1
                if dim <= 0:
                    raise fail("expected a word followed by numbers")
                vectors = torch.zeros(V, dim)
            if n_fields < dim + 1:
                raise fail(f"expected a word and {dim} numbers, found {n_fields} fields")
            if n_fields == dim + 1:
                word = line[: line.index(" ")]
            else:  # the word itself contains spaces
                word = line.rsplit(" ", dim)[0]
            n_vectors += 1
            rows = wanted.get(word)
            if not rows:
                continue
            todo = [(r, kind) for r, kind in rows if kind < best_kind[r]]
            if not todo:
                continue
            try:
                vec = torch.tensor([float(x) for x in line.rsplit(" ", dim)[1:]])
            except ValueError:
                raise fail(f"non-numeric value in the vector of {word!r}") from None
            if not torch.isfinite(vec).all():
                raise fail(f"non-finite value in the vector of {word!r}")
            for r, kind in todo:
                vectors[r] = vec
                best_kind[r] = kind
    if vectors is None or n_vectors == 0:
        raise fail("no vectors found", max(lineno, 1))
    if header_count is not None and header_count != n_vectors:
        raise fail(
            f"header announces {header_count} vectors but the file has {n_vectors} (truncated?)"
        )

    kinds = torch.tensor(best_kind)
    covered = kinds < 3
    token_cov = None
    if counts is not None:
        c = torch.tensor([float(x) for x in counts], dtype=torch.float64)
        total = float(c.sum())
        token_cov = float(c[covered].sum()) / total if total > 0 else None
    n_cov = int(covered.sum())
    report = EmbeddingCoverage(
        path=path,
        dim=dim,
        file_vectors=n_vectors,
        num_symbols=V,
        num_covered=n_cov,
        type_coverage=n_cov / V if V else 0.0,
        token_coverage=token_cov,
        matched_exact=int((kinds == 0).sum()),
        matched_stripped=int((kinds == 1).sum()),
        matched_lowercase=int((kinds == 2).sum()),
        covered=covered,
        missing_examples=[symbols[i] for i in (~covered).nonzero().flatten()[:max_missing_examples].tolist()],
    )
    return vectors, report


# --------------------------------------------------------------- PPMI + SVD
def _as_stream(token_stream_ids) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(flat LongTensor[T], segment id per position or None)."""
    if isinstance(token_stream_ids, torch.Tensor):
        if token_stream_ids.dim() != 1:
            raise ValueError("token_stream_ids must be a 1-D tensor or a sequence of 1-D tensors")
        return token_stream_ids.long(), None
    sents = [torch.as_tensor(s).long().reshape(-1) for s in token_stream_ids]
    if not sents:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    lengths = torch.tensor([s.numel() for s in sents])
    stream = torch.cat(sents)
    seg = torch.repeat_interleave(torch.arange(len(sents)), lengths)
    return stream, seg


def _cooccurrence(stream, seg, vocab_size, window, ignore_ids) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric window co-occurrence counts as (keys i*V+j, counts), unique keys."""
    V = vocab_size
    keep = torch.ones(V, dtype=torch.bool)
    if ignore_ids:
        keep[torch.as_tensor(list(ignore_ids), dtype=torch.long)] = False
    ok_pos = keep[stream]
    keys_list, cnt_list = [], []
    for d in range(1, window + 1):  # loop over window offsets, not tokens
        if stream.numel() <= d:
            break
        a, b = stream[:-d], stream[d:]
        valid = ok_pos[:-d] & ok_pos[d:]
        if seg is not None:
            valid &= seg[:-d] == seg[d:]
        a, b = a[valid], b[valid]
        keys = torch.cat([a * V + b, b * V + a])
        uk, uc = torch.unique(keys, return_counts=True)
        keys_list.append(uk)
        cnt_list.append(uc)
    if not keys_list:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64)
    keys = torch.cat(keys_list)
    cnts = torch.cat(cnt_list).double()
    uk, inv = torch.unique(keys, return_inverse=True)
    counts = torch.zeros(uk.numel(), dtype=torch.float64).index_add_(0, inv, cnts)
    return uk, counts


def build_ppmi_svd_embeddings(
    token_stream_ids: Union[torch.Tensor, Iterable[torch.Tensor]],
    vocab_size: int,
    dim: int,
    window: int,
    ignore_ids: Sequence[int] = (),
    cds_alpha: float = 0.75,
    eig_power: float = 0.5,
    dense_svd_max_vocab: int = 2048,
    niter: int = 6,
    seed: int = 0,
) -> torch.Tensor:
    """Count-based embeddings: window co-occurrence -> PPMI -> truncated SVD.

    Args:
        token_stream_ids: token ids of the training target side, either one
            1-D LongTensor (windows may cross sentence boundaries) or a
            sequence of 1-D tensors, one per sentence (windows stay inside a
            sentence).
        vocab_size: ``V``; ids must be in ``[0, V)``.
        dim: output dimension ``D``.  If ``D`` exceeds the number of
            singular values, the extra columns are zero.
        window: symmetric context window (pairs at distance ``1..window``).
        ignore_ids: ids whose pairs are not counted (e.g. ``<pad>``).
        cds_alpha: context-distribution smoothing exponent (Levy et al., 2015).
        eig_power: rows are ``U · S^eig_power``.
        dense_svd_max_vocab: exact ``torch.linalg.svd`` on a dense ``V x V``
            matrix up to this ``V``; above, ``torch.svd_lowrank`` on the sparse
            PPMI matrix (randomized, seeded with ``seed``, ``niter`` power
            iterations).

    Returns:
        ``FloatTensor[V, D]``; tokens with no counted co-occurrence get an
        all-zero row (= unknown to the neighbour search).

    Counting is vectorized: for each offset ``d`` the pairs are the shifted
    stream ``(x[:-d], x[d:])``, encoded as ``i * V + j`` and counted with
    ``torch.unique``; memory is ``O(#distinct pairs)``, never ``V x V``
    except for the dense SVD branch.
    """
    V = int(vocab_size)
    if V < 1 or dim < 1 or window < 1:
        raise ValueError("vocab_size, dim and window must be >= 1")
    stream, seg = _as_stream(token_stream_ids)
    if stream.numel() and (int(stream.min()) < 0 or int(stream.max()) >= V):
        raise ValueError(f"token ids must be in [0, {V})")
    keys, counts = _cooccurrence(stream, seg, V, window, ignore_ids)
    out = torch.zeros(V, dim)
    if keys.numel() == 0:
        return out
    rows, cols = keys // V, keys % V

    # PPMI with context distribution smoothing.
    row_sum = torch.zeros(V, dtype=torch.float64).index_add_(0, rows, counts)
    col_sum = torch.zeros(V, dtype=torch.float64).index_add_(0, cols, counts)
    ctx = col_sum.pow(cds_alpha)
    log_p_ctx = ctx.log() - math.log(float(ctx.sum()))
    pmi = counts.log() - row_sum[rows].log() - log_p_ctx[cols]
    pos = pmi > 0
    rows, cols, vals = rows[pos], cols[pos], pmi[pos].float()
    if vals.numel() == 0:
        return out
    seen = torch.zeros(V, dtype=torch.bool)
    seen[rows] = True

    q = min(dim, V)
    if V <= dense_svd_max_vocab:
        M = torch.zeros(V, V)
        M[rows, cols] = vals
        U, S, _ = torch.linalg.svd(M, full_matrices=False)
        U, S = U[:, :q], S[:q]
    else:
        M = torch.sparse_coo_tensor(
            torch.stack([rows, cols]), vals, (V, V), check_invariants=False
        ).coalesce()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            U, S, _ = torch.svd_lowrank(M, q=min(q + 10, V), niter=niter)
        U, S = U[:, :q], S[:q]
    # Null directions carry no information (and with eig_power = 0 their
    # arbitrary U columns would add noise): zero them.
    tol = S.max() * max(V, 1) * torch.finfo(S.dtype).eps
    weight = torch.where(S > tol, S.clamp_min(tol).pow(eig_power), torch.zeros_like(S))
    emb = U * weight
    emb[~seen] = 0.0  # no co-occurrence -> unknown (exactly zero)
    out[:, :q] = emb
    return out
