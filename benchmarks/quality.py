"""Quality benchmark: does each criterion beat MLE when fine-tuning the same model?

    python -m benchmarks.quality [--quick] [--tasks a,b] [--criterions a,b] [--experiment NAME[,NAME]]
        [--seeds 1,2,3] [--pretrain-seeds 1,2] [--pretrain-ids 1,3] [--workdir work/bench]
        [--config benchmarks/config.toml] [--results benchmarks/results] [--force] [--force-pretrain] [--dry-run]
    python -m benchmarks.quality --merge PIECE_DIR[,PIECE_DIR...] [--results benchmarks/results]

Per task: prepare the data, pre-train one MLE model per pre-training seed (cached while its
command is unchanged), fine-tune it with every criterion and seed for the task's budget
(``mle`` continued is the control), score the last checkpoint (benchmarks.evaluate), and
write RESULTS/quality.json, quality.md, quality_curves.json and the plots.  Criterions: the
config's rows, those of the --experiment files, and variants named in --criterions (their
experiment file is overlaid).  ``--merge`` adds pieces run side by side into RESULTS.
Details: benchmarks/README.md.  (``python benchmarks/quality.py ...`` runs the same.)
"""

if __name__ == "__main__" and not __package__:  # python benchmarks/quality.py: as python -m benchmarks.quality
    import os, sys  # noqa: E401
    _repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.execve(sys.executable, [sys.executable, "-m", "benchmarks.quality", *sys.argv[1:]],
              {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [_repo, os.environ.get("PYTHONPATH")]))})

import argparse  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from benchmarks import checks, config as C, logs, plan as P, plots as PL, report, runs as R, stats  # noqa: E402
from benchmarks import significance as S  # noqa: E402
from benchmarks.fixtures import quiet  # noqa: E402
from benchmarks.util import command_text, fmt_duration, read_json, split_list, write_json  # noqa: E402


def add_run_selection(p, results="quality.json"):
    """The flags that select runs (tasks, criterions, seeds, pre-trained models), shared
    with the scripts that read the runs' checkpoints (benchmarks.mbr_quality)."""
    p.add_argument("--tasks", help="comma-separated subset of the config's tasks")
    p.add_argument("--criterions", help="comma-separated subset of the config's criterions (a variant of "
                   "benchmarks/experiments/ brings its file)")
    p.add_argument("--seeds", help="comma-separated fine-tuning seeds (default: the config's)")
    p.add_argument("--pretrain-seeds", help="comma-separated pre-training seeds, one pre-trained MLE model "
                   "each, i.e. which run directories (default: the config's run.pretrain_seeds)")
    p.add_argument("--pretrain-ids", help=f"comma-separated ids {results} records the models of "
                   "--pretrain-seeds under, one per seed (default: the seeds themselves)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", default=str(C.DEFAULT_CONFIG))
    p.add_argument("--experiment", help="comma-separated experiment files overlaid on the config: NAME "
                   "(benchmarks/experiments/NAME.toml), a path, or 'all'; without --criterions, runs "
                   "their rows (and their controls)")
    p.add_argument("--quick", action="store_true", help="1 seed, short pre-training, few updates (~10 min)")
    add_run_selection(p)
    p.add_argument("--merge", help="comma-separated --results directories of earlier pieces: add their rows "
                   "and curves to --results and rewrite the report; runs nothing")
    p.add_argument("--workdir", help="checkpoints and logs (default: work/bench, quick: work/bench_quick)")
    p.add_argument("--results", help="output directory (default: benchmarks/results, quick: .../quick)")
    p.add_argument("--speed-json", help="speed.json for step-time ratios (default: RESULTS/speed.json, "
                   "else benchmarks/results/speed.json)")
    p.add_argument("--force", action="store_true", help="rerun fine-tuning runs that have results (with "
                   "--criterions: only theirs, not the MLE control added to them)")
    p.add_argument("--force-pretrain", action="store_true",
                   help="retrain the MLE models (and rerun every fine-tuning run of their tasks)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep fine-tuned checkpoints (default: deleted once scored)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the time estimate, run nothing")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite quality.md and the plots from --results' quality.json; runs nothing")
    p.add_argument("--no-plots", action="store_true")
    return p.parse_args(argv)


def log(msg=""):
    print(msg, flush=True)


# ---------------------------------------------------------------------------
# planning
# ---------------------------------------------------------------------------

def select(cfg, tasks=None, criterions=None, seeds=None):
    """(tasks, criterions, seeds) after checking names against the config."""
    all_tasks, all_crits = list(cfg["tasks"]), list(cfg["criterions"])
    for kind, chosen, known in (("task", tasks, all_tasks), ("criterion", criterions, all_crits)):
        for name in chosen or []:
            if name not in known:
                raise C.ConfigError(f"--{kind}s: unknown {kind} '{name}'; known: {', '.join(known)}")
    criterions = criterions or [c for c in all_crits if P.criterion_tasks(cfg, c)
                                and not (cfg.get("mode") == "quick" and cfg["criterions"][c].get("skip_quick"))]
    controls = dict.fromkeys([C.CONTROL] + [P.control_of(cfg, c) for c in criterions])
    criterions = [c for c in controls if c not in criterions] + criterions  # no Δ without its control
    default_tasks = cfg["run"].get("tasks") or all_tasks  # [run] / [quick] tasks: the default selection
    tasks = tasks or [t for t in default_tasks if any(t in P.criterion_tasks(cfg, c) for c in criterions)]
    seeds = seeds or list(cfg["run"].get("seeds", [1]))
    return tasks, criterions, [int(s) for s in seeds]


def plan_runs(cfg, tasks, criterions, seeds, pretrains=(1,)):
    """[(task, criterion, seed, pretrain)]: pre-trained-model-major, then seed-major,
    so an interrupted run has whole seeds of whole models."""
    return [(t, c, s, p) for t in tasks for p in pretrains for s in seeds for c in criterions
            if t in P.criterion_tasks(cfg, c)]


def pretrain_seeds(cfg, text=None):
    return [int(x) for x in (split_list(text) or cfg["run"].get("pretrain_seeds", [1]))]


def pretrain_ids(models, text=None):
    """{pre-training seed: the id its rows carry in quality.json} (the seed itself
    unless ``--pretrain-ids`` names one per seed). Raises :class:`ConfigError`."""
    if not text:
        return {p: p for p in models}
    try:
        ids = [int(x) for x in split_list(text)]
    except ValueError:
        raise C.ConfigError(f"--pretrain-ids: expected comma-separated integers, got {text!r}") from None
    if len(ids) != len(models) or len(set(ids)) != len(ids) or min(ids) < 1:
        raise C.ConfigError(f"--pretrain-ids: expected {len(models)} distinct positive ids, one per pre-training "
                            f"seed {models}, got {text!r}")
    return dict(zip(models, ids))


def relabel(row, pretrain_id):
    """``row`` recorded under ``pretrain_id``; the pre-training seed stays in its details."""
    if row.get("pretrain", 1) == pretrain_id:
        return row
    return {**row, "pretrain": pretrain_id,
            "details": {**row.get("details", {}), "pretrain_seed": row.get("pretrain", 1)}}


def check_runnable(cfg, runs, workdir):
    """Drop runs whose criterion fairseq does not know; return (runs, skip messages)."""
    verdict, skipped = {}, []
    for task, crit, *_ in runs:
        if (task, crit) not in verdict:
            verdict[(task, crit)] = checks.check_criterion(cfg, crit, task, workdir)
            if verdict[(task, crit)]:
                skipped.append(verdict[(task, crit)] + " -- skipped")
    return [r for r in runs if not verdict[(r[0], r[1])]], skipped


# ---------------------------------------------------------------------------
# steps
# ---------------------------------------------------------------------------

def score(cfg, task_name, checkpoint):
    """(metric name, value, all scores, translations) of a checkpoint on the task's eval split."""
    from benchmarks import evaluate as E

    task = cfg["tasks"][task_name]
    data = R.resolve_path(task["data"])
    split = task.get("eval_split", "test")
    try:
        hyps = E.generate(data, checkpoint, split=split, beam=task["beam"])
        refs = E.read_refs(data, split, tuple(task["refs"]))
        scores = E.bleu_scores(hyps, refs) if task["metric"] == "bleu" else E.edit_error(hyps, refs)
    except SystemExit as e:  # evaluate.py exits with a message on failure
        raise RuntimeError(f"evaluation of {checkpoint} failed: {e}") from None
    if task["metric"] == "bleu":
        refs = task["refs"]
        key = "bleu_" + ("+".join(refs) if len(refs) > 1 else refs[0])
        return "bleu", scores[key], scores, hyps
    return "edit_error", scores["edit_error"], scores, hyps


def reference_lists(cfg, task_name):
    """The task's eval-split references, one list per reference set."""
    from benchmarks import evaluate as E

    task = cfg["tasks"][task_name]
    return list(E.read_refs(R.resolve_path(task["data"]), task.get("eval_split", "test"), tuple(task["refs"])).values())


def keep_translations(results, row, hyps):
    """The run's test translations beside quality.json, for the paired bootstrap."""
    if hyps is not None:
        S.write_translations(S.translations_path(results, row["task"], row["criterion"], row.get("pretrain", 1),
                                                 row["seed"]), hyps)


def pretrain(cfg, task_name, workdir, force=False, pretrain_seed=1):
    """Train (or reuse) the task's MLE model of this pre-training seed; returns its
    info dict (incl. the row)."""
    pdir = P.pretrain_dir(workdir, task_name, pretrain_seed)
    cmd = R.pretrain_command(cfg, task_name, pdir, workdir, seed=pretrain_seed)
    name = task_name if pretrain_seed == 1 else f"{task_name} pretrain {pretrain_seed}"
    text = command_text(cmd)
    info = read_json(pdir / "done.json")
    if force and pdir.exists():
        shutil.rmtree(pdir)
        info = None
    if info is not None:
        old = (pdir / "command.txt").read_text().strip() if (pdir / "command.txt").exists() else ""
        if old != text:
            raise C.ConfigError(
                f"[{name}] the cached pre-trained model in {pdir} was trained with another command:\n"
                f"  cached: {old}\n  now:    {text}\n"
                "rerun with --force-pretrain to retrain it (this reruns the task's fine-tuning runs too)")
        built = info["row"].get("details", {}).get("omp_threads")
        log(f"[{name}] reusing pre-trained MLE model {pdir / 'checkpoint_last.pt'} "
            f"({info['row']['updates']} updates, {info['row']['metric']} {info['row']['value']:.2f}"
            + (f", built with OMP_NUM_THREADS {built}" if built else "") + ")")
        return info
    old = (pdir / "command.txt").read_text().strip() if (pdir / "command.txt").exists() else None
    if old is not None and old != text and pdir.exists():
        shutil.rmtree(pdir)  # an unfinished attempt with another command: start over
    pdir.mkdir(parents=True, exist_ok=True)
    (pdir / "command.txt").write_text(text + "\n")
    resume = (pdir / "checkpoint_last.pt").exists()
    log(f"[{name}] pre-training MLE{' (resuming)' if resume else ''}: {text}")
    code, wall = R.run_logged(cmd, pdir / ("train.log" if not resume else f"train.resume{int(time.time())}.log"))
    log_files = sorted(pdir.glob("train*.log"))
    parsed = logs.parse_log("\n".join(p.read_text(errors="replace") for p in log_files))
    if code != 0:
        raise RuntimeError(f"[{name}] pre-training failed (log {log_files[-1]}):\n{R.log_tail(log_files[-1])}")
    t0 = time.time()
    metric, value, scores, hyps = score(cfg, task_name, pdir / "checkpoint_last.pt")
    task = cfg["tasks"][task_name]
    valid = logs.curve(parsed["valid"], task["curve_key"], task.get("curve_scale", 1.0))
    prev_wall = read_json(pdir / "wall.json", {}).get("wall_s", 0.0)  # interrupted earlier attempts
    write_json(pdir / "wall.json", {"wall_s": prev_wall + wall})
    info = {
        "command": text, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "row": {"task": task_name, "criterion": C.PRETRAIN, "seed": int(_seed_of(cmd)), "pretrain": pretrain_seed,
                "metric": metric,
                "value": value, "updates": logs.final_updates(parsed), "wall_s": round(prev_wall + wall, 1),
                "details": {**scores, "eval_s": round(time.time() - t0, 1), "omp_threads": R.omp_threads()}},
        "final_valid": valid[-1][1] if valid else None,
        "curve": valid, "hyps": hyps,
    }
    write_json(pdir / "done.json", info)
    log(f"[{name}] pre-trained: {info['row']['updates']} updates in {wall:.0f} s; "
        f"test {metric} {value:.2f}")
    return info


def _seed_of(cmd):
    return cmd[cmd.index("--seed") + 1]


def finetune(cfg, task_name, crit, seed, workdir, pre, force=False, keep=False, pretrain_seed=1):
    """Run (or reuse) one fine-tuning run; returns its result dict or raises RuntimeError."""
    rdir = P.run_dir(workdir, task_name, crit, seed, pretrain_seed)
    ckpt = P.pretrain_dir(workdir, task_name, pretrain_seed) / "checkpoint_last.pt"
    seed_name = f"seed {seed}" if pretrain_seed == 1 else f"pretrain {pretrain_seed} seed {seed}"
    pre_cfg = P.pre_phase_of(cfg, crit)
    if pre_cfg:  # e.g. erac's critic pre-training: its own run, then the fine-tuning run from its checkpoint
        pdir = rdir / pre_cfg["name"]
        pre_cmd = R.finetune_command(cfg, task_name, crit, seed, pdir, ckpt, workdir, phase="pre")
        cmd = R.finetune_command(cfg, task_name, crit, seed, rdir, pdir / "checkpoint_last.pt", workdir)
        text = command_text(pre_cmd) + "\n" + command_text(cmd)
    else:
        cmd = R.finetune_command(cfg, task_name, crit, seed, rdir, ckpt, workdir)
        text = command_text(cmd)
    cached = read_json(rdir / "result.json")
    if cached and not force:
        if cached.get("command") == text and cached.get("pretrain_finished") == pre["finished"]:
            log(f"[{task_name}] {crit} {seed_name}: cached ({cached['row']['metric']} "
                f"{cached['row']['value']:.2f})")
            return cached
        log(f"[{task_name}] {crit} {seed_name}: cached result is stale (command or pre-trained model "
            "changed), rerunning")
    if rdir.exists():
        shutil.rmtree(rdir)  # a fresh start: fairseq would otherwise resume from checkpoint_last.pt
    rdir.mkdir(parents=True)
    (rdir / "command.txt").write_text(text + "\n")
    code_version = R.plugin_commit()  # at the start: the code the run imports
    pre_info = None
    if pre_cfg:
        pdir.mkdir()
        log(f"[{task_name}] {crit} {seed_name}: {pre_cfg['name']} phase, "
            f"{P.pre_phase_updates(cfg, task_name, pre_cfg)} updates")
        code, pre_wall = R.run_logged(pre_cmd, pdir / "train.log")
        if code != 0:
            raise RuntimeError(f"[{task_name}] {crit} {seed_name}: the {pre_cfg['name']} phase failed "
                               f"(log {pdir / 'train.log'}):\n{R.log_tail(pdir / 'train.log')}")
        pre_parsed = logs.parse_log((pdir / "train.log").read_text(errors="replace"))
        pre_info = {"name": pre_cfg["name"], "updates": logs.final_updates(pre_parsed), "wall_s": round(pre_wall, 1),
                    "last_train": pre_parsed["train"][-1] if pre_parsed["train"] else None,
                    "last_valid": pre_parsed["valid"][-1] if pre_parsed["valid"] else None}
    log(f"[{task_name}] {crit} {seed_name}: fine-tuning {P.finetune_updates(cfg, task_name, crit)} updates")
    code, wall = R.run_logged(cmd, rdir / "train.log")
    if code != 0:
        raise RuntimeError(f"[{task_name}] {crit} {seed_name}: fairseq-train failed "
                           f"(log {rdir / 'train.log'}):\n{R.log_tail(rdir / 'train.log')}")
    parsed = logs.parse_log((rdir / "train.log").read_text(errors="replace"))
    t0 = time.time()
    metric, value, scores, hyps = score(cfg, task_name, rdir / "checkpoint_last.pt")
    task = cfg["tasks"][task_name]
    result = {
        "command": text, "pretrain_finished": pre["finished"],
        "row": {"task": task_name, "criterion": crit, "seed": seed, "pretrain": pretrain_seed,
                "metric": metric, "value": value,
                "updates": logs.final_updates(parsed),
                # the cost of the method: a pre-phase (critic pre-training) counts
                "wall_s": round(wall + (pre_info["wall_s"] if pre_info else 0.0), 1),
                "details": {**scores, "eval_s": round(time.time() - t0, 1), "omp_threads": R.omp_threads(),
                            "plugin_commit": code_version,
                            **({"pre_phase": pre_info} if pre_info else {})}},
        "curve": logs.curve(parsed["valid"], task["curve_key"], task.get("curve_scale", 1.0)),
        "train_loss": [(e.get("num_updates"), e.get("loss")) for e in parsed["train"]],
        "hyps": hyps,
    }
    write_json(rdir / "result.json", result)
    if not keep:
        for path in [*rdir.glob("checkpoint*.pt"), *rdir.glob("*/checkpoint*.pt")]:
            path.unlink()
    log(f"[{task_name}] {crit} {seed_name}: {metric} {value:.2f} (train {wall:.0f} s)")
    return result


# ---------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------

def load_speed(args, results):
    for path in ([args.speed_json] if args.speed_json else
                 [Path(results) / "speed.json", C.DEFAULT_RESULTS / "speed.json"]):
        speed = read_json(path)
        if speed:
            return speed, Path(path)
    return None, None


def append_row(results, row):
    """Add (or replace) one row of quality.json as soon as a run is scored, so an
    interrupted benchmark keeps what it measured; the end of the run rewrites it."""
    path = Path(results) / "quality.json"
    write_json(path, report.merge_rows(read_json(path, []) or [], [row]))


def write_outputs(cfg, results, rows, curves, pretrains, speed, skipped, failed, replace_all, plots=True,
                  how=None):
    results = Path(results)
    qpath = results / "quality.json"
    all_rows = report.merge_rows(read_json(qpath, []) or [], rows, replace_all=replace_all)
    write_json(qpath, all_rows)
    cfg = report_config(cfg, all_rows)
    curves_path = results / "quality_curves.json"
    old_curves = {} if replace_all else (read_json(curves_path, {}) or {})
    for (task, crit, seed, pre), points in curves.items():
        old_curves.setdefault(task, {}).setdefault(crit, {})[P.curve_key(seed, pre)] = points
    for task, info in pretrains.items():  # the curves' start point: the first model's last validation
        old_curves.setdefault(task, {})["_start"] = info.get("final_valid")
    write_json(curves_path, old_curves)

    controls = {c: P.control_of(cfg, c) for c in cfg["criterions"]}
    agg = stats.aggregate(all_rows, controls=controls)
    boot = S.bootstrap_counts(cfg, all_rows, controls, results, lambda task: reference_lists(cfg, task))
    header = [
        f"<!-- generated by python -m benchmarks.quality ({how or cfg['mode'] + ' run'}, {time.strftime('%Y-%m-%d %H:%M')}); "
        "do not edit by hand -->",
        "",
        "Fine-tuning from the pre-trained MLE model(s) of each task, the same number of updates for every "
        "criterion; `mle` continues MLE (the control). Mean ± sample std over runs (pre-trained "
        "models × fine-tuning seeds); Δ vs MLE: the differences to the continued-MLE run of the same "
        "model and seed (± their std), averaged per pre-trained model, then over models, with the 95% t "
        "interval over models (runs that share a model are not independent; one model: no interval): "
        "**ahead** only when it excludes 0. Bootstrap: sacrebleu-style paired bootstrap over the test "
        "sentences (1,000 resamples) of each run against its control run, counted as ahead/tie/behind "
        "(– where the translations were not kept). Step time: "
        "forward+backward vs MLE from `python -m benchmarks.speed` (– if not measured). chrF (BLEU tasks): "
        "sacrebleu's corpus chrF of the same translations against every reference, Δ and interval as for "
        "the metric (– for runs recorded before it was kept). Hyperparameters "
        "and their sources: `benchmarks/config.toml` and `benchmarks/experiments/`.",
        "",
        "",
    ]
    chrf = stats.aggregate(report.chrf_rows(cfg, all_rows), controls=controls)
    md = "\n".join(header) + report.markdown_report(cfg, agg, speed, skipped=skipped, failed=failed, bootstrap=boot,
                                                    chrf=chrf)
    (results / "quality.md").write_text(md)
    if plots:  # the main rows (config.toml's), not the experiments' variants
        main = set(C.raw_config(cfg["path"])[0].get("criterions") or {})
        order = [c for c in cfg["criterions"] if c in main]
        for task_name in agg:
            if task_name not in cfg["tasks"]:
                continue
            by_crit = {c: [pts for pts in seeds.values()] for c, seeds in old_curves.get(task_name, {}).items()
                       if not c.startswith("_")}
            PL.plot_curves(task_name, cfg["tasks"][task_name], by_crit,
                          results / f"quality_curves_{task_name}.png",
                          start=old_curves.get(task_name, {}).get("_start"), order=order)
        PL.plot_cost_vs_gain([p for p in PL.cost_gain_points(cfg, agg, speed) if p[1] in main],
                             results / "cost_vs_gain.png")
    return md


def merge_pieces(cfg, results, pieces, speed, plots=True):
    """Add the rows and curves of the ``--results`` directories ``pieces`` to
    ``results`` and rewrite its report (``--merge``). Every piece's pre-trained
    model must be the one ``results`` (and the pieces before it) pair under its id.
    Raises :class:`ConfigError` before writing anything."""
    results = Path(results)
    old = read_json(results / "quality.json", []) or []
    have_start = {t for t, c in (read_json(results / "quality_curves.json", {}) or {}).items() if "_start" in c}
    rows, curves, starts, kept = [], {}, {}, []
    for piece in pieces:
        piece = Path(piece)
        piece_rows = read_json(piece / "quality.json")
        if not isinstance(piece_rows, list):
            raise C.ConfigError(f"--merge: {piece / 'quality.json'} is missing or not a list of rows "
                                "(expected the --results directory of a quality.py run)")
        for r in piece_rows:
            if r["criterion"] == C.PRETRAIN:
                report.check_same_model(report.merge_rows(old, rows), r)
        rows = report.merge_rows(rows, piece_rows)
        kept.extend((piece / "translations").glob("*/*.txt.gz"))
        for task, by_crit in (read_json(piece / "quality_curves.json", {}) or {}).items():
            for crit, runs in by_crit.items():
                if crit == "_start":
                    starts.setdefault(task, runs)
                    continue
                for key, points in runs.items():
                    curves[(task, crit, *P.parse_curve_key(key))] = points
    pretrains = {t: {"final_valid": v} for t, v in starts.items() if t not in have_start}
    for path in kept:  # the pieces' translations, for the paired bootstrap
        target = results / "translations" / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return rows, write_outputs(cfg, results, rows, curves, pretrains, speed, [], [], False, plots=plots,
                               how=f"--merge of {len(pieces)} piece(s) into the {cfg['mode']} results")


# ---------------------------------------------------------------------------

def load(args):
    """The config of ``args``: --config, its --experiment files and those defining a
    variant named in --criterions."""
    named = split_list(args.criterions) or []
    own = set(C.raw_config(args.config)[1]) if named else set()
    experiments = (split_list(args.experiment) or []) + C.experiments_defining(named, skip=own)
    return C.load_config(args.config, quick=args.quick, experiments=experiments)


def report_config(cfg, rows):
    """``cfg`` with the experiment files that define criterions of ``rows`` it lacks
    (a report of results that hold rows of other experiments keeps them)."""
    extra = C.experiments_defining({r["criterion"] for r in rows}, skip=cfg["criterions"])
    if not extra:
        return cfg
    return C.load_config(cfg["path"], quick=cfg["mode"] == "quick", experiments=(cfg.get("experiments") or []) + extra)


def main(argv=None):
    args = parse_args(argv)
    try:
        cfg = load(args)
        named = split_list(args.criterions) or C.experiment_criterions(split_list(args.experiment)) or None
        tasks, crits, seeds = select(cfg, split_list(args.tasks), named, split_list(args.seeds))
    except C.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    workdir = Path(args.workdir or R.resolve_path(cfg["run"].get("workdir", C.DEFAULT_WORKDIR))).resolve()
    results = Path(args.results or R.resolve_path(cfg["run"].get("results", C.DEFAULT_RESULTS))).resolve()
    replace_all = not (args.tasks or args.criterions or args.seeds or args.pretrain_seeds or args.experiment)
    if args.report_only:
        speed, _ = load_speed(args, results)
        md = write_outputs(cfg, results, [], {}, {}, speed, [], [], False, plots=not args.no_plots,
                           how="--report-only")
        log(md)
        return 0
    if args.merge:
        speed, _ = load_speed(args, results)
        try:
            rows, md = merge_pieces(cfg, results, split_list(args.merge), speed, plots=not args.no_plots)
        except C.ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        log(md)
        log(f"merged {len(rows)} rows of {args.merge} into {results}/quality.json, quality.md, "
            "quality_curves.json" + ("" if args.no_plots else " and the plots"))
        return 0
    # --force reruns what was asked for: with --criterions, not the controls added to it
    # (two pieces side by side would otherwise both rerun mle into the same directory)
    named = set(named or crits)
    forced = lambda crit: args.force and crit in named
    t_start = time.time()
    try:
        models = pretrain_seeds(cfg, args.pretrain_seeds)
    except ValueError:
        print(f"error: --pretrain-seeds: expected comma-separated integers, got {args.pretrain_seeds!r}",
              file=sys.stderr)
        return 2
    try:
        ids = pretrain_ids(models, args.pretrain_ids)
    except C.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    runs = plan_runs(cfg, tasks, crits, seeds, models)
    runs, skipped = check_runnable(cfg, runs, workdir)
    for message in skipped:
        log(f"skip: {message}")
    tasks = [t for t in tasks if any(r[0] == t for r in runs)]
    speed, speed_path = load_speed(args, results)

    # what still has to run (for the estimate and the list of what is left)
    all_pre = [(t, p) for t in tasks for p in models]
    todo_pre = [tp for tp in all_pre
                if args.force_pretrain or not (P.pretrain_dir(workdir, *tp) / "done.json").exists()]
    todo = [r for r in runs if forced(r[1]) or (r[0], r[3]) in todo_pre
            or not (P.run_dir(workdir, r[0], r[1], r[2], r[3]) / "result.json").exists()]
    est = P.estimate_plan(cfg, todo, todo_pre, speed)
    full_est = P.estimate_plan(cfg, runs, all_pre, speed)
    log(f"benchmark: {cfg['mode']} run; config {cfg['path']}; workdir {workdir}; results {results}")
    log(f"tasks: {', '.join(tasks) or 'none'}; criterions: {', '.join(crits)}; seeds: {seeds}; "
        f"pre-trained models (pre-training seeds): {models}"
        + (f" recorded as {[ids[p] for p in models]}" if any(ids[p] != p for p in models) else "") + "; "
        f"{len(runs)} fine-tuning runs ({len(todo)} to run, the rest cached)")
    log("estimated wall time (this 2-core CPU, nothing else running; step-time ratios from "
        + (f"{speed_path}" if speed else "the config's est_step_cost") + "):")
    for task in tasks:
        for p in models:
            pre = full_est["pretrain"].get((task, p), 0.0)
            log(f"  {task:<14} pre-train {p}: {fmt_duration(pre)}"
                + ("" if (task, p) in todo_pre else " (cached)"))
        for crit in crits:
            if (task, crit) in full_est["finetune"]:
                n = sum(1 for r in runs if r[:2] == (task, crit))
                left = sum(1 for r in todo if r[:2] == (task, crit))
                log(f"  {'':<14} {crit:<14} {n} x {fmt_duration(full_est['finetune'][(task, crit)] / n)}"
                    + (f" ({left} to run)" if left else " (cached)"))
    budget = cfg["run"].get("budget_s")
    log(f"  total {fmt_duration(full_est['total'])} from scratch"
        + (f" (budget {fmt_duration(budget)})" if budget else "")
        + f"; still to run: {fmt_duration(est['total'])}")
    if budget and full_est["total"] > budget:
        log(f"  WARNING: the estimate exceeds the budget by {fmt_duration(full_est['total'] - budget)}")
    if args.dry_run:
        return 0

    rows, curves, pretrains, failed = [], {}, {}, []
    for task in tasks:
        try:
            R.ensure_data(cfg, task, workdir)
            task_runs = [r for r in runs if r[0] == task]
            needs_emb = any("token_embeddings" in R.placeholders(P.criterion_flags(cfg, c, task))
                            for _, c, *_ in task_runs)
            if needs_emb:
                R.ensure_token_embeddings(cfg, task, workdir)
        except (RuntimeError, C.ConfigError) as e:
            log(f"error: {e}")
            failed.append(f"{task}: data: {str(e).splitlines()[0]}")
            continue
        for p in models:
            try:
                pre = pretrain(cfg, task, workdir, force=args.force_pretrain, pretrain_seed=p)
                pre = {**pre, "row": relabel(pre["row"], ids[p])}
                if not replace_all:  # a piece adds to quality.json: its model must be the one there
                    report.check_same_model(read_json(Path(results) / "quality.json", []) or [], pre["row"])
            except (RuntimeError, C.ConfigError) as e:
                log(f"error: {e}")
                failed.append(f"{task}: pre-training {p}: {str(e).splitlines()[0]}")
                continue
            pretrains.setdefault(task, pre)  # the curves' start point: the first model
            rows.append(pre["row"])
            append_row(results, pre["row"])
            keep_translations(results, pre["row"], pre.get("hyps"))
            for _, crit, seed, _ in (r for r in task_runs if r[3] == p):
                try:
                    res = finetune(cfg, task, crit, seed, workdir, pre, force=forced(crit) or args.force_pretrain,
                                   keep=args.keep_checkpoints, pretrain_seed=p)
                except RuntimeError as e:
                    log(f"error: {e}")
                    failed.append(f"{task} / {crit} / pretrain {p} / seed {seed}: {str(e).splitlines()[0]} "
                                  f"(see {P.run_dir(workdir, task, crit, seed, p) / 'train.log'})")
                    continue
                row = relabel(res["row"], ids[p])
                rows.append(row)
                curves[(task, crit, seed, ids[p])] = res["curve"]
                append_row(results, row)
                keep_translations(results, row, res.get("hyps"))

    md = write_outputs(cfg, results, rows, curves, pretrains, speed, skipped, failed, replace_all,
                       plots=not args.no_plots)
    log("")
    log(md)
    log(f"wrote {results}/quality.json, quality.md, quality_curves.json"
        + ("" if args.no_plots else ", quality_curves_*.png, cost_vs_gain.png")
        + f"; total {fmt_duration(time.time() - t_start)} (estimate was {fmt_duration(est['total'])})")
    return 1 if failed else 0


if __name__ == "__main__":
    quiet()  # the in-process fairseq import (flag checks) logs INFO lines and warnings
    sys.exit(main())
