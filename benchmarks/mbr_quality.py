"""Beam search vs minimum Bayes risk decoding of the quality benchmark's fine-tuned checkpoints.

    python -m benchmarks.mbr_quality [--tasks bible_es_en] [--criterions mle,vaml] [--seeds 1,2]
        [--pretrain-seeds 1,2] [--pretrain-ids 4,5] [--candidates 16,32] [--utilities chrf,bleu]
        [--beam 5] [--mbr-seed 1] [--mbr-epsilon 0.02] [--workdir work/bench]
        [--results benchmarks/results] [--config benchmarks/config.toml] [--dry-run]
    python -m benchmarks.mbr_quality --report-only [--results benchmarks/results]

For every (task, criterion, pre-trained model, seed) whose fine-tuned checkpoint
``checkpoint_last.pt`` is still in its run directory (``benchmarks.quality
--keep-checkpoints`` keeps them; a missing one is skipped with a line), decode the
task's test split with beam search (``beam5``: benchmarks.evaluate.generate, the call
the quality benchmark scores with) and with MBR (``mbr_{utility}_{N}``: N epsilon
samples per source, ε = 0.02, ``--seed`` --mbr-seed, the utility scored at the task's
``--reward-level`` / ``--subword-style`` of its ``train_flags``: word BLEU on the
Bible's sentencepiece pieces, characters on spelling), and score each with the task's
metric (corpus BLEU against every reference together, the key quality.json records;
or the character edit error) and, for BLEU tasks, corpus chrF.

Each decode is cached in WORKDIR/TASK/CRIT/RUN/mbr/DECODER.json (+ .txt.gz, its
translations), keyed by the checkpoint's content hash and the decoding flags, so a
killed run resumes where it stopped.  Outputs: RESULTS/mbr.json (one row per
decode, merged into the rows already there), RESULTS/mbr.md (per task: mean metric,
Δ vs beam with the 95% t interval over pre-trained models as in stats.py, the paired
bootstrap's ahead/tie/behind over runs, decode wall time vs beam) and the
translations under RESULTS/translations/TASK/mbr/.
(``python benchmarks/mbr_quality.py ...`` runs the same.)
"""

if __name__ == "__main__" and not __package__:  # python benchmarks/mbr_quality.py: as python -m benchmarks.mbr_quality
    import os, sys  # noqa: E401
    _repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.execve(sys.executable, [sys.executable, "-m", "benchmarks.mbr_quality", *sys.argv[1:]],
              {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [_repo, os.environ.get("PYTHONPATH")]))})

import argparse  # noqa: E402
import hashlib  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import NamedTuple  # noqa: E402

from benchmarks import config as C, evaluate as E, plan as P, quality as Q, runs as R, stats  # noqa: E402
from benchmarks import significance as S  # noqa: E402
from benchmarks.util import fmt_duration, read_json, split_list, write_json  # noqa: E402

MBR = re.compile(r"^mbr_(?P<utility>[a-z0-9_]+)_(?P<n>\d+)$")
LEVEL_FLAGS = ("--reward-level", "--subword-style")  # how the task's train_flags score a reward


def log(msg=""):
    print(msg, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", default=str(C.DEFAULT_CONFIG))
    Q.add_run_selection(p, results="mbr.json")
    p.add_argument("--candidates", default="16,32", help="comma-separated MBR candidate counts N (default 16,32)")
    p.add_argument("--utilities", default="chrf,bleu", help="comma-separated MBR utilities, reward names "
                   "(default chrf,bleu)")
    p.add_argument("--beam", type=int, default=5, help="the beam of the baseline decoder beam{B} (default 5)")
    p.add_argument("--mbr-seed", type=int, default=1, help="fairseq-generate --seed of the MBR draws (default 1)")
    p.add_argument("--mbr-epsilon", type=float, default=0.02, help="ε of the epsilon sampling (default 0.02)")
    p.add_argument("--workdir", help="where benchmarks.quality's runs are (default: the config's, work/bench)")
    p.add_argument("--results", help="output directory (default: benchmarks/results)")
    p.add_argument("--dry-run", action="store_true",
                   help="print which checkpoints exist and which decodes are cached; run nothing")
    p.add_argument("--report-only", action="store_true", help="rewrite mbr.md from --results' mbr.json")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------
# what to decode
# ---------------------------------------------------------------------------

class Run(NamedTuple):
    task: str
    criterion: str
    pretrain_seed: int     # which run directory (plan.run_dir)
    pretrain: int          # the id its rows carry
    seed: int
    rdir: Path

    @property
    def checkpoint(self):
        return self.rdir / "checkpoint_last.pt"

    def name(self):
        pre = f"pretrain {self.pretrain_seed}"
        if self.pretrain != self.pretrain_seed:
            pre += f" (id {self.pretrain})"
        return f"{self.task} / {self.criterion} / {pre} / seed {self.seed}"


def beam_name(beam):
    return f"beam{beam}"


def mbr_name(utility, n):
    return f"mbr_{utility}_{n}"


def load(args):
    """The config with the experiment files defining criterions named in --criterions."""
    named = split_list(args.criterions) or []
    own = set(C.raw_config(args.config)[1]) if named else set()
    return C.load_config(args.config, experiments=C.experiments_defining(named, skip=own))


def _ints(text, flag, minimum=1):
    try:
        values = [int(x) for x in split_list(text) or []]
    except ValueError:
        raise C.ConfigError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < minimum:
        raise C.ConfigError(f"{flag}: expected comma-separated integers >= {minimum}, got {text!r}")
    return values


def select(cfg, args):
    """(tasks, criterions, {pre-training seed: id}, seeds, decoders) of the command line.
    Raises :class:`ConfigError` naming the flag."""
    tasks = split_list(args.tasks) or list(cfg["run"].get("tasks") or cfg["tasks"])
    for task in tasks:
        if task not in cfg["tasks"]:
            raise C.ConfigError(f"--tasks: unknown task '{task}'; known: {', '.join(cfg['tasks'])}")
    crits = split_list(args.criterions)
    for crit in crits or []:
        if crit not in cfg["criterions"]:
            raise C.ConfigError(f"--criterions: unknown criterion '{crit}'; known: {', '.join(cfg['criterions'])}")
    crits = crits or [c for c in cfg["criterions"] if any(t in P.criterion_tasks(cfg, c) for t in tasks)]
    seeds = _ints(args.seeds, "--seeds") if args.seeds else [int(s) for s in cfg["run"].get("seeds", [1])]
    models = _ints(args.pretrain_seeds, "--pretrain-seeds") if args.pretrain_seeds else Q.pretrain_seeds(cfg)
    ids = Q.pretrain_ids(models, args.pretrain_ids)
    if args.beam < 1:
        raise C.ConfigError(f"--beam: must be >= 1, got {args.beam}")
    candidates = _ints(args.candidates, "--candidates")
    utilities = split_list(args.utilities) or []
    from fairseq_seqlevel.rewards.registry import get_reward

    for utility in utilities:
        try:
            get_reward(utility)
        except ValueError as e:
            raise C.ConfigError(f"--utilities: {e}") from None
        if not MBR.match(mbr_name(utility, 1)):
            raise C.ConfigError(f"--utilities: {utility!r}: a registry reward name (lower case) only")
    if not 0 <= args.mbr_epsilon < 1:
        raise C.ConfigError(f"--mbr-epsilon: must be in [0, 1), got {args.mbr_epsilon}")
    decoders = [beam_name(args.beam)] + [mbr_name(u, n) for u in utilities for n in candidates]
    return tasks, crits, ids, seeds, list(dict.fromkeys(decoders))


def plan_runs(workdir, tasks, crits, ids, seeds):
    """Every selected run as a :class:`Run`: model-major, then seed-major (as quality.py)."""
    return [Run(t, c, p, ids[p], s, P.run_dir(workdir, t, c, s, p))
            for t in tasks for p in ids for s in seeds for c in crits]


def level_flags(task_cfg):
    """The task's ``--reward-level`` / ``--subword-style`` from its train_flags: the MBR
    utility is scored as the task's reward is (word BLEU on sentencepiece pieces)."""
    flags, out = list(task_cfg["train_flags"]), []
    for i, flag in enumerate(flags[:-1]):
        if flag in LEVEL_FLAGS:
            out += [flag, flags[i + 1]]
    return out


def decoder_args(task_cfg, decoder, mbr_seed=1, epsilon=0.02):
    """fairseq-generate flags of a decoder beyond benchmarks.evaluate.generate's own."""
    m = MBR.match(decoder)
    if not m:
        return []
    return ["--mbr-candidates", m["n"], "--mbr-utility", m["utility"], "--mbr-sampling", "epsilon",
            "--mbr-epsilon", str(epsilon), "--seed", str(mbr_seed), *level_flags(task_cfg)]


# ---------------------------------------------------------------------------
# decoding, cached per run directory
# ---------------------------------------------------------------------------

_HASHES = {}


def file_hash(path):
    """sha256 of a checkpoint's bytes (cached per path, size and mtime within a process)."""
    path = Path(path)
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def cache_paths(run, decoder):
    base = run.rdir / "mbr" / decoder
    return base.with_suffix(".json"), base.with_suffix(".txt.gz")


def cache_key(task_cfg, run, decoder, beam, args):
    """What a cached decode must match: the checkpoint's bytes, split, beam and flags."""
    return {"checkpoint_sha256": file_hash(run.checkpoint), "split": task_cfg.get("eval_split", "test"),
            "beam": beam, "args": list(args)}


def cached(run, decoder, key):
    """(entry, translations) of a finished decode with this key, else None."""
    meta, hyps_path = cache_paths(run, decoder)
    entry = read_json(meta)
    if not entry or entry.get("key") != key:
        return None
    hyps = S.read_translations(hyps_path)
    return (entry, hyps) if hyps is not None and len(hyps) == entry.get("sentences") else None


def score(task_cfg, hyps, refs):
    """(metric, value, scores): the quality benchmark's test metric of ``hyps``
    (BLEU against all references together, or edit error) and, for BLEU, chrF beside it."""
    for lang, ref in refs.items():
        if len(ref) != len(hyps):
            raise RuntimeError(f"{len(hyps)} hypotheses but {len(ref)} references ({lang})")
    if task_cfg["metric"] == "bleu":
        scores = E.bleu_scores(hyps, refs)
        tag = "+".join(refs)
        return "bleu", scores[f"bleu_{tag}"], {**scores, "chrf": scores[f"chrf_{tag}"]}
    scores = E.edit_error(hyps, refs)
    return "edit_error", scores["edit_error"], scores


def references(cfg, task):
    task_cfg = cfg["tasks"][task]
    return E.read_refs(R.resolve_path(task_cfg["data"]), task_cfg.get("eval_split", "test"), tuple(task_cfg["refs"]))


def decode(cfg, run, decoder, beam, args, refs):
    """Decode ``run``'s checkpoint with ``decoder`` (or read its cache); (entry, translations, fresh)."""
    task_cfg = cfg["tasks"][run.task]
    key = cache_key(task_cfg, run, decoder, beam, args)
    hit = cached(run, decoder, key)
    if hit:
        return (*hit, False)
    t0 = time.time()
    try:
        hyps = E.generate(R.resolve_path(task_cfg["data"]), run.checkpoint, split=key["split"], beam=beam,
                          extra_args=args)
    except SystemExit as e:  # evaluate.py exits with fairseq-generate's error
        raise RuntimeError(f"{decoder}: {e}") from None
    wall = time.time() - t0
    metric, value, scores = score(task_cfg, hyps, refs)
    entry = {"key": key, "decoder": decoder, "metric": metric, "value": value, "scores": scores,
             "wall_s": round(wall, 2), "sentences": len(hyps), "omp_threads": R.omp_threads(),
             "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    meta, hyps_path = cache_paths(run, decoder)
    S.write_translations(hyps_path, hyps)
    write_json(meta, entry)  # last: the json marks the decode finished
    return entry, hyps, True


def translations_path(results, run, decoder):
    name = f"{run.criterion}.p{run.pretrain}.s{run.seed}.{decoder}.txt.gz"
    return Path(results) / "translations" / run.task / "mbr" / name


def row_of(run, entry):
    scores = entry["scores"]
    details = {"wall_s": entry["wall_s"], "sentences": entry["sentences"], "args": entry["key"]["args"],
               "checkpoint_sha256": entry["key"]["checkpoint_sha256"], "omp_threads": entry.get("omp_threads"),
               **({"chrf": scores["chrf"]} if "chrf" in scores else {}), "scores": scores}
    if run.pretrain != run.pretrain_seed:
        details["pretrain_seed"] = run.pretrain_seed
    return {"task": run.task, "criterion": run.criterion, "pretrain": run.pretrain, "seed": run.seed,
            "decoder": entry["decoder"], "metric": entry["metric"], "value": entry["value"], "details": details}


def bootstrap(cfg, task, hyps, base_hyps, refs):
    """Paired bootstrap of a decoder's translations against the baseline's (Δ = decoder −
    baseline in metric units) with its verdict for the decoder."""
    metric = cfg["tasks"][task]["metric"]
    ref_lists = list(refs.values())
    result = S.paired_bootstrap(S.sentence_stats(hyps, ref_lists, metric),
                                S.sentence_stats(base_hyps, ref_lists, metric), metric)
    return {**result, "verdict": S.bootstrap_verdict(result, cfg["tasks"][task]["higher_is_better"])}


def decode_run(cfg, run, decoders, beam, mbr_seed, epsilon, results, refs):
    """Rows of every decoder of one run (the baseline first); (rows, failures)."""
    task_cfg = cfg["tasks"][run.task]
    rows, failed, translations = [], [], {}
    for decoder in decoders:
        args = decoder_args(task_cfg, decoder, mbr_seed, epsilon)
        try:
            entry, hyps, fresh = decode(cfg, run, decoder, beam, args, refs)
        except RuntimeError as e:
            log(f"error: {run.name()} / {decoder}: {str(e).strip()[-2000:]}")
            failed.append(f"{run.name()} / {decoder}: {str(e).strip().splitlines()[0]}")
            continue
        log(f"[{run.name()}] {decoder}: {entry['metric']} {entry['value']:.2f}"
            + (f", chrF {entry['scores']['chrf']:.2f}" if "chrf" in entry["scores"] else "")
            + (f" ({entry['wall_s']:.0f} s)" if fresh else " (cached)"))
        S.write_translations(translations_path(results, run, decoder), hyps)
        translations[decoder] = hyps
        rows.append(row_of(run, entry))
    base = decoders[0]
    for row in rows:
        if row["decoder"] != base and base in translations:
            row["details"]["bootstrap"] = bootstrap(cfg, run.task, translations[row["decoder"]],
                                                    translations[base], refs)
    return rows, failed


# ---------------------------------------------------------------------------
# rows, aggregation, report
# ---------------------------------------------------------------------------

def row_key(row):
    return (row["task"], row["criterion"], row.get("pretrain", 1), row["seed"], row["decoder"])


def merge_rows(old, new):
    """mbr.json rows: ``new`` replaces rows of the same (task, criterion, pretrain, seed, decoder)."""
    fresh = {row_key(r) for r in new}
    return [r for r in old if row_key(r) not in fresh] + list(new)


def decoder_order(name):
    """Baseline (beam) first, then MBR by utility and N."""
    m = MBR.match(name)
    return (1, m["utility"], int(m["n"])) if m else (0, name, 0)


def aggregate(rows, baseline):
    """{task: {criterion: {decoder: entry}}}: stats.aggregate's entry of each decoder's rows
    with the baseline decoder as the control (Δ = decoder − baseline, paired by
    (pre-trained model, seed), averaged per model, 95% t interval over models), plus
    ``chrf`` (the same for corpus chrF, BLEU tasks), ``bootstrap`` (ahead/tie/behind
    counts of the runs' paired bootstraps) and ``wall_ratio`` (mean over runs of the
    decode's wall time / the baseline's)."""
    groups = {}
    for row in rows:
        groups.setdefault((row["task"], row["criterion"]), []).append(row)
    out = {}
    for (task, crit), crit_rows in groups.items():
        as_crit = [{**r, "criterion": r["decoder"]} for r in crit_rows]
        entries = stats.aggregate(as_crit, control=baseline)[task]
        chrf_rows = [{**r, "value": r["details"]["chrf"]} for r in as_crit if r["details"].get("chrf") is not None]
        chrf = stats.aggregate(chrf_rows, control=baseline).get(task, {}) if chrf_rows else {}
        base_wall = {stats.run_key(r): r["details"].get("wall_s") for r in crit_rows if r["decoder"] == baseline}
        for decoder, entry in entries.items():
            own = [r for r in crit_rows if r["decoder"] == decoder]
            counts = {"ahead": 0, "tie": 0, "behind": 0}
            for r in own:
                verdict = (r["details"].get("bootstrap") or {}).get("verdict")
                if verdict in counts:
                    counts[verdict] += 1
            ratios = [r["details"]["wall_s"] / base_wall[stats.run_key(r)] for r in own
                      if r["details"].get("wall_s") and base_wall.get(stats.run_key(r))]
            entry.update(chrf=chrf.get(decoder), bootstrap=counts if sum(counts.values()) else None,
                         wall_ratio=statistics.fmean(ratios) if ratios else None,
                         wall_s=stats.summarize([r["details"].get("wall_s") for r in own])["mean"])
        out.setdefault(task, {})[crit] = dict(sorted(entries.items(), key=lambda kv: decoder_order(kv[0])))
    return out


def _num(value, signed=False):
    if value is None:
        return "–"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def delta_cell(entry, higher_is_better):
    """"+1.20 [+0.70, +1.70] ahead" (bold when ahead), "+1.20 (1 model)" without an interval."""
    if entry.get("delta") is None:
        return "–"
    if entry.get("delta_ci95") is None:
        return f"{_num(entry['delta'], True)} ({len(entry.get('delta_models') or {})} model, no interval)"
    lo, hi = entry["delta"] - entry["delta_ci95"], entry["delta"] + entry["delta_ci95"]
    text = f"{_num(entry['delta'], True)} [{_num(lo, True)}, {_num(hi, True)}]"
    word = stats.verdict(entry, higher_is_better)
    if word == "ahead":
        return f"**{text} ahead**"
    return text + (" behind" if word == "behind" else "")


def metric_title(task_cfg):
    split = task_cfg.get("eval_split", "test")
    if task_cfg["metric"] == "bleu":
        return f"{split} BLEU (sacrebleu, refs {'+'.join(task_cfg['refs'])}), higher is better"
    return f"{split} character edit error %, lower is better"


def markdown(cfg, agg, baseline, order=None):
    """One table per task: rows (criterion, decoder); mean metric ± std, Δ vs the baseline
    with its 95% interval over pre-trained models, chrF and its Δ (BLEU tasks), the paired
    bootstrap's ahead/tie/behind over runs, runs, decode wall time vs the baseline."""
    lines = []
    for task, task_cfg in cfg["tasks"].items():
        if task not in agg:
            continue
        bleu = task_cfg["metric"] == "bleu"
        higher = task_cfg["higher_is_better"]
        lines += [f"### {task}: {metric_title(task_cfg)}", ""]
        head = ["criterion", "decoder", "metric (mean ± std)", f"Δ vs {baseline} [95% CI over models]"]
        if bleu:
            head += ["chrF (mean)", f"Δ chrF vs {baseline} [95% CI]"]
        head += [f"bootstrap per run vs {baseline} (ahead/tie/behind)", "runs (models × seeds)",
                 "decode wall s", f"wall vs {baseline}"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        crits = [c for c in (order or []) if c in agg[task]] + [c for c in agg[task] if c not in (order or [])]
        for crit in crits:
            for decoder, e in agg[task][crit].items():
                base = decoder == baseline
                cells = [crit, decoder, _num(e["mean"]) + (f" ± {_num(e['std'])}" if e["std"] is not None else ""),
                         "(baseline)" if base else delta_cell(e, higher)]
                if bleu:
                    c = e.get("chrf") or {}
                    cells += [_num(c.get("mean")), "" if base else delta_cell(c, True) if c else "–"]
                counts = e.get("bootstrap")
                boot = "/".join(str(counts[k]) for k in ("ahead", "tie", "behind")) if counts else "–"
                cells += ["" if base else boot,
                          f"{e['n']} ({len(e['pretrains'])} × {len(e['seeds'])})",
                          f"{e['wall_s']:.1f}" if e.get("wall_s") is not None else "–",
                          "" if base else (f"{e['wall_ratio']:.2f}×" if e.get("wall_ratio") is not None else "–")]
                lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def header(baseline, how):
    return "\n".join([
        f"<!-- generated by python -m benchmarks.mbr_quality ({how}, {time.strftime('%Y-%m-%d %H:%M')}); "
        "do not edit by hand -->",
        "",
        f"Decoding the test split of the quality benchmark's fine-tuned checkpoints with beam search "
        f"(`{baseline}`, the decode quality.json scores with; spelling's quality.json uses greedy) and with "
        "minimum Bayes risk decoding (`mbr_UTILITY_N`: N epsilon samples per source, ε = 0.02, the candidate of "
        "highest expected utility against the others, utility at the task's reward level; docs/mbr.md). "
        f"Δ: decoder − {baseline} on the same checkpoint, averaged per pre-trained model, then over models, "
        "with the 95% t interval over models (one model: no interval); **ahead** when it excludes 0 in the "
        "better direction (lower edit error, higher BLEU / chrF). Bootstrap: sacrebleu-style paired bootstrap "
        f"over the test sentences (1,000 resamples) of each run's decode against its {baseline} decode. "
        "Wall: one fairseq-generate process (start-up and model loading included), mean over runs of the ratio.",
        "",
        "",
    ])


def write_outputs(cfg, results, rows, baseline, order=None, how="run"):
    results = Path(results)
    path = results / "mbr.json"
    all_rows = merge_rows(read_json(path, []) or [], rows)
    write_json(path, all_rows)
    md = header(baseline, how) + markdown(cfg, aggregate([r for r in all_rows if r["task"] in cfg["tasks"]], baseline),
                                          baseline, order)
    (results / "mbr.md").write_text(md)
    return md


# ---------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    try:
        cfg = load(args)
        tasks, crits, ids, seeds, decoders = select(cfg, args)
    except C.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    workdir = Path(args.workdir or R.resolve_path(cfg["run"].get("workdir", C.DEFAULT_WORKDIR))).resolve()
    results = Path(args.results or C.DEFAULT_RESULTS).resolve()
    baseline = decoders[0]
    if args.report_only:
        log(write_outputs(cfg, results, [], baseline, crits, "--report-only"))
        return 0
    runs = plan_runs(workdir, tasks, crits, ids, seeds)
    present = [r for r in runs if r.checkpoint.exists()]
    log(f"mbr_quality: workdir {workdir}; results {results}; decoders {', '.join(decoders)} "
        f"(MBR: epsilon sampling ε = {args.mbr_epsilon}, --seed {args.mbr_seed}); "
        f"{len(present)} of {len(runs)} checkpoints present")
    for run in runs:
        if run not in present:
            log(f"skip: {run.name()}: no {run.checkpoint} (benchmarks.quality deletes it unless run with "
                "--keep-checkpoints)")
    if not present:
        print(f"error: --workdir {workdir}: no fine-tuned checkpoint_last.pt for any selected run "
              f"(--tasks {','.join(tasks)} --criterions {','.join(crits)} --pretrain-seeds "
              f"{','.join(map(str, ids))} --seeds {','.join(map(str, seeds))}); keep them with "
              "benchmarks.quality --keep-checkpoints", file=sys.stderr)
        return 2
    if args.dry_run:
        todo = 0
        for run in present:
            state = []
            for decoder in decoders:
                key = cache_key(cfg["tasks"][run.task], run, decoder, args.beam,
                                decoder_args(cfg["tasks"][run.task], decoder, args.mbr_seed, args.mbr_epsilon))
                hit = cached(run, decoder, key) is not None
                todo += not hit
                state.append(f"{decoder} {'cached' if hit else 'to run'}")
            log(f"  {run.name()}: {', '.join(state)}")
        log(f"{todo} decodes to run, {len(present) * len(decoders) - todo} cached")
        return 0

    t_start = time.time()
    rows, failed, refs = [], [], {}
    for run in present:
        try:
            if run.task not in refs:
                refs[run.task] = references(cfg, run.task)
        except SystemExit as e:  # read_refs: a missing reference file
            print(f"error: --tasks {run.task}: {e}", file=sys.stderr)
            return 2
        run_rows, run_failed = decode_run(cfg, run, decoders, args.beam, args.mbr_seed, args.mbr_epsilon,
                                          results, refs[run.task])
        rows += run_rows
        failed += run_failed
        path = results / "mbr.json"  # as soon as a run is scored: an interrupted run keeps it
        write_json(path, merge_rows(read_json(path, []) or [], run_rows))
    md = write_outputs(cfg, results, rows, baseline, crits)
    log("")
    log(md)
    for item in failed:
        log(f"failed: {item}")
    log(f"wrote {results}/mbr.json, mbr.md, translations/*/mbr/; total {fmt_duration(time.time() - t_start)}")
    return 1 if failed else 0


if __name__ == "__main__":
    from benchmarks.fixtures import quiet

    quiet()
    sys.exit(main())
