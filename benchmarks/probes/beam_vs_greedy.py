"""Test BLEU of checkpoints at beam 1 and beam 5, with sacrebleu's brevity ratio and
n-gram precisions: does a criterion's change show in the greedy decode (what the
sequence-level criterions sample and score) and survive the beam?

    python -m benchmarks.probes.beam_vs_greedy mle=work/x/checkpoint_last.pt scst=... [--out F.json]
"""

import argparse
import sys
from pathlib import Path

from benchmarks.config import REPO
from benchmarks.evaluate import generate, read_refs
from benchmarks.util import write_json


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="NAME=CHECKPOINT")
    parser.add_argument("--data", default=str(REPO / "data-bin/bible_es_en"))
    parser.add_argument("--refs", default="en,kjv")
    parser.add_argument("--split", default="test")
    parser.add_argument("--beams", default="1,5")
    parser.add_argument("--out", help="write the scores as JSON")
    args = parser.parse_args(argv)
    import sacrebleu

    refs = list(read_refs(Path(args.data), args.split, tuple(args.refs.split(","))).values())
    out = {}
    for run in args.runs:
        name, _, checkpoint = run.partition("=")
        if not checkpoint or not Path(checkpoint).exists():
            sys.exit(f"error: {run}: expected NAME=CHECKPOINT of an existing file")
        for beam in map(int, args.beams.split(",")):
            score = sacrebleu.corpus_bleu(generate(Path(args.data), checkpoint, args.split, beam), refs)
            out[f"{name} beam{beam}"] = {"bleu": score.score, "len_ratio": score.sys_len / score.ref_len,
                                         "precisions": score.precisions}
            print(f"{name:30s} beam {beam}: BLEU {score.score:6.2f}  len ratio {score.sys_len / score.ref_len:.3f}  "
                  f"precisions {' / '.join(f'{p:.1f}' for p in score.precisions)}", flush=True)
    if args.out:
        write_json(args.out, out)


if __name__ == "__main__":
    main()
