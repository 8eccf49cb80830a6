#!/usr/bin/env python
"""What an erac critic has learned: does Q(ŷ_<t, ŷ_t) follow the return or only the
step's own reward, and how much does Q vary over the tokens the actor would emit
compared with the entropy term of the actor's gradient (no training).

    python -m benchmarks.probes.critic_check CHECKPOINT [--actor ACTOR_CHECKPOINT] [--criterion erac]
        [--batches 4] [--tau 0.045] [--setting bible]

What it measures: benchmarks/README.md, "probes/critic_check.py".
"""

import argparse

import torch

from benchmarks.fixtures import probe_setting, quiet


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--actor", default=None, help="actor weights (default: the speed setting's pre-trained model)")
    p.add_argument("--criterion", default="erac")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--tau", type=float, default=0.045)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--setting", default="bible", help="speed setting of config.toml: its task and batches")
    args = p.parse_args(argv)
    quiet()
    from fairseq_seqlevel.criterions.base import references_of
    from fairseq_seqlevel.critics import length_scaled_rewards, policy_stats, taken
    from fairseq_seqlevel.critics.objectives import lambda_sums
    from fairseq_seqlevel.decoding.sampler import sample
    from fairseq_seqlevel.decoding.teacher_forcing import prev_output_tokens_from_target, rows_lprobs

    setting = probe_setting(args.setting, experiments="all")  # any row, experiments' too
    model = setting.model
    if args.actor:
        model.load_state_dict(torch.load(args.actor, map_location="cpu", weights_only=False)["model"])
    crit = setting.build_criterion(args.criterion)
    crit.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=False)["criterion"])
    model.eval()
    crit.eval()
    torch.manual_seed(args.seed)
    q_taken, rewards, returns, spread_pi, spread_vocab, entropy_push = [], [], [], [], [], []
    advantages, residuals = [], []
    eos_advantage, eos_prob, lengths = [], [], []
    with torch.no_grad():
        for batch in setting.batches[: args.batches]:
            pad, eos = crit.padding_idx, crit.eos
            tokens = sample(model, batch["net_input"], n=1, strategy="multinomial").tokens
            mask = tokens.ne(pad)
            r, _ = length_scaled_rewards(crit.reward.prefix, tokens, references_of(batch), batch["target"], pad)
            q = crit.critic(batch["target"], prev_output_tokens_from_target(tokens, pad, eos)).float()
            lprobs = rows_lprobs(model, batch["net_input"], tokens, 1, pad, eos, grad=False).float()
            probs, entropy = policy_stats(lprobs)  # the criterion's own π and H(π), 0·log 0 = 0
            entropy = entropy.unsqueeze(-1)
            expected_q = (probs * q).sum(-1, keepdim=True)
            q_taken.append(taken(q, tokens)[mask])
            rewards.append(r[mask])
            returns.append(lambda_sums(r, 1.0)[mask])  # G_t, as --erac-td-lambda 1 regresses it
            # what eq. 20 uses is Q's differences between tokens at a state, not its level
            advantages.append((taken(q, tokens) - expected_q.squeeze(-1))[mask])
            residuals.append(returns[-1] - expected_q.squeeze(-1)[mask])
            spread_pi.append((probs * (q - expected_q) ** 2).sum(-1).sqrt()[mask])
            spread_vocab.append(q.std(-1)[mask])
            entropy_push.append(args.tau * (probs * (lprobs + entropy) ** 2).sum(-1).sqrt()[mask])
            # the state where each trajectory stopped: eos ends the episode, so its TD
            # target has no future term; what does the critic say of stopping there?
            last = mask.sum(dim=1, keepdim=True) - 1
            at_stop = lambda x: x.gather(1, last).squeeze(1)  # noqa: E731
            eos_advantage.append(at_stop(q[..., eos] - expected_q.squeeze(-1)))
            eos_prob.append(at_stop(probs[..., eos]))
            lengths.append(mask.sum(dim=1).float())
    q, r, g = torch.cat(q_taken), torch.cat(rewards), torch.cat(returns)

    def corr(a, b):
        return torch.corrcoef(torch.stack([a, b]))[0, 1].item()

    print(f"{q.numel()} tokens of {sum(b['nsentences'] for b in setting.batches[: args.batches])} trajectories")
    print(f"  mean Q(taken) {q.mean():.3f}   mean r_t {r.mean():.3f}   mean return G_t {g.mean():.3f}")
    print(f"  corr(Q, r_t) {corr(q, r):.3f}   corr(Q, G_t) {corr(q, g):.3f}")
    a, e = torch.cat(advantages), torch.cat(residuals)
    print(f"  Q(taken) - E_pi Q: std {a.std():.3f}, corr with G_t - E_pi Q {corr(a, e):.3f} "
          f"(do Q's differences between tokens follow the return?)")
    print(f"  per state: std of Q under pi {torch.cat(spread_pi).mean():.4f}   "
          f"tau * std of log pi under pi {torch.cat(entropy_push).mean():.4f} (tau {args.tau})   "
          f"std of Q over the vocabulary {torch.cat(spread_vocab).mean():.4f}")
    stop = torch.cat(eos_advantage)
    print(f"  where each trajectory stopped: Q(eos) - E_pi Q {stop.mean():+.3f} (share < 0: "
          f"{stop.lt(0).float().mean():.2f}), pi(eos) {torch.cat(eos_prob).mean():.3f}; "
          f"mean length {torch.cat(lengths).mean():.1f} tokens")


if __name__ == "__main__":
    main()
