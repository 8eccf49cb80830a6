"""Re-scoring in length buckets (decoding/teacher_forcing.py): rows of very
different lengths scored in a few decoder calls, each cut to its longest row,
give the losses, per-row values, features and parameter gradients of one
call at the full width (``buckets=1``), for the lstm and the transformer, the
chunked and the plain output layer, per-row start symbols, and through the
risk and seq_exploration criterions; and they decode fewer positions."""

from functools import partial

import pytest
import torch

from conftest import build_toy, first_batch
from fairseq_seqlevel.criterions.seq_exploration import nll_and_entropy
from fairseq_seqlevel.decoding import teacher_forcing as tf
from fairseq_seqlevel.decoding.model import forward_through
from test_raml import _loss_and_grads

pytestmark = pytest.mark.usefixtures("one_thread")

LENGTHS = [1, 2, 3, 24, 2, 25, 1, 4, 2, 3, 26, 1]  # tokens before eos; rows then padded to WIDTH
WIDTH = 30  # > the longest row + eos: trailing all-pad columns too


def _model(toy_data, arch, dtype=torch.float64):
    _, task, model, _ = build_toy(toy_data, "--criterion", "risk", arch=arch)
    return task, model.to(dtype)


def _rows(dictionary, n, seed=0, lengths=LENGTHS, width=WIDTH):
    """``n`` right-padded eos-terminated rows of random words, lengths cycling through ``lengths``."""
    g = torch.Generator().manual_seed(seed)
    words = torch.tensor([dictionary.index(f"w{i}") for i in range(12)])
    out = torch.full((n, width), dictionary.pad())
    for r in range(n):  # test data only
        k = lengths[r % len(lengths)]
        out[r, :k] = words[torch.randint(0, 12, (k,), generator=g)]
        out[r, k] = dictionary.eos()
    return out


class _Positions:
    """Counts the decoder positions run (``extract_features`` inputs: B x T)."""

    def __init__(self, decoder, monkeypatch):
        self.calls, inner = [], decoder.extract_features

        def counted(prev_output_tokens, *args, **kwargs):
            self.calls.append(tuple(prev_output_tokens.shape))
            return inner(prev_output_tokens, *args, **kwargs)

        monkeypatch.setattr(decoder, "extract_features", counted)

    def take(self):
        calls, self.calls = self.calls, []
        return calls


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_grads(a, b, atol=1e-6, rtol=1e-6):
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=rtol, msg=name)


def _softmax_risk(row_loss, per_source, costs):
    """A risk-like objective of (the first component of) the per-row losses."""
    first = row_loss if row_loss.dim() == 1 else row_loss[:, 0]
    q = torch.softmax(-first.view(-1, per_source), dim=1)
    out = (q * costs).sum()
    if row_loss.dim() == 2:
        out = out - 0.01 * row_loss[:, 1].sum()
    return out


@pytest.mark.parametrize("arch", ["lstm", "transformer"])
@pytest.mark.parametrize("fused", [None, False])
@pytest.mark.parametrize("entropy,dtype", [(False, torch.float64), (True, torch.float64), (True, torch.float32)])
def test_rows_objective_in_buckets_equals_one_call(toy_data, arch, fused, entropy, dtype, monkeypatch):
    monkeypatch.setattr(tf, "CHUNK_LOGITS", 500)  # several chunks per bucket
    task, model = _model(toy_data, arch, dtype)
    d = task.target_dictionary
    pad = d.pad()
    batch = first_batch(task, n=4)
    per_source = 6
    rows = _rows(d, 4 * per_source)
    scored = rows.clone()
    scored[::per_source, :1] = pad  # a forced first token on some rows: not scored
    bos = torch.tensor([d.eos(), d.index("w3"), d.eos(), d.index("w7")])  # per source
    costs = torch.rand(4, per_source, generator=torch.Generator().manual_seed(1), dtype=dtype)
    loss_fn = partial(nll_and_entropy, pad=pad) if entropy else partial(tf.sequence_nll, pad=pad)
    objective = partial(_softmax_risk, per_source=per_source, costs=costs)
    lengths = tf.row_lengths(tf.prev_output_tokens_from_target(rows, pad, bos.repeat_interleave(per_source)),
                             scored, pad)
    used = torch.arange(WIDTH).unsqueeze(0) < lengths.unsqueeze(1)
    positions = _Positions(model.decoder, monkeypatch)
    results = []
    for buckets in (1, None):
        model.zero_grad()
        loss, row_loss, row_nll, features = forward_through(
            model, tf.rows_objective, batch["net_input"], rows, per_source, pad, bos, loss_fn, objective,
            fused=fused, loss_target=scored, buckets=buckets)
        # a term on the features of some rows (as risk's label-smoothed reference NLL)
        ref = features.view(4, per_source, WIDTH, -1)[:, 0]
        extra = (ref * used.view(4, per_source, WIDTH)[:, 0, :, None]).pow(2).sum()
        (loss + 0.1 * extra).backward()
        results.append((loss.detach(), row_loss, row_nll, features.detach(), extra.detach(), _grads(model),
                        positions.take()))
    one, many = results
    assert one[6] == [(4 * per_source, WIDTH)]  # today's path: one call at the full width
    assert len(many[6]) > 1 and sum(n * t for n, t in many[6]) < 0.6 * 4 * per_source * WIDTH
    for a, b in zip(one[:3], many[:3]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert features.shape == one[3].shape
    # float32: the transformer's attention sums over fewer (masked) keys, rounding differs (< 1e-6)
    tol = 1e-9 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(many[3][used], one[3][used], atol=tol, rtol=tol)
    cut = many[3].eq(0).all(dim=-1)  # positions cut from their bucket: padded back with zeros
    assert int(cut.sum()) == 4 * per_source * WIDTH - sum(n * t for n, t in many[6]) and not bool(cut[used].any())
    torch.testing.assert_close(many[4], one[4], atol=tol, rtol=tol)
    _assert_grads(many[5], one[5])


@pytest.mark.parametrize("arch", ["lstm", "transformer"])
@pytest.mark.parametrize("fused", [None, False])
def test_weighted_row_losses_in_buckets_equal_one_call(toy_data, arch, fused, monkeypatch):
    monkeypatch.setattr(tf, "CHUNK_LOGITS", 500)
    task, model = _model(toy_data, arch)
    d = task.target_dictionary
    pad = d.pad()
    batch = first_batch(task, n=3)
    per_source = 5
    rows = _rows(d, 3 * per_source, seed=2)
    bos = torch.tensor([d.index("w1"), d.eos(), d.index("w5")]).repeat_interleave(per_source)  # per row
    prev = tf.prev_output_tokens_from_target(rows, pad, bos)
    coef = torch.linspace(-1.0, 2.0, rows.size(0), dtype=torch.float64)
    loss_fn = partial(tf.sequence_nll, pad=pad)
    positions = _Positions(model.decoder, monkeypatch)
    results = []
    for buckets in (1, None):
        model.zero_grad()
        encoder_out = tf.expand_encoder_out(model, tf.encode(model, batch["net_input"]), per_source, 3)
        total, row_loss, row_nll = tf.weighted_row_losses(model, encoder_out, prev, rows, coef, loss_fn,
                                                          fused=fused, buckets=buckets)
        total.backward()
        results.append((total.detach(), row_loss, row_nll, _grads(model), positions.take()))
    one, many = results
    assert one[4] == [(rows.size(0), WIDTH)]
    assert len(many[4]) > 1 and sum(n * t for n, t in many[4]) < 0.6 * rows.numel()
    for a, b in zip(one[:3], many[:3]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    _assert_grads(many[3], one[3])


def test_bucketing_rule():
    full = 100
    assert tf.length_buckets(torch.full((40,), full), full) is None  # nothing to cut: today's call
    assert tf.length_buckets(torch.tensor([3, 90, 7]), full, max_buckets=1) is None
    trimmed = tf.length_buckets(torch.tensor([30, 40, 41]), full)
    assert trimmed == [(None, 41)]  # one bucket, cut to the longest row (no split saves 5%)
    lengths = torch.tensor([5] * 30 + [6] * 10 + [50] * 20 + [100] * 4)
    plan = tf.length_buckets(lengths, full)
    widths = [w for _, w in plan]
    assert widths == [6, 50, 100]
    rows = torch.cat([idx for idx, _ in plan])
    assert sorted(rows.tolist()) == list(range(lengths.numel()))  # every row once
    for idx, w in plan:
        assert bool((lengths[idx] <= w).all()) and int(lengths[idx].max()) == w
    cost = sum(idx.numel() * w for idx, w in plan) + (len(plan) - 1) * tf.BUCKET_MIN_SAVING * lengths.numel() * full
    assert cost <= lengths.numel() * full
    # at most max_buckets, and a split only where it saves enough positions
    assert len(tf.length_buckets(lengths, full, max_buckets=2)) == 2
    assert [w for _, w in tf.length_buckets(torch.tensor([5] * 99 + [100]), full)] == [5, 100]
    assert tf.length_buckets(torch.tensor([99] * 50 + [100] * 50), full) is None


def _risk_candidates(task, batch, n):
    return _rows(task.target_dictionary, batch["target"].size(0) * n, seed=3, width=28)


@pytest.mark.parametrize("arch", ["lstm", "transformer"])
def test_risk_in_buckets_equals_one_call(toy_data, arch, monkeypatch):
    """risk end to end (the reference's label-smoothed term reads the bucketed features)."""
    monkeypatch.setattr(tf, "CHUNK_LOGITS", 500)
    _, task, model, risk = build_toy(toy_data, "--criterion", "risk", "--risk-candidates", "5", "--risk-mle-weight",
                                     "0.3", "--label-smoothing", "0.1", "--risk-score", "mean",
                                     "--risk-include-reference", arch=arch)
    model.double()
    batch = first_batch(task, n=6)
    fixed = _risk_candidates(task, batch, 5)
    risk.candidates = lambda model, sample: fixed
    positions = _Positions(model.decoder, monkeypatch)
    results = {}
    for fused in (None, False):
        for buckets in (1, 4):
            monkeypatch.setattr(tf, "MAX_BUCKETS", buckets)
            risk.fused = fused
            results[fused, buckets] = _loss_and_grads(model, risk, batch), positions.take()
    for fused in (None, False):
        (one, calls_one), (many, calls_many) = results[fused, 1], results[fused, 4]
        assert len(calls_one) == 1 and len(calls_many) > 1
        assert sum(n * t for n, t in calls_many) < 0.75 * sum(n * t for n, t in calls_one)
        torch.testing.assert_close(many[0], one[0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(many[2]["nll_loss"], one[2]["nll_loss"], atol=1e-6, rtol=1e-6)
        assert many[2]["risk_candidates"] == one[2]["risk_candidates"] > batch["target"].size(0)
        _assert_grads(many[3], one[3])


@pytest.mark.parametrize("arch", ["lstm", "transformer"])
def test_seq_exploration_in_buckets_equals_one_call(toy_data, arch, monkeypatch):
    monkeypatch.setattr(tf, "CHUNK_LOGITS", 500)
    _, task, model, crit = build_toy(toy_data, "--criterion", "seq_exploration", "--seq-exploration-samples", "5",
                                     "--seq-exploration-entropy-weight", "0.05", "--seq-exploration-mle-weight", "0.2",
                                     arch=arch)
    model.double()
    batch = first_batch(task, n=6)
    d = task.target_dictionary
    samples = _rows(d, batch["target"].size(0) * 5, seed=4, width=28)
    greedy = _rows(d, batch["target"].size(0), seed=5, lengths=[3, 20], width=28)
    crit.draw = lambda model, sample: (samples, greedy)
    positions = _Positions(model.decoder, monkeypatch)
    results = {}
    for fused in (None, False):
        for buckets in (1, 4):
            monkeypatch.setattr(tf, "MAX_BUCKETS", buckets)
            crit.fused = fused
            results[fused, buckets] = _loss_and_grads(model, crit, batch), positions.take()
    for fused in (None, False):
        (one, calls_one), (many, calls_many) = results[fused, 1], results[fused, 4]
        assert len(calls_one) == 1 and len(calls_many) > 1
        assert sum(n * t for n, t in calls_many) < 0.75 * sum(n * t for n, t in calls_one)
        torch.testing.assert_close(many[0], one[0], atol=1e-6, rtol=1e-6)
        for key in ("nll_loss", "sle_entropy_sum"):
            torch.testing.assert_close(many[2][key], one[2][key], atol=1e-6, rtol=1e-6)
        _assert_grads(many[3], one[3])


@pytest.mark.parametrize("buckets", [1, None])
@pytest.mark.parametrize("fused", [None, False])
def test_rows_objective_without_grad_scores_once(toy_data, buckets, fused, monkeypatch):
    """Under no_grad (a frozen copy's scores, preference's π_ref) the objective and per-row
    values equal those of the gradient-carrying call, and no second pass runs: neither the
    chunked output layer's gradient pass nor a graph over the losses."""
    task, model = _model(toy_data, "lstm", torch.float64)
    d = task.target_dictionary
    pad = d.pad()
    batch = first_batch(task, n=4)
    rows = _rows(d, 4 * 3)
    costs = torch.rand(4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    args = (batch["net_input"], rows, 3, pad, d.eos(), partial(tf.sequence_nll, pad=pad),
            partial(_softmax_risk, per_source=3, costs=costs))
    model.eval()  # no dropout: both calls see the same model
    loss, row_loss, row_nll, _ = tf.rows_objective(model, *args, fused=fused, buckets=buckets)
    fused_calls = []
    monkeypatch.setattr(tf._FusedRowLoss, "apply", lambda *a: fused_calls.append(a))
    with torch.no_grad():
        got = tf.rows_objective(model, *args, fused=fused, buckets=buckets)
    assert fused_calls == [] and not got[0].requires_grad
    for a, b in zip((loss.detach(), row_loss, row_nll), got[:3]):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
