#!/usr/bin/env python
"""How much of eq. 13's token distribution softmax(cos(w, y*)/τ) the top-k truncation drops:
the exact mass outside each gold token's k kept neighbours (the untruncated distribution over
every eligible token), weighted by how often each token is a training target (issue 44).

    python -m benchmarks.probes.token_smooth_tail [--task bible_es_en] [--topk 20] [--tau 0.1,0.17]
"""

import argparse

import torch

from benchmarks import config as C, runs as R
from benchmarks.fixtures import quiet


def tail_mass(embeddings, topk, tau, eligible):
    """(mass outside the top-k (self included) of softmax(cos/τ) over eligible tokens, the gold
    token's own probability in it) per row [V]."""
    unit = torch.nn.functional.normalize(embeddings.double(), dim=1)
    cos = unit @ unit.T
    cos.masked_fill_(~eligible.unsqueeze(0), float("-inf"))
    cos.fill_diagonal_(1.0)  # the gold token keeps its own slot, as the table does
    p = torch.softmax(cos / tau, dim=1)
    kept = p.topk(topk, dim=1).values.sum(dim=1)
    return 1.0 - kept, p.diagonal()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="bible_es_en")
    parser.add_argument("--topk", default="20", help="comma-separated k")
    parser.add_argument("--tau", default="0.1,0.17")
    parser.add_argument("--workdir", default=str(C.DEFAULT_WORKDIR))
    args = parser.parse_args(argv)
    quiet()
    from fairseq.data import Dictionary

    from fairseq_seqlevel.smoothing.embeddings import load_text_embeddings
    from fairseq_seqlevel.perturbation.vocab import never_sampled_ids

    cfg = C.load_config()
    task = cfg["tasks"][args.task]
    data = R.resolve_path(task["data"])
    lang = task.get("target_lang", "tgt")
    path = R.ensure_token_embeddings(cfg, args.task, args.workdir)
    dictionary = Dictionary.load(str(data / f"dict.{lang}.txt"))
    embeddings, _ = load_text_embeddings(str(path), dictionary)
    eligible = embeddings.norm(dim=1) > 0
    eligible[never_sampled_ids(dictionary)] = False
    counts = torch.tensor(dictionary.count, dtype=torch.float64) * eligible
    weight = counts / counts.sum()
    print(f"{args.task}: {int(eligible.sum())} eligible target tokens; frequency-weighted over training targets")
    w = weight[eligible]
    for tau in (float(t) for t in args.tau.split(",")):
        for k in (int(k) for k in args.topk.split(",")):
            tail, gold = (x[eligible] for x in tail_mass(embeddings, k, tau, eligible))
            order = tail.argsort()
            median = float(tail[order][int((w[order].cumsum(0) < 0.5).sum())])
            print(f"  tau {tau}, top-{k}: mass the truncation drops: mean {float((w * tail).sum()):.4f}, "
                  f"median {median:.4f}, max {float(tail.max()):.4f}; gold token's probability "
                  f"{float((w * gold).sum()):.4f} untruncated, {float((w * gold / (1 - tail)).sum()):.4f} kept")


if __name__ == "__main__":
    main()
