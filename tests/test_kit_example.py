"""The criterion written on the kit in docs/concepts.md ("Writing a criterion") runs as printed there."""

import re
import sys
import types

import pytest
import torch

from conftest import REPO, build_toy, first_batch


@pytest.fixture(scope="module")
def rwr_module():
    from fairseq.registry import REGISTRIES

    text = (REPO / "docs" / "concepts.md").read_text()
    code = re.search(r"```python\n(# my_criterions/rwr.py\n.*?)```", text, re.S).group(1)
    assert len(code.splitlines()) < 80  # the README's promise: a criterion on the kit in under 80 lines
    if "rwr" not in REGISTRIES["criterion"]["registry"]:
        module = types.ModuleType("rwr_example")
        sys.modules["rwr_example"] = module
        exec(compile(code, "docs/concepts.md", "exec"), module.__dict__)
    return sys.modules["rwr_example"]


def test_the_documented_criterion_reduces_to_mle_at_weight_one(toy_data, rwr_module):
    _, task, model, stock = build_toy(toy_data, "--criterion", "label_smoothed_cross_entropy")
    _, _, _, rwr = build_toy(toy_data, "--criterion", "rwr", "--rwr-mle-weight", "1")
    batch = first_batch(task)
    expected, _, _ = stock(model, batch)
    loss, size, log = rwr(model, batch)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5) and size == batch["ntokens"]
    assert log["rwr_reward_sum"] >= 0


def test_the_documented_criterion_weights_each_sample_by_its_reward(toy_data, rwr_module):
    """w = 0: the loss is Σ_b |y*_b|·Σ_j r_bj·NLL(ỹ_bj) of the samples it drew."""
    from fairseq_seqlevel.criterions.base import references_of
    from fairseq_seqlevel.decoding.teacher_forcing import rows_lprobs, token_nll

    _, task, model, rwr = build_toy(toy_data, "--criterion", "rwr", "--rwr-mle-weight", "0", "--rwr-samples", "3")
    batch = first_batch(task)
    drawn = {}
    sample_outputs = rwr_module.sample_outputs

    def recording(*args, **kwargs):
        out = sample_outputs(*args, **kwargs)
        drawn["tokens"] = out.tokens
        return out

    rwr_module.sample_outputs = recording
    try:
        loss, _, _ = rwr(model, batch)
    finally:
        rwr_module.sample_outputs = sample_outputs
    samples, pad = drawn["tokens"], task.target_dictionary.pad()
    rewards = rwr.reward(samples, references_of(batch).repeat_interleave(3, dim=0)).float()
    with torch.no_grad():
        lprobs = rows_lprobs(model, batch["net_input"], samples, 3, pad, task.target_dictionary.eos())
        nll = token_nll(lprobs, samples, pad).sum(dim=1)
    weight = batch["target"].ne(pad).sum(dim=1).float().repeat_interleave(3)
    assert rewards.abs().sum() > 0
    assert loss.item() == pytest.approx((weight * rewards * nll).sum().item(), rel=1e-4)
