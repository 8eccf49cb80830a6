"""``vaml``: value augmented maximum likelihood (dai2018 §4.1).

Phase ``q`` trains the reference-reading critic Q_φ by soft Q-learning
(eq. 16) on the reference and its RAML samples; phase ``actor`` trains the
model towards (1 − α)·one-hot + α·softmax(Q_φ/τ) along the samples (eq. 17)
with the critic fixed.  Details and the task layout: docs/criterions/vaml.md.
"""

from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq.criterions import register_criterion
from fairseq.dataclass import ChoiceEnum
from omegaconf import II
from torch.func import functional_call

from fairseq_seqlevel.criterions.base import (SeqlevelCriterion, log_mean, reference_and_samples, references_of,
                                              unforced, worker_rng)
from fairseq_seqlevel.criterions.critic_phases import CriticPhases, Phases
from fairseq_seqlevel.critics import (blend_shadow, length_scaled_rewards, register_shadow, shadow, soft_q_targets,
                                      taken)
from fairseq_seqlevel.critics.config import CriticConfig, build_critic
from fairseq_seqlevel.decoding.teacher_forcing import prev_output_tokens_from_target, rows_lprobs, token_nll
from fairseq_seqlevel.errors import check
from fairseq_seqlevel.perturbation import vocab as raml_vocab
from fairseq_seqlevel.perturbation.samplers import hamming_sampler

PHASES = ("q", "actor")


@dataclass
class VamlConfig(CriticConfig):
    vaml_phase: ChoiceEnum(list(PHASES)) = field(
        default="q", metadata={"help": "q: train the critic by soft Q-learning; actor: train the model "
                               "towards softmax(Q/τ) with the critic fixed (start from a q checkpoint)"})
    vaml_tau: float = field(default=0.4, metadata={"help": "τ of the soft values and of softmax(Q/τ) (the "
                                                          "authors' train_q.py; the paper gives none)"})
    vaml_alpha: float = field(default=0.2, metadata={
        "help": "α: weight of softmax(Q/τ) against the one-hot token, actor targets (1 - α)·one-hot + α·softmax(Q/τ) "
                "(0.2: the authors' train_vaml.py)"})
    vaml_samples: int = field(default=4, metadata={"help": "RAML samples per reference (Hamming, V_batch; 4: the "
                                                           "authors' train_vaml.py)"})
    vaml_sample_temperature: float = field(default=0.1, metadata={"help": "temperature of the Hamming RAML sampler"})
    vaml_actor_reference: bool = field(
        default=False, metadata={"help": "actor phase: train on y* too, one row beside the L samples of each "
                                 "source (the mean over L + 1 rows), as the authors' train_vaml.py does"})
    vaml_reward: Optional[str] = field(
        default=None, metadata={"help": "R of the per-step rewards (prefix values on target tokens): default "
                                "the task's --reward (bleu in a stock task)"})
    sentence_avg: bool = II("optimization.sentence_avg")


def check_vaml_config(cfg):
    check(str(cfg.vaml_phase) in PHASES, f"--vaml-phase must be one of {', '.join(PHASES)}, got {cfg.vaml_phase}")
    check(cfg.vaml_tau > 0, f"--vaml-tau must be > 0, got {cfg.vaml_tau}")
    check(0 <= cfg.vaml_alpha <= 1, f"--vaml-alpha must be in [0, 1], got {cfg.vaml_alpha}")
    check(cfg.vaml_samples >= 1, f"--vaml-samples must be >= 1, got {cfg.vaml_samples}")
    check(cfg.vaml_sample_temperature > 0,
          f"--vaml-sample-temperature must be > 0, got {cfg.vaml_sample_temperature}")


def soft_q_loss(q, tokens, rewards, mask, tau):
    """Σ_t (Q(ỹ_<t, ỹ_t) − r_t − V(ỹ_≤t))² (eq. 16), gradient through both sides."""
    residual = taken(q, tokens) - soft_q_targets(q, tokens, rewards, mask, tau)
    # where, not masked_fill after the square: pad steps may hold -inf, whose
    # gradient times 0 would be nan
    return torch.where(mask, residual, residual.new_zeros(())).pow(2).sum()


def value_targets_loss(lprobs, q, tokens, mask, alpha, tau, pad):
    """Σ_t CE((1 − α)·one-hot(ỹ_t) + α·softmax(Q/τ), p_θ) and the token NLL Σ_t −log p_θ(ỹ_t)."""
    lprobs = lprobs.float()
    nll = token_nll(lprobs, tokens.masked_fill(~mask, pad), pad)
    loss = (1.0 - alpha) * nll if alpha < 1 else torch.zeros_like(nll)
    if alpha > 0:
        soft = torch.softmax(q.float() / tau, dim=-1)
        soft = torch.where(mask.unsqueeze(-1), soft, soft.new_zeros(()))  # pad rows: no target
        ce = -(soft * lprobs.masked_fill(soft.eq(0), 0.0)).sum(dim=-1)
        loss = loss + alpha * ce
    return loss.sum(), nll.sum()


@register_criterion("vaml", dataclass=VamlConfig)
class VamlCriterion(CriticPhases, SeqlevelCriterion):
    phases = Phases("--vaml-phase", "q", "actor", "q_batches", "the actor phase")
    validates_objective = False  # a training step counts critic batches and starts phases

    def __init__(self, task, cfg: VamlConfig):
        check_vaml_config(cfg)
        super().__init__(task, cfg)
        self.want_phase = cfg.vaml_phase
        self.reward = self.token_reward(cfg.vaml_reward, "--vaml-reward")
        self.critic = build_critic(cfg, task.target_dictionary)
        self.snapshot_names = register_shadow(self, self.critic, "fixed")
        self.init_phases()
        # never actions: their values stay out of V and of softmax(Q/τ) (unk can be a reference token)
        unk = task.target_dictionary.unk()
        self.register_buffer("non_actions", torch.tensor(
            [i for i in self.special_ids.tolist() if i not in (self.eos, unk)], dtype=torch.long), persistent=False)

    def on_phase_start(self, model, entering, phase):
        if phase == 2 and entering:
            blend_shadow(self, self.critic, self.snapshot_names, 1.0)  # the critic the actor phase learns from

    def q_values(self, refs, prev, fixed, end=None):
        """Q ``[N, T, V]`` (fp32), -inf for the never-actions; ``end``: the task's
        end symbol, an action whatever its id (default the dictionary's eos)."""
        non_actions = self.non_actions
        if end is not None and end != self.eos:
            non_actions = non_actions[non_actions.ne(end)]
        if fixed:
            with torch.no_grad():
                q = functional_call(self.critic, shadow(self, self.snapshot_names), (refs, prev))
        else:
            q = self.critic(refs, prev)
        return q.float().index_fill(-1, non_actions, float("-inf"))

    def draw_samples(self, sample, layout):
        """``--vaml-samples`` Hamming samples of each reference ``[B·L, T]`` (no grad):
        the task's forced prefix (``layout``: language tokens) kept as it is, the
        rest up to the task's end symbol perturbed, with substitutes from the
        batch's references (their forced prefixes and the end symbol excluded)."""
        target, prefix_len = sample["target"], layout.prefix_len
        body = target[:, prefix_len:]
        never = self.special_ids
        if layout.eos != self.eos:  # mBART's [lang]: it ends a row, it is not a word
            never = torch.cat([never, never.new_tensor([layout.eos])])
        with torch.no_grad(), worker_rng():
            drawn = hamming_sampler(body, self.padding_idx, layout.eos, self.cfg.vaml_samples,
                                    self.cfg.vaml_sample_temperature, raml_vocab.batch_vocab(body, never))
        if not prefix_len:
            return drawn.tokens
        return torch.cat([layout.prefix.repeat_interleave(self.cfg.vaml_samples, dim=0), drawn.tokens], dim=1)

    def training_loss(self, model, sample):
        pad, target, cfg = self.padding_idx, sample["target"], self.cfg
        batch_size, L = target.size(0), cfg.vaml_samples
        actor = not self.in_critic_phase(model)
        layout = self.output_layout(model, sample)  # start, forced prefix, end symbol of the task's rows
        samples = self.draw_samples(sample, layout)
        if actor and not cfg.vaml_actor_reference:
            rows, per_source = samples, L
        else:  # the reference and its corruptions
            rows, per_source = reference_and_samples(target, samples, L, pad), L + 1
        mask = unforced(rows, layout.prefix_len, pad).ne(pad)  # the model's choices, not the forced prefix
        refs_for_critic = target.repeat_interleave(per_source, dim=0)
        prev = prev_output_tokens_from_target(rows, pad, layout.bos.repeat_interleave(per_source))
        q = self.q_values(refs_for_critic, prev, fixed=actor, end=layout.eos)
        extra = {"vaml_ntokens": int(mask.sum()), "vaml_q_sum": taken(q.detach(), rows).masked_fill(~mask, 0.0).sum()}
        if actor:
            loss, nll, sample_size = self.actor_loss(model, sample, rows, per_source, q, mask, layout)
        else:
            with torch.no_grad():
                rewards, scale = length_scaled_rewards(
                    self.reward.prefix, rows, references_of(sample).repeat_interleave(per_source, dim=0),
                    refs_for_critic, pad, view=layout.view)
            loss = soft_q_loss(q, rows, rewards, mask, cfg.vaml_tau)
            extra.update(vaml_td_sum=loss.detach(), vaml_reward_sum=(rewards.sum(dim=1) / scale).sum(),
                         vaml_nrows=rows.size(0))
            nll = None  # the actor is not run in this phase: no nll_loss (it read 0, ppl 1)
            self.count_critic_batch()
            sample_size = batch_size if self.sentence_avg else int(mask.sum())
        return loss, sample_size, self.stock_logging_output(loss, nll, sample, sample_size, **extra)

    def actor_loss(self, model, sample, rows, per_source, q, mask, layout):
        """(eq. 17 loss, logged NLL, sample size) of the actor phase: the mean over a reference's rows."""
        pad, prefix_len, target = self.padding_idx, layout.prefix_len, sample["target"]
        lprobs = rows_lprobs(model, sample["net_input"], rows, per_source, pad, layout.bos)
        loss, nll = value_targets_loss(lprobs, q, rows, mask, self.cfg.vaml_alpha, self.cfg.vaml_tau, pad)
        if prefix_len:  # the logged nll_loss: of whole rows, per target token as fairseq's
            with torch.no_grad():
                nll = nll + token_nll(lprobs.detach()[:, :prefix_len].float(), rows[:, :prefix_len], pad).sum()
        loss, nll = loss / per_source, nll / per_source
        # weight 0: every critic parameter in the graph for a data-parallel wrapper
        loss = loss + 0.0 * sum(p.sum() for p in self.critic.parameters())
        sample_size = (target.size(0) if self.sentence_avg else sample["ntokens"] if not prefix_len
                       else int(unforced(target, prefix_len, pad).ne(pad).sum()))
        return loss, nll, sample_size

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        log_mean(logging_outputs, "vaml_td", "vaml_td_sum", "vaml_ntokens", round=4)
        log_mean(logging_outputs, "vaml_q", "vaml_q_sum", "vaml_ntokens", round=4)
        log_mean(logging_outputs, "vaml_reward", "vaml_reward_sum", "vaml_nrows", round=4)
