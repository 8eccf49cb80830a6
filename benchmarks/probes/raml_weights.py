#!/usr/bin/env python
"""raml's sample weights on real Bible batches (no model needed: the weights depend only on the
samples, the reward and the proposal): the effective sample size 1/Σω² of each example's L
weights and the weight on its most corrupted sample, for the Hamming and n-gram samplers,
importance weights (eq. 11) against --raml-weighting reward (issue 44).

    python -m benchmarks.probes.raml_weights [--batches 4] [--samples 5] [--tau 0.11]
"""

import argparse

import torch

from benchmarks.fixtures import probe_setting, parse_fairseq, quiet


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--tau", type=float, default=0.11, help="the sampler's τ (τ_r defaults to it)")
    args = parser.parse_args(argv)
    quiet()
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    setting = probe_setting("bible", args.batches)
    L = args.samples
    print(f"Bible, {args.batches} training batches, L = {L}, τ = τ_r = {args.tau}, reward bleu "
          f"(ESS in [1, {L}]; 'worst' = the weight on the sample farthest from y*)")
    for sampler in ("hamming", "ngram"):
        for weighting in ("importance", "reward"):
            flags = ["--criterion", "raml", "--raml-sampler", sampler, "--raml-vocab", "batch",
                     "--raml-samples", str(L), "--raml-temperature", str(args.tau), "--raml-reward", "bleu",
                     "--raml-weighting", weighting]
            criterion = setting.task.build_criterion(
                convert_namespace_to_omegaconf(parse_fairseq(setting.base_argv() + flags)).criterion)
            ess, worst, dist = [], [], []
            torch.manual_seed(0)
            for batch in setting.batches:
                drawn, weights, batch_ess = criterion.draw_samples(batch)
                w, d = weights.view(-1, L), drawn.distance.view(-1, L).float()
                ess.append(batch_ess)
                worst.append(w.gather(1, d.argmax(1, keepdim=True)).squeeze(1))
                dist.append(d.mean(1))
            ess, worst, dist = torch.cat(ess), torch.cat(worst), torch.cat(dist)
            print(f"  {sampler:<8} {weighting:<10}: ESS mean {float(ess.mean()):.2f} (median {float(ess.median()):.2f}), "
                  f"weight on the worst sample {float(worst.mean()):.2f}, mean distance {float(dist.mean()):.2f}")


if __name__ == "__main__":
    main()
