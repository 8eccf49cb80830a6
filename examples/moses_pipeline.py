"""Moses-style text preparation without Perl, shared by the IWSLT'14 and WMT'14 recipes.

fairseq's ``examples/translation/prepare-*.sh`` clone mosesdecoder and
subword-nmt and pipe text through Perl scripts.  This module does the same
steps in Python, file to file (streaming, so WMT-sized corpora never sit in
memory), with the packages the recipes install (``sacremoses``,
``subword-nmt``):

* :func:`extract_members`: copy the members a recipe needs out of a
  ``.tgz`` / ``.tar`` archive (one pass over it), naming the first missing one;
* :func:`seg_text`: ``grep '<seg id' | sed ...`` of the XML / SGML test sets;
* :func:`map_file` with :func:`tokenize_job` / :func:`bpe_job`:
  normalize-punctuation.perl, remove-non-printing-char.perl,
  tokenizer.perl [-a], lowercase.perl, apply_bpe.py, optionally in worker
  processes, output in input order;
* :func:`clean_corpus`: clean-corpus-n.perl (ratio, min/max length), carrying
  other files aligned with the cleaned pair along;
* :func:`learn_bpe`: learn_bpe.py ``-s N`` on the concatenation of files.

Errors the user can fix raise :class:`prepare_text.PrepareError` (one line
``error: ...`` under :func:`prepare_text.run_cli`).
"""

import contextlib
import gzip
import io
import itertools
import multiprocessing
import os
import re
import shutil
import signal
import sys
import tarfile
import urllib.request
import zlib

_EXAMPLES = os.path.dirname(os.path.abspath(__file__))
if _EXAMPLES not in sys.path:
    sys.path.insert(0, _EXAMPLES)

import prepare_text  # noqa: E402
from prepare_text import PrepareError  # noqa: E402


# --------------------------------------------------------------------------
# archives and downloads
# --------------------------------------------------------------------------

def download(url, path):
    """Fetch ``url`` to ``path`` (via a temporary name: no partial file is left)."""
    tmp = path + ".part"
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            shutil.copyfileobj(r, f, 1 << 20)
    except (OSError, ValueError) as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise PrepareError(f"{url}: download failed ({getattr(e, 'reason', None) or e})")
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    os.replace(tmp, path)
    return path


def _member_name(name):
    while name.startswith("./"):
        name = name[2:]
    return name


def extract_members(archive, wanted, out_dir):
    """Copy the members ``wanted`` (names inside the archive) of ``archive`` to ``out_dir``.

    Reads the archive once as a stream (a .tgz cannot be seeked cheaply, and the
    WMT archives are gigabytes), so the order of ``wanted`` does not matter.
    Returns {name: extracted path}.  A missing archive, one that is not a tar
    file, a truncated one, or one without some wanted member raises
    PrepareError naming the archive and the member.
    """
    if not os.path.exists(archive):
        raise PrepareError(f"{archive}: no such file")
    if os.path.isdir(archive):
        raise PrepareError(f"{archive}: is a directory, expected a .tgz/.tar archive")
    wanted = set(wanted)
    found = {}
    try:
        with tarfile.open(archive, "r|*") as tar:
            for member in tar:
                name = _member_name(member.name)
                if name not in wanted or not member.isfile():
                    continue
                path = os.path.join(out_dir, *name.split("/"))
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with tar.extractfile(member) as src, open(path, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                found[name] = path
                if len(found) == len(wanted):
                    break
    except tarfile.ReadError as e:
        raise PrepareError(f"{archive}: not a readable tar/tgz archive ({e})")
    except (EOFError, zlib.error, tarfile.TarError) as e:
        raise PrepareError(f"{archive}: truncated or corrupted archive ({e})")
    missing = sorted(wanted - set(found))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise PrepareError(f"{archive}: has no member {missing[0]}{more}")
    return found


# --------------------------------------------------------------------------
# reading and writing lines
# --------------------------------------------------------------------------

def iter_lines(path, errors="strict", name=None):
    """Lines of a UTF-8 file (``.gz`` too), split on ``\\n`` only, without it.

    Only ``\\n`` ends a line, as in the Perl scripts (Python's universal
    newlines would also split on a stray ``\\r`` and shift the two sides of a
    parallel corpus against each other).  ``name`` is what errors call the
    file (e.g. the archive member it was extracted from).
    """
    name = name or path
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8", errors=errors, newline="\n") as f:
            for line in f:
                yield line[:-1] if line.endswith("\n") else line
    except UnicodeDecodeError as e:
        raise PrepareError(f"{name}: not valid UTF-8 ({e.reason})")
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise PrepareError(f"{name}: corrupted gzip file ({e})")


def write_lines(path, lines):
    """Write lines (an iterable) to ``path``; return how many."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for line in lines:
            f.write(line)
            f.write("\n")
            n += 1
    return n


def count_lines(path):
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def concat(paths, out_path):
    with open(out_path, "wb") as out:
        for p in paths:
            with open(p, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)


# --------------------------------------------------------------------------
# line transformations (fairseq's sed / grep steps)
# --------------------------------------------------------------------------

_SEG_OPEN = re.compile(r'<seg id="[0-9]*">\s*')
_SEG_CLOSE = re.compile(r"\s*</seg>\s*")


def seg_text(lines):
    """``grep '<seg id' | sed 's/<seg id="[0-9]*">\\s*//g' | sed 's/\\s*<\\/seg>\\s*//g'``."""
    for line in lines:
        if "<seg id" in line:
            yield _SEG_CLOSE.sub("", _SEG_OPEN.sub("", line))


def curly_apostrophes(lines):
    """``sed "s/\\’/\\'/g"`` (test sets only, as fairseq)."""
    for line in lines:
        yield line.replace("\u2019", "'")


# --------------------------------------------------------------------------
# per-line jobs, optionally in worker processes
# --------------------------------------------------------------------------

def tokenize_job(lang, aggressive_dash_splits=False, normalize_punctuation=False,
                 remove_non_printing=False, lowercase=False):
    """[normalize-punctuation.perl] [remove-non-printing-char.perl] tokenizer.perl [-a] [lowercase.perl].

    Returns a picklable spec for :func:`map_file`.
    """
    return ("tokenize", lang, aggressive_dash_splits, normalize_punctuation,
            remove_non_printing, lowercase)


def bpe_job(codes_path):
    """apply_bpe.py -c CODES (separator ``@@``)."""
    return ("bpe", codes_path)


def lowercase_job():
    return ("lowercase",)


def build_job(spec):
    """The function ``line -> line`` a spec stands for (built once per process)."""
    kind = spec[0]
    if kind == "tokenize":
        _, lang, aggressive, normalize, non_printing, lower = spec
        import regex
        from sacremoses import MosesPunctNormalizer, MosesTokenizer

        tok = MosesTokenizer(lang=lang)
        # perl_parity: the Perl script's mapping of ’ to " (fairseq ran the Perl)
        norm = MosesPunctNormalizer(lang=lang, perl_parity=True) if normalize else None
        control = regex.compile(r"\p{C}")

        def run(line):
            if norm is not None:
                line = norm.normalize(line)
            if non_printing:
                line = control.sub(" ", line)
            out = tok.tokenize(line, aggressive_dash_splits=aggressive, return_str=True, escape=True)
            return out.lower() if lower else out
        return run
    if kind == "bpe":
        from subword_nmt.apply_bpe import BPE

        with open(spec[1], encoding="utf-8") as f:
            bpe = BPE(f)
        return bpe.process_line
    if kind == "lowercase":
        return str.lower
    raise ValueError(f"unknown job {spec!r}")


_WORKER = None


def _init_worker(spec):
    global _WORKER
    # The parent turns Ctrl-C into cleanup (and terminates the pool); workers
    # would otherwise each print a KeyboardInterrupt traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _WORKER = build_job(spec)


def _run_chunk(lines):
    return [_WORKER(line) for line in lines]


def _chunks(lines, size):
    it = iter(lines)
    while True:
        chunk = list(itertools.islice(it, size))
        if not chunk:
            return
        yield chunk


def map_lines(spec, lines, workers=1, chunk=2000):
    """Yield job(line) for every line, in input order (``workers`` > 1: a process pool)."""
    if workers <= 1:
        fn = build_job(spec)
        for line in lines:
            yield fn(line)
        return
    with multiprocessing.get_context("fork").Pool(workers, _init_worker, (spec,)) as pool:
        for out in pool.imap(_run_chunk, _chunks(lines, chunk)):
            yield from out


def map_file(spec, in_path, out_path, workers=1, errors="strict", name=None):
    """``job < in_path > out_path``; returns the number of lines written."""
    return write_lines(out_path, map_lines(spec, iter_lines(in_path, errors, name), workers))


# --------------------------------------------------------------------------
# clean-corpus-n.perl
# --------------------------------------------------------------------------

def clean_corpus(pair_in, pair_out, ratio=1.5, min_len=1, max_len=175, passengers=(),
                 max_word_length=1000):
    """clean-corpus-n.perl -ratio RATIO on the parallel files ``pair_in`` -> ``pair_out``.

    Like the Perl script: whitespace is collapsed and trimmed, pipes are
    removed unless the first line has one (factored corpora), and a pair is
    dropped when a side is empty, has fewer than ``min_len`` or more than
    ``max_len`` words, the length ratio exceeds ``ratio`` either way, or a
    word is longer than ``max_word_length`` characters.  The kept lines are
    written whitespace-normalized.  ``passengers`` are (in, out) paths of files
    aligned with the pair (e.g. the untokenized text) whose lines are kept or
    dropped with it, unchanged.  Returns (lines read, lines kept).
    """
    (f_in, e_in), (f_out, e_out) = pair_in, pair_out
    ins = [iter_lines(f_in), iter_lines(e_in)] + [iter_lines(p) for p, _ in passengers]
    paths = [f_in, e_in] + [p for p, _ in passengers]
    outs = [f_out, e_out] + [o for _, o in passengers]
    factored = None
    n_in = n_out = 0
    for o in outs:
        os.makedirs(os.path.dirname(o) or ".", exist_ok=True)
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(open(o, "w", encoding="utf-8", newline="\n")) for o in outs]
        for rows in itertools.zip_longest(*ins):
            if any(r is None for r in rows):
                short = paths[rows.index(None)]
                raise PrepareError(f"line-count mismatch: {short} ends after {n_in} lines, "
                                   f"{paths[0]} has more")
            n_in += 1
            f, e = rows[0], rows[1]
            if factored is None:
                factored = "|" in f or "|" in e
            if not factored:
                f, e = f.replace("|", ""), e.replace("|", "")
            f, e = " ".join(f.split()), " ".join(e.split())
            if not f or not e:
                continue
            fw, ew = f.split(" "), e.split(" ")
            fc, ec = len(fw), len(ew)
            if not (min_len <= fc <= max_len and min_len <= ec <= max_len):
                continue
            if ec / fc > ratio or fc / ec > ratio:
                continue
            if max(map(len, fw)) > max_word_length or max(map(len, ew)) > max_word_length:
                continue
            n_out += 1
            files[0].write(f + "\n")
            files[1].write(e + "\n")
            for out, line in zip(files[2:], rows[2:]):
                out.write(line + "\n")
    return n_in, n_out


# --------------------------------------------------------------------------
# splitting and BPE
# --------------------------------------------------------------------------

def split_every(in_path, every, keep_path, held_path):
    """awk 'NR % every != 0' > keep; awk 'NR % every == 0' > held.  Returns (kept, held)."""
    kept = held = 0
    with open(keep_path, "w", encoding="utf-8", newline="\n") as k, \
            open(held_path, "w", encoding="utf-8", newline="\n") as h:
        for i, line in enumerate(iter_lines(in_path), 1):
            if i % every == 0:
                h.write(line + "\n")
                held += 1
            else:
                k.write(line + "\n")
                kept += 1
    return kept, held


def learn_bpe(paths, codes_path, merges):
    """learn_bpe.py -s MERGES < cat(paths) > codes_path; returns the merges learned.

    subword-nmt prints a progress bar and "no pair has frequency >= 2" (a
    small corpus runs out of pairs before ``merges``) on stderr: the count
    returned (also in the recipes' manifest.json) says the same.
    """
    from subword_nmt.learn_bpe import learn_bpe as _learn

    lines = itertools.chain.from_iterable(
        (line + "\n" for line in iter_lines(p)) for p in paths)
    with open(codes_path, "w", encoding="utf-8", newline="\n") as out, \
            contextlib.redirect_stderr(io.StringIO()):
        _learn(lines, out, merges)
    return count_lines(codes_path) - 1  # "#version: 0.2" header


# --------------------------------------------------------------------------
# binarizing
# --------------------------------------------------------------------------

def binarize(dest, text_dir, src, tgt, splits=("train", "valid", "test"), joined=True,
             threshold=0, workers=1):
    """fairseq-preprocess ``{text_dir}/{split}.{lang}`` into ``dest``.

    ``joined``: one dictionary over both sides (``--joined-dictionary``);
    ``threshold``: words seen fewer times in train map to <unk>
    (``--thresholdsrc/--thresholdtgt``).
    """
    args = ["--source-lang", src, "--target-lang", tgt, "--destdir", dest,
            "--workers", str(workers)]
    if joined:
        args.append("--joined-dictionary")
    if threshold:
        args += ["--thresholdsrc", str(threshold), "--thresholdtgt", str(threshold)]
    for split in splits:
        args += [f"--{split}pref", os.path.join(text_dir, split)]
    prepare_text.fairseq_preprocess(args)
    log = os.path.join(dest, "preprocess.log")  # names the temporary directory
    if os.path.exists(log):
        os.remove(log)


def add_run_args(parser):
    """The flags every recipe's prepare script shares."""
    parser.add_argument("--workers", type=int, default=1,
                        help="tokenizer/BPE processes and fairseq-preprocess workers")
    parser.add_argument("--force", action="store_true", help="replace an existing --dest")


def parse_run_args(parser, argv):
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    return args


def run_prepare(prepare, resolve, parse_args):
    """``__main__`` of a prepare script: one-line errors, signals (prepare_text.run_cli)."""
    def main(argv=None):
        prepare(resolve(parse_args(argv)))
        return 0

    return prepare_text.run_cli(main)
