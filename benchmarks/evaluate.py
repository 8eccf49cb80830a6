"""Decode a split with fairseq-generate and score it with sacrebleu.

    seqlevel-evaluate DATA CHECKPOINT [--split test] [--beam 5] [--refs en,kjv] [--metric bleu|edit]
    (or python -m benchmarks.evaluate ..., or python examples/evaluate.py ...)

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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data")
    p.add_argument("checkpoint")
    p.add_argument("--split", default="test")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--refs", default="en", help="comma-separated reference languages under DATA/raw")
    p.add_argument("--metric", choices=["bleu", "edit"], default="bleu")
    a = p.parse_args(argv)
    print(json.dumps(evaluate(a.data, a.checkpoint, a.split, a.beam, a.refs.split(","), a.metric), indent=1))


if __name__ == "__main__":
    main()
