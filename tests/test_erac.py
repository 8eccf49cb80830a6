"""erac: the critic phase leaves the actor out of the gradient, phases must come
in order, the joint loss carries the actor objective, and a resumed run
continues bit-identically (critic, target network, phase)."""

import pytest
import torch

from conftest import ARCHS, USER_DIR, build_toy, build_training, first_batch
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
