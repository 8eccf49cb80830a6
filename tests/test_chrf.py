"""chrF / chrF++ on token ids against sacrebleu's sentence scores on the text fairseq shows
(``Dictionary.string`` + its subword post-processing), and the prefix variants against the
full score of every prefix (no hard-coded expected scores)."""

import gzip
import math
import random
from pathlib import Path

import pytest
import torch
from sacrebleu.metrics import CHRF  # a test dependency: missing means failing

from conftest import train_sentencepiece
from test_rewards import pack, pack_refs
from fairseq_seqlevel import rewards as R
from fairseq_seqlevel.rewards import chrf as chrf_module
from fairseq_seqlevel.rewards.binding import BoundReward

BIBLE = Path(__file__).resolve().parents[1] / "examples" / "bible_es_en" / "verses.tsv.gz"
WORD_ORDERS = [0, 2]


@pytest.fixture(scope="module", autouse=True)
def single_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------- helpers

def fairseq_dictionary(symbols):
    """A fairseq Dictionary: <s> <pad> </s> <unk>, then ``symbols`` (which must be new)."""
    from fairseq.data import Dictionary

    dictionary = Dictionary()
    for symbol in symbols:
        assert symbol not in dictionary.indices, symbol
        dictionary.add_symbol(symbol)
    return dictionary


def fairseq_text(dictionary, ids, style):
    """What fairseq shows: the row up to its first pad/eos, ``Dictionary.string`` (bos
    dropped, unk as "<unk>"), then the subword post-processing."""
    from fairseq.data.data_utils import post_process

    row = []
    for i in ids:
        if i in (dictionary.pad(), dictionary.eos()):
            break
        row.append(i)
    return post_process(dictionary.string(torch.tensor(row, dtype=torch.long)), style) if row else ""


def sacre_scores(word_order, hyp_texts, ref_texts):
    """sacrebleu sentence scores / 100; absent references (None) left out, no reference at all
    -> one empty reference."""
    metric = CHRF(word_order=word_order)
    return torch.tensor([metric.sentence_score(h, [r for r in rs if r is not None] or [""]).score / 100
                         for h, rs in zip(hyp_texts, ref_texts)], dtype=torch.float64)


def check_against_sacrebleu(dictionary, style, hyps, refs, word_order):
    """Our bound chrF (3-d references, and 2-d for the first reference) vs sacrebleu."""
    chrf = R.ChrF.from_dictionary(dictionary, style, word_order)
    pad, eos = dictionary.pad(), dictionary.eos()
    hyp_texts = [fairseq_text(dictionary, h, style) for h in hyps]
    ref_texts = [[fairseq_text(dictionary, x, style) if x else None for x in rs] for rs in refs]
    ours = chrf(pack(hyps, pad), pack_refs(refs, pad), pad, eos)
    assert ours.dtype == torch.float32 and ours.shape == (len(hyps),)
    want = sacre_scores(word_order, hyp_texts, ref_texts)
    diff = (ours.double() - want).abs()
    worst = int(diff.argmax())
    assert diff.max() < 1e-6, (hyp_texts[worst], ref_texts[worst], float(ours[worst]), float(want[worst]))
    first = [rs[0] or [] for rs in refs]
    ours1 = chrf(pack(hyps, pad), pack(first, pad), pad, eos).double()
    want1 = sacre_scores(word_order, hyp_texts, [[t[0]] for t in ref_texts])
    assert (ours1 - want1).abs().max() < 1e-6
    return want


def bible_rows(limit, seed):
    with gzip.open(BIBLE, "rt", encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f]
    rows = [r for r in rows if len(r) == 4 and all(x.strip() for x in r) and len(r[2]) < 2000]
    return random.Random(seed).sample(rows, limit)


def noisy_words(rng, text, pool):
    out = []
    for word in text.split():
        u = rng.random()
        if u >= 0.1:
            out.append(rng.choice(pool) if u < 0.2 else word)
        if rng.random() < 0.05:
            out.append(rng.choice(pool))
    return " ".join(out)


@pytest.fixture(scope="module")
def sentencepiece_bible():
    """A sentencepiece unigram model (1,000 pieces) on Bible verses, in a fairseq dictionary."""
    pytest.importorskip("sentencepiece")
    if not BIBLE.exists():
        pytest.skip("bible data not available")
    rows = bible_rows(4000, seed=3)
    sp = train_sentencepiece([r[2] for r in rows] + [r[3] for r in rows], 1000, character_coverage=0.9995)
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if not (sp.is_control(i) or sp.is_unknown(i))]
    return sp, fairseq_dictionary(pieces), rows


def encode(sp, dictionary, text, sample=False):
    pieces = (sp.encode(text, out_type=str, enable_sampling=True, alpha=0.1, nbest_size=-1) if sample
              else sp.encode(text, out_type=str))
    return [dictionary.index(p) for p in pieces]  # unknown pieces -> unk


# ------------------------------------------------------- exactness vs sacrebleu

@pytest.mark.parametrize("word_order", WORD_ORDERS)
def test_random_ids_over_a_sentencepiece_dictionary(sentencepiece_bible, word_order):
    """Random ids over the whole dictionary: bos (dropped), unk (printed "<unk>"), pad/eos in
    the middle (the row ends there), empty rows, hypotheses longer than the references, 1..3
    ragged references."""
    _, dictionary, _ = sentencepiece_bible
    rng = random.Random(10 + word_order)
    size = len(dictionary)
    specials = [dictionary.bos(), dictionary.unk(), dictionary.unk(), dictionary.pad(), dictionary.eos()]

    def row(length):
        return [rng.choice(specials) if rng.random() < 0.04 else rng.randrange(4, size) for _ in range(length)]

    hyps, refs = [], []
    for _ in range(1500):
        rs = [row(rng.randint(0, 25)) for _ in range(rng.randint(1, 3))]
        rs = [x if x and rng.random() > 0.15 else None for x in rs]
        hyp = row(rng.choice([0, 0, 1, 2, 5, 10, 20, 40]))
        if rng.random() < 0.3 and rs[0]:
            hyp = rs[0][: rng.randint(0, len(rs[0]))] + row(rng.randint(0, 10)) + rs[0]  # overlaps
        hyps.append(hyp)
        refs.append(rs)
    want = check_against_sacrebleu(dictionary, "sentencepiece", hyps, refs, word_order)
    assert (want == 0).sum() > 50 and ((want > 0.2) & (want < 1)).sum() > 200


@pytest.mark.parametrize("word_order", WORD_ORDERS)
def test_real_bible_pairs_one_and_two_references(sentencepiece_bible, word_order):
    sp, dictionary, rows = sentencepiece_bible
    rng = random.Random(20 + word_order)
    rows = rows[:1200]
    pool = [w for r in rows for w in r[2].split()]
    hyps, refs = [], []
    for _, _, web, kjv in rows:
        text = noisy_words(rng, web if rng.random() < 0.7 else kjv, pool)
        hyp = encode(sp, dictionary, text, sample=True)
        if rng.random() < 0.05:
            hyp = []  # empty hypothesis
        elif rng.random() < 0.1:
            hyp = hyp * 2  # longer than the references
        hyps.append(hyp)
        refs.append([encode(sp, dictionary, web), encode(sp, dictionary, kjv, sample=True)])
    want = check_against_sacrebleu(dictionary, "sentencepiece", hyps, refs, word_order)
    assert ((want > 0.3) & (want < 1)).float().mean() > 0.8


def random_bpe(rng, word):
    """Split a word into 1..3 subword-nmt pieces (all but the last marked with '@@')."""
    if len(word) < 2:
        return [word]
    cuts = sorted(rng.sample(range(1, len(word)), min(len(word) - 1, rng.randint(0, 2))))
    parts = [word[a:b] for a, b in zip([0] + cuts, cuts + [len(word)])]
    return [p + "@@" for p in parts[:-1]] + [parts[-1]]


@pytest.mark.skipif(not BIBLE.exists(), reason="bible data not available")
@pytest.mark.parametrize("word_order", WORD_ORDERS)
def test_subword_nmt_dictionary(word_order):
    """Random BPE segmentations of Bible verses, <unk> tokens (glued to a '@@' piece before
    them), a trailing '@@' at the end, bos anywhere."""
    rng = random.Random(30 + word_order)
    rows = bible_rows(800, seed=4)
    symbols, index = [], {}

    def tokenize(text):
        tokens = []
        for word in text.split():
            tokens += ["<unk>"] if rng.random() < 0.03 else random_bpe(rng, word)
        if tokens and tokens[-1] != "<unk>" and rng.random() < 0.1:
            tokens[-1] += "@@"
        for piece in tokens:
            if piece != "<unk>" and piece not in index:
                index[piece] = None
                symbols.append(piece)
        return tokens

    pool = [w for r in rows for w in r[2].split()]
    hyp_tokens = [tokenize(noisy_words(rng, web, pool)) for _, _, web, _ in rows]
    ref_tokens = [[tokenize(web), tokenize(kjv)] for _, _, web, kjv in rows]
    dictionary = fairseq_dictionary(symbols)
    to_ids = lambda tokens: [dictionary.index(t) for t in tokens]  # noqa: E731
    hyps = [to_ids(t) for t in hyp_tokens]
    for h in hyps[::7]:
        h.insert(rng.randint(0, len(h)), dictionary.bos())
    refs = [[to_ids(t) for t in rs] for rs in ref_tokens]
    check_against_sacrebleu(dictionary, "subword_nmt", hyps, refs, word_order)


@pytest.mark.parametrize("style", ["sentencepiece", "subword_nmt", "none"])
@pytest.mark.parametrize("word_order", WORD_ORDERS)
def test_edge_case_symbols(style, word_order):
    """Random rows over symbols built to break the decoding: whitespace inside symbols, bare
    markers, punctuation-only pieces, '@@' alone or doubled, '(' and ')' around words, non-ASCII
    punctuation (not split by chrF++), <unk> and bos."""
    symbols = {
        "sentencepiece": ["\u2581", "\u2581\u2581", "\u2581a", "b", "\u2581ab", "c\u2581", "a\u2581b", "\u2581(", ")",
                          ",", "\u2581.", ".", "!!", "\u2581\u201cq", "\u201d", "\u2581x\u3000y", "\u2581\u00e9", "-"],
        "subword_nmt": ["a@@", "b", "ab", "@@", "a@@@@", "(@@", ")", ",", ".", "!!", "\u201cq", "\u201d@@", "x\u3000y",
                        "\u00e9@@", "-", "(a)"],
        "none": ["a", "b", "ab", "(", ")", ",", ".", "!!", "a.", ".a", "(a)", "\u201cq\u201d", "x\u3000y",
                 "\u00e9", "-", "a,b", "--"],
    }[style]
    dictionary = fairseq_dictionary(symbols)
    rng = random.Random(40 + word_order)
    ids = list(range(4, len(dictionary))) * 3 + [dictionary.unk(), dictionary.bos()]
    row = lambda: [rng.choice(ids) for _ in range(rng.randint(0, 12))]  # noqa: E731
    hyps, refs = [], []
    for _ in range(1500):
        rs = [row() for _ in range(rng.randint(1, 2))]
        hyp = row()
        if rng.random() < 0.5 and rs[0]:
            hyp = [t for t in rs[0] if rng.random() > 0.2] + row()[:3]
        hyps.append(hyp)
        refs.append([x or None for x in rs])
    want = check_against_sacrebleu(dictionary, style, hyps, refs, word_order)
    assert ((want > 0) & (want < 1)).sum() > 300


@pytest.mark.parametrize("word_order", WORD_ORDERS)
def test_large_alphabet_takes_the_multi_key_path(word_order):
    """Over 1,000 distinct characters: 11-bit symbols, six of them do not fit one sort key."""
    rng = random.Random(50)
    alphabet = [chr(0x4E00 + k) for k in range(3000)]
    symbols = sorted({"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 3))) for _ in range(2000)})
    symbols = [("\u2581" if rng.random() < 0.3 else "") + s for s in symbols]
    symbols = list(dict.fromkeys(symbols + ["\u2581,", "."]))
    dictionary = fairseq_dictionary(symbols)
    ids = list(range(4, len(dictionary)))
    hyps, refs = [], []
    for _ in range(400):
        ref = [rng.choice(ids) for _ in range(rng.randint(1, 15))]
        hyps.append([t for t in ref if rng.random() > 0.3] + [rng.choice(ids) for _ in range(rng.randint(0, 3))])
        refs.append([ref, [rng.choice(ids) for _ in range(rng.randint(0, 15))] or None])
    chrf = R.ChrF.from_dictionary(dictionary, "sentencepiece", word_order)
    assert chrf._source.alphabet > 1024  # >= 11-bit symbols
    check_against_sacrebleu(dictionary, "sentencepiece", hyps, refs, word_order)


# ------------------------------------------------------------------ prefixes

def with_eos_and_garbage(rng, seq, eos, vocab):
    return seq + [eos] + [rng.randrange(4, vocab) for _ in range(rng.randint(0, 4))]


@pytest.mark.parametrize("word_order", WORD_ORDERS)
def test_prefix_equals_the_full_score_of_every_prefix(sentencepiece_bible, word_order):
    sp, dictionary, rows = sentencepiece_bible
    rng = random.Random(60 + word_order)
    rows = rows[1200:1500]
    pool = [w for r in rows for w in r[2].split()]
    pad, eos = dictionary.pad(), dictionary.eos()
    hyps, refs = [], []
    for _, _, web, kjv in rows:
        hyp = encode(sp, dictionary, noisy_words(rng, web, pool + [",", ".", "(a", "b)", "!!"]), sample=True)
        hyps.append(with_eos_and_garbage(rng, hyp[: rng.randint(0, len(hyp))] if rng.random() < 0.1 else hyp,
                                         eos, len(dictionary)))
        refs.append([encode(sp, dictionary, web), encode(sp, dictionary, kjv) if rng.random() < 0.7 else None])
    hyp, ref = pack(hyps, pad), pack_refs(refs, pad)
    chrf = R.ChrF.from_dictionary(dictionary, "sentencepiece", word_order)
    prefix = chrf.prefix(hyp, ref, pad, eos)
    assert prefix.shape == hyp.shape and prefix.dtype == torch.float32
    loop = torch.stack([chrf(hyp[:, : t + 1], ref, pad, eos) for t in range(hyp.size(1))], dim=1)
    assert (prefix - loop).abs().max() < 1e-6
    assert torch.equal(prefix[:, -1], chrf(hyp, ref, pad, eos))
    # and directly against sacrebleu on the decoded prefixes of a few sentences
    metric = CHRF(word_order=word_order)
    for i in range(0, len(hyps), 15):
        texts = [fairseq_text(dictionary, x, "sentencepiece") for x in refs[i] if x]
        for t in range(hyp.size(1)):
            want = metric.sentence_score(fairseq_text(dictionary, hyps[i][: t + 1], "sentencepiece"), texts).score
            assert abs(float(prefix[i, t]) - want / 100) < 1e-6


@pytest.mark.parametrize("style", ["sentencepiece", "subword_nmt", "none"])
@pytest.mark.parametrize("word_order", WORD_ORDERS)
def test_prefix_on_edge_case_symbols(style, word_order):
    """Prefixes that cut words after punctuation, inside '(a)', between '@@' pieces, ..."""
    symbols = {"sentencepiece": ["\u2581a", "b", "\u2581(", ")", ",", "\u2581.", ".", "!", "\u2581", "a\u2581b"],
               "subword_nmt": ["a@@", "b", "(@@", ")", ",", ".", "!", "@@", "(a)"],
               "none": ["a", "b", "(", ")", ",", ".", "!", "a.", "(a)", ".a"]}[style]
    dictionary = fairseq_dictionary(symbols)
    rng = random.Random(70 + word_order)
    ids = list(range(4, len(dictionary)))
    row = lambda n: [rng.choice(ids) for _ in range(n)]  # noqa: E731
    hyps = [row(rng.randint(0, 14)) for _ in range(600)]
    refs = [[row(rng.randint(1, 10)), row(rng.randint(0, 10)) or None] for _ in range(600)]
    pad, eos = dictionary.pad(), dictionary.eos()
    hyp, ref = pack(hyps, pad), pack_refs(refs, pad)
    chrf = R.ChrF.from_dictionary(dictionary, style, word_order)
    prefix = chrf.prefix(hyp, ref, pad, eos)
    loop = torch.stack([chrf(hyp[:, : t + 1], ref, pad, eos) for t in range(hyp.size(1))], dim=1)
    assert (prefix - loop).abs().max() < 1e-6
    metric = CHRF(word_order=word_order)
    for i in range(0, 600, 40):
        texts = [fairseq_text(dictionary, x, style) for x in refs[i] if x]
        for t in range(len(hyps[i])):
            want = metric.sentence_score(fairseq_text(dictionary, hyps[i][: t + 1], style), texts).score / 100
            assert abs(float(prefix[i, t]) - want) < 1e-6


# ------------------------------------------------------ registry and binding

def test_registry_entries_costs_and_unbound_decimal_ids():
    """Unbound (raw ids), chrf scores the ids in decimal joined by spaces, like BLEU."""
    assert {"chrf", "chrf_pp"} <= set(R.available_rewards())
    rng = random.Random(80)
    hyps = [[rng.randint(1, 120) for _ in range(rng.randint(0, 12))] for _ in range(400)]
    refs = [[[rng.randint(1, 120) for _ in range(rng.randint(1, 12))], None] for _ in range(400)]
    for h, rs in zip(hyps[::3], refs[::3]):
        rs[1] = [t for t in h if rng.random() > 0.3] or None
    hyp, ref = pack(hyps, 0), pack_refs(refs, 0)
    for name, word_order in [("chrf", 0), ("chrf_pp", 2)]:
        reward = R.get_reward(name)
        assert (reward.low, reward.high, reward.higher_is_better) == (0.0, 1.0, True)
        assert reward.bind is not None and reward.prefix_fn is not None
        value = reward(hyp, ref, 0)
        want = sacre_scores(word_order, [" ".join(map(str, h)) for h in hyps],
                            [[" ".join(map(str, x)) if x else None for x in rs] for rs in refs])
        assert (value.double() - want).abs().max() < 1e-6
        assert torch.allclose(reward.cost(hyp, ref, 0), 1 - value)
        prefix = reward.prefix(hyp, ref, 0)
        assert torch.equal(prefix[:, -1], value)
        assert torch.allclose(reward.prefix_cost(hyp, ref, 0), 1 - prefix)


class FakeDictionary:
    """Duck-typed fairseq Dictionary (subword-nmt pieces)."""

    symbols = ["<s>", "<pad>", "</s>", "<unk>", "he@@", "llo", "hel@@", "lo", "world", ",", "wor@@", "ld,"]

    def bos(self): return 0
    def pad(self): return 1
    def eos(self): return 2
    def unk(self): return 3


@pytest.mark.parametrize("name,word_order", [("chrf", 0), ("chrf_pp", 2)])
def test_bind_reward_reads_the_dictionarys_characters(name, word_order):
    dictionary = FakeDictionary()
    # hyp: "hello world ,", "hello world," (bos first), ""; ref: "hello world,", "hello world", "world"
    hyp = torch.tensor([[4, 5, 8, 9, 2, 1], [0, 6, 7, 10, 11, 2], [1, 1, 1, 1, 1, 1]])
    ref = torch.tensor([[6, 7, 10, 11, 2], [4, 5, 8, 2, 1], [8, 2, 1, 1, 1]])
    metric = CHRF(word_order=word_order)
    want = torch.tensor([metric.sentence_score(h, [r]).score / 100 for h, r in [
        ("hello world ,", "hello world,"), ("hello world,", "hello world"), ("", "world")]], dtype=torch.float64)
    for level in ["token", "word"]:  # chrF reads characters at either level
        bound = R.bind_reward(name, dictionary, level, "auto", needs_prefix=True)
        assert isinstance(bound, BoundReward) and bound.merger is None and bound.has_prefix
        assert bound.reward.bind is None  # bound once
        assert (bound(hyp, ref).double() - want).abs().max() < 1e-6
        assert torch.allclose(bound.cost(hyp, ref), 1 - bound(hyp, ref))
        assert torch.equal(bound.prefix(hyp, ref)[:, -1], bound(hyp, ref))
    # the same text in other pieces scores the same; as raw ids (unbound) it would not
    assert torch.equal(R.bind_reward(name, dictionary)(hyp[:2], ref[:1].expand(2, -1)),
                       R.bind_reward(name, dictionary)(hyp[[0, 0]], ref[:1].expand(2, -1)))


# ------------------------------------------------------------------- layout

def test_layouts_chunks_and_empty_batches(sentencepiece_bible, monkeypatch):
    sp, dictionary, rows = sentencepiece_bible
    pad, eos = dictionary.pad(), dictionary.eos()
    hyps = [encode(sp, dictionary, r[3]) for r in rows[:200]]
    refs = [[encode(sp, dictionary, r[2])] for r in rows[:200]]
    hyp, ref3 = pack(hyps, pad), pack_refs(refs, pad)
    for word_order in WORD_ORDERS:
        chrf = R.ChrF.from_dictionary(dictionary, "sentencepiece", word_order)
        full, prefix = chrf(hyp, ref3, pad, eos), chrf.prefix(hyp, ref3, pad, eos)
        assert torch.equal(chrf(hyp, ref3[:, 0], pad, eos), full)  # B x T' == B x 1 x T'
        absent = torch.cat([ref3, torch.full_like(ref3, pad)], dim=1)  # absent rows change nothing
        assert torch.equal(chrf(hyp, absent, pad, eos), full)
        assert torch.equal(chrf(hyp.int(), ref3.int(), pad, eos), full)
        monkeypatch.setattr(chrf_module, "CHAR_BUDGET", 500)  # many small chunks
        assert torch.equal(chrf(hyp, ref3, pad, eos), full)
        assert torch.equal(chrf.prefix(hyp, ref3, pad, eos), prefix)
        monkeypatch.setattr(chrf_module, "_KEY_BITS", 24)  # every sort key split in several
        assert torch.allclose(chrf(hyp, ref3, pad, eos), full, atol=1e-7, rtol=0)
        assert torch.allclose(chrf.prefix(hyp, ref3, pad, eos), prefix, atol=1e-7, rtol=0)
        monkeypatch.undo()
        assert chrf(hyp[:0], ref3[:0], pad, eos).shape == (0,)
        assert chrf.prefix(hyp[:, :0], ref3, pad, eos).shape == (200, 0)
        empty = torch.full((3, 4), pad)
        assert chrf(empty, ref3[:3], pad, eos).tolist() == [0.0] * 3
        assert torch.isfinite(chrf.prefix(empty, empty.unsqueeze(1), pad, eos)).all()


def test_symbols_decoding_rules():
    assert chrf_module.decode_symbol("\u2581ab", "sentencepiece") == (["a", "b"], [1, 1], 1)
    assert chrf_module.decode_symbol("a b\u2581", "sentencepiece") == (["a", "b"], [0, 0], 1)  # fairseq drops " "
    assert chrf_module.decode_symbol("ab@@", "subword_nmt") == (["a", "b"], [0, 0], 0)
    assert chrf_module.decode_symbol("ab", "subword_nmt") == (["a", "b"], [0, 0], 1)
    assert chrf_module.decode_symbol("a b", "none") == (["a", "b"], [0, 1], 2)
    with pytest.raises(ValueError):
        R.ChrF(["a"], "wordpiece")
    with pytest.raises(ValueError):
        R.ChrF(word_order=3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(sentencepiece_bible):
    sp, dictionary, rows = sentencepiece_bible
    pad, eos = dictionary.pad(), dictionary.eos()
    hyp = pack([encode(sp, dictionary, r[3]) + [eos] for r in rows[:300]], pad)
    ref = pack_refs([[encode(sp, dictionary, r[2]), encode(sp, dictionary, r[3])] for r in rows[:300]], pad)
    for word_order in WORD_ORDERS:
        chrf = R.ChrF.from_dictionary(dictionary, "sentencepiece", word_order)
        for method in (chrf.__call__, chrf.prefix):
            cpu, gpu = method(hyp, ref, pad, eos), method(hyp.cuda(), ref.cuda(), pad, eos)
            assert gpu.device.type == "cuda" and torch.allclose(cpu, gpu.cpu(), atol=1e-6, rtol=0)


def test_empty_reference_scores_zero_like_sacrebleu():
    assert CHRF().sentence_score("a", [""]).score == 0 and CHRF(word_order=2).sentence_score("", ["a"]).score == 0
    assert math.isclose(float(R.get_reward("chrf")(torch.tensor([[5, 0]]), torch.tensor([[5, 0]]), 0)), 1.0)


def test_eval_reward_logs_the_chrf_of_the_greedy_outputs(toy_data):
    """--eval-reward logs chrF beside the trained reward and BLEU: the validation
    sum equals sacrebleu's sentence chrF of the decoded greedy outputs."""
    import sacrebleu

    from conftest import build_toy, first_batch

    _, task, model, criterion = build_toy(toy_data, "--criterion", "cross_entropy", "--eval-reward")
    batch = first_batch(task, "valid")
    _, _, log = task.valid_step(batch, model, criterion)
    d = task.target_dictionary

    def text(row):
        return d.string(row[row.ne(d.pad())])

    hyps = task.greedy_outputs(model, batch)
    expected = sum(sacrebleu.sentence_chrf(text(h), [text(r) for r in refs if bool(r.ne(d.pad()).any())]).score
                   for h, refs in zip(hyps, batch["references"])) / 100
    assert log["_chrf_sum"] == pytest.approx(expected, abs=1e-5) and expected > 0
