"""Every criterion under bf16 against fp32 on CPU, as fairseq's ``--bf16`` runs it.

fairseq's Trainer casts model *and* criterion with ``.to(dtype=torch.bfloat16)``
(buffers included) and keeps fp32 master weights in the optimizer.  Here: one
criterion forward + backward on the same batch with the fp32 model and with a
bf16 copy of model and criterion (random draws made deterministic by the
data-parallel cases' patches or by the same seed), then

* loss, nll_loss and sample_size equal fp32's within ``LOSS_RTOL``;
* the gradient (model and criterion parameters, flattened) within
  ``GRAD_RTOL`` in relative L2 norm, and finite everywhere;
* every logged value finite.

bf16 keeps 8 bits of mantissa (relative rounding 2^-9 = 0.2 %); a forward
through embedding, LSTM/attention and output layer compounds a few of them,
hence a few percent at most (measured: ≤ 3e-4 on the loss, ≤ 2.4 % on the
gradient, the transformers the largest).  What must not happen
(a reward, importance weight or TD target computed in bf16 and off by far
more, a log(0), an exp overflow) shows up as a violation of these bounds or
as a non-finite value.
"""

import dataclasses

import pytest
import torch

from conftest import build_training
from test_data_parallel import embeddings, make_cases  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

LOSS_RTOL = 1e-3
GRAD_RTOL = 0.04

CASES = [
    "mle", "mle_transformer", "raml", "raml_lazy", "raml_transformer", "token_smooth",
    "searnn_reference", "risk", "risk_transformer", "seq_exploration", "scst",
    "interpolation", "interpolation_transformer", "erac_critic", "erac_joint", "erac_joint_transformer",
    "vaml_q", "vaml_actor", "vaml_actor_transformer", "risk_only", "seq_exploration_only_diversity",
    "preference", "preference_ipo_only",
]
# settings whose whole gradient comes from reward differences (the first place a
# bf16 reward would show): risk without its NLL term, seq_exploration's diversity term alone,
# preference's IPO (the largest gradients: 2·(h − 1/(2β))) without the NLL term
EXTRA = {"risk_only": ("risk", ["--risk-mle-weight", "0"]),
         "seq_exploration_only_diversity": ("seq_exploration", ["--sle-alpha", "0"]),
         "preference_ipo_only": ("preference", ["--preference-loss", "ipo", "--preference-mle-weight", "0"])}


@pytest.fixture(scope="module")
def cases(toy_data, embeddings):  # noqa: F811
    out = make_cases(toy_data, embeddings)
    for name, (base, extra) in EXTRA.items():
        out[name] = dataclasses.replace(out[base], name=name, argv=[*out[base].argv, *extra])
    return out


def _batch(task, n=8):
    task.load_dataset("train")
    ds = task.dataset("train")
    return ds.collater([ds[i] for i in range(n)])


def _step(model, criterion, sample, seed):
    model.zero_grad(set_to_none=True)
    criterion.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss, sample_size, log = criterion(model, sample)
    loss.backward()
    params = [p for p in list(model.parameters()) + list(criterion.parameters()) if p.requires_grad]
    grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).float().flatten() for p in params])
    return loss.detach().float(), sample_size, log, grad


@pytest.mark.parametrize("name", CASES)
def test_bf16_matches_fp32(cases, name):
    case = cases[name]
    _, task, model, criterion = build_training(case.argv)
    _, _, half_model, half_criterion = build_training(case.argv)
    half_model.load_state_dict(model.state_dict())
    half_criterion.load_state_dict(criterion.state_dict())
    half_model.to(dtype=torch.bfloat16)  # what fairseq's Trainer does under --bf16
    half_criterion.to(dtype=torch.bfloat16)
    for crit in (criterion, half_criterion):
        if case.patch is not None:
            case.patch(crit)
    sample = _batch(task)
    loss32, size32, log32, grad32 = _step(model, criterion, sample, seed=7)
    loss16, size16, log16, grad16 = _step(half_model, half_criterion, sample, seed=7)

    assert torch.isfinite(loss16) and torch.isfinite(grad16).all(), name
    assert float(size16) == float(size32)
    assert float(grad32.norm()) > 0, f"{name}: the fp32 gradient is zero, nothing is compared"
    torch.testing.assert_close(loss16, loss32, rtol=LOSS_RTOL, atol=1e-4, msg=f"{name}: loss")
    for key in ("nll_loss",):
        if key in log32:
            torch.testing.assert_close(torch.as_tensor(log16[key]).float(), torch.as_tensor(log32[key]).float(),
                                       rtol=LOSS_RTOL, atol=1e-4, msg=f"{name}: {key}")
    rel = float((grad16 - grad32).norm() / grad32.norm())
    assert rel <= GRAD_RTOL, f"{name}: gradient off by {rel:.3f} (relative L2) in bf16"
    for key, value in log16.items():
        if torch.is_tensor(value) or isinstance(value, float):
            assert torch.isfinite(torch.as_tensor(value).float()).all(), f"{name}: logged {key} = {value}"


@pytest.mark.parametrize("name,attr", [("erac_critic", "target_names"), ("vaml_q", "snapshot_names")])
def test_critic_shadows_stay_fp32_under_bf16(cases, name, attr):
    """erac's target network (and vaml's critic snapshot) keep fp32 through fairseq's
    cast of the criterion: φ̄ ← β·φ + (1 − β)·φ̄ at β = 0.001 moves φ̄ by 1e-3·(φ − φ̄),
    below bf16's resolution (2^-8 relative) of a bf16 φ̄, which would never move."""
    from fairseq_seqlevel.critics import blend_shadow, shadow

    _, _, _, criterion = build_training(cases[name].argv)
    criterion.to(dtype=torch.bfloat16)
    names = getattr(criterion, attr)
    before = {k: v.clone() for k, v in shadow(criterion, names).items()}
    assert all(v.dtype == torch.float32 for v in before.values())
    assert all(p.dtype == torch.bfloat16 for p in criterion.critic.parameters())
    with torch.no_grad():
        for k, p in criterion.critic.named_parameters():
            p.copy_(before[k] + 1.0)  # φ − φ̄ ≈ 1 (rounded to bf16)
    blend_shadow(criterion, criterion.critic, names, 0.001)
    for k, p in criterion.critic.named_parameters():
        expected = 0.999 * before[k] + 0.001 * p.float()
        torch.testing.assert_close(getattr(criterion, names[k]), expected, rtol=1e-6, atol=1e-7)
        assert float((getattr(criterion, names[k]) - before[k]).abs().min()) > 5e-4, k
    # a checkpoint round trip keeps them fp32 and exact
    _, _, _, again = build_training(cases[name].argv)
    again.to(dtype=torch.bfloat16)
    again.load_state_dict(criterion.state_dict())
    for k in names.values():
        assert getattr(again, k).dtype == torch.float32
        assert torch.equal(getattr(again, k), getattr(criterion, k))
