"""The critic's targets and losses: Proposition 1 of dai2018 on an enumerated
MDP, ERAC's TD target by hand, the actor gradient in closed form, the network's
shapes and masking."""

import itertools
import math

import pytest
import torch

from benchmarks.probes.closed_form_speed import autograd_critic_loss, autograd_objective, q_variance
from fairseq_seqlevel.criterions.vaml import soft_q_loss
from fairseq_seqlevel.critics import (ReferenceCritic, actor_objective, continuation_returns, continuation_rows,
                                      critic_loss, erac_td_targets, step_rewards)

PAD, EOS, A, B, V = 1, 2, 4, 5, 6
ALLOWED = (A, B, EOS)
MAX_TOKENS = 3  # eos forced after two words


def _sequences():
    """Every complete sequence (words then eos) with at most MAX_TOKENS tokens."""
    return [words + (EOS,) for n in range(MAX_TOKENS) for words in itertools.product((A, B), repeat=n)]


def _allowed(state):
    return ALLOWED if len(state) < MAX_TOKENS - 1 else (EOS,)


def _q_r(reward, tau):
    """Q_R of Proposition 1 (eq. 7-8) by backward recursion over the states."""
    q = {}
    for n in reversed(range(MAX_TOKENS)):
        for state in itertools.product((A, B), repeat=n):
            for w in _allowed(state):
                gain = reward[state + (w,)] - reward.get(state, 0.0)
                if w == EOS:
                    q[state, w] = gain
                else:
                    nxt = state + (w,)
                    q[state, w] = gain + tau * math.log(sum(math.exp(q[nxt, u] / tau) for u in _allowed(nxt)))
    return q


def _tensors(q_table, reward):
    seqs = _sequences()
    tokens = torch.full((len(seqs), MAX_TOKENS), PAD)
    q = torch.full((len(seqs), MAX_TOKENS, V), -math.inf)
    prefix = torch.zeros(len(seqs), MAX_TOKENS)
    for n, y in enumerate(seqs):
        tokens[n, :len(y)] = torch.tensor(y)
        for t in range(len(y)):
            state = y[:t]
            for w in _allowed(state):
                q[n, t, w] = q_table[state, w]
            prefix[n, t] = reward[y[:t + 1]]
    return tokens, q, prefix


def _soft_q_loss(q, tokens, prefix, tau):
    mask = tokens.ne(PAD)
    return soft_q_loss(q, tokens, step_rewards(prefix, mask), mask, tau)


@pytest.mark.parametrize("tau", [1.0, 0.3])
def test_soft_q_loss_is_zero_exactly_at_q_r(tau):
    g = torch.Generator().manual_seed(0)
    prefixes = {words for y in _sequences() for words in [y[:t] for t in range(1, len(y) + 1)]}
    reward = {p: float(torch.rand((), generator=g)) for p in sorted(prefixes)}
    q_r = _q_r(reward, tau)
    tokens, q, prefix = _tensors(q_r, reward)
    assert float(_soft_q_loss(q, tokens, prefix, tau)) < 1e-10
    # Proposition 1 (5): the Boltzmann policy of Q_R is P_R(y) ∝ exp(R(y)/τ)
    lp = torch.log_softmax(q / tau, dim=-1).gather(-1, tokens.clamp(max=V - 1).unsqueeze(-1)).squeeze(-1)
    log_p = lp.masked_fill(tokens.eq(PAD), 0.0).sum(dim=1)
    r = torch.tensor([reward[y] for y in _sequences()])
    torch.testing.assert_close(log_p, torch.log_softmax(r / tau, dim=0), rtol=0, atol=1e-5)
    for (state, w), value in q_r.items():  # any single change is seen
        changed = dict(q_r)
        changed[state, w] = value + 0.1
        assert float(_soft_q_loss(_tensors(changed, reward)[1], tokens, prefix, tau)) > 1e-4, (state, w)


def test_erac_td_target_by_hand():
    # one trajectory a, b, eos; V = 6 with three allowed tokens
    tokens = torch.tensor([[A, B, EOS]])
    mask = tokens.ne(PAD)
    rewards = torch.tensor([[0.5, -0.25, 1.0]])
    q_bar = torch.full((1, 3, V), float("-inf"))  # forbidden where π is 0: 0·(−inf) counts as 0
    q_bar[0, :, [A, B, EOS]] = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0], [4.0, 4.0, 4.0]])
    pi = torch.zeros(1, 3, V)
    pi[0, :, [A, B, EOS]] = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])
    lprobs = pi.log()
    for tau in (0.0, 0.7):
        def future(t):  # τ·H(π(·|s_t)) + Σ_w π(w|s_t)·Q̄(s_t, w), by hand
            p = [float(pi[0, t, w]) for w in (A, B, EOS)]
            qq = [float(q_bar[0, t, w]) for w in (A, B, EOS)]
            return tau * -sum(x * math.log(x) for x in p) + sum(x * y for x, y in zip(p, qq))
        expected = torch.tensor([[0.5 + future(1), -0.25 + future(2), 1.0]])
        torch.testing.assert_close(erac_td_targets(q_bar, lprobs, rewards, mask, tau), expected)


@pytest.mark.parametrize("lam", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("tau", [0.0, 0.7])
def test_erac_lambda_targets_by_backward_recursion(tau, lam):
    """--erac-td-lambda: Q̂_t = r_t + τ·H_{t+1} + (1−λ)·E_π Q̄_{t+1} + λ·Q̂_{t+1}, by a
    loop over the steps of each row (rows of different lengths, a pad tail)."""
    g = torch.Generator().manual_seed(5)
    tokens = torch.tensor([[A, B, A, EOS], [B, EOS, PAD, PAD], [EOS, PAD, PAD, PAD]])
    mask = tokens.ne(PAD)
    rewards = torch.randn(3, 4, generator=g).masked_fill(~mask, 0.0)
    q_bar = torch.randn(3, 4, V, generator=g)
    lprobs = torch.log_softmax(torch.randn(3, 4, V, generator=g), dim=-1)
    pi = lprobs.exp()
    got = erac_td_targets(q_bar, lprobs, rewards, mask, tau, lam=lam)
    want = torch.zeros(3, 4)
    for n in range(3):
        last = int(mask[n].sum()) - 1
        want[n, last] = rewards[n, last]
        for t in reversed(range(last)):
            soft_value = float((pi[n, t + 1] * q_bar[n, t + 1]).sum() - tau * (pi[n, t + 1] * lprobs[n, t + 1]).sum())
            bonus = -tau * float((pi[n, t + 1] * lprobs[n, t + 1]).sum())
            want[n, t] = rewards[n, t] + (1 - lam) * soft_value + lam * (bonus + want[n, t + 1])
    torch.testing.assert_close(got.masked_fill(~mask, 0.0), want, rtol=1e-5, atol=1e-5)
    if lam == 1.0 and tau == 0.0:  # the sampled return-to-go: the target network is not read
        return_to_go = rewards.flip(1).cumsum(1).flip(1).masked_fill(~mask, 0.0)
        torch.testing.assert_close(got.masked_fill(~mask, 0.0), return_to_go)
        torch.testing.assert_close(erac_td_targets(q_bar + 3.0, lprobs, rewards, mask, tau, lam=lam), got)
    if lam == 0.0:  # eq. 19, the default
        torch.testing.assert_close(got, erac_td_targets(q_bar, lprobs, rewards, mask, tau))


@pytest.mark.parametrize("tau", [0.0, 0.5])
def test_actor_gradient_is_eq_20_in_closed_form(tau):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, V, generator=g, requires_grad=True)
    q = torch.randn(2, 3, V, generator=g)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    actor_objective(torch.log_softmax(logits, dim=-1), q, mask, tau).backward()
    pi = logits.detach().softmax(dim=-1)
    log_pi = pi.log()
    # d/dz of Σ_w π_w Q_w = π (Q − Σ π Q); of H = −π (log π + H)
    grad_value = pi * (q - (pi * q).sum(-1, keepdim=True))
    entropy = -(pi * log_pi).sum(-1, keepdim=True)
    grad_entropy = -pi * (log_pi + entropy)
    expected = -(grad_value + tau * grad_entropy) * mask.unsqueeze(-1)
    torch.testing.assert_close(logits.grad, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tau", [0.0, 0.5])
def test_actor_objective_equals_autograd_of_its_expression(tau):
    """Value and gradient (through log_softmax, and w.r.t. lprobs themselves) equal
    autograd of the plain expression (the one its speed benchmark times), with a
    token the actor cannot emit."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, V, generator=g)
    logits[0, 1, 3] = -math.inf
    q = torch.randn(2, 4, V, generator=g)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])

    for leaf_is_lprobs in (False, True):
        grads, values = [], []
        for fn in (autograd_objective, actor_objective):
            z = (logits.log_softmax(-1) if leaf_is_lprobs else logits).clone().requires_grad_(True)
            lprobs = z if leaf_is_lprobs else z.log_softmax(-1)
            value = fn(lprobs, q, mask, tau)
            value.backward()
            values.append(value.detach())
            grads.append(z.grad)
        torch.testing.assert_close(values[1], values[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)  # a NaN fails here
        assert torch.isfinite(grads[1]).all()


@pytest.mark.parametrize("var_weight", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_critic_loss_equals_autograd_of_its_expression(var_weight, dtype):
    """TD error + λ·variance with the derivative written out: value, TD term and
    gradient equal autograd of the plain expression (the one its speed benchmark
    times), with a padded step whose token repeats a real one and an all-pad row;
    a half-precision Q gets a half-precision gradient."""
    g = torch.Generator().manual_seed(3)
    q0 = torch.randn(3, 4, V, generator=g).to(dtype)
    tokens = torch.tensor([[A, B, EOS, A], [B, B, EOS, PAD], [PAD, PAD, PAD, PAD]])
    target = torch.randn(3, 4, generator=g)
    mask = torch.tensor([[True, True, True, False], [True, True, True, False], [False] * 4])
    out, grads = [], []
    for fn, leaf in ((autograd_critic_loss, q0.float()), (critic_loss, q0)):  # the oracle in fp32
        q = leaf.clone().requires_grad_(True)
        loss, td = fn(q, tokens, target, mask, var_weight)
        loss.backward()
        out.append((loss.detach(), td.detach()))
        grads.append(q.grad)
    torch.testing.assert_close(out[1], out[0], rtol=1e-6, atol=1e-5)
    assert grads[1].dtype == dtype and out[1][1].requires_grad is False
    # within one rounding of the fp32 gradient (autograd of a bf16 Q rounds twice:
    # each of its two gathers of Q casts its own gradient before they are added)
    rtol = 1e-5 if dtype == torch.float32 else 2.0 ** -8
    torch.testing.assert_close(grads[1].float(), grads[0], rtol=rtol, atol=1e-6)
    assert grads[1][2].abs().sum() == 0  # the all-pad row has no gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_critic_loss_extra_entries_equal_autograd(dtype):
    """``extra`` entries (erac's continuations) add Σ (Q[n, t, w] − target)² to the
    loss, not to the TD term, and their gradient, also where an entry repeats
    another or a taken token."""
    g = torch.Generator().manual_seed(5)
    q0 = torch.randn(2, 3, V, generator=g).to(dtype)
    tokens = torch.tensor([[A, B, EOS], [B, EOS, PAD]])
    mask = tokens.ne(PAD)
    target, extra_target = torch.randn(2, 3, generator=g), torch.randn(4, generator=g)
    index = (torch.tensor([0, 0, 1, 1]), torch.tensor([2, 2, 1, 0]), torch.tensor([A, A, B, B]))  # (1, 0, B) is taken
    out, grads = [], []
    for with_extra in (False, True):
        q = q0.float().clone().requires_grad_(True)  # the oracle in fp32
        loss, td = autograd_critic_loss(q, tokens, target, mask, 0.1)
        if with_extra:
            loss = loss + (q[index] - extra_target).pow(2).sum()
        loss.backward()
        out.append((loss.detach(), td.detach()))
        grads.append(q.grad)
    q = q0.clone().requires_grad_(True)
    loss, td = critic_loss(q, tokens, target, mask, 0.1, extra=(index, extra_target))
    loss.backward()
    torch.testing.assert_close((loss.detach(), td), out[1], rtol=1e-6, atol=1e-5)
    assert not torch.allclose(out[1][0], out[0][0]) and torch.equal(out[1][1], out[0][1])
    rtol = 1e-5 if dtype == torch.float32 else 2.0 ** -7
    torch.testing.assert_close(q.grad.float(), grads[1], rtol=rtol, atol=1e-6)


def test_continuation_rows_by_hand():
    """Each trajectory's eos replaced by each candidate and eos after it; the
    return from the stop is r(w) + r(eos); an eos-at-step-1 row continues from
    the empty prefix."""
    tokens = torch.tensor([[A, B, EOS], [EOS, PAD, PAD]])
    stop = tokens.ne(PAD).sum(dim=1) - 1
    rows = continuation_rows(tokens, stop, torch.tensor([[A, B], [B, A]]), PAD, EOS)
    assert rows.tolist() == [[A, B, A, EOS], [A, B, B, EOS], [B, EOS, PAD, PAD], [A, EOS, PAD, PAD]]
    r = torch.arange(16.0).view(4, 4)
    assert continuation_returns(r, stop, 2).tolist() == [[2 + 3, 6 + 7], [8 + 9, 12 + 13]]


def test_step_rewards_scale_and_padding():
    prefix = torch.tensor([[0.1, 0.3, 0.6], [0.2, 0.9, 0.9]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    r = step_rewards(prefix, mask, scale=torch.tensor([3.0, 1.0]))
    torch.testing.assert_close(r, torch.tensor([[0.3, 0.6, 0.9], [0.2, 0.0, 0.0]]))


def test_q_variance():
    q = torch.tensor([[[1.0, 3.0], [2.0, 2.0]]])
    assert float(q_variance(q, torch.tensor([[True, True]]))) == pytest.approx(2.0)
    assert float(q_variance(q, torch.tensor([[False, True]]))) == 0.0


def test_critic_reads_the_reference_and_masks_its_pads():
    torch.manual_seed(0)
    critic = ReferenceCritic(V + 4, PAD, embed_dim=8, hidden_size=8)
    refs = torch.tensor([[A, B, EOS, PAD], [B, EOS, PAD, PAD]])
    prev = torch.tensor([[EOS, A, B], [EOS, B, PAD]])
    q = critic(refs, prev)
    assert q.shape == (2, 3, V + 4)
    # more padding on the reference changes nothing; another reference does
    wider = torch.cat([refs, torch.full((2, 3), PAD)], dim=1)
    torch.testing.assert_close(critic(wider, prev), q)
    assert not torch.allclose(critic(refs.flip(0), prev), q)
    # all-pad reference rows stay finite
    assert torch.isfinite(critic(torch.full((2, 4), PAD), prev)).all()
    with pytest.raises(ValueError, match="--critic-embed-dim"):
        critic.init_embeddings(torch.zeros(V + 4, 16))


def test_actor_objective_l2_scale_is_the_authors_signal():
    """entropy_scale="l2": the gradient w.r.t. log π is π·(Q − τ·log π/‖log π‖₂) held constant
    (ERAC-VAML's train_erac.py), not eq. 20's; a token the actor cannot emit stays finite."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, V, generator=g)
    logits[1, 0, 2] = -math.inf
    q = torch.randn(2, 3, V, generator=g)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    tau = 0.7
    lp = logits.log_softmax(-1).requires_grad_(True)
    actor_objective(lp, q, mask, tau, entropy_scale="l2").backward()
    finite = lp.detach().masked_fill(lp.detach().isinf(), 0.0)
    signal = q - tau * lp.detach() / (1e-8 + finite.norm(dim=-1, keepdim=True))
    pi = lp.detach().exp()
    expected = -(pi * signal).nan_to_num(0.0) * mask.unsqueeze(-1)
    torch.testing.assert_close(lp.grad, expected, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(lp.grad).all()
    plain = lp.detach().clone().requires_grad_(True)
    actor_objective(plain, q, mask, tau).backward()
    assert not torch.allclose(plain.grad, lp.grad)  # the two scales differ
    zero = lp.detach().clone().requires_grad_(True)
    actor_objective(zero, q, mask, 0.0, entropy_scale="l2").backward()
    none = lp.detach().clone().requires_grad_(True)
    actor_objective(none, q, mask, 0.0).backward()
    torch.testing.assert_close(zero.grad, none.grad)  # τ = 0: AC either way
