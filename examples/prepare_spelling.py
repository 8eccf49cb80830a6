#!/usr/bin/env python3
"""Character-level spelling correction (SeaRnn, Leblond et al. 2018, Sec. 4).

The task of Bahdanau et al. (2017, "An actor-critic algorithm for sequence
prediction"), rebuilt on the English (World English Bible) side of
``examples/bible_es_en/verses.tsv.gz`` instead of the One Billion Word corpus.
See ``examples/spelling/README.md`` for the choices and their reasons.

* Alphabet (as in Bahdanau et al.'s code, 42 symbols; with </s> that is the
  paper's A = 43 actions): ``a-z 0-9 , . ! ? #`` and space.  Text is
  lowercased, accents are stripped (NFKD), every other character becomes
  ``#`` (their "unknown" character); whitespace runs become one space.
* Windows of T = ``--max-len`` (10) characters: each verse is cut
  left to right into windows of exactly T characters that start at the
  beginning of a word; after a window the cut word's remainder is skipped and
  the next window starts at the next word.  A verse tail shorter than T is
  dropped; a window ending in a space loses that space.  So every example has
  T characters (T-1 if the T-th was a space) -- the paper clips each sentence
  to at most T; we take several clipped "sentences" per verse.
* Split by verse with :func:`prepare_bible.split_of` (3% valid, 5% test),
  then ``--train-size``/``--valid-size``/``--test-size`` windows are drawn per
  split (seeded, independent of ``--p``; kept in Bible order).
* Corruption: each character is, with probability ``--p``, replaced by a
  character drawn uniformly from the other 41 symbols of the alphabet (never
  itself, so the observed corruption rate is p; Bahdanau et al.'s code drew
  from the full alphabet, i.e. an effective rate p*41/42).  Per-window RNG
  seeded by (seed, verse, offset): the output does not depend on the sizes,
  and positions corrupted at p=0.3 are also corrupted (to the same character)
  at p=0.5.
* Tokens: one character per token, separated by spaces, the space character
  written as ``▁`` (U+2581).  Source ``noisy``, target ``clean``; one fixed
  dictionary (all 42 symbols, same order for every p) for both sides.

Output (``--dest``, default ``data-bin/spelling_{p}``)::

    dict.noisy.txt dict.clean.txt                   identical, 42 symbols
    {split}.noisy-clean.{noisy,clean}.bin/.idx      fairseq binaries
    raw/{split}.noisy raw/{split}.clean             plain text (real spaces)
    raw/{split}.ids                                 "<verse>\\t<char offset>"
    manifest.json

Usage::

    python examples/prepare_spelling.py [--p 0.3] [--dest DIR] [--force]
        [--input examples/bible_es_en/verses.tsv.gz] [--max-len 10]
        [--train-size 30000] [--valid-size 2000] [--test-size 5000]
        [--seed 1] [--workers 1]
"""

import argparse
import collections
import os
import random
import shutil
import sys
import tempfile
import time
import unicodedata

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import prepare_bible  # noqa: E402
import prepare_text  # noqa: E402
from prepare_text import PrepareError  # noqa: E402

ALPHABET = " abcdefghijklmnopqrstuvwxyz0123456789,.!?#"  # 42 symbols
UNK_CHAR = "#"
SPACE_TOKEN = "\u2581"  # ▁
SRC, TGT = "noisy", "clean"
_ALPHABET_SET = set(ALPHABET)


def normalize(text):
    """Lowercase, strip accents, map out-of-alphabet chars to '#'."""
    text = unicodedata.normalize("NFKD", text.lower())
    text = "".join(c for c in text if not unicodedata.combining(c))
    text = " ".join(text.split())
    return "".join(c if c in _ALPHABET_SET else UNK_CHAR for c in text)


def windows(text, length=10):
    """Yield (offset, window): ``length`` chars starting at a word start.

    A window that would end with a space loses it (so it has length - 1
    characters): no line has leading/trailing whitespace, which fairseq's
    post-processing and most readers would strip anyway.
    """
    pos = 0
    while pos + length <= len(text):
        yield pos, text[pos:pos + length].rstrip(" ")
        end = pos + length
        if text[end - 1] == " " or (end < len(text) and text[end] == " "):
            nxt = end if text[end - 1] == " " else end + 1
        else:  # the window cut a word: skip its remainder
            space = text.find(" ", end)
            if space < 0:
                return
            nxt = space + 1
        pos = nxt


def corrupt(text, p, rng, alphabet=ALPHABET):
    """Replace each char, with prob. p, by a different char of ``alphabet``.

    Two draws per character whatever p is, so for one rng seed the set of
    corrupted positions grows monotonically with p.
    """
    out = []
    for c in text:
        u, k = rng.random(), rng.randrange(len(alphabet) - 1)
        if u < p:
            r = alphabet[k]
            if r == c:  # skip the original: uniform over the other symbols
                r = alphabet[-1]
            out.append(r)
        else:
            out.append(c)
    return "".join(out)


def tokenize(text):
    return " ".join(SPACE_TOKEN if c == " " else c for c in text)


def collect_windows(rows, length):
    """split -> list of (ref, offset, clean window), Bible order."""
    out = {s: [] for s in prepare_text.SPLITS}
    for row in rows:
        split = prepare_bible.split_of(row["ref"])
        for off, w in windows(normalize(row["en_web"]), length):
            out[split].append((row["ref"], off, w))
    return out


def sample(items, k, seed, split):
    if k >= len(items):
        return list(items)
    idx = sorted(random.Random(f"{seed}:sample:{split}").sample(range(len(items)), k))
    return [items[i] for i in idx]


def make_split(items, p, seed):
    """Return (noisy, clean, ids) lines for sampled windows."""
    noisy, clean, ids = [], [], []
    for ref, off, w in items:
        rng = random.Random(f"{seed}:{ref}:{off}")
        noisy.append(corrupt(w, p, rng))
        clean.append(w)
        ids.append(f"{ref}\t{off}")
    return noisy, clean, ids


def write_dict(path, counts):
    """fairseq dictionary with every alphabet symbol, fixed order."""
    prepare_text.write_lines(path, [f"{tokenize(c)} {counts.get(c, 0)}" for c in ALPHABET])


def fmt_p(p):
    return f"{p:g}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", default=prepare_bible.DEFAULT_INPUT,
                   help="verses.tsv.gz (default: %(default)s)")
    p.add_argument("--p", type=float, default=0.3,
                   help="per-character replacement probability (default 0.3; paper: 0.3, 0.5)")
    p.add_argument("--dest", default=None, help="output dir (default: data-bin/spelling_{p})")
    p.add_argument("--max-len", type=int, default=10, help="window length T (default 10)")
    p.add_argument("--train-size", type=int, default=30000, help="train windows (default 30000)")
    p.add_argument("--valid-size", type=int, default=2000, help="valid windows (default 2000)")
    p.add_argument("--test-size", type=int, default=5000, help="test windows (default 5000)")
    p.add_argument("--seed", type=int, default=1, help="sampling/corruption seed")
    p.add_argument("--workers", type=int, default=1, help="fairseq-preprocess workers")
    p.add_argument("--force", action="store_true", help="replace an existing --dest")
    args = p.parse_args(argv)
    if not 0.0 <= args.p <= 1.0:
        p.error("--p must be in [0, 1]")
    if args.max_len < 1:
        p.error("--max-len must be >= 1")
    if min(args.train_size, args.valid_size, args.test_size) < 1:
        p.error("split sizes must be >= 1")
    if args.dest is None:
        args.dest = os.path.join("data-bin", f"spelling_{fmt_p(args.p)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    dest = prepare_text.check_dest(args.dest, args.force)
    rows, skipped = prepare_bible.read_verses(args.input)
    pool = collect_windows(rows, args.max_len)
    sizes = {"train": args.train_size, "valid": args.valid_size, "test": args.test_size}
    data, ids = {}, {}
    for split in prepare_text.SPLITS:
        items = sample(pool[split], sizes[split], args.seed, split)
        if not items:
            if split == "train":
                raise PrepareError(f"{args.input}: no {args.max_len}-character windows "
                                   "in the train split")
            continue
        noisy, clean, ids[split] = make_split(items, args.p, args.seed)
        data[split] = {SRC: noisy, TGT: clean}
    counts = collections.Counter()
    for side in (SRC, TGT):
        for line in data["train"][side]:
            counts.update(line)
    n_chars = sum(len(w) for s in data.values() for w in s[TGT])
    n_diff = sum(a != b for s in data.values() for x, y in zip(s[SRC], s[TGT])
                 for a, b in zip(x, y))
    train_set = set(data["train"][TGT])
    overlap = {s: sum(w in train_set for w in data[s][TGT]) / len(data[s][TGT])
               for s in data if s != "train"}

    with prepare_text.atomic_dir(dest, args.force) as tmp:
        prepare_text.write_raw(tmp, data)
        for split in data:
            prepare_text.write_lines(os.path.join(tmp, "raw", f"{split}.ids"), ids[split])
        tok_dir = tempfile.mkdtemp(prefix=".tok-", dir=tmp)
        for split, by_lang in data.items():
            for lang, lines in by_lang.items():
                prepare_text.write_lines(os.path.join(tok_dir, f"{split}.{lang}"),
                                         [tokenize(x) for x in lines])
        dict_file = os.path.join(tok_dir, "dict.txt")
        write_dict(dict_file, counts)
        prepare_text.binarize(tmp, tok_dir, SRC, TGT, list(data), srcdict=dict_file,
                              workers=args.workers)
        shutil.rmtree(tok_dir)
        summary = {
            "script": "prepare_spelling.py", "input": os.path.abspath(args.input),
            "p": args.p, "max_len": args.max_len, "seed": args.seed,
            "src": SRC, "tgt": TGT, "alphabet": ALPHABET, "space_token": SPACE_TOKEN,
            "windows_available": {s: len(v) for s, v in pool.items()},
            "lines": {s: len(d[TGT]) for s, d in data.items()},
            "skipped_verses": dict(skipped),
            "observed_corruption_rate": round(n_diff / max(1, n_chars), 6),
            "clean_windows_also_in_train": {s: round(v, 4) for s, v in overlap.items()},
            "fairseq_dict_size": prepare_text.dict_size(os.path.join(tmp, f"dict.{TGT}.txt")),
        }
        prepare_text.write_manifest(tmp, summary)

    print(f"{args.input}: {len(rows)} verses; windows available: "
          + ", ".join(f"{s} {n}" for s, n in summary["windows_available"].items()))
    print("windows written: " + ", ".join(f"{s} {n}" for s, n in summary["lines"].items())
          + f"; p={fmt_p(args.p)}, observed corruption rate "
          f"{summary['observed_corruption_rate']:.4f}")
    print("clean windows also in train: "
          + ", ".join(f"{s} {v:.1%}" for s, v in overlap.items()))
    print(f"dictionary {summary['fairseq_dict_size']} entries; wrote {dest} "
          f"in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(prepare_text.run_cli(main))
