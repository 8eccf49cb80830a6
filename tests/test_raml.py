"""raml: reductions to MLE, lazy vs non-lazy, importance weights, bad flags."""

import math

import pytest
import torch

from conftest import TINY_LSTM, USER_DIR, build_training, first_batch, run_cli
from fairseq_seqlevel.errors import ConfigError

BASE = ["--user-dir", USER_DIR, "--task", "seqlevel_translation", *TINY_LSTM,
        "--dropout", "0", "--extra-references", "ref2", "--seed", "3"]


def _setup(toy_data, *criterion_args):
    return build_training([toy_data, *BASE, *criterion_args])


def _loss_and_grads(model, criterion, batch, seed=0):
    model.zero_grad()
    torch.manual_seed(seed)
    loss, sample_size, log = criterion(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), sample_size, log, grads


def _assert_same(a, b, atol=1e-5):
    (la, sa, loga, ga), (lb, sb, logb, gb) = a, b
    assert sa == sb
    torch.testing.assert_close(la, lb, atol=atol, rtol=1e-5)
    torch.testing.assert_close(loga["nll_loss"], logb["nll_loss"], atol=atol, rtol=1e-5)
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], atol=atol, rtol=1e-4, msg=name)


@pytest.fixture(scope="module")
def mle(toy_data):
    cfg, task, model, criterion = _setup(toy_data, "--criterion", "label_smoothed_cross_entropy",
                                         "--label-smoothing", "0")
    return task, model, criterion


@pytest.mark.parametrize("lazy", [[], ["--raml-lazy"]])
def test_alpha_zero_is_mle(toy_data, mle, lazy):
    task, model, stock = mle
    _, _, _, raml = _setup(toy_data, "--criterion", "raml", "--raml-alpha", "0", *lazy)
    batch = first_batch(task)
    _assert_same(_loss_and_grads(model, raml, batch), _loss_and_grads(model, stock, batch))


@pytest.mark.parametrize("sampler", ["hamming", "edit", "ngram"])
def test_samples_equal_to_reference_reduce_to_mle(toy_data, mle, sampler):
    """τ -> 0 puts all prior mass on d = 0 (hamming/edit); V_refs of a one-token
    vocabulary leaves ngram nothing to change... so use hamming/edit only for
    equality, and check ngram moves away from MLE."""
    task, model, stock = mle
    _, _, _, raml = _setup(toy_data, "--criterion", "raml", "--raml-alpha", "0.7",
                           "--raml-sampler", sampler, "--raml-temperature", "1e-4",
                           "--raml-samples", "3")
    batch = first_batch(task)
    got = _loss_and_grads(model, raml, batch)
    if sampler == "ngram":  # always changes one n-gram: the loss must differ
        assert not torch.allclose(got[0], _loss_and_grads(model, stock, batch)[0])
        assert got[2]["raml_dist_sum"] > 0
    else:
        assert got[2]["raml_dist_sum"] == 0
        _assert_same(got, _loss_and_grads(model, stock, batch))


def test_lazy_and_nonlazy_agree_without_changes(toy_data, mle):
    task, model, _ = mle
    args = ["--criterion", "raml", "--raml-alpha", "0.5", "--raml-temperature", "1e-4"]
    _, _, _, lazy = _setup(toy_data, *args, "--raml-lazy")
    _, _, _, full = _setup(toy_data, *args)
    batch = first_batch(task)
    _assert_same(_loss_and_grads(model, lazy, batch), _loss_and_grads(model, full, batch))


def test_nonlazy_scores_each_sample_with_its_own_forward(toy_data, mle):
    """The batched B·(L+1) forward equals one model forward per sample."""
    task, model, _ = mle
    alpha, L = 0.6, 4
    _, _, _, raml = _setup(toy_data, "--criterion", "raml", "--raml-alpha", str(alpha),
                           "--raml-temperature", "0.5", "--raml-samples", str(L))
    batch = first_batch(task, n=6)
    model.eval()
    torch.manual_seed(11)
    loss, _, log = raml(model, batch)
    torch.manual_seed(11)
    drawn, weights, _ = raml.draw_samples(batch)
    assert log["raml_dist_sum"] == drawn.distance.sum()
    pad, eos = task.target_dictionary.pad(), task.target_dictionary.eos()
    net = batch["net_input"]

    def seq_nll(src_tokens, src_lengths, tgt):
        tgt = tgt[tgt.ne(pad)].unsqueeze(0)
        prev = torch.cat([tgt.new_tensor([[eos]]), tgt[:, :-1]], dim=1)
        out = model(src_tokens.unsqueeze(0), src_lengths.view(1), prev)
        lp = model.get_normalized_probs(out, log_probs=True)
        return -lp.gather(-1, tgt.unsqueeze(-1)).sum()

    expected = 0.0
    for b in range(batch["target"].size(0)):
        src = net["src_tokens"][b]
        src_len = net["src_lengths"][b]
        src = src[src.ne(pad)]  # left-padded source: keep the real tokens
        ref = seq_nll(src, src_len, batch["target"][b])
        samp = sum(weights[b * L + l] * seq_nll(src, src_len, drawn.tokens[b * L + l]) for l in range(L))
        expected += (1 - alpha) * ref + alpha * samp
    torch.testing.assert_close(loss, expected.detach(), atol=1e-4, rtol=1e-5)


def test_importance_sampling_logs_ess_and_stays_finite(toy_data, mle):
    task, model, _ = mle
    L = 4
    _, _, _, raml = _setup(toy_data, "--criterion", "raml", "--raml-reward", "bleu",
                           "--raml-samples", str(L), "--raml-temperature", "0.3")
    batch = first_batch(task)
    loss, _, log = raml(model, batch)
    assert torch.isfinite(loss)
    ess = log["raml_ess_sum"] / batch["target"].size(0)
    assert 1.0 - 1e-5 <= float(ess) <= L + 1e-5
    torch.manual_seed(0)
    drawn, weights, _ = raml.draw_samples(batch)
    torch.testing.assert_close(weights.view(-1, L).sum(1), torch.ones(batch["target"].size(0)))


def test_length_one_targets_are_finite(toy_data, mle):
    task, model, _ = mle
    _, _, _, raml = _setup(toy_data, "--criterion", "raml", "--raml-alpha", "0.5",
                           "--raml-sampler", "edit", "--raml-vocab", "refs")
    task.load_dataset("train")
    ds = task.dataset("train")
    short = [i for i in range(len(ds)) if ds[i]["target"].numel() <= 2][:4]
    assert short, "toy data should contain length-1 targets"
    batch = ds.collater([ds[i] for i in short])
    loss, _, _ = raml(model, batch)
    loss.backward()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("flags, message", [
    (["--raml-samples", "0"], "--raml-samples must be >= 1"),
    (["--raml-temperature", "0"], "--raml-temperature must be > 0"),
    (["--raml-alpha", "1.5"], "--raml-alpha must be in [0, 1]"),
    (["--raml-alpha", "-0.1"], "--raml-alpha must be in [0, 1]"),
    (["--raml-lazy", "--raml-sampler", "edit"], "--raml-lazy needs a same-length sampler"),
    (["--raml-reward", "blue"], "--raml-reward: unknown reward 'blue'"),
])
def test_bad_flags_fail_at_startup(toy_data, flags, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _setup(toy_data, "--criterion", "raml", *flags)


def test_bad_flag_is_one_line_on_the_cli(toy_data, tmp_path):
    out = run_cli("train", toy_data, *BASE, "--criterion", "raml", "--raml-lazy", "--raml-sampler", "edit",
                  "--optimizer", "adam", "--max-tokens", "400", "--max-update", "1", "--save-dir", tmp_path,
                  check=False)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert [l for l in out.stderr.splitlines() if l.startswith("error:")] == [
        "error: --raml-lazy needs a same-length sampler (--raml-sampler hamming or ngram), "
        "got --raml-sampler edit"]
