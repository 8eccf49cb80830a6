"""The speed rows that only mean something on a GPU (run by ``scripts/gpu_check.sh``).

    python -m benchmarks.gpu_speed [--device cuda] [--tiny] [--json PATH] [--table PATH]
        [--criterions a,b] [--rounds 5] [--time-budget 150]

Three parts: criterions vs MLE on the Bible model shape (synthetic Bible-size
batches), rewards vs TensorBLEU, the sampler vs SequenceGenerator.  ``--tiny``
is a smoke test at toy sizes.  What each part measures and why:
benchmarks/README.md, "gpu_speed.py".
"""

if __name__ == "__main__" and not __package__:  # python benchmarks/gpu_speed.py: as python -m benchmarks.gpu_speed
    import os, sys  # noqa: E401
    _repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.execve(sys.executable, [sys.executable, "-m", "benchmarks.gpu_speed", *sys.argv[1:]],
              {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [_repo, os.environ.get("PYTHONPATH")]))})

import argparse  # noqa: E402
import copy  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from benchmarks import config as C  # noqa: E402
from benchmarks.config import REPO  # noqa: E402
from benchmarks.fixtures import Setting, quiet  # noqa: E402
from benchmarks.speed import summarize_times  # noqa: E402
from benchmarks.util import read_json, write_json  # noqa: E402

SETTING = "gpu_bible"
# one row per registered criterion (config rows of the bible setting), erac/vaml with their pre-phase
CRITERIONS = ["mle", "raml", "raml_lazy", "tok_seq", "token_smooth", "searnn_kl", "interpolation", "ss",
              "risk", "risk_beam", "seq_exploration", "scst", "erac_critic", "erac", "vaml_q", "vaml"]
TINY_CRITERIONS = ["mle", "raml_lazy", "erac"]  # erac: built from its pre-phase step (erac_critic)
BIBLE = {"batches": 4, "sentences": 56, "len": [10, 32], "vocab": 4000}
TINY = {"batches": 1, "sentences": 4, "len": [3, 6], "vocab": 4000}
REWARD_LENGTHS, REWARD_BATCHES = [256, 1024], [32, 128, 512]
TINY_REWARD_LENGTHS, TINY_REWARD_BATCHES = [16, 32], [4]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--tiny", action="store_true", help="toy sizes: a smoke test of the script, not a measurement")
    p.add_argument("--json", help="write the numbers here")
    p.add_argument("--table", help="write the short table here (it is printed too)")
    p.add_argument("--criterions", help="comma-separated speed.json names (default: one row per criterion)")
    p.add_argument("--rounds", type=int, help="timed rounds after one warm-up (default 5; --tiny 1)")
    p.add_argument("--time-budget", type=float, default=0, help="seconds; parts starting later are skipped")
    p.add_argument("--workdir", help="synthetic dictionaries and embeddings (default: a temporary folder)")
    return p.parse_args(argv)


class Device:
    def __init__(self, name):
        import torch

        self.torch, self.name = torch, name
        self.cuda = name.startswith("cuda")
        if self.cuda and not torch.cuda.is_available():
            raise SystemExit("error: --device cuda: no CUDA device visible (use --device cpu --tiny)")

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def oom(self, e):
        return isinstance(e, self.torch.cuda.OutOfMemoryError) or "out of memory" in str(e)

    def describe(self):
        torch = self.torch
        out = {"device": self.name, "torch": torch.__version__, "threads": torch.get_num_threads()}
        if self.cuda:
            props = torch.cuda.get_device_properties(torch.cuda.current_device())
            out.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                       cuda=torch.version.cuda, capability=f"{props.major}.{props.minor}")
        return out


def timed(device, fn, repeats, warmup=1):
    """Median seconds of ``fn()`` over ``repeats`` calls after ``warmup``, device synchronized."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        device.sync()
        start = time.perf_counter()
        fn()
        device.sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---------------------------------------------------------------------------
# 1. criterions vs MLE
# ---------------------------------------------------------------------------

def bible_setting(cfg, workdir, sizes):
    """fixtures.Setting of the bible task's model over synthetic Bible-sized batches."""
    cfg = copy.deepcopy(cfg)
    cfg["speed"]["settings"][SETTING] = {
        "task": "bible_es_en", "covers": [], "batches": sizes["batches"], "synthetic_vocab": sizes["vocab"],
        "synthetic_sentences": sizes["sentences"], "synthetic_len": sizes["len"]}
    setting = Setting(cfg, SETTING, workdir)
    setting.prepare_files([])
    return setting.build()


def cpu_ratios():
    """{row: step time vs MLE on the real Bible batches, 2 CPU cores}: speed.json's, else the
    other results/speed_*.json files' (rows re-measured on their own)."""
    results = REPO / "benchmarks" / "results"
    out = {}
    for path in [results / "speed.json", *sorted(results.glob("speed_*.json"))]:
        for name, entry in (read_json(path, {}) or {}).items():
            if name.startswith("_") or not isinstance(entry, dict) or out.get(name) is not None:
                continue
            out[name] = entry.get("by_setting", {}).get("bible", {}).get("step_time_vs_mle")
    return out


def time_criterions(setting, device, names, rounds, deadline=float("inf")):
    """{name: {"ms_per_step", "vs_mle", ...} or {"error"}}: criterions built on the CPU (a
    pre-phase step included), moved to the device with model and batches, interleaved;
    fewer rounds (at least one) when ``deadline`` passes."""
    import torch
    from fairseq import utils

    built, out = {}, {}
    for name in names:
        try:
            built[name] = setting.build_criterion(name)
        except Exception as e:  # noqa: BLE001  (a row that does not build is reported, the others run)
            out[name] = {"error": f"build: {type(e).__name__}: {e}"[:300]}
    setting.model.to(device.name)
    batches = [utils.move_to_cuda(b) if device.cuda else b for b in setting.batches]
    for name, crit in list(built.items()):
        built[name] = crit.to(device.name)

    def one_step(crit, batch):
        setting.model.zero_grad(set_to_none=True)
        crit.zero_grad(set_to_none=True)
        loss, _, _ = crit(setting.model, batch)
        loss.backward()

    wall = {n: [] for n in built}
    for r in range(1 + rounds):  # one warm-up round
        round_s = dict.fromkeys(built, 0.0)
        for b, batch in enumerate(batches):
            order = list(built)
            shift = (r + b) % max(1, len(order))
            for i, name in enumerate(order[shift:] + order[:shift]):
                if name in out:
                    continue
                torch.manual_seed(1000 * r + 10 * b + i)
                try:
                    device.sync()
                    start = time.perf_counter()
                    one_step(built[name], batch)
                    device.sync()
                    round_s[name] += time.perf_counter() - start
                except Exception as e:  # noqa: BLE001
                    out[name] = {"error": ("OOM" if device.oom(e) else f"{type(e).__name__}: {e}")[:300]}
                    if device.cuda:
                        torch.cuda.empty_cache()
        if r >= 1:
            for name in built:
                if name not in out:
                    wall[name].append(round_s[name])
            if time.time() > deadline and r < rounds:
                print(f"[gpu_speed] time budget: {r} of {rounds} rounds", flush=True)
                break
    ok = {n: ts for n, ts in wall.items() if n not in out and ts}
    if C.CONTROL not in ok:
        for name in names:
            out.setdefault(name, {"error": "no MLE time to compare with"})
        return {n: out[n] for n in names}
    cpu = cpu_ratios()
    for name, r in summarize_times(ok).items():
        out[name] = {"ms_per_step": round(1e3 * r["median_s"] / len(batches), 3),
                     "vs_mle": round(r["step_time_vs_mle"], 3),
                     "median_paired_ratio": round(r["median_paired_ratio"], 3),
                     "cpu_vs_mle": cpu.get(name), "round_s": [round(t, 5) for t in r["times_s"]]}
    return {n: out[n] for n in names if n in out}


# ---------------------------------------------------------------------------
# 2. rewards vs TensorBLEU
# ---------------------------------------------------------------------------

def reward_pairs(batch, length, vocab, device, seed=0):
    """(hyp, ref) [batch, length] on the device: Zipf ids in 1..vocab (0 = pad), hyp = ref with
    10 % of its tokens replaced."""
    import torch

    g = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float)
    ref = torch.multinomial(weights, batch * length, replacement=True, generator=g).view(batch, length) + 1
    hyp = ref.clone()
    swap = torch.rand(batch, length, generator=g) < 0.1
    hyp[swap] = torch.randint(1, vocab + 1, (int(swap.sum()),), generator=g)
    return hyp.to(device.name), ref.to(device.name)


def time_rewards(device, lengths, batches, repeats, deadline):
    import torch

    from fairseq_seqlevel.rewards import edit_distance, prefix_bleu, sentence_bleu

    try:
        from rxlm.metrics.tensorbleu import tensor_sentence_bleu
    except ImportError:
        tensor_sentence_bleu = None
    methods = {"tensorbleu": (lambda h, r: tensor_sentence_bleu(h, r.unsqueeze(1), pad_token_id=0))
               if tensor_sentence_bleu else None,
               "sentence_bleu": lambda h, r: sentence_bleu(h, r, 0),
               "prefix_bleu": lambda h, r: prefix_bleu(h, r, 0),
               "edit_distance": lambda h, r: edit_distance(h, r, 0)}
    rows = []
    for length in lengths:
        for batch in batches:
            row = {"tokens": length, "batch": batch}
            hyp, ref = reward_pairs(batch, length, 4000, device)
            for name, fn in methods.items():
                if fn is None:
                    row[name] = "not installed (rxlm)"
                    continue
                if time.time() > deadline:
                    row[name] = "skipped: time budget"
                    continue
                try:
                    row[name + "_ms"] = round(1e3 * timed(device, lambda f=fn, h=hyp, r=ref: f(h, r), repeats), 3)
                except Exception as e:  # noqa: BLE001
                    row[name] = "OOM" if device.oom(e) else f"{type(e).__name__}: {e}"[:200]
                    if device.cuda:
                        torch.cuda.empty_cache()
            if "tensorbleu_ms" in row and "sentence_bleu_ms" in row:
                row["speedup_vs_tensorbleu"] = round(row["tensorbleu_ms"] / row["sentence_bleu_ms"], 2)
            rows.append(row)
            hyp = ref = None  # freed before the next size's pairs
    return rows


# ---------------------------------------------------------------------------
# 3. sampler vs SequenceGenerator
# ---------------------------------------------------------------------------

def time_sampler(setting, device, spec, rounds):
    """speed.time_sampler's comparison on the device: both draw ``samples`` multinomial samples
    per source of the same batches, interleaved, device synchronized around each call."""
    from argparse import Namespace

    import torch
    from fairseq import utils

    from fairseq_seqlevel.decoding.sampler import sample

    n, a, b = int(spec.get("samples", 5)), spec.get("max_len_a", 0), int(spec.get("max_len_b", 200))
    model = setting.model
    batches = [utils.move_to_cuda(x) if device.cuda else x for x in setting.batches]
    generator = setting.task.build_generator([model], Namespace(beam=n, sampling=True, max_len_a=a, max_len_b=b))
    methods = {"sampler": lambda x: int(sample(model, x["net_input"], n=n, strategy="multinomial", max_len_a=a,
                                                  max_len_b=b).lengths.sum()),
               "sequence_generator": lambda x: sum(len(h["tokens"]) for hs in generator.forward(x) for h in hs)}
    wall = {m: [] for m in methods}
    tokens = dict.fromkeys(methods, 0)
    model.eval()
    try:
        with torch.no_grad():
            for r in range(1 + rounds):
                round_s = dict.fromkeys(methods, 0.0)
                for i, batch in enumerate(batches):
                    for name in (list(methods) if (r + i) % 2 == 0 else list(methods)[::-1]):
                        torch.manual_seed(1000 * r + i)
                        device.sync()
                        start = time.perf_counter()
                        made = methods[name](batch)
                        device.sync()
                        round_s[name] += time.perf_counter() - start
                        if r == 1:
                            tokens[name] += made
                if r >= 1:
                    for name in methods:
                        wall[name].append(round_s[name])
    finally:
        model.train()
    med = {m: statistics.median(wall[m]) for m in methods}
    return {"samples_per_source": n, "max_len_a": a, "max_len_b": b, "batches": len(batches),
            "sources": sum(int(x["nsentences"]) for x in batches), "rounds": rounds,
            "sampler_ms_per_round": round(1e3 * med["sampler"], 3),
            "sequence_generator_ms_per_round": round(1e3 * med["sequence_generator"], 3),
            "ratio": round(med["sampler"] / med["sequence_generator"], 3),
            "tokens_per_round": tokens, "cpu_ratio": (read_json(REPO / "benchmarks" / "results" / "speed.json", {})
                                                      or {}).get("_sampler", {}).get("ratio")}


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------

def _ms(value):
    return f"{value:.2f}" if isinstance(value, (int, float)) else str(value or "–")


def table(res):
    meta = res["meta"]
    where = (f"{meta.get('gpu')} ({meta.get('gpu_memory_gib')} GiB), torch {meta['torch']}, CUDA {meta.get('cuda')}"
             if meta["device"].startswith("cuda") else f"CPU, torch {meta['torch']}, {meta['threads']} threads")
    lines = [f"GPU speed rows: {where}; {meta['date']}"]
    if meta["tiny"]:
        lines.append("  TINY SIZES (dry run / no CUDA): a smoke test of benchmarks.gpu_speed, not a measurement")
    crit = res.get("criterions")
    if crit is not None:
        s = meta["shape"]
        lines.append(f"criterion step (forward+backward, fp32) on the Bible model shape: {meta.get('params', '?')} "
                     f"params, vocab {s['vocab']}, {s['batches']} synthetic batches x {s['sentences']} sentences "
                     f"({s['len'][0]}..{s['len'][1]} tokens + eos), median of "
                     f"{len(crit.get('mle', {}).get('round_s', [])) or meta['rounds']} rounds")
        lines.append(f"  {'criterion':<16} {'ms/step':>9} {'vs MLE':>8} {'CPU vs MLE':>11}")
        for name, r in crit.items():
            if "error" in r:
                lines.append(f"  {name:<16} error: {r['error'][:90]}")
            else:
                cpu = f"{r['cpu_vs_mle']:.2f}x" if isinstance(r.get("cpu_vs_mle"), (int, float)) else "–"
                lines.append(f"  {name:<16} {r['ms_per_step']:9.2f} {r['vs_mle']:7.2f}x {cpu:>11}")
    elif "criterions_skipped" in res:
        lines.append(f"criterion steps: {res['criterions_skipped']}")
    rewards = res.get("rewards")
    if rewards is not None:
        lines.append("rewards vs TensorBLEU (rxlm 0.3.80), same device, 1 reference, ms per call (median of "
                     f"{meta['reward_repeats']})")
        lines.append(f"  {'tokens':>6} {'batch':>5} {'TensorBLEU':>10} {'sentence_bleu':>13} {'speed-up':>8} "
                     f"{'prefix_bleu':>11} {'edit_distance':>13}")
        for r in rewards:
            up = f"{r['speedup_vs_tensorbleu']:.1f}x" if "speedup_vs_tensorbleu" in r else "–"
            lines.append(f"  {r['tokens']:>6} {r['batch']:>5} {_ms(r.get('tensorbleu_ms', r.get('tensorbleu'))):>10} "
                         f"{_ms(r.get('sentence_bleu_ms', r.get('sentence_bleu'))):>13} {up:>8} "
                         f"{_ms(r.get('prefix_bleu_ms', r.get('prefix_bleu'))):>11} "
                         f"{_ms(r.get('edit_distance_ms', r.get('edit_distance'))):>13}")
    elif "rewards_skipped" in res:
        lines.append(f"rewards: {res['rewards_skipped']}")
    smp = res.get("sampler")
    if smp is not None and "error" not in smp:
        cpu = f" (CPU, speed.json: {smp['cpu_ratio']:.2f}x)" if isinstance(smp.get("cpu_ratio"), float) else ""
        lines.append(f"sampler vs SequenceGenerator: {smp['samples_per_source']} samples per source, "
                     f"{smp['sources']} sources, cap {smp['max_len_b']} tokens: "
                     f"{smp['sampler_ms_per_round']:.1f} vs {smp['sequence_generator_ms_per_round']:.1f} ms per round "
                     f"= {smp['ratio']:.2f}x{cpu}")
    elif smp is not None:
        lines.append(f"sampler vs SequenceGenerator: error: {smp['error'][:100]}")
    elif "sampler_skipped" in res:
        lines.append(f"sampler vs SequenceGenerator: {res['sampler_skipped']}")
    return "\n".join(lines) + "\n"


def write(res, args):
    if args.json:
        write_json(Path(args.json), res)
    if args.table:
        Path(args.table).parent.mkdir(parents=True, exist_ok=True)
        Path(args.table).write_text(table(res))


def main(argv=None):
    args = parse_args(argv)
    quiet()
    device = Device(args.device)
    if args.tiny and not device.cuda:
        device.torch.set_num_threads(1)  # toy sizes: extra threads only contend (as the test suite's one_thread)
    t0 = time.time()
    deadline = t0 + args.time_budget if args.time_budget > 0 else float("inf")
    sizes = TINY if args.tiny else BIBLE
    rounds = args.rounds or (1 if args.tiny else 5)
    names = ([c.strip() for c in args.criterions.split(",")] if args.criterions
             else (TINY_CRITERIONS if args.tiny else CRITERIONS))
    if C.CONTROL not in names:
        names.insert(0, C.CONTROL)
    cfg = C.load_config(C.DEFAULT_CONFIG, experiments=C.experiments_defining(names))
    res = {"meta": {**device.describe(), "tiny": args.tiny, "date": time.strftime("%Y-%m-%d %H:%M"),
                    "rounds": rounds, "reward_repeats": 1 if args.tiny else 5, "shape": sizes,
                    "model_flags": cfg["tasks"]["bible_es_en"]["model_flags"]}}
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gpu_speed_"))
    setting = bible_setting(cfg, workdir, sizes)
    res["meta"]["params"] = sum(p.numel() for p in setting.model.parameters())

    print(f"[gpu_speed] criterions on the Bible model shape ({device.name}): {', '.join(names)}", flush=True)
    # the criterions may use 60 % of the budget, the rewards up to 85 %, the sampler the rest
    res["criterions"] = time_criterions(setting, device, names, rounds, t0 + 0.6 * (deadline - t0))
    write(res, args)

    if time.time() > deadline:
        res["rewards_skipped"] = "skipped: time budget"
    else:
        print("[gpu_speed] rewards vs TensorBLEU", flush=True)
        res["rewards"] = time_rewards(device, TINY_REWARD_LENGTHS if args.tiny else REWARD_LENGTHS,
                                      TINY_REWARD_BATCHES if args.tiny else REWARD_BATCHES,
                                      res["meta"]["reward_repeats"], t0 + 0.85 * (deadline - t0))
    write(res, args)

    if time.time() > deadline:
        res["sampler_skipped"] = "skipped: time budget"
    else:
        print("[gpu_speed] sampler vs SequenceGenerator", flush=True)
        spec = dict(cfg["speed"].get("sampler", {}))
        if args.tiny:
            spec.update(samples=2, max_len_b=8)
        try:
            res["sampler"] = time_sampler(setting, device, spec, rounds)
        except Exception as e:  # noqa: BLE001
            res["sampler"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    res["meta"]["wall_s"] = round(time.time() - t0, 1)
    write(res, args)
    print(table(res), end="", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
