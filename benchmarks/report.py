"""quality.json rows and the Markdown report: merging rows of pieces, refusing a piece
whose pre-trained model is another model than the one already recorded under its id,
and one table per task (mean ± std, Δ vs MLE with its interval over pre-trained models,
the sentence-level paired bootstrap, runs, wall time, measured step time vs MLE)."""

import math

from benchmarks.config import CONTROL, PRETRAIN, ConfigError
from benchmarks.stats import verdict


def check_same_model(old, pre_row):
    """A piece's pre-trained model must be the one whose rows ``old`` (quality.json)
    already pairs under its id: same task and pretrain id, same score. The id is the
    pre-training seed, and the same seed at another thread count (or after
    --force-pretrain) is another model; merging would pair its fine-tunes with the old
    model's controls. Raises :class:`ConfigError`."""
    key = (pre_row["task"], pre_row.get("pretrain", 1))
    for r in old:
        if r["criterion"] == PRETRAIN and (r["task"], r.get("pretrain", 1)) == key \
                and not math.isclose(r["value"], pre_row["value"], abs_tol=1e-9):
            raise ConfigError(
                f"{key[0]} pre-trained model {key[1]} scores {pre_row['value']:.4f} here but "
                f"{r['value']:.4f} in quality.json (OMP_NUM_THREADS {r.get('details', {}).get('omp_threads', '?')} "
                f"there, {pre_row.get('details', {}).get('omp_threads', '?')} here): another model; "
                "record it under a new id (--pretrain-ids) in its own --results, then --merge it")


def merge_rows(old, new, replace_all=False):
    """quality.json rows: ``new`` replaces rows of the same (task, criterion, pretrain, seed);
    with ``replace_all`` (a full run) only ``new`` is kept."""
    if replace_all:
        return list(new)
    key = lambda r: (r["task"], r["criterion"], r.get("pretrain", 1), r["seed"])  # noqa: E731
    fresh = {key(r) for r in new}
    return [r for r in old if key(r) not in fresh] + list(new)


def _fmt(value, digits=2, signed=False):
    if value is None:
        return "–"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def metric_title(task_cfg):
    if task_cfg["metric"] == "bleu":
        refs = "+".join(task_cfg["refs"])
        return (f"{task_cfg.get('eval_split', 'test')} BLEU (sacrebleu, refs {refs}, "
                f"beam {task_cfg['beam']}), higher is better")
    return (f"{task_cfg.get('eval_split', 'test')} character edit error % "
            f"({'greedy' if task_cfg['beam'] == 1 else 'beam ' + str(task_cfg['beam'])}), lower is better")


def markdown_report(cfg, agg, speed=None, skipped=(), failed=(), order=None, bootstrap=None, chrf=None):
    """Markdown: one table per task (criterion, mean ± std, Δ vs MLE, its 95% interval over
    pre-trained models, the paired bootstrap's verdicts per run pair (``bootstrap``, from
    significance.bootstrap_counts), runs, fine-tune wall s, step time vs MLE) plus skipped /
    failed runs. ``chrf``: :func:`stats.aggregate` of :func:`chrf_rows`; a task with such rows
    gets a last column, corpus chrF and its Δ with the interval ("–" for rows that kept none)."""
    lines = []
    order = order or list(cfg["criterions"])
    for task_name, task_cfg in cfg["tasks"].items():
        if task_name not in agg:
            continue
        by_crit = agg[task_name]
        task_chrf = (chrf or {}).get(task_name)
        lines.append(f"### {task_name}: {metric_title(task_cfg)}")
        lines.append("")
        lines.append("| criterion | metric (mean ± std) | Δ vs MLE (± std of paired Δ) | 95% CI of Δ over models "
                     "| bootstrap per pair (ahead/tie/behind) | runs (models × seeds) | updates | fine-tune wall s "
                     "| step time vs MLE |" + (" chrF: mean, Δ [95% CI] |" if task_chrf else ""))
        lines.append("|---|---|---|---|---|---|---|---|---|" + ("---|" if task_chrf else ""))
        if PRETRAIN in by_crit:
            e = by_crit[PRETRAIN]
            own = ", ".join(f"{v:.2f}" for v in e.get("models", {}).values())
            lines.append(f"| *pre-trained MLE (start point{'s' if e['n'] > 1 else ''})* | {_fmt(e['mean'])}"
                         + (f" ({own})" if e["n"] > 1 and own else "")
                         + f" | | | | {e['n']} model{'s' if e['n'] > 1 else ''} | {e['updates']} "
                         f"| {_fmt(e['wall_s'], 0)} (pre-training) | |")
        for crit in order:
            if crit not in by_crit:
                continue
            e = by_crit[crit]
            mean_std = _fmt(e["mean"]) + (f" ± {_fmt(e['std'])}" if e["std"] is not None else "")
            if crit == CONTROL:
                delta = "(control)"
            elif e["delta"] is None:
                delta = "–"
            else:
                delta = _fmt(e["delta"], signed=True) + (f" ± {_fmt(e['delta_std'])}" if e["delta_std"] is not None else "")
                if e.get("control", CONTROL) != CONTROL:
                    delta += f" (vs {e['control']})"
            ci = "–"
            if e.get("delta_ci95") is not None:
                ci = (f"[{_fmt(e['delta'] - e['delta_ci95'], signed=True)}, "
                      f"{_fmt(e['delta'] + e['delta_ci95'], signed=True)}]")
                word = verdict(e, task_cfg["higher_is_better"])
                ci += f" {word}" if word != "tie" else ""
                if word == "ahead":
                    ci = f"**{ci}**"
            counts = (bootstrap or {}).get(task_name, {}).get(crit)
            boot = "/".join(str(counts[k]) for k in ("ahead", "tie", "behind")) if counts else "–"
            runs = f"{e['n']} ({len(e['pretrains'])} × {len(e['seeds'])})"
            ratio = step_ratio(speed, crit, task_name, cfg)
            lines.append(f"| {crit} | {mean_std} | {delta} | {ci} | {boot} | {runs} | {e['updates']} "
                         f"| {_fmt(e['wall_s'], 0)} | {_fmt(ratio) + '×' if ratio is not None else '–'} |"
                         + (f" {_chrf_cell(task_chrf.get(crit), crit == CONTROL)} |" if task_chrf else ""))
        lines.append("")
    for what, items in (("Not run (skipped)", skipped), ("Failed", failed)):
        if items:
            lines.append(f"**{what}:**")
            lines.extend(f"- {item}" for item in items)
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def chrf_rows(cfg, rows):
    """The rows of BLEU tasks that kept corpus chrF against every reference (details
    ``chrf_REFS``, as benchmarks.evaluate.bleu_scores names it), with it as their value."""
    out = []
    for row in rows:
        task = cfg["tasks"].get(row["task"])
        if task is None or task["metric"] != "bleu":
            continue
        value = (row.get("details") or {}).get("chrf_" + "+".join(task["refs"]))
        if value is not None:
            out.append({**row, "metric": "chrf", "value": value})
    return out


def _chrf_cell(entry, is_control=False):
    """chrF mean, Δ vs the control and the interval over models (higher is better)."""
    if entry is None or entry.get("mean") is None:
        return "–"
    cell = _fmt(entry["mean"])
    if not is_control and entry.get("delta") is not None and entry.get("delta_n"):
        cell += f", {_fmt(entry['delta'], signed=True)}"
        if entry.get("delta_ci95") is not None:
            lo, hi = entry["delta"] - entry["delta_ci95"], entry["delta"] + entry["delta_ci95"]
            word = verdict(entry, True)
            cell += f" [{_fmt(lo, signed=True)}, {_fmt(hi, signed=True)}]" + (f" {word}" if word != "tie" else "")
    return cell


def step_ratio(speed, criterion, task_name, cfg):
    """Measured step time vs MLE of ``criterion`` in the speed setting covering ``task_name``."""
    if not speed or criterion not in speed or not isinstance(speed[criterion], dict):
        return None
    entry = speed[criterion]
    for sname, setting in cfg.get("speed", {}).get("settings", {}).items():
        if task_name in setting.get("covers", [setting["task"]]):
            by = entry.get("by_setting", {}).get(sname)
            if by and by.get("step_time_vs_mle") is not None:
                return by["step_time_vs_mle"]
    return None
