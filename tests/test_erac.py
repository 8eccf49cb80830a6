"""erac: the critic phase leaves the actor out of the gradient, phases must come
in order, the joint loss carries the actor objective, and a resumed run
continues bit-identically (critic, target network, phase)."""

import pytest
import torch

from conftest import ARCHS, USER_DIR, build_toy, build_training, first_batch, mle_steps
from fairseq_seqlevel.errors import ConfigError

CRITIC = ["--critic-embed-dim", "8", "--critic-hidden-size", "8"]


def _build(toy_data, *args, arch="lstm"):
    return build_toy(toy_data, "--criterion", "erac", *CRITIC, *args, arch=arch)


@pytest.mark.parametrize("arch", ["lstm", "transformer"])
def test_critic_phase_trains_the_critic_only(toy_data, arch):
    _, task, model, crit = _build(toy_data, "--erac-samples", "2", arch=arch)
    loss, sample_size, log = crit(model, first_batch(task))
    loss.backward()
    assert all(p.grad is None for p in model.parameters())
    grads = [p.grad for p in crit.critic.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)
    assert int(crit.critic_batches) == 1 and log["erac_ntokens"] == sample_size


@pytest.mark.parametrize("arch", ["lstm", "transformer"])
def test_joint_phase_trains_both(toy_data, arch):
    _, task, model, crit = _build(toy_data, "--erac-phase", "joint", arch=arch)
    crit.critic_batches.fill_(1)  # as if restored from a critic checkpoint
    loss, _, log = crit(model, first_batch(task))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(p.grad is not None for p in crit.critic.parameters())


def test_phases_in_order(toy_data):
    _, task, model, crit = _build(toy_data, "--erac-phase", "joint")
    with pytest.raises(ConfigError, match="--erac-phase critic first"):
        crit(model, first_batch(task))
    _, task, model, crit = _build(toy_data, "--erac-phase", "critic")
    crit.phase_code.fill_(2)  # a joint checkpoint
    with pytest.raises(ConfigError, match="after joint training is refused"):
        crit(model, first_batch(task))


def _trainer(toy_data, phase, seed_data):
    from fairseq.trainer import Trainer

    cfg, task, model, crit = _build(toy_data, "--erac-phase", phase, "--optimizer", "adam", "--lr", "0.01",
                                    "--erac-target-rate", "0.3")
    return Trainer(cfg, task, model, crit), task


def _state(trainer):
    crit = trainer.get_criterion()
    return {k: v.clone() for k, v in crit.state_dict().items()}, {k: v.clone() for k, v in
                                                                   trainer.get_model().state_dict().items()}


def test_resume_is_bit_identical(toy_data, tmp_path):
    from fairseq.logging import metrics

    batches = None
    metrics.reset()
    straight, task = _trainer(toy_data, "critic", 0)
    task.load_dataset("train")
    ds = task.dataset("train")
    batches = [ds.collater([ds[i] for i in range(j, j + 12)]) for j in range(0, 48, 12)]
    with metrics.aggregate("train"):
        for b in batches:
            straight.train_step([b])
    want = _state(straight)

    metrics.reset()
    first, _ = _trainer(toy_data, "critic", 0)
    with metrics.aggregate("train"):
        for b in batches[:2]:
            first.train_step([b])
    first.consolidate_optimizer()
    path = str(tmp_path / "checkpoint.pt")
    first.save_checkpoint(path, {"train_iterator": {"epoch": 1}})
    metrics.reset()
    resumed, _ = _trainer(toy_data, "critic", 0)
    resumed.load_checkpoint(path)
    with metrics.aggregate("train"):
        for b in batches[2:]:
            resumed.train_step([b])
    got = _state(resumed)
    metrics.reset()
    for w, g in zip(want, got):
        assert w.keys() == g.keys()
        for k in w:
            assert torch.equal(w[k], g[k]), k
    crit = resumed.get_criterion()
    # the target network moved (β = 0.3) but is not the critic
    assert not torch.equal(crit.target__output__weight, crit.critic.output.weight)
    assert int(crit.phase_code) == 1 and int(crit.critic_batches) == 4


@pytest.mark.parametrize("flags, message", [
    (["--erac-samples", "0"], "--erac-samples"),
    (["--erac-target-rate", "0"], "--erac-target-rate"),
    (["--critic-hidden-size", "7"], "--critic-hidden-size"),
    (["--erac-td-lambda", "1.5"], "--erac-td-lambda"),
])
def test_bad_flags_name_the_flag(toy_data, flags, message):
    with pytest.raises(ConfigError, match=message):
        _build(toy_data, *flags)


def test_critic_phase_starts_from_an_mle_checkpoint(toy_data, tmp_path):
    from fairseq.trainer import Trainer

    cfg, task, model, mle = build_training([toy_data, "--user-dir", USER_DIR, "--task", "seqlevel_translation",
                                            *ARCHS["lstm"], "--criterion", "label_smoothed_cross_entropy",
                                            "--optimizer", "adam", "--lr", "0.01"])
    trainer = Trainer(cfg, task, model, mle)
    trainer.consolidate_optimizer()
    path = str(tmp_path / "mle.pt")
    trainer.save_checkpoint(path, {"train_iterator": {"epoch": 1}})
    cfg2, task2, model2, crit = _build(toy_data, "--optimizer", "adam", "--lr", "0.01")
    before = {k: v.clone() for k, v in crit.state_dict().items()}
    # what --finetune-from-model does
    Trainer(cfg2, task2, model2, crit).load_checkpoint(path, reset_optimizer=True, reset_lr_scheduler=True,
                                                       reset_meters=True)
    assert all(torch.equal(before[k], v) for k, v in crit.state_dict().items())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))


def _oracle_rows(crit, sample, tokens, s):
    """(references, y*, trajectories padded to the criterion's width, their decoder
    input), each trajectory's own copy, built here without the criterion's helpers."""
    pad, eos = crit.padding_idx, crit.eos
    refs = sample["references"].repeat_interleave(s, 0)
    target = sample["target"].repeat_interleave(s, 0)
    width = max(tokens.size(1), target.size(1))
    rows = torch.nn.functional.pad(tokens, (0, width - tokens.size(1)), value=pad)
    prev = torch.cat([rows.new_full((rows.size(0), 1), eos), rows[:, :-1]], dim=1).masked_fill(
        torch.cat([torch.zeros_like(rows[:, :1], dtype=torch.bool), rows[:, :-1].eq(pad)], dim=1), pad)
    return refs, target, rows, prev


@pytest.mark.parametrize("phase", ["critic", "joint"])
def test_continuations_regress_q_onto_exact_returns(toy_data, phase):
    """--erac-continuations k adds to the loss, for each trajectory ŷ with L tokens
    before eos, Σ over the actor's k likeliest tokens w other than eos and pad at
    its last state of (Q(ŷ_<L, w) − |y*|·(R(ŷ_<L w eos) − R(ŷ_<L eos)))², with the
    sentence reward and π computed here row by row; nothing else changes."""
    k = 3
    _, task, model, crit = _build(toy_data, "--erac-phase", phase, "--erac-samples", "2",
                                  "--erac-continuations", str(k))
    crit.critic_batches.fill_(1)
    mle_steps(task, model, 40)  # an actor that stops, so eos is likely where it does
    sample = first_batch(task, n=6)
    model.eval()  # no dropout anyway; the oracle's forward below is the same function
    torch.manual_seed(0)
    with torch.no_grad():
        tokens = crit.trajectories(model, sample)
    crit.trajectories = lambda m, s: tokens
    losses = {}
    for kk in (0, k):
        crit.cfg.erac_continuations = kk
        losses[kk] = crit(model, sample)[0].detach()

    pad, eos, s = crit.padding_idx, crit.eos, 2
    net = sample["net_input"]
    src, src_len = net["src_tokens"].repeat_interleave(s, 0), net["src_lengths"].repeat_interleave(s, 0)
    refs, target, rows, prev = _oracle_rows(crit, sample, tokens, s)
    with torch.no_grad():
        lprobs = model.get_normalized_probs(model(src, src_len, prev), log_probs=True)
        q = crit.critic(target, prev)
    want, eos_on_top = torch.zeros(()), []
    for i in range(rows.size(0)):
        row = rows[i][rows[i].ne(pad)].tolist()
        assert row[-1] == eos
        prefix, last = row[:-1], len(row) - 1
        scale = max(int(target[i].ne(pad).sum()) - 1, 1)
        base = float(crit.reward(torch.tensor([prefix + [eos]]), refs[i:i + 1]))
        at_end = lprobs[i, last].clone()
        eos_on_top.append(int(at_end.argmax()) == eos)
        at_end[[eos, pad]] = float("-inf")
        for w in at_end.topk(k).indices.tolist():
            ret = scale * (float(crit.reward(torch.tensor([prefix + [w, eos]]), refs[i:i + 1])) - base)
            want = want + (q[i, last, w] - ret) ** 2
    assert float(want) > 0 and any(eos_on_top)  # eos is the actor's first choice at some stops: left out
    torch.testing.assert_close(losses[k] - losses[0], want, rtol=1e-4, atol=1e-4)


def test_td_lambda_one_regresses_q_onto_the_sampled_return(toy_data):
    """--erac-td-lambda 1 at τ = 0 (critic phase, no variance term): the loss is
    Σ_t (Q(ŷ_<t, ŷ_t) − |y*|·(R(ŷ) − R(ŷ_<t)))², the sentence reward of the whole
    trajectory and of each prefix computed here row by row; the target network
    is not read (it differs from the critic here)."""
    s = 2
    _, task, model, crit = _build(toy_data, "--erac-samples", str(s), "--erac-td-lambda", "1", "--erac-tau", "0",
                                  "--erac-var-weight", "0")
    mle_steps(task, model, 20)
    sample = first_batch(task, n=6)
    for name in crit.target_names.values():
        getattr(crit, name).add_(0.5)  # a target network far from the critic
    torch.manual_seed(0)
    with torch.no_grad():
        tokens = crit.trajectories(model, sample)
    crit.trajectories = lambda m, smp: tokens
    loss = crit(model, sample)[0].detach()

    pad, eos = crit.padding_idx, crit.eos
    refs, target, rows, prev = _oracle_rows(crit, sample, tokens, s)
    with torch.no_grad():
        q = crit.critic(target, prev)
    want = torch.zeros(())
    for i in range(rows.size(0)):
        row = rows[i][rows[i].ne(pad)].tolist()
        scale = max(int(target[i].ne(pad).sum()) - 1, 1)
        def reward(words):
            return float(crit.reward(torch.tensor([words + [eos]]), refs[i:i + 1]))
        whole = reward(row[:-1])
        for t, token in enumerate(row):
            before = reward(row[:t]) if t else 0.0
            want = want + (q[i, t, token] - scale * (whole - before)) ** 2
    assert float(want) > 0
    torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-4)
