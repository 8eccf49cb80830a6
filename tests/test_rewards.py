"""Tests of fairseq_seqlevel.rewards against sacrebleu, rapidfuzz and plain
Python reference implementations (no hard-coded expected scores)."""

import gzip
import math
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from sacrebleu.metrics import BLEU as sacrebleu_bleu  # a test dependency: missing means failing

from fairseq_seqlevel import rewards as R
from fairseq_seqlevel.rewards import ngrams as ngrams_module
from fairseq_seqlevel.rewards._common import chunk_rows
from conftest import levenshtein, train_sentencepiece


PAD = 0
SACRE_SMOOTHS = ["exp", "floor", "add-k", "none"]
# the copy stored in the repo (examples/bible_es_en/README.md), so CI never skips these
BIBLE = Path(__file__).resolve().parents[1] / "examples" / "bible_es_en" / "verses.tsv.gz"


# --------------------------------------------------------------------- helpers

def pack(seqs, pad=PAD, width=None):
    """List of id lists -> right-padded LongTensor [B, T] (T >= 1)."""
    width = max([len(s) for s in seqs] + [1]) if width is None else width
    out = torch.full((len(seqs), width), pad, dtype=torch.long)
    for i, seq in enumerate(seqs):
        out[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out


def pack_refs(refs, pad=PAD):
    """List (per example) of lists of references (None = absent) -> [B, R, T']."""
    num_refs = max(len(r) for r in refs)
    width = max([len(x) for rs in refs for x in rs if x] + [1])
    out = torch.full((len(refs), num_refs, width), pad, dtype=torch.long)
    for i, rs in enumerate(refs):
        for j, x in enumerate(rs):
            if x:
                out[i, j, : len(x)] = torch.tensor(x, dtype=torch.long)
    return out


def join(ids):
    return " ".join(str(t) for t in ids)


def sacre_refs(rs):
    """Our absent references are sacrebleu's None; no reference at all is
    scored against a single empty reference."""
    strings = [join(x) if x else None for x in rs]
    return strings if any(s is not None for s in strings) else [""]


def noisy_copy(rng, seq, vocab, p=0.3):
    """Substitutions, deletions, insertions and a local swap."""
    out = []
    for tok in seq:
        u = rng.random()
        if u < p / 3:
            continue
        out.append(rng.randint(1, vocab) if u < 2 * p / 3 else tok)
        if rng.random() < p / 3:
            out.append(rng.randint(1, vocab))
    if len(out) > 2 and rng.random() < 0.3:
        k = rng.randrange(len(out) - 1)
        out[k], out[k + 1] = out[k + 1], out[k]
    return out


def random_examples(seed, n, vocab=6, max_refs=4):
    """Small-vocabulary pairs: empty and length-1 hypotheses, hypotheses longer
    than the references, repeated n-grams, 1..max_refs ragged references."""
    rng = random.Random(seed)
    hyps, refs = [], []
    lengths = [0, 0, 1, 1, 2, 3, 4, 5, 6, 8, 10, 13, 17]
    for _ in range(n):
        num_refs = rng.randint(1, max_refs)
        rs = [[rng.randint(1, vocab) for _ in range(rng.choice(lengths[1:]))] for _ in range(num_refs)]
        for j in range(num_refs):  # ragged: some examples have absent references
            if num_refs > 1 and rng.random() < 0.25:
                rs[j] = None
        if rng.random() < 0.03:
            rs = [None] * num_refs  # only empty references
        kind = rng.random()
        present = [x for x in rs if x]
        if kind < 0.45 and present:
            hyp = noisy_copy(rng, rng.choice(present), vocab)
        elif kind < 0.55 and present:
            hyp = rng.choice(present) * rng.randint(2, 3)  # longer than refs, repeats
        else:
            hyp = [rng.randint(1, vocab) for _ in range(rng.choice(lengths))]
        hyps.append(hyp)
        refs.append(rs)
    return hyps, refs


def sacre_sentence(smooth, hyps, refs):
    metric = sacrebleu_bleu(tokenize="none", smooth_method=smooth, effective_order=True)
    return [metric.sentence_score(join(h), sacre_refs(rs)) for h, rs in zip(hyps, refs)]


def ngram_counter(seq, max_order):
    return Counter(tuple(seq[i: i + n]) for n in range(1, max_order + 1) for i in range(len(seq) - n + 1))


def add1_all_reference(hyp, refs, max_order=4):
    """Plain-Python ERAC/VAML "+1 on every order" BLEU (our documented spec)."""
    present = [r for r in refs if r] or [[]]
    hyp_counts = ngram_counter(hyp, max_order)
    ref_max = Counter()
    for ref in present:
        for gram, c in ngram_counter(ref, max_order).items():
            ref_max[gram] = max(ref_max[gram], c)
    matches, totals = [0] * max_order, [0] * max_order
    for gram, c in hyp_counts.items():
        totals[len(gram) - 1] += c
        matches[len(gram) - 1] += min(c, ref_max[gram])
    ref_len = min((abs(len(r) - len(hyp)), len(r)) for r in present)[1]
    hyp_len = len(hyp)
    if hyp_len >= ref_len:
        bp = 1.0
    else:
        bp = math.exp(1 - ref_len / hyp_len) if hyp_len > 0 else 0.0
    log_p = sum(math.log((m + 1) / (t + 1)) for m, t in zip(matches, totals)) / max_order
    return bp * math.exp(log_p)


def hamming_loop(a, b):
    return sum(1 for k in range(max(len(a), len(b))) if k >= len(a) or k >= len(b) or a[k] != b[k])


def present_refs(rs):
    return [x for x in rs if x] or [[]]


@pytest.fixture(scope="module", autouse=True)
def single_torch_thread():
    """These tensors are small: intra-op threads only add synchronisation,
    which is very slow when the 2-core machine is shared.  Restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def examples():
    hyps, refs = random_examples(seed=1234, n=10000)
    return hyps, refs, pack(hyps), pack_refs(refs)


# ------------------------------------------------------------------------ BLEU

@pytest.mark.parametrize("smooth", SACRE_SMOOTHS)
def test_sentence_bleu_equals_sacrebleu_on_random_pairs(examples, smooth):
    hyps, refs, hyp, ref = examples
    expected = sacre_sentence(smooth, hyps, refs)
    ours = R.sentence_bleu(hyp, ref, PAD, smooth=smooth)
    assert ours.shape == (len(hyps),) and ours.dtype == torch.float32
    want = torch.tensor([s.score / 100 for s in expected], dtype=torch.float64)
    diff = (ours.double() - want).abs()
    worst = int(diff.argmax())
    assert diff.max() < 1e-6, (smooth, hyps[worst], refs[worst], float(ours[worst]), float(want[worst]))
    # the coverage this test claims
    assert sum(len(h) == 0 for h in hyps) > 100 and sum(len(h) == 1 for h in hyps) > 100
    assert sum(len(h) > max(len(x) for x in present_refs(rs)) for h, rs in zip(hyps, refs)) > 1000
    assert {len(rs) for rs in refs} == {1, 2, 3, 4} and any(None in rs for rs in refs)
    assert 0 < (want > 1 - 1e-9).sum() and 0 < (want == 0).sum() < len(hyps)


def test_bleu_stats_equal_sacrebleu_stats(examples):
    hyps, refs, hyp, ref = examples
    stats = R.bleu_stats(hyp, ref, PAD)
    expected = sacre_sentence("exp", hyps[:3000], refs[:3000])
    for i, s in enumerate(expected):
        got = (stats.matches[i].tolist(), stats.totals[i].tolist(), int(stats.hyp_len[i]), int(stats.ref_len[i]))
        assert got == (s.counts, s.totals, s.sys_len, s.ref_len), (hyps[i], refs[i])


def test_add1_all_equals_plain_python_reference(examples):
    hyps, refs, hyp, ref = examples
    ours = R.sentence_bleu(hyp, ref, PAD, smooth="add1-all").double()
    want = torch.tensor([add1_all_reference(h, rs) for h, rs in zip(hyps, refs)], dtype=torch.float64)
    assert (ours - want).abs().max() < 1e-6
    assert (ours[[len(h) > 0 for h in hyps]] > 0).all()  # dense: non-empty hyps never score 0


def test_two_dim_refs_and_absent_rows():
    hyps, refs = random_examples(seed=7, n=500, max_refs=1)
    single = [rs[0] or [] for rs in refs]
    hyp = pack(hyps)
    two_d = R.sentence_bleu(hyp, pack(single), PAD)
    three_d = pack_refs(refs)
    # Appending all-pad (absent) reference rows must not change anything.
    padded = torch.cat([three_d, torch.full_like(three_d, PAD)], dim=1)
    assert torch.equal(two_d, R.sentence_bleu(hyp, three_d, PAD))
    assert torch.equal(two_d, R.sentence_bleu(hyp, padded, PAD))


def bible_verses(limit, seed=0):
    rng = random.Random(seed)
    with gzip.open(BIBLE, "rt", encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f]
    rows = [r for r in rows if len(r) == 4 and r[2].strip() and r[3].strip()]
    return rng.sample(rows, limit)


@pytest.mark.skipif(not BIBLE.exists(), reason="bible data not available")
@pytest.mark.parametrize("smooth", SACRE_SMOOTHS)
def test_sentence_bleu_on_bible_sentences(smooth):
    rng = random.Random(5)
    rows = bible_verses(1500)
    vocab = {}
    ids = lambda words: [vocab.setdefault(w, len(vocab) + 1) for w in words]  # noqa: E731
    hyps, refs, hyp_words, ref_words = [], [], [], []
    for _, _, web, kjv in rows:
        web_w, kjv_w = web.split(), kjv.split()
        source = web_w if rng.random() < 0.5 else kjv_w
        noisy = [w if rng.random() > 0.2 else rng.choice(web_w + kjv_w) for w in source if rng.random() > 0.1]
        hyp_words.append(noisy)
        ref_words.append([web_w, kjv_w])
        hyps.append(ids(noisy))
        refs.append([ids(web_w), ids(kjv_w)])
    metric = sacrebleu_bleu(tokenize="none", smooth_method=smooth, effective_order=True)
    want = torch.tensor([metric.sentence_score(" ".join(h), [" ".join(r) for r in rs]).score / 100
                         for h, rs in zip(hyp_words, ref_words)], dtype=torch.float64)
    ours = R.sentence_bleu(pack(hyps), pack_refs(refs), PAD, smooth=smooth).double()
    assert (ours - want).abs().max() < 1e-6
    # single reference (KJV) as a B x T' tensor
    want1 = torch.tensor([metric.sentence_score(" ".join(h), [" ".join(rs[1])]).score / 100
                          for h, rs in zip(hyp_words, ref_words)], dtype=torch.float64)
    ours1 = R.sentence_bleu(pack(hyps), pack([r[1] for r in refs]), PAD, smooth=smooth).double()
    assert (ours1 - want1).abs().max() < 1e-6


def with_eos_and_garbage(rng, seq, eos, vocab):
    """seq + eos + random non-pad tokens (which must be ignored)."""
    return seq + [eos] + [rng.randint(1, vocab) for _ in range(rng.randint(0, 4))]


@pytest.mark.parametrize("smooth", SACRE_SMOOTHS + ["add1-all"])
def test_eos_truncation(smooth):
    vocab, eos = 6, 7
    rng = random.Random(3)
    hyps, refs = random_examples(seed=11, n=1500, vocab=vocab, max_refs=3)
    hyp_eos = [with_eos_and_garbage(rng, h, eos, vocab) for h in hyps]
    refs_eos = [[with_eos_and_garbage(rng, x, eos, vocab) if x else None for x in rs] for rs in refs]
    ours = R.sentence_bleu(pack(hyp_eos), pack_refs(refs_eos), PAD, eos=eos, smooth=smooth)
    plain = R.sentence_bleu(pack(hyps), pack_refs(refs), PAD, smooth=smooth)
    assert torch.allclose(ours, plain, atol=1e-7, rtol=0)
    if smooth != "add1-all":
        want = torch.tensor([s.score / 100 for s in sacre_sentence(smooth, hyps, refs)])
        assert (ours.double() - want.double()).abs().max() < 1e-6
    # without eos the garbage is scored: results must differ somewhere
    assert not torch.equal(R.sentence_bleu(pack(hyp_eos), pack_refs(refs_eos), PAD, smooth=smooth), ours)


@pytest.mark.parametrize("smooth", SACRE_SMOOTHS + ["add1-all"])
def test_prefix_bleu_equals_sentence_bleu_of_each_prefix(smooth):
    hyps, refs = random_examples(seed=21, n=1500, max_refs=3)
    hyp, ref = pack(hyps), pack_refs(refs)
    prefix = R.prefix_bleu(hyp, ref, PAD, smooth=smooth)
    assert prefix.shape == hyp.shape
    loop = torch.stack([R.sentence_bleu(hyp[:, : t + 1], ref, PAD, smooth=smooth)
                        for t in range(hyp.size(1))], dim=1)
    assert (prefix - loop).abs().max() < 1e-6
    # positions at/after the end hold the full sentence's value
    full = R.sentence_bleu(hyp, ref, PAD, smooth=smooth)
    lengths = torch.tensor([len(h) for h in hyps])
    after_end = torch.arange(hyp.size(1)).unsqueeze(0) >= (lengths - 1).clamp(min=0).unsqueeze(1)
    assert torch.equal(prefix[after_end], full.unsqueeze(1).expand_as(prefix)[after_end])


def test_prefix_bleu_equals_sacrebleu_on_prefixes_with_eos():
    vocab, eos = 5, 6
    rng = random.Random(8)
    hyps, refs = random_examples(seed=31, n=300, vocab=vocab, max_refs=2)
    hyp_eos = [with_eos_and_garbage(rng, h, eos, vocab) for h in hyps]
    prefix = R.prefix_bleu(pack(hyp_eos), pack_refs(refs), PAD, eos=eos)
    metric = sacrebleu_bleu(tokenize="none", effective_order=True)
    for i, (h, rs) in enumerate(zip(hyps, refs)):
        for t in range(prefix.size(1)):
            want = metric.sentence_score(join(h[: t + 1]), sacre_refs(rs)).score / 100
            assert abs(float(prefix[i, t]) - want) < 1e-6


@pytest.mark.parametrize("smooth,effective_order", [("exp", False), ("none", False), ("floor", False),
                                                    ("add-k", False), ("exp", True)])
def test_corpus_bleu_from_stats_equals_sacrebleu_corpus_score(smooth, effective_order):
    hyps, refs = random_examples(seed=41, n=800, vocab=8, max_refs=3)
    num_refs = max(len(rs) for rs in refs)
    stats = R.bleu_stats(pack(hyps), pack_refs(refs), PAD)
    ours = float(R.corpus_bleu_from_stats(stats, smooth=smooth, effective_order=effective_order))
    ref_streams = [[(join(rs[j]) if j < len(rs) and rs[j] else None) for rs in refs] for j in range(num_refs)]
    for i, rs in enumerate(refs):  # sacrebleu needs >= 1 reference per segment
        if not any(x for x in rs):
            ref_streams[0][i] = ""
    metric = sacrebleu_bleu(tokenize="none", smooth_method=smooth, effective_order=effective_order)
    want = metric.corpus_score([join(h) for h in hyps], ref_streams).score / 100
    assert abs(ours - want) < 1e-6
    # a small corpus, so that "none" without matches at some order can be 0
    small = R.bleu_stats(pack(hyps[:3]), pack_refs(refs[:3]), PAD)
    want_small = metric.corpus_score([join(h) for h in hyps[:3]], [s[:3] for s in ref_streams]).score / 100
    assert abs(float(R.corpus_bleu_from_stats(small, smooth=smooth, effective_order=effective_order))
               - want_small) < 1e-6


def test_counting_backends_and_chunking_agree(examples):
    _, _, hyp, ref = examples
    reference = R.bleu_stats(hyp, ref, PAD, method="pairwise", budget=1 << 40)  # one chunk
    per_row = hyp.size(1) * (hyp.size(1) + ref.size(1) * ref.size(2))
    assert len(chunk_rows(hyp.size(0), per_row, 1 << 40)) == 1
    assert len(chunk_rows(hyp.size(0), per_row, 20_000)) > 100  # really chunked below
    for method, budget, rows in [("bitset", 1 << 40, None), ("bitset", None, None),
                                 ("bitset", 20_000, 3000), ("pairwise", 20_000, 3000)]:
        stats = R.bleu_stats(hyp[:rows], ref[:rows], PAD, method=method, budget=budget)
        assert all(torch.equal(a[:rows], b) for a, b in zip(reference, stats)), (method, budget)
    # one row per chunk, on a subset
    small = R.bleu_stats(hyp[:300], ref[:300], PAD, method="bitset", budget=1)
    assert all(torch.equal(a[:300], b) for a, b in zip(reference, small))
    prefix_whole = R.prefix_bleu_stats(hyp[:3000], ref[:3000], PAD, budget=1 << 40)
    prefix_chunked = R.prefix_bleu_stats(hyp[:3000], ref[:3000], PAD, method="pairwise", budget=20_000)
    assert all(torch.equal(a, b) for a, b in zip(prefix_whole, prefix_chunked))


@pytest.mark.parametrize("method", ["bitset", "pairwise"])
def test_module_budget_constant_controls_chunking(monkeypatch, method):
    hyps, refs = random_examples(seed=51, n=400, max_refs=2)
    hyp, ref = pack(hyps), pack_refs(refs)
    expected = R.bleu_stats(hyp, ref, PAD, method=method)
    calls = []
    original = ngrams_module._count_without_padding
    monkeypatch.setattr(ngrams_module, "_count_without_padding", lambda *a: calls.append(1) or original(*a))
    monkeypatch.setattr(ngrams_module, "PAIRWISE_ELEMENT_BUDGET", 2000)
    got = R.bleu_stats(hyp, ref, PAD, method=method)
    assert len(calls) > 10
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


def test_long_sequences_use_several_bitset_words():
    """References and hypotheses longer than one 56-bit word."""
    rng = random.Random(52)
    refs = [[[rng.randint(1, 4) for _ in range(rng.randint(50, 130))] for _ in range(2)] for _ in range(200)]
    hyps = [noisy_copy(rng, rs[0], 4) + [rng.randint(1, 4) for _ in range(rng.randint(0, 60))] for rs in refs]
    hyp, ref = pack(hyps), pack_refs(refs)
    assert hyp.size(1) > 112 and ref.size(2) > 112
    bitset = R.bleu_stats(hyp, ref, PAD, method="bitset")
    pairwise = R.bleu_stats(hyp, ref, PAD, method="pairwise")
    assert all(torch.equal(a, b) for a, b in zip(bitset, pairwise))
    want = torch.tensor([s.score / 100 for s in sacre_sentence("exp", hyps[:50], refs[:50])], dtype=torch.float64)
    assert (R.sentence_bleu(hyp[:50], ref[:50], PAD).double() - want).abs().max() < 1e-6


@pytest.mark.parametrize("id_range", [60_000, 1 << 40, (1 << 62) - 2])
def test_large_ids_are_encoded_exactly(examples, id_range):
    """Ids too large for direct base-V packing take the re-numbering path."""
    hyps, refs, hyp, ref = examples
    rng = random.Random(id_range % 1000)
    mapping = {t: rng.randrange(1, id_range) for t in range(1, 9)}
    assert len(set(mapping.values())) == len(mapping)
    mapped = lambda x: x.clone().apply_(lambda t: mapping.get(t, t))  # noqa: E731
    expected = R.bleu_stats(hyp, ref, PAD)
    for method in ["bitset", "pairwise"]:
        got = R.bleu_stats(mapped(hyp), mapped(ref), PAD, method=method)
        assert all(torch.equal(a, b) for a, b in zip(expected, got)), method


def test_codes_are_collision_free_for_wide_vocab():
    """N-grams that would collide under truncated packing must stay distinct."""
    big = 70_000  # base^4 > 2^62: forces re-numbering before order 4
    hyp = torch.tensor([[1, big, 2, big - 1]])
    ref = torch.tensor([[1, big, 2, big - 1], [1, big, 2, big]])
    for method in ["bitset", "pairwise"]:
        same = R.bleu_stats(hyp, ref[:1], -1, method=method)
        other = R.bleu_stats(hyp, ref[1:], -1, method=method)
        assert same.matches.tolist() == [[4, 3, 2, 1]]
        assert other.matches.tolist() == [[3, 2, 1, 0]]


# -------------------------------------------------------- edit and hamming

def _assert_distance_family(hyps, refs, dist, norm, prefix, prefix_norm, oracle):
    """Each of a distance's four forms (raw, /|ref|, every prefix raw and /|ref|)
    equals its Python oracle, minimized over the present references."""
    for i, (h, rs) in enumerate(zip(hyps, refs)):
        present = present_refs(rs)
        assert int(dist[i]) == min(oracle(h, r) for r in present)
        assert abs(float(norm[i]) - min(oracle(h, r) / max(len(r), 1) for r in present)) < 1e-6
        for t in range(prefix.size(1)):
            assert int(prefix[i, t]) == min(oracle(h[: t + 1], r) for r in present)
            want = min(oracle(h[: t + 1], r) / max(len(r), 1) for r in present)
            assert abs(float(prefix_norm[i, t]) - want) < 1e-6


def test_edit_distance_against_python_dp_and_rapidfuzz():
    levenshtein_rf = pytest.importorskip("rapidfuzz.distance").Levenshtein
    hyps, refs = random_examples(seed=61, n=1500, vocab=5, max_refs=3)
    hyp, ref = pack(hyps), pack_refs(refs)
    dist = R.edit_distance(hyp, ref, PAD)
    norm = R.normalized_edit_distance(hyp, ref, PAD)
    assert dist.dtype == torch.long and norm.dtype == torch.float32
    as_str = lambda seq: "".join(chr(0x100 + t) for t in seq)  # noqa: E731
    for i, (h, rs) in enumerate(zip(hyps, refs)):
        assert int(dist[i]) == min(levenshtein_rf.distance(as_str(h), as_str(r)) for r in present_refs(rs))
    _assert_distance_family(hyps, refs, dist, norm, R.prefix_edit_distance(hyp, ref, PAD),
                            R.prefix_normalized_edit_distance(hyp, ref, PAD), levenshtein)


def test_edit_distance_longer_sequences_against_rapidfuzz():
    levenshtein_rf = pytest.importorskip("rapidfuzz.distance").Levenshtein
    rng = random.Random(62)
    refs = [[rng.randint(1, 50) for _ in range(rng.randint(0, 60))] for _ in range(300)]
    hyps = [noisy_copy(rng, r, 50, p=0.5) for r in refs]
    dist = R.edit_distance(pack(hyps), pack(refs), PAD)
    assert dist.tolist() == [levenshtein_rf.distance(h, r) for h, r in zip(hyps, refs)]


def test_edit_distance_multi_word_references_against_rapidfuzz():
    """References past 64 tokens span several int64 words of the bit-parallel
    column: lengths at and around the word boundaries, every prefix exact."""
    levenshtein_rf = pytest.importorskip("rapidfuzz.distance").Levenshtein
    rng = random.Random(63)
    lengths = [63, 64, 65, 127, 128, 129, 200] + [rng.randint(0, 200) for _ in range(100)]
    refs = [[rng.randint(1, 6) for _ in range(n)] for n in lengths]
    hyps = [noisy_copy(rng, r, 6, p=0.3) for r in refs] + [[]]
    refs = refs + [[1] * 130]
    hyp, ref = pack(hyps), pack(refs)
    assert R.edit_distance(hyp, ref, PAD).tolist() == [levenshtein_rf.distance(h, r) for h, r in zip(hyps, refs)]
    prefix = R.prefix_edit_distance(hyp, ref, PAD)
    for i, (h, r) in enumerate(zip(hyps, refs)):
        want = [levenshtein_rf.distance(h[: t + 1], r) for t in range(len(h))]
        assert prefix[i, : len(h)].tolist() == want


def test_equal_token_bitsets_split_token_ids_exactly():
    """The bitsets behind edit distance (Myers' Peq) and the n-gram counts split a
    token id into its high and low bits and AND two tables: ids that share one half
    but not the other must not match.  Against the definition (bit i of word w set
    iff key[word_bits·w + i] == query[t] and the key position is valid), one chunk and
    many, 64- and 56-bit words, then edit distances over a 50k vocabulary against rapidfuzz."""
    from fairseq_seqlevel.rewards._common import equal_token_bitsets

    gen = torch.Generator().manual_seed(64)
    half = 1 << ((49_999).bit_length() + 1) // 2
    # ids on a small grid of (hi, lo) pairs: most pairs of ids share a half
    grid = torch.tensor([hi * half + lo for hi in (1, 2, 190) for lo in (0, 3, 220)] + [49_999])
    cases = [(grid, 40, 64, False), (grid, 150, 64, False), (grid, 150, 56, True), (grid, 1, 56, True),
             ((1 << 61) + grid * (1 << 30), 70, 64, True)]  # hashed-word-sized ids: renumbered first
    for ids, width, word_bits, masked in cases:
        keys = ids[torch.randint(len(ids), (257, width), generator=gen)]
        query = ids[torch.randint(len(ids), (257, 33), generator=gen)]
        mask = torch.rand(257, width, generator=gen) < 0.8 if masked else torch.ones(257, width, dtype=torch.bool)
        equal = (query.unsqueeze(-1) == keys.unsqueeze(1)) & mask.unsqueeze(1)  # [N, T, L]
        want = torch.zeros(257, 33, -(-width // word_bits), dtype=torch.long)
        for i in range(width):  # the definition, bit by bit
            want[..., i // word_bits] |= equal[..., i].long() << (i % word_bits)
        for budget in (1 << 22, 1000, 1):
            got = equal_token_bitsets(query, keys, word_bits, mask if masked else None, budget=budget)
            assert torch.equal(got, want), (width, word_bits, budget)
    levenshtein_rf = pytest.importorskip("rapidfuzz.distance").Levenshtein
    rng = random.Random(65)
    ids = grid.tolist()
    refs = [[rng.choice(ids) for _ in range(rng.randint(0, 90))] for _ in range(300)]
    hyps = [[rng.choice(ids) if rng.random() < 0.3 else t for t in r if rng.random() > 0.1] for r in refs]
    dist = R.edit_distance(pack(hyps), pack(refs), PAD)
    assert dist.tolist() == [levenshtein_rf.distance(h, r) for h, r in zip(hyps, refs)]


def test_hamming_against_plain_loop():
    hyps, refs = random_examples(seed=71, n=1500, vocab=4, max_refs=3)
    hyp, ref = pack(hyps), pack_refs(refs)
    _assert_distance_family(hyps, refs, R.hamming(hyp, ref, PAD), R.normalized_hamming(hyp, ref, PAD),
                            R.prefix_hamming(hyp, ref, PAD), R.prefix_normalized_hamming(hyp, ref, PAD),
                            hamming_loop)


def test_distances_with_eos():
    vocab, eos = 5, 6
    rng = random.Random(81)
    hyps, refs = random_examples(seed=82, n=500, vocab=vocab, max_refs=2)
    hyp_eos = pack([with_eos_and_garbage(rng, h, eos, vocab) for h in hyps])
    refs_eos = pack_refs([[with_eos_and_garbage(rng, x, eos, vocab) if x else None for x in rs] for rs in refs])
    for fn in [R.edit_distance, R.hamming, R.normalized_edit_distance, R.normalized_hamming]:
        assert torch.equal(fn(hyp_eos, refs_eos, PAD, eos), fn(pack(hyps), pack_refs(refs), PAD))


# --------------------------------------------------------------------- registry

def test_registry_names_and_unknown_reward_message():
    names = R.available_rewards()
    assert {"bleu", "bleu_add1", "edit", "hamming"} <= set(names)
    with pytest.raises(ValueError) as err:
        R.get_reward("xyz")
    message = str(err.value)
    assert "\n" not in message and message.startswith("unknown reward 'xyz'; known rewards: ")
    assert message.endswith(", ".join(names))


def test_registry_rewards_costs_and_prefixes(examples):
    hyps, refs, hyp, ref = examples
    hyp, ref = hyp[:500], ref[:500]
    bleu = R.get_reward("bleu")
    assert torch.equal(bleu(hyp, ref, PAD), R.sentence_bleu(hyp, ref, PAD))
    assert torch.allclose(bleu.cost(hyp, ref, PAD), 1 - R.sentence_bleu(hyp, ref, PAD))
    assert torch.equal(bleu.prefix(hyp, ref, PAD), R.prefix_bleu(hyp, ref, PAD))
    add1 = R.get_reward("bleu_add1")
    assert torch.equal(add1(hyp, ref, PAD), R.sentence_bleu(hyp, ref, PAD, smooth="add1-all"))
    edit = R.get_reward("edit")
    assert torch.allclose(edit.cost(hyp, ref, PAD), R.normalized_edit_distance(hyp, ref, PAD))
    assert torch.allclose(edit.prefix_cost(hyp, ref, PAD), R.prefix_normalized_edit_distance(hyp, ref, PAD))
    ham = R.get_reward("hamming")
    assert torch.allclose(ham.cost(hyp, ref, PAD), R.normalized_hamming(hyp, ref, PAD))
    for name in ["bleu", "bleu_add1", "edit", "hamming"]:
        reward = R.get_reward(name)
        value, prefix = reward(hyp, ref, PAD), reward.prefix(hyp, ref, PAD)
        assert value.shape == (hyp.size(0),) and prefix.shape == hyp.shape
        assert ((value >= reward.low) & (value <= reward.high)).all()
        assert (reward.cost(hyp, ref, PAD) >= 0).all()
        # last prefix column = full sentence
        assert torch.allclose(prefix[:, -1], value)


def test_register_custom_reward_without_prefix():
    custom = R.Reward("neg_len_test", lambda h, r, pad, eos=None: -(h != pad).sum(-1).float(), None,
                      True, -math.inf, 0.0, "negative length")
    R.register_reward(custom)
    try:
        assert R.get_reward("neg_len_test") is custom
        with pytest.raises(ValueError):
            R.register_reward(custom)
        with pytest.raises(NotImplementedError, match="neg_len_test"):
            custom.prefix(torch.ones(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long), PAD)
    finally:
        R.registry._REGISTRY.pop("neg_len_test")


def test_all_pad_rows_are_finite():
    hyp = torch.tensor([[PAD, PAD, PAD], [3, 4, PAD], [PAD, PAD, PAD]])
    ref = torch.tensor([[[PAD, PAD], [PAD, PAD]], [[PAD, PAD], [PAD, PAD]], [[3, 4], [PAD, PAD]]])
    for name in R.available_rewards():
        reward = R.get_reward(name)
        for out in [reward(hyp, ref, PAD), reward.prefix(hyp, ref, PAD), reward.cost(hyp, ref, PAD)]:
            assert torch.isfinite(out).all(), name
    for smooth in R.SMOOTH_METHODS:
        assert torch.isfinite(R.prefix_bleu(hyp, ref, PAD, smooth=smooth)).all()
    assert R.edit_distance(hyp, ref, PAD).tolist() == [0, 2, 2]
    assert R.hamming(hyp, ref, PAD).tolist() == [0, 2, 2]


# -------------------------------------------------------------------- WordMerger

FAIRSEQ_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # fairseq Dictionary ids 0..3
BOS, FPAD, EOS, UNK = 0, 1, 2, 3


def sp_decode(pieces):
    """Reference decoding for the sentencepiece convention (unk standalone)."""
    text = "".join(" <unk> " if p is None else p for p in pieces)
    return text.replace("\u2581", " ").strip()


def bpe_decode(tokens):
    """fairseq's subword_nmt post-processing (unk standalone)."""
    return (" ".join(tokens) + " ").replace("@@ ", "").strip()


@pytest.fixture(scope="module")
def sentencepiece_model():
    pytest.importorskip("sentencepiece")
    if not BIBLE.exists():
        pytest.skip("bible data not available")
    rows = bible_verses(3000, seed=1)
    return train_sentencepiece([r[2] for r in rows] + [r[3] for r in rows], 300), rows


def test_word_merger_sentencepiece_matches_sacrebleu(sentencepiece_model):
    sp, rows = sentencepiece_model
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())
              if not (sp.is_control(i) or sp.is_unknown(i))]
    symbols = FAIRSEQ_SPECIALS + pieces
    index = {p: i for i, p in enumerate(symbols)}
    merger = R.WordMerger(symbols, "sentencepiece", pad=FPAD, eos=EOS, drop_ids={BOS}, standalone_ids={UNK})
    rng = random.Random(9)

    def encode(text, sample):
        ids = encode_plain(sp, index, text, sample)
        # sprinkle bos (dropped), unk (standalone word) and bare "▁" pieces
        for _ in range(rng.choice([0, 0, 1, 2])):
            ids.insert(rng.randint(0, len(ids)), rng.choice([BOS, UNK, index["\u2581"]]))
        return ids

    hyp_ids, ref_ids = [], []
    for _, _, web, kjv in rows[:800]:
        words = (web if rng.random() < 0.5 else kjv).split()
        noisy = " ".join(w for w in words if rng.random() > 0.15)
        hyp_ids.append(encode(noisy, sample=True))
        ref_ids.append([encode(web, sample=False), encode(kjv, sample=True)])
    as_text = lambda ids: sp_decode([None if i == UNK else symbols[i] for i in ids if i != BOS])  # noqa: E731
    hyp_words = merger(_pack_with_eos(hyp_ids))
    ref_words = merger(_pack_refs_with_eos(ref_ids))
    assert hyp_words.shape[0] == 800 and ref_words.shape[:2] == (800, 2)
    assert (hyp_words != merger.pad).sum(-1).tolist() == [len(as_text(h).split()) for h in hyp_ids]
    for smooth in ["exp", "none"]:
        metric = sacrebleu_bleu(tokenize="none", smooth_method=smooth, effective_order=True)
        want = torch.tensor([metric.sentence_score(as_text(h), [as_text(r) for r in rs]).score / 100
                             for h, rs in zip(hyp_ids, ref_ids)], dtype=torch.float64)
        ours = R.sentence_bleu(hyp_words, ref_words, merger.pad, smooth=smooth).double()
        assert (ours - want).abs().max() < 1e-6
    # the same text under a sampled segmentation gives the same words
    same = [rows[i][2] for i in range(200)]
    seg_a = merger(pack([encode_plain(sp, index, t, False) for t in same], pad=FPAD))
    seg_b = merger(pack([encode_plain(sp, index, t, True) for t in same], pad=FPAD))
    assert torch.equal(seg_a, seg_b)
    assert not torch.equal(pack([encode_plain(sp, index, t, False) for t in same], pad=FPAD),
                           pack([encode_plain(sp, index, t, True) for t in same], pad=FPAD))


def encode_plain(sp, index, text, sample):
    if sample:
        out = sp.encode(text, out_type=str, enable_sampling=True, alpha=0.1, nbest_size=-1)
    else:
        out = sp.encode(text, out_type=str)
    return [index.get(p, UNK) for p in out]


def _pack_with_eos(seqs):
    """fairseq-style targets: tokens, eos, then pad."""
    return pack([s + [EOS] for s in seqs], pad=FPAD)


def _pack_refs_with_eos(refs):
    width = max(len(x) for rs in refs for x in rs) + 1
    out = torch.full((len(refs), len(refs[0]), width), FPAD, dtype=torch.long)
    for i, rs in enumerate(refs):
        for j, x in enumerate(rs):
            out[i, j, : len(x) + 1] = torch.tensor(x + [EOS])
    return out


def random_bpe_segmentation(rng, word):
    """Split a word into 1..3 pieces, all but the last marked with '@@'."""
    if len(word) < 2:
        return [word]
    cuts = sorted(rng.sample(range(1, len(word)), min(len(word) - 1, rng.randint(0, 2))))
    parts = [word[a:b] for a, b in zip([0] + cuts, cuts + [len(word)])]
    return [p + "@@" for p in parts[:-1]] + [parts[-1]]


def test_word_merger_subword_nmt_matches_sacrebleu():
    if not BIBLE.exists():
        pytest.skip("bible data not available")
    rng = random.Random(13)
    rows = bible_verses(600, seed=2)
    symbols = list(FAIRSEQ_SPECIALS)
    index = {s: i for i, s in enumerate(symbols)}

    def tokenize(text):
        tokens = []
        for word in text.split():
            tokens += ["<unk>"] if rng.random() < 0.03 else random_bpe_segmentation(rng, word)
        if tokens and tokens[-1] != "<unk>" and rng.random() < 0.1:
            tokens[-1] += "@@"  # a trailing continuation marker is dropped
        for piece in tokens:
            if piece not in index:
                index[piece] = len(symbols)
                symbols.append(piece)
        return tokens

    hyp_tok = [tokenize(" ".join(w for w in (web if rng.random() < 0.5 else kjv).split() if rng.random() > 0.2))
               for _, _, web, kjv in rows]
    ref_tok = [[tokenize(web), tokenize(kjv)] for _, _, web, kjv in rows]
    assert sum(s.endswith("@@") for s in symbols) > 100 and sum(not s.endswith("@@") for s in symbols) > 100
    merger = R.WordMerger(symbols, "subword_nmt", pad=FPAD, eos=EOS, drop_ids={BOS}, standalone_ids={UNK})
    to_ids = lambda toks: [index[t] for t in toks] + [EOS]  # noqa: E731
    hyp_words = merger(pack([to_ids(t) for t in hyp_tok], pad=FPAD))
    ref_words = merger(_pack_refs_with_eos([[to_ids(t)[:-1] for t in rs] for rs in ref_tok]))
    metric = sacrebleu_bleu(tokenize="none", effective_order=True)
    want = torch.tensor([metric.sentence_score(bpe_decode(h), [bpe_decode(r) for r in rs]).score / 100
                         for h, rs in zip(hyp_tok, ref_tok)], dtype=torch.float64)
    ours = R.sentence_bleu(hyp_words, ref_words, merger.pad).double()
    assert (ours - want).abs().max() < 1e-6
    assert ((ours > 0) & (ours < 1)).float().mean() > 0.5


def test_word_merger_edge_cases():
    symbols = FAIRSEQ_SPECIALS + ["\u2581", "\u2581ab", "c", "\u2581a", "bc", "\u2581abc", "\u2581\u2581x"]
    sym = {s: i for i, s in enumerate(symbols)}
    merger = R.WordMerger(symbols, "sentencepiece", pad=FPAD, eos=EOS, drop_ids={BOS}, standalone_ids={UNK})
    rows = [
        [sym["\u2581ab"], sym["c"], FPAD, FPAD],              # "abc"
        [sym["\u2581a"], sym["bc"], EOS, sym["c"]],           # "abc" (after eos ignored)
        [sym["\u2581"], sym["\u2581abc"], BOS, FPAD],         # bare ▁: no empty word; bos dropped
        [sym["\u2581"], sym["\u2581"], FPAD, FPAD],           # nothing at all
        [UNK, sym["c"], sym["\u2581\u2581x"], UNK],           # <unk> c x <unk>
    ]
    words = merger(torch.tensor(rows))
    abc = words[0, 0]
    assert words[0].tolist() == [abc, merger.pad, merger.pad, merger.pad][: words.size(1)]
    assert words[1, 0] == abc and words[2, 0] == abc and (words[:3, 1:] == merger.pad).all()
    assert (words[3] == merger.pad).all()
    unk_row = words[4].tolist()
    assert len(unk_row) == 4 and unk_row[0] == unk_row[3] and len(set(unk_row)) == 3
    assert (words[words != merger.pad] >= 0).all()
    # leading dims are kept; same device and dtype
    stacked = merger(torch.tensor(rows).view(5, 1, 4))
    assert stacked.shape == (5, 1, words.size(1)) and torch.equal(stacked.view_as(words), words)
    assert stacked.dtype == torch.long and stacked.device == words.device
    with pytest.raises(ValueError):
        R.WordMerger(symbols, "wordpiece", pad=FPAD)


def test_word_merger_from_duck_typed_dictionary():
    class FakeDictionary:
        symbols = FAIRSEQ_SPECIALS + ["he@@", "llo", "hel@@", "lo", "world"]

        def bos(self): return BOS
        def pad(self): return FPAD
        def eos(self): return EOS
        def unk(self): return UNK

    merger = R.WordMerger.from_dictionary(FakeDictionary(), "subword_nmt")
    a = merger(torch.tensor([[4, 5, 8, EOS, FPAD]]))
    b = merger(torch.tensor([[BOS, 6, 7, 8, EOS]]))
    assert a.tolist() == b.tolist() and a.size(1) == 2
