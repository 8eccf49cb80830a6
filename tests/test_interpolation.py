"""interpolation: λ = (0,0,1) is stock MLE, the reward branch at c → ∞
rebuilds the reference, the anneal schedule of Appendix C.2, the validation
signal, and the λ state across a checkpoint resume."""

import math

import pytest
import torch
from fairseq.logging import metrics

from conftest import build_toy, first_batch
from fairseq_seqlevel.criterions.interpolation import (
    REFERENCE, after_validation, annealed_lambdas, construct_sequences,
    inverse_sigmoid_lambdas)
from fairseq_seqlevel.errors import ConfigError
from test_raml import _assert_same, _loss_and_grads


_build = build_toy


@pytest.mark.parametrize("arch", ["lstm", "transformer"])
def test_reference_only_is_stock_mle(toy_data, arch):
    _, task, model, stock = _build(toy_data, "--criterion", "label_smoothed_cross_entropy",
                                   "--label-smoothing", "0", arch=arch)
    _, _, _, interp = _build(toy_data, "--criterion", "interpolation", "--interp-lambdas", "0,0,1",
                             "--interp-anneal", "none", arch=arch)
    batch = first_batch(task)
    got = _loss_and_grads(model, interp, batch)
    _assert_same(got, _loss_and_grads(model, stock, batch))
    assert got[2]["interp_reference_tokens"] == batch["ntokens"] and got[2]["interp_model_tokens"] == 0


def test_reference_branch_through_the_sampler_is_the_target(toy_data):
    # the path the criterion skips at λ3 = 1: Algorithm 1 with z = 3 everywhere
    _, task, model, crit = _build(toy_data, "--criterion", "interpolation")
    batch = first_batch(task)
    tokens, z = construct_sequences(model, batch, (0.0, 0.0, 1.0), crit.gain_reward, 1.0, crit.banned_ids, 1.2, 10)
    assert torch.equal(tokens, batch["target"])
    assert torch.equal(z, batch["target"].ne(task.target_dictionary.pad()).long() * REFERENCE)


def _single_reference(batch, copies, distinct=False):
    """The batch's sources ``copies`` times each, their first reference only."""
    target = batch["target"]
    keep = [b for b in range(target.size(0))
            if not distinct or len(set(target[b].tolist())) == len(target[b].tolist())]
    idx = torch.tensor(keep).repeat_interleave(copies)
    net_input = {k: v.index_select(0, idx) for k, v in batch["net_input"].items() if k != "prev_output_tokens"}
    t = target.index_select(0, idx)
    return {"net_input": net_input, "target": t, "references": t.unsqueeze(1), "ntokens": int(t.ne(1).sum())}


def test_reward_branch_at_high_c_reproduces_the_reference_hamming(toy_data):
    _, task, model, crit = _build(toy_data, "--criterion", "interpolation", "--interp-reward", "hamming")
    sample = _single_reference(first_batch(task), copies=3)
    torch.manual_seed(0)
    tokens, z = construct_sequences(model, sample, (0.0, 1.0, 0.0), crit.gain_reward, 1e4, crit.banned_ids, 1.2, 10)
    assert torch.equal(tokens, sample["target"])
    assert int(z.eq(2).sum()) == sample["ntokens"]


def test_reward_branch_at_high_c_reproduces_the_reference_bleu(toy_data):
    """BLEU ties at the first step (any reference token is one unigram match), so
    c → ∞ gives runs of reference n-grams; once y*_1 is chosen first, the n-grams
    make every later step unique and the output is y* exactly."""
    _, task, model, crit = _build(toy_data, "--criterion", "interpolation", "--interp-reward", "bleu")
    pad = task.target_dictionary.pad()
    sample = _single_reference(first_batch(task, n=64), copies=20, distinct=True)
    torch.manual_seed(0)
    tokens, _ = construct_sequences(model, sample, (0.0, 1.0, 0.0), crit.gain_reward, 1e4, crit.banned_ids, 1.2, 10)
    target = sample["target"]
    starts_right = tokens[:, 0].eq(target[:, 0])
    assert target.size(0) >= 60 and int(starts_right.sum()) >= 10
    for row in range(target.size(0)):  # test assertions only
        ref, out = target[row][target[row].ne(pad)].tolist(), tokens[row][tokens[row].ne(pad)].tolist()
        assert set(out[:-1]) <= set(ref[:-1]) and out[-1] == ref[-1]
        if starts_right[row]:
            assert out == ref


def test_mixed_branches_log_their_shares(toy_data):
    _, task, model, crit = _build(toy_data, "--criterion", "interpolation", "--interp-lambdas", "0.3,0.3,0.4",
                                  "--interp-anneal", "none")
    batch = first_batch(task)
    torch.manual_seed(0)
    loss, sample_size, log = crit(model, batch)
    counts = [log[f"interp_{b}_tokens"] for b in ("model", "reward", "reference")]
    assert sum(counts) == log["ntokens"] == sample_size and min(counts) > 0
    assert math.isfinite(float(loss)) and log["interp_lambda1_sum"] == pytest.approx(0.3)


def test_anneal_moves_as_appendix_c2():
    # 0.06 to λ1 once, then to λ2 four times, periodically, λ3 losing 0.06 each time
    expected, l1, l2 = [], 0.04, 0.0
    for k in range(16):
        if k % 5 == 0:
            l1 += 0.06
        else:
            l2 += 0.06
        expected.append((l1, l2, 0.96 - 0.06 * (k + 1)))
    for moves, lam in enumerate(expected, start=1):
        assert annealed_lambdas((0.04, 0, 0.96), moves) == pytest.approx(lam, abs=1e-9)
    assert annealed_lambdas((0.04, 0, 0.96), 16) == pytest.approx((0.28, 0.72, 0.0), abs=1e-9)
    assert annealed_lambdas((0.04, 0, 0.96), 40) == annealed_lambdas((0.04, 0, 0.96), 16)
    assert annealed_lambdas((0.0, 0.0, 0.1), 3) == pytest.approx((0.06, 0.04, 0.0))


def test_validation_decisions():
    state = {"moves": 0, "best": None}
    moves = []
    for reward in [0.20, 0.25, 0.24, 0.10, 0.12, 0.12, 0.30]:
        state = after_validation(state, reward)
        moves.append(state["moves"])
    # 0.24 < 0.25: move; 0.10 starts afresh; 0.12 improves; 0.12 does not: move; 0.30 starts afresh
    assert moves == [0, 0, 1, 1, 1, 2, 2]


def test_inverse_sigmoid_is_bengio_decay():
    for i in (0, 500, 3000):
        eps = 500 / (500 + math.exp(i / 500))
        assert inverse_sigmoid_lambdas(i, 500) == pytest.approx((1 - eps, 0.0, eps))
    assert inverse_sigmoid_lambdas(10 ** 9, 500) == pytest.approx((1.0, 0.0, 0.0))  # no overflow


def test_updates_schedule_follows_the_trainer(toy_data):
    _, task, model, crit = _build(toy_data, "--criterion", "interpolation", "--interp-anneal", "updates",
                                  "--interp-anneal-every", "100")
    try:
        with metrics.aggregate():
            metrics.log_scalar("num_updates", 250, weight=0)
        assert crit.current_lambdas() == pytest.approx(annealed_lambdas((0.04, 0, 0.96), 2))
    finally:
        metrics.reset()


def test_validation_reward_drives_the_schedule(toy_data, monkeypatch):
    """The task's validation decode, scored with the criterion's validation_reward,
    reaches the criterion through the task's reduce_metrics (the hook), once."""
    _, task, model, crit = _build(toy_data, "--criterion", "interpolation")
    valid, train = first_batch(task, "valid"), first_batch(task)
    rewards = iter([0.5, 0.4, 0.7])
    decodes = []
    greedy_outputs = task.greedy_outputs
    monkeypatch.setattr(task, "greedy_outputs", lambda m, s: decodes.append(1) or greedy_outputs(m, s))

    def validate():
        value = next(rewards)
        monkeypatch.setattr(crit, "validation_reward", lambda hyp, refs: torch.full((hyp.size(0),), value))
        with torch.no_grad():
            _, _, log = task.valid_step(valid, model, crit)
        with metrics.aggregate():
            task.reduce_metrics([log], crit)
        crit.train()
        crit(model, train)

    validate()
    assert crit.schedule == {"moves": 0, "best": pytest.approx(0.5)}
    validate()
    assert crit.schedule == {"moves": 1, "best": None}
    assert crit.current_lambdas() == pytest.approx((0.10, 0.0, 0.90))
    validate()
    assert crit.schedule == {"moves": 1, "best": pytest.approx(0.7)}
    assert len(decodes) == 3  # one validation decode per batch: the task's


@pytest.mark.parametrize("rollback", [False, True])
def test_rollback_restores_the_best_validated_weights(toy_data, monkeypatch, rollback):
    """--interpolation-rollback (tan2019 C.2): a validation no better than the best since the last move
    puts back the weights that best validation saw, then moves; a new best keeps its weights."""
    _, task, model, crit = _build(toy_data, "--criterion", "interpolation",
                                  *(["--interpolation-rollback"] if rollback else []))
    valid, train = first_batch(task, "valid"), first_batch(task)

    def validate(value):
        monkeypatch.setattr(crit, "validation_reward", lambda hyp, refs: torch.full((hyp.size(0),), value))
        with torch.no_grad():
            _, _, log = task.valid_step(valid, model, crit)
        with metrics.aggregate():
            task.reduce_metrics([log], crit)
        crit.train()

    def nudge():  # a training step's change of the weights
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)

    weights = lambda: {n: p.detach().clone() for n, p in model.named_parameters()}  # noqa: E731
    validate(0.5)
    validated = weights()
    crit(model, train)  # consumes the validation: a new best
    nudge()
    nudged = weights()
    validate(0.4)  # no better: a move (and, with rollback, the best's weights back)
    crit(model, train)
    assert crit.schedule == {"moves": 1, "best": None}
    expected = validated if rollback else nudged
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=0, atol=0, msg=name)
    assert (crit.training_state_dict().get("best_weights") is None)  # the next validation starts afresh
    validate(0.6)
    crit(model, train)
    assert ("best_weights" in crit.training_state_dict()) == rollback


def test_rollback_refuses_fp16_master_weights(toy_data):
    with pytest.raises(ConfigError, match="--interpolation-rollback cannot restore weights under --fp16"):
        _build(toy_data, "--criterion", "interpolation", "--interpolation-rollback", "--bf16")
    with pytest.raises(ConfigError, match="needs --interpolation-anneal validation"):
        _build(toy_data, "--criterion", "interpolation", "--interpolation-rollback", "--interpolation-anneal", "none")


def test_validation_annealing_needs_the_task_hook(toy_data):
    cfg, task, _, crit = _build(toy_data, "--criterion", "interpolation")
    task.hands_validation_reward = False  # a task without the hook (fairseq's translation)
    with pytest.raises(ConfigError, match="--interpolation-anneal validation"):
        type(crit)(task, cfg.criterion)


def test_schedule_survives_resume(toy_data, tmp_path):
    from fairseq.trainer import Trainer

    flags = ["--criterion", "interpolation", "--optimizer", "sgd", "--lr", "0.1"]
    cfg, task, model, crit = _build(toy_data, *flags)
    crit.schedule = {"moves": 3, "best": 0.25}
    trainer = Trainer(cfg, task, model, crit)
    path = str(tmp_path / "checkpoint.pt")
    trainer.consolidate_optimizer()  # as checkpoint_utils.save_checkpoint does first
    trainer.save_checkpoint(path, {"train_iterator": {"epoch": 1}})

    cfg2, task2, model2, crit2 = _build(toy_data, *flags)
    Trainer(cfg2, task2, model2, crit2).load_checkpoint(path)
    assert crit2.schedule == {"moves": 3, "best": 0.25}
    _, task3, model3, crit3 = _build(toy_data, *flags)
    Trainer(cfg2, task3, model3, crit3).load_checkpoint(path, reset_meters=True)  # fine-tuning: a fresh start
    assert crit3.schedule == {"moves": 0, "best": None}


@pytest.mark.parametrize("flags, message", [
    (["--interpolation-lambdas", "0.5,0.6,0"], "--interpolation-lambdas"),
    (["--interpolation-lambdas", "1,0"], "--interpolation-lambdas"),
    (["--interpolation-temperature", "0"], "--interpolation-temperature"),
    (["--interpolation-anneal-every", "0"], "--interpolation-anneal-every"),
    (["--interp-anneal-every", "0"], "--interpolation-anneal-every"),  # a deprecated name: the new one in the error
])
def test_bad_flags_name_the_flag(toy_data, flags, message):
    with pytest.raises(ConfigError, match=message):
        _build(toy_data, "--criterion", "interpolation", *flags)


def test_degenerate_targets_give_finite_losses(toy_data):
    # an empty reference (eos only) and a one-word one, every branch possible
    _, task, model, crit = _build(toy_data, "--criterion", "interpolation", "--interp-lambdas", "0.4,0.3,0.3",
                                  "--interp-anneal", "none")
    batch = first_batch(task, n=4)
    d = task.target_dictionary
    pad, eos, w = d.pad(), d.eos(), d.index("w3")
    batch["target"][0] = pad
    batch["target"][0, 0] = eos
    batch["target"][1] = pad
    batch["target"][1, :2] = torch.tensor([w, eos])
    batch["references"][:2] = pad
    batch["references"][:2, :, :2] = batch["target"][:2, :2].unsqueeze(1)
    for seed in range(3):
        torch.manual_seed(seed)
        loss, sample_size, log = crit(model, batch)
        loss.backward()
        assert math.isfinite(float(loss)) and sample_size == log["ntokens"] > 0
        assert all(math.isfinite(float(p.grad.abs().sum())) for p in model.parameters() if p.grad is not None)
