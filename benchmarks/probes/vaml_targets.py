#!/usr/bin/env python
"""How much of vaml's actor gradient comes from the critic (issue 44): eq. 17 trains towards
(1 − α)·one-hot(ỹ_t) + α·softmax(Q/τ), so the gradient is (1 − α)·∇NLL + α·∇CE(softmax(Q/τ)).
Both terms' gradient norms over the actor's parameters, their cosine, and what the soft target
looks like (its entropy, its mass on the sampled token), on the actor rows of a trained Q phase
(the pre-trained actor, --vaml-samples Hamming samples per reference), at the criterion's τ
(--taus: other τ on the same critic, which was trained at the criterion's τ).

    python -m benchmarks.probes.vaml_targets Q_CHECKPOINT [--criterion vaml_tau04] [--taus 0.4,0.1]
        [--batches 2] [--setting bible]
"""

import argparse

import torch

from benchmarks.fixtures import probe_setting, quiet


def flat_grad(loss, params):
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a vaml Q-phase checkpoint (its criterion state holds the critic)")
    p.add_argument("--criterion", default="vaml_tau04")
    p.add_argument("--taus", default=None, help="comma-separated τ (default: the criterion's)")
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--setting", default="bible")
    args = p.parse_args(argv)
    quiet()
    from fairseq_seqlevel.critics import taken
    from fairseq_seqlevel.criterions.base import unforced
    from fairseq_seqlevel.criterions.vaml import value_targets_loss
    from fairseq_seqlevel.decoding.teacher_forcing import prev_output_tokens_from_target, rows_lprobs

    setting = probe_setting(args.setting, args.batches, experiments="all")
    model = setting.model
    crit = setting.build_criterion(args.criterion)
    crit.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=False)["criterion"])
    model.eval()  # no dropout: the two terms see the same forward
    crit.eval()
    alpha, L, pad = crit.cfg.vaml_alpha, crit.cfg.vaml_samples, crit.padding_idx
    params = [q for q in model.parameters() if q.requires_grad]
    taus = [float(t) for t in args.taus.split(",")] if args.taus else [crit.cfg.vaml_tau]
    g_nll, g_soft = torch.zeros(sum(q.numel() for q in params)), {t: 0.0 for t in taus}
    stats = {t: {"entropy": [], "taken": []} for t in taus}
    torch.manual_seed(0)
    for batch in setting.batches:
        layout = crit.output_layout(model, batch)
        rows = crit.draw_samples(batch, layout)
        mask = unforced(rows, layout.prefix_len, pad).ne(pad)
        prev = prev_output_tokens_from_target(rows, pad, layout.bos.repeat_interleave(L))
        with torch.no_grad():
            q = crit.q_values(batch["target"].repeat_interleave(L, dim=0), prev, fixed=False, end=layout.eos)
        lprobs = rows_lprobs(model, batch["net_input"], rows, L, pad, layout.bos)
        # the criterion's own eq. 17 loss, split: α = 0 is its NLL term, α = 1 its soft-target term
        nll, _ = value_targets_loss(lprobs, q, rows, mask, 0.0, 1.0, pad)
        g_nll += flat_grad((1 - alpha) * nll, params)
        for t in taus:
            ce, _ = value_targets_loss(lprobs, q, rows, mask, 1.0, t, pad)
            g_soft[t] = g_soft[t] + flat_grad(alpha * ce, params)
            with torch.no_grad():
                soft = torch.softmax(q / t, dim=-1)
                ent = -(soft * soft.clamp(min=1e-30).log()).sum(-1)
                stats[t]["entropy"].append(ent[mask])
                stats[t]["taken"].append(taken(soft, rows)[mask])
    n = int(sum(s.numel() for s in stats[taus[0]]["taken"]))
    print(f"{args.setting}: {n} actor-row steps of {args.batches} batches, α = {alpha}, {L} samples per reference")
    print(f"  |(1-α)·∇NLL| {float(g_nll.norm()):.1f}")
    for t in taus:
        g = g_soft[t]
        cos = float(torch.nn.functional.cosine_similarity(g, g_nll, dim=0))
        share = float(g.norm() / (g.norm() + g_nll.norm()))
        print(f"  τ {t}: |α·∇CE(softmax(Q/τ))| {float(g.norm()):.1f} (share of the two norms {share:.2f}), "
              f"cosine with the NLL term {cos:+.2f}; softmax(Q/τ): entropy {float(torch.cat(stats[t]['entropy']).mean()):.2f} "
              f"nats, mass on the sampled token {float(torch.cat(stats[t]['taken']).mean()):.3f}")


if __name__ == "__main__":
    main()
