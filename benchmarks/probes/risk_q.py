#!/usr/bin/env python
"""Is risk's Q an expectation over U(x) or one-hot? On Bible batches from the pre-trained model:
mean max Q and H(Q)/log n (what risk logs as risk_q_max / risk_q_entropy) and the gradient norms
of the risk term and of the label-smoothed NLL term, each times its weight in the loss, for the
benchmark's setting (α = 1 on summed log-probs), Shen et al. 2016's α = 5e-3, and length-normalized
scores (issue 44). The same candidates for every setting (one draw per batch, reused).

    python -m benchmarks.probes.risk_q [--batches 4] [--candidates 8] [--mle-weight 0.3]
"""

import argparse

import torch

from benchmarks.fixtures import probe_setting, parse_fairseq, quiet

SETTINGS = {  # name: risk flags beside the candidates and the weight
    "alpha 1, summed (benchmark)": ["--risk-sharpness", "1", "--risk-score", "sum"],
    "alpha 5e-3, summed (Shen et al.)": ["--risk-sharpness", "0.005", "--risk-score", "sum"],
    "alpha 1, length-normalized (default)": ["--risk-sharpness", "1", "--risk-score", "mean"],
}


def grad_norm(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return float(torch.sqrt(sum(p.grad.float().pow(2).sum() for p in model.parameters() if p.grad is not None)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--mle-weight", type=float, default=0.3)
    args = parser.parse_args(argv)
    quiet()
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    setting = probe_setting("bible", args.batches)
    model, w = setting.model, args.mle_weight
    print(f"Bible, {args.batches} batches, model {setting.trained_from or 'UNTRAINED'}, n = {args.candidates}, "
          f"risk weight {1 - w:g}, NLL weight {w:g} (label smoothing 0.1)")

    def build(flags):
        argv = setting.base_argv() + ["--criterion", "risk", "--risk-candidates", str(args.candidates),
                                      "--label-smoothing", "0.1", *flags]
        return setting.task.build_criterion(convert_namespace_to_omegaconf(parse_fairseq(argv)).criterion)

    nll_only = build(["--risk-mle-weight", "1"])
    drawn = {}
    for name, flags in SETTINGS.items():
        risk_only = build(["--risk-mle-weight", "0", *flags])
        q_max = q_ent = spread = n = 0.0
        g_risk, g_nll = [], []
        for i, batch in enumerate(setting.batches):
            if i not in drawn:  # one draw of candidates per batch, shared by the settings
                torch.manual_seed(i)
                drawn[i] = type(risk_only).candidates(risk_only, model, batch)  # not the lambda below
            risk_only.candidates = lambda model, sample, i=i: drawn[i]
            loss, _, log = risk_only(model, batch)
            g_risk.append((1 - w) * grad_norm(model, loss))
            q_max += float(log["risk_q_max_sum"])
            q_ent += float(log["risk_q_entropy_sum"])
            spread += log["risk_spread_sources"]
            n += log["risk_sources"]
            loss, _, _ = nll_only(model, batch)
            g_nll.append(w * grad_norm(model, loss))
        print(f"  {name:<34} mean max Q {q_max / n:.3f}, H(Q)/log n {q_ent / max(spread, 1):.3f} "
              f"({spread / n:.0%} of sources with >= 2 distinct candidates); gradient norm: risk term "
              f"{sum(g_risk) / len(g_risk):.2f}, NLL term {sum(g_nll) / len(g_nll):.2f}")


if __name__ == "__main__":
    main()
