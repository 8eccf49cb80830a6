#!/usr/bin/env python
"""How much weaker erac's entropy term is in the authors' code than in eq. 20 at the same τ:
their signal divides τ·log π by ‖log π‖₂ over the vocabulary (--erac-entropy-scale l2), so the
factor is ‖log π‖₂ at each step of the actor's own trajectories. Measured on training batches of
a task's speed setting with its pre-trained model (issue 44).

    python -m benchmarks.probes.entropy_scale [--setting bible] [--batches 2]
"""

import argparse

import torch

from benchmarks.fixtures import probe_setting, quiet


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", default="bible")
    parser.add_argument("--batches", type=int, default=2)
    args = parser.parse_args(argv)
    quiet()
    from fairseq_seqlevel.decoding.sampler import sample
    from fairseq_seqlevel.decoding.teacher_forcing import rows_lprobs

    setting = probe_setting(args.setting, args.batches)
    model, d = setting.model, setting.task.target_dictionary
    model.eval()
    norms = []
    torch.manual_seed(0)
    with torch.no_grad():
        for batch in setting.batches:
            tokens = sample(model, batch["net_input"], n=1, strategy="multinomial").tokens
            bos = torch.full((tokens.size(0),), d.eos(), dtype=torch.long)
            lprobs = rows_lprobs(model, batch["net_input"], tokens, 1, d.pad(), bos).float()
            finite = lprobs.masked_fill(lprobs.isinf(), 0.0)
            norms.append(finite.norm(dim=-1)[tokens.ne(d.pad())])
    norms = torch.cat(norms)
    print(f"{args.setting}: vocabulary {len(d)}, model {setting.trained_from or 'UNTRAINED'}, {norms.numel()} steps "
          f"of sampled trajectories: ‖log π‖₂ median {float(norms.median()):.0f}, mean {float(norms.mean()):.0f}, "
          f"range {float(norms.min()):.0f}-{float(norms.max()):.0f}: the authors' entropy term is that many "
          "times weaker than eq. 20's at the same τ")


if __name__ == "__main__":
    main()
