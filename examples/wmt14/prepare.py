#!/usr/bin/env python3
"""WMT'14 English -> German / English -> French, prepared as fairseq's prepare-wmt14en2{de,fr}.sh.

The steps of fairseq's ``examples/translation/prepare-wmt14en2de.sh`` and
``prepare-wmt14en2fr.sh`` in Python (``sacremoses``, ``subword-nmt``; see
``../moses_pipeline.py``):

1. the archives below, read from ``--archive-dir`` under their standard
   names (``--download`` fetches the missing ones from statmt.org into it
   first, as fairseq's script does);
2. train: every corpus, each side through normalize-punctuation.perl,
   remove-non-printing-char.perl and ``tokenizer.perl -a``, concatenated;
3. test: the ``<seg>`` lines of newstest2014 (``test-full/newstest2014-{deen,fren}-{src,ref}.{lang}.sgm``),
   ’ -> ', ``tokenizer.perl -a``;
4. valid: every 100th (en-de) / 1333rd (en-fr) training line, as fairseq
   (``--valid-every``);
   en-de ``--valid newstest2013``: ``dev/newstest2013.{en,de}`` from dev.tgz
   instead (treated as the test set);
5. joint BPE, 40k merges, on train.en + train.{de,fr}, applied to every split;
6. clean-corpus-n (ratio 1.5, 1..250 BPE tokens) on train and valid, not test;
7. ``fairseq-preprocess --joined-dictionary``.

Not lowercased (the WMT papers report cased BLEU).  elbayad2018's En-Fr is
the 12M-pair filtered selection of Bahdanau et al. / Cho et al., not this
36M-pair concatenation: pass ``--corpora`` to choose the corpora.

en-de archives (``--icml17``: news-commentary v9 of WMT'14 instead of v12)::

    training-parallel-europarl-v7.tgz   training/europarl-v7.de-en.{en,de}
    training-parallel-commoncrawl.tgz   commoncrawl.de-en.{en,de}
    training-parallel-nc-v12.tgz        training/news-commentary-v12.de-en.{en,de}
    dev.tgz                             dev/newstest2013.{en,de} (--valid newstest2013 only)
    test-full.tgz                       test-full/newstest2014-deen-src.en.sgm, -ref.de.sgm

en-fr archives::

    training-parallel-europarl-v7.tgz   training/europarl-v7.fr-en.{en,fr}
    training-parallel-commoncrawl.tgz   commoncrawl.fr-en.{en,fr}
    training-parallel-un.tgz            un/undoc.2000.fr-en.{en,fr}
    training-parallel-nc-v9.tgz         training/news-commentary-v9.fr-en.{en,fr}
    training-giga-fren.tar              giga-fren.release2.fixed.{en,fr}.gz
    test-full.tgz                       test-full/newstest2014-fren-src.en.sgm, -ref.fr.sgm

Output (``--dest``) as the IWSLT recipe: binarized splits and dictionaries,
``code``, ``bpe/{split}.{lang}`` (all splits), ``tok/`` and ``raw/`` for valid
and test only (train is too large to keep three copies of), ``manifest.json``.
Built in a temporary directory next to ``--dest`` and moved into place at the
end; bad input gives one line ``error: ...`` naming the file, exit code 2.

Usage::

    python examples/wmt14/prepare.py --pair en-de --archive-dir orig --dest data-bin/wmt14_en_de \\
        [--download] [--bpe-tokens 40000 (or env BPE_TOKENS)] [--workers 8] [--force]
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

SPLITS = ("train", "valid", "test")

# corpus name -> (archive file, URL, member prefix inside the archive); the
# member is PREFIX.LANG (giga-fren: PREFIX.LANG.gz)
ARCHIVES = {
    "training-parallel-europarl-v7.tgz": "http://statmt.org/wmt13/training-parallel-europarl-v7.tgz",
    "training-parallel-commoncrawl.tgz": "http://statmt.org/wmt13/training-parallel-commoncrawl.tgz",
    "training-parallel-nc-v12.tgz": "http://data.statmt.org/wmt17/translation-task/training-parallel-nc-v12.tgz",
    "training-parallel-nc-v9.tgz": "http://statmt.org/wmt14/training-parallel-nc-v9.tgz",
    "training-parallel-un.tgz": "http://statmt.org/wmt13/training-parallel-un.tgz",
    "training-giga-fren.tar": "http://statmt.org/wmt10/training-giga-fren.tar",
    "dev.tgz": "http://data.statmt.org/wmt17/translation-task/dev.tgz",
    "test-full.tgz": "http://statmt.org/wmt14/test-full.tgz",
}
CORPORA = {
    "en-de": {
        "europarl-v7": ("training-parallel-europarl-v7.tgz", "training/europarl-v7.de-en"),
        "commoncrawl": ("training-parallel-commoncrawl.tgz", "commoncrawl.de-en"),
        "news-commentary-v12": ("training-parallel-nc-v12.tgz", "training/news-commentary-v12.de-en"),
        "news-commentary-v9": ("training-parallel-nc-v9.tgz", "training/news-commentary-v9.de-en"),
    },
    "en-fr": {
        "europarl-v7": ("training-parallel-europarl-v7.tgz", "training/europarl-v7.fr-en"),
        "commoncrawl": ("training-parallel-commoncrawl.tgz", "commoncrawl.fr-en"),
        "un": ("training-parallel-un.tgz", "un/undoc.2000.fr-en"),
        "news-commentary-v9": ("training-parallel-nc-v9.tgz", "training/news-commentary-v9.fr-en"),
        "giga-fren": ("training-giga-fren.tar", "giga-fren.release2.fixed"),
    },
}
DEFAULT_CORPORA = {
    "en-de": ["europarl-v7", "commoncrawl", "news-commentary-v12"],
    "en-fr": ["europarl-v7", "commoncrawl", "un", "news-commentary-v9", "giga-fren"],
}
VALID_EVERY = {"en-de": 100, "en-fr": 1333}
TEST_CODE = {"en-de": "deen", "en-fr": "fren"}


def corpus_member(pair, corpus, lang):
    archive, prefix = CORPORA[pair][corpus]
    return archive, f"{prefix}.{lang}" + (".gz" if archive.endswith(".tar") else "")


def test_member(pair, lang, src):
    return "test-full.tgz", f"test-full/newstest2014-{TEST_CODE[pair]}-{'src' if lang == src else 'ref'}.{lang}.sgm"


def dev_member(lang):
    return "dev.tgz", f"dev/newstest2013.{lang}"


def resolve(args):
    args.src, args.tgt = args.pair.split("-")
    if args.bpe_tokens is None:
        env = os.environ.get("BPE_TOKENS")
        try:
            args.bpe_tokens = int(env) if env else 40000
        except ValueError:
            raise PrepareError(f"BPE_TOKENS={env!r}: not an integer")
    if args.bpe_tokens < 1:
        raise PrepareError(f"--bpe-tokens {args.bpe_tokens}: must be >= 1")
    if args.corpora is None:
        args.corpora = list(DEFAULT_CORPORA[args.pair])
        if args.icml17:
            args.corpora[args.corpora.index("news-commentary-v12")] = "news-commentary-v9"
    elif args.icml17:
        raise PrepareError("--icml17 and --corpora: give the corpora you want with --corpora alone")
    if args.icml17 and args.pair != "en-de":
        raise PrepareError("--icml17 is an en-de option (fairseq's prepare-wmt14en2de.sh --icml17)")
    for c in args.corpora:
        if c not in CORPORA[args.pair]:
            raise PrepareError(f"--corpora {c}: unknown for {args.pair} (known: {', '.join(CORPORA[args.pair])})")
    if args.valid_every is None:
        args.valid_every = VALID_EVERY[args.pair]
    if args.valid_every < 2:
        raise PrepareError(f"--valid-every {args.valid_every}: must be at least 2")
    if args.valid == "newstest2013" and args.pair != "en-de":
        raise PrepareError("--valid newstest2013: en-de only (dev.tgz holds the en-de newstest2013)")
    return args


def needed(args):
    """{archive file: [members]} this run reads."""
    want = {}
    for corpus in args.corpora:
        for lang in (args.src, args.tgt):
            archive, member = corpus_member(args.pair, corpus, lang)
            want.setdefault(archive, []).append(member)
    for lang in (args.src, args.tgt):
        archive, member = test_member(args.pair, lang, args.src)
        want.setdefault(archive, []).append(member)
        if args.valid == "newstest2013":
            archive, member = dev_member(lang)
            want.setdefault(archive, []).append(member)
    return want


def locate_archives(args, want):
    """Paths of the archives, downloading missing ones with --download."""
    if not os.path.isdir(args.archive_dir):
        if not args.download:
            raise PrepareError(f"{args.archive_dir}: --archive-dir does not exist (add --download to fetch "
                               f"the archives into it)")
        os.makedirs(args.archive_dir)
    paths = {}
    for name in want:
        path = os.path.join(os.path.abspath(args.archive_dir), name)
        if not os.path.exists(path):
            if not args.download:
                raise PrepareError(f"{path}: no such file (add --download to fetch it from {ARCHIVES[name]})")
            print(f"downloading {ARCHIVES[name]}", file=sys.stderr)
            mp.download(ARCHIVES[name], path)
        paths[name] = path
    return paths


def sgm_to_text(in_path, out_raw, out_tok, lang, workers, name):
    """test / dev sets: (seg lines | plain lines) -> raw copy, and ’ -> ' + tokenizer -a."""
    lines = mp.iter_lines(in_path, "replace", name)
    if in_path.endswith(".sgm"):
        lines = mp.seg_text(lines)
    n = mp.write_lines(out_raw, lines)
    if n == 0:
        raise PrepareError(f"{name}: no sentences")
    mp.write_lines(out_tok, mp.map_lines(mp.tokenize_job(lang, True),
                                         mp.curly_apostrophes(mp.iter_lines(out_raw)), workers))
    return n


def prepare(args):
    t0 = time.time()
    src, tgt, langs = args.src, args.tgt, (args.src, args.tgt)
    dest = prepare_text.check_dest(args.dest, args.force)
    want = needed(args)
    archives = locate_archives(args, want)
    with prepare_text.atomic_dir(dest, args.force) as out:
        work = tempfile.mkdtemp(prefix=".work-", dir=out)
        files = {}
        for archive, members in want.items():
            for member, path in mp.extract_members(archives[archive], members, os.path.join(work, "orig")).items():
                files[(archive, member)] = path

        def name(archive, member):
            return f"{archives[archive]}:{member}"

        # train: normalize, remove non-printing characters, tokenize -a; keep the
        # original lines alongside, for the raw valid sentences
        train_tok = {l: os.path.join(work, f"train.tok.{l}") for l in langs}
        train_raw = {l: os.path.join(work, f"train.raw.{l}") for l in langs}
        corpus_lines = {}
        for lang in langs:
            tok_parts, raw_parts = [], []
            for corpus in args.corpora:
                archive, member = corpus_member(args.pair, corpus, lang)
                path = files[(archive, member)]
                raw_parts.append(os.path.join(work, f"{corpus}.raw.{lang}"))
                # WMT crawls hold some invalid UTF-8: U+FFFD, as Perl's :utf8 layer would decode it
                mp.write_lines(raw_parts[-1], mp.iter_lines(path, "replace", name(archive, member)))
                tok_parts.append(os.path.join(work, f"{corpus}.tok.{lang}"))
                n = mp.map_file(mp.tokenize_job(lang, True, normalize_punctuation=True, remove_non_printing=True),
                                raw_parts[-1], tok_parts[-1], args.workers)
                if lang == tgt and n != corpus_lines[corpus][1]:
                    other = corpus_member(args.pair, corpus, src)
                    raise PrepareError(f"line-count mismatch: {name(*other)} has {corpus_lines[corpus][1]} lines, "
                                       f"{name(archive, member)} has {n}")
                corpus_lines[corpus] = (member, n)
            mp.concat(tok_parts, train_tok[lang])
            mp.concat(raw_parts, train_raw[lang])
            for p in tok_parts + raw_parts:
                os.remove(p)

        tok_dir, raw_dir = os.path.join(out, "tok"), os.path.join(out, "raw")
        text = {}  # (split, lang) -> tokenized text before BPE
        passengers = {}  # split -> files cleaned along with it
        for lang in langs:
            archive, member = test_member(args.pair, lang, src)
            sgm_to_text(files[(archive, member)], os.path.join(raw_dir, f"test.{lang}"),
                        os.path.join(tok_dir, f"test.{lang}"), lang, args.workers, name(archive, member))
            text[("test", lang)] = os.path.join(tok_dir, f"test.{lang}")
            train_split = os.path.join(work, f"train.tokenized.{lang}")
            if args.valid == "newstest2013":
                archive, member = dev_member(lang)
                valid_tok = os.path.join(work, f"valid.tok.{lang}")
                valid_raw = os.path.join(work, f"valid.raw.{lang}")
                sgm_to_text(files[(archive, member)], valid_raw, valid_tok, lang, args.workers, name(archive, member))
                os.replace(train_tok[lang], train_split)
            else:
                valid_tok = os.path.join(work, f"valid.tok.{lang}")
                valid_raw = os.path.join(work, f"valid.raw.{lang}")
                mp.split_every(train_tok[lang], args.valid_every, train_split, valid_tok)
                mp.split_every(train_raw[lang], args.valid_every, os.devnull, valid_raw)
            text[("train", lang)], text[("valid", lang)] = train_split, valid_tok
            passengers.setdefault("valid", []).extend([
                (valid_tok, os.path.join(tok_dir, f"valid.{lang}")),
                (valid_raw, os.path.join(raw_dir, f"valid.{lang}"))])
        counts_src_tgt = {l: mp.count_lines(text[("test", l)]) for l in langs}
        if counts_src_tgt[src] != counts_src_tgt[tgt]:
            a, b = (name(*test_member(args.pair, l, src)) for l in langs)
            raise PrepareError(f"line-count mismatch: {a} has {counts_src_tgt[src]} segments, "
                               f"{b} has {counts_src_tgt[tgt]}")
        for p in list(train_raw.values()):
            os.remove(p)

        # joint BPE on train.src + train.tgt
        code = os.path.join(out, "code")
        merges = mp.learn_bpe([text[("train", l)] for l in langs], code, args.bpe_tokens)
        bpe_dir = os.path.join(out, "bpe")
        os.makedirs(bpe_dir)
        # fairseq cleans train and its valid sample after BPE; a real dev set
        # (newstest2013) is kept whole, as the test set
        cleaned = ("train", "valid") if args.valid == "split" else ("train",)
        for split in SPLITS:
            for lang in langs:
                bpe_path = os.path.join(work if split in cleaned else bpe_dir, f"{split}.{lang}")
                mp.map_file(mp.bpe_job(code), text[(split, lang)], bpe_path, args.workers)
        lines, clean = {}, {}
        for split in cleaned:
            n_in, n_kept = mp.clean_corpus(
                tuple(os.path.join(work, f"{split}.{l}") for l in langs),
                tuple(os.path.join(bpe_dir, f"{split}.{l}") for l in langs),
                ratio=1.5, min_len=1, max_len=250, passengers=passengers.get(split, ()))
            clean[split] = {"pairs_in": n_in, "pairs_kept": n_kept}
            lines[split] = n_kept
        if "valid" not in cleaned:
            for text_path, kept_path in passengers["valid"]:
                os.replace(text_path, kept_path)
            lines["valid"] = mp.count_lines(os.path.join(bpe_dir, f"valid.{src}"))
        lines["test"] = counts_src_tgt[src]
        for split in ("train", "valid"):
            if lines[split] == 0:
                hint = " (fewer lines than --valid-every?)" if split == "valid" and args.valid == "split" else ""
                raise PrepareError(f"no {split} sentence pair is left after cleaning{hint}")
        shutil.rmtree(work)

        mp.binarize(out, bpe_dir, src, tgt, SPLITS, joined=True, workers=args.workers)
        summary = {
            "script": "examples/wmt14/prepare.py", "pair": args.pair, "src": src, "tgt": tgt,
            "lowercase": False, "archives": {a: archives[a] for a in want},
            "corpora": {c: corpus_lines[c][1] for c in args.corpora},
            "tokenizer": {"aggressive_dash_splits": True, "normalize_punctuation": True,
                          "remove_non_printing": True},
            "valid": args.valid if args.valid == "newstest2013" else f"every {args.valid_every}th train line",
            "clean": {"ratio": 1.5, "min_len": 1, "max_len": 250, **{s: c for s, c in clean.items()}},
            "lines": lines,
            "bpe": {"merges_requested": args.bpe_tokens, "merges_learned": merges},
            "binarized": "bpe", "joined_dictionary": True,
            "dict_size": prepare_text.dict_size(os.path.join(out, f"dict.{tgt}.txt")),
        }
        prepare_text.write_manifest(out, summary)
    print(f"wrote {dest}: " + ", ".join(f"{s} {lines[s]}" for s in SPLITS)
          + f" lines; {merges} BPE merges, dictionary {summary['dict_size']}; {time.time() - t0:.1f}s")
    return summary


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", required=True, choices=sorted(CORPORA))
    p.add_argument("--dest", required=True, help="output directory (must not exist unless --force)")
    p.add_argument("--archive-dir", required=True, help="directory with the archives under their standard names")
    p.add_argument("--download", action="store_true",
                   help="fetch archives missing from --archive-dir from their statmt.org URLs")
    p.add_argument("--corpora", nargs="+", default=None, help="training corpora (default: fairseq's list)")
    p.add_argument("--icml17", action="store_true", help="en-de: news-commentary v9 (WMT'14) instead of v12")
    p.add_argument("--valid", choices=["split", "newstest2013"], default="split",
                   help="split: every 100th/1333rd train line (fairseq); newstest2013: en-de dev set")
    p.add_argument("--valid-every", type=int, default=None,
                   help="--valid split: every N-th train line (default 100 for en-de, 1333 for en-fr, as fairseq)")
    p.add_argument("--bpe-tokens", type=int, default=None, help="BPE merges (default: env BPE_TOKENS, else 40000)")
    mp.add_run_args(p)
    return mp.parse_run_args(p, argv)


if __name__ == "__main__":
    sys.exit(mp.run_prepare(prepare, resolve, parse_args))
