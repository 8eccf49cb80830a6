"""Regression tests of the sampling criterions (fidelity issue, part 0).

* every criterion that draws (raml, risk, searnn_kl, seq_exploration,
  interpolation, erac, vaml) draws inside ``base.worker_rng``: with two faked
  data-parallel ranks the same batch and the same outer seed give different
  draws on rank 0 and rank 1, each rank reproducibly, and fairseq's outer
  stream has moved by exactly the one seed draw of ``worker_rng`` (no draw of
  the criterion leaks to it), the same on both ranks;
* seq_exploration's entropy term (``--sle-entropy-weight β``, SLL-ME) against
  an independent loop, one forward per (source, sample): loss, gradient and the
  logged entropy sum, the sign included;
* interpolation's z = 1 branch (λ = (1, 0, 0), scheduled sampling's model
  tokens): at c → ∞ it is greedy decoding (an independent one-row loop), and
  the loss is the teacher-forced NLL of those tokens.
"""

import pytest
import torch

from conftest import build_toy, first_batch, mle_steps
from fairseq_seqlevel.criterions import base
from fairseq_seqlevel.decoding.teacher_forcing import prev_output_tokens_from_target
from test_seq_exploration import _fixed_outputs

pytestmark = pytest.mark.usefixtures("one_thread")

CRITIC = ["--critic-embed-dim", "8", "--critic-hidden-size", "8"]

# criterion -> (flags, the method whose result is the criterion's random draw, batch size)
DRAWING = {
    "raml": (["--criterion", "raml", "--raml-alpha", "0.5", "--raml-samples", "3", "--raml-temperature", "0.5"],
             "draw_samples", 8),
    "risk": (["--criterion", "risk", "--risk-candidates", "3"], "candidates", 8),
    "searnn_kl": (["--criterion", "searnn_kl", "--searnn-max-len-b", "2", "--searnn-roll-in", "learned",
                   "--searnn-roll-out", "mixed", "--searnn-tokens", "3", "--searnn-token-sampling", "policy"],
                  "search", 4),
    "seq_exploration": (["--criterion", "seq_exploration", "--sle-samples", "3"], "draw", 8),
    "interpolation": (["--criterion", "interpolation", "--interp-lambdas", "0.3,0.3,0.4", "--interp-anneal", "none"],
                      "construct", 8),
    "erac": (["--criterion", "erac", *CRITIC, "--erac-samples", "2"], "trajectories", 8),
    "vaml": (["--criterion", "vaml", *CRITIC, "--vaml-samples", "3", "--vaml-sample-temperature", "0.5"],
             "draw_samples", 8),
}


def _tensors(obj):
    """Every tensor in a (nested) result, in order."""
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in _tensors(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in _tensors(item)]
    return []


def _same(a, b):
    return len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))


def _run(crit, model, batch, method, seed):
    """One forward after ``torch.manual_seed(seed)``: (the criterion's draws, the
    outer stream's next numbers afterwards)."""
    drawn = []
    original = getattr(type(crit), method).__get__(crit)

    def recording(*args, **kwargs):
        out = original(*args, **kwargs)
        drawn.append([t.detach().clone() for t in _tensors(out)])
        return out

    setattr(crit, method, recording)
    try:
        torch.manual_seed(seed)
        crit(model, batch)
        after = torch.rand(4)
    finally:
        delattr(crit, method)
    assert len(drawn) == 1, f"{method} was called {len(drawn)} times"
    return drawn[0], after


@pytest.mark.parametrize("name", list(DRAWING))
def test_every_criterion_draws_inside_worker_rng(toy_data, monkeypatch, name):
    flags, method, n = DRAWING[name]
    _, task, model, crit = build_toy(toy_data, *flags)
    crit.train()
    batch = first_batch(task, n=n)
    crit.output_layout(model, batch)  # the one-time probe of the task, outside the compared runs
    seed = 11
    # the outer stream after worker_rng's one draw of the per-worker base seed
    torch.manual_seed(seed)
    torch.randint(0, 2 ** 62, ())
    expected_after = torch.rand(4)

    runs = {}
    for rank in (0, 1, 1):
        monkeypatch.setattr(base, "data_parallel_rank_and_size", lambda rank=rank: (rank, 2))
        runs.setdefault(rank, []).append(_run(crit, model, batch, method, seed))
    (draw0, after0), = runs[0]
    (draw1, after1), (draw1_again, after1_again) = runs[1]
    assert draw0 and all(t.numel() for t in draw0)
    assert not _same(draw0, draw1), f"{name}: rank 0 and rank 1 drew the same from the same seed"
    assert _same(draw1, draw1_again), f"{name}: a rank's draws are not reproducible"
    # fairseq's stream: every rank continues it alike, moved only by worker_rng's seed draw
    for after in (after0, after1, after1_again):
        assert torch.equal(after, expected_after), f"{name}: the outer RNG stream is not restored"


# ---------------------------------------------------------------- seq_exploration


@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_seq_exploration_entropy_term_by_independent_loop(toy_data, beta):
    """L = Σ_b |y*_b|·(1/s)·Σ_j [−(Δ_j − b)·log p(ỹ_j|x) − β·Σ_t H(p(·|ỹ_j,<t, x))],
    every token position of a sample (its eos included), one forward per
    (source, sample): loss, gradients and the logged ``sle_entropy_sum``."""
    s = 3
    _, task, model, crit = build_toy(toy_data, "--criterion", "seq_exploration", "--sle-alpha", "1",
                                     "--sle-samples", str(s), "--sle-entropy-weight", str(beta))
    batch = first_batch(task, n=5)
    d = task.target_dictionary
    samples, greedy = _fixed_outputs(batch, d, s)
    crit.draw = lambda model, sample: (samples, greedy)
    model.zero_grad()
    loss, sample_size, log = crit(model, batch)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    src, src_len, refs = batch["net_input"]["src_tokens"], batch["net_input"]["src_lengths"], batch["references"]
    pad, eos = d.pad(), d.eos()
    total, entropy_sum = 0.0, 0.0
    for b in range(batch["target"].size(0)):
        x = src[b][src[b].ne(pad)].unsqueeze(0)
        baseline = float(task.reward(greedy[b:b + 1], refs[b:b + 1])[0])
        per_source = 0.0
        for j in range(s):
            y = samples[b * s + j][samples[b * s + j].ne(pad)].unsqueeze(0)
            reward = float(task.reward(y, refs[b:b + 1])[0])
            lp = model.get_normalized_probs(model(x, src_len[b:b + 1], prev_output_tokens_from_target(y, pad, eos)),
                                            log_probs=True)[0]
            log_p = sum(lp[t, int(y[0, t])] for t in range(y.size(1)))
            entropy = sum(-(lp[t].exp() * lp[t]).sum() for t in range(y.size(1)))
            entropy_sum += float(entropy)
            per_source = per_source + (-(reward - baseline) * log_p - beta * entropy) / s
        total = total + int(batch["target"][b].ne(pad).sum()) * per_source
    total.backward()
    torch.testing.assert_close(loss.detach(), total.detach(), rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    if beta > 0:
        assert entropy_sum > 1.0  # the term is not negligible here: a flipped sign is far off
        torch.testing.assert_close(float(log["sle_entropy_sum"]), entropy_sum, rtol=1e-5, atol=1e-4)
        assert log["sle_ntokens"] == int(samples.ne(pad).sum())
    assert sample_size == batch["ntokens"]


# ---------------------------------------------------------------- interpolation


def _greedy_by_hand(model, batch, pad, eos, max_len_a, max_len_b):
    """Greedy decoding one source at a time with a full forward per step: arg-max
    of the model's distribution without pad (and without eos at the first step,
    min_len 1), eos forced at the step max(a·|y*| + b, |y*| − 1), |y*| with eos."""
    src, src_len, target = batch["net_input"]["src_tokens"], batch["net_input"]["src_lengths"], batch["target"]
    out = []
    with torch.no_grad():
        for b in range(target.size(0)):
            x = src[b][src[b].ne(pad)].unsqueeze(0)
            ref_len = int(target[b].ne(pad).sum())
            last = max(int(ref_len * max_len_a + max_len_b), ref_len - 1)
            tokens = []
            for step in range(last + 1):
                prev = torch.tensor([[eos] + tokens])
                lp = model.get_normalized_probs(model(x, src_len[b:b + 1], prev), log_probs=True)[0, -1].clone()
                lp[pad] = float("-inf")
                if step == 0:
                    lp[eos] = float("-inf")
                token = eos if step == last else int(lp.argmax())
                tokens.append(token)
                if token == eos:
                    break
            out.append(tokens)
    return out


@pytest.mark.parametrize("arch", ["lstm", "transformer"])
def test_interpolation_model_branch_is_greedy_at_high_c_and_trains_its_tokens(toy_data, arch):
    """λ = (1, 0, 0): every token from exp(c·log p_θ(·|y_<t, x)); at c = 1e4 that is
    greedy decoding, and the loss is the summed teacher-forced NLL of exactly
    those tokens (sample_size: their count), computed here row by row."""
    _, task, model, crit = build_toy(toy_data, "--criterion", "interpolation", "--interp-lambdas", "1,0,0",
                                     "--interp-anneal", "none", "--interp-temperature", "1e4",
                                     "--interp-max-len-a", "0.5", "--interp-max-len-b", "3", arch=arch)
    mle_steps(task, model, 30)  # outputs that vary and stop
    batch = first_batch(task, n=8)
    d = task.target_dictionary
    pad, eos = d.pad(), d.eos()
    constructed = []
    original = crit.construct

    def recording(*args):
        out = original(*args)
        constructed.append(out)
        return out

    crit.construct = recording
    model.zero_grad()
    torch.manual_seed(0)
    loss, sample_size, log = crit(model, batch)
    loss.backward()
    tokens, z = constructed[0]

    greedy = _greedy_by_hand(model, batch, pad, eos, 0.5, 3)
    rows = [tokens[b][tokens[b].ne(pad)].tolist() for b in range(tokens.size(0))]
    assert rows == greedy
    limits = [max(int(n * 0.5 + 3), n - 1) + 1 for n in batch["target"].ne(pad).sum(dim=1).tolist()]
    assert len({tuple(r) for r in rows}) > 1
    assert any(len(r) < limit for r, limit in zip(rows, limits))  # the model's own eos, not the limit
    assert torch.equal(z, tokens.ne(pad).long())  # every token from the model branch
    assert log["interp_model_tokens"] == sample_size == sum(map(len, greedy))

    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    src, src_len = batch["net_input"]["src_tokens"], batch["net_input"]["src_lengths"]
    want = 0.0
    for b, row in enumerate(greedy):
        x = src[b][src[b].ne(pad)].unsqueeze(0)
        lp = model.get_normalized_probs(model(x, src_len[b:b + 1], torch.tensor([[eos] + row[:-1]])),
                                        log_probs=True)[0]
        want = want - sum(lp[t, token] for t, token in enumerate(row))
    want.backward()
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.as_tensor(log["nll_loss"]), want.detach(), rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
