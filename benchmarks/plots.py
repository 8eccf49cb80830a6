"""The quality benchmark's plots (matplotlib, Agg): validation curves during
fine-tuning per task (mean over runs ± std, from the pre-trained model's value),
and cost vs gain (step time vs MLE against the gain over MLE)."""

from pathlib import Path

from benchmarks.config import CONTROL, PRETRAIN
from benchmarks.report import step_ratio
from benchmarks.stats import mean_curve


def _pyplot():
    import logging

    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq's imports may set DEBUG
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(task_name, task_cfg, curves_by_crit, path, start=None, order=None):
    """Validation metric vs fine-tuning updates, mean over seeds (band: ± std).

    ``curves_by_crit``: {criterion: [curve per seed]}; ``start``: the
    pre-trained model's value, drawn at update 0 for every criterion.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for crit in order or sorted(curves_by_crit):
        if crit not in curves_by_crit:
            continue
        mean = mean_curve(curves_by_crit[crit])
        if start is not None:
            mean = [(0, start, None, 1)] + [p for p in mean if p[0] != 0]
        if not mean:
            continue
        xs = [p[0] for p in mean]
        ys = [p[1] for p in mean]
        style = dict(color="black", linestyle="--") if crit == CONTROL else {}
        n = max(p[3] for p in mean)
        (line,) = ax.plot(xs, ys, marker="o", markersize=3, label=f"{crit} (n={n})", **style)
        lo = [p[1] - (p[2] or 0.0) for p in mean]
        hi = [p[1] + (p[2] or 0.0) for p in mean]
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.12, linewidth=0)
    ax.set_xlabel("fine-tuning updates (from the pre-trained MLE model)")
    ax.set_ylabel(task_cfg.get("curve_label", task_cfg["curve_key"]))
    ax.set_title(f"{task_name}: validation during fine-tuning (mean over seeds ± std)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cost_gain_points(cfg, agg, speed):
    """[(task, criterion, step_time_vs_mle, gain, gain_std)]: gain = improvement over
    MLE in metric points (Δ for higher-is-better metrics, -Δ otherwise)."""
    points = []
    for task_name, by_crit in agg.items():
        task_cfg = cfg["tasks"].get(task_name)
        if task_cfg is None:
            continue
        sign = 1.0 if task_cfg["higher_is_better"] else -1.0
        for crit, e in by_crit.items():
            if crit == PRETRAIN or e.get("delta") is None:
                continue
            ratio = 1.0 if crit == CONTROL else step_ratio(speed, crit, task_name, cfg)
            if ratio is None:
                continue
            points.append((task_name, crit, ratio, sign * e["delta"], e.get("delta_std")))
    return points


def plot_cost_vs_gain(points, path):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    tasks = sorted({p[0] for p in points})
    markers = "osD^v<>"
    for i, task in enumerate(tasks):
        pts = [p for p in points if p[0] == task]
        ax.errorbar([p[2] for p in pts], [p[3] for p in pts],
                    yerr=[p[4] or 0.0 for p in pts], fmt=markers[i % len(markers)],
                    capsize=3, label=task)
        for p in pts:
            if p[1] != CONTROL or i == 0:  # label the control (1x, 0) once
                ax.annotate(p[1], (p[2], p[3]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axhline(0.0, color="gray", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("step time vs MLE (forward+backward, python -m benchmarks.speed)")
    ax.set_ylabel("gain over MLE (BLEU points; edit-error points removed)")
    ax.set_title("cost vs gain (mean over seeds; bars: std of the paired Δ)")
    ax.grid(alpha=0.3, which="both")
    if points:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no data (run benchmarks.speed and benchmarks.quality)", transform=ax.transAxes,
                ha="center")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
