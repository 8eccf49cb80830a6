"""Speed of the batched torch rewards vs per-sentence sacrebleu / rapidfuzz loops.

Usage: python -m benchmarks.reward_speed [--pairs 5000] [--repeats 5] [--json PATH] [--no-single-thread]
           [--metrics bleu,chrf] [--chrf-pairs 1000,4000] [--chrf-prefix-subset 100]

Synthetic Zipf pairs (10..40 tokens, ~10 % edits), medians after a warm-up,
torch at the default and at 1 thread.  Data, timing rules and outputs:
benchmarks/README.md, "reward_speed.py".
"""

if __name__ == "__main__" and not __package__:  # python benchmarks/reward_speed.py: as python -m benchmarks.reward_speed
    import os, sys  # noqa: E401
    _repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.execve(sys.executable, [sys.executable, "-m", "benchmarks.reward_speed", *sys.argv[1:]],
              {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [_repo, os.environ.get("PYTHONPATH")]))})

import argparse
import gzip
import io
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.util import write_json  # noqa: E402

from fairseq_seqlevel.rewards import edit_distance, prefix_bleu, sentence_bleu  # noqa: E402
from fairseq_seqlevel.rewards.chrf import ChrF  # noqa: E402

PAD = 0


def make_pairs(num_pairs, vocab, seed):
    """Token lists: (hyps, refs_1, refs_2)."""
    rng = random.Random(seed)
    weights = [1.0 / (rank + 1) for rank in range(vocab)]  # Zipf-like
    ids = list(range(1, vocab + 1))

    def noisy(seq):
        out = []
        for tok in seq:
            u = rng.random()
            if u < 0.1:
                continue  # deletion
            out.append(rng.choices(ids, weights)[0] if u < 0.2 else tok)
            if rng.random() < 0.1:
                out.append(rng.choices(ids, weights)[0])  # insertion
        return out[:40] or seq[:1]

    refs = [rng.choices(ids, weights, k=rng.randint(10, 40)) for _ in range(num_pairs)]
    return [noisy(r) for r in refs], refs, [noisy(r) for r in refs]


def pack(seqs):
    out = torch.full((len(seqs), max(len(s) for s in seqs)), PAD, dtype=torch.long)
    for i, seq in enumerate(seqs):
        out[i, : len(seq)] = torch.tensor(seq)
    return out


TENSORBLEU_PAIRS = 1000


def median_time(fn, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def agreement_and_tensorbleu(hyp, ref, hyp_s, ref_strings, metric, repeats):
    """Max |BLEU - sacrebleu| (points) of ours and of TensorBLEU (Filipek 2025,
    ``rxlm.metrics.tensorbleu.tensor_sentence_bleu``, the other batched token-id
    BLEU; ``pip install --no-deps rxlm``) on the same pairs, and TensorBLEU's time."""
    sacre = torch.tensor([metric.sentence_score(h, rs).score for h, rs in zip(hyp_s, ref_strings)],
                         dtype=torch.float64)
    ours = sentence_bleu(hyp, ref, PAD).double() * 100
    out = {"sentence_bleu_max_abs_dev_vs_sacrebleu": float((ours - sacre).abs().max())}
    try:
        from rxlm.metrics.tensorbleu import tensor_sentence_bleu
    except ImportError:
        out["tensorbleu"] = "not installed (pip install --no-deps rxlm)"
        return out
    # TensorBLEU's memory grows faster than linearly with the batch (2.5 GB at
    # 1,000 pairs, killed by the OOM killer at 5,000 on 24 GB): compare on a subset.
    n = min(hyp.size(0), TENSORBLEU_PAIRS)
    h, refs3 = hyp[:n], (ref if ref.dim() == 3 else ref.unsqueeze(1))[:n]
    tb_time = median_time(lambda: tensor_sentence_bleu(h, refs3, pad_token_id=PAD), repeats)
    ours_time = median_time(lambda: sentence_bleu(h, refs3, PAD), repeats)
    tb = tensor_sentence_bleu(h, refs3, pad_token_id=PAD).double() * 100
    out.update({"tensorbleu_pairs": n, "tensorbleu_s": tb_time, "sentence_bleu_torch_s_on_tensorbleu_pairs": ours_time,
                "speedup_vs_tensorbleu": tb_time / ours_time,
                "tensorbleu_max_abs_dev_vs_sacrebleu": float((tb - sacre[:n]).abs().max()),
                "tensorbleu_mean_abs_dev_vs_sacrebleu": float((tb - sacre[:n]).abs().mean())})
    return out


def small_batches(hyp, ref, hyp_s, ref_strings, metric, repeats, sizes=(64, 128, 256, 512, 1000)):
    """sentence_bleu vs the sacrebleu loop on the first n pairs, at the row counts
    the criterions call it with (a fixed per-call cost dominates small calls)."""
    out = {}
    for n in sizes:
        if n > hyp.size(0):
            break
        h, r = hyp[:n], ref[:n]
        sacre = median_time(lambda: [metric.sentence_score(a, b) for a, b in zip(hyp_s[:n], ref_strings[:n])],
                            max(1, repeats // 2), warmup=0)
        ours = median_time(lambda: sentence_bleu(h, r, PAD), repeats)
        out[str(n)] = {"torch_s": ours, "sacrebleu_s": sacre, "speedup": sacre / ours}
    return out


def rapidfuzz_on_tensors(hyp, ref, levenshtein):
    """Per-pair rapidfuzz from padded id tensors (hyp [N, T], ref [N, T'] or
    [N, R, T']): to lists, strip the padding, min over references, back to a tensor."""
    refs = ref if ref.dim() == 3 else ref.unsqueeze(1)
    hyp_len, ref_len = hyp.ne(PAD).sum(-1).tolist(), refs.ne(PAD).sum(-1).tolist()
    return torch.tensor([
        min(levenshtein.distance(h[:n], r[:m]) for r, m in zip(rs, ms) if m) if any(ms) else n
        for h, n, rs, ms in zip(hyp.tolist(), hyp_len, refs.tolist(), ref_len)])


def spelling_edit(num_pairs, repeats, levenshtein, sizes=(256, 1024, 4096)):
    """edit_distance vs rapidfuzz on spelling-like pairs (28 characters, words of
    3..16, ~15% deleted, 15% substituted, 10% inserted) at the row counts of
    searnn_kl's roll-out costs: rapidfuzz on pre-built lists and from the padded tensors."""
    rng = random.Random(1)
    refs = [[rng.randint(1, 28) for _ in range(rng.randint(3, 16))] for _ in range(max(sizes))]

    def noisy(seq):
        out = []
        for tok in seq:
            u = rng.random()
            if u >= 0.15:
                out.append(rng.randint(1, 28) if u < 0.3 else tok)
            if rng.random() < 0.1:
                out.append(rng.randint(1, 28))
        return out or seq[:1]

    hyps = [noisy(r) for r in refs]
    out = {}
    for n in sizes:
        hyp, ref = pack(hyps[:n]), pack(refs[:n])
        lists = median_time(lambda: [levenshtein.distance(h, r) for h, r in zip(hyps[:n], refs[:n])], repeats)
        tensors = median_time(lambda: rapidfuzz_on_tensors(hyp, ref, levenshtein), repeats)
        ours = median_time(lambda: edit_distance(hyp, ref, PAD), repeats)
        assert edit_distance(hyp, ref, PAD).tolist() == rapidfuzz_on_tensors(hyp, ref, levenshtein).tolist()
        out[str(n)] = {"torch_s": ours, "rapidfuzz_s": lists, "rapidfuzz_from_tensors_s": tensors,
                       "speedup": lists / ours, "speedup_vs_from_tensors": tensors / ours}
    return out


def run(num_pairs, repeats, prefix_subset, thread_counts):
    from rapidfuzz.distance import Levenshtein
    from sacrebleu.metrics import BLEU

    hyps, refs1, refs2 = make_pairs(num_pairs, vocab=4000, seed=0)
    hyp, ref1 = pack(hyps), pack(refs1)
    both = pack(refs1 + refs2)  # one width for the two reference sets
    ref2 = torch.stack([both[:num_pairs], both[num_pairs:]], dim=1)
    as_str = lambda seq: " ".join(map(str, seq))  # noqa: E731
    hyp_s, ref1_s, ref2_s = [as_str(h) for h in hyps], [as_str(r) for r in refs1], [as_str(r) for r in refs2]
    metric = BLEU(tokenize="none", effective_order=True)
    results = {"pairs": num_pairs, "vocab": 4000, "repeats": repeats, "threads": thread_counts[0],
               "mean_hyp_len": sum(map(len, hyps)) / num_pairs, "loadavg_1min_before": os.getloadavg()[0]}
    subset = list(range(min(prefix_subset, num_pairs)))

    for tag, ref, multi in [("R1", ref1, False), ("R2", ref2, True)]:
        ref_strings = [[a, b] for a, b in zip(ref1_s, ref2_s)] if multi else [[a] for a in ref1_s]
        rf_refs = [[a, b] for a, b in zip(refs1, refs2)] if multi else [[a] for a in refs1]

        def sacre_loop():
            return [metric.sentence_score(h, rs) for h, rs in zip(hyp_s, ref_strings)]

        def sacre_prefix_loop():  # every prefix of a subset of sentences
            for i in subset:
                words = hyp_s[i].split()
                for t in range(1, len(words) + 1):
                    metric.sentence_score(" ".join(words[:t]), ref_strings[i])

        def rapidfuzz_loop():
            return [min(Levenshtein.distance(h, r) for r in rs) for h, rs in zip(hyps, rf_refs)]

        def rapidfuzz_from_tensors():  # what a criterion holding padded ids would run
            return rapidfuzz_on_tensors(hyp, ref, Levenshtein)

        sacre_bleu = median_time(sacre_loop, max(1, repeats // 2), warmup=0)
        sacre_prefix = median_time(sacre_prefix_loop, 1, warmup=0) / len(subset) * num_pairs
        rf_edit = median_time(rapidfuzz_loop, repeats)
        rf_edit_tensors = median_time(rapidfuzz_from_tensors, repeats)
        assert rapidfuzz_from_tensors().tolist() == rapidfuzz_loop() == edit_distance(hyp, ref, PAD).tolist()
        entry = {"sentence_bleu_sacrebleu_s": sacre_bleu, "sentence_bleu_sacrebleu_sent_per_s": num_pairs / sacre_bleu,
                 "prefix_bleu_sacrebleu_s_extrapolated": sacre_prefix,
                 "prefix_bleu_sacrebleu_subset_sentences": len(subset),
                 "edit_rapidfuzz_s": rf_edit, "edit_rapidfuzz_from_tensors_s": rf_edit_tensors}
        default_threads = torch.get_num_threads()
        for threads in thread_counts:
            torch.set_num_threads(threads)
            suffix = "" if threads == thread_counts[0] else f"_{threads}thread"
            torch_bleu = median_time(lambda: sentence_bleu(hyp, ref, PAD), repeats)
            torch_prefix = median_time(lambda: prefix_bleu(hyp, ref, PAD), repeats)
            torch_edit = median_time(lambda: edit_distance(hyp, ref, PAD), repeats)
            entry.update({
                "sentence_bleu_torch_s" + suffix: torch_bleu,
                "sentence_bleu_speedup" + suffix: sacre_bleu / torch_bleu,
                "sentence_bleu_torch_sent_per_s" + suffix: num_pairs / torch_bleu,
                "prefix_bleu_torch_s" + suffix: torch_prefix,
                "prefix_bleu_speedup" + suffix: sacre_prefix / torch_prefix,
                "prefix_bleu_torch_sent_per_s" + suffix: num_pairs / torch_prefix,
                "edit_torch_s" + suffix: torch_edit,
                "edit_speedup" + suffix: rf_edit / torch_edit,
                "edit_speedup_vs_rapidfuzz_from_tensors" + suffix: rf_edit_tensors / torch_edit,
                "edit_torch_sent_per_s" + suffix: num_pairs / torch_edit,
            })
        torch.set_num_threads(default_threads)
        entry.update(agreement_and_tensorbleu(hyp, ref, hyp_s, ref_strings, metric, repeats))
        if not multi:
            entry["small_batches"] = small_batches(hyp, ref, hyp_s, ref_strings, metric, repeats)
        results[tag] = entry
    results["edit_spelling"] = spelling_edit(num_pairs, repeats, Levenshtein)
    results["loadavg_1min_after"] = os.getloadavg()[0]
    return results


def report(res, thread_counts):
    print(f"reward speed: {res['pairs']} pairs, hyp len ~{res['mean_hyp_len']:.1f} tokens, vocab {res['vocab']}, "
          f"torch = median of {res['repeats']} runs, 1-min load average {res['loadavg_1min_before']:.2f} "
          f"before / {res['loadavg_1min_after']:.2f} after (2 cores)")
    for tag in ["R1", "R2"]:
        r = res[tag]
        print(f"[{tag}: {tag[1]} reference(s)]")
        print(f"  sacrebleu sentence_score loop     {r['sentence_bleu_sacrebleu_s'] * 1e3:9.1f} ms "
              f"({r['sentence_bleu_sacrebleu_sent_per_s']:7.0f} sent/s)")
        print(f"  sacrebleu loop over all prefixes  {r['prefix_bleu_sacrebleu_s_extrapolated'] * 1e3:9.1f} ms "
              f"(timed on the first {r['prefix_bleu_sacrebleu_subset_sentences']} sentences, "
              f"extrapolated per sentence to {res['pairs']})")
        print(f"  rapidfuzz Levenshtein loop        {r['edit_rapidfuzz_s'] * 1e3:9.1f} ms "
              f"(from the padded tensors: {r['edit_rapidfuzz_from_tensors_s'] * 1e3:.1f} ms)")
        for threads in thread_counts:
            suffix = "" if threads == thread_counts[0] else f"_{threads}thread"
            label = f"torch, {threads} thread{'s' if threads > 1 else ''}"
            label += " (default)" if threads == thread_counts[0] else ""
            print(f"  {label}:")
            print(f"    sentence_bleu {r['sentence_bleu_torch_s' + suffix] * 1e3:8.1f} ms "
                  f"({r['sentence_bleu_torch_sent_per_s' + suffix]:8.0f} sent/s)  "
                  f"speedup vs sacrebleu {r['sentence_bleu_speedup' + suffix]:6.1f}x (target >= 10x)")
            print(f"    prefix_bleu   {r['prefix_bleu_torch_s' + suffix] * 1e3:8.1f} ms "
                  f"({r['prefix_bleu_torch_sent_per_s' + suffix]:8.0f} sent/s)  "
                  f"speedup vs sacrebleu {r['prefix_bleu_speedup' + suffix]:6.1f}x (target >= 50x)")
            print(f"    edit_distance {r['edit_torch_s' + suffix] * 1e3:8.1f} ms "
                  f"({r['edit_torch_sent_per_s' + suffix]:8.0f} sent/s)  "
                  f"speedup vs rapidfuzz {r['edit_speedup' + suffix]:6.2f}x "
                  f"(vs rapidfuzz from tensors {r['edit_speedup_vs_rapidfuzz_from_tensors' + suffix]:5.2f}x)")
        print(f"  max |BLEU - sacrebleu|: ours {r['sentence_bleu_max_abs_dev_vs_sacrebleu']:.2e} points", end="")
        if "tensorbleu_s" in r:
            print(f"; TensorBLEU {r['tensorbleu_max_abs_dev_vs_sacrebleu']:.2f} (mean "
                  f"{r['tensorbleu_mean_abs_dev_vs_sacrebleu']:.2f}) on the first {r['tensorbleu_pairs']} pairs, "
                  f"its time {r['tensorbleu_s'] * 1e3:.1f} ms vs ours {r['sentence_bleu_torch_s_on_tensorbleu_pairs'] * 1e3:.1f} ms "
                  f"({r['speedup_vs_tensorbleu']:.0f}x)")
        else:
            print(f"; TensorBLEU {r.get('tensorbleu', 'not measured')}")
        for n, b in r.get("small_batches", {}).items():
            print(f"  {n:>5} pairs: sentence_bleu {b['torch_s'] * 1e3:7.2f} ms, sacrebleu {b['sacrebleu_s'] * 1e3:7.2f} ms, "
                  f"speedup {b['speedup']:5.1f}x")


def report_spelling(res):
    print("[edit distance on spelling-like pairs (28 symbols, 3..16 long), "
          f"torch {torch.get_num_threads()} thread(s)]")
    for n, b in res["edit_spelling"].items():
        print(f"  {n:>5} pairs: edit_distance {b['torch_s'] * 1e3:6.2f} ms, rapidfuzz {b['rapidfuzz_s'] * 1e3:6.2f} ms "
              f"on lists / {b['rapidfuzz_from_tensors_s'] * 1e3:6.2f} ms from tensors: speedup {b['speedup']:4.2f}x "
              f"/ {b['speedup_vs_from_tensors']:4.2f}x")


# ------------------------------------------------------------------ chrF on Bible pairs

BIBLE = Path(__file__).resolve().parents[1] / "examples" / "bible_es_en" / "verses.tsv.gz"
FAIRSEQ_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # fairseq Dictionary ids 0..3
BOS, FPAD, EOS, UNK = 0, 1, 2, 3


def bible_chrf_data(num_pairs, seed=0):
    """(symbols, hyp ids, [ref ids WEB, ref ids KJV], hyp strings, [ref strings WEB, KJV]):
    ids are sentencepiece pieces of a fairseq-style dictionary, strings what fairseq decodes."""
    import sentencepiece as spm

    with gzip.open(BIBLE, "rt", encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f]
    rows = [r for r in rows if len(r) == 4 and all(x.strip() for x in r)
            and not any("<div" in x or "sID=" in x or "World English Bible Glossary" in x for x in r)]
    rng = random.Random(seed)
    rng.shuffle(rows)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([r[2] for r in rows[:8000]] + [r[3] for r in rows[:8000]]), model_writer=model,
        vocab_size=4000, character_coverage=1.0, model_type="unigram", num_threads=1, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    symbols = FAIRSEQ_SPECIALS + [sp.id_to_piece(i) for i in range(sp.get_piece_size())
                                  if not (sp.is_control(i) or sp.is_unknown(i))]
    index = {s: i for i, s in enumerate(symbols)}
    rows = rows[:num_pairs]
    pool = [w for r in rows for w in r[2].split()]

    def noisy(words):
        out = []
        for w in words:
            u = rng.random()
            if u >= 0.1:
                out.append(rng.choice(pool) if u < 0.2 else w)
            if rng.random() < 0.05:
                out.append(rng.choice(pool))
        return " ".join(out)

    def encode(text):
        return [index.get(p, UNK) for p in sp.encode(text, out_type=str)]

    def decode(ids):  # fairseq: Dictionary.string + sentencepiece post-processing
        return "".join(symbols[i] for i in ids).replace("\u2581", " ").strip()

    hyps = [encode(noisy(r[2].split())) for r in rows]
    refs = [[encode(r[2]) for r in rows], [encode(r[3]) for r in rows]]
    return symbols, hyps, refs, [decode(h) for h in hyps], [[decode(r) for r in side] for side in refs]


def pack_eos(seqs, width):
    """fairseq-style targets: ids, eos, then pad."""
    out = torch.full((len(seqs), width), FPAD, dtype=torch.long)
    for i, seq in enumerate(seqs):
        out[i, : len(seq) + 1] = torch.tensor(seq + [EOS])
    return out


def run_chrf(sizes, repeats, prefix_subset):
    from sacrebleu.metrics import CHRF

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    symbols, hyps, refs, hyp_s, ref_s = bible_chrf_data(max(sizes))
    width = max(len(s) for side in [hyps] + refs for s in side) + 1
    results = {"vocab": len(symbols), "mean_hyp_chars": sum(map(len, hyp_s)) / len(hyp_s),
               "mean_hyp_tokens": sum(map(len, hyps)) / len(hyps), "loadavg_1min_before": os.getloadavg()[0]}
    for name, word_order in [("chrf", 0), ("chrf_pp", 2)]:
        metric, ours = CHRF(word_order=word_order), ChrF(symbols, "sentencepiece", word_order)
        for num_refs in (1, 2):
            ref_tensor = torch.stack([pack_eos(side, width) for side in refs[:num_refs]], dim=1)
            if num_refs == 1:
                ref_tensor = ref_tensor[:, 0]
            for n in sizes:
                hyp, ref = pack_eos(hyps[:n], width), ref_tensor[:n]
                strings = [[side[i] for side in ref_s[:num_refs]] for i in range(n)]
                sacre = median_time(lambda: [metric.sentence_score(h, rs) for h, rs in zip(hyp_s[:n], strings)],
                                    max(1, repeats // 2), warmup=0)
                torch_full = median_time(lambda: ours(hyp, ref, FPAD, EOS), repeats)
                torch_prefix = median_time(lambda: ours.prefix(hyp, ref, FPAD, EOS), repeats)
                want = torch.tensor([metric.sentence_score(h, rs).score / 100 for h, rs in zip(hyp_s[:n], strings)],
                                    dtype=torch.float64)
                subset = range(min(prefix_subset, n))

                def sacre_prefix_loop():  # every token prefix, decoded as fairseq would
                    for i in subset:
                        for t in range(1, len(hyps[i]) + 1):
                            text = "".join(symbols[k] for k in hyps[i][:t]).replace("\u2581", " ").strip()
                            metric.sentence_score(text, strings[i])

                sacre_prefix = median_time(sacre_prefix_loop, 1, warmup=0) / len(subset) * n
                prefix = ours.prefix(hyp[:len(subset)], ref[:len(subset)], FPAD, EOS)
                loop = torch.stack([ours(hyp[:len(subset), : t + 1], ref[:len(subset)], FPAD, EOS)
                                    for t in range(prefix.size(1))], dim=1)
                results[f"{name}_R{num_refs}_{n}"] = {
                    "sacrebleu_s": sacre, "torch_s": torch_full, "speedup": sacre / torch_full,
                    "sacrebleu_prefix_s_extrapolated": sacre_prefix, "prefix_subset": len(subset),
                    "torch_prefix_s": torch_prefix, "prefix_speedup": sacre_prefix / torch_prefix,
                    "max_abs_dev_vs_sacrebleu": float((ours(hyp, ref, FPAD, EOS).double() - want).abs().max()),
                    "prefix_max_abs_dev_vs_full_on_prefixes": float((prefix - loop).abs().max())}
    torch.set_num_threads(threads)
    results["loadavg_1min_after"] = os.getloadavg()[0]
    return results


def report_chrf(res, sizes):
    print(f"[chrF / chrF++ on Bible pairs: sentencepiece {res['vocab']} symbols, hyp ~{res['mean_hyp_tokens']:.1f} "
          f"tokens / {res['mean_hyp_chars']:.0f} characters, torch 1 thread, 1-min load average "
          f"{res['loadavg_1min_before']:.2f} before / {res['loadavg_1min_after']:.2f} after]")
    for name in ["chrf", "chrf_pp"]:
        for num_refs in (1, 2):
            for n in sizes:
                r = res[f"{name}_R{num_refs}_{n}"]
                print(f"  {name:7s} R{num_refs} {n:>5} pairs: torch {r['torch_s'] * 1e3:7.1f} ms vs sacrebleu "
                      f"{r['sacrebleu_s'] * 1e3:7.1f} ms: {r['speedup']:5.1f}x (target >= 10x); "
                      f"max |ours - sacrebleu| {r['max_abs_dev_vs_sacrebleu']:.1e}")
                print(f"  {'':19s}prefixes: torch {r['torch_prefix_s'] * 1e3:7.1f} ms vs sacrebleu "
                      f"{r['sacrebleu_prefix_s_extrapolated']:5.1f} s (first {r['prefix_subset']} sentences, "
                      f"extrapolated): {r['prefix_speedup']:5.1f}x (target >= 50x); max |prefix - full score of "
                      f"the prefix| {r['prefix_max_abs_dev_vs_full_on_prefixes']:.1e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prefix-subset", type=int, default=300,
                        help="sentences on which the sacrebleu all-prefixes loop is timed")
    parser.add_argument("--no-single-thread", dest="also_single_thread", action="store_false",
                        help="skip the extra single-thread torch timings")
    parser.add_argument("--json", type=str, default=None, help="also write the numbers to this JSON file")
    parser.add_argument("--metrics", default="bleu,chrf",
                        help="comma-separated: bleu (BLEU, edit distance), chrf (chrF, chrF++)")
    parser.add_argument("--chrf-pairs", default="1000,4000", help="comma-separated Bible pair counts for chrF")
    parser.add_argument("--chrf-prefix-subset", type=int, default=100,
                        help="sentences on which the sacrebleu chrF all-prefixes loop is timed")
    args = parser.parse_args()
    metrics = set(args.metrics.split(","))
    thread_counts = [torch.get_num_threads()]  # the machine default first
    if args.also_single_thread and thread_counts[0] > 1:
        thread_counts.append(1)
    res = {}
    if "bleu" in metrics:
        res = run(args.pairs, max(5, args.repeats), args.prefix_subset, thread_counts)
        report(res, thread_counts)
        report_spelling(res)
    if "chrf" in metrics:
        sizes = [int(n) for n in args.chrf_pairs.split(",")]
        res["chrf"] = run_chrf(sizes, max(5, args.repeats), args.chrf_prefix_subset)
        report_chrf(res["chrf"], sizes)
    if args.json:
        write_json(args.json, res)  # never half-written
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
