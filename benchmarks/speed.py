"""Speed benchmark: step time of each criterion relative to MLE, peak memory, reward throughput.

    python -m benchmarks.speed [--quick] [--json PATH] [--settings a,b] [--criterions a,b]
        [--experiment NAME[,NAME]] [--config benchmarks/config.toml] [--workdir work/bench]
        [--no-memory] [--no-reward] [--no-sampler | --sampler-only]

Per speed setting (``[speed.settings.*]``): the model and fixed batches are built once
(benchmarks.fixtures.Setting), then every criterion's forward+backward is timed on them,
criterions interleaved batch by batch, one warm-up round then ``rounds`` rounds (median
round time and its ratio to MLE's); peak memory per criterion in a fresh process; then the
sampler vs fairseq's SequenceGenerator (``[speed.sampler]``) and benchmarks.reward_speed.
Output: RESULTS/speed.json (``--json``).  A variant named in --criterions brings its
experiment file.  Details: benchmarks/README.md.  (``python benchmarks/speed.py`` runs the same.)
"""

if __name__ == "__main__" and not __package__:  # python benchmarks/speed.py: as python -m benchmarks.speed
    import os, sys  # noqa: E401
    _repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.execve(sys.executable, [sys.executable, "-m", "benchmarks.speed", *sys.argv[1:]],
              {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [_repo, os.environ.get("PYTHONPATH")]))})

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from benchmarks import checks, config as C, plan as P  # noqa: E402
from benchmarks.fixtures import Setting, log, quiet, step  # noqa: E402,F401  (Setting, step: used by the probes)
from benchmarks.runs import resolve_path, subprocess_env  # noqa: E402
from benchmarks.util import command_text, fmt_duration, read_json, split_list, write_json  # noqa: E402

MEMORY_TAG = "SPEED_MEMORY_JSON "


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", default=str(C.DEFAULT_CONFIG))
    p.add_argument("--experiment", help="comma-separated experiment files overlaid on the config: NAME "
                   "(benchmarks/experiments/NAME.toml), a path, or 'all'; without --criterions, times "
                   "their rows (and mle)")
    p.add_argument("--quick", action="store_true", help="fewer rounds and batches, smaller reward benchmark")
    p.add_argument("--json", help="output file (default: RESULTS/speed.json)")
    p.add_argument("--update", action="store_true",
                   help="replace only the timed criterions' entries of the --json file (their ratios are to "
                        "this run's MLE), keep the rest, and record this run under _meta.remeasured_runs")
    p.add_argument("--settings", help="comma-separated subset of the speed settings")
    p.add_argument("--criterions", help="comma-separated subset of criterions (mle is always timed)")
    p.add_argument("--workdir", help="cache for token embeddings and synthetic data (default: work/bench)")
    p.add_argument("--rounds", type=int, help="override the config's rounds")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--no-reward", action="store_true", help="skip benchmarks.reward_speed")
    p.add_argument("--no-sampler", action="store_true", help="skip the sampler vs SequenceGenerator measurement")
    p.add_argument("--sampler-only", action="store_true",
                   help="only the sampler vs SequenceGenerator measurement, merged into the existing --json file")
    p.add_argument("--memory-worker", nargs=2, metavar=("SETTING", "CRITERION"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------
# timing and memory
# ---------------------------------------------------------------------------

def time_criterions(setting, criterions, rounds, warmup=1):
    """({criterion: [wall s per round]}, {criterion: [CPU s per round]}).

    A round is every batch of the setting once; the criterions are
    interleaved batch by batch (order rotated per batch and round), so that
    the steps being compared run seconds apart, not minutes.
    """
    import torch

    names = list(criterions)
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    for r in range(warmup + rounds):
        w_round, c_round = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
        for b, batch in enumerate(setting.batches):
            shift = (r + b) % len(names)
            for i, name in enumerate(names[shift:] + names[:shift]):
                torch.manual_seed(1000 * r + 10 * b + i)
                w, c = step(setting.model, criterions[name], batch)
                w_round[name] += w
                c_round[name] += c
        if r >= warmup:
            for name in names:
                wall[name].append(w_round[name])
                cpu[name].append(c_round[name])
    return wall, cpu


def summarize_times(times, control=C.CONTROL, cpu=None):
    """Medians, ratio of medians and median of per-round ratios to the control
    (plus the ratio of median process CPU times when ``cpu`` is given)."""
    base = statistics.median(times[control])
    out = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        paired = [t / c for t, c in zip(ts, times[control])]
        out[name] = {"median_s": med, "step_time_vs_mle": med / base,
                     "median_paired_ratio": statistics.median(paired), "times_s": ts}
        if cpu is not None:
            out[name]["cpu_time_vs_mle"] = statistics.median(cpu[name]) / statistics.median(cpu[control])
    return out


def maxrss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _proc_status_mb(key):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return None


def reset_peak_rss():
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0); False if impossible.

    Without it the peak would include the construction (data loading, model
    building) and the RSS a forked child inherits from its parent."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_worker(cfg, setting_name, criterion, workdir):
    import gc

    setting = Setting(cfg, setting_name, workdir)
    setting.prepare_files([criterion])
    setting.build()
    crit = setting.build_criterion(criterion)
    gc.collect()
    reset = reset_peak_rss()
    base = _proc_status_mb("VmRSS") if reset else maxrss_mb()
    steps = int(cfg["speed"].get("memory_steps", 3))
    for i in range(steps):
        step(setting.model, crit, setting.batches[i % len(setting.batches)])
    peak = (_proc_status_mb("VmHWM") if reset else None) or maxrss_mb()
    print(MEMORY_TAG + json.dumps({"peak_mem_mb": round(peak - base, 1), "peak_rss_mb": round(peak, 1),
                                   "baseline_rss_mb": round(base, 1), "steps": steps,
                                   "method": "VmHWM after clear_refs" if reset else "ru_maxrss"}), flush=True)


def measure_memory(args, setting_name, criterion, experiments=()):
    cmd = [sys.executable, "-m", "benchmarks.speed", "--config", args.config,
           "--memory-worker", setting_name, criterion] + (["--quick"] if args.quick else []) \
        + (["--workdir", args.workdir] if args.workdir else []) \
        + (["--experiment", ",".join(experiments)] if experiments else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env())
    for line in proc.stdout.splitlines():
        if line.startswith(MEMORY_TAG):
            return json.loads(line[len(MEMORY_TAG):])
    return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}


def run_reward_speed(args, cfg, out_dir):
    tmp = Path(out_dir) / ".reward_speed.tmp.json"
    cmd = [sys.executable, "-m", "benchmarks.reward_speed", "--json", str(tmp),
           *cfg["speed"].get("reward_speed_args", [])]
    log(f"$ {command_text(cmd)}")
    proc = subprocess.run(cmd, text=True, capture_output=True, env=subprocess_env())
    print(proc.stdout.rstrip(), flush=True)
    if proc.returncode != 0:
        log(f"benchmarks.reward_speed failed:\n{proc.stderr[-2000:]}")
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    data = read_json(tmp, {})
    tmp.unlink(missing_ok=True)
    return data


# ---------------------------------------------------------------------------
# sampler vs SequenceGenerator
# ---------------------------------------------------------------------------

def time_sampler(cfg, spec, workdir, rounds, warmup=1):
    """decoding.sampler.sample vs SequenceGenerator(--sampling, beam n): both
    draw ``samples`` multinomial samples per source of the same batches."""
    from argparse import Namespace

    import torch

    from fairseq_seqlevel.decoding.sampler import sample

    setting = Setting(cfg, spec["setting"], workdir)
    setting.prepare_files([])
    setting.build()
    model, task = setting.model, setting.task
    n, max_len_a, max_len_b = int(spec.get("samples", 5)), spec.get("max_len_a", 0), int(spec.get("max_len_b", 200))
    batches = setting.batches[:int(spec.get("batches", len(setting.batches)))]
    generator = task.build_generator([model], Namespace(beam=n, sampling=True, max_len_a=max_len_a,
                                                        max_len_b=max_len_b))
    model.eval()  # both run in eval mode without gradients (as fairseq-generate)

    def ours(batch):
        out = sample(model, batch["net_input"], n=n, strategy="multinomial", max_len_a=max_len_a,
                     max_len_b=max_len_b)
        return int(out.lengths.sum())

    def fairseq(batch):
        hyps = generator.forward(batch)
        assert all(len(h) == n for h in hyps)
        return sum(len(x["tokens"]) for h in hyps for x in h)

    methods = {"ours": ours, "fairseq": fairseq}
    wall = {m: [] for m in methods}
    cpu = {m: [] for m in methods}
    tokens = dict.fromkeys(methods, 0)
    for r in range(warmup + rounds):
        w_round, c_round = dict.fromkeys(methods, 0.0), dict.fromkeys(methods, 0.0)
        for b, batch in enumerate(batches):
            order = list(methods) if (r + b) % 2 == 0 else list(methods)[::-1]
            for name in order:
                torch.manual_seed(1000 * r + b)
                w, c = time.perf_counter(), time.process_time()
                made = methods[name](batch)
                w_round[name] += time.perf_counter() - w
                c_round[name] += time.process_time() - c
                if r == warmup:
                    tokens[name] += made
        if r >= warmup:
            for name in methods:
                wall[name].append(round(w_round[name], 4))
                cpu[name].append(round(c_round[name], 4))
    model.train()
    med = {m: statistics.median(wall[m]) for m in methods}
    ratio = med["ours"] / med["fairseq"]
    out = {"setting": spec["setting"], "samples_per_source": n, "max_len_a": max_len_a, "max_len_b": max_len_b,
           "batches": len(batches), "sources": sum(b["nsentences"] for b in batches),
           "model": "the setting's model (random initialization)", "rounds": rounds, "warmup_rounds": warmup,
           "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M"),
           "ours": "fairseq_seqlevel.decoding.sampler.sample(strategy='multinomial', n=samples)",
           "fairseq": "task.build_generator(beam=samples, sampling=True) -> SequenceGenerator",
           "ours_median_s": round(med["ours"], 4), "fairseq_median_s": round(med["fairseq"], 4),
           "ratio": round(ratio, 3),
           "median_paired_ratio": round(statistics.median(o / f for o, f in zip(wall["ours"], wall["fairseq"])), 3),
           "cpu_time_ratio": round(statistics.median(cpu["ours"]) / statistics.median(cpu["fairseq"]), 3),
           "ours_s": wall["ours"], "fairseq_s": wall["fairseq"],
           "ours_tokens_per_round": tokens["ours"], "fairseq_tokens_per_round": tokens["fairseq"]}
    if "max_ratio" in spec:
        out["max_ratio"] = spec["max_ratio"]
        out["ok"] = ratio <= spec["max_ratio"]
    return out


def print_sampler(res):
    target = "" if "max_ratio" not in res else \
        f"  target <= {res['max_ratio']}x: {'ok' if res['ok'] else 'MISSED'}"
    log(f"\n[sampler vs SequenceGenerator] {res['setting']}: {res['samples_per_source']} samples per source, "
        f"{res['batches']} batches = {res['sources']} sources, caps {res['max_len_a']}*|src| + {res['max_len_b']}, "
        f"{res['ours_tokens_per_round']} / {res['fairseq_tokens_per_round']} tokens per round")
    log(f"  sampler {res['ours_median_s']:.3f} s/round, SequenceGenerator {res['fairseq_median_s']:.3f} s/round "
        f"(medians of {res['rounds']}): {res['ratio']:.2f}x (paired {res['median_paired_ratio']:.2f}x, "
        f"CPU {res['cpu_time_ratio']:.2f}x){target}")


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------

def check_targets(cfg, by_setting):
    """[{criterion, setting, vs, ratio, max_ratio, ok}] for every configured speed target."""
    out = []
    for name, crit in cfg["criterions"].items():
        for target in crit.get("speed_targets", []):
            sname, vs = target["setting"], target.get("vs", C.CONTROL)
            res = by_setting.get(sname, {})
            if name in res and vs in res and "median_s" in res[name] and "median_s" in res[vs]:
                ratio = res[name]["median_s"] / res[vs]["median_s"]
                out.append({"criterion": name, "setting": sname, "vs": vs, "ratio": round(ratio, 3),
                            "max_ratio": target["max_ratio"], "ok": ratio <= target["max_ratio"]})
            else:
                out.append({"criterion": name, "setting": sname, "vs": vs, "ratio": None,
                            "max_ratio": target["max_ratio"], "ok": None})
    return out


def main_setting(cfg, criterion, measured):
    """The setting whose numbers go to the top level for ``criterion``."""
    tasks = P.criterion_tasks(cfg, P.speed_entry(cfg, criterion)[0])
    for sname, spec in cfg["speed"]["settings"].items():
        if sname in measured and tasks and tasks[0] in spec.get("covers", [spec["task"]]):
            return sname
    return measured[0] if measured else None


def build_output(cfg, by_setting, meta, targets, reward):
    out = {}
    names = list(cfg["criterions"])
    for crit in cfg["criterions"]:
        pre = P.pre_phase_of(cfg, crit)
        if pre:
            names.insert(names.index(crit), P.pre_phase_speed_name(crit, pre))
    for name in names:
        measured = [s for s in by_setting if name in by_setting[s]]
        if not measured:
            continue
        main = main_setting(cfg, name, measured)
        entry = by_setting[main][name]
        out[name] = {"step_time_vs_mle": entry.get("step_time_vs_mle"), "peak_mem_mb": entry.get("peak_mem_mb"),
                     "setting": main, "by_setting": {s: by_setting[s][name] for s in measured}}
        if "skipped" in entry:
            out[name]["skipped"] = entry["skipped"]
    out["_meta"] = meta
    out["_targets"] = targets
    if reward is not None:
        out["_reward_speed"] = reward
    return out


def updated(old, new, argv):
    """``old`` speed.json with ``new``'s criterion entries (except MLE's: every ratio in ``old``
    is to its own run's MLE), its targets for those criterions, and a record of the run."""
    timed = [name for name in new if not name.startswith("_") and name != C.CONTROL]
    out = {**old, **{name: new[name] for name in timed}}
    out["_targets"] = [t for t in old.get("_targets", []) if t["criterion"] not in timed] + \
        [t for t in new.get("_targets", []) if t["criterion"] in timed]
    meta = dict(old.get("_meta", {}))
    mle = {s: e.get("median_s") for s, e in new.get(C.CONTROL, {}).get("by_setting", {}).items()}
    meta.setdefault("remeasured_runs", []).append(
        {"criterions": timed, "date": new["_meta"]["date"], "command": f"python -m benchmarks.speed {argv}",
         "threads": new["_meta"]["threads"], "mle_median_s": mle, "settings": new["_meta"]["settings"]})
    out["_meta"] = meta
    return out


def _f(value, fmt):
    return format(value, fmt) if isinstance(value, (int, float)) else "–"


def print_setting(name, desc, results, targets):
    log(f"\n[{name}] {desc['task']}{' (synthetic batches)' if desc['synthetic'] else ''}: vocab {desc['vocab']}, "
        f"{desc['params'] / 1e6:.2f}M params, {desc['batches']} batches = {desc['sentences']} sentences / "
        f"{desc['target_tokens']} target tokens per round")
    log(f"  {'criterion':<14} {'median s/round':>14} {'vs MLE':>7} {'paired':>7} {'CPU':>7} {'peak MB':>8} "
        f"{'RSS MB':>7}  target")
    for crit, r in results.items():
        if "skipped" in r:
            log(f"  {crit:<14} skipped: {r['skipped']}")
            continue
        tgt = [t for t in targets if t["criterion"] == crit and t["setting"] == name]
        ttext = "; ".join(
            f"<= {t['max_ratio']}x {'MLE' if t['vs'] == C.CONTROL else t['vs']}: "
            + ("n/a" if t["ok"] is None else f"{t['ratio']:.2f} {'ok' if t['ok'] else 'MISSED'}") for t in tgt)
        log(f"  {crit:<14} {_f(r.get('median_s'), '14.3f')} {_f(r.get('step_time_vs_mle'), '6.2f')}x "
            f"{_f(r.get('median_paired_ratio'), '6.2f')}x {_f(r.get('cpu_time_vs_mle'), '6.2f')}x "
            f"{_f(r.get('peak_mem_mb'), '8.0f')} "
            f"{_f(r.get('peak_rss_mb'), '7.0f')}  {ttext}")


# ---------------------------------------------------------------------------

def load(args):
    """The config of ``args``: --config, its --experiment files and those defining a
    criterion named in --criterions (or a pre-phase name such as erac_critic4_critic)."""
    named = split_list(args.criterions) or []
    if args.memory_worker:
        named.append(args.memory_worker[1])
    own = set(C.raw_config(args.config)[1]) if named else set()
    named += [n.rsplit("_", 1)[0] for n in named]  # NAME_PRE: the criterion NAME's pre-phase step
    experiments = (split_list(args.experiment) or []) + C.experiments_defining(named, skip=own)
    return C.load_config(args.config, quick=args.quick, experiments=experiments)


def main(argv=None):
    args = parse_args(argv)
    try:
        cfg = load(args)
    except C.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    workdir = Path(args.workdir or resolve_path(cfg["run"].get("workdir", C.DEFAULT_WORKDIR))).resolve()
    if args.memory_worker:
        memory_worker(cfg, *args.memory_worker, workdir)
        return 0
    results_dir = resolve_path(cfg["run"].get("results", C.DEFAULT_RESULTS))
    out_path = Path(args.json) if args.json else results_dir / "speed.json"
    import torch

    settings = [s.strip() for s in args.settings.split(",")] if args.settings else list(cfg["speed"]["settings"])
    only = split_list(args.criterions) or C.experiment_criterions(split_list(args.experiment)) or None
    for name in settings:
        if name not in cfg["speed"]["settings"]:
            print(f"error: --settings: unknown setting '{name}'; known: {', '.join(cfg['speed']['settings'])}",
                  file=sys.stderr)
            return 2
    rounds = args.rounds or int(cfg["speed"].get("rounds", 7))
    sampler_spec = None if args.no_sampler else cfg["speed"].get("sampler")
    if args.sampler_only:
        if sampler_spec is None:
            print(f"error: --sampler-only: {cfg['path']} has no [speed.sampler] table", file=sys.stderr)
            return 2
        t0 = time.time()
        res = time_sampler(cfg, sampler_spec, workdir, rounds)
        print_sampler(res)
        out = read_json(out_path, {})
        out["_sampler"] = res
        write_json(out_path, out)
        log(f"\nwrote _sampler into {out_path} ({fmt_duration(time.time() - t0)})")
        return 0
    log(f"speed: {cfg['mode']} run, {rounds} rounds after 1 warm-up, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; timing forward+backward (no optimizer step)")
    by_setting, meta_settings, t0 = {}, {}, time.time()
    for sname in settings:
        names = [c for c in P.setting_criterions(cfg, sname)
                 if only is None or c in only or P.speed_entry(cfg, c)[0] in only or c == C.CONTROL]
        setting = Setting(cfg, sname, workdir)
        results, runnable = {}, {}
        for crit in names:
            message = checks.check_criterion(cfg, P.speed_entry(cfg, crit)[0], setting.task_name, workdir)
            if message:
                results[crit] = {"skipped": message}
                log(f"skip: [{sname}] {message}")
            else:
                runnable[crit] = None
        setting.prepare_files(runnable)
        setting.build()
        for crit in list(runnable):
            try:
                runnable[crit] = setting.build_criterion(crit)
            except Exception as e:  # a criterion's own start-up check (e.g. ConfigError)
                results[crit] = {"skipped": f"{type(e).__name__}: {e}"}
                log(f"skip: [{sname}] {crit}: {type(e).__name__}: {e}")
                del runnable[crit]
        if C.CONTROL not in runnable:
            log(f"[{sname}] MLE cannot be built; setting skipped")
            continue
        log(f"[{sname}] timing {', '.join(runnable)} ...")
        wall, cpu = time_criterions(setting, runnable, rounds)
        for crit, r in summarize_times(wall, cpu=cpu).items():
            results[crit] = {k: (round(v, 4) if isinstance(v, float) else [round(x, 4) for x in v]
                                 if isinstance(v, list) else v) for k, v in r.items()}
        meta_settings[sname] = setting.describe()
        del setting
        if not args.no_memory:
            for crit in runnable:
                mem = measure_memory(args, sname, crit, cfg["experiments"])
                results[crit].update(mem)
        by_setting[sname] = {c: results[c] for c in names if c in results}
    targets = check_targets(cfg, by_setting)
    for sname in by_setting:
        print_setting(sname, meta_settings[sname], by_setting[sname], targets)

    sampler = None
    if sampler_spec is not None and sampler_spec["setting"] in settings:
        sampler = time_sampler(cfg, sampler_spec, workdir, rounds)
        print_sampler(sampler)

    reward = None if args.no_reward else run_reward_speed(args, cfg, out_path.parent)
    meta = {"mode": cfg["mode"], "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "rounds": rounds, "warmup_rounds": 1,
            "timed": "criterion(model, batch) + loss.backward(), summed over the setting's batches; "
                     "no optimizer step",
            "memory": "peak RSS (VmHWM = ru_maxrss, reset after construction) minus the RSS before the "
                      f"steps, fresh process, {cfg['speed'].get('memory_steps', 3)} forward+backward steps",
            "settings": meta_settings, "wall_s": round(time.time() - t0, 1)}
    out = build_output(cfg, by_setting, meta, targets, reward)
    if sampler is not None:
        out["_sampler"] = sampler
    if args.update:
        out = updated(read_json(out_path, {}), out, " ".join(sys.argv[1:]))
    write_json(out_path, out)
    log(f"\nwrote {out_path} ({fmt_duration(time.time() - t0)})")
    missed = [t for t in targets if t["ok"] is False]
    if missed:
        log("targets missed: " + "; ".join(f"{t['criterion']} in {t['setting']}: {t['ratio']:.2f}x "
                                           f"{t['vs']} > {t['max_ratio']}x" for t in missed))
    return 0


if __name__ == "__main__":
    quiet()
    sys.exit(main())
