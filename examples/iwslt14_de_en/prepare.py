#!/usr/bin/env python3
"""IWSLT'14 German -> English, prepared as fairseq's ``examples/translation/prepare-iwslt14.sh``.

The same steps as fairseq's script, in Python (``sacremoses`` for the Moses
Perl scripts, ``subword-nmt`` for BPE; see ``../moses_pipeline.py``):

1. the archive ``de-en.tgz`` (``--archive PATH``, or downloaded from ``--url``,
   by default the address fairseq's script uses), inner directory ``de-en/``;
2. train: ``train.tags.de-en.{de,en}`` without the lines holding ``<url>``,
   ``<talkid>`` or ``<keywords>``, with the ``<title>``/``<description>`` tags
   (not their text) removed; Moses tokenization; clean-corpus-n (ratio 1.5,
   1..175 words); lowercasing;
3. every 23rd line of that to valid, the rest to train;
4. test: the ``<seg>`` lines of ``IWSLT14.TED.dev2010``, ``IWSLT14.TEDX.dev2012``,
   ``IWSLT14.TED.tst2010``, ``tst2011``, ``tst2012`` (``.de-en.{de,en}.xml``), in
   that order, ’ -> ', tokenized and lowercased;
5. joint BPE (``learn_bpe -s 10000`` on train.de + train.en, ``apply_bpe`` to
   every split);
6. ``fairseq-preprocess --joined-dictionary``.

fairseq's IWSLT script tokenizes without ``-a`` (aggressive hyphen splitting),
unlike its WMT scripts; so does this one (``--aggressive-dash-splits`` to
split).  ``--mixer`` gives the data of Ranzato et al.'s MIXER
``prepareData.sh``, which dai2018 and leblond2018 follow: the same steps with
clean-corpus-n 1..50, no BPE (words), separate source and target
dictionaries of the words seen at least 3 times in train.

Output (``--dest``)::

    dict.de.txt dict.en.txt {train,valid,test}.de-en.{de,en}.bin/.idx
    code                  the BPE codes (none with --bpe-tokens 0)
    bpe/{split}.{de,en}   the text that was binarized (fairseq's iwslt14.tokenized.de-en/)
    tok/{split}.{de,en}   tokenized and lowercased words: the reference of tokenized BLEU
    raw/{split}.{de,en}   the same sentences before tokenization (for sacrebleu)
    manifest.json         counts and options

Built in a temporary directory next to ``--dest`` and moved into place at the
end: a failure or Ctrl-C leaves nothing behind.  Bad input (missing archive,
an archive without one of the expected files, sides of different lengths)
gives one line ``error: ...`` naming the file, exit code 2.

Usage::

    python examples/iwslt14_de_en/prepare.py --dest data-bin/iwslt14_de_en [--archive de-en.tgz]
        [--bpe-tokens 10000 (or env BPE_TOKENS)] [--workers 4] [--force] [--mixer]
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # examples/
import moses_pipeline as mp  # noqa: E402
import prepare_text  # noqa: E402
from prepare_text import PrepareError  # noqa: E402

URL = "https://wit3.fbk.eu/archive/2014-01/texts/de/en/de-en.tgz"
SRC, TGT = "de", "en"
LANGS = (SRC, TGT)
INNER = "de-en"
TEST_SETS = ("IWSLT14.TED.dev2010", "IWSLT14.TEDX.dev2012", "IWSLT14.TED.tst2010",
             "IWSLT14.TED.tst2011", "IWSLT14.TED.tst2012")
DROP_IF_CONTAINS = ("<url>", "<talkid>", "<keywords>")
STRIP = ("<title>", "</title>", "<description>", "</description>")
VALID_EVERY = 23
SPLITS = ("train", "valid", "test")


def train_member(lang):
    return f"{INNER}/train.tags.de-en.{lang}"


def test_member(name, lang):
    return f"{INNER}/{name}.de-en.{lang}.xml"


def members():
    return [train_member(l) for l in LANGS] + [test_member(t, l) for t in TEST_SETS for l in LANGS]


def strip_train_tags(lines):
    """fairseq's ``grep -v '<url>' | grep -v '<talkid>' | grep -v '<keywords>' | sed`` (title, description)."""
    for line in lines:
        if any(tag in line for tag in DROP_IF_CONTAINS):
            continue
        for tag in STRIP:
            line = line.replace(tag, "")
        yield line


def resolve(args):
    """Fill in the options that --mixer and the environment decide."""
    if args.bpe_tokens is None:
        env = os.environ.get("BPE_TOKENS")
        if args.mixer:
            args.bpe_tokens = 0
        elif env:
            try:
                args.bpe_tokens = int(env)
            except ValueError:
                raise PrepareError(f"BPE_TOKENS={env!r}: not an integer")
        else:
            args.bpe_tokens = 10000
    if args.bpe_tokens < 0:
        raise PrepareError(f"--bpe-tokens {args.bpe_tokens}: must be >= 0 (0 = words, no BPE)")
    if args.max_len is None:
        args.max_len = 50 if args.mixer else 175
    if args.max_len < 1:
        raise PrepareError(f"--max-len {args.max_len}: must be >= 1")
    args.joined = not args.mixer
    args.threshold = 3 if args.mixer else 0
    return args


def prepare(args):
    t0 = time.time()
    dest = prepare_text.check_dest(args.dest, args.force)
    if args.archive:
        archive = os.path.abspath(args.archive)
        if not os.path.isfile(archive):
            raise PrepareError(f"{archive}: no such file" if not os.path.exists(archive)
                               else f"{archive}: not a file")
    with prepare_text.atomic_dir(dest, args.force) as out:
        work = tempfile.mkdtemp(prefix=".work-", dir=out)
        if not args.archive:
            archive = mp.download(args.url, os.path.join(work, "de-en.tgz"))
        files = mp.extract_members(archive, members(), os.path.join(work, "orig"))

        def src_name(member):
            return f"{archive}:{member}"

        # train: strip tags, tokenize, clean, lowercase, split
        raw, tok = {}, {}
        for lang in LANGS:
            member = train_member(lang)
            raw[lang] = os.path.join(work, f"train.tags.raw.{lang}")
            mp.write_lines(raw[lang], strip_train_tags(mp.iter_lines(files[member], name=src_name(member))))
            tok[lang] = os.path.join(work, f"train.tags.tok.{lang}")
            mp.map_file(mp.tokenize_job(lang, args.aggressive_dash_splits), raw[lang], tok[lang],
                        args.workers, name=src_name(member))
        n_sides = {l: mp.count_lines(tok[l]) for l in LANGS}
        if n_sides[SRC] != n_sides[TGT]:
            raise PrepareError(
                f"line-count mismatch after removing the tag lines: {src_name(train_member(SRC))} has "
                f"{n_sides[SRC]} lines, {src_name(train_member(TGT))} has {n_sides[TGT]}")
        clean = {l: os.path.join(work, f"train.tags.clean.{l}") for l in LANGS}
        raw_clean = {l: os.path.join(work, f"train.tags.rawclean.{l}") for l in LANGS}
        n_in, n_kept = mp.clean_corpus(
            (tok[SRC], tok[TGT]), (clean[SRC], clean[TGT]), ratio=1.5, min_len=1, max_len=args.max_len,
            passengers=[(raw[l], raw_clean[l]) for l in LANGS])
        if n_kept < VALID_EVERY:
            raise PrepareError(f"{src_name(train_member(SRC))}: only {n_kept} sentence pairs left after "
                               f"cleaning; need at least {VALID_EVERY} for a validation split")
        tok_dir, raw_dir = os.path.join(out, "tok"), os.path.join(out, "raw")
        os.makedirs(tok_dir)
        os.makedirs(raw_dir)
        lines = {}
        for lang in LANGS:
            lower = os.path.join(work, f"train.tags.{lang}")
            mp.map_file(mp.lowercase_job(), clean[lang], lower)
            lines["train"], lines["valid"] = mp.split_every(
                lower, VALID_EVERY, os.path.join(tok_dir, f"train.{lang}"), os.path.join(tok_dir, f"valid.{lang}"))
            mp.split_every(raw_clean[lang], VALID_EVERY, os.path.join(raw_dir, f"train.{lang}"),
                           os.path.join(raw_dir, f"valid.{lang}"))

        # test: <seg> lines of the five sets, concatenated
        parts = {}
        for lang in LANGS:
            tok_parts, raw_parts = [], []
            for name in TEST_SETS:
                member = test_member(name, lang)
                segs = list(mp.seg_text(mp.iter_lines(files[member], name=src_name(member))))
                if not segs:
                    raise PrepareError(f"{src_name(member)}: no <seg id=...> lines")
                if lang == TGT and len(segs) != parts[name]:
                    raise PrepareError(f"line-count mismatch: {src_name(test_member(name, SRC))} has "
                                       f"{parts[name]} segments, {src_name(member)} has {len(segs)}")
                parts[name] = len(segs)
                raw_parts.append(os.path.join(work, f"{name}.raw.{lang}"))
                mp.write_lines(raw_parts[-1], segs)
                tok_parts.append(os.path.join(work, f"{name}.{lang}"))
                mp.write_lines(tok_parts[-1], mp.map_lines(
                    mp.tokenize_job(lang, args.aggressive_dash_splits, lowercase=True),
                    mp.curly_apostrophes(segs), args.workers))
            mp.concat(tok_parts, os.path.join(tok_dir, f"test.{lang}"))
            mp.concat(raw_parts, os.path.join(raw_dir, f"test.{lang}"))
        lines["test"] = sum(parts.values())

        # joint BPE on train.de + train.en, applied to every split
        merges = 0
        text_dir = tok_dir
        if args.bpe_tokens:
            code = os.path.join(out, "code")
            merges = mp.learn_bpe([os.path.join(tok_dir, f"train.{l}") for l in LANGS], code, args.bpe_tokens)
            text_dir = os.path.join(out, "bpe")
            for split in SPLITS:
                for lang in LANGS:
                    mp.map_file(mp.bpe_job(code), os.path.join(tok_dir, f"{split}.{lang}"),
                                os.path.join(text_dir, f"{split}.{lang}"), args.workers)
        shutil.rmtree(work)

        mp.binarize(out, text_dir, SRC, TGT, SPLITS, joined=args.joined, threshold=args.threshold,
                    workers=args.workers)
        summary = {
            "script": "examples/iwslt14_de_en/prepare.py",
            "source": archive if args.archive else args.url,
            "src": SRC, "tgt": TGT, "lowercase": True,
            "tokenizer": {"aggressive_dash_splits": args.aggressive_dash_splits},
            "clean": {"ratio": 1.5, "min_len": 1, "max_len": args.max_len,
                      "pairs_in": n_in, "pairs_kept": n_kept},
            "valid_every": VALID_EVERY,
            "test_sets": parts,
            "lines": lines,
            "bpe": {"merges_requested": args.bpe_tokens, "merges_learned": merges},
            "binarized": os.path.basename(text_dir),
            "joined_dictionary": args.joined, "threshold": args.threshold, "mixer": args.mixer,
            "dict_size": {l: prepare_text.dict_size(os.path.join(out, f"dict.{l}.txt")) for l in LANGS},
        }
        prepare_text.write_manifest(out, summary)
    print(f"wrote {dest}: " + ", ".join(f"{s} {lines[s]}" for s in SPLITS)
          + f" lines; {merges} BPE merges, dictionary {summary['dict_size'][TGT]}; {time.time() - t0:.1f}s")
    return summary


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dest", required=True, help="output directory (must not exist unless --force)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--archive", help="local de-en.tgz (nothing is downloaded)")
    src.add_argument("--url", default=URL, help=f"download the archive from here (default {URL})")
    p.add_argument("--bpe-tokens", type=int, default=None,
                   help="BPE merges (default: env BPE_TOKENS, else 10000 as fairseq; 0 = words)")
    p.add_argument("--max-len", type=int, default=None,
                   help="clean-corpus-n maximum words per side on train (default 175 as fairseq; 50 with --mixer)")
    p.add_argument("--aggressive-dash-splits", action="store_true",
                   help="Moses -a (fairseq's IWSLT script does not use it)")
    p.add_argument("--mixer", action="store_true",
                   help="Ranzato et al.'s MIXER data (dai2018, leblond2018): max 50 words, no BPE, "
                        "separate dictionaries of words seen >= 3 times")
    mp.add_run_args(p)
    return mp.parse_run_args(p, argv)


if __name__ == "__main__":
    sys.exit(mp.run_prepare(prepare, resolve, parse_args))
