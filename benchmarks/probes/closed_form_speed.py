#!/usr/bin/env python
"""erac's two losses with their derivatives written out, forward + backward, against
autograd of the same expressions, interleaved in one run (random logits and Q of a
Bible batch's shape): the actor objective through log_softmax
(``critics.actor_objective``) and the critic loss, TD error plus variance smoothing
(``critics.critic_loss``).

    python -m benchmarks.probes.closed_form_speed [--rows 56] [--steps 30] [--vocab 4000] [--repeats 25]
"""

import argparse
import statistics
import time

import torch

from fairseq_seqlevel.critics import actor_objective, critic_loss, policy_stats, taken


def autograd_objective(lprobs, q, mask, tau):
    """The expression the closed form replaces (its value and gradient are equal)."""
    probs = lprobs.float().exp()
    per_step = (probs * q).sum(dim=-1) - tau * (probs * lprobs.masked_fill(probs.eq(0), 0.0)).sum(dim=-1)
    return -(per_step * mask).sum()


def q_variance(q, mask):
    """Σ_t Σ_w (Q(s_t, w) − mean_w Q(s_t, ·))² over the real steps: the variance
    smoothing that ``critic_loss`` computes with its derivative."""
    centered = q - q.mean(dim=-1, keepdim=True)
    return (centered.pow(2).sum(dim=-1) * mask).sum()


def autograd_critic_loss(q, tokens, target, mask, var_weight):
    """The expression ``critic_loss`` replaces: (TD + λ·variance, TD)."""
    residual = taken(q.float(), tokens) - target
    td = torch.where(mask, residual, residual.new_zeros(())).pow(2).sum()
    return td + var_weight * q_variance(q.float(), mask), td


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
    p.add_argument("--var-weight", type=float, default=0.001)
    p.add_argument("--repeats", type=int, default=25)
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    shape = (args.rows, args.steps, args.vocab)
    logits, q = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    mask = torch.rand(shape[:2], generator=g) < 0.8
    tokens = torch.randint(0, args.vocab, shape[:2], generator=g)
    target = torch.randn(shape[:2], generator=g)
    cases = {
        "actor objective": (logits, lambda z, fn: fn(z.log_softmax(-1), q, mask, args.tau),
                            {"autograd": autograd_objective, "closed_form": closed_form}),
        "critic loss": (q, lambda z, fn: fn(z, tokens, target, mask, args.var_weight)[0],
                        {"autograd": autograd_critic_loss, "closed_form": critic_loss}),
    }
    for case, (leaf, run, fns) in cases.items():
        times = {name: [] for name in fns}
        for i in range(args.repeats + 3):
            for name in (list(fns) if i % 2 else list(fns)[::-1]):
                z = leaf.clone().requires_grad_(True)
                start = time.perf_counter()
                run(z, fns[name]).backward()
                if i >= 3:  # warm-up
                    times[name].append(time.perf_counter() - start)
        med = {name: statistics.median(t) for name, t in times.items()}
        print(f"{case}: {args.rows} x {args.steps} x {args.vocab}, {torch.get_num_threads()} threads, median of "
              f"{args.repeats}: " + ", ".join(f"{name} {1000 * m:.1f} ms" for name, m in med.items())
              + f"; closed_form / autograd {med['closed_form'] / med['autograd']:.3f}")


if __name__ == "__main__":
    main()
