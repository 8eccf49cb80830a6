"""Statistics of quality.json rows: mean and sample std, Δ against the control paired by
(pre-trained model, seed), its 95% t interval over pre-trained models (the independent
units) and verdict, and mean curves."""

import math
import statistics

from benchmarks.config import CONTROL, PRETRAIN


def summarize(values):
    """{"n", "mean", "std"}: sample std (n-1), None when n < 2; mean None when n == 0."""
    values = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    n = len(values)
    return {"n": n, "mean": statistics.fmean(values) if n else None,
            "std": statistics.stdev(values) if n >= 2 else None}


# two-sided 95% Student t quantiles by degrees of freedom (normal beyond the table)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110,
        18: 2.101, 19: 2.093, 20: 2.086, 25: 2.060, 30: 2.042}


def t975(df):
    if df in T975:
        return T975[df]
    known = [k for k in T975 if k <= df]
    return T975[max(known)] if df <= 30 else 1.96


def run_key(row):
    """(pre-trained model, fine-tuning seed) of a quality.json row (pretrain 1 if absent)."""
    return (row.get("pretrain", 1), row["seed"])


def aggregate(rows, control=CONTROL, controls=None):
    """Per task and criterion: metric summary, Δ vs the control, wall time.

    Returns {task: {criterion: {"metric", "n", "mean", "std", "seeds",
    "pretrains", "delta", "delta_std", "delta_n", "delta_models",
    "delta_ci95", "delta_ci95_runs", "wall_s", "updates"}}}.  Runs pair by
    (pre-trained model, seed); ``delta_std`` is the std of the paired
    differences criterion − control.  Runs that share a pre-trained model are
    correlated, so the estimate and its interval count models, not runs:
    ``delta_models`` is each model's mean Δ over its seeds, ``delta`` their
    mean (the mean of all pairs when each model has as many seeds) and
    ``delta_ci95`` the half-width of the 95% t interval over them (None with
    < 2 models).  ``delta_ci95_runs`` is the old interval that took every run as
    independent (too narrow; kept to show which verdicts it changed).  For the
    pre-trained models' own rows (``PRETRAIN``) ``n`` counts the models.
    """
    groups = {}
    for row in rows:
        groups.setdefault(row["task"], {}).setdefault(row["criterion"], []).append(row)
    out = {}
    for task, by_crit in groups.items():
        out[task] = {}
        for crit, crit_rows in by_crit.items():
            values = {run_key(r): r["value"] for r in crit_rows}
            s = summarize(values.values())
            entry = {"metric": crit_rows[0]["metric"], **s, "seeds": sorted({k[1] for k in values}),
                     "pretrains": sorted({k[0] for k in values}),
                     "wall_s": summarize([r.get("wall_s") for r in crit_rows])["mean"],
                     "updates": crit_rows[0].get("updates")}
            own_control = (controls or {}).get(crit, control)
            ctrl = {run_key(r): r["value"] for r in by_crit.get(own_control, [])}
            entry["control"] = own_control
            none = dict(delta_std=None, delta_models={}, delta_ci95=None, delta_ci95_runs=None)
            if crit == control:
                entry.update(none, delta=0.0, delta_n=s["n"])
            elif crit != PRETRAIN and s["mean"] is not None:
                paired = {k: values[k] - ctrl[k] for k in values if k in ctrl}
                d = summarize(paired.values())
                by_model = {}
                for (model, _), diff in paired.items():
                    by_model.setdefault(model, []).append(diff)
                models = {m: statistics.fmean(v) for m, v in sorted(by_model.items())}
                entry.update(delta=statistics.fmean(models.values()) if models else None, delta_std=d["std"], delta_n=d["n"], delta_models=models,
                             delta_ci95=half_width(list(models.values())),
                             delta_ci95_runs=half_width(list(paired.values())))
            else:
                entry.update(none, delta=None, delta_n=0)
            if crit == PRETRAIN:  # each pre-trained model's own score
                entry["models"] = {k[0]: v for k, v in sorted(values.items())}
            out[task][crit] = entry
    return out


def half_width(values):
    """Half-width of the 95% t interval of the mean of ``values`` (None with < 2)."""
    s = summarize(values)
    return t975(s["n"] - 1) * s["std"] / math.sqrt(s["n"]) if s["std"] is not None else None


def verdict(entry, higher_is_better, key="delta_ci95"):
    """"ahead" / "behind" when the 95% interval of Δ excludes 0, else "tie" (None: fewer than
    two pre-trained models). ``key="delta_ci95_runs"``: the old verdict over runs."""
    if entry.get(key) is None or entry.get("delta") is None:
        return None
    lo, hi = entry["delta"] - entry[key], entry["delta"] + entry[key]
    if lo > 0 or hi < 0:
        better = (lo > 0) == higher_is_better
        return "ahead" if better else "behind"
    return "tie"


def mean_curve(curves):
    """Mean over runs at each update: [(updates, mean, std or None, n)].

    Updates logged by only some runs are kept with their own n.
    """
    by_update = {}
    for points in curves:
        for updates, value in points:
            by_update.setdefault(updates, []).append(value)
    out = []
    for updates in sorted(by_update):
        s = summarize(by_update[updates])
        out.append((updates, s["mean"], s["std"], s["n"]))
    return out
