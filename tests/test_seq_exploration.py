"""seq_exploration: α = 1 is SCST (against an independent computation, with
the greedy or the leave-one-out baseline), the diversity term pushes towards
the sample farthest from the others, pairwise distances equal sacrebleu, the
MLE weight mixes in fairseq's cross-entropy."""

import pytest
import torch
from sacrebleu.metrics import BLEU

from conftest import build_toy, first_batch, levenshtein
from fairseq_seqlevel.criterions.seq_exploration import exploration_advantages, leave_one_out_baseline
from fairseq_seqlevel.decoding.teacher_forcing import prev_output_tokens_from_target
from fairseq_seqlevel.errors import ConfigError
from fairseq_seqlevel.rewards import pairwise_distances
from test_raml import _assert_same, _loss_and_grads

def _build(toy_data, *args, arch="lstm"):
    return build_toy(toy_data, "--criterion", "seq_exploration", *args, arch=arch)


def _fixed_outputs(batch, dictionary, s, seed=0):
    """Random eos-terminated outputs: s samples and one greedy output per source."""
    g = torch.Generator().manual_seed(seed)
    B, pad, eos = batch["target"].size(0), dictionary.pad(), dictionary.eos()
    words = torch.tensor([dictionary.index(f"w{i}") for i in range(12)])

    def rows(n):
        lengths = torch.randint(1, 6, (n,), generator=g)
        out = torch.full((n, 6), pad)
        for r in range(n):  # test data only
            out[r, :lengths[r]] = words[torch.randint(0, 12, (int(lengths[r]),), generator=g)]
            out[r, lengths[r]] = eos
        return out

    return rows(B * s), rows(B)


@pytest.mark.parametrize("arch,baseline", [("lstm", "greedy"), ("transformer", "greedy"), ("lstm", "mean")])
def test_alpha_one_is_scst(toy_data, arch, baseline):
    s = 3
    _, task, model, crit = _build(toy_data, "--sle-alpha", "1", "--sle-samples", str(s), "--sle-baseline", baseline,
                                  arch=arch)
    batch = first_batch(task, n=6)
    d = task.target_dictionary
    samples, greedy = _fixed_outputs(batch, d, s)
    crit.draw = lambda model, sample: (samples, greedy if baseline == "greedy" else None)
    got = _loss_and_grads(model, crit, batch)

    # independent SCST: one forward per (source, sample), rewards one row at a time
    model.zero_grad()
    src, src_len, refs = batch["net_input"]["src_tokens"], batch["net_input"]["src_lengths"], batch["references"]
    pad, eos, total = d.pad(), d.eos(), 0.0
    for b in range(batch["target"].size(0)):
        x = src[b][src[b].ne(pad)].unsqueeze(0)
        ys = [samples[b * s + j][samples[b * s + j].ne(pad)].unsqueeze(0) for j in range(s)]
        rewards = [float(task.reward(y, refs[b:b + 1])[0]) for y in ys]
        per_source = 0.0
        for j, y in enumerate(ys):
            if baseline == "greedy":
                b_j = float(task.reward(greedy[b:b + 1], refs[b:b + 1])[0])
            else:  # the other samples' mean reward
                b_j = sum(r for k, r in enumerate(rewards) if k != j) / (s - 1)
            lp = model.get_normalized_probs(model(x, src_len[b:b + 1], prev_output_tokens_from_target(y, pad, eos)),
                                            log_probs=True)
            log_p = lp.gather(-1, y.unsqueeze(-1)).sum()
            per_source = per_source - (rewards[j] - b_j) * log_p / s
        total = total + int(batch["target"][b].ne(pad).sum()) * per_source
    total.backward()
    torch.testing.assert_close(got[0], total.detach(), rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[3][name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert got[2]["sle_npairs"] == batch["target"].size(0) * s * (s - 1)
    assert ("sle_greedy_reward_sum" in got[2]) == (baseline == "greedy")


@pytest.mark.parametrize("arch", ["lstm", "transformer"])
def test_mle_weight_one_is_cross_entropy(toy_data, arch):
    _, task, model, stock = _build(toy_data, "--criterion", "label_smoothed_cross_entropy",
                                   "--label-smoothing", "0", arch=arch)
    _, _, _, crit = _build(toy_data, "--sle-samples", "3", "--sle-mle-weight", "1", arch=arch)
    batch = first_batch(task)
    _assert_same(_loss_and_grads(model, crit, batch), _loss_and_grads(model, stock, batch))


@pytest.mark.parametrize("sentence_avg", [False, True])
def test_mle_weight_mixes_linearly(toy_data, sentence_avg):
    """(1 − w)·eq. 16 + w·cross-entropy, loss and gradients, on the same fixed samples."""
    w, extra = 0.3, ["--sentence-avg"] if sentence_avg else []
    _, task, model, stock = _build(toy_data, "--criterion", "label_smoothed_cross_entropy",
                                   "--label-smoothing", "0", *extra)
    crits = {v: _build(toy_data, "--sle-samples", "3", "--sle-entropy-weight", "0.02", "--sle-mle-weight", str(v),
                       *extra)[3] for v in (0.0, w)}
    batch = first_batch(task)
    fixed = _fixed_outputs(batch, task.target_dictionary, 3)
    for crit in crits.values():
        crit.draw = lambda model, sample: fixed
    mixed, pure, ce = (_loss_and_grads(model, c, batch) for c in (crits[w], crits[0.0], stock))
    assert mixed[1] == ce[1]
    torch.testing.assert_close(mixed[0], (1 - w) * pure[0] + w * ce[0], rtol=1e-5, atol=1e-5)
    for name in ce[3]:
        torch.testing.assert_close(mixed[3][name], (1 - w) * pure[3][name] + w * ce[3][name],
                                   rtol=1e-4, atol=1e-6, msg=name)


def test_leave_one_out_advantages_sum_to_zero():
    """The mean baseline: every source's advantages sum to 0 whatever the greedy
    output scores; equal rewards give no gradient at all."""
    rewards = torch.tensor([[0.1, 0.4, 0.4, 0.9], [0.3, 0.3, 0.3, 0.3]])
    adv = exploration_advantages(rewards, leave_one_out_baseline(rewards), torch.zeros(2, 4, 4), alpha=1.0)
    torch.testing.assert_close(adv[0], (rewards[0] - (rewards[0].sum() - rewards[0]) / 3))
    torch.testing.assert_close(adv.sum(dim=1), torch.zeros(2))
    assert adv[1].eq(0).all()


def test_diversity_gradient_raises_the_farthest_sample(toy_data):
    _, task, model, crit = _build(toy_data, "--sle-alpha", "0", "--sle-samples", "3",
                                  "--sle-distance", "edit")
    batch = first_batch(task, n=1)
    d = task.target_dictionary
    pad, eos = d.pad(), d.eos()
    w = [d.index(f"w{i}") for i in range(12)]
    near = torch.tensor([w[1], w[2], w[3], eos])
    far = torch.tensor([w[7], w[8], w[9], eos])
    samples = torch.stack([near, near, far])
    crit.draw = lambda model, sample: (samples, near.unsqueeze(0))

    # advantages: row sums of d minus s·mean(d): near -1/3, near -1/3, far +2/3, times (2/s)
    dist = pairwise_distances(samples.unsqueeze(0), pad, eos, "edit")
    adv = exploration_advantages(torch.zeros(1, 3), torch.zeros(1), dist, alpha=0.0)
    torch.testing.assert_close(adv, torch.tensor([[-1 / 3, -1 / 3, 2 / 3]]) * (2 / 3))

    def log_p(row):
        y = row.unsqueeze(0)
        lp = model.get_normalized_probs(model(batch["net_input"]["src_tokens"], batch["net_input"]["src_lengths"],
                                              prev_output_tokens_from_target(y, pad, eos)), log_probs=True)
        return lp.gather(-1, y.unsqueeze(-1)).sum()

    with torch.no_grad():
        gap_before = float(log_p(far) - log_p(near))
    loss, _, _, grads = _loss_and_grads(model, crit, batch)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p -= 1e-3 * grads[name]
        gap_after = float(log_p(far) - log_p(near))
    assert gap_after > gap_before


def test_pairwise_distances_equal_sacrebleu_and_levenshtein():
    g = torch.Generator().manual_seed(1)
    B, s, pad, eos = 4, 4, 1, 2
    samples = torch.randint(4, 9, (B, s, 7), generator=g)
    for b in range(B):
        for j in range(s):
            end = int(torch.randint(2, 7, (1,), generator=g))
            samples[b, j, end] = eos
            samples[b, j, end + 1:] = pad
    bleu = pairwise_distances(samples, pad, eos, "bleu34")
    edit = pairwise_distances(samples, pad, eos, "edit")

    def text(row):
        return row[:int((row == eos).nonzero()[0])].tolist()

    scorers = {o: BLEU(tokenize="none", effective_order=True, max_ngram_order=o) for o in (3, 4)}
    for b in range(B):
        for j in range(s):
            for k in range(s):
                if j == k:
                    assert bleu[b, j, k] == 0 and edit[b, j, k] == 0
                    continue
                h, r = text(samples[b, j]), text(samples[b, k])
                hs, rs = " ".join(map(str, h)), " ".join(map(str, r))
                expected = 1 - (scorers[3].sentence_score(hs, [rs]).score + scorers[4].sentence_score(hs, [rs]).score) / 200
                assert abs(float(bleu[b, j, k]) - expected) < 1e-5
                assert abs(float(edit[b, j, k]) - levenshtein(h, r) / len(r)) < 1e-6


def test_sampled_outputs_train(toy_data):
    from fairseq_seqlevel.decoding.sampler import sample

    _, task, model, crit = _build(toy_data, "--sle-samples", "3", "--sle-entropy-weight", "0.01")
    batch = first_batch(task)
    samples, greedy = crit.draw(model, batch)
    expected = sample(model, batch["net_input"], strategy="greedy", max_len_a=1.2, max_len_b=10).tokens
    assert torch.equal(greedy[:, :expected.size(1)], expected) and samples.size(0) == 3 * greedy.size(0)
    assert greedy[:, expected.size(1):].eq(task.target_dictionary.pad()).all()
    loss, _, log, grads = _loss_and_grads(model, crit, batch)
    assert torch.isfinite(loss)
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert log["sle_nsamples"] == 3 * log["nsentences"] and log["sle_ntokens"] > 0


def test_mean_baseline_draws_samples_only(toy_data):
    _, task, model, crit = _build(toy_data, "--sle-samples", "3", "--sle-alpha", "1", "--sle-baseline", "mean",
                                  "--sle-mle-weight", "0.3")
    batch = first_batch(task)
    samples, greedy = crit.draw(model, batch)
    assert greedy is None and samples.size(0) == 3 * batch["target"].size(0)
    loss, _, log, grads = _loss_and_grads(model, crit, batch)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
    assert "sle_greedy_reward_sum" not in log and log["sle_nsamples"] == 3 * log["nsentences"]


@pytest.mark.parametrize("args,flag", [(["--seq-exploration-samples", "1"], "--seq-exploration-alpha"), (["--seq-exploration-alpha", "2"], "--seq-exploration-alpha"),
                                       (["--seq-exploration-entropy-weight", "-1"], "--seq-exploration-entropy-weight"),
                                       (["--seq-exploration-samples", "1", "--seq-exploration-alpha", "1", "--seq-exploration-baseline", "mean"],
                                        "--seq-exploration-baseline"),
                                       (["--seq-exploration-mle-weight", "1.5"], "--seq-exploration-mle-weight")])
def test_bad_flags(toy_data, args, flag):
    with pytest.raises(ConfigError, match=flag):
        _build(toy_data, *args)


@pytest.mark.parametrize("arch", ["lstm", "transformer"])
def test_chunked_output_layer_equals_autograd(toy_data, arch, monkeypatch):
    """The chunked pass with two loss components per row (NLL and entropy)
    gives the loss and gradients of plain autograd."""
    from fairseq_seqlevel.decoding import teacher_forcing

    monkeypatch.setattr(teacher_forcing, "CHUNK_LOGITS", 300)
    _, task, model, crit = _build(toy_data, "--sle-samples", "3", "--sle-entropy-weight", "0.05", arch=arch)
    batch = first_batch(task)
    fixed = _fixed_outputs(batch, task.target_dictionary, 3)
    crit.draw = lambda model, sample: fixed
    crit.fused = None
    chunked = _loss_and_grads(model, crit, batch)
    crit.fused = False
    plain = _loss_and_grads(model, crit, batch)
    torch.testing.assert_close(chunked[0], plain[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked[2]["nll_loss"], plain[2]["nll_loss"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked[2]["sle_entropy_sum"], plain[2]["sle_entropy_sum"], rtol=1e-5, atol=1e-4)
    for name in plain[3]:
        torch.testing.assert_close(chunked[3][name], plain[3][name], rtol=1e-4, atol=1e-6, msg=name)
