"""Paired bootstrap over test sentences (Koehn 2004, as sacrebleu's --paired-bs) of a
criterion's translations against its control's from the same pre-trained model and
seed, and the kept translations it reads (benchmarks/results/translations/)."""

import gzip
from pathlib import Path

import numpy as np

SAMPLES = 1000
SEED = 12345  # sacrebleu's default bootstrap seed


def translations_path(results_dir, task, criterion, pretrain, seed):
    return Path(results_dir) / "translations" / task / f"{criterion}.p{pretrain}.s{seed}.txt.gz"


def write_translations(path, hyps):
    """One hypothesis per line, gzip without a timestamp (the same text, the same bytes),
    written to a temporary name and renamed (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write("".join(h.replace("\n", " ") + "\n" for h in hyps).encode("utf-8"))
    tmp.replace(path)


def read_translations(path):
    path = Path(path)
    if not path.exists():
        return None
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return f.read().split("\n")[:-1]


def sentence_stats(hyps, refs, metric):
    """[N, K] per-sentence sufficient statistics: sacrebleu BLEU's (hyp length, ref length,
    matches and totals per order) for ``bleu``; (edit distance, reference length) for
    ``edit_error``. ``refs``: a list of reference lists (one per reference set)."""
    if metric == "bleu":
        from sacrebleu.metrics import BLEU

        return np.asarray(BLEU()._extract_corpus_statistics(hyps, refs), dtype=np.float64)
    from rapidfuzz.distance import Levenshtein

    ref = refs[0]
    return np.asarray([[Levenshtein.distance(h.strip(), r.strip()), len(r.strip())] for h, r in zip(hyps, ref)],
                      dtype=np.float64)


def corpus_scores(summed, metric):
    """Corpus scores of [S, K] summed statistics: BLEU (sacrebleu's formula, exp smoothing)
    or edit error in % of the reference length."""
    if metric == "bleu":
        from sacrebleu.metrics import BLEU

        bleu = BLEU()
        return np.asarray([bleu._compute_score_from_stats(list(row)).score for row in summed])
    return 100.0 * summed[:, 0] / np.maximum(summed[:, 1], 1.0)


def paired_bootstrap(stats_a, stats_b, metric, samples=SAMPLES, seed=SEED):
    """Δ = score(a) − score(b) on the test set, the 2.5/97.5 percentiles of Δ over
    ``samples`` resamples of the sentences (the same indices for both), and the one-sided
    p-value of Δ's sign (the share of resamples where Δ has the other sign or is 0)."""
    n = len(stats_a)
    if n != len(stats_b) or n == 0:
        raise ValueError(f"paired bootstrap needs two equal, non-empty sets (got {n} and {len(stats_b)})")
    idx = np.random.default_rng(seed).integers(0, n, size=(samples, n))
    full_a = corpus_scores(stats_a.sum(0, keepdims=True), metric)[0]
    full_b = corpus_scores(stats_b.sum(0, keepdims=True), metric)[0]
    deltas = corpus_scores(stats_a[idx].sum(1), metric) - corpus_scores(stats_b[idx].sum(1), metric)
    delta = full_a - full_b
    p = float(np.mean(deltas <= 0) if delta > 0 else np.mean(deltas >= 0))
    lo, hi = np.percentile(deltas, [2.5, 97.5])
    return {"delta": float(delta), "lo": float(lo), "hi": float(hi), "p": p}


def bootstrap_verdict(result, higher_is_better):
    """ahead / behind when the bootstrap's 95% interval excludes 0, else tie."""
    if result["lo"] > 0 or result["hi"] < 0:
        return "ahead" if (result["lo"] > 0) == higher_is_better else "behind"
    return "tie"


def bootstrap_counts(cfg, rows, controls, results_dir, refs_of):
    """{task: {criterion: {"ahead", "tie", "behind"}}}: the paired bootstrap's verdict on
    each (pre-trained model, seed) pair of a criterion and its control whose translations
    are both kept. ``refs_of(task)``: the task's reference lists."""
    stats_cache = {}

    def stats_of(row):
        key = (row["task"], row["criterion"], row.get("pretrain", 1), row["seed"])
        if key not in stats_cache:
            hyps = read_translations(translations_path(results_dir, *key))
            stats_cache[key] = None if hyps is None else sentence_stats(
                hyps, refs_of(row["task"]), cfg["tasks"][row["task"]]["metric"])
        return stats_cache[key]

    by_key = {(r["task"], r["criterion"], r.get("pretrain", 1), r["seed"]): r for r in rows}
    out = {}
    for (task, crit, pretrain, seed), row in sorted(by_key.items()):
        control = by_key.get((task, controls.get(crit, "mle"), pretrain, seed))
        if task not in cfg["tasks"] or control is None or control is row:
            continue
        if not translations_path(results_dir, task, crit, pretrain, seed).exists() or \
                not translations_path(results_dir, task, control["criterion"], pretrain, seed).exists():
            continue
        a, b = stats_of(row), stats_of(control)
        task_cfg = cfg["tasks"][task]
        word = bootstrap_verdict(paired_bootstrap(a, b, task_cfg["metric"]), task_cfg["higher_is_better"])
        counts = out.setdefault(task, {}).setdefault(crit, {"ahead": 0, "tie": 0, "behind": 0})
        counts[word] += 1
    return out
