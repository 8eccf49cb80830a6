"""Regression tests of the critic criterions erac and vaml (fidelity issue, part 0).

* vaml's actor phase learns from a snapshot of the *trained* critic (a q-phase
  checkpoint's critic, not the stale copy registered at construction), and a
  resumed actor-phase checkpoint keeps its snapshot;
* erac's target network after one update is exactly β·φ + (1−β)·φ̄, and does
  not move again within the same update;
* erac's joint loss at its default weights (τ, λ_var, λ_mle, one-step target)
  equals a row-by-row hand computation, value and gradients of actor and critic;
* vaml: bad flags name the flag; the actor loss at α = 1 (and α = 0.5) equals a
  hand computation; a data-parallel actor case with deterministic samples equals
  the 1-process gradient of the combined batch;
* bf16 against fp32 per module (encoder, decoder, critic), not one L2 norm over
  model and critic together.
"""

import copy
from functools import partial

import pytest
import torch
from fairseq.logging import metrics

from conftest import USER_DIR, build_toy, build_training, first_batch, mle_steps
from fairseq_seqlevel.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

CRITIC = ["--critic-embed-dim", "8", "--critic-hidden-size", "8"]


def _erac(toy_data, *args, arch="lstm"):
    return build_toy(toy_data, "--criterion", "erac", *CRITIC, *args, arch=arch)


def _vaml(toy_data, *args, arch="lstm"):
    return build_toy(toy_data, "--criterion", "vaml", *CRITIC, *args, arch=arch)


def _set_num_updates(n):
    """What the trainer logs after its n-th update (read by SeqlevelCriterion.num_updates)."""
    with metrics.aggregate():
        metrics.log_scalar("num_updates", n, weight=0)


@pytest.fixture
def fresh_metrics():
    metrics.reset()
    yield
    metrics.reset()


def _shadow_values(crit, names):
    return {name: getattr(crit, buffer).clone() for name, buffer in names.items()}


# ---------------------------------------------------------------- vaml snapshot


def test_vaml_actor_snapshot_is_the_trained_critic(toy_data):
    """A q-phase run trains the critic (one SGD step here); the actor phase started
    from its checkpoint takes its snapshot from that trained critic, and the fixed
    Q it learns from is the trained critic's.  An actor-phase checkpoint resumed
    keeps its own snapshot."""
    _, task, model, q_crit = _vaml(toy_data, "--vaml-samples", "2")
    batch = first_batch(task, n=8)
    initial = {n: p.detach().clone() for n, p in q_crit.critic.named_parameters()}
    torch.manual_seed(0)
    loss, _, _ = q_crit(model, batch)
    loss.backward()
    with torch.no_grad():
        for p in q_crit.critic.parameters():
            p -= 0.5 * p.grad
    assert int(q_crit.q_batches) == 1
    trained = {n: p.detach().clone() for n, p in q_crit.critic.named_parameters()}
    assert all(not torch.equal(trained[n], initial[n]) for n in trained if "bias" not in n)

    actor_flags = ["--vaml-samples", "2", "--vaml-phase", "actor", "--vaml-alpha", "1"]
    _, _, _, actor = _vaml(toy_data, *actor_flags)
    actor.load_state_dict(q_crit.state_dict())  # --restore-file of the q checkpoint
    stale = _shadow_values(actor, actor.snapshot_names)
    assert any(not torch.equal(stale[n], trained[n]) for n in trained)  # the copy registered at construction
    torch.manual_seed(1)
    first = actor(model, batch)[0].detach()
    for name, p in actor.critic.named_parameters():
        assert torch.equal(getattr(actor, actor.snapshot_names[name]), trained[name].float()), name

    # the same samples against a critic frozen by hand at the trained weights: the same loss
    _, _, _, by_hand = _vaml(toy_data, *actor_flags)
    by_hand.load_state_dict(actor.state_dict())  # phase actor: no new snapshot at its start
    with torch.no_grad():
        for p in by_hand.critic.parameters():
            p.add_(1.0)  # a live critic far from the snapshot: not read by the actor phase
    torch.manual_seed(1)
    torch.testing.assert_close(by_hand(model, batch)[0].detach(), first)
    for name in trained:
        assert torch.equal(getattr(by_hand, by_hand.snapshot_names[name]), trained[name].float()), name


# ---------------------------------------------------------------- erac target network


@pytest.mark.parametrize("rate", [0.3, 0.001])
def test_erac_target_network_is_the_exact_blend_after_one_update(toy_data, fresh_metrics, rate):
    """φ̄ ← β·φ + (1−β)·φ̄ once per optimizer update, at the first forward after it,
    with φ the critic as the update left it; not again in the same update."""
    _, task, model, crit = _erac(toy_data, "--erac-target-rate", str(rate))
    batch = first_batch(task, n=6)
    g = torch.Generator().manual_seed(0)
    for buffer in crit.target_names.values():  # a target network apart from the critic
        getattr(crit, buffer).add_(torch.randn(getattr(crit, buffer).shape, generator=g))
    before = _shadow_values(crit, crit.target_names)
    crit(model, batch)  # update 0: nothing to blend
    for name, value in _shadow_values(crit, crit.target_names).items():
        assert torch.equal(value, before[name]), name

    with torch.no_grad():  # what the optimizer step does to φ
        for p in crit.critic.parameters():
            p.add_(torch.randn(p.shape, generator=g))
    phi = {n: p.detach().clone() for n, p in crit.critic.named_parameters()}
    _set_num_updates(1)
    crit(model, batch)
    after = _shadow_values(crit, crit.target_names)
    for name in phi:
        want = rate * phi[name] + (1.0 - rate) * before[name]
        torch.testing.assert_close(after[name], want, rtol=1e-6, atol=1e-7, msg=name)
        assert float((after[name] - before[name]).abs().max()) > 0.1 * rate, name  # it moved
    crit(model, batch)  # a second batch of the same update (gradient accumulation)
    for name, value in _shadow_values(crit, crit.target_names).items():
        assert torch.equal(value, after[name]), name


# ---------------------------------------------------------------- erac joint loss by hand


def test_erac_joint_loss_by_hand_at_defaults(toy_data, fresh_metrics):
    """--erac-phase joint with every loss flag at its default (1 sample, τ = 0.01,
    λ_var = 0.001, λ_mle = 0.1, the one-step target of eq. 19), row by row:

    Q̂_t = r_t + [t < last]·(τ·H(π_{t+1}) + Σ_w π_{t+1}(w)·Q_φ̄(t+1, w)),
    r_t = |y*|·(R(ŷ_≤t) − R(ŷ_<t)), R(ŷ_<0) = 0,
    loss = Σ_t (Q_φ(t, ŷ_t) − Q̂_t)² + λ_var·Σ_t Σ_w (Q_φ(t, w) − mean_w Q_φ(t, ·))²
           − Σ_t [Σ_w π_t(w)·Q_φ(t, w) + τ·H(π_t)] (Q constant) + λ_mle·NLL(y*),

    with one forward of the model and of the critic per row and the sentence
    reward per prefix; loss and the gradients of model and critic."""
    tau, var_weight, mle_weight = 0.01, 0.001, 0.1
    _, task, model, crit = _erac(toy_data, "--erac-phase", "joint")
    assert (crit.cfg.erac_tau, crit.cfg.erac_var_weight, crit.cfg.erac_mle_weight) == (tau, var_weight, mle_weight)
    assert crit.cfg.erac_samples == 1 and crit.cfg.erac_td_lambda == 0 and crit.cfg.erac_continuations == 0
    crit.critic_batches.fill_(1)  # as if restored from a critic checkpoint
    mle_steps(task, model, 30)  # trajectories with some reward
    g = torch.Generator().manual_seed(1)
    for buffer in crit.target_names.values():  # φ̄ ≠ φ: which network gives which term is seen
        getattr(crit, buffer).add_(0.3 * torch.randn(getattr(crit, buffer).shape, generator=g))
    batch = first_batch(task, n=6)
    torch.manual_seed(0)
    with torch.no_grad():
        tokens = crit.trajectories(model, batch)
    crit.trajectories = lambda m, s: tokens
    model.zero_grad()
    crit.critic.zero_grad()
    loss, sample_size, log = crit(model, batch)
    loss.backward()
    got_model = {n: p.grad.clone() for n, p in model.named_parameters()}
    got_critic = {n: p.grad.clone() for n, p in crit.critic.named_parameters()}
    model.zero_grad()
    crit.critic.zero_grad()

    d = task.target_dictionary
    pad, eos = d.pad(), d.eos()
    target_net = copy.deepcopy(crit.critic)
    with torch.no_grad():
        for name, p in target_net.named_parameters():
            p.copy_(getattr(crit, crit.target_names[name]))
    src, src_len = batch["net_input"]["src_tokens"], batch["net_input"]["src_lengths"]
    refs, target = batch["references"], batch["target"]

    def log_probs(b, prev):
        x = src[b][src[b].ne(pad)].unsqueeze(0)
        return model.get_normalized_probs(model(x, src_len[b:b + 1], prev), log_probs=True)[0]

    want, rewarded, count = 0.0, 0, 0
    for b in range(target.size(0)):
        row = tokens[b][tokens[b].ne(pad)].tolist()
        assert row[-1] == eos and eos not in row[:-1]
        ref = target[b][target[b].ne(pad)]
        scale = max(len(ref) - 1, 1)
        prev = torch.tensor([[eos] + row[:-1]])
        lp = log_probs(b, prev)  # [T, V], gradient to the model
        q = crit.critic(ref.unsqueeze(0), prev)[0]  # [T, V], gradient to the critic
        with torch.no_grad():
            q_bar = target_net(ref.unsqueeze(0), prev)[0]
            pi, lp_const = lp.detach().exp(), lp.detach()

        def reward(words):
            return float(crit.reward(torch.tensor([words + [eos]]), refs[b:b + 1]))

        prefix_r = [reward(row[:t + 1] if t < len(row) - 1 else row[:-1]) for t in range(len(row))]
        for t, token in enumerate(row):
            r_t = scale * (prefix_r[t] - (prefix_r[t - 1] if t else 0.0))
            rewarded += r_t != 0
            q_hat = r_t
            if t < len(row) - 1:
                entropy = -float((pi[t + 1] * lp_const[t + 1]).sum())
                q_hat += tau * entropy + float((pi[t + 1] * q_bar[t + 1]).sum())
            want = want + (q[t, token] - q_hat) ** 2
            want = want + var_weight * ((q[t] - q[t].mean()) ** 2).sum()
            pi_t = lp[t].exp()
            want = want - ((pi_t * q[t].detach()).sum() - tau * (pi_t * lp[t]).sum())
        count += len(row)
        ref_prev = torch.tensor([[eos] + ref[:-1].tolist()])
        want = want - mle_weight * log_probs(b, ref_prev).gather(-1, ref.unsqueeze(-1)).sum()
    assert rewarded > 0  # some reward along the trajectories
    want.backward()
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-5, atol=1e-4)
    assert sample_size == count == log["erac_ntokens"]
    for name, p in model.named_parameters():
        torch.testing.assert_close(got_model[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)
    for name, p in crit.critic.named_parameters():
        torch.testing.assert_close(got_critic[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


# ---------------------------------------------------------------- vaml flags and actor loss


@pytest.mark.parametrize("flags, message", [
    (["--vaml-tau", "0"], "--vaml-tau"),
    (["--vaml-tau", "-0.5"], "--vaml-tau"),
    (["--vaml-alpha", "1.5"], "--vaml-alpha"),
    (["--vaml-alpha", "-0.1"], "--vaml-alpha"),
    (["--vaml-samples", "0"], "--vaml-samples"),
    (["--vaml-sample-temperature", "0"], "--vaml-sample-temperature"),
    (["--critic-hidden-size", "7"], "--critic-hidden-size"),
    (["--critic-embed-dim", "0"], "--critic-embed-dim"),
])
def test_vaml_bad_flags_name_the_flag(toy_data, flags, message):
    with pytest.raises(ConfigError, match=message):
        _vaml(toy_data, *flags)


def fixed_vaml_rows(criterion, sample, layout=None, offset=0):
    """``--vaml-samples`` L variants of each target derived from its example id:
    variant l replaces the word at (id + l) mod |y*| by a word (not a special
    symbol) chosen from (id, l); eos and length kept.  [B·L, T]."""
    dictionary = criterion.task.target_dictionary
    words = [i for i, s in enumerate(dictionary.symbols) if s.startswith("w")]
    target, pad = sample["target"], dictionary.pad()
    rows = []
    for b, example in enumerate(sample["id"].tolist()):
        length = int(target[b].ne(pad).sum()) - 1
        for l in range(offset, offset + criterion.cfg.vaml_samples):
            row = target[b].clone()
            if length > 0:
                row[(example + l) % length] = words[(7 * example + 3 * l) % len(words)]
            rows.append(row)
    return torch.stack(rows)


def fixed_vaml_samples(criterion):
    """``patch`` (ddp_harness): vaml's Hamming samples replaced by :func:`fixed_vaml_rows`."""
    criterion.draw_samples = partial(fixed_vaml_rows, criterion)


def fixed_vaml_actor(criterion):
    """``patch``: as :func:`fixed_vaml_samples`, with the critic marked trained (actor phase)."""
    fixed_vaml_samples(criterion)
    criterion.q_batches.fill_(1)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_vaml_actor_loss_by_hand(toy_data, alpha):
    """Actor phase, τ = 0.4 (default), L = 2 fixed samples per source:
    loss = (1/L)·Σ_rows Σ_t [(1−α)·(−log p(ỹ_t)) − α·Σ_w softmax(Q(t, ·)/τ)_w·log p(w)],
    Q of the snapshot with bos, pad and fairseq's madeupword fillers excluded
    (eos and unk are actions); per row one forward of model and critic."""
    L, tau = 2, 0.4
    _, task, model, crit = _vaml(toy_data, "--vaml-phase", "actor", "--vaml-alpha", str(alpha),
                                 "--vaml-samples", str(L))
    assert crit.cfg.vaml_tau == tau
    crit.q_batches.fill_(1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # a critic with some spread, so that softmax(Q/τ) is not flat
        for p in crit.critic.parameters():
            p.add_(torch.randn(p.shape, generator=g))
    batch = first_batch(task, n=6)
    fixed_vaml_samples(crit)
    rows = fixed_vaml_rows(crit, batch)
    model.zero_grad()
    loss, sample_size, log = crit(model, batch)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(float(p.grad.abs().sum()) == 0 for p in crit.critic.parameters())
    model.zero_grad()

    d = task.target_dictionary
    pad, eos = d.pad(), d.eos()
    excluded = [d.bos(), pad] + [i for i, s in enumerate(d.symbols) if s.startswith("madeupword")]
    src, src_len, target = batch["net_input"]["src_tokens"], batch["net_input"]["src_lengths"], batch["target"]
    want, nll = 0.0, 0.0
    for i in range(rows.size(0)):
        b = i // L
        row = rows[i][rows[i].ne(pad)]
        ref = target[b][target[b].ne(pad)]
        prev = torch.cat([torch.tensor([eos]), row[:-1]]).unsqueeze(0)
        x = src[b][src[b].ne(pad)].unsqueeze(0)
        lp = model.get_normalized_probs(model(x, src_len[b:b + 1], prev), log_probs=True)[0]
        with torch.no_grad():
            q = crit.critic(ref.unsqueeze(0), prev)[0]
            q[:, excluded] = float("-inf")
            soft = torch.softmax(q / tau, dim=-1)
        token_nll = -lp.gather(-1, row.unsqueeze(-1)).sum()
        ce = -(soft * lp).sum()
        want = want + ((1 - alpha) * token_nll + alpha * ce) / L
        nll = nll + float(token_nll) / L
    want.backward()
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(float(log["nll_loss"]), nll, rtol=1e-5, atol=1e-5)
    assert sample_size == batch["ntokens"]
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_vaml_actor_data_parallel_equals_one_process(toy_data):
    """vaml's actor phase (α = 0.5, deterministic samples) on 2 gloo processes under
    pytorch_ddp: the reduced gradients match across ranks and equal the 1-process
    gradient of the combined batch, update after update."""
    from ddp_harness import run_data_parallel

    argv = [toy_data, "--user-dir", USER_DIR, "--task", "seqlevel_translation",
            "--arch", "lstm", "--encoder-embed-dim", "16", "--decoder-embed-dim", "16",
            "--encoder-hidden-size", "16", "--decoder-hidden-size", "16", "--decoder-out-embed-dim", "16",
            "--decoder-attention", "True", "--dropout", "0", "--seed", "3", "--extra-references", "ref2",
            "--criterion", "vaml", *CRITIC, "--vaml-samples", "2", "--vaml-phase", "actor", "--vaml-alpha", "0.5"]
    report = run_data_parallel(argv, "pytorch_ddp", deterministic_check=True, patch=fixed_vaml_actor)
    assert len(report["updates"]) == 2
    assert all(u["reference"] is not None and u["reference"]["max_rel"] <= 1e-5 for u in report["updates"])


# ---------------------------------------------------------------- bf16 per module


BF16_CASES = ["erac_critic", "erac_joint", "erac_joint_transformer", "vaml_q", "vaml_actor"]
GRAD_RTOL = 0.04  # test_mixed_precision's bound, here for each module on its own


def _module_grads(model, criterion):
    """{encoder, decoder, critic: flattened fp32 gradient (zeros where None)}."""
    groups = {}
    named = [("model." + n, p) for n, p in model.named_parameters()] + \
            [("criterion." + n, p) for n, p in criterion.named_parameters()]
    for name, p in named:
        if not p.requires_grad:
            continue
        key = name.split(".")[1]
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        groups.setdefault(key, []).append(grad.float().flatten())
    return {k: torch.cat(v) for k, v in groups.items()}


@pytest.mark.parametrize("name", BF16_CASES)
def test_bf16_gradient_per_module(toy_data, name):
    from test_data_parallel import make_cases

    case = make_cases(toy_data, "unused-embeddings")[name]
    torch.manual_seed(3)  # build_training does not seed: the same weights whatever ran before
    _, task, model, criterion = build_training(case.argv)
    _, _, half_model, half_criterion = build_training(case.argv)
    half_model.load_state_dict(model.state_dict())
    half_criterion.load_state_dict(criterion.state_dict())
    half_model.to(dtype=torch.bfloat16)  # as fairseq's Trainer under --bf16
    half_criterion.to(dtype=torch.bfloat16)
    # deterministic draws: the data-parallel cases' patches; vaml's Hamming samples fixed here
    patch = {"vaml_q": fixed_vaml_samples, "vaml_actor": fixed_vaml_actor}.get(name, case.patch)
    for crit in (criterion, half_criterion):
        patch(crit)
    task.load_dataset("train")
    ds = task.dataset("train")
    sample = ds.collater([ds[i] for i in range(8)])
    grads = []
    for m, c in ((model, criterion), (half_model, half_criterion)):
        m.zero_grad(set_to_none=True)
        c.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        loss, _, _ = c(m, sample)
        loss.backward()
        grads.append(_module_grads(m, c))
    fp32, bf16 = grads
    assert set(fp32) == {"encoder", "decoder", "critic"}
    assert any(float(g.norm()) > 0 for g in fp32.values())
    for module, g32 in fp32.items():
        g16 = bf16[module]
        assert torch.isfinite(g16).all(), f"{name}/{module}: non-finite bf16 gradient"
        if float(g32.norm()) == 0:  # not trained in this phase: nothing in bf16 either
            assert float(g16.abs().max()) == 0, f"{name}/{module}: a gradient where fp32 has none"
            continue
        rel = float((g16 - g32).norm() / g32.norm())
        print(f"{name}/{module}: |g| {float(g32.norm()):.3e}, relative L2 error in bf16 {rel:.4f}")
        assert rel <= GRAD_RTOL, f"{name}/{module}: gradient off by {rel:.3f} (relative L2) in bf16"
