"""Value targets and losses of dai2018, as pure functions of padded tensors.

Layout, for N trajectories of at most T tokens (eos-terminated, right-padded):
``q [N, T, V]`` where ``q[:, t]`` holds Q(ŷ_{≤t-1}, ·), the values of every
token after the first t tokens (what :class:`ReferenceCritic` returns for
fairseq's decoder input); ``mask [N, T]`` marks the real tokens, the last of
each row being eos.  A step t is terminal when it is the row's last token:
eos ends the episode, so it has no future value (eq. 8 / the MDP of
Corollary 1).  ``q`` may hold -inf for tokens that are not allowed in a state.
"""

import math

import torch
from torch import Tensor


def taken(q: Tensor, tokens: Tensor) -> Tensor:
    """Q(ŷ_<t, ŷ_t) ``[N, T]``: the value of each trajectory's own token."""
    return q.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def step_rewards(prefix_rewards: Tensor, mask: Tensor, scale: Tensor = None) -> Tensor:
    """r_t = R(ŷ_≤t) − R(ŷ_<t) ``[N, T]`` (eq. 13) from ``prefix_rewards[:, t] =
    R(ŷ_≤t)`` (R of the empty prefix is 0), times ``scale [N]`` (dai2018 §6.1:
    sentence BLEU scaled by the reference length); 0 at pad."""
    prefix_rewards = prefix_rewards.float()
    before = torch.cat([prefix_rewards.new_zeros(prefix_rewards.size(0), 1), prefix_rewards[:, :-1]], dim=1)
    r = prefix_rewards - before
    if scale is not None:
        r = r * scale.float().unsqueeze(1)
    return r.masked_fill(~mask, 0.0)


def reference_lengths(reference: Tensor, pad: int, view=None) -> Tensor:
    """|y*| ``[N]`` (at least 1): the tokens of each ``reference`` row before its
    eos; with the task's ``view`` (an :class:`~fairseq_seqlevel.rewards.output_view.OutputView`),
    the tokens that the task shows before its end symbol (no forced prefix, no
    ``[lang]`` end symbol of mBART's ``</s> [lang]``)."""
    if view is None or view.identity:
        return (reference.ne(pad).sum(dim=1) - 1).clamp(min=1)
    shown = view(reference)
    before_end = shown.ne(pad) & shown.eq(view.eos).long().cumsum(dim=1).eq(0)
    return before_end.sum(dim=1).clamp(min=1)


def credit_forced(rewards: Tensor, rows: Tensor, prefix_len: int, pad: int) -> Tensor:
    """``rewards [N, T]`` with the rewards of the first ``prefix_len`` positions (a
    forced prefix, which the model does not choose) added to the first chosen
    step and 0 there: the return from the first choice is R(ŷ), as without a
    prefix (:func:`step_rewards` takes R of the empty output as 0, while a
    viewed reward gives the forced positions R of the empty output)."""
    if prefix_len == 0:
        return rewards
    rewards = rewards.clone()
    if rewards.size(1) > prefix_len:
        rewards[:, prefix_len] += rewards[:, :prefix_len].sum(dim=1)
    rewards[:, :prefix_len] = 0.0
    return rewards.masked_fill(rows.eq(pad), 0.0)


def length_scaled_rewards(prefix_reward, rows: Tensor, refs: Tensor, reference: Tensor, pad: int, view=None):
    """(r_t ``[N, T]``, scale ``[N]``): per-step rewards of ``rows`` against all
    ``refs`` from ``prefix_reward(rows, refs) -> [N, T]``, times the length of
    ``reference`` in tokens before eos (dai2018 §6.1).  ``view``: the task's
    :class:`~fairseq_seqlevel.rewards.output_view.OutputView` of the rows (None:
    fairseq's plain layout): the length is that of the shown reference
    (:func:`reference_lengths`) and the forced prefix positions carry no reward
    (:func:`credit_forced`)."""
    scale = reference_lengths(reference, pad, view)
    rewards = step_rewards(prefix_reward(rows, refs), rows.ne(pad), scale)
    return credit_forced(rewards, rows, 0 if view is None else view.prefix_len, pad), scale


def _next(values: Tensor, mask: Tensor) -> Tensor:
    """``values [N, T]`` of the state after each step, 0 after the last token."""
    shifted = torch.cat([values[:, 1:], values.new_zeros(values.size(0), 1)], dim=1)
    has_next = torch.cat([mask[:, 1:], mask.new_zeros(mask.size(0), 1)], dim=1) & mask
    return shifted.masked_fill(~has_next, 0.0)


def soft_values(q: Tensor, tau: float) -> Tensor:
    """V(s) = τ·log Σ_w exp(Q(s, w)/τ) ``[N, T]`` (eq. 14); the max at τ = 0."""
    if tau == 0:
        return q.max(dim=-1).values
    return tau * torch.logsumexp(q / tau, dim=-1)


def soft_q_targets(q: Tensor, tokens: Tensor, rewards: Tensor, mask: Tensor, tau: float) -> Tensor:
    """VAML's one-step look-ahead target Q̂ = r_t + V_φ(ŷ_≤t) ``[N, T]`` (eq. 16),
    V of the next state 0 at the terminal step; gradients flow through V (no
    target network, "through both sides")."""
    return rewards + _next(soft_values(q, tau), mask)


def _zero_nan(products: Tensor) -> Tensor:
    """0 where π(w)·x(w) is 0·(±inf) (a token π cannot emit, or one Q forbids), in
    place: one pass and no new [N, T, V] tensor, unlike a mask and masked_fill."""
    return products.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)


def policy_stats(policy_lprobs: Tensor):
    """(π ``[N, T, V]``, H(π) ``[N, T]``) from the actor's log-probs, 0·log 0 = 0."""
    lprobs = policy_lprobs.float()
    probs = lprobs.exp()
    return probs, -_zero_nan(probs * lprobs).sum(dim=-1)


def lambda_sums(x: Tensor, lam: float) -> Tensor:
    """Σ_{k≥t} λ^(k−t)·x_k ``[N, T]`` for every t (x 0 after each row's end): the
    backward recursion G_t = x_t + λ·G_{t+1} as one [T, T] product, no loop."""
    steps = torch.arange(x.size(1), device=x.device)
    gap = steps.unsqueeze(0) - steps.unsqueeze(1)  # [t, k] = k − t
    weights = torch.full((), float(lam), device=x.device).pow(gap.clamp(min=0)).masked_fill(gap < 0, 0.0)
    return x.float() @ weights.t()


def erac_td_targets(q_target: Tensor, policy_lprobs: Tensor, rewards: Tensor, mask: Tensor, tau: float,
                    stats=None, lam: float = 0.0) -> Tensor:
    """ERAC's TD target ``[N, T]`` (eq. 19):
    Q̂ = r_t + τ·H(π(·|ŷ_≤t)) + Σ_w π(w|ŷ_≤t)·Q_φ̄(ŷ_≤t, w),
    the future terms 0 at the terminal step; ``q_target`` from the target
    network, ``policy_lprobs [N, T, V]`` the actor's log-probs at every state
    (same layout as q), ``stats`` their :func:`policy_stats` if already
    computed.  τ = 0 is the actor-critic target of Bahdanau et al.

    ``lam`` > 0 (not in dai2018): the λ-return of the same soft value along the
    sampled trajectory (the actor's own samples, so on-policy),
    Q̂_t = r_t + τ·H_{t+1} + (1−λ)·Σ_w π·Q_φ̄(ŷ_≤t, w) + λ·Q̂_{t+1};
    λ = 0 is eq. 19, λ = 1 the sampled return-to-go plus the later states'
    entropy bonus, with no bootstrap from φ̄."""
    probs, entropy = stats if stats is not None else policy_stats(policy_lprobs)
    bonus = tau * entropy if tau else torch.zeros_like(entropy)
    if lam == 1:  # no bootstrap: ``q_target`` may be None (the caller skips its forward)
        return lambda_sums(rewards + _next(bonus, mask), 1.0)
    expected = _zero_nan(probs * q_target.float()).sum(dim=-1)
    if not lam:
        return rewards + _next(expected + bonus, mask)
    return lambda_sums(rewards + _next(bonus + (1.0 - lam) * expected, mask), lam)


class _CriticLoss(torch.autograd.Function):
    """Σ_t mask·(Q(s_t, ŷ_t) − Q̂_t)² + λ·Σ_t mask·Σ_w (Q_w − mean Q)² (+ the squared
    residuals of ``extra`` entries) of ``q`` with its derivative written out:
    2λ·mask·(Q − mean Q), plus 2·(Q(ŷ_t) − Q̂_t) at the taken token (and at each
    extra entry).  Autograd of the expression saves the centered values, runs the
    square's and the mean's backward over [N, T, V] and adds the gather's
    zero-filled [N, T, V] gradient to theirs; this builds the one gradient in place."""

    @staticmethod
    def forward(ctx, q, tokens, target, mask, var_weight, extra_index, extra_target):
        qf = q.detach().float()
        residual = (taken(qf, tokens) - target.float()).masked_fill_(~mask, 0.0)
        td = residual.pow(2).sum()
        if var_weight:
            centered = qf - qf.mean(dim=-1, keepdim=True)
            variance = (torch.linalg.vecdot(centered, centered) * mask).sum()
            grad = centered.mul_((2.0 * var_weight) * mask.unsqueeze(-1))
        else:
            variance, grad = td.new_zeros(()), torch.zeros_like(qf)
        grad.scatter_add_(-1, tokens.unsqueeze(-1), (2.0 * residual).unsqueeze(-1))
        loss = td + var_weight * variance
        if extra_index is not None:
            extra_residual = qf[extra_index] - extra_target.float()
            loss = loss + extra_residual.pow(2).sum()
            grad.index_put_(extra_index, 2.0 * extra_residual, accumulate=True)
        ctx.save_for_backward(grad)
        ctx.q_dtype = q.dtype
        ctx.mark_non_differentiable(td)
        return loss, td

    @staticmethod
    def backward(ctx, grad, _grad_td):
        (saved,) = ctx.saved_tensors
        return (saved * grad).to(ctx.q_dtype), None, None, None, None, None, None


def critic_loss(q: Tensor, tokens: Tensor, target: Tensor, mask: Tensor, var_weight: float, extra=None):
    """(Σ_t (Q(ŷ_<t, ŷ_t) − Q̂_t)² + λ_var·Σ_t Σ_w (Q(s_t, w) − mean_w Q(s_t, ·))², the
    TD term alone) over the real steps: the TD error and the critic's variance
    smoothing (Bahdanau et al. 2017; dai2018 §4.2); ``target`` Q̂ ``[N, T]`` is a
    constant (no gradient).  ``extra`` = ((rows, steps, tokens) ``[M]`` each,
    targets ``[M]``): more regressed entries Q[row, step, token] (the
    continuations of :func:`continuation_rows`), added to the loss, not to the TD term."""
    index, values = (None, None) if extra is None else (tuple(extra[0]), extra[1].detach())
    return _CriticLoss.apply(q, tokens, target.detach(), mask, float(var_weight), index, values)


def continuation_rows(tokens: Tensor, stop: Tensor, candidates: Tensor, pad: int, eos: int) -> Tensor:
    """Each trajectory with its final eos (at ``stop [N]``, the tokens before it)
    replaced by each of its ``candidates [N, k]`` w, then eos: rows ŷ_<stop w eos
    ``[N·k, T+1]``, whose values Q(ŷ_<stop, w) are at step ``stop`` of the trajectory."""
    n, k = candidates.shape
    rows = torch.cat([tokens, tokens.new_full((n, 1), pad)], dim=1).repeat_interleave(k, dim=0)
    at, step = torch.arange(n * k, device=tokens.device), stop.repeat_interleave(k)
    rows[at, step] = candidates.reshape(-1)
    rows[at, step + 1] = eos
    return rows


def continuation_returns(step_rewards_of_rows: Tensor, stop: Tensor, k: int) -> Tensor:
    """``[N, k]``: the return from the stop state of each row of
    :func:`continuation_rows`, r(w) + r(eos after w), from its per-step rewards
    ``[N·k, T+1]`` (what is left of the episode once w is taken and the row ends)."""
    step = stop.repeat_interleave(k).unsqueeze(1)
    return step_rewards_of_rows.gather(1, torch.cat([step, step + 1], dim=1)).sum(dim=1).view(-1, k)


class _ActorObjective(torch.autograd.Function):
    """−Σ_t mask·Σ_w π_w (Q_w − τ log π_w) of ``lprobs`` with its derivative written
    out: −π (Q − τ log π − τ) at the real steps.  Autograd of the expression keeps
    five [N, T, V] intermediates and runs a backward through each; this keeps one."""

    @staticmethod
    def forward(ctx, lprobs, q, mask, tau, probs, l2=False):
        lp = lprobs.detach().float()
        probs = lp.exp() if probs is None else probs
        if tau and l2:  # the authors' signal Q − τ·log π/‖log π‖₂ (over the vocabulary), held constant
            norm = lp.masked_fill(lp.isinf(), 0.0).norm(p=2, dim=-1, keepdim=True)
            weights = lp.div(norm.add_(1e-8)).mul_(-tau).add_(q.float())
        else:
            weights = lp.mul(-tau).add_(q.float()).sub_(tau) if tau else q.to(torch.float32, copy=True)
        weights = _zero_nan(weights.mul_(probs)).masked_fill_(~mask.unsqueeze(-1), 0.0)
        # Σ_w π (Q − τ log π) = Σ_w weights + τ Σ_w π
        per_step = weights.sum(dim=-1)
        if tau and not l2:
            per_step = per_step + tau * (probs.sum(dim=-1) * mask)
        ctx.save_for_backward(weights)
        ctx.lprobs_dtype = lprobs.dtype
        return -per_step.sum()

    @staticmethod
    def backward(ctx, grad):
        (weights,) = ctx.saved_tensors
        return (weights * -grad).to(ctx.lprobs_dtype), None, None, None, None, None


def actor_objective(lprobs: Tensor, q: Tensor, mask: Tensor, tau: float, probs: Tensor = None,
                    entropy_scale: str = "plain") -> Tensor:
    """−Σ_t [Σ_w π(w|s_t)·Q(s_t, w) + τ·H(π(·|s_t))] with Q constant: its gradient
    is minus eq. 20 (the expectation over the whole vocabulary, no sampled
    action, hence no baseline); ``probs`` = exp(lprobs) in fp32 if already
    computed (:func:`policy_stats`).  0·log 0 = 0 for tokens the actor cannot emit.
    ``entropy_scale="l2"``: −Σ_t Σ_w π_w·(Q_w − τ·log π_w/‖log π‖₂) with the bracket
    constant, the authors' code (ERAC-VAML mt/erac/train_erac.py), whose entropy
    gradient is 1/‖log π‖₂ times eq. 20's."""
    return _ActorObjective.apply(lprobs, q.detach(), mask, float(tau), probs, entropy_scale == "l2")
