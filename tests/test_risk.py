"""risk: the label-smoothing limit, the reference-only candidate set, and the
loss and gradient against a brute-force computation over an enumerated set."""

import itertools

import pytest
import torch
from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss

from conftest import USER_DIR, build_toy, first_batch
from fairseq_seqlevel.decoding.teacher_forcing import prev_output_tokens_from_target
from fairseq_seqlevel.errors import ConfigError
from test_raml import _assert_same, _loss_and_grads

_build = build_toy


@pytest.mark.parametrize("arch", ["lstm", "transformer"])
def test_mle_weight_one_is_label_smoothing(toy_data, arch):
    _, task, model, stock = _build(toy_data, "--criterion", "label_smoothed_cross_entropy",
                                   "--label-smoothing", "0.1", arch=arch)
    _, _, _, risk = _build(toy_data, "--criterion", "risk", "--risk-mle-weight", "1", "--label-smoothing", "0.1",
                           arch=arch)
    batch = first_batch(task)
    _assert_same(_loss_and_grads(model, risk, batch), _loss_and_grads(model, stock, batch))


def _padded(seqs, pad):
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [pad] * (width - len(s)) for s in seqs])


def test_reference_only_gives_zero_risk_and_gradient(toy_data):
    _, task, model, risk = _build(toy_data, "--criterion", "risk", "--risk-candidates", "3",
                                  "--risk-include-reference")
    batch = first_batch(task)
    target = batch["target"]
    risk.candidates = lambda model, sample: sample["target"].repeat_interleave(3, dim=0)
    loss, _, log, grads = _loss_and_grads(model, risk, batch)
    assert log["risk_candidates"] == target.size(0)  # every copy of y* counted once
    assert float(loss) == 0.0 and float(log["risk_sum"]) == 0.0
    # one candidate per source: Q = 1 on it, no spread to measure
    assert float(log["risk_q_max_sum"]) == target.size(0) and log["risk_spread_sources"] == 0
    assert grads and all(float(g.abs().max()) == 0.0 for g in grads.values())


def _enumerated(dictionary, eos, pad, batch_size, symbols=("w1", "w2", "w3")):
    """Every sequence of 1-2 of three words, + eos, and one duplicate, for every source."""
    ids = [dictionary.index(s) for s in symbols]
    seqs = [list(p) for k in (1, 2) for p in itertools.product(ids, repeat=k)]
    seqs = seqs + [seqs[4]]  # a duplicate must count once
    one = _padded([s + [eos] for s in seqs], pad)
    return one, one.repeat(batch_size, 1)


def _brute_force(model, batch, candidates, reward, pad, eos, sharpness, length_normalize, w, eps):
    """One forward per (source, candidate), Python loops, autograd; also each source's Q."""
    src, src_len, target = batch["net_input"]["src_tokens"], batch["net_input"]["src_lengths"], batch["target"]
    refs = batch["references"]
    total, qs = 0.0, []
    for b in range(target.size(0)):
        x = src[b][src[b].ne(pad)].unsqueeze(0)  # this source alone, unpadded
        distinct = []
        for row in candidates:
            seq = row[row.ne(pad)].tolist()
            if seq not in distinct:
                distinct.append(seq)
        scores, costs = [], []
        for seq in distinct:
            tokens = torch.tensor([seq])
            net_output = model(x, src_len[b:b + 1], prev_output_tokens_from_target(tokens, pad, eos))
            lp = model.get_normalized_probs(net_output, log_probs=True)[0]
            s = lp.gather(-1, tokens[0].unsqueeze(-1)).sum()
            scores.append(s / len(seq) if length_normalize else s)
            costs.append(float(reward.cost(tokens, refs[b:b + 1])[0]))
        q = torch.softmax(sharpness * torch.stack(scores), dim=0)
        qs.append(q.detach())
        ref_len = int(target[b].ne(pad).sum())
        total = total + (1 - w) * ref_len * (q * torch.tensor(costs)).sum()
        tgt = target[b:b + 1, :ref_len]
        net_output = model(x, src_len[b:b + 1], prev_output_tokens_from_target(tgt, pad, eos))
        lp = model.get_normalized_probs(net_output, log_probs=True)
        total = total + w * label_smoothed_nll_loss(lp, tgt, eps, ignore_index=pad)[0]
    return total, qs


@pytest.mark.parametrize("arch,normalize,w", [("lstm", False, 0.0), ("lstm", True, 0.3), ("transformer", False, 0.3)])
def test_loss_and_gradient_equal_brute_force(toy_data, arch, normalize, w):
    sharpness = 2.0
    flags = ["--criterion", "risk", "--risk-sharpness", str(sharpness), "--risk-mle-weight", str(w),
             "--label-smoothing", "0.1", "--risk-score", "mean" if normalize else "sum"]
    _, task, model, risk = _build(toy_data, *flags, arch=arch)
    batch = first_batch(task, n=6)
    d = task.target_dictionary
    one, all_rows = _enumerated(d, d.eos(), d.pad(), batch["target"].size(0))
    risk.cfg.risk_candidates = one.size(0)
    risk.candidates = lambda model, sample: all_rows
    got = _loss_and_grads(model, risk, batch)
    assert got[2]["risk_candidates"] == batch["target"].size(0) * (one.size(0) - 1)

    model.zero_grad()
    expected, qs = _brute_force(model, batch, one, risk.reward, d.pad(), d.eos(), sharpness, normalize, w, 0.1)
    expected.backward()
    torch.testing.assert_close(got[0], expected.detach(), rtol=1e-5, atol=1e-5)
    # the logged spread of Q: Σ max Q and Σ H(Q)/log n over the sources
    entropy = sum(float(-(q * q.log()).sum() / torch.log(torch.tensor(float(len(q))))) for q in qs)
    assert got[2]["risk_spread_sources"] == len(qs)
    torch.testing.assert_close(float(got[2]["risk_q_max_sum"]), sum(float(q.max()) for q in qs), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(float(got[2]["risk_q_entropy_sum"]), entropy, rtol=1e-5, atol=1e-6)
    # fp32 both ways: the criterion's length buckets sum in another order than this
    # per-sentence loop (largest difference 1.6e-6 on gradients up to 2.2, transformer)
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[3][name], p.grad, rtol=1e-4, atol=5e-6, msg=name)


def test_sampled_candidates_train(toy_data):
    """The default path end to end: sampled candidates, finite loss and gradients."""
    _, task, model, risk = _build(toy_data, "--criterion", "risk", "--risk-candidates", "4")
    loss, _, log, grads = _loss_and_grads(model, risk, first_batch(task))
    assert torch.isfinite(loss) and float(loss) > 0
    assert 1 <= log["risk_candidates"] <= 4 * log["nsentences"]
    assert all(torch.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize("flag,value", [("--risk-sharpness", "0"), ("--risk-candidates", "0"),
                                        ("--risk-mle-weight", "1.5")])
def test_bad_flags(toy_data, flag, value):
    with pytest.raises(ConfigError, match=flag):
        _build(toy_data, "--criterion", "risk", flag, value)


def test_score_default_is_length_normalized_and_the_old_switch_still_sets_it(toy_data, caplog):
    """Q over s(u|x) = log-probability / length by default (Edunov et al. 2018; issue 44: at
    sharpness 1 the summed scores make Q nearly one-hot); --risk-score sum is the old default,
    and --risk-length-normalize, the old switch, still means mean (after sum: the last wins)."""
    from fairseq import options

    argv = [str(toy_data), "--user-dir", USER_DIR, "--task", "seqlevel_translation", "--arch", "lstm",
            "--criterion", "risk"]
    parse = lambda *flags: options.parse_args_and_arch(options.get_training_parser(), [*argv, *flags])  # noqa: E731
    assert parse().risk_score == "mean" and parse("--risk-score", "sum").risk_score == "sum"
    with caplog.at_level("WARNING"):
        assert parse("--risk-score", "sum", "--risk-length-normalize").risk_score == "mean"
    assert "--risk-length-normalize is deprecated: use --risk-score mean" in caplog.text


@pytest.mark.parametrize("arch", ["lstm", "transformer"])
def test_chunked_output_layer_equals_autograd(toy_data, arch, monkeypatch):
    """The two-stage chunked pass (losses first, then Σ ∂risk/∂loss_n ∇loss_n)
    gives the loss and gradients of plain autograd through the full log-softmax."""
    from fairseq_seqlevel.decoding import teacher_forcing

    monkeypatch.setattr(teacher_forcing, "CHUNK_LOGITS", 300)  # several chunks
    _, task, model, risk = _build(toy_data, "--criterion", "risk", "--risk-candidates", "5", "--risk-mle-weight",
                                  "0.3", "--label-smoothing", "0.1", "--risk-score", "mean",
                                  "--risk-include-reference", arch=arch)
    batch = first_batch(task)
    fixed = risk.candidates(model, batch)
    risk.candidates = lambda model, sample: fixed
    risk.fused = None
    chunked = _loss_and_grads(model, risk, batch)
    risk.fused = False
    plain = _loss_and_grads(model, risk, batch)
    _assert_same(chunked, plain)
    assert chunked[2]["risk_candidates"] > batch["target"].size(0)


def test_beam_candidates_are_the_generator_nbest(toy_data):
    """--risk-search beam: U(x) is fairseq's beam-n n-best, in its order, padded."""
    from fairseq.sequence_generator import SequenceGenerator

    _, task, model, risk = _build(toy_data, "--criterion", "risk", "--risk-candidates", "3",
                                  "--risk-search", "beam", "--risk-max-len-b", "4")
    batch = first_batch(task, n=5)
    got = risk.candidates(model, batch)
    assert model.training  # restored after the no-grad search
    model.eval()
    generator = SequenceGenerator([model], task.target_dictionary, beam_size=3, max_len_a=1.2, max_len_b=4)
    with torch.no_grad():
        hypos = generator.generate([model], {"net_input": batch["net_input"]})
    pad = task.target_dictionary.pad()
    expected = [h[k]["tokens"] for h in hypos for k in range(3)]
    assert got.size(0) == len(expected)
    for row, tokens in zip(got, expected):
        assert torch.equal(row[row.ne(pad)], tokens)
    # the generator holds the model: kept on the criterion, it would make the model's weights
    # parameters (and checkpoint state) of the criterion
    assert not list(risk.parameters()) and not risk.state_dict()


def test_q_spread_one_hot_uniform_and_single():
    from fairseq_seqlevel.criterions.risk import q_spread

    q = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    q_max, entropy = q_spread(q, valid)
    assert q_max.tolist() == [1.0, 0.25, 0.5, 1.0]
    torch.testing.assert_close(entropy[:3], torch.tensor([0.0, 1.0, 1.0]))  # n = 2 valid for the third
    assert torch.isnan(entropy[3])


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_nll_and_label_smoothed_rows_equal_fairseq(epsilon):
    """The one-pass loss_fn's two parts are, row by row, the NLL and fairseq's
    label_smoothed_nll_loss of that row (pad ignored)."""
    from fairseq_seqlevel.criterions.risk import nll_and_label_smoothed

    gen, pad = torch.Generator().manual_seed(0), 1
    lprobs = torch.log_softmax(torch.randn(3, 5, 7, generator=gen), dim=-1)
    target = torch.randint(2, 7, (3, 5), generator=gen)
    target[0, 3:] = pad
    target[2, 1:] = pad
    parts, nll = nll_and_label_smoothed(lprobs, target, pad, epsilon)
    for n in range(3):
        ls, ref_nll = label_smoothed_nll_loss(lprobs[n:n + 1], target[n:n + 1], epsilon, ignore_index=pad)
        torch.testing.assert_close(parts[n, 1], ls)
        torch.testing.assert_close(parts[n, 0], ref_nll)
        torch.testing.assert_close(nll[n], ref_nll)
