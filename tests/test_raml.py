"""raml: reductions to MLE, lazy vs non-lazy, importance weights, bad flags."""

import random

import pytest
import torch

from conftest import TINY_LSTM, USER_DIR, build_training, first_batch, run_cli
from fairseq_seqlevel.errors import ConfigError
from fairseq_seqlevel.rewards import get_reward
from fairseq_seqlevel.perturbation.samplers import RamlSamples

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


def test_alpha_zero_is_mle(toy_data, mle, monkeypatch):
    """α = 0 draws no sample at all (so --raml-lazy is irrelevant there: the
    lazy path is checked against eq. 19 by the hand computations below)."""
    task, model, stock = mle
    _, _, _, raml = _setup(toy_data, "--criterion", "raml", "--raml-alpha", "0")
    monkeypatch.setattr(raml, "draw_samples", lambda sample: pytest.fail("α = 0 drew samples"))
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


# --------------------------------------------------------------------------
# hand computations of eq. 15 / 17 / 19 with known samples and weights
# --------------------------------------------------------------------------

def write_embeddings(path, symbols_and_vectors):
    """A word2vec text file: header, then ``symbol v1 .. vD`` lines."""
    dim = len(symbols_and_vectors[0][1])
    lines = [f"{sym} " + " ".join(f"{x:.6f}" for x in vec) for sym, vec in symbols_and_vectors]
    path.write_text(f"{len(lines)} {dim}\n" + "\n".join(lines) + "\n")
    return path


def random_word_embeddings(dictionary, path, dim=4, seed=0):
    """A vector for every word of the dictionary (none for special symbols)."""
    rng = random.Random(seed)
    words = [dictionary[i] for i in range(dictionary.nspecial, len(dictionary))]
    return write_embeddings(path, [(w, [rng.gauss(0, 1) for _ in range(dim)]) for w in words])


def dense_smoothed_targets(path, dictionary, temperature):
    """R [V, V], R[y] = r(·|y) of eq. 13 over the whole vocabulary, read from
    the file directly: softmax of cos/τ over the words that have a vector
    (top-k larger than the vocabulary, β = 0); special symbols and words
    without a vector keep a one-hot row and get no mass in any row."""
    vectors = {}
    for line in path.read_text().splitlines()[1:]:
        sym, *values = line.split(" ")
        vectors[sym] = torch.tensor([float(v) for v in values], dtype=torch.float64)
    assert not any(s.startswith("madeupword") for s in dictionary.symbols)
    V = len(dictionary)
    special = {dictionary.bos(), dictionary.pad(), dictionary.eos(), dictionary.unk()}
    words = [i for i in range(V) if i not in special and dictionary[i] in vectors]
    unit = torch.stack([vectors[dictionary[i]] / vectors[dictionary[i]].norm() for i in words])
    R = torch.eye(V, dtype=torch.float64)
    for row, i in enumerate(words):
        R[i] = 0.0
        R[i, words] = torch.softmax(unit @ unit[row] / temperature, dim=0)
    return R.float()


def token_losses(lprobs, tokens, pad, R=None, alpha2=0.0):
    """Σ_t of eq. 16 for one sequence: lprobs [T, V] (row t predicts tokens[t]), tokens [T]."""
    total = 0.0
    for t, y in enumerate(tokens.tolist()):
        if y == pad:
            continue
        nll = -lprobs[t, y]
        total = total + (nll if R is None else alpha2 * -(R[y] * lprobs[t]).sum() + (1 - alpha2) * nll)
    return total


def substituted_samples(target, num_samples, pad, eos, words, seed, vary_length=False):
    """L samples per example with 1.. real substitutions each (a different word
    at every chosen position), eos kept; with ``vary_length`` the 2nd sample of
    each example also gets an inserted word and the 3rd loses its last word.
    Returns (RamlSamples, weights [B·L]): non-uniform weights summing to 1 per example."""
    gen = torch.Generator().manual_seed(seed)
    rows, distance = [], []
    for b in range(target.size(0)):
        real = [t for t in target[b].tolist() if t not in (pad, eos)]
        for l in range(num_samples):
            y = list(real)
            changed = torch.randperm(len(y), generator=gen)[: 1 + l % len(y)].tolist()
            for p in changed:
                others = [w for w in words if w != y[p]]
                y[p] = others[int(torch.randint(len(others), (1,), generator=gen))]
            if vary_length and l == 1:
                y.insert(int(torch.randint(len(y) + 1, (1,), generator=gen)), words[0])
            if vary_length and l == 2 and len(y) > 1:
                y.pop()
            rows.append(y + [eos])
            distance.append(len(changed))
    width = target.size(1) if not vary_length else max(max(len(r) for r in rows), target.size(1))
    tokens = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
    if not vary_length:  # same layout as the target: eos and pad where the target has them
        assert torch.equal(tokens.eq(pad), target.repeat_interleave(num_samples, 0).eq(pad))
    assert not torch.equal(tokens[:, : target.size(1)], target.repeat_interleave(num_samples, 0))
    weights = torch.rand(target.size(0), num_samples, generator=gen) + 0.05
    weights = (weights / weights.sum(1, keepdim=True)).view(-1)
    drawn = RamlSamples(tokens, torch.tensor(distance), torch.zeros(len(rows)))
    return drawn, weights


def _inject(monkeypatch, raml, drawn, weights):
    monkeypatch.setattr(raml, "draw_samples", lambda sample: (drawn, weights, None))


def hand_raml(model, batch, tokens, weights, alpha, num_samples, lazy, pad, eos, R=None, alpha2=0.0):
    """(loss, ref NLL, grads) of eq. 15 computed row by row.

    lazy (eq. 19): one teacher-forced forward of the reference; sample l of
    example b is read from the reference's distributions p_θ(· | y*_{<t}, x).
    Non-lazy: one forward of batch size 1 per reference and per sample row.
    Per sequence ℓ = Σ_t -log p (or eq. 16 with the dense target R when given).
    """
    model.zero_grad()
    net = batch["net_input"]
    target = batch["target"]

    def row_lprobs(b, seq):
        src = net["src_tokens"][b]
        src = src[src.ne(pad)].unsqueeze(0)  # left-padded source: keep the real tokens
        seq = seq[seq.ne(pad)]
        prev = torch.cat([seq.new_tensor([eos]), seq[:-1]]).unsqueeze(0)
        out = model(src, net["src_lengths"][b].view(1), prev)
        return model.get_normalized_probs(out, log_probs=True)[0]

    if lazy:
        ref_lprobs = model.get_normalized_probs(model(**net), log_probs=True)
    total, ref_nll = 0.0, 0.0
    for b in range(target.size(0)):
        lp_ref = ref_lprobs[b] if lazy else row_lprobs(b, target[b])
        ref_nll = ref_nll + token_losses(lp_ref, target[b], pad).detach()
        expected = 0.0
        for l in range(num_samples):
            y = tokens[b * num_samples + l]
            lp = lp_ref if lazy else row_lprobs(b, y)
            expected = expected + weights[b * num_samples + l] * token_losses(lp, y, pad, R, alpha2)
        total = total + (1 - alpha) * token_losses(lp_ref, target[b], pad, R, alpha2) + alpha * expected
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return total.detach(), ref_nll, grads


def _assert_matches_hand(got, hand, atol=1e-4):
    loss, _, log, grads = got
    hand_loss, hand_nll, hand_grads = hand
    torch.testing.assert_close(loss, hand_loss, atol=atol, rtol=1e-5)
    torch.testing.assert_close(log["nll_loss"], hand_nll, atol=atol, rtol=1e-5)
    assert grads.keys() == hand_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], hand_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.fixture(scope="module")
def sharp(toy_data):
    """A model whose predictions depend strongly on the decoder's input tokens
    (fresh weights scaled up), so scoring a sample with the reference's
    prefixes (lazy) and with its own (non-lazy) give clearly different losses."""
    _, task, model, _ = _setup(toy_data, "--criterion", "cross_entropy")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0)
    return task, model, None


def _words(task):
    d = task.target_dictionary
    return list(range(d.nspecial, len(d)))


@pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "nonlazy"])
def test_raml_equals_hand_computation_with_substitutions(toy_data, sharp, monkeypatch, lazy):
    """Eq. 15 (non-lazy) / eq. 19 (lazy) with known samples that differ from the
    reference and known non-uniform weights: loss, logged NLL and gradients."""
    task, model, _ = sharp
    alpha, L = 0.6, 3
    _, _, _, raml = _setup(toy_data, "--criterion", "raml", "--raml-alpha", str(alpha),
                           "--raml-samples", str(L), *(["--raml-lazy"] if lazy else []))
    batch = first_batch(task, n=6)
    pad, eos = task.target_dictionary.pad(), task.target_dictionary.eos()
    drawn, weights = substituted_samples(batch["target"], L, pad, eos, _words(task), seed=1,
                                         vary_length=not lazy)
    _inject(monkeypatch, raml, drawn, weights)
    got = _loss_and_grads(model, raml, batch)
    assert got[2]["raml_dist_sum"] == drawn.distance.sum() > 0
    _assert_matches_hand(got, hand_raml(model, batch, drawn.tokens, weights, alpha, L, lazy, pad, eos))
    if lazy:  # the lazy and the full computation really differ on this model
        other = hand_raml(model, batch, drawn.tokens, weights, alpha, L, False, pad, eos)[0]
        assert abs(other - got[0]) > 0.1


@pytest.fixture(scope="module")
def word_embeddings(sharp, tmp_path_factory):
    task = sharp[0]
    return random_word_embeddings(task.target_dictionary, tmp_path_factory.mktemp("hand_emb") / "emb.txt")


@pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "nonlazy"])
def test_tok_seq_equals_hand_computation_with_dense_targets(toy_data, sharp, word_embeddings, monkeypatch, lazy):
    """Tok-Seq (eq. 17): every sequence, reference and samples (which differ
    from it), takes the eq. 16 loss with the dense smoothed target."""
    task, model, _ = sharp
    alpha, alpha2, tau, L = 0.5, 0.7, 0.6, 3
    _, _, _, raml = _setup(toy_data, "--criterion", "raml", "--raml-alpha", str(alpha),
                           "--raml-samples", str(L), *(["--raml-lazy"] if lazy else []),
                           "--token-smooth-alpha", str(alpha2), "--token-smooth-temperature", str(tau),
                           "--token-embeddings", word_embeddings)
    batch = first_batch(task, n=6)
    pad, eos = task.target_dictionary.pad(), task.target_dictionary.eos()
    drawn, weights = substituted_samples(batch["target"], L, pad, eos, _words(task), seed=2,
                                         vary_length=not lazy)
    _inject(monkeypatch, raml, drawn, weights)
    R = dense_smoothed_targets(word_embeddings, task.target_dictionary, tau)
    assert (R[_words(task)] > 0.05).sum(1).min() > 1  # the targets really are spread out
    got = _loss_and_grads(model, raml, batch)
    hand = hand_raml(model, batch, drawn.tokens, weights, alpha, L, lazy, pad, eos, R=R, alpha2=alpha2)
    _assert_matches_hand(got, hand)


@pytest.mark.parametrize("weighting", ["importance", "reward"])
def test_importance_weights_equal_softmax_of_reward_over_tau_minus_log_q(toy_data, sharp, monkeypatch, weighting):
    """--raml-reward bleu: per example the weights are softmax_l(BLEU(y_l, refs)/τ_r
    - log q(y_l)) with BLEU recomputed row by row from the reward library
    against all references, and the loss is the sum weighted by them; with
    --raml-weighting reward, softmax_l(BLEU/τ_r) without the proposal's log q."""
    task, model, _ = sharp
    alpha, L, tau_r = 0.7, 4, 0.05
    _, _, _, raml = _setup(toy_data, "--criterion", "raml", "--raml-alpha", str(alpha),
                           "--raml-reward", "bleu", "--raml-reward-temperature", str(tau_r),
                           "--raml-samples", str(L), "--raml-temperature", "0.4", "--raml-weighting", weighting)
    batch = first_batch(task, n=8)
    pad, eos = task.target_dictionary.pad(), task.target_dictionary.eos()
    used = []
    draw = raml.draw_samples
    monkeypatch.setattr(raml, "draw_samples", lambda sample: used.append(draw(sample)) or used[-1])
    got = _loss_and_grads(model, raml, batch, seed=4)
    (drawn, weights, ess), = used

    bleu = get_reward("bleu")
    refs = batch["references"]
    assert refs.size(1) == 2  # the target and ref2
    expected = torch.empty(len(weights))
    for b in range(batch["target"].size(0)):
        rows = range(b * L, (b + 1) * L)
        scores = torch.cat([bleu(drawn.tokens[i:i + 1], refs[b:b + 1], pad, eos) for i in rows])
        log_q = drawn.log_q[b * L:(b + 1) * L].double() if weighting == "importance" else 0.0
        expected[b * L:(b + 1) * L] = torch.softmax(scores.double() / tau_r - log_q, dim=0).float()
    torch.testing.assert_close(weights, expected, atol=1e-5, rtol=1e-4)
    spread = expected.view(-1, L).max(1).values - expected.view(-1, L).min(1).values
    assert spread.max() > 0.2  # really non-uniform
    torch.testing.assert_close(ess, 1.0 / expected.view(-1, L).pow(2).sum(1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[2]["raml_ess_sum"], ess.sum())
    _assert_matches_hand(got, hand_raml(model, batch, drawn.tokens, expected, alpha, L, False, pad, eos))


def test_ngram_without_raml_reward_is_weighted_with_the_task_reward(toy_data, mle):
    """ngram is a proposal only: without --raml-reward its samples are
    importance-weighted with the task's --reward (here edit, not the bleu
    default), exactly as with an explicit --raml-reward edit, and raml_ess is logged."""
    from fairseq.logging import metrics

    task, model, _ = mle
    L = 4
    common = ["--criterion", "raml", "--raml-sampler", "ngram", "--raml-samples", str(L),
              "--raml-temperature", "0.2", "--reward", "edit"]
    crits = {"task": _setup(toy_data, *common)[3],
             "edit": _setup(toy_data, *common, "--raml-reward", "edit")[3],
             "bleu": _setup(toy_data, *common, "--raml-reward", "bleu")[3]}
    assert crits["task"].reward is not None and crits["task"].reward.name == "edit"
    batch = first_batch(task)
    drawn = {}
    for name, crit in crits.items():
        torch.manual_seed(7)
        drawn[name] = crit.draw_samples(batch)
    (samples, weights, ess), (samples_e, weights_e, ess_e) = drawn["task"], drawn["edit"]
    assert torch.equal(samples.tokens, samples_e.tokens) and torch.equal(samples.tokens, drawn["bleu"][0].tokens)
    torch.testing.assert_close(weights, weights_e)
    torch.testing.assert_close(ess, ess_e)
    assert not torch.allclose(weights, drawn["bleu"][1])  # the task's reward, not a fixed default
    grouped = weights.view(-1, L)
    assert (grouped.max(1).values - grouped.min(1).values).max() > 0.1  # not the proposal's 1/L
    assert (ess < L - 1e-3).any()

    _, _, log = crits["task"](model, batch)
    assert "raml_ess_sum" in log
    with metrics.aggregate() as agg:
        type(crits["task"]).reduce_metrics([log])
        logged = agg.get_smoothed_values()
    assert 1.0 <= logged["raml_ess"] <= L
