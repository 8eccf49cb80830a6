"""The quality benchmark's plots (matplotlib, Agg): validation curves during
fine-tuning per task (mean over runs ± std, from the pre-trained model's value),
and cost vs gain (step time vs MLE against the gain over MLE), one panel per task.
Both show the main rows (config.toml's criterions); variants stay in the tables."""

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
    fig, ax = plt.subplots(figsize=(8.6, 4.4))
    colors = plt.get_cmap("tab20").colors
    for i, crit in enumerate(c for c in (order or sorted(curves_by_crit)) if c in curves_by_crit):
        mean = mean_curve(curves_by_crit[crit])
        if start is not None:
            mean = [(0, start, None, 1)] + [p for p in mean if p[0] != 0]
        if not mean:
            continue
        xs = [p[0] for p in mean]
        ys = [p[1] for p in mean]
        style = dict(color="black", linestyle="--") if crit == CONTROL else dict(color=colors[i % len(colors)])
        n = max(p[3] for p in mean)
        (line,) = ax.plot(xs, ys, marker="o", markersize=3, label=f"{crit} (n={n})", **style)
        lo = [p[1] - (p[2] or 0.0) for p in mean]
        hi = [p[1] + (p[2] or 0.0) for p in mean]
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.12, linewidth=0)
    ax.set_xlabel("fine-tuning updates (from the pre-trained MLE model)")
    ax.set_ylabel(task_cfg.get("curve_label", task_cfg["curve_key"]))
    ax.set_title(f"{task_name}: validation during fine-tuning (mean over runs ± std)")
    ax.grid(alpha=0.3)
    # outside the axes: a legend over the curves hid them
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
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
    """One panel per task (their metrics differ), criterion names beside their points."""
    plt = _pyplot()
    tasks = sorted({p[0] for p in points}) or ["(no data)"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 4.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        pts = sorted((p for p in points if p[0] == task and p[1] != CONTROL), key=lambda p: (p[2], p[3]))
        ax.errorbar([p[2] for p in pts], [p[3] for p in pts], yerr=[p[4] or 0.0 for p in pts], fmt="o",
                    capsize=3, markersize=4)
        for p in pts:
            ax.annotate(p[1], (p[2], p[3]), textcoords="offset points", xytext=(5, -3), fontsize=7)
        ax.axhline(0.0, color="gray", linewidth=0.8)  # MLE, the control
        ax.set_xscale("log")
        ax.set_xticks([1, 2, 4, 8, 16], ["1×", "2×", "4×", "8×", "16×"])
        ax.minorticks_off()
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("step time vs MLE")
        ax.grid(alpha=0.3, which="both")
        if not pts:
            ax.text(0.5, 0.5, "no data (run benchmarks.speed and benchmarks.quality)", transform=ax.transAxes,
                    ha="center")
    axes[0][0].set_ylabel("gain over MLE (BLEU points; edit-error points removed)")
    fig.suptitle("cost vs gain (mean Δ over runs; bars: std of the paired Δ)", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
