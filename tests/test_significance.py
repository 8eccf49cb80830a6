"""benchmarks/significance.py: the paired bootstrap's statistics reproduce sacrebleu's corpus
BLEU and the edit error, its verdicts follow the data, and kept translations round-trip."""

import gzip
import math
import random

import numpy as np
import pytest
import sacrebleu

from benchmarks import significance as S
from benchmarks.evaluate import edit_error

WORDS = "the a of and to in is was he it that his for on with as I be at by".split()


def _corpus(n, seed):
    rng = random.Random(seed)
    refs = [" ".join(rng.choices(WORDS, k=rng.randint(3, 15))) for _ in range(n)]
    return refs, rng


def _noisy(refs, rng, p):
    return [" ".join(w if rng.random() > p else rng.choice(WORDS) for w in r.split()) for r in refs]


def test_summed_statistics_give_sacrebleu_s_corpus_bleu_and_the_edit_error():
    refs, rng = _corpus(60, 1)
    refs2 = _noisy(refs, rng, 0.3)
    hyps = _noisy(refs, rng, 0.4)
    stats = S.sentence_stats(hyps, [refs, refs2], "bleu")
    assert stats.shape == (60, 10)
    got = S.corpus_scores(stats.sum(0, keepdims=True), "bleu")[0]
    assert math.isclose(got, sacrebleu.corpus_bleu(hyps, [refs, refs2]).score, abs_tol=1e-9)
    edit = S.sentence_stats(hyps, [refs], "edit_error")
    assert math.isclose(S.corpus_scores(edit.sum(0, keepdims=True), "edit_error")[0],
                        edit_error(hyps, {"x": refs})["edit_error"], abs_tol=1e-9)


def test_paired_bootstrap_verdicts():
    refs, rng = _corpus(200, 2)
    good, bad = _noisy(refs, rng, 0.1), _noisy(refs, rng, 0.5)
    sg, sb = S.sentence_stats(good, [refs], "bleu"), S.sentence_stats(bad, [refs], "bleu")
    res = S.paired_bootstrap(sg, sb, "bleu", samples=200)
    assert res["delta"] > 20 and res["lo"] > 0 and res["p"] < 0.01
    assert S.bootstrap_verdict(res, higher_is_better=True) == "ahead"
    assert S.bootstrap_verdict(S.paired_bootstrap(sb, sg, "bleu", samples=200), True) == "behind"
    same = S.paired_bootstrap(sg, sg.copy(), "bleu", samples=200)
    assert same["delta"] == 0 and same["lo"] == 0 == same["hi"] and S.bootstrap_verdict(same, True) == "tie"
    # an error metric: fewer edits is better
    eg, eb = S.sentence_stats(good, [refs], "edit_error"), S.sentence_stats(bad, [refs], "edit_error")
    assert S.bootstrap_verdict(S.paired_bootstrap(eg, eb, "edit_error", samples=200), False) == "ahead"
    # the same resamples every call (a fixed seed): the report does not change between runs
    assert S.paired_bootstrap(sg, sb, "bleu", samples=50) == S.paired_bootstrap(sg, sb, "bleu", samples=50)
    with pytest.raises(ValueError, match="equal, non-empty"):
        S.paired_bootstrap(sg, sb[:10], "bleu")


def test_kept_translations_round_trip_and_are_byte_stable(tmp_path):
    path = S.translations_path(tmp_path, "bible", "risk", 2, 1)
    hyps = ["a b", "", "ñ \u00e9", "x\ny"]
    S.write_translations(path, hyps)
    first = path.read_bytes()
    S.write_translations(path, hyps)
    assert path.read_bytes() == first and not list(path.parent.glob("*.tmp"))
    assert S.read_translations(path) == ["a b", "", "ñ \u00e9", "x y"]
    assert gzip.decompress(first).decode().count("\n") == 4
    assert S.read_translations(tmp_path / "missing.txt.gz") is None


def test_bootstrap_counts_pairs_each_run_with_its_control_s_run(tmp_path):
    refs, rng = _corpus(100, 3)
    cfg = {"tasks": {"t": {"metric": "bleu", "higher_is_better": True}}}
    rows = []
    for crit, p in (("mle", 0.4), ("good", 0.1), ("same", 0.4)):
        for pretrain in (1, 2):
            rows.append({"task": "t", "criterion": crit, "pretrain": pretrain, "seed": 1})
            text = _noisy(refs, random.Random(pretrain), p) if crit != "good" else _noisy(refs, rng, p)
            S.write_translations(S.translations_path(tmp_path, "t", crit, pretrain, 1), text)
    rows.append({"task": "t", "criterion": "good", "pretrain": 3, "seed": 1})  # no translations kept
    counts = S.bootstrap_counts(cfg, rows, {}, tmp_path, lambda task: [refs])
    assert counts["t"]["good"] == {"ahead": 2, "tie": 0, "behind": 0}
    # "same" has the control's very translations on both models
    assert counts["t"]["same"] == {"ahead": 0, "tie": 2, "behind": 0}
    assert "mle" not in counts["t"]
