"""The fused, chunked output-layer loss under half precision: against fp32
autograd, with fairseq's loss scale as the incoming gradient."""

import pytest
import torch

from fairseq_seqlevel.decoding.teacher_forcing import _FusedRowLoss


def _row_nll(lprobs, target):
    nll = -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return nll.sum(-1), nll.sum(-1)


def _problem(coef_scale, seed=0, rows=6, steps=4, dim=8, vocab=50):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(rows, steps, dim, generator=g)
    weight = torch.randn(vocab, dim, generator=g) * 0.5
    bias = torch.randn(vocab, generator=g) * 0.1
    target = torch.randint(0, vocab, (rows, steps), generator=g)
    coef = (torch.rand(rows, generator=g) + 0.5) * coef_scale
    return features, weight, bias, target, coef


def _grads(total, inputs, loss_scale):
    grads = torch.autograd.grad(total * loss_scale, inputs)
    return [g.float() for g in grads]


@pytest.mark.parametrize("dtype,coef_scale,loss_scale", [
    (torch.bfloat16, 1.0, 1.0),
    (torch.bfloat16, 1e-3, 128.0),
    # per-token normalization of a large batch: unit-scale gradients ~1e-9 are
    # below fp16's smallest subnormal (6e-8); fairseq's loss scale 2^16 lifts them
    (torch.float16, 1e-7, 65536.0),
])
def test_fused_loss_half_precision_matches_fp32_autograd(dtype, coef_scale, loss_scale):
    features, weight, bias, target, coef = _problem(coef_scale)
    # reference: the same half-precision parameters, everything in fp32 autograd
    half = [t.to(dtype) for t in (features, weight, bias)]
    ref_inputs = [t.float().requires_grad_() for t in half]
    lprobs = torch.log_softmax(torch.nn.functional.linear(ref_inputs[0], ref_inputs[1], ref_inputs[2]), dim=-1)
    ref_total = (coef * _row_nll(lprobs, target)[0]).sum()
    ref_grads = _grads(ref_total, ref_inputs, loss_scale)

    inputs = [t.clone().requires_grad_() for t in half]
    total, row_loss, _ = _FusedRowLoss.apply(*inputs, coef, target, _row_nll, 2)  # 3 chunks
    assert total.dtype == torch.float32 and row_loss.dtype == torch.float32
    torch.testing.assert_close(total, ref_total.detach(), rtol=1e-5, atol=0)
    grads = torch.autograd.grad(total * loss_scale, inputs)
    tiny = torch.finfo(dtype).tiny
    for name, got, ref, like in zip(("features", "weight", "bias"), grads, ref_grads, inputs):
        assert got.dtype == like.dtype, name
        # exact fp32 result, rounded once to the parameters' dtype
        torch.testing.assert_close(got.float(), ref.to(dtype).float(), rtol=2 ** -7, atol=tiny, msg=name)
        lost = (ref.abs() >= tiny) & (got == 0)
        assert not bool(lost.any()), f"{name}: {int(lost.sum())} gradients flushed to zero"
