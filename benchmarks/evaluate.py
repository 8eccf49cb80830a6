"""Decode a split with fairseq-generate and score it with sacrebleu.

    seqlevel-evaluate DATA CHECKPOINT [--split test] [--beam 5] [--refs en,kjv] [--metric bleu|edit]
    (or python -m benchmarks.evaluate ..., or python examples/evaluate.py ...)

--refs and --metric default to what ``DATA/manifest.json`` says (see
:func:`manifest_defaults`).

DATA is a directory made by ``examples/prepare_*.py`` (binarized data plus
``raw/{split}.{lang}`` plain-text references).  BLEU is sacrebleu's corpus
BLEU (13a tokenization) on detokenized text, against each reference set alone
and against all of them together; ``edit`` is the character edit-distance
error in % (sum of Levenshtein distances / sum of reference lengths), the
metric of the spelling task.
"""

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METRICS = ("bleu", "edit")


def generate_output(data, checkpoint, split="test", beam=5, batch_size=128, extra_args=()):
    """fairseq-generate's stdout (detokenized ``D-`` lines among others)."""
    cmd = [
        sys.executable, "-m", "fairseq_cli.generate", str(data),
        "--user-dir", str(REPO / "fairseq_seqlevel"), "--task", "seqlevel_translation",
        "--path", str(checkpoint), "--gen-subset", split, "--beam", str(beam),
        "--batch-size", str(batch_size), "--remove-bpe", "sentencepiece",
        "--max-len-a", "1.2", "--max-len-b", "10", *extra_args,
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"error: fairseq-generate failed:\n{out.stderr[-3000:]}")
    return out.stdout


def detokenized_groups(stdout):
    """{source id: [hypotheses in fairseq's n-best order]} from ``D-`` lines."""
    groups = {}
    for m in re.finditer(r"^D-(\d+)\t[^\t]*\t(.*)$", stdout, re.M):
        groups.setdefault(int(m.group(1)), []).append(m.group(2))
    return groups


def generate(data, checkpoint, split="test", beam=5, batch_size=128, extra_args=()):
    """Run fairseq-generate and return the detokenized hypotheses in corpus order."""
    groups = detokenized_groups(generate_output(data, checkpoint, split, beam, batch_size, extra_args))
    return [groups[i][-1] if i in groups else "" for i in range(len(groups))] if groups else []


def read_refs(data, split, langs):
    refs = {}
    for lang in langs:
        path = Path(data) / "raw" / f"{split}.{lang}"
        if not path.exists():
            sys.exit(f"error: reference file not found: {path}")
        refs[lang] = path.read_text(encoding="utf-8").rstrip("\n").split("\n")
    return refs


def bleu_scores(hyps, refs):
    """Corpus BLEU and chrF (sacrebleu's defaults) against each reference set and
    against all of them: chrF beside BLEU, whichever reward trained the model."""
    import sacrebleu

    scores = {}
    for lang, ref in refs.items():
        if len(ref) != len(hyps):
            sys.exit(f"error: {len(hyps)} hypotheses but {len(ref)} references ({lang})")
        scores[f"bleu_{lang}"] = sacrebleu.corpus_bleu(hyps, [ref]).score
        scores[f"chrf_{lang}"] = sacrebleu.corpus_chrf(hyps, [ref]).score
    if len(refs) > 1:
        scores["bleu_" + "+".join(refs)] = sacrebleu.corpus_bleu(hyps, list(refs.values())).score
        scores["chrf_" + "+".join(refs)] = sacrebleu.corpus_chrf(hyps, list(refs.values())).score
    return scores


def edit_error(hyps, refs):
    """Character edit-distance error in % of reference length (spelling task)."""
    from rapidfuzz.distance import Levenshtein

    ref = next(iter(refs.values()))
    # hypotheses come back as plain text (characters joined, '▁' -> space by
    # --remove-bpe sentencepiece), like raw/*.clean: spaces count as characters
    dist = sum(Levenshtein.distance(h.strip(), r.strip()) for h, r in zip(hyps, ref))
    return {"edit_error": 100.0 * dist / max(1, sum(len(r.strip()) for r in ref))}


def evaluate(data, checkpoint, split="test", beam=5, langs=("en",), metric="bleu"):
    hyps = generate(data, checkpoint, split=split, beam=beam)
    refs = read_refs(data, split, langs)
    return bleu_scores(hyps, refs) if metric == "bleu" else edit_error(hyps, refs)


def dictionary_target(data, split="test"):
    """The target language of DATA's binaries ``{split}.{src}-{tgt}.{tgt}.idx`` (as
    fairseq-preprocess names them, beside ``dict.{tgt}.txt``), or None if not one."""
    found = set()
    for path in Path(data).glob(f"{split}.*-*.*.idx"):
        m = re.fullmatch(rf"{re.escape(split)}\.([^.-]+)-([^.-]+)\.([^.]+)\.idx", path.name)
        if m and m.group(2) == m.group(3) and (Path(data) / f"dict.{m.group(2)}.txt").exists():
            found.add(m.group(2))
    return found.pop() if len(found) == 1 else None


def manifest_defaults(data, split="test"):
    """``{"refs": [...], "metric": ...}`` for DATA when no flag says otherwise.

    From ``DATA/manifest.json`` (examples/prepare_*.py): the target language (``tgt``),
    then every extra reference set of ``extra_refs`` that has ``split``; the manifest's
    ``metric``, else ``edit`` for prepare_spelling.py's data, else ``bleu``.  Without a
    manifest: the target language of the binaries (:func:`dictionary_target`), else
    ``en``, and ``bleu``.
    """
    path = Path(data) / "manifest.json"
    if not path.exists():
        return {"refs": [dictionary_target(data, split) or "en"], "metric": "bleu"}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        sys.exit(f"error: {path}: {e} (pass --refs and --metric)")
    tgt = manifest.get("tgt") or dictionary_target(data, split) or "en"
    extra = manifest.get("extra_refs") or {}
    if isinstance(extra, dict):  # {ref: [splits that have it]}, as prepare_text.py writes it
        extra = [r for r, splits in extra.items() if split in splits]
    metric = manifest.get("metric") or ("edit" if manifest.get("script") == "prepare_spelling.py" else "bleu")
    if metric not in METRICS:
        sys.exit(f"error: {path}: metric {metric!r} is not one of {', '.join(METRICS)} (pass --metric)")
    return {"refs": [tgt, *(r for r in extra if r != tgt)], "metric": metric}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data")
    p.add_argument("checkpoint")
    p.add_argument("--split", default="test")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--refs", default=None,
                   help="comma-separated reference languages under DATA/raw (default: DATA/manifest.json's "
                        "target language and extra references, else the binaries' target language, else en)")
    p.add_argument("--metric", choices=METRICS, default=None,
                   help="default: DATA/manifest.json's (edit for prepare_spelling.py's data), else bleu")
    a = p.parse_args(argv)
    defaults = manifest_defaults(a.data, a.split) if a.refs is None or a.metric is None else {}
    langs = a.refs.split(",") if a.refs is not None else defaults["refs"]
    metric = a.metric or defaults["metric"]
    print(json.dumps(evaluate(a.data, a.checkpoint, a.split, a.beam, langs, metric), indent=1))


if __name__ == "__main__":
    main()
