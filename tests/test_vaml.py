"""vaml: the q phase trains the critic only, the actor phase learns from a fixed
snapshot of it (α = 0 on reference samples is MLE), phases come in order."""

import pytest
import torch

from conftest import build_toy, first_batch
from fairseq_seqlevel.errors import ConfigError
from test_raml import _assert_same, _loss_and_grads

CRITIC = ["--critic-embed-dim", "8", "--critic-hidden-size", "8"]


_build = build_toy


def test_q_phase_trains_the_critic_only(toy_data):
    _, task, model, crit = _build(toy_data, "--criterion", "vaml", *CRITIC, "--vaml-samples", "3")
    loss, sample_size, log = crit(model, first_batch(task))
    loss.backward()
    assert torch.isfinite(loss) and float(loss) > 0
    assert all(p.grad is None for p in model.parameters())
    grads = [p.grad for p in crit.critic.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert int(crit.q_batches) == 1 and log["vaml_ntokens"] == sample_size


@pytest.mark.parametrize("arch", ["lstm", "transformer"])
def test_actor_phase_alpha_zero_on_references_is_mle(toy_data, arch):
    _, task, model, stock = _build(toy_data, "--criterion", "label_smoothed_cross_entropy",
                                   "--label-smoothing", "0", arch=arch)
    # a Hamming temperature this low draws the reference itself
    _, _, _, vaml = _build(toy_data, "--criterion", "vaml", *CRITIC, "--vaml-phase", "actor", "--vaml-alpha", "0",
                           "--vaml-samples", "2", "--vaml-sample-temperature", "1e-6", arch=arch)
    vaml.q_batches.fill_(1)
    batch = first_batch(task)
    got = _loss_and_grads(model, vaml, batch)
    _assert_same(got, _loss_and_grads(model, stock, batch))
    assert all(float(p.grad.abs().sum()) == 0.0 for p in vaml.critic.parameters())  # in the graph, weight 0


@pytest.mark.parametrize("alpha", ["0", "0.5"])
def test_actor_reference_row_is_one_more_row_in_the_mean(toy_data, alpha):
    """--vaml-actor-reference: (L + 1)·loss = loss on y* alone + L·loss on the same L samples."""
    actor = ["--criterion", "vaml", *CRITIC, "--vaml-phase", "actor", "--vaml-alpha", alpha]
    _, task, model, samples_only = _build(toy_data, *actor, "--vaml-samples", "2", "--vaml-sample-temperature", "0.5")
    _, _, _, with_ref = _build(toy_data, *actor, "--vaml-samples", "2", "--vaml-sample-temperature", "0.5",
                               "--vaml-actor-reference")
    # a Hamming temperature this low draws the reference itself: the reference row alone
    _, _, _, ref_only = _build(toy_data, *actor, "--vaml-samples", "1", "--vaml-sample-temperature", "1e-6")
    for crit in (with_ref, ref_only):
        crit.load_state_dict(samples_only.state_dict())  # one critic for all three
    batch = first_batch(task)
    runs = []
    for crit in (samples_only, with_ref, ref_only):
        crit.q_batches.fill_(1)
        runs.append(_loss_and_grads(model, crit, batch))
    (la, sa, loga, ga), (lb, sb, logb, gb), (lr, sr, logr, gr) = runs
    assert sa == sb == sr
    assert not torch.allclose(la, lr)  # the samples differ from the reference
    torch.testing.assert_close(3 * lb, lr + 2 * la)
    torch.testing.assert_close(3 * logb["nll_loss"], logr["nll_loss"] + 2 * loga["nll_loss"])
    for name in gb:
        torch.testing.assert_close(3 * gb[name], gr[name] + 2 * ga[name], atol=1e-5, rtol=1e-4, msg=name)


def test_actor_phase_learns_from_the_snapshot(toy_data):
    _, task, model, crit = _build(toy_data, "--criterion", "vaml", *CRITIC, "--vaml-phase", "actor",
                                  "--vaml-alpha", "1")
    crit.q_batches.fill_(1)
    batch = first_batch(task)
    torch.manual_seed(0)
    first = crit(model, batch)[0]
    with torch.no_grad():
        for p in crit.critic.parameters():
            p.add_(1.0)  # what an optimizer would do to the live copy
    torch.manual_seed(0)
    torch.testing.assert_close(crit(model, batch)[0], first)


def test_phases_in_order(toy_data):
    _, task, model, crit = _build(toy_data, "--criterion", "vaml", *CRITIC, "--vaml-phase", "actor")
    with pytest.raises(ConfigError, match="--vaml-phase q first"):
        crit(model, first_batch(task))
    _, task, model, crit = _build(toy_data, "--criterion", "vaml", *CRITIC)
    crit.phase_code.fill_(2)
    with pytest.raises(ConfigError, match="after the actor phase is refused"):
        crit(model, first_batch(task))
