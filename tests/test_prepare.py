"""Data-preparation scripts in examples/: bad input, outputs, determinism, splits."""

import collections
import gzip
import hashlib
import math
import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
BIBLE = EXAMPLES / "bible_es_en" / "verses.tsv.gz"
sys.path.insert(0, str(EXAMPLES))

import prepare_bible  # noqa: E402
import prepare_spelling  # noqa: E402
import prepare_text  # noqa: E402

SPLITS = ("train", "valid", "test")
WORDS_EN = "the a cat dog house red blue runs sleeps big small green old new".split()
WORDS_ES = "el la gato perro casa rojo azul corre duerme grande chico verde viejo nuevo".split()


def run(script, *args, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(EXAMPLES / script), *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=cwd)


def write_corpus(root, n=(150, 15, 15), refs=("kjv",), gz=False, seed=0):
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, count in zip(SPLITS, n):
        cols = collections.defaultdict(list)
        for _ in range(count):
            idx = [rng.randrange(len(WORDS_EN)) for _ in range(rng.randint(1, 7))]
            cols["es"].append(" ".join(WORDS_ES[i] for i in idx))
            cols["en"].append(" ".join(WORDS_EN[i] for i in idx))
            for r in refs:
                cols[r].append(" ".join(WORDS_EN[i] for i in reversed(idx)))
        for lang, lines in cols.items():
            data = ("\n".join(lines) + "\n").encode()
            if gz:
                (root / f"{split}.{lang}.gz").write_bytes(gzip.compress(data, mtime=0))
            else:
                (root / f"{split}.{lang}").write_bytes(data)
    return root


def idx_len(path):
    """Number of sequences in a fairseq mmap .idx file (header: magic, version, dtype)."""
    with open(path, "rb") as f:
        head = f.read(26)
    assert head[:9] == b"MMIDIDX\x00\x00", path
    return struct.unpack("<Q", head[18:26])[0]


def n_lines(path):
    with open(path, encoding="utf-8") as f:
        return sum(1 for _ in f)


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), lines
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    assert "Traceback" not in proc.stderr
    return lines[0]


def assert_nothing_left(dest):
    assert not dest.exists()
    if dest.parent.exists():
        leftovers = [p.name for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}.")]
        assert not leftovers, leftovers


def text_args(inp, dest, *extra):
    return ["--input-dir", inp, "--src", "es", "--tgt", "en", "--dest", dest,
            "--vocab-size", "40", *extra]


# --------------------------------------------------------------------------
# prepare_text: bad input -> one line, exit 2, nothing written
# --------------------------------------------------------------------------

def test_missing_input_dir(tmp_path):
    dest = tmp_path / "out" / "d"
    proc = run("prepare_text.py", *text_args(tmp_path / "nope", dest))
    assert_one_line_error(proc, tmp_path / "nope", "does not exist")
    assert_nothing_left(dest)


def test_missing_input_file(tmp_path):
    inp = write_corpus(tmp_path / "in")
    (inp / "test.en").unlink()
    dest = tmp_path / "d"
    proc = run("prepare_text.py", *text_args(inp, dest))
    assert_one_line_error(proc, inp / "test.en", "missing")
    assert_nothing_left(dest)


def test_missing_extra_ref_file(tmp_path):
    inp = write_corpus(tmp_path / "in")
    (inp / "valid.kjv").unlink()
    dest = tmp_path / "d"
    proc = run("prepare_text.py", *text_args(inp, dest, "--extra-refs", "kjv"))
    assert_one_line_error(proc, inp / "valid.kjv", "missing")
    assert_nothing_left(dest)


def test_line_count_mismatch(tmp_path):
    inp = write_corpus(tmp_path / "in")
    lines = (inp / "valid.en").read_text().splitlines()
    (inp / "valid.en").write_text("\n".join(lines[:-2]) + "\n")
    dest = tmp_path / "d"
    proc = run("prepare_text.py", *text_args(inp, dest))
    assert_one_line_error(proc, inp / "valid.es", inp / "valid.en", "15", "13", "mismatch")
    assert_nothing_left(dest)


def test_extra_ref_line_count_mismatch(tmp_path):
    inp = write_corpus(tmp_path / "in")
    with open(inp / "test.kjv", "a") as f:
        f.write("one more line\n")
    dest = tmp_path / "d"
    proc = run("prepare_text.py", *text_args(inp, dest, "--extra-refs", "kjv"))
    assert_one_line_error(proc, inp / "test.kjv", "16", "15")
    assert_nothing_left(dest)


@pytest.mark.parametrize("blank", ["", "   "])
def test_empty_line(tmp_path, blank):
    inp = write_corpus(tmp_path / "in")
    lines = (inp / "train.es").read_text().splitlines()
    lines[6] = blank
    lines[9] = blank
    (inp / "train.es").write_text("\n".join(lines) + "\n")
    dest = tmp_path / "d"
    proc = run("prepare_text.py", *text_args(inp, dest))
    assert_one_line_error(proc, f"{inp / 'train.es'}:7", "empty line")
    assert_nothing_left(dest)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupted_gzip(tmp_path, damage):
    inp = write_corpus(tmp_path / "in", gz=True)
    path = inp / "train.en.gz"
    data = path.read_bytes()
    path.write_bytes(data[:10] + b"\x00garbage" * 5 if damage == "garbage" else data[:-12])
    dest = tmp_path / "d"
    proc = run("prepare_text.py", *text_args(inp, dest))
    assert_one_line_error(proc, path, "gzip")
    assert_nothing_left(dest)


def test_invalid_utf8(tmp_path):
    inp = write_corpus(tmp_path / "in")
    with open(inp / "valid.es", "ab") as f:
        f.write(b"caf\xe9\n")
    dest = tmp_path / "d"
    proc = run("prepare_text.py", *text_args(inp, dest))
    assert_one_line_error(proc, f"{inp / 'valid.es'}:16", "UTF-8")
    assert_nothing_left(dest)


def test_existing_dest_refused_and_kept_on_failed_force(tmp_path):
    inp = write_corpus(tmp_path / "in")
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / "keep.txt").write_text("old")
    proc = run("prepare_text.py", *text_args(inp, dest))
    assert_one_line_error(proc, dest, "--force")
    # --force with bad input: the old directory must survive untouched
    (inp / "train.en").write_text("x\n")
    proc = run("prepare_text.py", *text_args(inp, dest, "--force"))
    assert_one_line_error(proc, "mismatch")
    assert sorted(p.name for p in dest.iterdir()) == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".d.")]


# --------------------------------------------------------------------------
# prepare_text: success, layout, --force, determinism
# --------------------------------------------------------------------------

def test_prepare_text_success_force_and_determinism(tmp_path):
    inp = write_corpus(tmp_path / "in", gz=True)
    dest = tmp_path / "out" / "d"
    proc = run("prepare_text.py", *text_args(inp, dest, "--extra-refs", "kjv"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = {"dict.es.txt", "dict.en.txt", "spm.model", "spm.vocab", "manifest.json", "raw"}
    for split in SPLITS:
        for lang in ("es", "en", "kjv"):
            expected |= {f"{split}.es-en.{lang}.bin", f"{split}.es-en.{lang}.idx"}
    assert {p.name for p in dest.iterdir()} == expected
    assert {p.name for p in (dest / "raw").iterdir()} == {
        f"{s}.{lang}" for s in SPLITS for lang in ("es", "en", "kjv")}
    assert (dest / "dict.es.txt").read_bytes() == (dest / "dict.en.txt").read_bytes()
    for split, n in zip(SPLITS, (150, 15, 15)):
        for lang in ("es", "en", "kjv"):
            assert idx_len(dest / f"{split}.es-en.{lang}.idx") == n
            raw = gzip.decompress((inp / f"{split}.{lang}.gz").read_bytes()).decode()
            assert (dest / "raw" / f"{split}.{lang}").read_text() == raw
    before = {p.relative_to(dest): p.read_bytes() for p in dest.rglob("*") if p.is_file()}

    proc = run("prepare_text.py", *text_args(inp, dest, "--extra-refs", "kjv", "--force"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = {p.relative_to(dest): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert after == before  # deterministic, and --force swapped in a complete copy
    assert [p.name for p in dest.parent.iterdir()] == ["d"]  # no temp dirs left


# --------------------------------------------------------------------------
# Bible
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bible_rows():
    rows, skipped = prepare_bible.read_verses(str(BIBLE))
    return rows, skipped


def test_bible_copy_is_byte_identical():
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "bible_es_en" / "verses.tsv.gz"
    if not shared.exists():
        pytest.skip("shared copy not available")
    assert hashlib.sha256(BIBLE.read_bytes()).digest() == hashlib.sha256(shared.read_bytes()).digest()


def test_bible_split_deterministic_and_disjoint(bible_rows):
    rows, skipped = bible_rows
    assert len(rows) + sum(skipped.values()) == 30446
    assert dict(skipped) == {"markup": 2, "glossary": 1}
    refs = [r["ref"] for r in rows]
    first = {ref: prepare_bible.split_of(ref) for ref in refs}
    assert first == {ref: prepare_bible.split_of(ref) for ref in refs}
    counts = collections.Counter(first.values())
    # pinned: md5 is the same on every machine and Python version
    assert counts == {"train": 28048, "valid": 897, "test": 1498}
    assert prepare_bible.split_of("Genesis 1:21") == "test"
    assert prepare_bible.split_of("Genesis 1:24") == "valid"
    assert prepare_bible.split_of("Genesis 1:1") == "train"

    data, split_refs, filtered = prepare_bible.build_splits(rows, 25)
    sets = {s: set(v) for s, v in split_refs.items()}
    assert not (sets["train"] & sets["valid"] or sets["train"] & sets["test"]
                or sets["valid"] & sets["test"])
    assert sum(len(v) for v in sets.values()) + filtered == len(rows)
    for s in SPLITS:
        assert all(first[ref] == s for ref in split_refs[s])
        assert len(data[s]["es"]) == len(data[s]["en"]) == len(data[s]["kjv"]) == len(split_refs[s])
        for es, en in zip(data[s]["es"], data[s]["en"]):
            assert 1 <= len(es.split()) <= 25 and 1 <= len(en.split()) <= 25
    assert {s: len(v) for s, v in split_refs.items()} == {"train": 16338, "valid": 518, "test": 867}


def write_tsv(path, rows):
    data = "".join("\t".join(r) + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(data, mtime=0))
    return path


def test_bible_tiny_end_to_end(tmp_path, bible_rows):
    rows, _ = bible_rows
    sample = [[r[c] for c in prepare_bible.FIELDS] for r in rows[:400]]
    sample.insert(3, ["Fake 1:1", "hola", "", "hello"])  # empty field: skipped
    tsv = write_tsv(tmp_path / "v.tsv.gz", sample)
    dest = tmp_path / "bible"
    proc = run("prepare_bible.py", "--input", tsv, "--dest", dest, "--vocab-size", "300")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "empty field" in proc.stdout
    for split in SPLITS:
        n = n_lines(dest / "raw" / f"{split}.ids")
        assert n > 0
        for lang in ("es", "en", "kjv"):
            assert n_lines(dest / "raw" / f"{split}.{lang}") == n
            assert idx_len(dest / f"{split}.es-en.{lang}.idx") == n
        ids = (dest / "raw" / f"{split}.ids").read_text().splitlines()
        assert all(prepare_bible.split_of(ref) == split for ref in ids)


def test_bible_bad_input(tmp_path):
    dest = tmp_path / "bible"
    proc = run("prepare_bible.py", "--input", tmp_path / "missing.tsv.gz", "--dest", dest)
    assert_one_line_error(proc, tmp_path / "missing.tsv.gz")
    assert_nothing_left(dest)
    bad = tmp_path / "bad.tsv.gz"
    bad.write_bytes(gzip.compress(b"Gen 1:1\thola\thello\thello\n")[:-8])
    proc = run("prepare_bible.py", "--input", bad, "--dest", dest)
    assert_one_line_error(proc, bad, "gzip")
    assert_nothing_left(dest)
    three = write_tsv(tmp_path / "three.tsv.gz", [["Gen 1:1", "hola", "hello"]])
    proc = run("prepare_bible.py", "--input", three, "--dest", dest)
    assert_one_line_error(proc, f"{three}:1", "fields")
    assert_nothing_left(dest)


# --------------------------------------------------------------------------
# Spelling
# --------------------------------------------------------------------------

def test_windows_and_normalize():
    text = prepare_spelling.normalize("In the beginning, God’s Spirit—très “good”; x")
    assert set(text) <= set(prepare_spelling.ALPHABET)
    assert text == "in the beginning, god#s spirit#tres #good## x"
    wins = list(prepare_spelling.windows(text, 10))
    assert wins == [(0, "in the beg"), (18, "god#s spir")]  # 9-char tail dropped
    last = -1
    for off, w in wins:
        assert text[off:off + 10].rstrip(" ") == w and len(w) in (9, 10)
        assert off == 0 or text[off - 1] == " "  # starts at a word start
        assert off >= last  # no overlap
        last = off + 10


def test_windows_exact_cut_rule():
    text = "abcd efghij klm nopqrstuvw xy"
    got = list(prepare_spelling.windows(text, 10))
    # "abcd efghi" cuts "efghij": skip "j", next word "klm"; "klm nopqrs" cuts
    # the next word, whose remainder is skipped; "xy" is a short tail: dropped
    assert got == [(0, "abcd efghi"), (12, "klm nopqrs")]
    # a window ending in a space drops it; the next one starts right after it
    assert list(prepare_spelling.windows("abcdefghi jklmnopqrst", 10)) == [
        (0, "abcdefghi"), (10, "jklmnopqrs")]


@pytest.mark.parametrize("p", [0.3, 0.5])
def test_corruption_rate_and_alphabet(p):
    clean = [w for _, w in prepare_spelling.windows(prepare_spelling.normalize(
        " ".join(["the quick brown fox, jumps over the lazy dog!"] * 400)), 10)]
    noisy = [prepare_spelling.corrupt(w, p, random.Random(f"t:{i}")) for i, w in enumerate(clean)]
    n = sum(len(w) for w in clean)
    changed = sum(a != b for x, y in zip(noisy, clean) for a, b in zip(x, y))
    assert n > 10000
    assert abs(changed / n - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert all(len(x) == len(y) for x, y in zip(noisy, clean))
    assert set("".join(noisy)) <= set(prepare_spelling.ALPHABET)
    # replacements are uniform over the other 41 symbols: every symbol shows up
    subs = collections.Counter(a for x, y in zip(noisy, clean) for a, b in zip(x, y) if a != b)
    assert len(subs) == len(prepare_spelling.ALPHABET)


def test_corruption_nested_in_p():
    w = "and god sa" * 50
    lo = prepare_spelling.corrupt(w, 0.3, random.Random("x"))
    hi = prepare_spelling.corrupt(w, 0.5, random.Random("x"))
    assert all(a == c or a == b for a, b, c in zip(lo, hi, w))
    assert prepare_spelling.corrupt(w, 0.0, random.Random(1)) == w


def test_spelling_tiny_end_to_end(tmp_path, bible_rows):
    rows, _ = bible_rows
    tsv = write_tsv(tmp_path / "v.tsv.gz", [[r[c] for c in prepare_bible.FIELDS] for r in rows[:300]])
    dest = tmp_path / "sp"
    proc = run("prepare_spelling.py", "--input", tsv, "--dest", dest, "--p", "0.5",
               "--train-size", "1500", "--valid-size", "100", "--test-size", "100")
    assert proc.returncode == 0, proc.stderr[-3000:]
    verses = {r["ref"]: prepare_spelling.normalize(r["en_web"]) for r in rows[:300]}
    changed = total = 0
    for split in SPLITS:
        clean = (dest / "raw" / f"{split}.clean").read_text().split("\n")[:-1]
        noisy = (dest / "raw" / f"{split}.noisy").read_text().split("\n")[:-1]
        ids = (dest / "raw" / f"{split}.ids").read_text().splitlines()
        assert len(clean) == len(noisy) == len(ids) > 0
        for lang in ("noisy", "clean"):
            assert idx_len(dest / f"{split}.noisy-clean.{lang}.idx") == len(clean)
        for c, x, i in zip(clean, noisy, ids):
            ref, off = i.split("\t")
            assert prepare_bible.split_of(ref) == split
            assert c == verses[ref][int(off):int(off) + 10].rstrip(" ")  # target = clean text
            assert len(x) == len(c) in (9, 10) and c == c.strip()
            changed += sum(a != b for a, b in zip(x, c))
            total += len(c)
    assert abs(changed / total - 0.5) < 4 * math.sqrt(0.25 / total)
    d = (dest / "dict.noisy.txt").read_text().splitlines()
    assert [line.rsplit(" ", 1)[0] for line in d] == [
        "\u2581" if c == " " else c for c in prepare_spelling.ALPHABET]
    assert (dest / "dict.clean.txt").read_text() == (dest / "dict.noisy.txt").read_text()


def test_spelling_bad_input(tmp_path):
    dest = tmp_path / "sp"
    proc = run("prepare_spelling.py", "--input", tmp_path / "none.tsv.gz", "--dest", dest)
    assert_one_line_error(proc, tmp_path / "none.tsv.gz")
    assert_nothing_left(dest)


# --------------------------------------------------------------------------
# SIGTERM: cleaned up like Ctrl-C
# --------------------------------------------------------------------------

def _processes():
    """{pid: (ppid, pgrp, cmdline)} of the processes we can see in /proc."""
    procs = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        if fields[0] != "Z":  # a zombie writes nothing
            procs[int(entry)] = (int(fields[1]), int(fields[2]), cmdline)
    return procs


def _wait_for(condition, timeout=60.0, what="condition"):
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_interrupt_inside_an_import_is_reported_as_the_interrupt(capsys):
    """A SIGTERM / Ctrl-C that lands while a C extension initialises comes back as
    that module's ImportError caused by the interrupt (seen with sentencepiece in
    test_sigterm_cleans_up): still the one-line message and exit 143 / 130."""
    import signal

    def failing_import(interrupt):
        def main(argv):
            try:
                raise interrupt
            except BaseException as e:
                raise ImportError("initialization failed") from e
        return main

    assert prepare_text.run_cli(failing_import(prepare_text.Terminated(signal.SIGTERM))) == 143
    assert capsys.readouterr().err.strip() == "error: terminated by SIGTERM"
    assert prepare_text.run_cli(failing_import(KeyboardInterrupt())) == 130
    assert capsys.readouterr().err.strip() == "error: interrupted"
    with pytest.raises(ImportError):  # any other ImportError is not an interrupt
        prepare_text.run_cli(failing_import(ValueError("x")))


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc (Linux)")
@pytest.mark.parametrize("script, moment", [
    ("prepare_text.py", "preprocess"),
    ("prepare_text.py", "tmpdir"),
    ("prepare_bible.py", "preprocess"),
    ("prepare_spelling.py", "preprocess"),
])
def test_sigterm_cleans_up(tmp_path, script, moment):
    """SIGTERM while the temp dir exists (or while fairseq-preprocess runs in it):
    exit non-zero, no temp dir, no DEST, no process left writing into it."""
    import signal

    dest = tmp_path / "out" / "d"
    if script == "prepare_text.py":
        args = text_args(write_corpus(tmp_path / "in", n=(60, 6, 6)), dest, "--extra-refs", "kjv")
    elif script == "prepare_bible.py":  # the embedded verses
        args = ["--dest", dest, "--vocab-size", "300", "--max-words", "6"]
    else:
        args = ["--dest", dest, "--train-size", "300", "--valid-size", "30", "--test-size", "30"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(EXAMPLES / script), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    temp_dirs = lambda: [p for p in dest.parent.iterdir() if p.name.startswith(".d.tmp-")] \
        if dest.parent.exists() else []  # noqa: E731
    writers = lambda tmp: {pid: p for pid, p in _processes().items()  # noqa: E731
                           if str(tmp) in p[2] and pid != proc.pid}
    try:
        tmp = _wait_for(temp_dirs, what="the temporary directory")[0]
        children = {}
        if moment == "preprocess":
            children = _wait_for(lambda: {pid: p for pid, p in _processes().items()
                                          if p[0] == proc.pid and str(tmp) in p[2]},
                                 what="fairseq-preprocess writing into the temporary directory")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode != 0, (out, err)
        assert writers(tmp) == {}  # no orphaned fairseq-preprocess still writing there
        live = _processes()
        for pid, (_, pgrp, _) in children.items():  # the child, and its process group
            assert pid not in live
            assert not [p for p, (_, g, _) in live.items() if g == pgrp]
        assert not tmp.exists() and temp_dirs() == []
        assert not dest.exists()
        assert (err.strip().splitlines() or [""])[-1] == "error: terminated by SIGTERM", err
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in writers(dest.parent):  # orphans this test started: do not leave them running
            os.kill(pid, signal.SIGKILL)


def test_sigterm_while_preprocess_starts_still_kills_it(monkeypatch):
    """A SIGTERM that lands while Popen is still returning (before the caller
    holds the child) is held until the clean-up is armed: the child dies too."""
    import signal

    started = []
    real_popen = subprocess.Popen

    def popen(*args, **kwargs):
        child = real_popen(*args, **kwargs)
        started.append(child)
        os.kill(os.getpid(), signal.SIGTERM)
        return child

    monkeypatch.setattr(subprocess, "Popen", popen)
    previous = signal.signal(signal.SIGTERM, prepare_text._on_interrupt)
    try:
        with pytest.raises(prepare_text.Terminated):
            prepare_text.fairseq_preprocess(["--help"])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert len(started) == 1 and started[0].returncode == -signal.SIGKILL
    assert prepare_text._Deferred.depth == 0 and prepare_text._Deferred.pending is None
