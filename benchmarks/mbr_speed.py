"""MBR utility matrices: the batched rewards of decoding/mbr.py vs the mbrs library.

Usage: python -m benchmarks.mbr_speed [--sources 1000] [--candidates 32] [--repeats 3]
           [--metrics bleu,chrf] [--mbrs-workers 1] [--mbrs-bleu-tokenize none] [--data DIR] [--json PATH]

Candidates: for each of the first ``--sources`` verses of the Bible training split
(data-bin/bible_es_en, made by examples/prepare_bible.py), ``--candidates`` noisy copies
of its two references (WEB and KJV in turn; per sentencepiece piece: dropped with
probability 0.1, replaced by a piece of another verse with 0.1, followed by an inserted
piece with 0.05): the shapes of model samples (one source's candidates share most of
their n-grams, lengths vary), without a model to sample from.

Ours: ``decoding.mbr.rank`` of all sources' [S, N, T] candidate ids at once (the N x N
matrix of every source, then the medoid), utility bound to the target dictionary as
``--mbr-utility`` binds it: BLEU at word level (sacrebleu with tokenize none on the
decoded words, exp smoothing), chrF on the decoded characters (sacrebleu's CHRF()).
mbrs: ``DecoderMBR(metric).decode(texts, texts, nbest=1)`` per source on the decoded
strings (fairseq's sentencepiece post-processing), ``MetricBLEU`` (tokenize
``--mbrs-bleu-tokenize``, exp smoothing, effective order: ours' definition at 'none';
mbrs's default is 13a) and ``MetricChrF`` (sacrebleu; and its ``fastchrf`` Rust
backend as a second row).  Both include the candidate itself among the pseudo-references.

Times: ours, the median of ``--repeats`` runs after a warm-up; mbrs, of ``--mbrs-repeats``
runs (no warm-up: a per-source Python loop); torch at the thread count it starts with
(OMP_NUM_THREADS); agreement counts the sources whose chosen candidate is the same
id, a tie (mbrs's choice has ours' best expected utility within 1e-6), the same text
(another id of an equal string), or different.

mbrs (pip) depends on COMET, BERTScore, BLEURT, transformers and pytorch-lightning and
pins numpy < 2; the BLEU and chrF metrics need none of them.  Install it without them
(``pip install --no-deps mbrs fastchrf``): this script imports mbrs's BLEU and chrF
modules without the package's ``mbrs.metrics`` __init__, which imports every metric.
"""

if __name__ == "__main__" and not __package__:  # python benchmarks/mbr_speed.py: as python -m benchmarks.mbr_speed
    import os, sys  # noqa: E401
    _repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.execve(sys.executable, [sys.executable, "-m", "benchmarks.mbr_speed", *sys.argv[1:]],
              {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [_repo, os.environ.get("PYTHONPATH")]))})

import argparse
import enum
import importlib
import importlib.util
import os
import random
import statistics
import sys
import time
import types
from pathlib import Path

import torch

from benchmarks.util import write_json  # noqa: E402

from fairseq_seqlevel.decoding.mbr import rank  # noqa: E402
from fairseq_seqlevel.rewards.binding import bind_reward  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "data-bin" / "bible_es_en"
UTILITIES = {"bleu": ("bleu", "word"), "chrf": ("chrf", "token")}  # name -> (--mbr-utility, --reward-level)


# ------------------------------------------------------------------ candidates


def bible_candidates(data, sources, candidates, seed):
    """(dictionary, ids [S, N, T] fairseq rows: pieces, eos, pad; texts [S][N] as fairseq decodes them)."""
    from fairseq.data import Dictionary, data_utils

    if not (data / "dict.en.txt").exists():
        sys.exit(f"error: --data {data}: no dict.en.txt; make it with python examples/prepare_bible.py")
    dictionary = Dictionary.load(str(data / "dict.en.txt"))
    sides = [data_utils.load_indexed_dataset(str(data / f"train.es-en.{name}"), dictionary) for name in ("en", "kjv")]
    sources = min(sources, len(sides[0]))
    refs = [[side[i].tolist()[:-1] for side in sides] for i in range(sources)]  # pieces, without eos
    pool = [t for pair in refs for t in pair[0]]
    rng = random.Random(seed)

    def noisy(row):
        out = []
        for token in row:
            u = rng.random()
            if u >= 0.1:
                out.append(rng.choice(pool) if u < 0.2 else token)
            if rng.random() < 0.05:
                out.append(rng.choice(pool))
        return out or row[:1]

    rows = [[noisy(pair[k % 2]) + [dictionary.eos()] for k in range(candidates)] for pair in refs]
    width = max(len(r) for s in rows for r in s)
    ids = torch.tensor([[r + [dictionary.pad()] * (width - len(r)) for r in s] for s in rows])
    texts = [[decode(dictionary, r[:-1]) for r in s] for s in rows]
    return dictionary, ids, texts


def decode(dictionary, ids):
    """What fairseq-generate prints for the pieces ``ids`` (sentencepiece post-processing)."""
    from fairseq.data.data_utils import post_process

    return post_process(dictionary.string(torch.tensor(ids, dtype=torch.long)), "sentencepiece")


# ------------------------------------------------------------------------ mbrs


def load_mbrs():
    """mbrs's MetricBLEU, MetricChrF and DecoderMBR, with or without its heavy dependencies."""
    try:
        import mbrs.metrics as metrics  # a full install (COMET, BERTScore, ... importable)
        from mbrs.decoders import DecoderMBR
        return metrics.MetricBLEU, metrics.MetricChrF, DecoderMBR
    except ImportError:
        pass
    spec = importlib.util.find_spec("mbrs")
    if spec is None:
        sys.exit("error: mbrs is not installed: pip install --no-deps mbrs fastchrf (module docstring)")
    for name in [n for n in sys.modules if n.startswith("mbrs.")]:
        del sys.modules[name]  # the failed import's leftovers
    # mbrs.metrics without its __init__ (it imports every metric): base, bleu and chrf only
    light = types.ModuleType("mbrs.metrics")
    light.__path__ = [os.path.join(p, "metrics") for p in spec.submodule_search_locations]
    sys.modules["mbrs.metrics"] = light
    import mbrs
    mbrs.metrics = light
    base = importlib.import_module("mbrs.metrics.base")
    for name in ("Metric", "MetricAggregatable", "MetricAggregatableCache", "MetricBase", "MetricCacheable",
                 "MetricReferenceless", "get_metric", "register"):
        setattr(light, name, getattr(base, name))
    light.MetricBLEU = importlib.import_module("mbrs.metrics.bleu").MetricBLEU
    light.MetricChrF = importlib.import_module("mbrs.metrics.chrf").MetricChrF
    light.Metrics = enum.Enum("Metrics", {"bleu": "bleu", "chrf": "chrf"}, type=str)  # for mbrs.selectors
    from mbrs.decoders import DecoderMBR
    return light.MetricBLEU, light.MetricChrF, DecoderMBR


def mbrs_decoders(metric_name, workers, bleu_tokenize):
    """[(row label, DecoderMBR)] for one metric."""
    MetricBLEU, MetricChrF, DecoderMBR = load_mbrs()
    if metric_name == "bleu":
        metric = MetricBLEU(MetricBLEU.Config(tokenize=bleu_tokenize, num_workers=workers))
        return [(f"mbrs BLEU (sacrebleu, tokenize {bleu_tokenize}, {workers} worker)", DecoderMBR(DecoderMBR.Config(), metric))]
    return [(f"mbrs chrF (sacrebleu, {workers} worker)",
             DecoderMBR(DecoderMBR.Config(), MetricChrF(MetricChrF.Config(num_workers=workers)))),
            ("mbrs chrF (fastchrf)", DecoderMBR(DecoderMBR.Config(), MetricChrF(MetricChrF.Config(fastchrf=True))))]


def run_mbrs(decoder, texts):
    """(chosen id [S], its expected utility in [0, 1] [S])."""
    chosen, scores = [], []
    for candidates in texts:
        out = decoder.decode(candidates, candidates, nbest=1)
        chosen.append(int(out.idx[0]))
        scores.append(float(out.score[0]) / 100)
    return chosen, scores


# -------------------------------------------------------------------- timing


def median_time(fn, repeats, warmup=True):
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def agreement(ranking, chosen, scores, texts):
    """Counts of same id / tie / same text / different, and max |Δ expected utility| of mbrs's choices."""
    ours = ranking.order[:, 0].tolist()
    expected = ranking.expected.tolist()
    counts = {"same": 0, "tie": 0, "same_text": 0, "different": 0}
    deviation = 0.0
    for s, (mine, theirs) in enumerate(zip(ours, chosen)):
        deviation = max(deviation, abs(expected[s][theirs] - scores[s]))
        if mine == theirs:
            counts["same"] += 1
        elif abs(expected[s][theirs] - expected[s][mine]) <= 1e-6:
            counts["tie"] += 1
        elif texts[s][mine] == texts[s][theirs]:
            counts["same_text"] += 1
        else:
            counts["different"] += 1
    return counts, deviation


def run(args):
    dictionary, ids, texts = bible_candidates(Path(args.data), args.sources, args.candidates, args.seed)
    device = torch.device(args.device)
    ids = ids.to(device)
    sources, n, width = ids.shape
    print(f"{sources} sources x {n} candidates (noisy Bible references, up to {width} pieces with eos), "
          f"{sources * n * n:,} utility pairs; torch threads {torch.get_num_threads()}, device {device}")
    results = {"sources": sources, "candidates": n, "pairs": sources * n * n, "threads": torch.get_num_threads(),
               "device": str(device), "metrics": {}}
    for metric_name in args.metrics.split(","):
        name, level = UTILITIES[metric_name]
        utility = bind_reward(name, dictionary, level, "sentencepiece", flag="--mbr-utility")

        def ours():
            ranking = rank(ids, utility)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return ranking

        ours_s = median_time(ours, args.repeats)
        ranking = ours()
        rows = {"ours": {"label": f"ours ({name}, --reward-level {level})", "seconds": ours_s}}
        print(f"\n{metric_name}: ours ({name}, --reward-level {level}): {ours_s:8.3f} s")
        for label, decoder in mbrs_decoders(metric_name, args.mbrs_workers, args.mbrs_bleu_tokenize):
            found = {}

            def theirs():
                found["out"] = run_mbrs(decoder, texts)

            their_s = median_time(theirs, args.mbrs_repeats, warmup=False)  # a Python loop: nothing to warm
            counts, deviation = agreement(ranking, *found["out"], texts)
            rows[label] = {"seconds": their_s, "ratio": their_s / ours_s, "agreement": counts,
                           "max_abs_expected_utility_difference": deviation}
            print(f"{metric_name}: {label}: {their_s:8.3f} s, {their_s / ours_s:6.1f}x ours; chosen: "
                  f"{counts['same']} same, {counts['tie']} tie, {counts['same_text']} same text, "
                  f"{counts['different']} different of {sources}; max |Δ expected utility| {deviation:.1e}")
        results["metrics"][metric_name] = rows
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", type=int, default=1000)
    parser.add_argument("--candidates", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of ours (median)")
    parser.add_argument("--mbrs-repeats", type=int, default=1, help="timed runs of each mbrs row (median)")
    parser.add_argument("--metrics", default="bleu,chrf", help="comma-separated: bleu, chrf")
    parser.add_argument("--mbrs-workers", type=int, default=1,
                        help="mbrs's num_workers (processes of its sacrebleu metrics; its default is 8)")
    parser.add_argument("--mbrs-bleu-tokenize", default="none",
                        help="mbrs MetricBLEU tokenize: none (ours' definition) or 13a (mbrs's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=str(DATA), help="the binarized Bible (examples/prepare_bible.py)")
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args()
    results = run(args)
    if args.json:
        write_json(args.json, results)  # never half-written
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
