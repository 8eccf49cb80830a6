#!/usr/bin/env python
"""erac's actor objective, forward + backward through log_softmax: the closed-form
backward of ``critics.actor_objective`` against autograd of the same expression,
interleaved in one run (random logits and Q of a Bible batch's shape).

    python benchmarks/actor_objective_speed.py [--rows 56] [--steps 30] [--vocab 4000] [--repeats 25]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fairseq_seqlevel.critics import actor_objective, policy_stats  # noqa: E402


def autograd_objective(lprobs, q, mask, tau):
    """The expression the closed form replaces (its value and gradient are equal)."""
    probs = lprobs.float().exp()
    per_step = (probs * q).sum(dim=-1) - tau * (probs * lprobs.masked_fill(probs.eq(0), 0.0)).sum(dim=-1)
    return -(per_step * mask).sum()


def closed_form(lprobs, q, mask, tau):
    with torch.no_grad():  # π: erac computes it for the TD target anyway; counted here
        probs = policy_stats(lprobs.detach())[0]
    return actor_objective(lprobs, q, mask, tau, probs=probs)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=56)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--vocab", type=int, default=4000)
    p.add_argument("--tau", type=float, default=0.045)
    p.add_argument("--repeats", type=int, default=25)
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    shape = (args.rows, args.steps, args.vocab)
    logits, q = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    mask = torch.rand(shape[:2], generator=g) < 0.8
    fns = {"autograd": autograd_objective, "closed_form": closed_form}
    times = {name: [] for name in fns}
    for i in range(args.repeats + 3):
        for name in (list(fns) if i % 2 else list(fns)[::-1]):
            z = logits.clone().requires_grad_(True)
            start = time.perf_counter()
            fns[name](z.log_softmax(-1), q, mask, args.tau).backward()
            if i >= 3:  # warm-up
                times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"{args.rows} x {args.steps} x {args.vocab}, {torch.get_num_threads()} threads, median of {args.repeats}: "
          + ", ".join(f"{name} {1000 * m:.1f} ms" for name, m in med.items())
          + f"; closed_form / autograd {med['closed_form'] / med['autograd']:.3f}")


if __name__ == "__main__":
    main()
