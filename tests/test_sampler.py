"""decoding.sampler: greedy against fairseq's SequenceGenerator, returned
log-probs against teacher forcing, sampling frequencies, top-k / nucleus sets,
the choose hook and the length limits."""

import math
from types import SimpleNamespace

import pytest
import torch
from fairseq.sequence_generator import SequenceGenerator
from scipy import stats

from conftest import ARCHS, USER_DIR, build_training, first_batch, mle_steps
from fairseq_seqlevel.decoding.sampler import Samples, draw, last_steps, sample
from fairseq_seqlevel.decoding.teacher_forcing import prev_output_tokens_from_target



pytestmark = pytest.mark.usefixtures("one_thread")


def _build(toy_data, arch="lstm", seed=3):
    torch.manual_seed(seed)
    _, task, model, _ = build_training([toy_data, "--user-dir", USER_DIR, "--task", "seqlevel_translation",
                                        *ARCHS[arch], "--dropout", "0", "--seed", str(seed),
                                        "--criterion", "label_smoothed_cross_entropy"])
    return task, model


def _pretrain(toy_data, arch, steps, lr=0.02):
    """A few MLE steps: greedy outputs that vary and stop."""
    task, model = _build(toy_data, arch)
    mle_steps(task, model, steps, lr)
    model.eval()
    return task, model


@pytest.fixture(scope="module")
def pretrained(toy_data):
    cache = {}

    def get(arch="lstm"):
        if arch not in cache:
            cache[arch] = _pretrain(toy_data, arch, steps={"lstm": 40, "transformer": 30}[arch])
        return cache[arch]

    return get


def _source(net_input, b, pad):
    """Source b alone, as a batch of one (no padding)."""
    src = net_input["src_tokens"][b]
    src = src[src.ne(pad)].unsqueeze(0)
    return {"src_tokens": src, "src_lengths": torch.tensor([src.size(1)])}


def _teacher_forced(model, net_input, tokens, n, pad, eos):
    """Model log-probs ``[N, T, V]`` of every position of ``tokens`` (one full forward)."""
    prev = prev_output_tokens_from_target(tokens, pad, eos)
    src = net_input["src_tokens"].repeat_interleave(n, dim=0)
    lengths = net_input["src_lengths"].repeat_interleave(n)
    with torch.no_grad():
        return model.get_normalized_probs(model(src, lengths, prev), log_probs=True)


def _gathered(lprobs, tokens, pad):
    return lprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).masked_fill(tokens.eq(pad), 0.0)


def _strip(row, pad):
    return [int(x) for x in row if int(x) != pad]


# --------------------------------------------------------------- greedy


@pytest.mark.parametrize("arch", ["lstm", "transformer"])
def test_greedy_equals_sequence_generator(pretrained, arch):
    """Beam 1 token for token, and its positional scores, (a) on the padded
    batch with max_len_a = 0 (one cap for all), (b) with max_len_a > 0 against
    each source generated alone (SequenceGenerator takes the batch's padded
    width as |src|; the sampler each source's own length)."""
    task, model = pretrained(arch)
    d = task.target_dictionary
    pad, eos = d.pad(), d.eos()
    batch = first_batch(task, n=16)
    net = batch["net_input"]

    gen = SequenceGenerator([model], d, beam_size=1, max_len_a=0, max_len_b=5)
    hyps = gen.forward(batch)
    got = sample(model, net, strategy="greedy", max_len_a=0, max_len_b=5)
    assert isinstance(got, Samples) and got.tokens.size(0) == 16
    for b, hyp in enumerate(hyps):
        expected = hyp[0]["tokens"].tolist()
        assert _strip(got.tokens[b], pad) == expected, b
        assert int(got.lengths[b]) == len(expected)
        torch.testing.assert_close(got.lprobs[b, :len(expected)], hyp[0]["positional_scores"],
                                   atol=1e-5, rtol=1e-5)
    lengths = got.lengths.tolist()
    assert len(set(lengths)) >= 3 and min(lengths) < 6 and max(lengths) == 6  # they vary, stop, and hit the cap

    len_a, len_b = 0.5, 1
    got = sample(model, net, strategy="greedy", max_len_a=len_a, max_len_b=len_b)
    caps = (net["src_lengths"] * len_a + len_b).long() + 1
    assert bool((got.lengths <= caps).all()) and bool((got.lengths == caps).any()) and bool((got.lengths < caps).any())
    for b in range(16):
        gen = SequenceGenerator([model], d, beam_size=1, max_len_a=len_a, max_len_b=len_b)
        expected = gen.forward({"net_input": _source(net, b, pad)})[0][0]["tokens"].tolist()
        assert _strip(got.tokens[b], pad) == expected, b
    assert bool(got.tokens.gather(1, (got.lengths - 1).unsqueeze(1)).eq(eos).all())


# ------------------------------------------------------------- log-probs


class _Wrapper(torch.nn.Module):
    """Stands for DDP / fairseq's ModuleProxyWrapper (a ``.module`` chain)."""

    def __init__(self, module):
        super().__init__()
        self.module = module


@pytest.mark.parametrize("arch", ["lstm", "transformer"])
def test_lprobs_are_teacher_forced_at_temperature_one(pretrained, arch):
    task, model = pretrained(arch)
    d = task.target_dictionary
    pad, eos = d.pad(), d.eos()
    net = first_batch(task, n=6)["net_input"]
    n, temperature = 4, 0.7
    model.train()
    torch.manual_seed(0)
    got = sample(_Wrapper(model), net, n=n, strategy="multinomial", temperature=temperature, max_len_b=8)
    assert model.training  # mode restored
    model.eval()
    assert got.lprobs.dtype == torch.float32 and got.tokens.shape == got.lprobs.shape
    assert got.lengths.tolist() == got.tokens.ne(pad).sum(1).tolist()
    lprobs = _teacher_forced(model, net, got.tokens, n, pad, eos)
    expected = _gathered(lprobs, got.tokens, pad)
    torch.testing.assert_close(got.lprobs, expected, atol=1e-5, rtol=1e-5)
    # the tempered distribution would give other numbers (so the convention is tested)
    tempered = _gathered(torch.log_softmax(lprobs / temperature, dim=-1), got.tokens, pad)
    assert (got.lprobs - tempered).abs().max() > 1e-2


# -------------------------------------------------------------- sampling


def test_first_token_frequencies_match_the_softmax(toy_data):
    """4000 samples of one source: chi-square of the first tokens against the
    model's step-0 distribution without pad and eos (min_len = 1).  A random
    output bias spreads that distribution (the toy models' are near-uniform
    over the words, where a wrong temperature would hardly show)."""
    task, model = _build(toy_data, "lstm", seed=6)
    model.eval()
    with torch.no_grad():
        bias = model.decoder.fc_out.bias
        bias.copy_(2.0 * torch.randn(bias.shape, generator=torch.Generator().manual_seed(0)))
    d = task.target_dictionary
    pad, eos = d.pad(), d.eos()
    net = _source(first_batch(task, n=4)["net_input"], 2, pad)
    num = 4000
    torch.manual_seed(1)
    got = sample(model, net, n=num, strategy="multinomial", max_len_b=1)
    first = got.tokens[:, 0]
    lprobs = _teacher_forced(model, net, torch.tensor([[eos]]), 1, pad, eos)[0, 0]
    lprobs[[pad, eos]] = -math.inf
    probs = lprobs.double().softmax(-1)
    observed = torch.bincount(first, minlength=probs.numel()).double()
    assert observed[[pad, eos]].sum() == 0
    expected = probs * num
    big = expected >= 5  # cells with small expected counts are merged into one
    f_obs = torch.cat([observed[big], observed[~big].sum().view(1)])
    f_exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    assert int(big.sum()) >= 3, "a peaked distribution tests little"
    assert stats.chisquare(f_obs.numpy(), f_exp.numpy()).pvalue > 1e-3
    # a slightly wrong distribution (temperature 1.25) is rejected by the same test
    torch.manual_seed(1)
    hot = sample(model, net, n=num, strategy="multinomial", temperature=1.25, max_len_b=1).tokens[:, 0]
    hot_obs = torch.bincount(hot, minlength=probs.numel()).double()
    assert stats.chisquare(torch.cat([hot_obs[big], hot_obs[~big].sum().view(1)]).numpy(),
                           f_exp.numpy()).pvalue < 1e-3


def test_draw_never_picks_a_zero_weight_at_either_end(monkeypatch):
    """The inverse-CDF draw at u = 0 and at u = total (a uniform that rounds up)."""
    weights = torch.tensor([[0.0, 1.0, 0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 3.0]])
    for uniform, expected in [(0.0, [1, 5]), (1.0, [3, 5]), (0.3, [1, 5]), (0.34, [3, 5])]:
        monkeypatch.setattr(torch, "rand_like", lambda t, u=uniform: torch.full_like(t, u))
        assert draw(weights).tolist() == expected, uniform


def test_low_temperature_top1_and_tiny_nucleus_are_greedy(pretrained):
    task, model = pretrained("lstm")
    net = first_batch(task, n=16)["net_input"]
    greedy = sample(model, net, n=2, strategy="greedy", max_len_b=8)
    assert not bool((greedy.tokens == greedy.tokens[:, :1]).all())
    torch.manual_seed(2)
    # 1e-9, not 1e-4: the barely trained model has near-ties (1.4e-6 apart) that
    # 1e-4 samples either way
    for kw in ({"strategy": "multinomial", "temperature": 1e-9}, {"strategy": "topk", "topk": 1},
               {"strategy": "nucleus", "topp": 1e-6}):
        got = sample(model, net, n=2, max_len_b=8, **kw)
        assert torch.equal(got.tokens, greedy.tokens), kw
        torch.testing.assert_close(got.lprobs, greedy.lprobs)
    hot = sample(model, net, n=2, strategy="multinomial", max_len_b=8)
    assert not torch.equal(hot.tokens, greedy.tokens)  # sampling at temperature 1 differs


def _masked_steps(lprobs, tokens, lengths, last, min_len, pad, eos):
    """Teacher-forced log-probs at the free positions (before each row's limit,
    pad and early eos excluded as in the sampler) and the chosen tokens there."""
    width = tokens.size(1)
    position = torch.arange(width).unsqueeze(0)
    free = (position < lengths.unsqueeze(1)) & (position < last.unsqueeze(1))
    masked = lprobs.clone()
    masked[..., pad] = -math.inf
    masked[:, :min_len, eos] = -math.inf
    return masked[free], tokens[free]


def _outside_topk(masked, chosen, k):
    kth = masked.topk(k, dim=-1).values[:, -1]
    return int((masked.gather(1, chosen.unsqueeze(1)).squeeze(1) < kth - 1e-5).sum())


def _outside_nucleus(masked, chosen, p, temperature):
    probs = torch.softmax(masked / temperature, dim=-1)
    mine = probs.gather(1, chosen.unsqueeze(1))
    mass_above = (probs * (probs > mine + 1e-6)).sum(dim=1)
    return int((mass_above >= p + 1e-5).sum())


@pytest.mark.parametrize("arch", ["lstm", "transformer"])
def test_topk_and_nucleus_stay_in_their_sets(pretrained, arch):
    """Every chosen token of every step, checked against the step's set
    (recomputed by teacher forcing; the nucleus at the sampling temperature);
    plain multinomial samples of the same model do leave both sets."""
    task, model = pretrained(arch)
    d = task.target_dictionary
    pad, eos = d.pad(), d.eos()
    net = first_batch(task, n=8)["net_input"]
    n, k, p, temperature, max_len_b = 25, 2, 0.5, 1.5, 7
    last = last_steps(net["src_lengths"], 0, max_len_b, model.max_decoder_positions()).repeat_interleave(n)
    checked = {}
    for strategy in ("topk", "nucleus", "multinomial"):
        torch.manual_seed(3)
        got = sample(model, net, n=n, strategy=strategy, temperature=temperature, topk=k, topp=p,
                     max_len_b=max_len_b)
        lprobs = _teacher_forced(model, net, got.tokens, n, pad, eos)
        masked, chosen = _masked_steps(lprobs, got.tokens, got.lengths, last, 1, pad, eos)
        checked[strategy] = (_outside_topk(masked, chosen, k), _outside_nucleus(masked, chosen, p, temperature),
                             chosen.numel())
    assert checked["topk"][0] == 0 and checked["topk"][2] > 500
    assert checked["nucleus"][1] == 0 and checked["nucleus"][2] > 500
    assert checked["multinomial"][0] > 20 and checked["multinomial"][1] > 20


# ----------------------------------------------------------------- choose


def test_choose_copies_references_under_the_limits(pretrained):
    """A rule copying one reference per row (via ``rows``) reproduces it, rows
    leaving at different steps; a reference longer than the limit is cut with
    eos at the cap; a reference that is just eos ends at step 0 (choose may
    end before min_len)."""
    task, model = pretrained("lstm")
    d = task.target_dictionary
    pad, eos = d.pad(), d.eos()
    net = first_batch(task, n=4)["net_input"]
    n, max_len_b = 3, 5
    gen = torch.Generator().manual_seed(0)
    words = torch.arange(d.nspecial, len(d))
    word_counts = [0, 1, 2, 3, 4, 5, 6, 7, 2, 3, 1, 4]  # 7 > the cap of 5 tokens before eos
    refs = torch.full((4 * n, 9), pad)
    for r, m in enumerate(word_counts):
        refs[r, :m] = words[torch.randint(len(words), (m,), generator=gen)]
        refs[r, m] = eos
    seen_rows = []

    def copy_reference(step, lprobs, prefix, rows):
        assert prefix.shape == (rows.numel(), step) and torch.equal(prefix, refs[rows, :step])
        assert bool(lprobs[:, pad].eq(-math.inf).all())
        assert bool(lprobs[:, eos].eq(-math.inf).all()) == (step < 1)  # min_len masking shown to choose
        seen_rows.append(rows.numel())
        return refs[rows, step]

    got = sample(model, net, n=n, max_len_b=max_len_b, choose=copy_reference)
    for r, m in enumerate(word_counts):
        expected = _strip(refs[r], pad) if m <= max_len_b else _strip(refs[r, :max_len_b], pad) + [eos]
        assert _strip(got.tokens[r], pad) == expected, r
        assert int(got.lengths[r]) == len(expected)
    assert seen_rows == sorted(seen_rows, reverse=True) and len(set(seen_rows)) >= 4  # rows dropped out
    assert got.tokens.size(1) == max_len_b + 1
    expected = _gathered(_teacher_forced(model, net, got.tokens, n, pad, eos), got.tokens, pad)
    torch.testing.assert_close(got.lprobs, expected, atol=1e-5, rtol=1e-5)
    assert bool(torch.isfinite(got.lprobs).all())  # the eos at step 0 has the model's (unmasked) log-prob

    with pytest.raises(ValueError, match="pad"):
        sample(model, net, n=1, max_len_b=3, choose=lambda step, lp, prefix, rows: torch.full_like(rows, pad))


# ------------------------------------------------------------ length limits


@pytest.mark.parametrize("strategy", ["greedy", "multinomial"])
def test_length_limits(toy_data, strategy):
    """eos made impossible: every row runs to its own cap (per source, capped
    by max_decoder_positions too); eos made certain: rows stop right after
    min_len; a limit of 0 forces eos at step 0 whatever min_len says."""
    task, model = _build(toy_data, "lstm", seed=4)
    model.eval()
    d = task.target_dictionary
    pad, eos = d.pad(), d.eos()
    net = first_batch(task, n=8)["net_input"]
    src_lengths = net["src_lengths"]
    assert len(set(src_lengths.tolist())) >= 3
    bias = model.decoder.fc_out.bias

    def run(eos_bias, **kw):
        with torch.no_grad():
            saved = bias[eos].clone()
            bias[eos] = eos_bias
        try:
            torch.manual_seed(5)
            return sample(model, net, n=2, strategy=strategy, **kw)
        finally:
            with torch.no_grad():
                bias[eos] = saved

    def ends_with_single_eos(got):
        last = got.tokens.gather(1, (got.lengths - 1).unsqueeze(1)).squeeze(1)
        return bool(last.eq(eos).all()) and int(got.tokens.eq(eos).sum()) == got.tokens.size(0)

    got = run(-1e4, max_len_a=0.5, max_len_b=2)
    caps = ((src_lengths * 0.5 + 2).long() + 1).repeat_interleave(2)
    assert got.lengths.tolist() == caps.tolist() and ends_with_single_eos(got)
    assert got.tokens.size(1) == int(caps.max())

    model.max_decoder_positions = lambda: 4  # the positions cap: eos at step 3
    try:
        got = run(-1e4, max_len_b=200)
    finally:
        del model.max_decoder_positions
    assert got.lengths.tolist() == [4] * 16 and ends_with_single_eos(got)

    for min_len in (1, 3):
        got = run(1e4, max_len_b=10, min_len=min_len)
        assert got.lengths.tolist() == [min_len + 1] * 16 and ends_with_single_eos(got)
        assert not bool(got.tokens[:, :min_len].eq(eos).any())
    got = run(1e4, max_len_b=10, min_len=0)
    assert got.lengths.tolist() == [1] * 16

    got = run(-1e4, max_len_b=0, min_len=1)  # the limit wins over min_len
    assert got.tokens.tolist() == [[eos]] * 16 and got.lengths.tolist() == [1] * 16
    one = sample(model, _source(net, 0, pad), n=1, strategy=strategy, max_len_b=0)
    assert one.tokens.tolist() == [[eos]] and one.lengths.tolist() == [1] and one.lprobs.shape == (1, 1)


def test_bad_arguments():
    model = SimpleNamespace()
    for kw, message in [({"n": 0}, "n must be"), ({"strategy": "beam"}, "unknown strategy"),
                        ({"temperature": 0}, "temperature"), ({"strategy": "topk"}, "topk >= 1"),
                        ({"topp": 0.0}, "topp")]:
        with pytest.raises(ValueError, match=message):
            sample(model, {}, **kw)
