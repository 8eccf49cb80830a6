#!/usr/bin/env python3
"""Spanish -> English Bible verses for fairseq_seqlevel (es -> en, KJV as 2nd reference).

Reads ``examples/bible_es_en/verses.tsv.gz`` (``ref<TAB>es<TAB>en_web<TAB>en_kjv``),
then

1. skips rows with an empty field and rows damaged by the extraction
   (leftover OSIS markup ``<div sID=.../>``, or the WEB glossary glued onto
   Revelation 22:21) -- both counted in the summary;
2. splits by verse: ``int(md5(ref), 16) % 100`` < 3 -> valid, < 8 -> test,
   else train (stable across runs, machines and filter settings);
3. keeps pairs whose es and en_web sides both have 1..``--max-words``
   whitespace words (default 20), in every split (the KJV side is not
   filtered, it rides along with its verse);
4. calls :func:`prepare_text.prepare_parallel`: joint sentencepiece unigram
   model (``--vocab-size`` 4000, train es+en only), fairseq-preprocess with a
   joined dictionary, KJV binarized with the target dictionary as
   ``{split}.es-en.kjv.bin/.idx`` (load it with ``--extra-references kjv``),
   plain-text copies in ``raw/``.

Deterministic: same input and flags give byte-identical output (one
sentencepiece thread, fixed seed, no shuffling, one fairseq worker).

Usage::

    python examples/prepare_bible.py [--dest data-bin/bible_es_en] [--force]
        [--input examples/bible_es_en/verses.tsv.gz] [--vocab-size 4000]
        [--max-words 20] [--seed 1] [--workers 1]
"""

import argparse
import collections
import hashlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import prepare_text  # noqa: E402
from prepare_text import PrepareError  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_INPUT = os.path.join(HERE, "bible_es_en", "verses.tsv.gz")
FIELDS = ("ref", "es", "en_web", "en_kjv")
VALID_PERCENT, TEST_PERCENT = 3, 5
LANGS = {"es": "es", "en_web": "en", "en_kjv": "kjv"}  # column -> file suffix


def split_of(ref, valid_percent=VALID_PERCENT, test_percent=TEST_PERCENT):
    """Deterministic split of a verse reference ("Luke 9:22")."""
    bucket = int(hashlib.md5(ref.encode("utf-8")).hexdigest(), 16) % 100
    if bucket < valid_percent:
        return "valid"
    if bucket < valid_percent + test_percent:
        return "test"
    return "train"


def damaged(row):
    """Reason a row is an extraction artifact, or None."""
    for field in row[1:]:
        if "<div" in field or "sID=" in field:
            return "markup"
        if "World English Bible Glossary" in field:
            return "glossary"
    return None


def read_verses(path):
    """Return (rows, skipped): rows are dicts with FIELDS; skipped a Counter."""
    text = prepare_text.open_text(path)
    rows, skipped, seen = [], collections.Counter(), set()
    for i, line in enumerate(prepare_text.split_lines(text, path)):
        parts = line.split("\t")
        if len(parts) != len(FIELDS):
            raise PrepareError(f"{path}:{i + 1}: expected {len(FIELDS)} tab-separated "
                               f"fields (ref, es, en_web, en_kjv), got {len(parts)}")
        parts = [p.strip() for p in parts]
        if not parts[0]:
            raise PrepareError(f"{path}:{i + 1}: empty verse reference")
        if parts[0] in seen:
            raise PrepareError(f"{path}:{i + 1}: duplicate verse reference {parts[0]!r}")
        seen.add(parts[0])
        if not all(parts[1:]):
            skipped["empty field"] += 1
            continue
        reason = damaged(parts)
        if reason:
            skipped[reason] += 1
            continue
        rows.append(dict(zip(FIELDS, parts)))
    if not rows and not skipped:
        raise PrepareError(f"{path}: no verses")
    return rows, skipped


def keep(row, max_words):
    return all(1 <= len(row[c].split()) <= max_words for c in ("es", "en_web"))


def build_splits(rows, max_words, valid_percent=VALID_PERCENT, test_percent=TEST_PERCENT):
    """data[split][lang] lines (Bible order) plus refs[split] and #filtered."""
    data = {s: {lang: [] for lang in LANGS.values()} for s in prepare_text.SPLITS}
    refs = {s: [] for s in prepare_text.SPLITS}
    filtered = 0
    for row in rows:
        if not keep(row, max_words):
            filtered += 1
            continue
        split = split_of(row["ref"], valid_percent, test_percent)
        refs[split].append(row["ref"])
        for col, lang in LANGS.items():
            data[split][lang].append(row[col])
    return data, refs, filtered


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", default=DEFAULT_INPUT, help="verses.tsv.gz (default: %(default)s)")
    p.add_argument("--dest", default="data-bin/bible_es_en", help="output dir (default: %(default)s)")
    p.add_argument("--vocab-size", type=int, default=4000, help="joint spm vocab (default 4000)")
    p.add_argument("--max-words", type=int, default=20,
                   help="keep pairs with es and en_web both 1..N whitespace words (default 20: about 12k pairs, an LSTM epoch in about a minute on 2 CPU cores)")
    p.add_argument("--valid-percent", type=int, default=VALID_PERCENT)
    p.add_argument("--test-percent", type=int, default=TEST_PERCENT)
    p.add_argument("--seed", type=int, default=1, help="sentencepiece seed")
    p.add_argument("--workers", type=int, default=1, help="fairseq-preprocess workers")
    p.add_argument("--force", action="store_true", help="replace an existing --dest")
    args = p.parse_args(argv)
    if not (0 <= args.valid_percent and 0 <= args.test_percent
            and args.valid_percent + args.test_percent < 100):
        p.error("need 0 <= valid%, test% and valid% + test% < 100")
    return args


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    prepare_text.check_dest(args.dest, args.force)
    rows, skipped = read_verses(args.input)
    data, refs, filtered = build_splits(rows, args.max_words, args.valid_percent,
                                        args.test_percent)
    data = {s: d for s, d in data.items() if d["es"] or s == "train"}
    if not data["train"]["es"]:
        raise PrepareError(f"{args.input}: no training pairs left after filtering")
    summary = prepare_text.prepare_parallel(
        args.dest, data, "es", "en", refs=["kjv"], vocab_size=args.vocab_size,
        seed=args.seed, workers=args.workers, force=args.force,
        manifest={"script": "prepare_bible.py", "input": os.path.abspath(args.input),
                  "max_words": args.max_words, "valid_percent": args.valid_percent,
                  "test_percent": args.test_percent,
                  "verses_read": len(rows) + sum(skipped.values()),
                  "skipped": dict(skipped), "length_filtered": filtered},
        # the verse reference of every line, for analysis
        extra_files={f"raw/{s}.ids": refs[s] for s in data})
    print(f"{args.input}: {summary['verses_read']} verses; skipped "
          f"{dict(skipped) or 0}; {filtered} longer than {args.max_words} words")
    print("pairs: " + ", ".join(f"{s} {n}" for s, n in summary["lines"].items())
          + f" (total {sum(summary['lines'].values())})")
    print(f"spm vocab {summary['spm']['vocab_size']}, fairseq dict "
          f"{summary['fairseq_dict_size']}; wrote {os.path.abspath(args.dest)} "
          f"in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(prepare_text.run_cli(main))
