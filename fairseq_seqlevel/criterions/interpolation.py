"""``interpolation``: the interpolation algorithm of tan2019 (Algorithm 1,
Appendix C.2); ``--interpolation-anneal inverse_sigmoid`` is scheduled sampling.

Per target position a branch z ~ Cat(λ1, λ2, λ3) picks the token from the
model, from the reward increments ΔR, or from the reference; the constructed
sequence is trained by maximum likelihood, and λ anneals from the reference
towards the model and the reward.  Schedule, validation signal and the task
layout: docs/criterions/interpolation.md.
"""

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

import torch
from fairseq.criterions import register_criterion
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.logging import metrics
from omegaconf import II

from fairseq_seqlevel.criterions.base import (SeqlevelCriterion, log_mean, reference_length_limit, references_of,
                                              worker_rng)
from fairseq_seqlevel.decoding.layout import OutputLayout
from fairseq_seqlevel.decoding.model import unwrap
from fairseq_seqlevel.decoding.sampler import draw, sample as sample_outputs
from fairseq_seqlevel.decoding.teacher_forcing import prev_output_tokens_from_target, token_nll
from fairseq_seqlevel.errors import ConfigError, check
from fairseq_seqlevel.rewards.increments import next_token_gains
from fairseq_seqlevel.rewards.output_view import viewed

ANNEALS = ("none", "validation", "updates", "inverse_sigmoid")
MODEL, REWARD, REFERENCE = 1, 2, 3  # the values of z


@dataclass
class InterpolationConfig(FairseqDataclass):
    interpolation_lambdas: str = field(
        default="0.04,0,0.96", metadata={"help": "initial λ1,λ2,λ3: P(model token), P(reward token), "
                                         "P(reference token) (Appendix C.2: 0.04,0,0.96)"})
    interpolation_temperature: float = field(default=1.0, metadata={
        "help": "c: model tokens (z = 1) ~ exp(c·log p_θ(·|y_<t, x)), reward tokens (z = 2) ~ exp(c·ΔR(·|y_<t, y*))"})
    interpolation_anneal: ChoiceEnum(list(ANNEALS)) = field(
        default="validation", metadata={"help": "validation: one move when the validation reward stops "
                                        "improving (the paper; fine-tuning a converged model it moves on "
                                        "validation noise: -1.65 BLEU over four Bible epochs, interpolation_e4 in "
                                        "docs/benchmarks.md); updates: one move every "
                                        "--interpolation-anneal-every updates; inverse_sigmoid: scheduled sampling, "
                                        "λ = (1-ε, 0, ε), ε = k/(k+exp(updates/k)); none: fixed λ"})
    interpolation_rollback: bool = field(
        default=False, metadata={"help": "with --interpolation-anneal validation: when a validation does not improve "
                                 "on the best since the last move, restore the model's weights of that best "
                                 "validation before moving (tan2019 C.2: the authors restore the previous "
                                 "checkpoint; the optimizer's moments are kept); the weights are held as one fp32 "
                                 "copy and saved with the checkpoint"})
    interpolation_anneal_every: int = field(
        default=1000, metadata={"help": "updates between moves (--interpolation-anneal updates)"})
    interpolation_anneal_step: float = field(default=0.06, metadata={
        "help": "mass one move takes from λ3, until λ3 = 0 (from the default λ: (0.28, 0.72, 0) after 16 moves)"})
    interpolation_reward_moves: int = field(
        default=4, metadata={"help": "moves to λ2 after each move to λ1 (Appendix C.2: 4)"})
    interpolation_ss_k: float = field(default=500.0, metadata={"help": "k of --interpolation-anneal inverse_sigmoid"})
    interpolation_reward: Optional[str] = field(
        default=None, metadata={"help": "R of ΔR and of the validation signal (at the task's --reward-level), "
                                "every reference: default the task's --reward (bleu in a stock task); ΔR is "
                                "always computed on target tokens"})
    interpolation_max_len_ref_a: float = field(
        default=1.2, metadata={"help": "at most a·|y*| + b tokens, y* the reference (never fewer than |y*|)"})
    interpolation_max_len_ref_b: int = field(
        default=10, metadata={"help": "at most a·|y*| + b tokens, y* the reference (never fewer than |y*|)"})
    sentence_avg: bool = II("optimization.sentence_avg")
    # --interpolation-rollback writes the model's weights: fairseq's --fp16 / --bf16 keep fp32 master
    # copies in the optimizer that would overwrite them at the next step
    fp16: bool = II("common.fp16")
    bf16: bool = II("common.bf16")
    memory_efficient_fp16: bool = II("common.memory_efficient_fp16")
    memory_efficient_bf16: bool = II("common.memory_efficient_bf16")


def parse_lambdas(text: str) -> Tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in str(text).split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 0 or abs(sum(values) - 1.0) > 1e-6:
        raise ConfigError(f"--interpolation-lambdas must be three non-negative numbers summing to 1 "
                          f"(λ1,λ2,λ3), got {text!r}")
    return values


def check_interpolation_config(cfg):
    parse_lambdas(cfg.interpolation_lambdas)
    c, every, step = cfg.interpolation_temperature, cfg.interpolation_anneal_every, cfg.interpolation_anneal_step
    check(c > 0, f"--interpolation-temperature must be > 0, got {c}")
    check(str(cfg.interpolation_anneal) in ANNEALS,
          f"--interpolation-anneal must be one of {', '.join(ANNEALS)}, got {cfg.interpolation_anneal}")
    check(every >= 1, f"--interpolation-anneal-every must be >= 1, got {every}")
    check(0 < step <= 1, f"--interpolation-anneal-step must be in (0, 1], got {step}")
    check(cfg.interpolation_reward_moves >= 0,
          f"--interpolation-reward-moves must be >= 0, got {cfg.interpolation_reward_moves}")
    check(cfg.interpolation_ss_k >= 1, f"--interpolation-ss-k must be >= 1, got {cfg.interpolation_ss_k}")
    check(not cfg.interpolation_rollback or str(cfg.interpolation_anneal) == "validation",
          "--interpolation-rollback needs --interpolation-anneal validation (it acts on a validation's result)")
    master_copies = (getattr(cfg, "fp16", False) or getattr(cfg, "bf16", False)) and not (
        getattr(cfg, "memory_efficient_fp16", False) or getattr(cfg, "memory_efficient_bf16", False))
    check(not (cfg.interpolation_rollback and master_copies),
          "--interpolation-rollback cannot restore weights under --fp16/--bf16 (the optimizer's fp32 master "
          "copy would overwrite them): use --amp or --memory-efficient-fp16/--memory-efficient-bf16")
    a, b = cfg.interpolation_max_len_ref_a, cfg.interpolation_max_len_ref_b
    check(a >= 0 and b >= 0, f"--interpolation-max-len-ref-a and -b must be >= 0, got {a}, {b}")


# ---- the schedule (pure) ----------------------------------------------------

def annealed_lambdas(initial: Sequence[float], moves: int, step: float = 0.06,
                     reward_moves: int = 4) -> Tuple[float, float, float]:
    """λ after ``moves`` moves: move k (from 0) adds ``step`` to λ1 when
    k % (reward_moves + 1) == 0, else to λ2, taking it from λ3 (the last move
    takes what is left; λ3 never goes below 0)."""
    l1, l2, l3 = (float(v) for v in initial)
    for k in range(moves):  # at most 1/step moves do anything
        take = min(step, l3)
        if take <= 1e-12:
            break
        if k % (reward_moves + 1) == 0:
            l1 += take
        else:
            l2 += take
        l3 = max(l3 - take, 0.0)
    return l1, l2, l3


def inverse_sigmoid_lambdas(num_updates: int, k: float) -> Tuple[float, float, float]:
    """Scheduled sampling: the reference with probability ε = k / (k + exp(i / k)),
    the model's own token otherwise (Bengio et al. 2015; tan2019 C.2 calls ε the
    model's probability, which would start at ~1: we follow Bengio et al.)."""
    eps = 1.0 / (1.0 + math.exp(min(num_updates / k - math.log(k), 700.0)))
    return 1.0 - eps, 0.0, eps


def after_validation(state: dict, reward: float) -> dict:
    """One validation result: a move when it does not improve on the best
    reward since the last move (then the next validation starts afresh, as in
    the authors' code); the new state (``moves`` grew: a move; else ``best`` is
    this validation's reward, a new best)."""
    best = state.get("best")
    if best is not None and not reward > best:
        return {"moves": state["moves"] + 1, "best": None}
    return {"moves": state["moves"], "best": reward}


# ---- the constructed sequences -----------------------------------------------

def draw_branches(lambdas: Sequence[float], shape, device) -> torch.Tensor:
    """z ∈ {1, 2, 3} of every (row, step), i.i.d. ~ Cat(λ)."""
    u = torch.rand(shape, device=device)
    l1, l2 = float(lambdas[0]), float(lambdas[1])
    z = torch.full(shape, REFERENCE, dtype=torch.long, device=device)
    z.masked_fill_(u < l1 + l2, REWARD)
    z.masked_fill_(u < l1, MODEL)
    return z


def interpolation_choose(z, target, refs, gain_reward, temperature, banned, pad, eos, num_tokens):
    """The sampler's ``choose`` rule of Algorithm 1 (lines 5-12) for rows whose
    branches are ``z [B, T]``, reference ``target [B, T*]`` and all references
    ``refs [B, R, T']``; ``banned``: ids the reward branch never picks; ``eos``:
    the task's end symbol.  ``step`` is the output position (the sampler does
    not ask at the task's forced positions); ``gain_reward`` gets the tokens so
    far as the sampler has them, forced prefix included (a
    :class:`~fairseq_seqlevel.rewards.output_view.ViewedReward` drops it)."""
    model_possible, reward_possible = (bool(z.eq(branch).any()) for branch in (MODEL, REWARD))

    def choose(step, lprobs, prefix, rows):
        zs = z[rows, step]
        if model_possible:  # z = 1 (exp(-inf) = 0 keeps the limits)
            chosen = draw((temperature * lprobs).softmax(dim=-1))
        else:
            chosen = torch.full_like(zs, eos)
        truth = target[rows, step] if step < target.size(1) else torch.full_like(zs, eos)
        chosen = torch.where(zs.eq(REFERENCE), truth.masked_fill(truth.eq(pad), eos), chosen)
        if reward_possible:
            sel = zs.eq(REWARD).nonzero().squeeze(1)
            if sel.numel():
                gains = next_token_gains(gain_reward, prefix.index_select(0, sel),
                                         refs.index_select(0, rows.index_select(0, sel)), pad, num_tokens)
                allowed = ~torch.isneginf(lprobs.index_select(0, sel))
                allowed[:, banned] = False
                logits = (temperature * gains).masked_fill(~allowed, -math.inf)
                chosen = chosen.index_copy(0, sel, draw(logits.softmax(dim=-1)))
        return chosen

    return choose


def reward_branch_banned(banned, layout: Optional[OutputLayout], eos: int):
    """The ids the reward branch never picks in ``layout``: ``banned`` (specials
    but the dictionary's ``eos``) less the task's end symbol, plus the symbols
    the task strips from its output (ΔR cannot see them)."""
    if layout is None or (layout.eos == eos and not layout.view.strip):
        return banned
    banned = torch.as_tensor(banned, dtype=torch.long)
    strip = torch.tensor(layout.view.strip, dtype=torch.long, device=banned.device)
    return torch.cat([banned[banned.ne(layout.eos)], strip]).unique()


def construct_sequences(model, sample, lambdas, gain_reward, temperature, banned, max_len_a, max_len_b,
                        layout: Optional[OutputLayout] = None):
    """(tokens [B, T] right-padded, ending with the end symbol, z [B, T] of each
    token) built by Algorithm 1 with the shared sampler (no gradients), in the
    task's ``layout`` (None: eos starts and ends a row): its forced prefix
    positions hold the target's tokens, z = 3 (REFERENCE)."""
    target, refs = sample["target"], references_of(sample)
    dictionary = unwrap(model).decoder.dictionary
    pad, eos = dictionary.pad(), dictionary.eos()
    if layout is not None:
        gain_reward = viewed(gain_reward, layout.view)
        banned = reward_branch_banned(banned, layout, eos)
        eos = layout.eos
    last = reference_length_limit(target, max_len_a, max_len_b, pad)
    z = draw_branches(lambdas, (target.size(0), int(last.max()) + 1 if target.numel() else 1), target.device)
    choose = interpolation_choose(z, target, refs, gain_reward, temperature, banned, pad, eos, len(dictionary))
    out = sample_outputs(model, sample["net_input"], n=1, choose=choose, last_step=last, min_len=1, layout=layout)
    tokens = out.tokens
    z = z[:, :tokens.size(1)]
    forced = 0 if layout is None else layout.prefix_len
    if forced:  # the sampler forced the task's prefix there: the target's tokens, no branch chose them
        z = z.clone()
        z[:, :forced] = REFERENCE
    return tokens, z.masked_fill(tokens.eq(pad), 0)


def teacher_forced_nll(model, net_input, tokens, pad, eos):
    """(Σ token NLL, [B, T] NLL) of ``tokens`` in one ``model(...)`` pass, as
    fairseq's ``label_smoothed_cross_entropy`` computes it with ε = 0;
    ``eos``: the decoder's start symbol, an int or a LongTensor ``[B]`` (the
    layout's ``bos``)."""
    prev = prev_output_tokens_from_target(tokens, pad, eos)
    net_output = model(**{**net_input, "prev_output_tokens": prev})
    lprobs = model.get_normalized_probs(net_output, log_probs=True)
    nll = token_nll(lprobs, tokens, pad)
    return nll.sum(), nll


@register_criterion("interpolation", dataclass=InterpolationConfig)
class InterpolationCriterion(SeqlevelCriterion):
    deprecated_flags = {  # the names before issue 41
        "--interp-anneal": "--interpolation-anneal",
        "--interp-anneal-every": "--interpolation-anneal-every",
        "--interp-anneal-step": "--interpolation-anneal-step",
        "--interp-lambdas": "--interpolation-lambdas",
        "--interp-max-len-a": "--interpolation-max-len-ref-a",
        "--interp-max-len-b": "--interpolation-max-len-ref-b",
        "--interp-reward": "--interpolation-reward",
        "--interp-reward-moves": "--interpolation-reward-moves",
        "--interp-ss-k": "--interpolation-ss-k",
        "--interp-temperature": "--interpolation-temperature",
    }

    validates_objective = False  # a training step consumes the validation result (the schedule)

    def __init__(self, task, cfg: InterpolationConfig):
        check_interpolation_config(cfg)
        if cfg.interpolation_anneal == "validation" and not getattr(task, "hands_validation_reward", False):
            raise ConfigError("--interpolation-anneal validation reads the validation reward that --task "
                              "seqlevel_translation hands the criterion; with this task use --interpolation-anneal "
                              "updates, inverse_sigmoid or none")
        super().__init__(task, cfg)
        self.initial_lambdas = parse_lambdas(cfg.interpolation_lambdas)
        # ΔR compares token ids (next_token_gains needs a token-level reward)
        self.gain_reward = self.token_reward(cfg.interpolation_reward, "--interpolation-reward")
        if cfg.interpolation_anneal == "validation":  # the task scores its validation decode with it (valid_step)
            self.validation_reward = self.resolve_reward(cfg.interpolation_reward, "--interpolation-reward",
                                                         default="bleu")
        self.register_buffer("banned_ids", torch.tensor(
            [i for i in self.special_ids.tolist() if i != self.eos], dtype=torch.long), persistent=False)
        self.schedule = {"moves": 0, "best": None}
        self._validation = [0.0, 0]  # summed over a validation's batches and workers, until the next step
        self.best_weights = None  # --interpolation-rollback: fp32 weights of the best validation since the last move

    def add_validation_reward(self, total, count):
        """The task's hook (seqlevel_translation.reduce_metrics): a validation
        batch's rewards of the task's greedy decode, summed over workers."""
        self._validation[0] += total
        self._validation[1] += count

    # ---- schedule state (saved through compat.keep_criterion_training_state)
    def training_state_dict(self):
        state = dict(self.schedule)
        if self.best_weights is not None:
            state["best_weights"] = self.best_weights
        return state

    def load_training_state_dict(self, state):
        self.schedule = {"moves": int(state.get("moves", 0)), "best": state.get("best")}
        self.best_weights = state.get("best_weights")

    def current_lambdas(self):
        cfg = self.cfg
        if cfg.interpolation_anneal == "inverse_sigmoid":
            return inverse_sigmoid_lambdas(self.num_updates, cfg.interpolation_ss_k)
        if cfg.interpolation_anneal == "updates":
            moves = self.num_updates // cfg.interpolation_anneal_every
        elif cfg.interpolation_anneal == "validation":
            moves = self.schedule["moves"]
        else:
            moves = 0
        return annealed_lambdas(self.initial_lambdas, moves, cfg.interpolation_anneal_step,
                                cfg.interpolation_reward_moves)

    def construct(self, model, sample, lambdas):
        """(tokens, z) of Algorithm 1 for the batch (no gradients), in the task's layout."""
        target = sample["target"]
        if lambdas[2] >= 1.0:  # only reference tokens: the sequence is y*
            return target, target.ne(self.padding_idx).long() * REFERENCE
        return construct_sequences(model, sample, lambdas, self.gain_reward, self.cfg.interpolation_temperature,
                                   self.banned_ids, self.cfg.interpolation_max_len_ref_a,
                                   self.cfg.interpolation_max_len_ref_b,
                                   layout=self.output_layout(model, sample))

    def _consume_validation(self, model):
        """The first step after a validation: the schedule's move, and with --interpolation-rollback the
        weights it was validated with (a new best) kept, or those of the best restored (a move). The
        validation reward is summed over workers, so every worker does the same."""
        total, count = self._validation
        if count > 0:
            self._validation = [0.0, 0]
            moves = self.schedule["moves"]
            self.schedule = after_validation(self.schedule, total / count)
            if self.cfg.interpolation_rollback:
                params = dict(unwrap(model).named_parameters())
                with torch.no_grad():
                    if self.schedule["moves"] == moves:  # a new best: these weights were validated
                        self.best_weights = {n: p.detach().float().clone() for n, p in params.items()}
                    elif self.best_weights is not None:  # no better than the best: back to it, then move
                        for name, value in self.best_weights.items():
                            params[name].copy_(value)
                        self.best_weights = None  # the next validation starts afresh (after_validation)

    def training_loss(self, model, sample):
        pad, target = self.padding_idx, sample["target"]
        layout = self.output_layout(model, sample)
        self._consume_validation(model)
        lambdas = self.current_lambdas()
        with worker_rng():
            tokens, z = self.construct(model, sample, lambdas)
        loss, _ = teacher_forced_nll(model, sample["net_input"], tokens, pad, layout.bos)
        ntokens = int(tokens.ne(pad).sum()) if tokens is not target else sample["ntokens"]
        sample_size = target.size(0) if self.sentence_avg else ntokens
        return loss, sample_size, {
            "loss": loss.data, "nll_loss": loss.data, "ntokens": ntokens, "nsentences": target.size(0),
            "sample_size": sample_size, "interp_lambda1_sum": lambdas[0], "interp_lambda2_sum": lambdas[1],
            "interp_lambda3_sum": lambdas[2], "interp_nforwards": 1,
            "interp_model_tokens": int(z.eq(MODEL).sum()), "interp_reward_tokens": int(z.eq(REWARD).sum()),
            "interp_reference_tokens": int(z.eq(REFERENCE).sum()),
        }

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        for i in (1, 2, 3):
            log_mean(logging_outputs, f"interp_lambda{i}", f"interp_lambda{i}_sum", "interp_nforwards", round=4)
        ntok = sum(log.get(f"interp_{b}_tokens", 0) for log in logging_outputs for b in ("model", "reward", "reference"))
        if ntok > 0:
            for branch in ("model", "reward", "reference"):
                share = sum(log.get(f"interp_{branch}_tokens", 0) for log in logging_outputs) / ntok
                metrics.log_scalar(f"interp_from_{branch}", share, ntok, round=4)
        count = sum(log.get("_criterion_reward_count", 0) for log in logging_outputs)
        if count > 0:  # the task's validation decode, scored with --interpolation-reward (the schedule's signal)
            total = sum(log.get("_criterion_reward_sum", 0.0) for log in logging_outputs)
            metrics.log_scalar("interp_valid_reward", total / count, count, round=4)
