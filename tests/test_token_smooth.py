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


ARCHS = {
    "lstm": TINY_LSTM,
    "lstm_shared": [*TINY_LSTM, "--share-decoder-input-output-embed"],
    "transformer": ["--arch", "transformer", "--encoder-layers", "1", "--decoder-layers", "1",
                    "--encoder-embed-dim", "16", "--decoder-embed-dim", "16",
                    "--encoder-ffn-embed-dim", "32", "--decoder-ffn-embed-dim", "32",
                    "--encoder-attention-heads", "2", "--decoder-attention-heads", "2"],
}


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("tok_seq", [False, True], ids=["raml", "tok_seq"])
def test_chunked_output_layer_equals_autograd(toy_data, embeddings, arch, tok_seq, monkeypatch):
    """raml's fused, chunked projection + log-softmax + loss gives the loss,
    the logged NLL and every parameter gradient of the plain autograd path."""
    from fairseq_seqlevel.decoding import teacher_forcing

    monkeypatch.setattr(teacher_forcing, "CHUNK_LOGITS", 200)  # several chunks of a few rows
    tok = (["--token-smooth-alpha", "0.4", "--token-smooth-temperature", "0.5", "--token-embeddings",
            embeddings] if tok_seq else [])
    argv = [toy_data, "--user-dir", USER_DIR, "--task", "seqlevel_translation", *ARCHS[arch],
            "--dropout", "0", "--seed", "3", "--criterion", "raml", "--raml-alpha", "0.6",
            "--raml-temperature", "0.5", "--raml-samples", "3", *tok]
    _, task, model, raml = build_training(argv)
    batch = first_batch(task)
    out = model.decoder.extract_features(batch["net_input"]["prev_output_tokens"],
                                         encoder_out=model.encoder(batch["net_input"]["src_tokens"],
                                                                   src_lengths=batch["net_input"]["src_lengths"]))[0]
    assert teacher_forcing.fused_projection_supported(model, out)
    raml.fused = None
    fused = _loss_and_grads(model, raml, batch, seed=5)
    assert fused[2]["raml_dist_sum"] > 0
    raml.fused = False
    plain = _loss_and_grads(model, raml, batch, seed=5)
    _assert_same(fused, plain)
    # the fused gradients are scaled by the incoming gradient (fp16 loss scaling, sums of losses)
    raml.fused = None
    model.zero_grad()
    torch.manual_seed(5)
    (3.0 * raml(model, batch)[0]).backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, 3.0 * fused[3][name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_lazy_sample_losses_equal_expanded_scoring(toy_data, embeddings, alpha):
    """raml --raml-lazy reads L samples from the reference's [B, T, V] distributions:
    the vocabulary-axis gather equals scoring the expanded [B, L, T, V] tensor."""
    from fairseq_seqlevel.smoothing.losses import lazy_sample_losses, smoothed_sequence_loss

    tok = ["--token-smooth-alpha", "0.6", "--token-smooth-temperature", "0.5", "--token-embeddings", embeddings]
    crit = _criterion(toy_data, "--criterion", "token_smooth", *tok)
    B, L, T, V, pad = 3, 4, 5, crit.token_targets.vocab_size, 1
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(B, T, V, generator=gen)
    samples = torch.randint(4, V, (B, L, T), generator=gen)
    samples[0, 1, 3:] = pad
    x1 = logits.clone().requires_grad_()
    loss1, nll1 = lazy_sample_losses(torch.log_softmax(x1, -1), samples, pad, crit.token_targets, alpha, 0.5)
    x2 = logits.clone().requires_grad_()
    expanded = torch.log_softmax(x2, -1).unsqueeze(1).expand(-1, L, -1, -1)
    loss2, nll2 = smoothed_sequence_loss(expanded, samples, pad, crit.token_targets, alpha, 0.5)
    torch.testing.assert_close(loss1, loss2)
    torch.testing.assert_close(nll1, nll2)
    assert loss1[0, 1, 3:].eq(0).all()
    w = torch.rand(B, L, T, generator=gen)
    (w * loss1).sum().backward()
    (w * loss2).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)


def test_eos_keeps_a_one_hot_target_even_with_a_vector(toy_data, mle, tmp_path):
    """</s> has a vector in the file, almost equal to a word's: at eos positions
    the loss is the plain NLL, and no word's smoothed target gives eos mass."""
    from test_raml import dense_smoothed_targets, write_embeddings

    task, model, _ = mle
    d = task.target_dictionary
    pad, eos = d.pad(), d.eos()
    gen = torch.Generator().manual_seed(0)
    words = {d[i]: torch.randn(4, generator=gen).tolist() for i in range(d.nspecial, len(d))}
    twin = d[d.nspecial + 1]  # the word whose direction eos nearly shares
    eos_vector = [x * 1.5 + 1e-3 for x in words[twin]]
    emb = write_embeddings(tmp_path / "emb.txt", [("</s>", eos_vector), *words.items()])
    alpha, tau = 0.8, 0.3
    crit = _criterion(toy_data, "--criterion", "token_smooth", "--token-smooth-alpha", str(alpha),
                      "--token-smooth-temperature", str(tau), "--token-embeddings", emb)
    batch = first_batch(task)
    target = batch["target"]
    assert target.eq(eos).any() and target.eq(d.index(twin)).any()
    lprobs = model.get_normalized_probs(model(**batch["net_input"]), log_probs=True).detach()

    def loss_on(kept):  # the criterion's loss with every other target position padded away
        sample = dict(batch, target=target.masked_fill(~kept, pad))
        with torch.no_grad():
            return crit(model, sample)[0]

    at_eos = target.eq(eos)
    nll_eos = -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)[at_eos].sum()
    torch.testing.assert_close(loss_on(at_eos), nll_eos)

    R = dense_smoothed_targets(emb, d, tau)  # eos: one-hot row, zero column
    assert R[eos, eos] == 1 and R[:, eos].sum() == 1
    at_words = target.ne(eos) & target.ne(pad)
    y = target[at_words]
    lp = lprobs[at_words]
    hand = (alpha * -(R[y] * lp).sum(-1) + (1 - alpha) * -lp.gather(-1, y.unsqueeze(-1)).squeeze(-1)).sum()
    torch.testing.assert_close(loss_on(at_words), hand)
