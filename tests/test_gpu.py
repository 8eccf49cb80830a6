"""The CUDA path, wherever CUDA exists (skipped on CPU-only machines).

One update of every criterion setting of the bf16 test on a tiny CUDA model:
finite loss and gradients, every parameter and buffer of model and criterion
on the device, and no more host-device synchronizations than the step needs.
Syncs are counted with ``torch.cuda.set_sync_debug_mode("warn")``, which
warns on every synchronizing call (``.item()``, ``.tolist()``, ``int(t)``,
a copy to the host, a data-dependent shape); the budget is what stock MLE
(``label_smoothed_cross_entropy``) costs plus one per decoding step (a batched
sampler asks "is every row finished?" once per step, as fairseq's
SequenceGenerator does) plus ``SYNC_SLACK`` for the criterion's own checks.
"""

import warnings

import pytest
import torch

from conftest import build_training
from test_data_parallel import embeddings, make_cases  # noqa: F401  (fixture)
from test_mixed_precision import CASES, EXTRA, _batch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SYNC_SLACK = 12
MAX_DECODE_STEPS = 40  # toy targets <= 8 tokens; a·|y*| + b caps of the criterions stay below this


@pytest.fixture(scope="module")
def cases(toy_data, embeddings):  # noqa: F811
    import dataclasses

    out = make_cases(toy_data, embeddings)
    for name, (base, extra) in EXTRA.items():
        out[name] = dataclasses.replace(out[base], name=name, argv=[*out[base].argv, *extra])
    return out


def _update(case):
    from fairseq import utils

    _, task, model, criterion = build_training(case.argv)
    if case.patch is not None:
        case.patch(criterion)
    model, criterion = model.cuda(), criterion.cuda()
    sample = utils.move_to_cuda(_batch(task))
    optimizer = torch.optim.SGD(list(model.parameters()) + list(criterion.parameters()), lr=0.1)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            loss, sample_size, log = criterion(model, sample)
            loss.backward()
            optimizer.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    return model, criterion, loss, syncs


def test_mle_sync_baseline(cases):
    _, _, loss, syncs = _update(cases["mle"])
    assert torch.isfinite(loss)
    assert syncs <= SYNC_SLACK, f"stock MLE synchronizes {syncs} times per update"


@pytest.mark.parametrize("name", [c for c in CASES if c != "mle"] + list(EXTRA))
def test_one_cuda_update(cases, name):
    _, _, _, baseline = _update(cases["mle"])
    model, criterion, loss, syncs = _update(cases[name])
    assert torch.isfinite(loss), name
    for module in (model, criterion):
        for pname, p in module.named_parameters():
            assert p.is_cuda and (p.grad is None or torch.isfinite(p.grad).all()), f"{name}: {pname}"
        for bname, b in module.named_buffers():
            assert b.is_cuda, f"{name}: buffer {bname} stayed on the host"
    budget = baseline + MAX_DECODE_STEPS + SYNC_SLACK
    assert syncs <= budget, f"{name}: {syncs} host-device synchronizations in one update (budget {budget})"
