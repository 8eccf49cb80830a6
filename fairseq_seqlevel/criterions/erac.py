"""``erac``: entropy-regularized actor-critic (dai2018 §4.2); ``--erac-tau 0`` is
the actor-critic of Bahdanau et al. 2017 (AC).

A critic Q_φ that reads the reference (owned by the criterion, so fairseq
optimizes, checkpoints and data-parallel-wraps it) is trained on the actor's
sampled trajectories with the TD target of eq. 19 (phase ``critic``), then
jointly with the actor by eq. 20 (phase ``joint``).  Losses, target network,
phases and the task layout: docs/criterions/erac.md.
"""

from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq.criterions import register_criterion
from fairseq.dataclass import ChoiceEnum
from omegaconf import II
from torch.func import functional_call

from fairseq_seqlevel.criterions.base import (SeqlevelCriterion, log_mean, pad_right, reference_length_limit,
                                              references_of, unforced, worker_rng)
from fairseq_seqlevel.criterions.critic_phases import CriticPhases, Phases
from fairseq_seqlevel.critics import (actor_objective, blend_shadow, continuation_returns, continuation_rows,
                                      critic_loss, erac_td_targets, length_scaled_rewards, policy_stats,
                                      register_shadow, shadow, taken)
from fairseq_seqlevel.critics.config import CriticConfig, build_critic
from fairseq_seqlevel.decoding.model import unwrap
from fairseq_seqlevel.decoding.sampler import sample as sample_outputs
from fairseq_seqlevel.decoding.teacher_forcing import prev_output_tokens_from_target, rows_lprobs, token_nll
from fairseq_seqlevel.errors import check

PHASES = ("critic", "joint")


@dataclass
class EracConfig(CriticConfig):
    erac_phase: ChoiceEnum(list(PHASES)) = field(
        default="critic", metadata={"help": "critic: pre-train the critic, actor frozen (start from an MLE "
                                    "checkpoint); joint: actor and critic (start from a critic checkpoint)"})
    erac_samples: int = field(default=1, metadata={"help": "trajectories per source (multinomial, "
                                                           "the shared sampler)"})
    erac_tau: float = field(default=0.01, metadata={"help": "τ: entropy weight (0 = the actor-critic "
                                                            "of Bahdanau et al. 2017, AC)"})
    erac_entropy_scale: ChoiceEnum(["plain", "l2"]) = field(
        default="plain", metadata={"help": "the actor's entropy term: plain = τ·∇H of eq. 20 (the paper); l2 = the "
                                   "authors' code, τ·log π divided by its L2 norm over the vocabulary (their τ = "
                                   "0.045 is that much weaker: ~60x on spelling, >1,000x on word vocabularies)"})
    erac_target_rate: float = field(default=0.001, metadata={"help": "β: target network φ̄ ← β·φ + (1-β)·φ̄, "
                                                                     "once per update"})
    erac_var_weight: float = field(default=0.001, metadata={
        "help": "λ_var: critic variance smoothing Σ_w (Q(w) - mean Q)² (the paper's sum; the authors' code takes "
                "the mean over the vocabulary, so their 0.001 is 0.001/|V| here)"})
    erac_mle_weight: float = field(default=0.1, metadata={"help": "λ_mle: weight of the reference NLL (joint)"})
    erac_reward: Optional[str] = field(
        default=None, metadata={"help": "R of the per-step rewards (prefix values on target tokens): default "
                                "the task's --reward (bleu in a stock task)"})
    erac_continuations: int = field(
        default=0, metadata={"help": "k: where a trajectory ends, also regress the critic's Q of the actor's k "
                             "likeliest tokens other than eos onto the exact return of taking that token, then "
                             "eos (the critic otherwise never sees a trajectory go on past its end; not in "
                             "dai2018; 0 = off, the paper)"})
    erac_td_lambda: float = field(
        default=0.0, metadata={"help": "λ: the critic's target is the λ-return of the same soft value along the "
                               "sampled trajectory, Q̂_t = r_t + τ·H_{t+1} + (1-λ)·Σ_w π·Q_φ̄(ŷ_≤t, w) + "
                               "λ·Q̂_{t+1} (not in dai2018; 0 = the one-step target of eq. 19, the paper; 1 = "
                               "the sampled return plus the later entropy bonus, no bootstrap: ahead on "
                               "spelling, 3.6 BLEU behind on Bible, docs/benchmarks.md; check the critic with "
                               "benchmarks/probes/critic_check.py first)"})
    erac_max_len_ref_a: float = field(
        default=1.5, metadata={"help": "trajectories: at most a·|y*| + b tokens, y* the reference "
                                 "(never fewer than |y*|)"})
    erac_max_len_ref_b: int = field(
        default=5, metadata={"help": "trajectories: at most a·|y*| + b tokens, y* the reference "
                                 "(never fewer than |y*|)"})
    sentence_avg: bool = II("optimization.sentence_avg")


def check_erac_config(cfg):
    check(str(cfg.erac_phase) in PHASES, f"--erac-phase must be one of {', '.join(PHASES)}, got {cfg.erac_phase}")
    check(cfg.erac_samples >= 1, f"--erac-samples must be >= 1, got {cfg.erac_samples}")
    check(cfg.erac_tau >= 0, f"--erac-tau must be >= 0, got {cfg.erac_tau}")
    check(str(cfg.erac_entropy_scale) in ("plain", "l2"),
          f"--erac-entropy-scale must be plain or l2, got {cfg.erac_entropy_scale}")
    check(0 < cfg.erac_target_rate <= 1, f"--erac-target-rate must be in (0, 1], got {cfg.erac_target_rate}")
    check(cfg.erac_var_weight >= 0 and cfg.erac_mle_weight >= 0,
          f"--erac-var-weight and --erac-mle-weight must be >= 0, got {cfg.erac_var_weight}, {cfg.erac_mle_weight}")
    check(0 <= cfg.erac_td_lambda <= 1, f"--erac-td-lambda must be in [0, 1], got {cfg.erac_td_lambda}")
    check(cfg.erac_continuations >= 0, f"--erac-continuations must be >= 0, got {cfg.erac_continuations}")
    check(cfg.erac_max_len_ref_a >= 0 and cfg.erac_max_len_ref_b >= 0,
          f"--erac-max-len-ref-a/-b must be >= 0, got {cfg.erac_max_len_ref_a}, {cfg.erac_max_len_ref_b}")


def erac_losses(q, q_target, lprobs, tokens, rewards, mask, tau, var_weight, continuations=None, lam=0.0,
                entropy_scale="plain"):
    """(critic loss, actor objective, TD error sum, policy entropy sum) summed over
    the trajectories' tokens; ``q`` carries the critic's gradient, ``lprobs`` the
    actor's; ``continuations``: more regressed entries of Q (``critic_loss``'s
    ``extra``, from :meth:`EracCriterion.continuations`); ``lam``: λ of the target;
    ``entropy_scale``: the actor's entropy term as eq. 20 or the authors' (``actor_objective``)."""
    with torch.no_grad():  # π and H(π) once, for the TD target and the logged entropy
        stats = policy_stats(lprobs.detach())
        target = erac_td_targets(q_target, lprobs.detach(), rewards, mask, tau, stats=stats, lam=lam)
    critic, td = critic_loss(q, tokens, target, mask, var_weight, extra=continuations)
    entropy = stats[1].masked_fill(~mask, 0.0).sum()
    return critic, actor_objective(lprobs, q, mask, tau, probs=stats[0], entropy_scale=entropy_scale), td, entropy


@register_criterion("erac", dataclass=EracConfig)
class EracCriterion(CriticPhases, SeqlevelCriterion):
    deprecated_flags = {  # the names before issue 41
        "--erac-max-len-a": "--erac-max-len-ref-a",
        "--erac-max-len-b": "--erac-max-len-ref-b",
    }

    phases = Phases("--erac-phase", "critic", "joint", "critic_batches", "joint training")
    validates_objective = False  # a training step moves the target network and counts critic batches

    def __init__(self, task, cfg: EracConfig):
        check_erac_config(cfg)
        super().__init__(task, cfg)
        self.want_phase = cfg.erac_phase
        self.reward = self.token_reward(cfg.erac_reward, "--erac-reward")
        self.critic = build_critic(cfg, task.target_dictionary)
        self.target_names = register_shadow(self, self.critic, "target")
        self.register_buffer("last_update", torch.tensor(0))
        self.init_phases()

    def on_phase_start(self, model, entering, phase):
        if self.cfg.critic_init_embeddings and self.critic_batches_seen == 0:
            self.critic.init_embeddings(unwrap(model).decoder.embed_tokens.weight.detach().float())
            blend_shadow(self, self.critic, self.target_names, 1.0)

    def _track_updates(self):
        """The target network moves once per optimizer update, at the first forward after it."""
        num_updates = self.num_updates
        if num_updates > int(self.last_update):
            blend_shadow(self, self.critic, self.target_names, self.cfg.erac_target_rate)
        self.last_update.fill_(num_updates)

    # ---- the step ----------------------------------------------------------
    def trajectories(self, model, sample, layout=None):
        """[B·s, T] multinomial trajectories in the task's layout (start symbol,
        forced prefix, end symbol: ``layout``, default the batch's), right-padded
        (no grad); at most a·|y*| + b positions, the forced prefix included."""
        layout = layout if layout is not None else self.output_layout(model, sample)
        last = reference_length_limit(sample["target"], self.cfg.erac_max_len_ref_a, self.cfg.erac_max_len_ref_b,
                                      self.padding_idx)
        return sample_outputs(model, sample["net_input"], n=self.cfg.erac_samples, strategy="multinomial",
                              last_step=last, layout=layout).tokens

    def continuations(self, end_lprobs, tokens, ends, sample, critic_ref, layout=None):
        """``critic_loss``'s ``extra`` for ``--erac-continuations`` k (None when 0): at
        each trajectory's last step ``ends``, the actor's k likeliest tokens other
        than eos and pad (``end_lprobs [N, V]``, π there), each with the exact return
        of taking it and then eos.  The one-epoch Bible critic rated continuing above
        stopping at 99 % of the actor's stops, with no trajectory ever going on past
        its end: eq. 20 then teaches the actor not to stop (README); these are the
        values it lacked.  Trajectories are the sampler's rows, ended by the
        task's end symbol (``layout.eos``; default the dictionary's eos)."""
        k = self.cfg.erac_continuations
        if not k:
            return None
        end, view = (self.eos, None) if layout is None else (layout.eos, layout.view)
        with torch.no_grad():
            banned = torch.tensor([end, self.padding_idx], device=end_lprobs.device)
            scores = end_lprobs.float().index_fill(1, banned, float("-inf"))
            candidates = scores.topk(min(k, scores.size(1) - 2), dim=-1).indices  # [N, k]
            k = candidates.size(1)
            rows = continuation_rows(tokens, ends, candidates, self.padding_idx, end)
            refs = references_of(sample).repeat_interleave(self.cfg.erac_samples * k, dim=0)
            rewards, _ = length_scaled_rewards(self.reward.prefix, rows, refs, critic_ref.repeat_interleave(k, dim=0),
                                               self.padding_idx, view=view)
            index = (torch.arange(tokens.size(0), device=tokens.device).repeat_interleave(k),
                     ends.repeat_interleave(k), candidates.reshape(-1))
            return index, continuation_returns(rewards, ends, k).reshape(-1)

    def training_loss(self, model, sample):
        cfg, pad, target = self.cfg, self.padding_idx, sample["target"]
        batch_size, s = target.size(0), cfg.erac_samples
        joint = not self.in_critic_phase(model)
        self._track_updates()
        layout = self.output_layout(model, sample)  # start, forced prefix, end symbol of the task's rows
        with worker_rng():
            tokens = self.trajectories(model, sample)  # [B·s, T]
        tokens, ref = (pad_right(t, max(tokens.size(1), target.size(1)), pad) for t in (tokens, target))
        mask = unforced(tokens, layout.prefix_len, pad).ne(pad)  # the actor's choices, not the forced prefix
        critic_ref = target.repeat_interleave(s, dim=0)
        with torch.no_grad():
            rewards, scale = length_scaled_rewards(self.reward.prefix, tokens,
                                                   references_of(sample).repeat_interleave(s, dim=0), critic_ref, pad,
                                                   view=layout.view)
        q, q_target, prev = self.critic_values(critic_ref, tokens, layout)
        ref_lprobs, lprobs = self.actor_lprobs(model, sample, ref, tokens, layout, grad=joint)
        ref_nll = token_nll(ref_lprobs, ref, pad).sum()
        # each trajectory's last step (its end symbol) and π there: continuations and the eos log
        ends = tokens.ne(pad).sum(dim=1) - 1
        end_lprobs = lprobs.detach()[torch.arange(tokens.size(0), device=tokens.device), ends]
        continuations = self.continuations(end_lprobs, tokens, ends, sample, critic_ref, layout)
        critic_loss, actor_loss, td, entropy = erac_losses(q, q_target, lprobs, tokens, rewards, mask,
                                                           cfg.erac_tau, cfg.erac_var_weight, continuations,
                                                           lam=cfg.erac_td_lambda,
                                                           entropy_scale=cfg.erac_entropy_scale)
        # sums over tokens, so that batches and workers add up; fairseq divides
        # by the trajectories' tokens (sentences with --sentence-avg)
        traj_tokens = int(mask.sum())
        sample_size = batch_size if self.sentence_avg else traj_tokens
        if joint:  # dai2018: λ_mle added, not mixed
            loss = critic_loss + actor_loss + cfg.erac_mle_weight * ref_nll
        else:
            loss = critic_loss
            self.count_critic_batch()
        extra = {
            "erac_eos_preferred_sum": self.eos_preferred(q, ends, end_lprobs, layout.eos).sum(),
            "erac_td_sum": td.detach(), "erac_q_sum": taken(q.detach().float(), tokens).masked_fill(~mask, 0.0).sum(),
            "erac_entropy_sum": entropy, "erac_actor_sum": actor_loss.detach(), "erac_ntokens": traj_tokens,
            "erac_reward_sum": (rewards.sum(dim=1) / scale).sum(), "erac_nsamples": tokens.size(0)}
        return loss, sample_size, self.stock_logging_output(loss, ref_nll, sample, sample_size, **extra)

    def critic_values(self, critic_ref, tokens, layout):
        """(Q_φ with gradient, Q_φ̄ of the target network or None at λ = 1, decoder input) of the trajectories."""
        bos = layout.bos.repeat_interleave(self.cfg.erac_samples)
        prev = prev_output_tokens_from_target(tokens, self.padding_idx, bos)
        q = self.critic(critic_ref, prev)
        q_target = None  # λ = 1: the target is the sampled return, the target network is not read
        if self.cfg.erac_td_lambda < 1:
            with torch.no_grad():
                q_target = functional_call(self.critic, shadow(self, self.target_names), (critic_ref, prev))
        return q, q_target, prev

    def actor_lprobs(self, model, sample, ref, tokens, layout, grad):
        """(reference [B, T, V], trajectories [B·s, T, V]) log-probs in one teacher-forced pass."""
        batch_size, s, width = ref.size(0), self.cfg.erac_samples, ref.size(1)
        rows = torch.cat([ref.unsqueeze(1), tokens.view(batch_size, s, width)], dim=1).view(-1, width)
        lprobs_all = rows_lprobs(model, sample["net_input"], rows, s + 1, self.padding_idx, layout.bos, grad=grad)
        # split, not indexing: the backward of [:, 0] and [:, 1:] zero-fills a
        # [B, s+1, T, V] gradient for each piece and adds them; split's backward
        # writes one concatenation (erac 4.18x -> 4.09x MLE with the shared π below)
        ref_lprobs, lprobs = lprobs_all.view(batch_size, s + 1, width, -1).split([1, s], dim=1)
        return ref_lprobs.squeeze(1), lprobs.reshape(batch_size * s, width, -1)

    @staticmethod
    def eos_preferred(q, ends, end_lprobs, eos):
        """Where the actor stops: does the critic rate its end at least E_π Q? [N] bool."""
        with torch.no_grad():
            q_end = q.detach()[torch.arange(q.size(0), device=q.device), ends].float()
            return q_end[:, eos] >= (end_lprobs.float().exp() * q_end).sum(dim=-1)

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        for name in ("td", "q", "entropy", "actor"):
            log_mean(logging_outputs, f"erac_{name}", f"erac_{name}_sum", "erac_ntokens", round=4)
        log_mean(logging_outputs, "erac_reward", "erac_reward_sum", "erac_nsamples", round=4)
        log_mean(logging_outputs, "erac_eos_preferred", "erac_eos_preferred_sum", "erac_nsamples", round=3)
