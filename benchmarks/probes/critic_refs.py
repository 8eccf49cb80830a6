#!/usr/bin/env python
"""Two of erac/vaml's reward points on the Bible model's own samples (issue 44): how much of the
critic's return comes from the extra reference it does not read (the critic reads y*, its targets
score every reference), and how far exp-smoothed sentence BLEU (the default) is from the
authors' add-1 BLEU (bleu_add1). Per-step rewards as erac computes them: prefix rewards,
differenced and scaled by |y*| (dai2018 §6.1); returns G_t = Σ_{t'≥t} r_t'.

    python -m benchmarks.probes.critic_refs [--batches 4] [--samples 2]
"""

import argparse

import torch

from benchmarks.fixtures import probe_setting, quiet


def corr(a, b):
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--samples", type=int, default=2, help="multinomial samples per source (erac's critic phase: 2)")
    args = parser.parse_args(argv)
    quiet()
    from fairseq_seqlevel.critics.objectives import length_scaled_rewards
    from fairseq_seqlevel.decoding.sampler import sample
    from fairseq_seqlevel.rewards.binding import bind_reward

    setting = probe_setting("bible", args.batches)
    model, d = setting.model, setting.task.target_dictionary
    pad, s = d.pad(), args.samples
    rewards = {name: bind_reward(name, d, needs_prefix=True) for name in ("bleu", "bleu_add1")}
    model.eval()
    out = {k: [] for k in ("all", "ystar", "add1", "final_all", "final_ystar", "final_add1", "step_all", "step_ystar",
                           "step_add1", "extra")}
    torch.manual_seed(0)
    with torch.no_grad():
        for batch in setting.batches:
            refs = batch.get("references")
            if refs is None:
                raise SystemExit("the Bible batches carry no extra references (--extra-references)")
            tokens = sample(model, batch["net_input"], n=s, strategy="multinomial").tokens
            mask = tokens.ne(pad)
            target = batch["target"].repeat_interleave(s, dim=0)
            all_refs, ystar = refs.repeat_interleave(s, dim=0), target.unsqueeze(1)
            r_all, _ = length_scaled_rewards(rewards["bleu"].prefix, tokens, all_refs, target, pad)
            r_ystar, _ = length_scaled_rewards(rewards["bleu"].prefix, tokens, ystar, target, pad)
            r_add1, _ = length_scaled_rewards(rewards["bleu_add1"].prefix, tokens, all_refs, target, pad)
            for key, r in (("all", r_all), ("ystar", r_ystar), ("add1", r_add1)):
                returns = r.flip(1).cumsum(1).flip(1)  # G_t
                out[key].append(returns[mask])
                out["step_" + key].append(r[mask])
                out["final_" + key].append(r.sum(1))
            out["extra"].append(refs[:, 1:].ne(pad).any(-1).any(-1).repeat_interleave(s))
    g = {k: torch.cat(v).double() for k, v in out.items() if k != "extra"}
    has_extra = torch.cat(out["extra"])
    gap = g["all"] - g["ystar"]
    print(f"Bible, {args.batches} training batches, {s} multinomial samples per source, {g['final_all'].numel()} "
          f"samples ({float(has_extra.float().mean()):.0%} with a second reference), {g['all'].numel()} steps; "
          "rewards: sentence BLEU × |y*| as erac's targets")
    print(f"  critic input: return G_t against every reference vs against y* alone: corr {corr(g['all'], g['ystar']):.3f}, "
          f"share of Var(G_t) y* does not explain {1 - corr(g['all'], g['ystar']) ** 2:.3f}; "
          f"mean G_t {float(g['all'].mean()):.2f} vs {float(g['ystar'].mean()):.2f} (gap {float(gap.mean()):.2f}, "
          f"std {float(gap.std()):.2f}; std of G_t {float(g['all'].std()):.2f})")
    print(f"  per-step reward r_t (what tells one action from another): corr {corr(g['step_all'], g['step_ystar']):.3f}")
    print(f"  final reward: corr {corr(g['final_all'], g['final_ystar']):.3f}; "
          f"samples whose reward the extra reference raises: {float((g['final_all'] > g['final_ystar'] + 1e-6).double().mean()):.0%}")
    print(f"  bleu (exp-smoothed, default) vs bleu_add1 (authors'): G_t corr {corr(g['all'], g['add1']):.3f}, "
          f"r_t corr {corr(g['step_all'], g['step_add1']):.3f}, final reward corr {corr(g['final_all'], g['final_add1']):.3f}, mean G_t {float(g['all'].mean()):.2f} "
          f"vs {float(g['add1'].mean()):.2f}")


if __name__ == "__main__":
    main()
