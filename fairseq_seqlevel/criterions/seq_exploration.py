"""``seq_exploration``: self-critical training with sequence-level exploration (chen2019);
``--seq-exploration-alpha 1`` is SCST (Rennie et al. 2017).

Per source, s samples and the greedy output (the baseline) are decoded in
one batched call; the samples are re-scored with gradients under the
surrogate loss of eq. 15-16 (reward advantage plus a diversity term).
Equations, options beyond the paper and normalization:
docs/criterions/seq_exploration.md.
"""

from dataclasses import dataclass, field
from functools import partial
from typing import Optional

import torch
from fairseq.criterions import register_criterion
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from omegaconf import II

from fairseq_seqlevel.criterions.base import (SeqlevelCriterion, log_mean, mle_mix, reference_and_samples,
                                              references_of, scored_part, unforced, worker_rng)
from fairseq_seqlevel.decoding.model import forward_through
from fairseq_seqlevel.decoding.sampler import draw, sample as sample_outputs
from fairseq_seqlevel.decoding.teacher_forcing import rows_objective, sequence_nll, token_nll
from fairseq_seqlevel.errors import check
from fairseq_seqlevel.rewards import PAIRWISE_DISTANCES, pairwise_distances


@dataclass
class SeqExplorationConfig(FairseqDataclass):
    seq_exploration_samples: int = field(default=5, metadata={"help": "s: samples per source (one sampler call "
                                                                      "with the greedy baseline)"})
    seq_exploration_alpha: float = field(default=0.75, metadata={
        "help": "α of eq. 8: α·reward + (1 - α)·diversity (1 = SCST, Rennie et al. 2017; the paper's SLL)"})
    seq_exploration_distance: ChoiceEnum(list(PAIRWISE_DISTANCES)) = field(
        default="bleu34", metadata={"help": "d between samples, on target ids: bleu34 = 1 - (BLEU-3 + BLEU-4)/2 "
                                    "(§4.3), edit = normalized edit distance"})
    seq_exploration_entropy_weight: float = field(
        default=0.0, metadata={"help": "β: minus β x per-token entropy along the samples (SLL-ME; the "
                               "paper tuned 1e-2)"})
    seq_exploration_baseline: ChoiceEnum(["greedy", "mean"]) = field(
        default="greedy", metadata={"help": "b: reward of the greedy output (chen2019, SCST) or, not in the paper, "
                                    "mean reward of the source's other samples (Kool et al. 2019; Luo 2020: "
                                    "advantages sum to 0 per source, no greedy decode; needs "
                                    "--seq-exploration-samples >= 2)"})
    seq_exploration_mle_weight: float = field(
        default=0.0, metadata={"help": "w: train (1 - w) x the eq. 16 loss + w x NLL of the reference (not "
                               "in the paper: Wu et al. 2016's mixed objective; 1 = fairseq's cross-entropy)"})
    seq_exploration_reward: Optional[str] = field(
        default=None, metadata={"help": "Δ, against every reference (also the baseline b's, see "
                                "--seq-exploration-baseline): default the task's --reward (bleu in a stock task)"})
    seq_exploration_max_len_src_a: float = field(
        default=1.2, metadata={"help": "samples: at most a·|x| + b tokens, x the source "
                                 "(as fairseq-generate's --max-len-a/b)"})
    seq_exploration_max_len_src_b: int = field(
        default=10, metadata={"help": "samples: at most a·|x| + b tokens, x the source "
                                 "(as fairseq-generate's --max-len-a/b)"})
    sentence_avg: bool = II("optimization.sentence_avg")


def check_sle_config(cfg):
    s, alpha = cfg.seq_exploration_samples, cfg.seq_exploration_alpha
    check(s >= 1, f"--seq-exploration-samples must be >= 1, got {s}")
    check(0.0 <= alpha <= 1.0, f"--seq-exploration-alpha must be in [0, 1], got {alpha}")
    check(alpha == 1.0 or s >= 2,
          f"--seq-exploration-alpha < 1 needs --seq-exploration-samples >= 2 (distances between samples), got {s}")
    check(str(cfg.seq_exploration_distance) in PAIRWISE_DISTANCES,
          f"--seq-exploration-distance must be one of {', '.join(PAIRWISE_DISTANCES)}, "
          f"got {cfg.seq_exploration_distance}")
    check(str(cfg.seq_exploration_baseline) in ("greedy", "mean"),
          f"--seq-exploration-baseline must be greedy or mean, got {cfg.seq_exploration_baseline}")
    check(str(cfg.seq_exploration_baseline) == "greedy" or s >= 2,
          f"--seq-exploration-baseline mean needs --seq-exploration-samples >= 2, got {s}")
    w, beta = cfg.seq_exploration_mle_weight, cfg.seq_exploration_entropy_weight
    check(0.0 <= w <= 1.0, f"--seq-exploration-mle-weight must be in [0, 1], got {w}")
    check(beta >= 0, f"--seq-exploration-entropy-weight must be >= 0, got {beta}")
    a, b = cfg.seq_exploration_max_len_src_a, cfg.seq_exploration_max_len_src_b
    check(a >= 0 and b >= 1,
          f"--seq-exploration-max-len-src-a must be >= 0 and --seq-exploration-max-len-src-b >= 1, got {a}, {b}")


def nll_and_entropy(lprobs, target, pad):
    """``loss_fn`` with two components per row: (NLL, Σ_t entropy of p(·|y_<t)) [n, 2], and the NLL."""
    mask = target.ne(pad)
    nll = token_nll(lprobs, target, pad).sum(dim=-1)
    entropy = -(lprobs.exp() * lprobs).sum(dim=-1).masked_fill(~mask, 0.0).sum(dim=-1)
    return torch.stack([nll, entropy], dim=-1), nll


def leave_one_out_baseline(rewards):
    """Per sample [B, s]: the mean reward of the source's other s − 1 samples."""
    s = rewards.size(1)
    return (rewards.sum(dim=1, keepdim=True) - rewards) / (s - 1)


def exploration_advantages(rewards, baseline, distances, alpha):
    """Multiplier of −log p(ỹ_j|x) in eq. 16, per sample [B, s]:
    α·(Δ_j − b) + (1−α)·(2/s)·Σ_k (d_jk − b_d), b_d the mean of all s² distances;
    ``baseline`` broadcasts to [B, s] (greedy: [B, 1]; leave-one-out: [B, s])."""
    s = rewards.size(1)
    advantage = alpha * (rewards - baseline)
    if alpha < 1.0:
        mean_distance = distances.mean(dim=(1, 2), keepdim=True)
        advantage = advantage + (1.0 - alpha) * (2.0 / s) * (distances - mean_distance).sum(dim=2)
    return advantage


@register_criterion("seq_exploration", dataclass=SeqExplorationConfig)
class SeqExplorationCriterion(SeqlevelCriterion):
    deprecated_flags = {  # the names before issue 41
        "--sle-alpha": "--seq-exploration-alpha",
        "--sle-baseline": "--seq-exploration-baseline",
        "--sle-distance": "--seq-exploration-distance",
        "--sle-entropy-weight": "--seq-exploration-entropy-weight",
        "--sle-max-len-a": "--seq-exploration-max-len-src-a",
        "--sle-max-len-b": "--seq-exploration-max-len-src-b",
        "--sle-mle-weight": "--seq-exploration-mle-weight",
        "--sle-reward": "--seq-exploration-reward",
        "--sle-samples": "--seq-exploration-samples",
    }

    def __init__(self, task, cfg: SeqExplorationConfig):
        check_sle_config(cfg)
        super().__init__(task, cfg)
        self.reward = self.resolve_reward(cfg.seq_exploration_reward, "--seq-exploration-reward", default="bleu")

    def draw(self, model, sample, layout=None):
        """(samples [B·s, T], greedy [B, T]) in one decoding loop: row 0 of each
        source's s + 1 rows is greedy, the others multinomial (no grad);
        greedy is None with ``--seq-exploration-baseline mean`` (s rows per source)."""
        cfg = self.cfg
        layout = layout if layout is not None else self.output_layout(model, sample)
        if cfg.seq_exploration_baseline == "mean":
            out = sample_outputs(model, sample["net_input"], n=cfg.seq_exploration_samples, strategy="multinomial",
                                 max_len_a=cfg.seq_exploration_max_len_src_a,
                                 max_len_b=cfg.seq_exploration_max_len_src_b, layout=layout)
            return out.tokens, None
        per_source = cfg.seq_exploration_samples + 1

        def greedy_first(step, lprobs, prefix, rows):
            drawn = draw(lprobs.softmax(dim=-1))
            return torch.where(rows % per_source == 0, lprobs.argmax(dim=-1), drawn)

        out = sample_outputs(model, sample["net_input"], n=per_source, choose=greedy_first,
                             max_len_a=cfg.seq_exploration_max_len_src_a,
                                 max_len_b=cfg.seq_exploration_max_len_src_b, layout=layout)
        grouped = out.tokens.view(-1, per_source, out.tokens.size(1))
        return grouped[:, 1:].reshape(-1, grouped.size(2)), grouped[:, 0]

    def training_loss(self, model, sample):
        cfg, pad = self.cfg, self.padding_idx
        target, refs = sample["target"], references_of(sample)
        batch_size, s = target.size(0), cfg.seq_exploration_samples
        layout = self.output_layout(model, sample)
        with worker_rng():
            samples, greedy = self.draw(model, sample)
        with torch.no_grad():
            rewards = self.reward(samples, refs.repeat_interleave(s, dim=0)).float().view(batch_size, s)
            baseline = (self.reward(greedy, refs).float().unsqueeze(1) if greedy is not None
                        else leave_one_out_baseline(rewards))
            distances = (pairwise_distances(layout.view(samples).view(batch_size, s, samples.size(1)), pad,
                                            self.eos, cfg.seq_exploration_distance)
                         if cfg.seq_exploration_alpha < 1.0 else rewards.new_zeros(batch_size, s, s))
            advantage = exploration_advantages(rewards, baseline, distances, cfg.seq_exploration_alpha)
        # one teacher-forced pass over [y*, ỹ_1..ỹ_s] per source: y* for nll_loss and the MLE mix
        rows = reference_and_samples(target, samples, s, pad)
        weight, beta = self.length_weights(target), cfg.seq_exploration_entropy_weight
        loss_fn = partial(nll_and_entropy, pad=pad) if beta > 0 else partial(sequence_nll, pad=pad)

        def surrogate(row_loss):  # eq. 15-16, minus β·entropy; row_loss [B·(s+1)] or [B·(s+1), 2]
            per_row = row_loss.view(batch_size, s + 1, -1)
            per_source = (advantage * per_row[:, 1:, 0]).mean(dim=1)
            if beta > 0:
                per_source = per_source - beta * per_row[:, 1:, 1].mean(dim=1)
            # the reference's summed token NLL: / sample_size it is fairseq's cross-entropy
            return mle_mix((weight * per_source).sum(), per_row[:, 0, 0].sum(), cfg.seq_exploration_mle_weight)

        loss, row_loss, row_nll, _ = forward_through(model, rows_objective, sample["net_input"], rows, s + 1, pad,
                                                     layout.bos, loss_fn, surrogate, fused=self.fused,
                                                     loss_target=scored_part(rows, s, layout.prefix_len, pad))
        nll = row_nll.view(batch_size, s + 1)[:, 0].sum()
        sample_size = self.sample_size_of(sample)
        extra = self.logged(rewards, baseline if greedy is not None else None, distances,
                            row_loss.view(batch_size, s + 1, 2)[:, 1:, 1] if beta > 0 else None, samples, layout)
        return loss, sample_size, self.stock_logging_output(loss, nll, sample, sample_size, **extra)

    def logged(self, rewards, greedy_rewards, distances, entropy, samples, layout):
        """The summable logging of a step (rewards, greedy baseline, distances, entropy)."""
        batch_size, s = rewards.shape
        extra = {
            "sle_reward_sum": rewards.sum(), "sle_nsamples": rewards.numel(),
            "sle_distance_sum": distances.sum(), "sle_npairs": batch_size * s * (s - 1),
        }
        if greedy_rewards is not None:
            extra["sle_greedy_reward_sum"] = greedy_rewards.sum()
        if entropy is not None:
            extra["sle_entropy_sum"] = entropy.sum()
            pad = self.padding_idx
            extra["sle_ntokens"] = int(unforced(samples, layout.prefix_len, pad).ne(pad).sum())
        return extra

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        log_mean(logging_outputs, "sle_reward", "sle_reward_sum", "sle_nsamples", round=4)
        log_mean(logging_outputs, "sle_greedy_reward", "sle_greedy_reward_sum", "nsentences", round=4)
        log_mean(logging_outputs, "sle_distance", "sle_distance_sum", "sle_npairs", round=4)
        log_mean(logging_outputs, "sle_entropy", "sle_entropy_sum", "sle_ntokens", round=4)
