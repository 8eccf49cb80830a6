#!/usr/bin/env python
"""Build PPMI-SVD token embeddings from fairseq-binarized training data.

Reads ``{split}.{src}-{tgt}.{lang}`` (``.bin``/``.idx``) and ``dict.{lang}.txt``
from ``--data`` (the ``fairseq-preprocess`` destdir), counts window
co-occurrences inside each sentence, and writes a word2vec text file
(header ``"V D"``, then ``symbol v1 .. vD``) whose words are exactly the
dictionary symbols, in dictionary order, so that
``fairseq_seqlevel.smoothing.embeddings.load_text_embeddings(out, dictionary)`` reads it
back with 100% coverage.  Tokens never seen in the data (``<pad>``,
``<s>``, ``madeupword`` fillers) get all-zero vectors, which the neighbour
search treats as unknown words.

Example::

    python examples/build_token_embeddings.py --data data-bin/iwslt14.de-en \\
        --lang en --dim 64 --window 5 --out data-bin/iwslt14.de-en/emb.en.txt

The output is written to a temporary file in the same directory and moved
into place with ``os.replace`` (never a half-written file at ``--out``).
"""

import argparse
import glob
import logging
import os
import sys
import tempfile

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # allow running from a checkout without installing
    sys.path.insert(0, _REPO)

import torch  # noqa: E402

from fairseq_seqlevel.smoothing.embeddings import build_ppmi_svd_embeddings  # noqa: E402

PROG = "build_token_embeddings"


class CliError(Exception):
    """Reported as one line ``build_token_embeddings: error: ...``."""


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="fairseq-preprocess destdir")
    p.add_argument("--lang", required=True, help="language whose side is read (usually the target)")
    p.add_argument("--out", required=True, help="output word2vec text file")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--window", type=int, default=5)
    p.add_argument("--split", default="train")
    p.add_argument("--pair", default=None, metavar="SRC-TGT",
                   help="language pair of the file name; found automatically if unique")
    p.add_argument("--dataset-impl", default=None, help="mmap/lazy/cached/raw; inferred if omitted")
    p.add_argument("--cds-alpha", type=float, default=0.75)
    p.add_argument("--eig-power", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    return p


def _find_prefix(data: str, split: str, lang: str, pair) -> str:
    if not os.path.isdir(data):
        raise CliError(f"data directory not found: {data}")
    if pair is not None:
        prefix = os.path.join(data, f"{split}.{pair}.{lang}")
        if not (os.path.exists(prefix + ".idx") or os.path.exists(prefix)):
            raise CliError(f"binarized data not found: {prefix}.bin/.idx")
        return prefix
    found = sorted(
        p[: -len(".idx")] for p in glob.glob(os.path.join(glob.escape(data), f"{split}.*-*.{lang}.idx"))
    )
    if not found:
        raise CliError(f"no {split}.SRC-TGT.{lang}.bin/.idx in {data}")
    if len(found) > 1:
        names = ", ".join(os.path.basename(f) for f in found)
        raise CliError(f"several pairs in {data} ({names}); choose one with --pair")
    return found[0]


def load_sentences(data: str, lang: str, split: str = "train", pair=None, dataset_impl=None):
    """(dictionary, list of 1-D LongTensors) of one binarized side."""
    from fairseq.data import Dictionary, data_utils

    dict_path = os.path.join(data, f"dict.{lang}.txt")
    prefix = _find_prefix(data, split, lang, pair)
    if not os.path.isfile(dict_path):
        raise CliError(f"dictionary not found: {dict_path}")
    try:
        dictionary = Dictionary.load(dict_path)
    except Exception as e:  # fairseq raises ValueError/RuntimeError on bad lines
        raise CliError(f"cannot read dictionary {dict_path}: {e}") from None
    dataset = data_utils.load_indexed_dataset(prefix, dictionary, dataset_impl=dataset_impl)
    if dataset is None:
        raise CliError(f"cannot load binarized data {prefix} (missing or unknown format)")
    sents = [dataset[i].long() for i in range(len(dataset))]  # per sentence, not per token
    top = max((int(s.max()) for s in sents if s.numel()), default=-1)
    if top >= len(dictionary):
        raise CliError(
            f"{prefix} holds token id {top} but {dict_path} has {len(dictionary)} entries (wrong dictionary?)"
        )
    return dictionary, sents


def _check_out_dir(path: str) -> str:
    out_dir = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(out_dir):
        raise CliError(f"output directory not found: {out_dir}")
    return out_dir


def write_word2vec(path: str, symbols, vectors: torch.Tensor) -> None:
    """Atomically write a word2vec text file (temp file + ``os.replace``)."""
    if any((not s) or any(c.isspace() for c in s) for s in symbols):
        raise CliError("a dictionary symbol is empty or contains whitespace; cannot write text format")
    out_dir = _check_out_dir(path)
    V, D = vectors.shape
    rows = vectors.tolist()
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + ".", dir=out_dir)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give normal file permissions
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(f"{V} {D}\n")
            for sym, row in zip(symbols, rows):
                f.write(sym + " " + " ".join(f"{x:.7g}" for x in row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log = logging.getLogger(PROG)
    try:
        if args.dim < 1 or args.window < 1:
            raise CliError("--dim and --window must be >= 1")
        _check_out_dir(args.out)  # fail before the (possibly long) computation
        dictionary, sents = load_sentences(args.data, args.lang, args.split, args.pair, args.dataset_impl)
        n_tok = sum(s.numel() for s in sents)
        log.info(f"{len(sents)} sentences, {n_tok} tokens, vocabulary {len(dictionary)}")
        emb = build_ppmi_svd_embeddings(
            sents,
            vocab_size=len(dictionary),
            dim=args.dim,
            window=args.window,
            ignore_ids=[dictionary.pad()],
            cds_alpha=args.cds_alpha,
            eig_power=args.eig_power,
            seed=args.seed,
        )
        n_zero = int((emb.norm(dim=1) == 0).sum())
        write_word2vec(args.out, dictionary.symbols, emb)
        log.info(f"wrote {args.out}: {len(dictionary)} x {args.dim}, {n_zero} all-zero rows (unseen tokens)")
    except (CliError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
