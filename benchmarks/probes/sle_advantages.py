#!/usr/bin/env python
"""How often a sample beats the greedy decode: the sign of seq_exploration's / SCST's
advantages Δ(ỹ) − Δ(greedy) on training batches of a checkpoint (no training).

    python -m benchmarks.probes.sle_advantages [--checkpoint work/bench/bible_es_en/pretrain/checkpoint_last.pt]
        [--batches 8] [--criterion seq_exploration]

Uses the criterion's own draw (s samples + the greedy output in one decoding loop)
and reward, on the first ``--batches`` batches of the speed setting ``bible``.
"""

import argparse
import sys

import torch

from benchmarks import config as C
from benchmarks.fixtures import probe_setting, quiet


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=str(C.DEFAULT_WORKDIR / "bible_es_en" / "pretrain" / "checkpoint_last.pt"))
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--criterion", default="seq_exploration")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    quiet()
    from fairseq_seqlevel.criterions.base import references_of

    setting = probe_setting("bible", args.batches, [args.criterion], experiments="all")  # any row
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    setting.model.load_state_dict(state["model"])
    crit = setting.build_criterion(args.criterion)
    torch.manual_seed(args.seed)
    advantages, best = [], []
    for batch in setting.batches:
        with torch.no_grad():
            samples, greedy = crit.draw(setting.model, batch)
            refs, k = references_of(batch), crit.cfg.seq_exploration_samples
            rows = batch["target"].size(0)
            reward = crit.reward(samples, refs.repeat_interleave(k, dim=0)).float().view(rows, k)
            adv = reward - crit.reward(greedy, refs).float().unsqueeze(1)
        advantages.append(adv.flatten())
        best.append(adv.max(dim=1).values > 0)
    adv, best = torch.cat(advantages), torch.cat(best)
    print(f"{args.checkpoint}: {adv.numel()} samples of {best.numel()} sources; above the greedy reward "
          f"{float((adv > 0).float().mean()):.3f}; mean advantage {float(adv.mean()):+.3f} "
          f"(median {float(adv.median()):+.3f}); sources whose best of {crit.cfg.seq_exploration_samples} beats greedy "
          f"{float(best.float().mean()):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
