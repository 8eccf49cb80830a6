"""Paper-scale recipes (examples/iwslt14_de_en, examples/wmt14) end to end on tiny archives.

The archives are built here with the real layout (inner directories, file
names, tag lines, ``<seg id>`` XML/SGML) and a few dozen lines; nothing is
downloaded.  Models are 16-d, trained for 2 updates.  The prepared data and
the MLE checkpoint are module-scoped fixtures shared by the tests.  A few
recipes run through bash as a user runs them; the rest run the exact
commands their ``--dry-run`` prints in one Python process (see DRIVER),
since a fairseq CLI start costs more than a tiny training run.
"""

import gzip
import io
import json
import os
import random
import re
import shlex
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import REPO, TINY_LSTM, TINY_TRANSFORMER

IWSLT = REPO / "examples" / "iwslt14_de_en"
WMT = REPO / "examples" / "wmt14"
sys.path.insert(0, str(REPO / "examples"))

import moses_pipeline as mp  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# a toy "translation": word-by-word, so that a sentence pair is plausible for
# the tokenizer (German nouns capitalized, punctuation, hyphens, &, ’)
LEXICON = [
    ("Haus", "house"), ("Katze", "cat"), ("Hund", "dog"), ("rot", "red"), ("blau", "blue"),
    ("gross", "big"), ("klein", "small"), ("läuft", "runs"), ("schläft", "sleeps"),
    ("wunderbar", "wonderful"), ("Geschichte", "story"), ("Wissenschaft", "science"),
    ("Freundschaft", "friendship"), ("Zukunft", "future"), ("Unterhaltung", "conversation"),
    ("und", "and"), ("der", "the"), ("sehr", "very"), ("heute", "today"), ("Welt", "world"),
]
SENTENCES_PER_TALK = 25


def toy_pair(rng, n_words=None):
    idx = [rng.randrange(len(LEXICON)) for _ in range(n_words or rng.randint(3, 9))]
    de = " ".join(LEXICON[i][0] for i in idx)
    en = " ".join(LEXICON[i][1] for i in idx)
    end = rng.choice([".", "?", "!", ","])
    return de[0].upper() + de[1:] + end, en[0].upper() + en[1:] + end


def write_tgz(path, files, gz=True):
    """A tar archive holding ``files`` {member name: text or bytes}."""
    with tarfile.open(path, "w:gz" if gz else "w") as tar:
        for name, data in files.items():
            data = data.encode("utf-8") if isinstance(data, str) else data
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return path


# --------------------------------------------------------------------------
# the IWSLT'14 archive
# --------------------------------------------------------------------------

def iwslt_archive(path, n_sentences=70, seed=0, drop=()):
    """de-en.tgz with the real names; returns (path, facts the tests check against).

    facts["kept"][lang]: the train.tags lines (tags stripped, untokenized) that
    should survive cleaning, in order; facts["test"]: segments per test set.
    """
    rng = random.Random(seed)
    de, en = [], []
    kept = {"de": [], "en": []}

    def add(d, e, keep=True):
        de.append(d)
        en.append(e)
        if keep:
            kept["de"].append(re.sub(r"</?(title|description)>", "", d))
            kept["en"].append(re.sub(r"</?(title|description)>", "", e))

    for i in range(n_sentences):
        if i % SENTENCES_PER_TALK == 0:  # a talk header, as in train.tags
            talk = i // SENTENCES_PER_TALK
            for tag in ("url", "keywords", "talkid"):
                value = {"url": f"http://www.ted.com/talks/talk_{talk}.html", "keywords": "talks, science",
                         "talkid": str(1000 + talk)}[tag]
                add(f"<{tag}>{value}</{tag}>", f"<{tag}>{value}</{tag}>", keep=False)
            add(f"<title>Meine Geschichte {talk}</title>", f"<title>My Story {talk}</title>")
            add("<description>TED Vortrag über Wissenschaft</description>",
                "<description>TED talk about science</description>")
        add(*toy_pair(rng))
    # dropped by clean-corpus-n: length ratio 2 / 7 > 1.5, and more than 175 words
    add("Haus .", "the very big red house today .", keep=False)
    add(" ".join(["Haus"] * 180) + " .", " ".join(["house"] * 180) + " .", keep=False)
    # kept: E-Mail (without -a one token), & (escaped), upper case
    add("Die E-Mail & der Brief .", "The E-Mail & the Letter .")
    files = {"de-en/train.tags.de-en.de": "\n".join(de) + "\n",
             "de-en/train.tags.de-en.en": "\n".join(en) + "\n",
             "de-en/README": "IWSLT 2014 de-en\n"}
    test_counts = {}
    for k, name in enumerate(("IWSLT14.TED.dev2010", "IWSLT14.TEDX.dev2012", "IWSLT14.TED.tst2010",
                              "IWSLT14.TED.tst2011", "IWSLT14.TED.tst2012")):
        n = 2 + k % 3
        test_counts[name] = n
        segs = [toy_pair(rng) for _ in range(n)]
        if k == 0:
            segs[0] = ("Es ist wunderbar .", "It’s wonderful .")
        for lang, col in (("de", 0), ("en", 1)):
            body = [f'<seg id="{j + 1}"> {s[col]} </seg>' for j, s in enumerate(segs)]
            files[f"de-en/{name}.de-en.{lang}.xml"] = "\n".join([
                '<?xml version="1.0" encoding="UTF-8"?>', "<mteval>",
                f'<{"srcset" if lang == "de" else "refset"} setid="{name}" srclang="german">',
                f'<doc docid="{k}" genre="lectures">', "<url>http://www.ted.com/talks/x.html</url>",
                "<description>TED Talk</description>", "<talkid>1</talkid>", "<title>Titel</title>",
                *body, "</doc>", "</srcset>" if lang == "de" else "</refset>", "</mteval>"]) + "\n"
    for name in drop:
        del files[name]
    write_tgz(path, files)
    return path, {"kept": kept, "test": test_counts}


# --------------------------------------------------------------------------
# the WMT'14 archives
# --------------------------------------------------------------------------

FR = {"house": "maison", "cat": "chat", "dog": "chien", "red": "rouge", "blue": "bleu", "big": "grand",
      "small": "petit", "runs": "court", "sleeps": "dort", "wonderful": "merveilleux", "story": "histoire",
      "science": "science", "friendship": "amitié", "future": "avenir", "conversation": "conversation",
      "and": "et", "the": "le", "very": "très", "today": "aujourd'hui", "world": "monde"}


def wmt_pair(rng, tgt):
    de, en = toy_pair(rng)
    if tgt == "de":
        return en, de
    words = en.split(" ")
    fr = " ".join(FR.get(w.strip(".?!,").lower(), w) for w in words)
    return en, fr[0].upper() + fr[1:] + en[-1]


def sgm(lines, setid, kind, lang):
    body = [f'<seg id="{i + 1}">{line}</seg>' for i, line in enumerate(lines)]
    return "\n".join([f'<{kind} setid="{setid}" srclang="any" trglang="{lang}">',
                      f'<doc sysid="ref" docid="doc{setid}" genre="news" origlang="en">',
                      "<p>", *body, "</p>", "</doc>", f"</{kind}>"]) + "\n"


def wmt_archives(root, pair, n_per_corpus=40, seed=1):
    """The archives fairseq's prepare-wmt14en2{de,fr}.sh downloads, tiny; returns {corpus: lines}."""
    src, tgt = pair.split("-")
    rng = random.Random(seed)
    code = {"de": "de-en", "fr": "fr-en"}[tgt]
    corpora = {"de": [("training-parallel-europarl-v7.tgz", f"training/europarl-v7.{code}"),
                      ("training-parallel-commoncrawl.tgz", f"commoncrawl.{code}"),
                      ("training-parallel-nc-v12.tgz", f"training/news-commentary-v12.{code}")],
               "fr": [("training-parallel-europarl-v7.tgz", f"training/europarl-v7.{code}"),
                      ("training-parallel-commoncrawl.tgz", f"commoncrawl.{code}"),
                      ("training-parallel-un.tgz", f"un/undoc.2000.{code}"),
                      ("training-parallel-nc-v9.tgz", f"training/news-commentary-v9.{code}"),
                      ("training-giga-fren.tar", "giga-fren.release2.fixed")]}[tgt]
    archives = {}
    counts = {}
    for archive, prefix in corpora:
        pairs = [wmt_pair(rng, tgt) for _ in range(n_per_corpus)]
        # a non-printing character and "quotes" for the normalizer; one pair
        # cleaning drops (length ratio), which fairseq only checks after BPE
        pairs[0] = (pairs[0][0] + "\u200b", pairs[0][1])
        pairs[1] = ('He said "the story" , today .', pairs[1][1])
        pairs[2] = ("the", "le chien rouge et le chat bleu dort aujourd'hui .")
        counts[prefix] = len(pairs)
        for col, lang in ((0, src), (1, tgt)):
            data = ("\n".join(p[col] for p in pairs) + "\n").encode()
            if archive.endswith(".tar"):
                archives.setdefault(archive, {})[f"{prefix}.{lang}.gz"] = gzip.compress(data, mtime=0)
            else:
                archives.setdefault(archive, {})[f"{prefix}.{lang}"] = data
    test = [wmt_pair(rng, tgt) for _ in range(9)]
    test[0] = ("It’s a well-known story .", test[0][1])
    dev = [wmt_pair(rng, tgt) for _ in range(5)]
    tcode = {"de": "deen", "fr": "fren"}[tgt]
    archives["test-full.tgz"] = {
        f"test-full/newstest2014-{tcode}-src.{src}.sgm": sgm([p[0] for p in test], "newstest2014", "srcset", src),
        f"test-full/newstest2014-{tcode}-ref.{tgt}.sgm": sgm([p[1] for p in test], "newstest2014", "refset", tgt),
        f"test-full/newstest2014-{tcode}-src.{tgt}.sgm": sgm([p[1] for p in test], "newstest2014", "srcset", tgt)}
    if tgt == "de":
        archives["dev.tgz"] = {f"dev/newstest2013.{src}": "\n".join(p[0] for p in dev) + "\n",
                               f"dev/newstest2013.{tgt}": "\n".join(p[1] for p in dev) + "\n"}
    root.mkdir(parents=True, exist_ok=True)
    for archive, files in archives.items():
        write_tgz(root / archive, files, gz=archive.endswith(".tgz"))
    return {"corpora": counts, "test": len(test), "dev": len(dev), "test_src": [p[0] for p in test]}


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def env(**extra):
    e = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    e.pop("BPE_TOKENS", None)
    e.update({k: str(v) for k, v in extra.items()})
    return e


def run(cmd, check=True, **env_vars):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env(**env_vars))
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd[:2]} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def python(script, *args, **env_vars):
    return run([sys.executable, script, *args], **env_vars)


def bash(script, *args, check=True, **env_vars):
    return run(["bash", script, *args], check=check, **env_vars)


def idx_len(path):
    """Sequences in a fairseq mmap .idx file."""
    with open(path, "rb") as f:
        head = f.read(26)
    assert head[:9] == b"MMIDIDX\x00\x00", path
    return struct.unpack("<Q", head[18:26])[0]


def lines(path):
    return Path(path).read_text(encoding="utf-8").split("\n")[:-1]


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), proc.stderr[-2000:]
    for needle in needles:
        assert str(needle) in err[0], (needle, err[0])


def assert_nothing_left(dest):
    assert not dest.exists()
    assert not [p.name for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}.")]


def interleave(train, held, every):
    """Undo split_every: the list whose every ``every``-th line went to ``held``."""
    out, t, h = [], iter(train), iter(held)
    for i in range(1, len(train) + len(held) + 1):
        out.append(next(h) if i % every == 0 else next(t))
    return out


# Runs the fairseq-train commands of a recipe's --dry-run in ONE process (each
# CLI start imports fairseq, ~6 s here), the other commands as subprocesses.
# Between runs it clears the two pieces of state fairseq keeps in function
# attributes across trainings (best checkpoint score, early-stopping count),
# which a fresh process would not have.
DRIVER = r"""
import shlex, subprocess, sys
from fairseq import checkpoint_utils
from fairseq_cli import train
for line in sys.stdin.read().splitlines():
    argv = shlex.split(line)
    for fn, attrs in ((checkpoint_utils.save_checkpoint, ("best",)), (train.should_stop_early, ("best", "num_runs"))):
        for a in attrs:
            if hasattr(fn, a):
                delattr(fn, a)
    if argv[1:3] == ["-m", "fairseq_cli.train"]:
        sys.argv = ["fairseq-train", *argv[3:]]
        train.cli_main()
        print("RAN " + argv[argv.index("--save-dir") + 1], file=sys.stderr, flush=True)
    else:
        subprocess.run(argv, check=True)
"""


def run_dry(script, names, **env_vars):
    """``script --dry-run NAMES``, then its commands through DRIVER; returns (commands, log)."""
    commands = bash(script, "--dry-run", *names, **env_vars).stdout.strip().splitlines()
    proc = subprocess.run([sys.executable, "-c", DRIVER], input="\n".join(commands), capture_output=True,
                          text=True, env=env(**env_vars))
    assert proc.returncode == 0, proc.stderr[-5000:]
    return commands, proc.stdout + proc.stderr  # fairseq logs to stdout


TINY_LSTM_FLAGS = " ".join(TINY_LSTM + ["--encoder-bidirectional"])
TINY_TRANSFORMER_FLAGS = " ".join(TINY_TRANSFORMER)
SMOKE = {"MAX_UPDATE": 2, "EXTRA": "--num-workers 0 --batch-size 16 --max-tokens 2000"}


# --------------------------------------------------------------------------
# moses_pipeline pieces
# --------------------------------------------------------------------------

def test_clean_corpus_rules(tmp_path):
    f = ["a b", "a", "", "a b c d", "x | y", "w " * 5, "  spaced   out  "]
    e = ["a b c", "a b c", "x", "a b", "x y", "w", "spaced out"]
    raw = [f"raw{i}" for i in range(len(f))]
    for name, data in (("in.f", f), ("in.e", e), ("raw", raw)):
        mp.write_lines(tmp_path / name, data)
    n_in, n_out = mp.clean_corpus((str(tmp_path / "in.f"), str(tmp_path / "in.e")),
                                  (str(tmp_path / "out.f"), str(tmp_path / "out.e")), ratio=1.5, min_len=1,
                                  max_len=4, passengers=[(str(tmp_path / "raw"), str(tmp_path / "raw.out"))])
    # kept: ratio 1.5 exactly; pipes removed (first line has none); whitespace collapsed.
    # dropped: ratio 3, an empty side, ratio 2, 5 words > max 4
    assert (n_in, n_out) == (7, 3)
    assert lines(tmp_path / "out.f") == ["a b", "x y", "spaced out"]
    assert lines(tmp_path / "out.e") == ["a b c", "x y", "spaced out"]
    assert lines(tmp_path / "raw.out") == ["raw0", "raw4", "raw6"]


def test_clean_corpus_length_mismatch_is_an_error(tmp_path):
    mp.write_lines(tmp_path / "a", ["x", "y"])
    mp.write_lines(tmp_path / "b", ["x"])
    with pytest.raises(mp.PrepareError, match="line-count mismatch"):
        mp.clean_corpus((str(tmp_path / "a"), str(tmp_path / "b")), (str(tmp_path / "c"), str(tmp_path / "d")))


def test_seg_text_and_tokenizer():
    xml = ['<doc docid="1">', '<seg id="12">  Hello, world ! </seg>', "<title>T</title>", '<seg id="3">It’s</seg>']
    assert list(mp.seg_text(xml)) == ["Hello, world !", "It’s"]
    assert list(mp.curly_apostrophes(["It’s"])) == ["It's"]
    tok = mp.build_job(mp.tokenize_job("en", lowercase=True))
    assert tok("The E-Mail & it's \"fine\".") == "the e-mail &amp; it &apos;s &quot; fine &quot; ."
    aggressive = mp.build_job(mp.tokenize_job("en", aggressive_dash_splits=True))
    assert aggressive("a well-known E-Mail") == "a well @-@ known E @-@ Mail"
    clean = mp.build_job(mp.tokenize_job("en", True, normalize_punctuation=True, remove_non_printing=True))
    assert clean("a\u200bb  «c»") == 'a b &quot; c &quot;'


def test_iter_lines_splits_on_newline_only(tmp_path):
    (tmp_path / "f").write_bytes("a\rb\nc\u2028d\n\nlast".encode())
    assert list(mp.iter_lines(str(tmp_path / "f"))) == ["a\rb", "c\u2028d", "", "last"]
    (tmp_path / "bad").write_bytes(b"ok\n\xff\n")
    with pytest.raises(mp.PrepareError, match="not valid UTF-8"):
        list(mp.iter_lines(str(tmp_path / "bad"), name="archive.tgz:member"))


# --------------------------------------------------------------------------
# IWSLT'14: prepare.py
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def iwslt(tmp_path_factory):
    root = tmp_path_factory.mktemp("iwslt")
    archive, facts = iwslt_archive(root / "de-en.tgz")
    dest = root / "data-bin" / "iwslt14_de_en"
    proc = python(IWSLT / "prepare.py", "--archive", archive, "--dest", dest, BPE_TOKENS=50)
    return {"root": root, "archive": archive, "facts": facts, "dest": dest, "stdout": proc.stdout}


def test_iwslt_splits_and_counts(iwslt):
    dest, facts = iwslt["dest"], iwslt["facts"]
    n_kept = len(facts["kept"]["en"])
    n_valid = n_kept // 23
    n_test = sum(facts["test"].values())
    expected = {"train": n_kept - n_valid, "valid": n_valid, "test": n_test}
    for split, n in expected.items():
        for lang in ("de", "en"):
            assert idx_len(dest / f"{split}.de-en.{lang}.idx") == n, (split, lang)
            for sub in ("bpe", "tok", "raw"):
                assert len(lines(dest / sub / f"{split}.{lang}")) == n, (sub, split, lang)
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["lines"] == expected
    assert manifest["clean"]["pairs_kept"] == n_kept and manifest["clean"]["pairs_in"] == n_kept + 2
    assert manifest["test_sets"] == facts["test"]
    assert f"train {expected['train']}, valid {n_valid}, test {n_test} lines" in iwslt["stdout"]
    # every 23rd kept train.tags line is in valid, in order; tags stripped, the two
    # over-long / unbalanced pairs gone (raw/ carries the untokenized lines along)
    for lang in ("de", "en"):
        merged = interleave(lines(dest / "raw" / f"train.{lang}"), lines(dest / "raw" / f"valid.{lang}"), 23)
        assert merged == facts["kept"][lang]
    # the test set is the five files' segments in fairseq's order
    assert lines(dest / "raw" / "test.en")[0] == "It’s wonderful ."
    assert manifest["joined_dictionary"] and (dest / "dict.de.txt").read_text() == (dest / "dict.en.txt").read_text()


def test_iwslt_tokenized_lowercased_bpe(iwslt):
    dest = iwslt["dest"]
    tok_train = lines(dest / "tok" / "train.en") + lines(dest / "tok" / "valid.en")
    raw_train = lines(dest / "raw" / "train.en") + lines(dest / "raw" / "valid.en")
    assert any(c.isupper() for line in raw_train for c in line)
    assert not any(c.isupper() for split in ("train", "valid", "test") for lang in ("de", "en")
                   for line in lines(dest / "tok" / f"{split}.{lang}") for c in line)
    assert "the e-mail &amp; the letter ." in tok_train  # Moses escaping; no -a: E-Mail stays whole
    assert "my story 0" in tok_train and not any("<" in line for line in tok_train)  # title kept, tags gone
    assert "ted vortrag über wissenschaft" in lines(dest / "tok" / "train.de") + lines(dest / "tok" / "valid.de")
    test = lines(dest / "tok" / "test.en")
    assert test[0] == "it &apos;s wonderful ."  # ’ -> ' before tokenizing, as fairseq
    assert all(re.search(r"\w [.?!,]$", line) for line in test)  # final punctuation split off
    # BPE: 50 merges learned jointly; removing the markers gives the tokenized text back
    assert len(lines(dest / "code")) == 51 and lines(dest / "code")[0].startswith("#version")
    for split in ("train", "valid", "test"):
        for lang in ("de", "en"):
            bpe = lines(dest / "bpe" / f"{split}.{lang}")
            assert [b.replace("@@ ", "") for b in bpe] == lines(dest / "tok" / f"{split}.{lang}")
    assert sum(line.count("@@") for line in lines(dest / "bpe" / "train.en")) > 100


def test_iwslt_mixer_data(iwslt, tmp_path):
    dest = tmp_path / "mixer"
    url = iwslt["archive"].as_uri()  # the download path, without a network
    python(IWSLT / "prepare.py", "--url", url, "--dest", dest, "--mixer", BPE_TOKENS=50)
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["source"] == url and manifest["mixer"]
    assert manifest["bpe"]["merges_learned"] == 0 and manifest["binarized"] == "tok"
    assert not (dest / "code").exists() and not (dest / "bpe").exists()
    assert manifest["clean"]["max_len"] == 50 and not manifest["joined_dictionary"]
    for lang in ("de", "en"):
        entries = [l.rsplit(" ", 1) for l in lines(dest / f"dict.{lang}.txt")]
        words = {w for w, _ in entries}
        assert all(int(c) >= 3 for w, c in entries if not w.startswith("madeupword"))
        assert ("house" in words) == (lang == "en") and ("haus" in words) == (lang == "de")
    assert manifest["lines"] == json.loads((iwslt["dest"] / "manifest.json").read_text())["lines"]


def test_iwslt_bad_input_is_one_line(iwslt, tmp_path):
    dest = tmp_path / "out" / "iwslt"
    proc = run([sys.executable, IWSLT / "prepare.py", "--archive", tmp_path / "nope.tgz", "--dest", dest],
               check=False)
    assert_one_line_error(proc, tmp_path / "nope.tgz", "no such file")
    assert not dest.parent.exists() or not any(dest.parent.iterdir())

    member = "de-en/IWSLT14.TED.tst2012.de-en.en.xml"
    archive, _ = iwslt_archive(tmp_path / "partial.tgz", drop=[member])
    proc = run([sys.executable, IWSLT / "prepare.py", "--archive", archive, "--dest", dest], check=False)
    assert_one_line_error(proc, archive, member)
    assert_nothing_left(dest)

    (tmp_path / "garbage.tgz").write_bytes(b"not a tar file at all\n" * 10)
    proc = run([sys.executable, IWSLT / "prepare.py", "--archive", tmp_path / "garbage.tgz", "--dest", dest],
               check=False)
    assert_one_line_error(proc, "garbage.tgz", "not a readable tar")
    assert_nothing_left(dest)

    proc = run([sys.executable, IWSLT / "prepare.py", "--archive", iwslt["archive"], "--dest", iwslt["dest"]],
               check=False)
    assert_one_line_error(proc, iwslt["dest"], "exists")


# --------------------------------------------------------------------------
# IWSLT'14: train.sh and evaluate.sh
# --------------------------------------------------------------------------

FINETUNED = ["raml", "tok_seq", "token_smooth", "searnn_kl", "erac", "ac", "vaml", "interpolation", "ss",
             "seq_exploration", "scst", "risk"]


@pytest.fixture(scope="module")
def iwslt_mle(iwslt):
    """train.sh mle_lstm, as a user runs it (bash, one fairseq-train process)."""
    save_root = iwslt["root"] / "checkpoints"
    recipe = dict(DATA=iwslt["dest"], SAVE_ROOT=save_root, ARCH_FLAGS=TINY_LSTM_FLAGS, **SMOKE)
    proc = bash(IWSLT / "train.sh", "--cpu", "mle_lstm", **recipe)
    return {"save_root": save_root, "env": recipe, "log": proc.stdout + proc.stderr}


def test_iwslt_mle_and_raml_run_through_bash(iwslt, iwslt_mle):
    ckpt = iwslt_mle["save_root"] / "mle_lstm" / "checkpoint_best.pt"
    assert ckpt.exists() and (ckpt.parent / "checkpoint_last.pt").exists()
    assert re.search(r"num_updates 2\b", iwslt_mle["log"])
    # the command echoed on stderr is the one --dry-run prints
    dry = bash(IWSLT / "train.sh", "--cpu", "--dry-run", "mle_lstm", **iwslt_mle["env"]).stdout.strip()
    assert f"+ {dry}" in iwslt_mle["log"]
    assert "--arch lstm --encoder-embed-dim 16" in dry and "--cpu" in dry and "--max-update 2" in dry
    proc = bash(IWSLT / "train.sh", "raml", **iwslt_mle["env"])
    assert (iwslt_mle["save_root"] / "raml" / "checkpoint_last.pt").exists()
    log = proc.stdout + proc.stderr
    assert re.search(rf"Loaded checkpoint {re.escape(str(ckpt))} \(epoch \d+ @ 0 updates\)", log)
    assert re.search(r"\| raml_dist [0-9.]+", log)


def test_iwslt_every_recipe_trains(iwslt, iwslt_mle, tmp_path):
    save_root = tmp_path / "runs"
    mle = iwslt_mle["save_root"] / "mle_lstm" / "checkpoint_best.pt"
    recipe = dict(iwslt_mle["env"], SAVE_ROOT=save_root, MLE_CKPT=mle)
    commands, log = run_dry(IWSLT / "train.sh", FINETUNED, **recipe)
    trained = re.findall(r"^RAN (.*)$", log, re.M)
    assert [Path(t).name for t in trained] == [
        "raml", "tok_seq", "token_smooth", "searnn_kl", "erac_critic", "erac", "ac_critic", "ac", "vaml_q",
        "vaml", "interpolation", "ss", "seq_exploration", "scst", "risk"]
    for name in trained:
        assert (Path(name) / "checkpoint_last.pt").exists(), name
    assert (save_root / "token_embeddings.en.txt").exists()
    # second phases start from the first phase's checkpoint (which holds the critic)
    for second, first in (("erac", "erac_critic"), ("ac", "ac_critic"), ("vaml", "vaml_q")):
        cmd = next(c for c in commands if f"--save-dir {save_root / second} " in c)
        assert f"--finetune-from-model {save_root / first / 'checkpoint_last.pt'}" in cmd
        assert re.search(rf"Loaded checkpoint {re.escape(str(save_root / first))}/checkpoint_last\.pt", log)
    assert log.count(f"Loaded checkpoint {mle}") == len(trained) - 3
    by_name = {Path(shlex.split(c)[shlex.split(c).index("--save-dir") + 1]).name: c
               for c in commands if "--save-dir" in c}
    assert "--erac-tau 0 " in by_name["ac"] + " " and "--erac-tau 0.045" in by_name["erac"]
    assert "--seq-exploration-alpha 1 " in by_name["scst"] + " " and "--seq-exploration-alpha 0.75" in by_name["seq_exploration"]
    assert "--erac-phase critic" in by_name["erac_critic"] and "--vaml-phase actor" in by_name["vaml"]
    for c in by_name.values():
        assert "--reward bleu" in c and "--eval-reward" in c and f"--user-dir {REPO / 'fairseq_seqlevel'}" in c
    # criterion-specific statistics show the criterion really ran
    for stat in ("erac_td", "vaml_td", "searnn_gt_best", "interp_lambda1", "sle_reward", "risk_cost"):
        assert re.search(rf"\| {stat} [-0-9.]+", log), stat


def test_iwslt_transformer_mle(iwslt, tmp_path):
    recipe = dict(DATA=iwslt["dest"], SAVE_ROOT=tmp_path, ARCH_FLAGS=TINY_TRANSFORMER_FLAGS, **SMOKE)
    commands, log = run_dry(IWSLT / "train.sh", ["mle_transformer"], **recipe)
    assert (tmp_path / "mle_transformer" / "checkpoint_best.pt").exists()
    full = bash(IWSLT / "train.sh", "--dry-run", "mle_transformer", DATA=iwslt["dest"]).stdout
    for flag in ("--arch transformer_iwslt_de_en", "--share-decoder-input-output-embed", "--lr 5e-4",
                 "--lr-scheduler inverse_sqrt", "--warmup-updates 4000", "--label-smoothing 0.1",
                 "--dropout 0.3", "--weight-decay 0.0001", "--max-tokens 4096"):
        assert flag in full, flag
    assert "--adam-betas \\(0.9\\,\\ 0.98\\)" in full


def test_iwslt_evaluate_json(iwslt, iwslt_mle):
    ckpt = iwslt_mle["save_root"] / "mle_lstm" / "checkpoint_best.pt"
    gen = iwslt["root"] / "gen.txt"
    proc = bash(IWSLT / "evaluate.sh", "--cpu", ckpt, iwslt["dest"], GEN_OUT=gen)
    out = proc.stdout.strip().splitlines()
    assert len(out) == 1
    result = json.loads(out[0])
    n_test = sum(iwslt["facts"]["test"].values())
    assert result["sentences"] == n_test and result["beam"] == 5 and result["split"] == "test"
    for key in ("tok_bleu", "sacrebleu"):
        assert 0.0 <= result[key] <= 100.0
    assert "tok:none" in result["tok_bleu_signature"] and "case:lc" in result["sacrebleu_signature"]
    assert len(re.findall(r"^H-\d+\t", gen.read_text(), re.M)) == n_test


def test_score_against_references(iwslt, tmp_path):
    dest = iwslt["dest"]
    ref = lines(dest / "tok" / "test.en")
    order = list(range(len(ref)))
    random.Random(0).shuffle(order)  # fairseq prints sentences out of order
    gen = tmp_path / "gen.txt"
    gen.write_text("".join(f"S-{i}\tx\nT-{i}\t<unk>\nH-{i}\t-0.5\t{ref[i]}\nD-{i}\t-0.5\t{ref[i]}\n" for i in order))
    result = json.loads(python(IWSLT / "score.py", "--data", dest, "--gen", gen).stdout)
    assert result["tok_bleu"] == 100.0
    # detokenized "it's wonderful." against the raw "It’s wonderful .": close, not equal
    assert 60.0 < result["sacrebleu"] < 100.0
    half = [ref[i] if i % 2 else "nothing" for i in range(len(ref))]
    gen.write_text("".join(f"H-{i}\t-1\t{h}\n" for i, h in enumerate(half)))
    assert 0.0 < json.loads(python(IWSLT / "score.py", "--data", dest, "--gen", gen).stdout)["tok_bleu"] < 100.0
    gen.write_text("".join(f"H-{i}\t-1\t{ref[i]}\n" for i in range(len(ref) - 1)))
    proc = run([sys.executable, IWSLT / "score.py", "--data", dest, "--gen", gen], check=False)
    assert_one_line_error(proc, f"translated {len(ref) - 1} sentences, the reference has {len(ref)}")


def test_recipe_scripts_refuse_bad_requests(iwslt, tmp_path):
    proc = bash(IWSLT / "train.sh", "rmal", check=False, DATA=iwslt["dest"])
    assert_one_line_error(proc, "unknown recipe rmal", "raml")
    proc = bash(IWSLT / "train.sh", "erac", check=False, DATA=iwslt["dest"], SAVE_ROOT=tmp_path)
    assert_one_line_error(proc, tmp_path / "mle_lstm" / "checkpoint_best.pt", "train.sh mle_lstm")
    assert not list(tmp_path.iterdir())
    proc = bash(IWSLT / "train.sh", "raml", check=False, BASE="gru")
    assert_one_line_error(proc, "BASE=gru")
    proc = bash(IWSLT / "evaluate.sh", tmp_path / "none.pt", iwslt["dest"], check=False)
    assert_one_line_error(proc, tmp_path / "none.pt")
    proc = bash(WMT / "train.sh", "raml", check=False, SAVE_ROOT=tmp_path)
    assert_one_line_error(proc, tmp_path / "mle" / "checkpoint_best.pt")


# --------------------------------------------------------------------------
# WMT'14
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wmt(tmp_path_factory):
    root = tmp_path_factory.mktemp("wmt")
    out = {}
    for pair, extra in (("en-de", ["--valid", "newstest2013"]), ("en-fr", ["--valid-every", "10"])):
        archives = root / f"orig_{pair}"
        facts = wmt_archives(archives, pair)
        dest = root / "data-bin" / f"wmt14_{pair.replace('-', '_')}"
        proc = python(WMT / "prepare.py", "--pair", pair, "--archive-dir", archives, "--dest", dest, *extra,
                      BPE_TOKENS=60)
        out[pair] = {"archives": archives, "facts": facts, "dest": dest, "stdout": proc.stdout}
    out["root"] = root
    return out


@pytest.mark.parametrize("pair", ["en-de", "en-fr"])
def test_wmt_prepare(wmt, pair):
    w = wmt[pair]
    dest, facts = w["dest"], w["facts"]
    src, tgt = pair.split("-")
    manifest = json.loads((dest / "manifest.json").read_text())
    n_corpora = sum(facts["corpora"].values())
    assert sum(manifest["corpora"].values()) == n_corpora  # every corpus read (giga-fren: .gz in a .tar)
    n_valid = facts["dev"] if pair == "en-de" else n_corpora // 10
    assert manifest["clean"]["train"]["pairs_in"] == n_corpora - (0 if pair == "en-de" else n_valid)
    if pair == "en-fr":
        assert manifest["clean"]["valid"]["pairs_in"] == n_valid
    for split in ("train", "valid", "test"):
        n = manifest["lines"][split]
        for lang in (src, tgt):
            assert idx_len(dest / f"{split}.{src}-{tgt}.{lang}.idx") == n
            assert len(lines(dest / "bpe" / f"{split}.{lang}")) == n
    assert manifest["lines"]["test"] == facts["test"]  # the test set is never cleaned
    if pair == "en-de":
        assert manifest["lines"]["valid"] == facts["dev"]  # newstest2013, whole
    # the unbalanced pair ("the" against a long sentence) went with clean-corpus-n after BPE
    train_src = [b.replace("@@ ", "") for b in lines(dest / "bpe" / f"train.{src}")]
    assert "the" not in train_src and manifest["lines"]["train"] <= manifest["clean"]["train"]["pairs_in"] - 3
    # tokenizer -a, cased, ’ -> ' on the test set; normalized punctuation, non-printing characters gone
    assert lines(dest / "tok" / f"test.{src}")[0] == "It &apos;s a well @-@ known story ."
    assert lines(dest / "raw" / f"test.{src}") == facts["test_src"]
    assert any(c.isupper() for line in lines(dest / "tok" / f"test.{tgt}") for c in line)
    assert "He said &quot; the story &quot; , today ." in train_src
    assert not any("\u200b" in line or '"' in line for line in train_src)
    for split in ("valid", "test"):
        for lang in (src, tgt):
            assert [b.replace("@@ ", "") for b in lines(dest / "bpe" / f"{split}.{lang}")] == \
                lines(dest / "tok" / f"{split}.{lang}")
            assert len(lines(dest / "raw" / f"{split}.{lang}")) == manifest["lines"][split]
    assert sum(line.count("@@") for line in lines(dest / "bpe" / f"train.{tgt}")) > 50
    assert manifest["bpe"]["merges_learned"] == 60


def test_wmt_bad_input_is_one_line(wmt, tmp_path):
    archives = tmp_path / "orig"
    wmt_archives(archives, "en-de")
    (archives / "training-parallel-commoncrawl.tgz").unlink()
    dest = tmp_path / "out" / "wmt"
    proc = run([sys.executable, WMT / "prepare.py", "--pair", "en-de", "--archive-dir", archives, "--dest", dest],
               check=False)
    assert_one_line_error(proc, archives / "training-parallel-commoncrawl.tgz", "--download")
    assert not dest.parent.exists() or not any(dest.parent.iterdir())
    # an archive with the wrong inner layout names the member it lacks
    write_tgz(archives / "training-parallel-commoncrawl.tgz", {"commoncrawl.fr-en.en": "x\n"})
    proc = run([sys.executable, WMT / "prepare.py", "--pair", "en-de", "--archive-dir", archives, "--dest", dest],
               check=False)
    assert_one_line_error(proc, "training-parallel-commoncrawl.tgz", "commoncrawl.de-en.")
    assert_nothing_left(dest)
    proc = run([sys.executable, WMT / "prepare.py", "--pair", "en-fr", "--archive-dir", archives, "--dest", dest,
                "--corpora", "europarl-v7", "wikipedia"], check=False)
    assert_one_line_error(proc, "--corpora wikipedia", "giga-fren")


def test_wmt_recipes_train_and_evaluate(wmt, tmp_path):
    w = wmt["en-de"]
    flags = TINY_TRANSFORMER_FLAGS + " --share-all-embeddings"
    recipe = dict(DATA=w["dest"], SAVE_ROOT=tmp_path, ARCH_FLAGS=flags, MAX_UPDATE=2,
                  EXTRA="--num-workers 0 --max-tokens 1000 --update-freq 1")
    commands, log = run_dry(WMT / "train.sh", ["all"], **recipe)
    assert [Path(t).name for t in re.findall(r"^RAN (.*)$", log, re.M)] == [
        "mle", "raml", "token_smooth", "interpolation"]
    for name in ("mle", "raml", "token_smooth", "interpolation"):
        assert (tmp_path / name / "checkpoint_last.pt").exists()
    assert (tmp_path / "token_embeddings.de.txt").exists()
    assert log.count(f"Loaded checkpoint {tmp_path / 'mle' / 'checkpoint_best.pt'}") == 3
    full = bash(WMT / "train.sh", "--dry-run", "mle", PAIR="en-fr").stdout
    for flag in ("--arch transformer_wmt_en_de", "--share-all-embeddings", "-s en -t fr", "--update-freq 8",
                 f"{REPO / 'data-bin' / 'wmt14_en_fr'} ", "--label-smoothing 0.1", "--warmup-updates 4000"):
        assert flag in full, flag
    proc = bash(WMT / "evaluate.sh", tmp_path / "raml" / "checkpoint_last.pt", DATA=w["dest"])
    result = json.loads(proc.stdout)
    assert result["sentences"] == w["facts"]["test"]
    assert 0.0 <= result["tok_bleu"] <= 100.0 and 0.0 <= result["sacrebleu"] <= 100.0
    assert "case:mixed" in result["sacrebleu_signature"]  # WMT is cased
