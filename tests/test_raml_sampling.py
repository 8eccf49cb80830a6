"""Tests of the RAML samplers (fairseq_seqlevel/perturbation/samplers.py, vocab.py).

Distributional claims are checked against brute-force enumeration written
independently of the implementation (counting sequences / edit configurations
with itertools), with chi-square tests at a fixed seed.
"""

import itertools
import math
from collections import Counter

import pytest
import scipy.stats as scipy_stats  # a test dependency: missing means failing
import torch

from conftest import levenshtein
from fairseq_seqlevel.perturbation.samplers import (
    RamlSamples,
    edit_distance_log_prior,
    edit_sampler,
    effective_sample_size,
    hamming_distance_log_prior,
    hamming_sampler,
    importance_weights,
    ngram_sampler,
)
from fairseq_seqlevel.perturbation.vocab import (
    SubstitutionVocab,
    batch_vocab,
    draw_different_candidates,
    full_vocab,
    refs_vocab,
)

PAD, EOS, BOS, UNK = 1, 2, 0, 3
SPECIALS = {BOS, PAD, EOS, UNK}
SAMPLERS = [hamming_sampler, edit_sampler, ngram_sampler]
MIN_P_VALUE = 1e-3


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def make_target(rows, width=None):
    """Right-padded fairseq target from lists of real tokens (eos appended).

    ``None`` as a row gives an all-pad row.
    """
    width = width or max(len(r) + 1 for r in rows if r is not None)
    out = torch.full((len(rows), width), PAD, dtype=torch.long)
    for b, row in enumerate(rows):
        if row is None:
            continue
        out[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        out[b, len(row)] = EOS
    return out


def real_tokens(row):
    return [t for t in row.tolist() if t not in (PAD, EOS)]


def chi_square_p_value(observed: Counter, expected_probs: dict):
    """Chi-square goodness of fit; outcomes of expected count < 5 are pooled.

    Fails right away if an outcome of probability 0 was observed.
    """
    unexpected = set(observed) - set(k for k, p in expected_probs.items() if p > 0)
    assert not unexpected, f"impossible outcomes sampled: {sorted(unexpected)[:5]}"
    n = sum(observed.values())
    obs, exp, pooled_obs, pooled_exp = [], [], 0, 0.0
    for key, p in expected_probs.items():
        if n * p >= 5:
            obs.append(observed.get(key, 0))
            exp.append(n * p)
        else:
            pooled_obs += observed.get(key, 0)
            pooled_exp += n * p
    if pooled_exp > 0:
        obs.append(pooled_obs)
        exp.append(pooled_exp)
    exp_total = sum(exp)
    exp = [e * n / exp_total for e in exp]  # remove float drift
    if len(obs) < 2:
        return 1.0
    return scipy_stats.chisquare(obs, exp).pvalue


def sample_counts(samples: RamlSamples):
    return Counter(tuple(real_tokens(row)) for row in samples.tokens)


# ---------------------------------------------------------------------------
# vocabularies
# ---------------------------------------------------------------------------


def test_full_vocab_excludes_special_ids():
    vocab = full_vocab(12, SPECIALS | {10}, batch_size=3, device="cpu")
    expected = [i for i in range(12) if i not in SPECIALS | {10}]
    assert vocab.sizes.tolist() == [len(expected)] * 3
    for row in vocab.candidates:
        assert row.tolist() == expected


def test_batch_and_refs_vocab_contents():
    target = make_target([[5, 6, 5, 9], [7, 3], [], None])
    vocab = batch_vocab(target, SPECIALS)
    assert vocab.sizes.tolist() == [4] * 4
    assert vocab.candidates[0].tolist() == [5, 6, 7, 9]

    refs = torch.tensor(
        [
            [[5, 6, EOS, PAD], [6, 8, 8, EOS]],
            [[7, EOS, PAD, PAD], [PAD, PAD, PAD, PAD]],
            [[EOS, PAD, PAD, PAD], [UNK, EOS, PAD, PAD]],
            [[11, 4, 4, EOS], [4, EOS, PAD, PAD]],
        ]
    )
    vocab = refs_vocab(refs, SPECIALS)
    assert vocab.sizes.tolist() == [3, 1, 0, 2]
    for b, expected in enumerate([[5, 6, 8], [7], [], [4, 11]]):
        assert vocab.candidates[b, : vocab.sizes[b]].tolist() == expected
    # A single reference per example (B x T) is accepted too.
    single = refs_vocab(refs[:, 0], SPECIALS)
    assert single.sizes.tolist() == [2, 1, 0, 2]


@pytest.mark.parametrize("current_in_set", [True, False])
def test_draw_different_candidates_is_uniform_over_the_others(current_in_set):
    candidates = torch.tensor([[4, 6, 9, 12, 15]])
    vocab = SubstitutionVocab(candidates, torch.tensor([5]))
    current_token = 9 if current_in_set else 10
    current = torch.full((1, 20000), current_token)
    drawn, num_choices = draw_different_candidates(vocab, current, generator(1))
    assert (drawn != current).all()
    assert (num_choices == (4 if current_in_set else 5)).all()
    others = [c for c in candidates[0].tolist() if c != current_token]
    p_value = chi_square_p_value(Counter(drawn[0].tolist()), {c: 1 / len(others) for c in others})
    assert p_value > MIN_P_VALUE


# ---------------------------------------------------------------------------
# Hamming sampler
# ---------------------------------------------------------------------------


def enumerated_hamming_distance_prior(length, vocab_size, temperature):
    """p(d) of exp(-d_H/τ) over all vocab_size**length sequences, by enumeration."""
    target = (0,) * length
    mass = Counter()
    for seq in itertools.product(range(vocab_size), repeat=length):
        d = sum(a != b for a, b in zip(seq, target))
        mass[d] += math.exp(-d / temperature)
    total = sum(mass.values())
    return [mass[d] / total for d in range(length + 1)]


def test_hamming_prior_matches_enumeration():
    configs = [(3, 4, 0.7), (2, 3, 2.0), (4, 2, 1.0), (1, 5, 0.3)]
    lengths = torch.tensor([c[0] for c in configs])
    sizes = torch.tensor([c[1] for c in configs])
    for temperature in {c[2] for c in configs}:
        log_prior = hamming_distance_log_prior(lengths, sizes, temperature)
        assert log_prior.shape == (len(configs), 5)
        for b, (length, vocab_size, tau) in enumerate(configs):
            if tau != temperature:
                continue
            expected = enumerated_hamming_distance_prior(length, vocab_size, tau)
            torch.testing.assert_close(
                log_prior[b, : length + 1].exp(), torch.tensor(expected), atol=1e-5, rtol=1e-4
            )
            assert torch.isneginf(log_prior[b, length + 1 :]).all()


def test_hamming_prior_without_alternatives_is_a_dirac_on_zero():
    log_prior = hamming_distance_log_prior(torch.tensor([3, 3, 0]), torch.tensor([1, 0, 7]), 1.0)
    assert log_prior[:, 0].tolist() == [0.0, 0.0, 0.0]
    assert torch.isneginf(log_prior[:, 1:]).all()


@pytest.mark.parametrize(
    "lengths,num_tokens,temperature",
    [((8, 8), 10, 0.5), ((12, 4), 34, 1.5)],
)
def test_hamming_distance_histogram_matches_prior(lengths, num_tokens, temperature):
    torch.manual_seed(0)  # only for building the target
    rows = [torch.randint(4, num_tokens, (n,)).tolist() for n in lengths]
    target = make_target(rows)
    vocab = full_vocab(num_tokens, SPECIALS, target.size(0))
    num_samples = 10000
    samples = hamming_sampler(target, PAD, EOS, num_samples, temperature, vocab, generator(3))
    log_prior = hamming_distance_log_prior(torch.tensor(lengths), vocab.sizes, temperature)
    for b, n in enumerate(lengths):
        distances = samples.distance[b * num_samples : (b + 1) * num_samples]
        expected = {d: log_prior[b, d].exp().item() for d in range(n + 1)}
        assert chi_square_p_value(Counter(distances.tolist()), expected) > MIN_P_VALUE


def test_hamming_sampler_draws_exactly_from_exponentiated_reward():
    """Full-sequence distribution and log_q equal r(y|y*) ∝ exp(-d_H/τ) over V_sub."""
    temperature = 0.8
    target = make_target([[5, 6]])
    vocab = SubstitutionVocab(torch.tensor([[5, 6, 7]]), torch.tensor([3]))
    samples = hamming_sampler(target, PAD, EOS, 20000, temperature, vocab, generator(4))
    weights = {
        seq: math.exp(-sum(a != b for a, b in zip(seq, (5, 6))) / temperature)
        for seq in itertools.product([5, 6, 7], repeat=2)
    }
    total = sum(weights.values())
    r = {seq: w / total for seq, w in weights.items()}
    assert chi_square_p_value(sample_counts(samples), r) > MIN_P_VALUE
    for row, log_q in zip(samples.tokens, samples.log_q):
        assert log_q.item() == pytest.approx(math.log(r[tuple(real_tokens(row))]), abs=1e-4)


def test_hamming_log_q_is_sampling_probability_when_target_outside_vocab():
    """Tokens outside V_sub (m_t = |V_sub|) still get the exact proposal probability."""
    target = make_target([[5, 9]])  # 9 is not a candidate
    vocab = SubstitutionVocab(torch.tensor([[5, 6, 7]]), torch.tensor([3]))
    samples = hamming_sampler(target, PAD, EOS, 20000, 1.0, vocab, generator(5))
    log_q_of = {}
    for row, log_q in zip(samples.tokens, samples.log_q):
        key = tuple(real_tokens(row))
        log_q_of.setdefault(key, log_q.item())
        assert log_q.item() == pytest.approx(log_q_of[key], abs=1e-5)
    # 3 x 4 reachable sequences, all observed: exp(log_q) is a distribution ...
    assert len(log_q_of) == 12
    assert sum(math.exp(v) for v in log_q_of.values()) == pytest.approx(1.0, abs=1e-4)
    # ... and it is the one we sample from.
    q = {k: math.exp(v) for k, v in log_q_of.items()}
    assert chi_square_p_value(sample_counts(samples), q) > MIN_P_VALUE


def test_hamming_sampler_reports_applied_distance_and_keeps_layout():
    target = make_target([[5, 6, 7, 8, 9, 10], [11, 12], [13], [], None], width=8)
    refs = torch.stack([target, target.flip(0)], dim=1)  # two references per example
    vocabs = {
        "full": full_vocab(30, SPECIALS, target.size(0)),
        "batch": batch_vocab(target, SPECIALS),
        "refs": refs_vocab(refs, SPECIALS),
    }
    num_samples = 50
    repeated = target.repeat_interleave(num_samples, 0)
    for name, vocab in vocabs.items():
        s = hamming_sampler(target, PAD, EOS, num_samples, 3.0, vocab, generator(6))
        assert s.tokens.shape == repeated.shape
        assert torch.equal(s.distance, (s.tokens != repeated).sum(1)), name
        special = (repeated == PAD) | (repeated == EOS)
        assert torch.equal(s.tokens[special], repeated[special]), name
        assert s.distance.sum() > 0, name  # τ = 3 does substitute
        changed = s.tokens != repeated
        for n, b in zip(*changed.nonzero(as_tuple=True)):
            row = n.item() // num_samples  # samples of example b are rows b*L .. b*L+L-1
            allowed = set(vocab.candidates[row, : vocab.sizes[row]].tolist())
            assert s.tokens[n, b].item() in allowed, name
        assert torch.isfinite(s.log_q).all()


# ---------------------------------------------------------------------------
# edit sampler
# ---------------------------------------------------------------------------


def enumerate_edit_configurations(target, vocab):
    """Yield (d, sequence) for every edit configuration with d <= len(target) edits.

    A configuration: touched positions (each deleted or replaced by another
    candidate) plus a multiset of insertion gaps with one candidate each,
    enumerated naively.
    """
    length = len(target)
    for k in range(length + 1):
        for touched in itertools.combinations(range(length), k):
            options = [[None] + [c for c in vocab if c != target[t]] for t in touched]
            for ops in itertools.product(*options):
                edited = list(target)
                for t, op in zip(touched, ops):
                    edited[t] = op
                for i in range(length - k + 1):
                    for gaps in itertools.combinations_with_replacement(range(length + 1), i):
                        for inserted in itertools.product(vocab, repeat=i):
                            seq = []
                            for gap in range(length + 1):
                                seq += [tok for g, tok in zip(gaps, inserted) if g == gap]
                                if gap < length and edited[gap] is not None:
                                    seq.append(edited[gap])
                            yield k + i, tuple(seq)


def test_edit_sampler_matches_enumerated_configurations():
    """Uniform over edit configurations of a stratum; d ~ N(d)·exp(-d/τ)."""
    temperature, target_tokens, vocab_list = 0.7, [5, 6], [5, 6, 7]
    configurations = list(enumerate_edit_configurations(target_tokens, vocab_list))
    counts = Counter(d for d, _ in configurations)
    weights = {d: n * math.exp(-d / temperature) for d, n in counts.items()}
    prior = {d: w / sum(weights.values()) for d, w in weights.items()}
    # The implementation's prior equals the enumerated one.
    log_prior = edit_distance_log_prior(torch.tensor([2]), torch.tensor([3]), temperature)
    torch.testing.assert_close(log_prior[0].exp(), torch.tensor([prior[d] for d in range(3)]))

    marginal = Counter()
    path_log_probs = {}
    for d, seq in configurations:
        marginal[seq] += prior[d] / counts[d]
        path_log_probs.setdefault(seq, set()).add(round(math.log(prior[d] / counts[d]), 4))

    target = make_target([target_tokens])
    vocab = SubstitutionVocab(torch.tensor([vocab_list]), torch.tensor([3]))
    samples = edit_sampler(target, PAD, EOS, 30000, temperature, vocab, generator(7))
    assert chi_square_p_value(sample_counts(samples), marginal) > MIN_P_VALUE
    # log_q is the probability of one edit path that produces the sample.
    for row, log_q in zip(samples.tokens[:2000], samples.log_q[:2000]):
        assert round(log_q.item(), 4) in path_log_probs[tuple(real_tokens(row))]


@pytest.mark.parametrize("vocab_kind", ["full", "refs"])
def test_edit_sampler_distance_bounds_levenshtein_and_layout(vocab_kind):
    target = make_target([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15], [], None], width=9)
    vocab = (
        full_vocab(25, SPECIALS, target.size(0))
        if vocab_kind == "full"
        else refs_vocab(target, SPECIALS)
    )
    num_samples = 60
    s = edit_sampler(target, PAD, EOS, num_samples, 2.0, vocab, generator(8))
    assert s.tokens.size(0) == target.size(0) * num_samples
    assert s.tokens.size(1) >= target.size(1)
    assert torch.isfinite(s.log_q).all()
    assert s.distance.max() > 1
    for n, row in enumerate(s.tokens.tolist()):
        b = n // num_samples
        source = target[b].tolist()
        if EOS not in source:  # all-pad row
            assert row == [PAD] * len(row) and s.distance[n] == 0
            continue
        # tokens, exactly one eos, then right padding
        eos_at = row.index(EOS)
        assert row.count(EOS) == 1
        assert all(t == PAD for t in row[eos_at + 1 :])
        assert all(t not in (PAD, EOS) for t in row[:eos_at])
        sample, reference = row[:eos_at], real_tokens(target[b])
        distance = s.distance[n].item()
        lev = levenshtein(sample, reference)
        assert lev <= distance
        if distance <= 1:  # a single edit is always visible
            assert lev == distance
        allowed = set(vocab.candidates[b, : vocab.sizes[b]].tolist()) | set(reference)
        assert set(sample) <= allowed


# ---------------------------------------------------------------------------
# n-gram sampler
# ---------------------------------------------------------------------------


def test_ngram_sampler_matches_enumerated_paths():
    target_tokens, vocab_list = [5, 6, 7], [5, 6, 8]
    paths = Counter()
    path_log_probs = {}
    max_n = min(4, len(target_tokens))
    for n in range(1, max_n + 1):
        starts = len(target_tokens) - n + 1
        for start in range(starts):
            for tokens in itertools.product(vocab_list, repeat=n):
                seq = list(target_tokens)
                seq[start : start + n] = tokens
                p = 1 / max_n / starts / len(vocab_list) ** n
                paths[tuple(seq)] += p
                path_log_probs.setdefault(tuple(seq), set()).add(round(math.log(p), 4))
    target = make_target([target_tokens])
    vocab = SubstitutionVocab(torch.tensor([vocab_list]), torch.tensor([3]))
    samples = ngram_sampler(target, PAD, EOS, 20000, 1.0, vocab, generator(9))
    assert chi_square_p_value(sample_counts(samples), paths) > MIN_P_VALUE
    for row, log_q in zip(samples.tokens[:2000], samples.log_q[:2000]):
        assert round(log_q.item(), 4) in path_log_probs[tuple(real_tokens(row))]


@pytest.mark.parametrize("max_ngram", [4, 2])
def test_ngram_sampler_changes_one_short_contiguous_span(max_ngram):
    torch.manual_seed(0)
    rows = [torch.randint(4, 40, (n,)).tolist() for n in (12, 6, 3, 1, 0)]
    target = make_target(rows + [None], width=14)
    vocab = batch_vocab(target, SPECIALS)
    num_samples = 200
    s = ngram_sampler(target, PAD, EOS, num_samples, 1.0, vocab, generator(10), max_ngram=max_ngram)
    repeated = target.repeat_interleave(num_samples, 0)
    assert s.tokens.shape == repeated.shape
    changed = s.tokens != repeated
    assert torch.equal(s.distance, changed.sum(1))
    special = (repeated == PAD) | (repeated == EOS)
    assert not changed[special].any()
    assert torch.isin(s.tokens[changed], vocab.candidates[0]).all()
    positions = torch.arange(target.size(1)).expand_as(changed)
    first = torch.where(changed, positions, target.size(1)).min(1).values
    last = torch.where(changed, positions, -1).max(1).values
    span = (last - first + 1)[changed.any(1)]
    assert span.max() <= max_ngram
    assert span.max() == max_ngram  # longest n-grams do occur
    assert torch.isfinite(s.log_q).all()


# ---------------------------------------------------------------------------
# all samplers: degenerate rows, L = 1, determinism, argument checks
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("num_samples", [1, 3])
def test_degenerate_rows(sampler, num_samples):
    target = make_target([[], [7], None, [5, 6]], width=4)
    vocabs = [
        full_vocab(12, SPECIALS, 4),
        batch_vocab(target, SPECIALS),
        # sizes 0 / 1 / 0 / 2 (row 1 has a single candidate)
        SubstitutionVocab(torch.tensor([[9, 99], [7, 99], [9, 99], [5, 8]]), torch.tensor([0, 1, 0, 2])),
    ]
    for vocab in vocabs:
        s = sampler(target, PAD, EOS, num_samples, 1.0, vocab, generator(11))
        assert s.tokens.size(0) == s.distance.size(0) == s.log_q.size(0) == 4 * num_samples
        assert torch.isfinite(s.log_q).all()
        for b in (0, 2):  # only eos / only pad: unchanged, distance 0
            rows = slice(b * num_samples, (b + 1) * num_samples)
            width = target.size(1)
            assert (s.tokens[rows, :width] == target[b]).all()
            assert (s.tokens[rows, width:] == PAD).all()
            assert (s.distance[rows] == 0).all()
            assert (s.log_q[rows] == 0).all()
    # Length-1 rows with a rich vocabulary do get perturbed.
    vocab = full_vocab(12, SPECIALS, 4)
    s = sampler(target, PAD, EOS, 200, 5.0, vocab, generator(12))
    assert s.distance[200:400].max() >= 1


@pytest.mark.parametrize("sampler", [hamming_sampler, edit_sampler])
def test_single_candidate_forbids_substitution(sampler):
    target = make_target([[5, 6, 7]])
    vocab = SubstitutionVocab(torch.tensor([[6]]), torch.tensor([1]))
    s = sampler(target, PAD, EOS, 100, 5.0, vocab, generator(13))
    if sampler is hamming_sampler:
        assert (s.distance == 0).all() and (s.tokens == target).all()
    else:  # deletions / insertions of the single candidate remain possible
        for row, d in zip(s.tokens, s.distance):
            assert levenshtein(real_tokens(row), [5, 6, 7]) <= d
            assert set(real_tokens(row)) <= {5, 6, 7}


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_samplers_are_deterministic_given_a_generator(sampler):
    target = make_target([[5, 6, 7, 8, 9], [10, 11]])
    vocab = full_vocab(30, SPECIALS, 2)
    a = sampler(target, PAD, EOS, 8, 1.5, vocab, generator(14))
    b = sampler(target, PAD, EOS, 8, 1.5, vocab, generator(14))
    c = sampler(target, PAD, EOS, 8, 1.5, vocab, generator(15))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("sampler", [hamming_sampler, edit_sampler])
def test_invalid_arguments(sampler):
    target = make_target([[5, 6]])
    vocab = full_vocab(10, SPECIALS, 1)
    with pytest.raises(ValueError):
        sampler(target, PAD, EOS, 2, 0.0, vocab)
    with pytest.raises(ValueError):
        sampler(target, PAD, EOS, 0, 1.0, vocab)
    with pytest.raises(ValueError):
        sampler(target, PAD, EOS, 2, 1.0, full_vocab(10, SPECIALS, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_samplers_follow_the_target_device(sampler):
    target = make_target([[5, 6, 7], []]).cuda()
    vocab = batch_vocab(target, SPECIALS)
    s = sampler(target, PAD, EOS, 4, 1.0, vocab, torch.Generator(device="cuda").manual_seed(0))
    assert all(x.device == target.device for x in s)


# ---------------------------------------------------------------------------
# importance sampling
# ---------------------------------------------------------------------------


def test_importance_weights_normalize_per_group_and_follow_reward():
    gen = generator(16)
    num_groups, num_samples = 5, 6
    log_reward = torch.randn(num_groups * num_samples, generator=gen) * 3
    log_q = torch.randn(num_groups * num_samples, generator=gen)
    weights = importance_weights(log_reward, log_q, num_samples)
    grouped = weights.view(num_groups, num_samples)
    torch.testing.assert_close(grouped.sum(1), torch.ones(num_groups))
    assert (weights >= 0).all()
    # ω ∝ exp(r/τ - log q): ratios inside a group.
    ratio = grouped[:, 1:] / grouped[:, :1]
    expected = (log_reward - log_q).view(num_groups, num_samples)
    torch.testing.assert_close(ratio.log(), expected[:, 1:] - expected[:, :1], atol=1e-4, rtol=1e-4)
    # At equal proposal probability, weights are strictly increasing in reward.
    equal_q = importance_weights(log_reward, torch.full_like(log_q, -2.0), num_samples)
    for r, w in zip(log_reward.view(num_groups, -1), equal_q.view(num_groups, -1)):
        order = r.argsort()
        assert (w[order].diff() > 0).all()


def test_importance_weights_of_hopeless_group_are_uniform():
    log_reward = torch.tensor([float("-inf")] * 3 + [0.0, 1.0, 2.0])
    weights = importance_weights(log_reward, torch.zeros(6), 3)
    torch.testing.assert_close(weights[:3], torch.full((3,), 1 / 3))
    assert torch.isfinite(weights).all()


def test_effective_sample_size():
    weights = torch.tensor([0.25] * 4 + [1.0, 0.0, 0.0, 0.0] + [0.5, 0.5, 0.0, 0.0])
    torch.testing.assert_close(effective_sample_size(weights, 4), torch.tensor([4.0, 1.0, 2.0]))
    # Works on the output of a sampler with L = 1.
    w = importance_weights(torch.randn(3), torch.randn(3), 1)
    torch.testing.assert_close(w, torch.ones(3))
    torch.testing.assert_close(effective_sample_size(w, 1), torch.ones(3))
