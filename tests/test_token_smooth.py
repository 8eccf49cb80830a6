"""token_smooth and Tok-Seq: reductions to MLE and to each other, bad flags."""

import subprocess
import sys

import pytest
import torch

from conftest import REPO, TINY_LSTM, USER_DIR, build_training, first_batch
from fairseq_seqlevel.errors import ConfigError
from test_raml import _assert_same, _loss_and_grads

BASE = ["--user-dir", USER_DIR, "--task", "seqlevel_translation", *TINY_LSTM, "--dropout", "0",
        "--seed", "3"]


@pytest.fixture(scope="module")
def embeddings(toy_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("emb") / "emb.tgt.txt"
    subprocess.run([sys.executable, REPO / "examples" / "build_token_embeddings.py", "--data", toy_data,
                    "--lang", "tgt", "--dim", "6", "--window", "2", "--out", out], check=True,
                   capture_output=True)
    return out


@pytest.fixture(scope="module")
def mle(toy_data):
    _, task, model, criterion = build_training([toy_data, *BASE, "--criterion", "label_smoothed_cross_entropy",
                                                "--label-smoothing", "0"])
    return task, model, criterion


def _criterion(toy_data, *args):
    return build_training([toy_data, *BASE, *args])[3]


def test_alpha_zero_is_mle(toy_data, mle, embeddings):
    task, model, stock = mle
    crit = _criterion(toy_data, "--criterion", "token_smooth", "--token-smooth-alpha", "0",
                      "--token-embeddings", embeddings)
    batch = first_batch(task)
    _assert_same(_loss_and_grads(model, crit, batch), _loss_and_grads(model, stock, batch))


def test_zero_temperature_is_mle(toy_data, mle, embeddings):
    task, model, stock = mle
    crit = _criterion(toy_data, "--criterion", "token_smooth", "--token-smooth-alpha", "0.8",
                      "--token-smooth-temperature", "1e-4", "--token-smooth-beta", "0.5",
                      "--token-embeddings", embeddings)
    batch = first_batch(task)
    _assert_same(_loss_and_grads(model, crit, batch), _loss_and_grads(model, stock, batch), atol=1e-4)


def test_smoothing_moves_mass_to_neighbours(toy_data, mle, embeddings):
    """At τ = 1 the target spreads: the loss exceeds the NLL the batch logs."""
    task, model, _ = mle
    crit = _criterion(toy_data, "--criterion", "token_smooth", "--token-smooth-alpha", "1",
                      "--token-smooth-temperature", "1", "--token-embeddings", embeddings)
    loss, _, log = crit(model, first_batch(task))
    assert torch.isfinite(loss) and not torch.allclose(loss, log["nll_loss"])


def test_tok_seq_with_reference_samples_equals_token_smooth(toy_data, mle, embeddings):
    """raml whose samples all equal the reference (τ -> 0) with token smoothing
    is exactly the token_smooth criterion (eq. 17 with y_l = y*)."""
    task, model, _ = mle
    tok = ["--token-smooth-alpha", "0.6", "--token-smooth-temperature", "0.5", "--token-embeddings", embeddings]
    ts = _criterion(toy_data, "--criterion", "token_smooth", *tok)
    tokseq = _criterion(toy_data, "--criterion", "raml", "--raml-alpha", "0.5", "--raml-temperature", "1e-4",
                        *tok)
    batch = first_batch(task)
    _assert_same(_loss_and_grads(model, tokseq, batch), _loss_and_grads(model, ts, batch))


@pytest.mark.parametrize("flags, message", [
    (["--token-smooth-alpha", "2"], "--token-smooth-alpha must be in [0, 1]"),
    (["--token-smooth-temperature", "-1"], "--token-smooth-temperature must be > 0"),
    (["--token-smooth-topk", "0"], "--token-smooth-topk must be >= 1"),
    ([], "--token-embeddings FILE is required"),
])
def test_bad_flags(toy_data, flags, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _criterion(toy_data, "--criterion", "token_smooth", *flags)
