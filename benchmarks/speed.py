#!/usr/bin/env python
"""Speed benchmark: step time of each criterion relative to MLE, peak memory, reward throughput.

    python benchmarks/speed.py [--quick] [--json PATH] [--settings a,b] [--criterions a,b]
        [--config benchmarks/config.toml] [--workdir work/bench] [--no-memory] [--no-reward]
        [--no-sampler | --sampler-only]

For every speed setting of ``benchmarks/config.toml`` ([speed.settings.*]):
the task's model and a fixed set of batches are built once (real training
batches of the task, or random Zipf-distributed token batches over a
synthetic dictionary of ``synthetic_vocab`` entries), then every criterion of
the setting is timed on exactly those batches and that model:

* what is timed: ``loss = criterion(model, batch); loss.backward()`` summed
  over the setting's batches (forward + backward, train mode, gradients
  zeroed before each step, untimed).  The optimizer step is *not* included:
  it costs the same for every criterion and would only pull all ratios
  towards 1;
* one warm-up round, then ``rounds`` rounds; a round is every batch once per
  criterion, the criterions interleaved batch by batch in an order rotated
  from batch to batch (the steps compared run seconds apart, which spreads
  any load change on a shared machine over all criterions);
* reported: the median round time per criterion, ``step_time_vs_mle`` =
  median(criterion) / median(MLE) (wall clock), the median of the per-round
  ratios (``median_paired_ratio``, more robust to drifting load) and the
  ratio of median process CPU times (``cpu_time_vs_mle``, less sensitive to
  other processes, but it counts idle-spinning threads);
* peak memory: each (setting, criterion) again in a fresh process: build the
  model, batches and criterion, reset the kernel's peak-RSS mark
  (``/proc/self/clear_refs``; else fall back to ``ru_maxrss``, which then
  also counts the construction), read the RSS (baseline), run
  ``memory_steps`` forward+backward steps, read the peak RSS (``VmHWM``, what
  ``ru_maxrss`` reports); ``peak_mem_mb`` is the increase (MB),
  ``peak_rss_mb`` the absolute peak.

Then, if the config has a ``[speed.sampler]`` table: the batched sampler
(``fairseq_seqlevel.decoding.sampler.sample``, ``samples`` multinomial samples
per source) against fairseq's ``SequenceGenerator`` with ``--sampling`` and
beam ``samples`` (which returns that many samples per source), on the model
and batches of its setting, the two interleaved batch by batch in ``rounds``
rounds after one warm-up (skipped when ``--settings`` leaves its setting
out); reported: median round times, their ratio (ours /
fairseq), the median per-round ratio and the CPU-time ratio.  Both use the
same caps (``max_len_a`` 0 gives every source the same one: fairseq takes the
batch's padded source width, the sampler each source's length).  The
setting's model is randomly initialized, so nearly every sample of both runs
to the cap: the same decoding work for both (a trained model would let the
sampler drop finished samples early, where fairseq waits for a source's last
sample).  ``--sampler-only`` runs just this and merges it into an existing
output file.

Then ``benchmarks/reward_speed.py --json`` (batched torch rewards vs
sacrebleu / rapidfuzz loops) runs and its numbers are merged in.

Output (``--json``, default benchmarks/results/speed.json, or
benchmarks/results/quick/speed.json with --quick): ``{criterion:
{"step_time_vs_mle", "peak_mem_mb", "setting", "by_setting": {...}}}`` where the
top-level numbers come from the criterion's main setting (the one covering
its first quality task), plus ``_meta``, ``_targets``, ``_sampler`` and
``_reward_speed``.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import harness as H  # noqa: E402


def quiet():
    """fairseq/hydra print warnings and INFO lines on import; keep the report readable."""
    import logging
    import warnings

    warnings.simplefilter("ignore")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)

MEMORY_TAG = "SPEED_MEMORY_JSON "


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", default=str(H.DEFAULT_CONFIG))
    p.add_argument("--quick", action="store_true", help="fewer rounds and batches, smaller reward benchmark")
    p.add_argument("--json", help="output file (default: RESULTS/speed.json)")
    p.add_argument("--settings", help="comma-separated subset of the speed settings")
    p.add_argument("--criterions", help="comma-separated subset of criterions (mle is always timed)")
    p.add_argument("--workdir", help="cache for token embeddings and synthetic data (default: work/bench)")
    p.add_argument("--rounds", type=int, help="override the config's rounds")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--no-reward", action="store_true", help="skip benchmarks/reward_speed.py")
    p.add_argument("--no-sampler", action="store_true", help="skip the sampler vs SequenceGenerator measurement")
    p.add_argument("--sampler-only", action="store_true",
                   help="only the sampler vs SequenceGenerator measurement, merged into the existing --json file")
    p.add_argument("--memory-worker", nargs=2, metavar=("SETTING", "CRITERION"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def log(msg=""):
    print(msg, flush=True)


# ---------------------------------------------------------------------------
# building a setting: model, batches, criterions
# ---------------------------------------------------------------------------

class Setting:
    """One speed setting: fairseq task + model + fixed batches (built once)."""

    def __init__(self, cfg, name, workdir):
        self.cfg, self.name, self.workdir = cfg, name, Path(workdir)
        self.spec = cfg["speed"]["settings"][name]
        self.task_name = self.spec["task"]
        self.synthetic = "synthetic_vocab" in self.spec
        self.quick = cfg["mode"] == "quick"
        self.num_batches = int(cfg["speed"].get("batches", self.spec.get("batches", 4))) if self.quick \
            else int(self.spec.get("batches", 4))

    # -- argv ------------------------------------------------------------
    def mapping(self):
        if self.synthetic:
            return {"python": sys.executable, "repo": H.REPO, "workdir": self.workdir,
                    "data": self.data_dir, "token_embeddings": self.data_dir / "token_embeddings.txt"}
        return H.task_mapping(self.cfg, self.task_name, self.workdir)

    def base_argv(self):
        task = self.cfg["tasks"][self.task_name]
        mapping = self.mapping()
        train_flags = (["--task", "seqlevel_translation", "-s", "src", "-t", "tgt"] if self.synthetic
                       else task["train_flags"])
        return [str(self.data_dir), "--user-dir", str(H.USER_DIR), "--seed", "1", "--num-workers", "0",
                *H.expand(train_flags + task["model_flags"] + task["optim_flags"], mapping)]

    def criterion_flags(self, criterion):
        return H.expand(H.criterion_flags(self.cfg, criterion, self.task_name), self.mapping())

    # -- building --------------------------------------------------------
    def prepare_files(self, criterions):
        """Data (real: prepared if missing; synthetic: written) and token embeddings if needed."""
        if self.synthetic:
            self.data_dir = write_synthetic_data(self.workdir / "speed" / f"synthetic_{self.spec['synthetic_vocab']}",
                                                 self.spec["synthetic_vocab"])
            return
        self.data_dir = H.ensure_data(self.cfg, self.task_name, self.workdir)
        if any("token_embeddings" in H.placeholders(H.criterion_flags(self.cfg, H.speed_entry(self.cfg, c)[0],
                                                                      self.task_name))
               for c in criterions):
            H.ensure_token_embeddings(self.cfg, self.task_name, self.workdir)

    def build(self):
        import torch

        from fairseq.dataclass.utils import convert_namespace_to_omegaconf
        from fairseq import tasks

        args = parse_fairseq(self.base_argv() + H.criterion_flags(self.cfg, H.CONTROL, self.task_name))
        self.fs_cfg = convert_namespace_to_omegaconf(args)
        self.task = tasks.setup_task(self.fs_cfg.task)
        torch.manual_seed(1)
        self.model = self.task.build_model(self.fs_cfg.model)
        self.trained_from = None
        if self.spec.get("checkpoint"):
            # a trained model: samples stop near the reference length (an untrained one
            # runs every sample to its length cap, which inflates the sampling criterions)
            path = Path(H.expand([self.spec["checkpoint"]], self.mapping())[0])
            if path.exists():
                state = torch.load(path, map_location="cpu", weights_only=False)
                self.model.load_state_dict(state["model"])
                self.trained_from = str(path)
            else:
                log(f"[{self.name}] {path} not found: timing an untrained model "
                    "(run quality.py for the task first)")
        self.model.train()
        self.batches = self.synthetic_batches() if self.synthetic else self.real_batches()
        return self

    def real_batches(self):
        from fairseq import utils

        self.task.load_dataset("train")
        dataset = self.task.dataset("train")
        ds_cfg = self.fs_cfg.dataset
        itr = self.task.get_batch_iterator(
            dataset=dataset, max_tokens=ds_cfg.max_tokens, max_sentences=ds_cfg.batch_size,
            max_positions=utils.resolve_max_positions(self.task.max_positions(), self.model.max_positions()),
            ignore_invalid_inputs=True, required_batch_size_multiple=ds_cfg.required_batch_size_multiple,
            seed=1, num_workers=0,
        ).next_epoch_itr(shuffle=True)
        return [next(itr) for _ in range(self.num_batches)]

    def synthetic_batches(self):
        import torch
        from fairseq.data import LanguagePairDataset

        dictionary = self.task.target_dictionary
        n_sent = int(self.spec.get("synthetic_sentences", 128))
        lo, hi = self.spec.get("synthetic_len", [10, 40])
        gen = torch.Generator().manual_seed(0)
        first = dictionary.nspecial
        weights = 1.0 / torch.arange(1, len(dictionary) - first + 1, dtype=torch.float)  # Zipf
        batches = []
        for _ in range(self.num_batches):
            def sentences():
                lengths = torch.randint(lo, hi + 1, (n_sent,), generator=gen)
                return [torch.cat([torch.multinomial(weights, int(n), replacement=True, generator=gen) + first,
                                   torch.tensor([dictionary.eos()])]) for n in lengths]
            src, tgt = sentences(), sentences()
            ds = LanguagePairDataset(src, [len(s) for s in src], dictionary, tgt, [len(t) for t in tgt],
                                     dictionary, left_pad_source=self.task.cfg.left_pad_source,
                                     left_pad_target=self.task.cfg.left_pad_target)
            batches.append(ds.collater([ds[i] for i in range(n_sent)]))
        return batches

    def build_criterion(self, name):
        """The criterion of a speed.json name.  A criterion with a ``pre_phase`` (erac
        after its critic phase) starts from the state one pre-phase step leaves, as its
        fine-tuning run starts from the pre-phase's checkpoint; ``NAME_PRE`` is the
        pre-phase step itself."""
        from fairseq.dataclass.utils import convert_namespace_to_omegaconf

        criterion, phase = H.speed_entry(self.cfg, name)
        pre = H.pre_phase_of(self.cfg, criterion)
        flags = H.expand(pre["flags"], self.mapping()) if phase == "pre" else self.criterion_flags(criterion)
        args = parse_fairseq(self.base_argv() + flags)
        built = self.task.build_criterion(convert_namespace_to_omegaconf(args).criterion)
        if pre and phase is None:
            before = self.build_criterion(H.pre_phase_speed_name(criterion, pre))
            step(self.model, before, self.batches[0])
            built.load_state_dict(before.state_dict())
        return built

    def describe(self):
        sent = sum(b["nsentences"] for b in self.batches)
        toks = sum(b["ntokens"] for b in self.batches)
        return {"task": self.task_name, "synthetic": self.synthetic, "vocab": len(self.task.target_dictionary),
                "batches": len(self.batches), "sentences": sent, "target_tokens": toks,
                "params": sum(p.numel() for p in self.model.parameters()), "trained_from": self.trained_from}


def parse_fairseq(argv):
    from fairseq import options

    H._import_plugin()
    parser = options.get_training_parser()
    return options.parse_args_and_arch(parser, [str(a) for a in argv])


def write_synthetic_data(directory, vocab):
    """A data dir with a joined dictionary of exactly ``vocab`` entries (4 specials
    included) and random 64-d token embeddings over it; only dictionaries, no data."""
    import torch

    directory = Path(directory)
    emb = directory / "token_embeddings.txt"
    if emb.exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    n = vocab - 4  # fairseq adds <s> <pad> </s> <unk>
    lines = [f"t{i} {n - i}" for i in range(n)]
    for side in ("src", "tgt"):
        (directory / f"dict.{side}.txt").write_text("\n".join(lines) + "\n")
    gen = torch.Generator().manual_seed(0)
    vectors = torch.randn(vocab, 64, generator=gen)
    symbols = ["<s>", "<pad>", "</s>", "<unk>"] + [f"t{i}" for i in range(n)]
    tmp = emb.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write(f"{vocab} 64\n")
        for sym, row in zip(symbols, vectors.tolist()):
            f.write(sym + " " + " ".join(f"{x:.5f}" for x in row) + "\n")
    os.replace(tmp, emb)
    return directory


# ---------------------------------------------------------------------------
# timing and memory
# ---------------------------------------------------------------------------

def step(model, criterion, batch):
    """(wall seconds, process CPU seconds) of one forward+backward."""
    model.zero_grad(set_to_none=True)
    criterion.zero_grad(set_to_none=True)  # a critic's gradients
    wall, cpu = time.perf_counter(), time.process_time()
    loss, _, _ = criterion(model, batch)
    loss.backward()
    return time.perf_counter() - wall, time.process_time() - cpu


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


def summarize_times(times, control=H.CONTROL, cpu=None):
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


def measure_memory(args, setting_name, criterion):
    cmd = [sys.executable, str(Path(__file__).resolve()), "--config", args.config,
           "--memory-worker", setting_name, criterion] + (["--quick"] if args.quick else []) \
        + (["--workdir", args.workdir] if args.workdir else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=H.subprocess_env())
    for line in proc.stdout.splitlines():
        if line.startswith(MEMORY_TAG):
            return json.loads(line[len(MEMORY_TAG):])
    return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}


def run_reward_speed(args, cfg, out_dir):
    tmp = Path(out_dir) / ".reward_speed.tmp.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "reward_speed.py"), "--json", str(tmp),
           *cfg["speed"].get("reward_speed_args", [])]
    log(f"$ {H.command_text(cmd)}")
    proc = subprocess.run(cmd, text=True, capture_output=True, env=H.subprocess_env())
    print(proc.stdout.rstrip(), flush=True)
    if proc.returncode != 0:
        log(f"reward_speed.py failed:\n{proc.stderr[-2000:]}")
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    data = H.read_json(tmp, {})
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
            sname, vs = target["setting"], target.get("vs", H.CONTROL)
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
    tasks = H.criterion_tasks(cfg, H.speed_entry(cfg, criterion)[0])
    for sname, spec in cfg["speed"]["settings"].items():
        if sname in measured and tasks and tasks[0] in spec.get("covers", [spec["task"]]):
            return sname
    return measured[0] if measured else None


def build_output(cfg, by_setting, meta, targets, reward):
    out = {}
    names = list(cfg["criterions"])
    for crit in cfg["criterions"]:
        pre = H.pre_phase_of(cfg, crit)
        if pre:
            names.insert(names.index(crit), H.pre_phase_speed_name(crit, pre))
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
            f"<= {t['max_ratio']}x {'MLE' if t['vs'] == H.CONTROL else t['vs']}: "
            + ("n/a" if t["ok"] is None else f"{t['ratio']:.2f} {'ok' if t['ok'] else 'MISSED'}") for t in tgt)
        log(f"  {crit:<14} {_f(r.get('median_s'), '14.3f')} {_f(r.get('step_time_vs_mle'), '6.2f')}x "
            f"{_f(r.get('median_paired_ratio'), '6.2f')}x {_f(r.get('cpu_time_vs_mle'), '6.2f')}x "
            f"{_f(r.get('peak_mem_mb'), '8.0f')} "
            f"{_f(r.get('peak_rss_mb'), '7.0f')}  {ttext}")


# ---------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    try:
        cfg = H.load_config(args.config, quick=args.quick)
    except H.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    workdir = Path(args.workdir or H.resolve_path(cfg["run"].get("workdir", H.DEFAULT_WORKDIR))).resolve()
    if args.memory_worker:
        memory_worker(cfg, *args.memory_worker, workdir)
        return 0
    results_dir = H.resolve_path(cfg["run"].get("results", H.DEFAULT_RESULTS))
    out_path = Path(args.json) if args.json else results_dir / "speed.json"
    import torch

    settings = [s.strip() for s in args.settings.split(",")] if args.settings else list(cfg["speed"]["settings"])
    only = [c.strip() for c in args.criterions.split(",")] if args.criterions else None
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
        out = H.read_json(out_path, {})
        out["_sampler"] = res
        H.write_json(out_path, out)
        log(f"\nwrote _sampler into {out_path} ({H.fmt_duration(time.time() - t0)})")
        return 0
    log(f"speed: {cfg['mode']} run, {rounds} rounds after 1 warm-up, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; timing forward+backward (no optimizer step)")
    by_setting, meta_settings, t0 = {}, {}, time.time()
    for sname in settings:
        names = [c for c in H.setting_criterions(cfg, sname)
                 if only is None or c in only or H.speed_entry(cfg, c)[0] in only or c == H.CONTROL]
        setting = Setting(cfg, sname, workdir)
        results, runnable = {}, {}
        for crit in names:
            message = H.check_criterion(cfg, H.speed_entry(cfg, crit)[0], setting.task_name, workdir)
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
        if H.CONTROL not in runnable:
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
                mem = measure_memory(args, sname, crit)
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
    H.write_json(out_path, out)
    log(f"\nwrote {out_path} ({H.fmt_duration(time.time() - t0)})")
    missed = [t for t in targets if t["ok"] is False]
    if missed:
        log("targets missed: " + "; ".join(f"{t['criterion']} in {t['setting']}: {t['ratio']:.2f}x "
                                           f"{t['vs']} > {t['max_ratio']}x" for t in missed))
    return 0


if __name__ == "__main__":
    quiet()
    sys.exit(main())
