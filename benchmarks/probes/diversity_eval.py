#!/usr/bin/env python
"""Diversity of K sampled outputs per source for fine-tuned checkpoints (chen2019 Table 4).

    python -m benchmarks.probes.diversity_eval --task bible_es_en --criterions mle,scst,seq_exploration
        [--seeds 1,2,3] [--pretrain-seed 1] [--pretrain-id N] [--k 5] [--workdir work/bench]
        [--out benchmarks/results/diversity.json]

Needs the checkpoints of ``benchmarks.quality --keep-checkpoints`` (WORKDIR/TASK/CRITERION/seedS/
checkpoint_last.pt; pretrain{N}_seedS from pre-training seed N); rows carry ``pretrain``
(``--pretrain-id``, default the pre-training seed: quality.json's id of that model).  For each one:
``fairseq-generate --sampling --beam K --nbest K`` on the task's test split
(sampling seed 1, words after ``--remove-bpe sentencepiece``), then
``fairseq_seqlevel.diversity``'s div1, div2 and mBLEU-4 of the K outputs of
each source.  Adds one JSON row per checkpoint to ``--out`` (replacing a row
of the same checkpoint) and prints mean ± std per criterion over all its rows.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import config as C
from benchmarks.config import REPO
from benchmarks.evaluate import detokenized_groups, generate_output
from benchmarks.plan import run_dir
from benchmarks.runs import resolve_path
from benchmarks.util import read_json, write_json


def sampled_outputs(data, checkpoint, k, seed=1, split="test"):
    """K sampled outputs per source, in source order."""
    stdout = generate_output(data, checkpoint, split, beam=k, batch_size=64,
                             extra_args=["--sampling", "--nbest", str(k), "--seed", str(seed)])
    groups = detokenized_groups(stdout)
    return [groups[i] for i in sorted(groups)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="bible_es_en")
    p.add_argument("--criterions", default="mle,scst,seq_exploration")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--pretrain-seed", type=int, default=1, help="the runs fine-tuned from this pre-training seed")
    p.add_argument("--pretrain-id", type=int, default=None,
                   help="the rows' pretrain field (default: --pretrain-seed; quality.json's id of the model)")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--workdir", default=str(C.DEFAULT_WORKDIR))
    p.add_argument("--config", default=str(C.DEFAULT_CONFIG))
    p.add_argument("--out", default=str(C.DEFAULT_RESULTS / "diversity.json"))
    args = p.parse_args(argv)
    cfg = C.load_config(args.config)
    data = resolve_path(cfg["tasks"][args.task]["data"])
    pretrain_id = args.pretrain_seed if args.pretrain_id is None else args.pretrain_id
    rows = []
    for crit in args.criterions.split(","):
        for seed in args.seeds.split(","):
            ckpt = run_dir(args.workdir, args.task, crit, int(seed), args.pretrain_seed) / "checkpoint_last.pt"
            if not ckpt.exists():
                print(f"skip: {ckpt} not found (run benchmarks.quality --keep-checkpoints)", file=sys.stderr)
                continue
            groups = sampled_outputs(data, ckpt, args.k)
            with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
                f.write("\n".join(h for g in groups for h in g) + "\n")
            res = subprocess.run([sys.executable, "-m", "fairseq_seqlevel.diversity", f.name, "--k", str(args.k)],
                                 capture_output=True, text=True, cwd=REPO)
            os.unlink(f.name)
            if res.returncode != 0:
                sys.exit(f"error: diversity failed on {ckpt}: {res.stderr.strip()}")
            scores = json.loads(res.stdout.strip().splitlines()[-1])
            rows.append({"task": args.task, "criterion": crit, "pretrain": pretrain_id, "seed": int(seed), **scores})
            print(json.dumps(rows[-1]))
    # rows of other checkpoints already in --out stay (a run for more seeds adds to it)
    key = lambda r: (r["task"], r["criterion"], r.get("pretrain", 1), r["seed"])  # noqa: E731
    fresh = {key(r) for r in rows}
    rows = [r for r in (read_json(Path(args.out), []) or []) if key(r) not in fresh] + rows
    write_json(Path(args.out), rows)
    for crit in args.criterions.split(","):
        mine = [r for r in rows if r["criterion"] == crit and r["task"] == args.task]
        if mine:  # pooled over every pre-trained model in --out
            parts = []
            for key in ("div1", "div2", "mbleu4"):
                vals = [r[key] for r in mine]
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                parts.append(f"{key} {statistics.mean(vals):.4f} ± {sd:.4f}")
            print(f"{crit:<16} ({len(mine)} runs): " + ", ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
