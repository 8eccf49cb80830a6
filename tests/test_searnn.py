"""searnn_kl: reductions to MLE and label smoothing, brute-force costs, the batched
roll-out engine against one-by-one greedy decoding, sampling, bad flags."""

import math

import pytest
import torch
from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss
from fairseq.logging import metrics

from conftest import ARCHS, TINY_LSTM, USER_DIR, build_training, first_batch, mle_steps, run_cli
from fairseq_seqlevel import rewards
from fairseq_seqlevel.criterions import searnn
from fairseq_seqlevel.errors import ConfigError
from fairseq_seqlevel.decoding import rollouts
from test_raml import _assert_same, _loss_and_grads

REFERENCE = ["--searnn-roll-in", "reference", "--searnn-roll-out", "reference"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _build(toy_data, *args, arch="lstm", task="seqlevel_translation", seed=3):
    torch.manual_seed(seed)
    return build_training([toy_data, "--user-dir", USER_DIR, "--task", task, *ARCHS[arch],
                           "--dropout", "0", "--seed", str(seed), *args])


def _searnn(toy_data, *args, **kw):
    return _build(toy_data, "--criterion", "searnn_kl", *args, **kw)


def _stock_mle(toy_data, arch="lstm", extra=()):
    return _build(toy_data, "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0",
                  *extra, arch=arch)


def _pretrain(toy_data, arch, steps, lr=0.02):
    """A few MLE steps: greedy outputs that vary and stop."""
    _, task, model, _ = _stock_mle(toy_data, arch)
    return task, mle_steps(task, model, steps, lr)


@pytest.fixture(scope="module")
def pretrained(toy_data):
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = _pretrain(toy_data, arch, steps={"lstm": 40, "transformer": 30}[arch])
        return cache[arch]

    return get


def _allowed_ids(dictionary, with_eos=True):
    special = {dictionary.bos(), dictionary.pad(), dictionary.unk()} | (set() if with_eos else {dictionary.eos()})
    return [i for i, s in enumerate(dictionary.symbols) if i not in special and not s.startswith("madeupword")]


def _full_greedy(model, src, src_len, prefix, cap, pad, eos, bos=None):
    """One row, one full (non-incremental) forward per token from ``[bos] + prefix``
    (bos: eos by default) until ``eos`` (forced at output position cap - 1): the
    reference decoder."""
    out = list(prefix)
    while not out or out[-1] != eos:
        if len(out) >= cap - 1:
            out.append(eos)
            break
        prev = torch.tensor([[eos if bos is None else bos] + out])
        lp = model.get_normalized_probs(model(src.unsqueeze(0), src_len.view(1), prev), log_probs=True)[0, -1]
        lp[pad] = -math.inf
        out.append(int(lp.argmax()))
    return out


def _strip(tokens, pad):
    return [int(x) for x in tokens if int(x) != pad]


# ------------------------------------------------------------- reductions


@pytest.mark.parametrize("arch", ["lstm", "transformer"])
def test_ll_reference_hamming_is_mle(toy_data, arch):
    """Eq. 3 with reference roll-in/out under Hamming: a* is the ground truth at
    every cell (two references: ties with the shorter one go to the ground
    truth), so loss, nll, sample_size and gradients are MLE's."""
    refs = ["--extra-references", "ref2"]
    _, task, model, stock = _stock_mle(toy_data, arch, refs)
    _, _, _, crit = _searnn(toy_data, *refs, "--reward", "hamming", "--searnn-loss", "ll", *REFERENCE, arch=arch)
    batch = first_batch(task)
    got = _loss_and_grads(model, crit, batch)
    _assert_same(got, _loss_and_grads(model, stock, batch))
    log = got[2]
    assert log["sample_size"] == batch["ntokens"] == log["searnn_cells"]
    assert log["searnn_gt_best"] == log["searnn_cells"] and log["searnn_rollin_cost"] == 0
    # the logged metrics are MLE's too
    logged = []
    for c, lg in [(type(crit), log), (type(stock), _loss_and_grads(model, stock, batch)[2])]:
        with metrics.aggregate(new_root=True) as agg:
            c.reduce_metrics([lg])
            logged.append(agg.get_smoothed_values())
    assert logged[0]["loss"] == logged[1]["loss"] and logged[0]["nll_loss"] == logged[1]["nll_loss"]
    assert logged[0]["searnn_gt_best"] == 1.0


def test_mle_weight_mixes_searnn_with_the_reference_nll(toy_data, pretrained):
    """--searnn-mle-weight w: loss and gradients are (1 - w)·(w = 0) + w·(w = 1);
    w = 1 with reference roll-in and all cells is stock MLE (each sentence's mean
    token NLL counted once per scored cell = its summed NLL); the reference rides
    in the roll-ins' forward without changing their scores."""
    task, trained = pretrained("lstm")
    weights = trained.state_dict()
    flags = ["--reward", "edit", "--searnn-roll-in", "learned", "--searnn-roll-out", "mixed",
             "--searnn-cells", "2", "--searnn-tokens", "3", "--searnn-token-sampling", "biased"]
    batch = first_batch(task)

    def run(*args):
        _, _, model, crit = _searnn(toy_data, *args)
        model.load_state_dict(weights)
        return _loss_and_grads(model, crit, batch)

    got = {w: run(*flags, "--searnn-mle-weight", str(w)) for w in (0.0, 0.3, 1.0)}
    assert got[1.0][1] == got[0.0][1] == got[0.3][1] < batch["ntokens"]
    torch.testing.assert_close(got[0.3][0], 0.7 * got[0.0][0] + 0.3 * got[1.0][0], atol=1e-5, rtol=1e-5)
    for name, grad in got[0.3][3].items():
        torch.testing.assert_close(grad, 0.7 * got[0.0][3][name] + 0.3 * got[1.0][3][name], atol=1e-6, rtol=1e-4)
    # the logged nll (roll-in cells) and the search do not depend on w
    assert got[0.3][2]["nll_loss"] == pytest.approx(float(got[0.0][2]["nll_loss"]), rel=1e-5)
    assert got[0.3][2]["searnn_gt_best"] == got[0.0][2]["searnn_gt_best"]

    _, _, model, stock = _stock_mle(toy_data)
    model.load_state_dict(weights)
    mle = _loss_and_grads(model, stock, batch)
    only_mle = run("--reward", "edit", *REFERENCE, "--searnn-mle-weight", "1")
    assert only_mle[1] == batch["ntokens"]
    torch.testing.assert_close(only_mle[0], mle[0], atol=1e-5, rtol=1e-5)
    for name, grad in mle[3].items():
        torch.testing.assert_close(only_mle[3][name], grad, atol=1e-6, rtol=1e-4)


def test_kl_reference_hamming_is_label_smoothing(toy_data):
    """Appendix C.1: with Hamming costs counted in tokens, KL is label smoothing
    with ε = (V'-1)e^{-α}/(1+(V'-1)e^{-α}) over the V' scored tokens (eos scored
    only at the end: V' differs there)."""
    alpha = 1.5
    _, task, model, _ = _stock_mle(toy_data)
    _, _, _, crit = _searnn(toy_data, "--reward", "hamming", "--searnn-loss", "kl", "--searnn-scale", str(alpha),
                            "--searnn-cost-unit", "token", "--searnn-eos-candidate", "gt", *REFERENCE)
    batch = first_batch(task)
    got = _loss_and_grads(model, crit, batch)

    d = task.target_dictionary
    pad, eos = d.pad(), d.eos()
    model.zero_grad()
    net = model(**batch["net_input"])
    lprobs = model.get_normalized_probs(net, log_probs=True)
    target = batch["target"]
    loss = nll = 0.0
    words = torch.tensor(_allowed_ids(d, with_eos=False))
    for where, scored in [(target.ne(pad) & target.ne(eos), words),
                          (target.eq(eos), torch.cat([words, torch.tensor([eos])]))]:
        v = scored.numel()
        eps = (v - 1) * math.exp(-alpha) / (1 + (v - 1) * math.exp(-alpha))
        column = (scored.unsqueeze(0) == target[where].unsqueeze(1)).long().argmax(dim=1)
        part, part_nll = label_smoothed_nll_loss(lprobs[where][:, scored], column, eps, reduce=True)
        loss, nll = loss + part, nll + part_nll
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    expected = (loss.detach(), batch["ntokens"], {"nll_loss": nll.detach()}, grads)
    _assert_same(got, expected)


# ------------------------------------------------------ brute force, engine


def _hand_built_sample(task, model, cap_b):
    """One source word and a one-word target (two steps: the word, eos) that
    the model's greedy roll-in gets wrong; the source whose greedy output is
    shortest (two steps too, with the pretrained model)."""
    src_dict, d = task.source_dictionary, task.target_dictionary
    pad, eos = d.pad(), d.eos()
    words = [i for i in _allowed_ids(d, with_eos=False)]
    best = None
    with torch.no_grad():
        model.eval()
        for w in words:
            src = torch.tensor([src_dict.index(d[w]), eos])
            out = _full_greedy(model, src, torch.tensor(2), [], 2 + cap_b, pad, eos)
            if out[0] != eos and (best is None or len(out) < len(best[1])):
                best = (src, out)
        model.train()
    assert best is not None, "the random model always stops at once"
    src, rollin = best
    x = next(w for w in words if w != rollin[0])
    sample = {"id": torch.tensor([0]), "nsentences": 1, "ntokens": 2,
              "net_input": {"src_tokens": src.unsqueeze(0), "src_lengths": torch.tensor([2]),
                            "prev_output_tokens": torch.tensor([[eos, x]])},
              "target": torch.tensor([[x, eos]])}
    return sample, rollin


def _levenshtein(a, b):
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def test_two_step_learned_rollin_costs_by_brute_force(toy_data, pretrained):
    cap_b, alpha = 2, 3.0
    task, model = pretrained("lstm")
    _, _, _, crit = _searnn(toy_data, "--reward", "edit", "--searnn-roll-in", "learned",
                                   "--searnn-roll-out", "learned", "--searnn-max-len-b", str(cap_b),
                                   "--searnn-scale", str(alpha))
    d = task.target_dictionary
    pad, eos = d.pad(), d.eos()
    sample, rollin = _hand_built_sample(task, model, cap_b)
    x = int(sample["target"][0, 0])
    src, src_len = sample["net_input"]["src_tokens"][0], sample["net_input"]["src_lengths"][0]
    assert len(rollin) == 2 and rollin[0] != x  # the learned roll-in deviates: [y, eos], y != x

    found = crit.search(model, sample)
    assert _strip(found.rollin[0], pad) == rollin
    assert found.cell_pos.tolist() == list(range(len(rollin)))
    scored = sorted(set(_allowed_ids(d)) | {x})
    lprobs = model.get_normalized_probs(
        model(src.unsqueeze(0), src_len.view(1), torch.tensor([[eos] + rollin[:-1]])), log_probs=True)[0]
    expected_loss = 0.0
    with torch.no_grad():
        for m, t in enumerate(found.cell_pos.tolist()):
            cand = found.candidates[m][found.valid[m]].tolist()
            assert sorted(cand) == scored and cand[0] == (x if t == 0 else eos)
            costs = []
            for a in cand:  # brute force: decode, then normalized edit distance to [x]
                hyp = _full_greedy(model, src, src_len, rollin[:t] + [a], 2 + cap_b, pad, eos)
                costs.append(_levenshtein(hyp[:-1], [x]) / 1.0)
            costs = torch.tensor(costs)
            torch.testing.assert_close(found.costs[m][found.valid[m]], costs)
            target = torch.softmax(-alpha * costs, dim=0)
            expected_loss = expected_loss - (target * lprobs[t, torch.tensor(cand)]).sum()
    loss, sample_size, log = crit(model, sample)
    assert sample_size == len(rollin) and log["searnn_rollin_cost"] == pytest.approx(
        _levenshtein(rollin[:-1], [x]))
    torch.testing.assert_close(loss, expected_loss.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["lstm", "transformer"])
def test_batched_rollouts_equal_one_by_one_greedy(toy_data, pretrained, arch):
    cap_b = 3
    task, model = pretrained(arch)
    _, _, _, crit = _searnn(toy_data, "--reward", "edit", "--searnn-roll-in", "learned",
                                   "--searnn-roll-out", "learned", "--searnn-cells", "2", "--searnn-tokens", "3",
                                   "--searnn-token-sampling", "policy", "--searnn-max-len-b", str(cap_b),
                                   arch=arch, seed=5)
    pad, eos = task.target_dictionary.pad(), task.target_dictionary.eos()
    batch = first_batch(task, n=5)
    torch.manual_seed(0)
    found = crit.search(model, batch)
    assert found.num_decoded > 0 and found.hyps.size(0) == int(found.valid.sum())
    net, target = batch["net_input"], batch["target"]
    caps = target.ne(pad).sum(1) + cap_b
    model.eval()
    with torch.no_grad():
        srcs = [net["src_tokens"][b][net["src_tokens"][b].ne(pad)] for b in range(target.size(0))]
        for b in range(target.size(0)):
            expected = _full_greedy(model, srcs[b], net["src_lengths"][b], [], int(caps[b]), pad, eos)
            assert _strip(found.rollin[b], pad) == expected
        for hyp, m, j in zip(found.hyps, found.hyp_cells.tolist(), found.hyp_columns.tolist()):
            b, t = int(found.cell_rows[m]), int(found.cell_pos[m])
            prefix = _strip(found.rollin[b], pad)[:t] + [int(found.candidates[m, j])]
            expected = _full_greedy(model, srcs[b], net["src_lengths"][b], prefix, int(caps[b]), pad, eos)
            assert _strip(hyp, pad) == expected, (b, t, prefix)


def test_expanded_state_follows_any_row_order_transformer(toy_data):
    """A roll-out batch with as many rows as the roll-in, in another order: the
    encoder-decoder attention cache must follow (fairseq skips it then)."""
    _, task, model, _ = _searnn(toy_data, arch="transformer", seed=7)
    pad, eos = task.target_dictionary.pad(), task.target_dictionary.eos()
    batch = first_batch(task, n=4)
    model.eval()
    with torch.no_grad():
        enc = model.encoder(batch["net_input"]["src_tokens"], src_lengths=batch["net_input"]["src_lengths"])
        rollin = batch["target"]
        steps = rollouts.replay(model, enc, rollin, pad, eos)
        _, _, state = next(steps)  # has consumed eos; a roll-out feeds its token at position 0
        order = torch.tensor([3, 0, 3, 1])
        expanded = rollouts.expand_incremental_state(model, state, order)
        tokens = torch.cat([torch.full((4, 1), eos), rollin[order, :1]], dim=1)
        got = rollouts.decoder_step(model, tokens, model.encoder.reorder_encoder_out(enc, order), expanded)
        full = model.get_normalized_probs(model.decoder(tokens, encoder_out=model.encoder.reorder_encoder_out(
            enc, order)), log_probs=True)[:, -1]
        torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)
        _, lprobs1, _ = next(steps)  # the replay is unaffected by the expansion
        plain = model.get_normalized_probs(model.decoder(torch.cat([torch.full((4, 1), eos), rollin[:, :1]], 1),
                                                         encoder_out=enc), log_probs=True)[:, -1]
        torch.testing.assert_close(lprobs1, plain, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------- policies, sampling


def test_mix_prob_extremes_are_the_pure_policies(toy_data):
    mixed = ["--searnn-roll-in", "mixed", "--searnn-roll-out", "mixed", "--searnn-tokens", "2"]
    _, task, model, one = _searnn(toy_data, *mixed, "--searnn-mix-prob", "1")
    _, _, _, zero = _searnn(toy_data, *mixed, "--searnn-mix-prob", "0")
    _, _, _, learned = _searnn(toy_data, "--searnn-tokens", "2", "--searnn-roll-in", "learned")
    batch = first_batch(task, n=6)
    ref = one.search(model, batch)
    assert bool(ref.reference_in.all() and ref.reference_out.all()) and ref.num_decoded == 0
    pad = task.target_dictionary.pad()
    assert torch.equal(ref.rollin, batch["target"][:, :ref.rollin.size(1)])
    assert ref.rollin.ne(pad).sum() == batch["ntokens"]
    got, want = zero.search(model, batch), learned.search(model, batch)
    assert not bool(got.reference_in.any() or got.reference_out.any()) and got.num_decoded > 0
    assert torch.equal(got.rollin, want.rollin)


def test_select_tokens_gt_first_no_specials_no_duplicates():
    torch.manual_seed(0)
    vocab, m, k, w = 12, 50, 4, 2
    allowed = torch.ones(vocab, dtype=torch.bool)
    allowed[[0, 1, 3]] = False  # bos, pad, unk
    gt = torch.randint(4, vocab, (m,))
    gt[0] = 3  # a special ground truth is still scored
    lprobs = torch.randn(m, vocab).log_softmax(-1)
    neighbours = torch.randint(0, vocab, (m, 2 * w))
    for strategy in searnn.TOKEN_SAMPLINGS:
        cand, valid = searnn.select_tokens(gt, lprobs, allowed, k, strategy, neighbours,
                                           torch.ones_like(neighbours, dtype=torch.bool))
        assert torch.equal(cand[:, 0], gt) and bool(valid[:, 0].all())
        assert bool(valid[:, 1:1 + k].all())  # 8 allowed tokens besides gt >= k
        for row, ok in zip(cand.tolist(), valid.tolist()):
            kept = [tok for tok, v in zip(row, ok) if v]
            assert len(kept) == len(set(kept))
            assert all(allowed[tok] for tok in kept[1:])
        nb_expected = [[tok for tok in dict.fromkeys(r) if allowed[tok] and tok not in c[:1 + k]]
                       for r, c in zip(neighbours.tolist(), cand.tolist())]
        assert [sorted(c[1 + k:][i] for i in range(2 * w) if v[1 + k + i]) for c, v in
                zip(cand.tolist(), valid.tolist())] == [sorted(n) for n in nb_expected]
        if strategy == "topk":
            keys = lprobs.masked_fill(~allowed, -math.inf).scatter(1, gt.unsqueeze(1), -math.inf)
            assert torch.equal(cand[:, 1:1 + k], keys.topk(k, dim=1).indices)
    # k larger than what is available: the rest is invalid; k = 0 scores everything allowed once
    cand, valid = searnn.select_tokens(gt, lprobs, allowed, 20, "uniform")
    assert valid.sum(1).tolist() == [1 + int(allowed.sum()) - int(allowed[g]) for g in gt.tolist()]
    cand, valid = searnn.select_tokens(gt, None, allowed, 0, "uniform")
    assert all(sorted(set(c[v].tolist())) == sorted(set(allowed.nonzero().squeeze(1).tolist()) | {g})
               and int(v.sum()) == len(set(c[v].tolist())) for c, v, g in zip(cand, valid, gt.tolist()))


def test_sampled_losses_restrict_the_softmax():
    torch.manual_seed(1)
    lprobs = torch.randn(3, 9).log_softmax(-1)
    cand = torch.tensor([[2, 5, 7], [4, 1, 1], [8, 0, 3]])
    valid = torch.tensor([[True, True, True], [True, True, False], [True, False, False]])
    costs = torch.tensor([[0.5, 0.2, 0.9], [0.0, 0.0, math.inf], [1.0, math.inf, math.inf]])
    lp = searnn.candidate_log_probs(lprobs, cand, valid, restrict=True)
    torch.testing.assert_close(lp.exp().sum(1), torch.ones(3))
    assert searnn.best_candidate(costs, valid).tolist() == [1, 0, 0]  # ties go to the ground truth
    full = searnn.candidate_log_probs(lprobs, cand, valid, restrict=False)
    assert torch.equal(full[valid], lprobs.gather(1, cand)[valid])
    q = searnn.cost_target(costs, valid, 2.0)
    torch.testing.assert_close(q[0], torch.softmax(-2.0 * costs[0], 0))
    torch.testing.assert_close(searnn.kl_loss(lp, costs, valid, 2.0), -(q * lp.masked_fill(~valid, 0)).sum(1))
    assert torch.isfinite(searnn.ll_loss(lp, costs, valid)).all()


def test_best_suffix_reference_rollout_maximizes_bleu1():
    pad, eos = 1, 2
    target = torch.tensor([[5, 6, 7, 8, eos, pad], [5, 5, 9, eos, pad, pad], [7, eos, pad, pad, pad, pad]])
    prefix = torch.tensor([[5, 7], [9, 4], [3, 7]])
    copy_start = torch.tensor([2, 2, 2])

    def bleu1(h, r):
        return rewards.sentence_bleu(h, r, pad, eos, max_order=1)

    got = rollouts.best_suffix_starts(prefix, target, pad, eos, bleu1, copy_start)
    for n in range(3):
        length = int(target[n].ne(pad).sum())
        scores = []
        for j in range(length):
            hyp = torch.tensor([prefix[n].tolist() + target[n, j:length].tolist()])
            scores.append(float(bleu1(hyp, target[n:n + 1])))
        best = max(scores)
        ties = [j for j, s in enumerate(scores) if s == best]
        assert int(got[n]) == min(ties, key=lambda j: abs(j - 2)), (n, scores)
    assert got.tolist()[0] == 1  # [5, 7] + [6, 7, 8] (0.8) beats the copy [5, 7] + [7, 8] (0.75)
    suffix = rollouts.gather_suffix(target, torch.tensor([4, 9, 1]), pad, eos)
    assert suffix[:, 0].tolist() == [eos, eos, eos]


# --------------------------------------------------------------- robustness


@pytest.mark.parametrize("loss, tokens, sampling, reward", [
    ("kl", "0", "topk", "hamming"), ("ll", "2", "biased", "bleu"), ("kl", "3", "uniform", "edit"),
])
def test_length_one_targets_and_immediate_eos_are_finite(toy_data, loss, tokens, sampling, reward):
    _, task, model, crit = _searnn(toy_data, "--reward", reward, "--searnn-loss", loss, "--searnn-tokens", tokens,
                                   "--searnn-token-sampling", sampling, "--searnn-neighbours", "1",
                                   "--searnn-roll-in", "mixed")
    d = task.target_dictionary
    eos = d.eos()
    src = torch.tensor([[task.source_dictionary.index("w1"), eos], [task.source_dictionary.index("w2"), eos]])
    target = torch.tensor([[eos, d.pad()], [d.index("w4"), eos]])
    sample = {"id": torch.arange(2), "nsentences": 2, "ntokens": 3,
              "net_input": {"src_tokens": src, "src_lengths": torch.tensor([2, 2]),
                            "prev_output_tokens": torch.tensor([[eos, d.pad()], [eos, d.index("w4")]])},
              "target": target}
    for eos_bias in (0.0, 50.0):  # 50: every learned roll-in is just eos
        with torch.no_grad():
            model.decoder.fc_out.bias[eos] += eos_bias
        model.zero_grad()
        out, sample_size, log = crit(model, sample)
        out.backward()
        assert torch.isfinite(out) and sample_size >= 2
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        assert 0 <= float(log["searnn_gt_best"]) <= log["searnn_cells"]


def test_stock_translation_task_uses_hamming_and_bleu_uses_best_suffix(toy_data):
    _, task, model, crit = _searnn(toy_data, "--searnn-tokens", "2", task="translation")
    assert crit.reward.name == "hamming" and not crit.best_suffix
    loss, _, _ = crit(model, first_batch(task, n=4))
    assert torch.isfinite(loss)
    _, _, _, crit = _searnn(toy_data, "--reward", "bleu")
    assert crit.reward.name == "bleu" and crit.best_suffix
    _, _, _, crit = _searnn(toy_data, "--reward", "bleu", "--searnn-reward", "edit", "--searnn-ref-policy", "copy")
    assert crit.reward.name == "edit" and not crit.best_suffix


@pytest.mark.parametrize("flags, message", [
    (["--searnn-cells", "-1"], "--searnn-cells must be >= 0"),
    (["--searnn-tokens", "-2"], "--searnn-tokens must be >= 0"),
    (["--searnn-scale", "0"], "--searnn-scale must be > 0"),
    (["--searnn-mix-prob", "1.5"], "--searnn-mix-prob must be in [0, 1]"),
    (["--searnn-neighbours", "-1"], "--searnn-neighbours must be >= 0"),
    (["--searnn-max-len-ref-b", "-1"], "--searnn-max-len-ref-b must be >= 0"),
    (["--searnn-max-len-b", "-1"], "--searnn-max-len-ref-b must be >= 0"),  # the deprecated name
    (["--searnn-reward", "blue"], "--searnn-reward: unknown reward 'blue'"),
    (["--searnn-mle-weight", "1.5"], "--searnn-mle-weight must be in [0, 1]"),
])
def test_bad_flags_fail_at_startup(toy_data, flags, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _searnn(toy_data, *flags)


def test_unknown_choice_fails_at_startup(toy_data):
    with pytest.raises(SystemExit):
        _searnn(toy_data, "--searnn-roll-in", "teacher")


def test_cli_trains_and_logs(toy_data, tmp_path):
    out = run_cli("train", toy_data, "--user-dir", USER_DIR, "--task", "seqlevel_translation", *TINY_LSTM,
                  "--reward", "edit", "--criterion", "searnn_kl", "--searnn-tokens", "3",
                  "--optimizer", "adam", "--lr", "1e-3", "--max-tokens", "300", "--max-update", "2",
                  "--log-format", "simple", "--log-interval", "1", "--save-dir", tmp_path, "--no-save",
                  "--disable-validation")
    assert "searnn_gt_best" in out.stderr + out.stdout and "searnn_rollin_cost" in out.stderr + out.stdout
