#!/usr/bin/env python3
"""Prepare your own parallel text for fairseq_seqlevel.

raw parallel text -> joint sentencepiece model (trained on the train split
only) -> sentencepiece pieces -> ``fairseq-preprocess --joined-dictionary``.

Input: a directory with one file per split and language, ``{split}.{lang}``
(or ``{split}.{lang}.gz``), one sentence a line, untokenized, UTF-8, for
example ``train.es train.en valid.es valid.en test.es test.en``.  Optional
extra reference sets (a second translation of the target side) are files
``{split}.{ref}``, e.g. ``test.kjv``; they are encoded with the same
sentencepiece model and binarized with the TARGET dictionary.

Output (``--dest``)::

    dict.{src}.txt dict.{tgt}.txt            joined fairseq dictionary (identical)
    {split}.{src}-{tgt}.{src}.bin/.idx       source side
    {split}.{src}-{tgt}.{tgt}.bin/.idx       target side
    {split}.{src}-{tgt}.{ref}.bin/.idx       extra references (--extra-refs)
    spm.model spm.vocab                      the sentencepiece model
    raw/{split}.{lang}                       untokenized text (src, tgt, refs)
    manifest.json                            what was built, counts, options

Everything is built in a temporary directory next to ``--dest`` and renamed
into place at the very end, so a failure leaves nothing half-written.  An
existing destination is refused unless ``--force`` (then the new directory is
built first and swapped in).

Bad input gives one line ``error: ...`` on stderr and exit code 2.  Ctrl-C or
SIGTERM removes the temporary directory, stops fairseq-preprocess and exits
130 / 143.

Usage::

    python examples/prepare_text.py --input-dir my_corpus --src es --tgt en \\
        --dest data-bin/my_corpus --vocab-size 8000 --extra-refs kjv
"""

import argparse
import contextlib
import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib

SPLITS = ("train", "valid", "test")
LANG_RE = re.compile(r"^[A-Za-z0-9_]+$")
EXIT_BAD_INPUT = 2


class PrepareError(Exception):
    """A user-facing problem, reported as one line on stderr (exit code 2)."""


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that cleanup runs as on Ctrl-C.

    A BaseException (like KeyboardInterrupt): no ``except Exception`` swallows it.
    """

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


class _Deferred:
    depth = 0  # > 0: inside a few lines that must not be cut by an interrupt
    pending = None  # the signal that arrived meanwhile


def _raise_for(signum):
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    # a second SIGTERM must not interrupt the cleanup the first one started
    signal.signal(signum, signal.SIG_IGN)
    raise Terminated(signum)


def _on_interrupt(signum, frame):
    if _Deferred.depth:
        _Deferred.pending = _Deferred.pending or signum
        return
    _raise_for(signum)


def defer_interrupts():
    """Hold Ctrl-C / SIGTERM (under :func:`run_cli`) until :func:`resume_interrupts`."""
    _Deferred.depth += 1


def resume_interrupts():
    """End a :func:`defer_interrupts`; raise the interrupt that came meanwhile.

    Call it inside the ``try`` whose handler cleans up what the deferred
    lines made, so that no moment is left where an interrupt skips it.
    """
    _Deferred.depth -= 1
    if _Deferred.depth == 0 and _Deferred.pending is not None:
        signum, _Deferred.pending = _Deferred.pending, None
        _raise_for(signum)


def _interrupt_cause(error):
    """The KeyboardInterrupt / Terminated in ``error``'s chain of causes, or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, (KeyboardInterrupt, Terminated)):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def run_cli(main_fn, argv=None):
    """Run ``main_fn(argv)``; turn PrepareError/OSError into one line + exit 2.

    Ctrl-C and SIGTERM unwind normally (the temporary output directory is
    removed, a running fairseq-preprocess is killed) and exit 130 / 143.
    """
    previous = {s: signal.signal(s, _on_interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return main_fn(argv) or 0
    except PrepareError as e:
        msg = str(e)
    except OSError as e:  # e.g. permission denied, disk full
        msg = f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}"
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except Terminated as e:
        print(f"error: terminated by {signal.Signals(e.signum).name}", file=sys.stderr)
        return 128 + e.signum
    except Exception as e:
        # an interrupt raised while a C extension initialises (e.g. ``import sentencepiece``)
        # comes back as that module's ImportError, caused by the interrupt
        interrupt = _interrupt_cause(e)
        if interrupt is None:
            raise
        if isinstance(interrupt, KeyboardInterrupt):
            print("error: interrupted", file=sys.stderr)
            return 128 + signal.SIGINT
        print(f"error: terminated by {signal.Signals(interrupt.signum).name}", file=sys.stderr)
        return 128 + interrupt.signum
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    print(f"error: {' '.join(msg.split())}", file=sys.stderr)
    return EXIT_BAD_INPUT


# --------------------------------------------------------------------------
# reading input
# --------------------------------------------------------------------------

def open_text(path):
    """Return the decoded text of a (possibly gzipped) UTF-8 file."""
    if not os.path.exists(path):
        raise PrepareError(f"{path}: no such file")
    if os.path.isdir(path):
        raise PrepareError(f"{path}: is a directory, expected a file")
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b" or path.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise PrepareError(f"{path}: corrupted gzip file ({e})")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise PrepareError(f"{path}:{line}: not valid UTF-8 ({e.reason})")


def split_lines(text, path):
    """Split on '\\n' only (a final newline is optional; CRLF is accepted)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for i, line in enumerate(lines):
        if line.endswith("\r"):
            line = lines[i] = line[:-1]
        if "\r" in line:
            raise PrepareError(f"{path}:{i + 1}: stray carriage return inside a line")
    return lines


def read_lines(path, allow_empty=False):
    """Read one sentence a line; reject empty (or whitespace-only) lines."""
    lines = split_lines(open_text(path), path)
    if not lines:
        raise PrepareError(f"{path}: file is empty")
    if not allow_empty:
        for i, line in enumerate(lines):
            if not line.strip():
                raise PrepareError(f"{path}:{i + 1}: empty line (first one in the file)")
    return lines


def find_input(input_dir, split, lang):
    for name in (f"{split}.{lang}", f"{split}.{lang}.gz"):
        path = os.path.join(input_dir, name)
        if os.path.exists(path):
            return path
    raise PrepareError(
        f"{os.path.join(input_dir, f'{split}.{lang}')}: missing input file (also tried .gz)")


def check_langs(src, tgt, refs=()):
    for lang in (src, tgt, *refs):
        if not LANG_RE.match(lang):
            raise PrepareError(f"language/reference name {lang!r}: use only letters, digits, _")
    names = [src, tgt, *refs]
    if len(set(names)) != len(names):
        raise PrepareError(f"source, target and extra-reference names must differ: {names}")


def load_parallel(input_dir, src, tgt, splits=SPLITS, refs=(), ref_splits=None):
    """Read ``{input_dir}/{split}.{lang}`` files; return (data, sources).

    data[split][lang] = list of lines; sources[(split, lang)] = file path.
    """
    if not os.path.exists(input_dir):
        raise PrepareError(f"{input_dir}: input directory does not exist")
    if not os.path.isdir(input_dir):
        raise PrepareError(f"{input_dir}: --input-dir is not a directory")
    ref_splits = splits if ref_splits is None else ref_splits
    data, sources = {}, {}
    for split in splits:
        langs = [src, tgt] + [r for r in refs if split in ref_splits]
        data[split] = {}
        for lang in langs:
            path = find_input(input_dir, split, lang)
            sources[(split, lang)] = path
            data[split][lang] = read_lines(path)
    check_parallel(data, sources)
    return data, sources


def check_parallel(data, sources=None):
    """All languages of one split must have the same number of lines."""
    sources = sources or {}
    for split, by_lang in data.items():
        langs = list(by_lang)
        first = langs[0]
        for lang in langs[1:]:
            n, m = len(by_lang[first]), len(by_lang[lang])
            if n != m:
                a = sources.get((split, first), f"{split}.{first}")
                b = sources.get((split, lang), f"{split}.{lang}")
                raise PrepareError(f"line-count mismatch: {a} has {n} lines, {b} has {m} lines")


# --------------------------------------------------------------------------
# writing output atomically
# --------------------------------------------------------------------------

def check_dest(dest, force):
    dest = os.path.abspath(dest)
    if os.path.lexists(dest):
        if not force:
            raise PrepareError(f"{dest}: destination exists (use --force to replace it)")
        if not os.path.isdir(dest) or os.path.islink(dest):
            raise PrepareError(f"{dest}: destination exists and is not a directory")
    return dest


@contextlib.contextmanager
def atomic_dir(dest, force=False):
    """Yield a fresh temp dir next to ``dest``; move it to ``dest`` on success.

    On any exception (or Ctrl-C, SIGTERM under :func:`run_cli`) the temp dir
    is removed and ``dest`` is left untouched.  With ``force`` an existing
    ``dest`` is swapped out only after the new one is complete.  Interrupts
    are held while the temp dir is created, renamed into place and removed,
    so none leaves it behind or ``dest`` half swapped.
    """
    dest = check_dest(dest, force)
    parent, base = os.path.split(dest)
    os.makedirs(parent, exist_ok=True)
    tmp = None
    # `held` tracks the interrupt hold (plain statements: no signal handler
    # runs between them and the counter update)
    held = True
    _Deferred.depth += 1
    try:
        tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
        held = False
        resume_interrupts()
        yield tmp
        held = True
        _Deferred.depth += 1
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        if os.path.lexists(dest):
            check_dest(dest, force)
            old = tempfile.mkdtemp(prefix=f".{base}.old-", dir=parent)
            os.rmdir(old)
            os.rename(dest, old)
            try:
                os.rename(tmp, dest)
            except BaseException:
                os.rename(old, dest)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dest)
    finally:
        if not held:
            held = True
            _Deferred.depth += 1
        try:
            if tmp is not None and os.path.exists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
        finally:
            resume_interrupts()  # an interrupt that came meanwhile is raised now


def write_lines(path, lines):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for line in lines:
            f.write(line)
            f.write("\n")


def write_raw(dest, data):
    """Keep untokenized copies ``raw/{split}.{lang}`` (for sacrebleu)."""
    for split, by_lang in data.items():
        for lang, lines in by_lang.items():
            write_lines(os.path.join(dest, "raw", f"{split}.{lang}"), lines)


# --------------------------------------------------------------------------
# sentencepiece
# --------------------------------------------------------------------------

def train_spm(model_prefix, sentences, vocab_size, model_type="unigram",
              character_coverage=1.0, seed=1):
    """Train a sentencepiece model deterministically (1 thread, no shuffling).

    Trains from memory so that no (temporary) path ends up in the model file:
    the same sentences and options give a byte-identical ``.model``.  Writes
    ``{model_prefix}.model`` and ``{model_prefix}.vocab`` (piece<TAB>score).
    """
    import io
    import sentencepiece as spm

    if hasattr(spm, "set_random_generator_seed"):
        spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=model,
            vocab_size=vocab_size, model_type=model_type,
            character_coverage=character_coverage, num_threads=1,
            input_sentence_size=0, shuffle_input_sentence=False,
            hard_vocab_limit=False, bos_id=-1, eos_id=-1, unk_id=0,
            minloglevel=2)
    except (RuntimeError, OSError) as e:
        raise PrepareError(f"sentencepiece training failed: {str(e).strip()}")
    with open(model_prefix + ".model", "wb") as f:
        f.write(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    write_lines(model_prefix + ".vocab",
                [f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}" for i in range(sp.get_piece_size())])
    return sp


def encode(sp, lines, name):
    out = []
    for i, pieces in enumerate(sp.encode(lines, out_type=str)):
        if not pieces:
            raise PrepareError(f"{name}:{i + 1}: line has no sentencepiece tokens")
        out.append(" ".join(pieces))
    return out


# --------------------------------------------------------------------------
# fairseq-preprocess
# --------------------------------------------------------------------------

# Runs fairseq-preprocess's own cli_main() once per argument list, in ONE
# subprocess of the current interpreter: importing fairseq costs ~3 s, and an
# extra reference needs a second run (it must read the dictionary the first
# run wrote), so this halves the time on small data.
_PREPROCESS_DRIVER = """
import json, sys
from fairseq import options
from fairseq_cli import preprocess
for argv in json.loads(sys.argv[1]):
    preprocess.main(options.get_preprocessing_parser().parse_args(argv))
"""


def fairseq_preprocess(*runs):
    """Run ``fairseq-preprocess ARGS`` for each ARGS list, in order.

    The child runs in a process group of its own (with any ``--workers``
    processes it starts); if this process is interrupted (Ctrl-C, SIGTERM,
    any exception) the whole group is killed and reaped before the exception
    goes on, so nothing keeps writing into the temporary directory that the
    caller is about to remove.
    """
    cmd = [sys.executable, "-c", _PREPROCESS_DRIVER, json.dumps([list(r) for r in runs])]
    env = dict(os.environ, PYTHONHASHSEED="0")
    # An interrupt while Popen waits for the exec would leave the child
    # running with nobody to kill it: hold it until the clean-up is armed.
    defer_interrupts()
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env, start_new_session=True)
    except BaseException:
        resume_interrupts()
        raise
    try:
        resume_interrupts()
        stdout, stderr = proc.communicate()
    except BaseException:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        raise
    if proc.returncode != 0:
        tail = [l for l in (stderr + stdout).splitlines() if l.strip()]
        raise PrepareError(
            f"fairseq-preprocess failed (exit {proc.returncode}): "
            f"{tail[-1] if tail else 'no output'}")
    return stdout


def _pref_args(prefix_dir, splits):
    args = []
    for split in splits:
        args += [f"--{split}pref", os.path.join(prefix_dir, split)]
    return args


def binarize(dest, tok_dir, src, tgt, splits, refs=None, srcdict=None, workers=1):
    """Binarize ``{tok_dir}/{split}.{lang}`` (already tokenized) into ``dest``.

    src/tgt share one dictionary (built from train src+tgt unless ``srcdict``).
    ``refs`` maps an extra-reference name to the splits it exists for; each is
    binarized with the target dictionary as ``{split}.{src}-{tgt}.{ref}.*``.
    """
    args = ["--source-lang", src, "--target-lang", tgt, "--destdir", dest,
            "--joined-dictionary", "--workers", str(workers)]
    if srcdict:
        args += ["--srcdict", srcdict]
    runs = [args + _pref_args(tok_dir, splits)]
    ref_tmp = {}
    for ref, ref_splits in (refs or {}).items():
        ref_tmp[ref] = tempfile.mkdtemp(prefix=f".ref-{ref}-", dir=dest)
        runs.append(["--only-source", "--source-lang", ref, "--srcdict",
                     os.path.join(dest, f"dict.{tgt}.txt"), "--destdir", ref_tmp[ref],
                     "--workers", str(workers)] + _pref_args(tok_dir, ref_splits))
    fairseq_preprocess(*runs)
    for ref, ref_splits in (refs or {}).items():
        tmp = ref_tmp[ref]
        for split in ref_splits:
            for ext in ("bin", "idx"):
                made = os.path.join(tmp, f"{split}.{ref}-None.{ref}.{ext}")
                if not os.path.exists(made):
                    raise PrepareError(f"fairseq-preprocess did not write {made}")
                os.replace(made, os.path.join(dest, f"{split}.{src}-{tgt}.{ref}.{ext}"))
        shutil.rmtree(tmp)
    log = os.path.join(dest, "preprocess.log")  # names the temp dir: drop it
    if os.path.exists(log):
        os.remove(log)


def dict_size(path):
    with open(path, encoding="utf-8") as f:
        return sum(1 for _ in f)


def write_manifest(dest, manifest):
    with open(os.path.join(dest, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, ensure_ascii=False, sort_keys=True)
        f.write("\n")


# --------------------------------------------------------------------------
# the whole pipeline
# --------------------------------------------------------------------------

def prepare_parallel(dest, data, src, tgt, refs=(), vocab_size=8000,
                     model_type="unigram", character_coverage=1.0, seed=1,
                     workers=1, force=False, sources=None, manifest=None,
                     extra_files=None):
    """raw text -> spm -> fairseq binaries in ``dest`` (atomically).

    data[split][lang] holds lines for src, tgt and (where present) each ref;
    split "train" is required and is the only text the spm model sees.
    ``extra_files`` maps a path relative to ``dest`` to lines to write there.
    Returns a summary dict (also written to ``dest/manifest.json``).
    """
    check_langs(src, tgt, refs)
    sources = sources or {}
    if "train" not in data:
        raise PrepareError("no train split given")
    for split, by_lang in data.items():
        if split not in SPLITS:
            raise PrepareError(f"unknown split {split!r} (use {', '.join(SPLITS)})")
        for lang in (src, tgt):
            if lang not in by_lang:
                raise PrepareError(f"split {split} has no {lang} side")
        for lang, lines in by_lang.items():
            name = sources.get((split, lang), f"{split}.{lang}")
            if not lines:
                raise PrepareError(f"{name}: no lines")
            for i, line in enumerate(lines):
                if not line.strip() or "\n" in line or "\r" in line:
                    raise PrepareError(f"{name}:{i + 1}: empty line or embedded newline")
    check_parallel(data, sources)
    dest = check_dest(dest, force)
    splits = [s for s in SPLITS if s in data]
    ref_splits = {r: [s for s in splits if r in data[s]] for r in refs}
    for r, rs in ref_splits.items():
        if not rs:
            raise PrepareError(f"extra reference {r!r} has no data in any split")

    with atomic_dir(dest, force) as tmp:
        write_raw(tmp, data)
        sp = train_spm(os.path.join(tmp, "spm"), data["train"][src] + data["train"][tgt],
                       vocab_size, model_type, character_coverage, seed)
        tok_dir = tempfile.mkdtemp(prefix=".tok-", dir=tmp)
        for split in splits:
            for lang, lines in data[split].items():
                name = sources.get((split, lang), f"{split}.{lang}")
                write_lines(os.path.join(tok_dir, f"{split}.{lang}"), encode(sp, lines, name))
        binarize(tmp, tok_dir, src, tgt, splits, ref_splits, workers=workers)
        shutil.rmtree(tok_dir)
        summary = dict(manifest or {})
        summary.update({
            "src": src, "tgt": tgt, "extra_refs": ref_splits,
            "lines": {s: len(data[s][src]) for s in splits},
            "spm": {"model_type": model_type, "vocab_size_requested": vocab_size,
                    "vocab_size": sp.get_piece_size(),
                    "character_coverage": character_coverage, "seed": seed},
            "fairseq_dict_size": dict_size(os.path.join(tmp, f"dict.{tgt}.txt")),
        })
        write_manifest(tmp, summary)
        for rel, lines in (extra_files or {}).items():
            write_lines(os.path.join(tmp, rel), lines)
    return summary


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input-dir", required=True,
                   help="directory with {split}.{lang}[.gz] files")
    p.add_argument("--src", required=True, help="source language suffix, e.g. es")
    p.add_argument("--tgt", required=True, help="target language suffix, e.g. en")
    p.add_argument("--dest", required=True, help="output directory (must not exist)")
    p.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS,
                   help="splits to read (train is required; default: all three)")
    p.add_argument("--extra-refs", nargs="*", default=[], metavar="REF",
                   help="extra target-side references, files {split}.{REF}")
    p.add_argument("--extra-ref-splits", nargs="+", choices=SPLITS, default=None,
                   help="splits that have the extra references (default: all --splits); fairseq --extra-references "
                        "then needs them in every split it loads, so pass it only to fairseq-generate/validate "
                        "on those splits")
    p.add_argument("--vocab-size", type=int, default=8000,
                   help="joint sentencepiece vocabulary size (default 8000; a "
                        "smaller one is used if the train text cannot fill it)")
    p.add_argument("--model-type", default="unigram", choices=["unigram", "bpe", "char", "word"])
    p.add_argument("--character-coverage", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1, help="sentencepiece random seed")
    p.add_argument("--workers", type=int, default=1, help="fairseq-preprocess workers")
    p.add_argument("--force", action="store_true", help="replace an existing --dest")
    args = p.parse_args(argv)
    if "train" not in args.splits:
        p.error("--splits must include train")
    if args.vocab_size < 2:
        p.error("--vocab-size must be at least 2")
    return args


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    check_langs(args.src, args.tgt, args.extra_refs)
    check_dest(args.dest, args.force)
    ref_splits = args.extra_ref_splits or args.splits
    bad = [s for s in ref_splits if s not in args.splits]
    if bad:
        raise PrepareError(f"--extra-ref-splits {bad} not among --splits {args.splits}")
    data, sources = load_parallel(args.input_dir, args.src, args.tgt, args.splits,
                                  args.extra_refs, ref_splits)
    summary = prepare_parallel(
        args.dest, data, args.src, args.tgt, args.extra_refs, args.vocab_size,
        args.model_type, args.character_coverage, args.seed, args.workers,
        args.force, sources,
        manifest={"script": "prepare_text.py",
                  "input_dir": os.path.abspath(args.input_dir)})
    print(f"wrote {os.path.abspath(args.dest)}: "
          + ", ".join(f"{s} {n}" for s, n in summary["lines"].items())
          + f" lines; spm vocab {summary['spm']['vocab_size']}, "
          f"fairseq dict {summary['fairseq_dict_size']}; {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
