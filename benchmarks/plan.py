"""What a benchmark runs, read off a loaded config: a criterion's flags, tasks, speed
settings, pre-phase, budget and control; where its runs live (run and pre-training
directories, curve keys); and how long a plan of runs should take (the wall-time
estimate quality.py prints first, from the config's est_* figures and speed.json)."""

import math
from pathlib import Path

from benchmarks.config import CONTROL
from benchmarks.report import step_ratio


def criterion_tasks(cfg, name):
    return list(cfg["criterions"][name].get("tasks", []))


def criterion_flags(cfg, name, task):
    """The criterion's flags on ``task`` (common flags, then per-task ones)."""
    crit = cfg["criterions"][name]
    return list(crit["flags"]) + list((crit.get("task_flags") or {}).get(task, []))


def criterion_settings(cfg, name):
    """Speed settings a criterion is timed in: those of its tasks, plus its ``speed`` list."""
    crit = cfg["criterions"][name]
    out = []
    for sname, setting in cfg["speed"]["settings"].items():
        real = "synthetic_vocab" not in setting
        if (real and setting["task"] in crit.get("tasks", [])) or sname in crit.get("speed", []):
            out.append(sname)
    return out


def setting_criterions(cfg, setting):
    """Criterions timed in a speed setting, MLE first, config order otherwise."""
    names = [n for n in cfg["criterions"] if setting in criterion_settings(cfg, n) or n == CONTROL]
    out = [CONTROL]
    for n in names:
        if n != CONTROL:
            pre = pre_phase_of(cfg, n)
            out += ([pre_phase_speed_name(n, pre)] if pre else []) + [n]
    return out


def pre_phase_speed_name(criterion, pre):
    """speed.json's name of a criterion's pre-phase step (e.g. ``erac_critic``)."""
    return f"{criterion}_{pre['name']}"


def speed_entry(cfg, name):
    """(criterion, phase) of a speed.json name: (name, None), or (criterion, "pre") for
    the pre-phase step of a criterion with a ``pre_phase``."""
    if name in cfg["criterions"]:
        return name, None
    for crit in cfg["criterions"]:
        pre = pre_phase_of(cfg, crit)
        if pre and pre_phase_speed_name(crit, pre) == name:
            return crit, "pre"
    raise KeyError(name)


def pre_phase_of(cfg, criterion):
    """The criterion's ``pre_phase`` table (a run before its fine-tuning run), or None."""
    return cfg["criterions"][criterion].get("pre_phase")


def pre_phase_flags(pre, task_name):
    """A pre-phase's flags on ``task_name``: its own, then its ``task_flags`` for the task."""
    return list(pre["flags"]) + list((pre.get("task_flags") or {}).get(task_name, []))


def pre_phase_updates(cfg, task_name, pre):
    """Updates of a pre-phase run: its own, or in --quick mode the task's (quick) fine-tuning updates."""
    return cfg["tasks"][task_name]["finetune_updates"] if cfg.get("mode") == "quick" else pre["updates"]


def finetune_updates(cfg, task_name, criterion):
    """Updates of a criterion's fine-tuning run: its own ``finetune_updates`` (a budget
    variant), else the task's; in --quick mode always the task's (quick) budget."""
    own = cfg["criterions"][criterion].get("finetune_updates")
    return cfg["tasks"][task_name]["finetune_updates"] if own is None or cfg.get("mode") == "quick" else own


def control_of(cfg, criterion):
    """The criterion a criterion's Δ pairs with: its ``control``, else the control (mle)."""
    return cfg["criterions"].get(criterion, {}).get("control", CONTROL)


# ---------------------------------------------------------------------------
# where runs live
# ---------------------------------------------------------------------------

def pretrain_dir(workdir, task_name, pretrain=1):
    """Where pre-trained model ``pretrain`` (its pre-training seed) of a task lives:
    WORKDIR/TASK/pretrain for seed 1 (the layout before there were several),
    WORKDIR/TASK/pretrain{N} otherwise."""
    return Path(workdir) / task_name / ("pretrain" if pretrain == 1 else f"pretrain{pretrain}")


def run_dir(workdir, task_name, criterion, seed, pretrain=1):
    """A fine-tuning run: WORKDIR/TASK/CRIT/seed{S} from pre-trained model 1,
    WORKDIR/TASK/CRIT/pretrain{N}_seed{S} from model N."""
    name = f"seed{seed}" if pretrain == 1 else f"pretrain{pretrain}_seed{seed}"
    return Path(workdir) / task_name / criterion / name


def curve_key(seed, pretrain=1):
    """quality_curves.json's key of a run: "S" from model 1, "pretrain{N}_seed{S}" from model N."""
    return str(seed) if pretrain == 1 else f"pretrain{pretrain}_seed{seed}"


def parse_curve_key(key):
    """(seed, pretrain) of a :func:`curve_key`."""
    if key.startswith("pretrain"):
        pre, seed = key[len("pretrain"):].split("_seed")
        return int(seed), int(pre)
    return int(key), 1


# ---------------------------------------------------------------------------
# wall-time estimate
# ---------------------------------------------------------------------------

def _flag_value(flags, name):
    for i, flag in enumerate(flags):
        if flag == name and i + 1 < len(flags):
            return flags[i + 1]
    return None


def estimate_pretrain_s(cfg, task_name):
    task = cfg["tasks"][task_name]
    spu = task.get("est_sec_per_update", 0.1)
    upe = task.get("est_updates_per_epoch", 100)
    flags = task["pretrain_flags"]
    max_update = _flag_value(flags, "--max-update")
    max_epoch = _flag_value(flags, "--max-epoch")
    updates = int(max_update) if max_update else int(max_epoch or 1) * upe
    epochs = max(1, math.ceil(updates / upe))
    interval = int(_flag_value(flags, "--validate-interval") or 1)
    n_valid = epochs // interval + (1 if epochs % interval else 0)
    return (cfg["run"].get("startup_s", 8) + updates * spu + n_valid * task.get("est_validate_s", 5)
            + task.get("est_eval_s", 30))


def estimate_finetune_s(cfg, task_name, criterion, speed=None):
    task = cfg["tasks"][task_name]
    ratio = step_ratio(speed, criterion, task_name, cfg)
    if ratio is None:
        ratio = cfg["criterions"][criterion].get("est_step_cost", 1.0)
    spu = task.get("est_sec_per_update", 0.1)
    updates = finetune_updates(cfg, task_name, criterion)
    n_valid = updates // task["validate_every"] if task.get("validate_every") else 1
    total = (cfg["run"].get("startup_s", 8) + updates * spu * ratio
             + n_valid * task.get("est_validate_s", 5) + task.get("est_eval_s", 30))
    pre = pre_phase_of(cfg, criterion)
    if pre:
        pre_ratio = step_ratio(speed, f"{criterion}_{pre['name']}", task_name, cfg)
        if pre_ratio is None:
            pre_ratio = pre.get("est_step_cost", ratio)
        pre_updates = pre_phase_updates(cfg, task_name, pre)
        pre_valid = pre_updates // task["validate_every"] if task.get("validate_every") else 1
        total += (cfg["run"].get("startup_s", 8) + pre_updates * spu * pre_ratio
                  + pre_valid * task.get("est_validate_s", 5))
    return total


def estimate_plan(cfg, runs, pretrains, speed=None):
    """Estimated seconds: {"total", "pretrain": {task: s}, "finetune": {(task, crit): s}}.

    ``runs``: (task, criterion, seed) still to run; ``pretrains``: tasks
    whose MLE model must still be trained (and evaluated).
    """
    pre = {}
    for t in pretrains:  # a task, or (task, pre-training seed)
        task = t[0] if isinstance(t, tuple) else t
        pre[t] = estimate_pretrain_s(cfg, task)
    fine = {}
    for task, crit, *_ in runs:  # (task, criterion, seed[, pretrain])
        fine[(task, crit)] = fine.get((task, crit), 0.0) + estimate_finetune_s(cfg, task, crit, speed)
    return {"total": sum(pre.values()) + sum(fine.values()), "pretrain": pre, "finetune": fine}
