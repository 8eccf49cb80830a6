"""Shared, mostly pure functions of the benchmark harness.

* configuration: :func:`load_config` (tomllib + validation + ``--quick``
  overrides), :func:`expand` (placeholders), :func:`check_criterion` (does
  fairseq know this criterion and these flags?);
* inputs: :func:`ensure_data`, :func:`ensure_token_embeddings` (run the
  config's commands that build them when missing);
* commands: :func:`train_command`, :func:`pretrain_command`,
  :func:`finetune_command`;
* logs: :func:`parse_log`, :func:`curve`, :func:`mean_curve`;
* results: :func:`summarize`, :func:`aggregate`, :func:`markdown_report`,
  :func:`merge_rows`;
* budget: :func:`estimate_plan`;
* plots: :func:`plot_curves`, :func:`plot_cost_vs_gain` (matplotlib, Agg).

Nothing here starts a training run; ``quality.py`` and ``speed.py`` do.
"""

import contextlib
import copy
import difflib
import fcntl
import io
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
USER_DIR = REPO / "fairseq_seqlevel"
DEFAULT_CONFIG = REPO / "benchmarks" / "config.toml"
DEFAULT_RESULTS = REPO / "benchmarks" / "results"
DEFAULT_WORKDIR = REPO / "work" / "bench"

CONTROL = "mle"               # the criterion every other one is compared with
PRETRAIN = "mle_pretrain"     # quality.json rows of the pre-trained start point
METRICS = {"bleu", "edit"}

TASK_KEYS = {
    # key: (required, type)
    "data": (True, str), "prepare": (False, list), "check_file": (False, str),
    "target_lang": (False, str), "train_flags": (True, list), "model_flags": (True, list),
    "optim_flags": (True, list), "pretrain_flags": (True, list), "finetune_flags": (False, list),
    "finetune_updates": (True, int), "validate_every": (False, int), "metric": (True, str),
    "refs": (True, list), "beam": (True, int), "eval_split": (False, str),
    "curve_key": (True, str), "curve_scale": (False, (int, float)), "curve_label": (False, str),
    "higher_is_better": (True, bool), "est_sec_per_update": (False, (int, float)),
    "est_updates_per_epoch": (False, int), "est_validate_s": (False, (int, float)),
    "est_eval_s": (False, (int, float)), "quick": (False, dict),
}
CRITERION_KEYS = {
    "flags": (True, list), "task_flags": (False, dict), "tasks": (True, list), "finetune_flags": (False, list),
    "speed": (False, list), "speed_targets": (False, list), "est_step_cost": (False, (int, float)),
    "notes": (True, str), "pre_phase": (False, dict),
    # a variant with its own budget: its updates, and the criterion its Δ pairs with
    # (that criterion must have the same budget)
    "finetune_updates": (False, int), "control": (False, str),
    # the criterion whose flags, task_flags, finetune_flags and pre_phase it takes (unless set)
    "like": (False, str),
    # a diagnostic variant --quick leaves out of its default selection (it runs when named)
    "skip_quick": (False, bool),
    # the updates of the pre_phase it has (its own or its base's), the rest of that pre_phase unchanged
    "pre_phase_updates": (False, int),
}
LIKE_KEYS = ("flags", "task_flags", "finetune_flags", "pre_phase")
PRE_PHASE_KEYS = {  # [criterions.NAME.pre_phase]: a run before the fine-tuning run (erac's critic)
    "name": (True, str), "flags": (True, list), "updates": (True, int),
    "finetune_flags": (False, list), "est_step_cost": (False, (int, float)),
    "task_flags": (False, dict),
}
SETTING_KEYS = {
    "task": (True, str), "covers": (False, list), "batches": (False, int),
    "synthetic_vocab": (False, int), "synthetic_sentences": (False, int),
    "synthetic_len": (False, list), "checkpoint": (False, str),
}
SAMPLER_KEYS = {  # [speed.sampler]: decoding.sampler vs fairseq's SequenceGenerator
    "setting": (True, str), "samples": (False, int), "max_len_a": (False, (int, float)),
    "max_len_b": (False, int), "batches": (False, int), "max_ratio": (False, (int, float)),
}


class ConfigError(ValueError):
    """A problem with the benchmark configuration (message lists every problem)."""


# ---------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------

def _check_table(where, table, spec, errors):
    if not isinstance(table, dict):
        errors.append(f"{where}: expected a table, got {type(table).__name__}")
        return
    for key in table:
        if key not in spec:
            hint = difflib.get_close_matches(key, list(spec), n=1)
            errors.append(f"{where}: unknown key '{key}'"
                          + (f" (did you mean '{hint[0]}'?)" if hint else f"; known: {', '.join(spec)}"))
    for key, (required, kind) in spec.items():
        if key not in table:
            if required:
                errors.append(f"{where}: missing key '{key}'")
            continue
        value = table[key]
        if kind is int and isinstance(value, bool) or not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            errors.append(f"{where}.{key}: expected {names}, got {value!r}")
        elif kind is list and key.endswith("flags") and not all(isinstance(v, str) for v in value):
            errors.append(f"{where}.{key}: flags must be strings, got {value!r}")


def criterion_of(flags):
    """The value of ``--criterion`` in a flag list (None if absent)."""
    for i, flag in enumerate(flags):
        if flag == "--criterion" and i + 1 < len(flags):
            return flags[i + 1]
        if flag.startswith("--criterion="):
            return flag.split("=", 1)[1]
    return None


def validate_config(raw):
    """List of problems of a raw (parsed TOML) configuration; empty if fine."""
    errors = []
    tasks, crits = raw.get("tasks"), raw.get("criterions")
    if not isinstance(tasks, dict) or not tasks:
        errors.append("config: needs at least one [tasks.NAME] table")
        tasks = {}
    if not isinstance(crits, dict) or not crits:
        errors.append("config: needs at least one [criterions.NAME] table")
        crits = {}
    if crits and CONTROL not in crits:
        errors.append(f"config: needs a [criterions.{CONTROL}] table (the control)")
    settings = (raw.get("speed") or {}).get("settings") or {}
    for name, task in tasks.items():
        where = f"tasks.{name}"
        _check_table(where, task, TASK_KEYS, errors)
        if not isinstance(task, dict):
            continue
        if task.get("metric") not in METRICS:
            errors.append(f"{where}.metric: must be one of {sorted(METRICS)}, got {task.get('metric')!r}")
        if isinstance(task.get("finetune_updates"), int) and task["finetune_updates"] < 1:
            errors.append(f"{where}.finetune_updates: must be >= 1")
        quick = task.get("quick", {})
        if isinstance(quick, dict):
            for key in quick:
                if key not in TASK_KEYS or key == "quick":
                    errors.append(f"{where}.quick: unknown key '{key}'")
    for name, crit in crits.items():
        where = f"criterions.{name}"
        _check_table(where, crit, CRITERION_KEYS, errors)
        if not isinstance(crit, dict):
            continue
        if isinstance(crit.get("flags"), list) and criterion_of(crit["flags"]) is None:
            errors.append(f"{where}.flags: no '--criterion NAME'")
        if isinstance(crit.get("finetune_updates"), int) and crit["finetune_updates"] < 1:
            errors.append(f"{where}.finetune_updates: must be >= 1")
        if "control" in crit and isinstance(crit["control"], str):
            other = crits.get(crit["control"])
            if not isinstance(other, dict) or crit["control"] == name:
                errors.append(f"{where}.control: unknown criterion '{crit['control']}'")
            elif other.get("finetune_updates") != crit.get("finetune_updates"):
                errors.append(f"{where}.control: '{crit['control']}' has another budget "
                              f"(finetune_updates {other.get('finetune_updates')} vs {crit.get('finetune_updates')})")
        if "like" in crit and isinstance(crit["like"], str):
            base = crits.get(crit["like"])
            if not isinstance(base, dict) or crit["like"] == name or "like" in base:
                errors.append(f"{where}.like: '{crit['like']}' is not a criterion without its own 'like'")
        if "pre_phase_updates" in crit and "pre_phase" not in crit:
            errors.append(f"{where}.pre_phase_updates: no pre_phase (its own or its 'like' base's) to set")
        if "pre_phase" in crit:
            pre = crit["pre_phase"]
            _check_table(f"{where}.pre_phase", pre, PRE_PHASE_KEYS, errors)
            if isinstance(pre, dict):
                if isinstance(pre.get("flags"), list) and criterion_of(pre["flags"]) is None:
                    errors.append(f"{where}.pre_phase.flags: no '--criterion NAME'")
                if isinstance(pre.get("updates"), int) and pre["updates"] < 1:
                    errors.append(f"{where}.pre_phase.updates: must be >= 1")
                if isinstance(pre.get("name"), str) and not re.fullmatch(r"[A-Za-z0-9_]+", pre["name"]):
                    errors.append(f"{where}.pre_phase.name: letters, digits and _ only, got {pre['name']!r}")
                for task, flags in (pre.get("task_flags") or {}).items():
                    if task not in tasks:
                        errors.append(f"{where}.pre_phase.task_flags: unknown task '{task}'")
                    elif not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
                        errors.append(f"{where}.pre_phase.task_flags.{task}: expected a list of strings")
        for task in crit.get("tasks", []) if isinstance(crit.get("tasks"), list) else []:
            if task not in tasks:
                errors.append(f"{where}.tasks: unknown task '{task}' (tasks: {', '.join(tasks)})")
        for task, flags in (crit.get("task_flags") or {}).items():
            if task not in tasks:
                errors.append(f"{where}.task_flags: unknown task '{task}'")
            elif not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
                errors.append(f"{where}.task_flags.{task}: expected a list of strings")
        for setting in crit.get("speed", []) if isinstance(crit.get("speed"), list) else []:
            if setting not in settings:
                errors.append(f"{where}.speed: unknown speed setting '{setting}' "
                              f"(settings: {', '.join(settings) or 'none'})")
        for target in crit.get("speed_targets", []) if isinstance(crit.get("speed_targets"), list) else []:
            if not isinstance(target, dict) or target.get("setting") not in settings:
                errors.append(f"{where}.speed_targets: {target!r}: 'setting' must name a speed setting")
                continue
            if not isinstance(target.get("max_ratio"), (int, float)) or target["max_ratio"] <= 0:
                errors.append(f"{where}.speed_targets: {target!r}: needs max_ratio > 0")
            if target.get("vs", CONTROL) not in crits:
                errors.append(f"{where}.speed_targets: {target!r}: unknown criterion vs='{target.get('vs')}'")
    for name, setting in settings.items():
        where = f"speed.settings.{name}"
        _check_table(where, setting, SETTING_KEYS, errors)
        if isinstance(setting, dict):
            if setting.get("task") not in tasks:
                errors.append(f"{where}.task: unknown task {setting.get('task')!r}")
            for task in setting.get("covers", []):
                if task not in tasks:
                    errors.append(f"{where}.covers: unknown task '{task}'")
    for section in ("run", "quick"):  # the default task selection of a full / --quick run
        chosen = (raw.get(section) or {}).get("tasks")
        if chosen is not None and (not isinstance(chosen, list) or not all(t in tasks for t in chosen)):
            errors.append(f"{section}.tasks: expected a list of task names (tasks: {', '.join(tasks)}), got {chosen!r}")
    sampler = (raw.get("speed") or {}).get("sampler")
    if sampler is not None:
        _check_table("speed.sampler", sampler, SAMPLER_KEYS, errors)
        if isinstance(sampler, dict) and sampler.get("setting") not in settings:
            errors.append(f"speed.sampler.setting: unknown speed setting {sampler.get('setting')!r}")
    return errors


def load_config(path=DEFAULT_CONFIG, quick=False):
    """Parse, validate and resolve a config file.

    The result is the raw TOML plus ``mode`` ("full"/"quick") and, with
    ``quick``, every ``quick`` sub-table merged over its parent.
    Raises :class:`ConfigError` listing every problem.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    for crit in (raw.get("criterions") or {}).values():  # a variant takes its base's flags
        base = (raw.get("criterions") or {}).get(crit.get("like")) if isinstance(crit, dict) else None
        if isinstance(base, dict) and "like" not in base:
            for key in LIKE_KEYS:
                if key in base and key not in crit:
                    crit[key] = copy.deepcopy(base[key])
        if isinstance(crit, dict) and isinstance(crit.get("pre_phase"), dict) and "pre_phase_updates" in crit:
            crit["pre_phase"]["updates"] = crit["pre_phase_updates"]
    errors = validate_config(raw)
    if errors:
        raise ConfigError(f"{path}:\n  " + "\n  ".join(errors))
    cfg = copy.deepcopy(raw)
    cfg["path"] = str(path)
    cfg["mode"] = "quick" if quick else "full"
    cfg.setdefault("run", {})
    cfg.setdefault("speed", {}).setdefault("settings", {})
    for task in cfg["tasks"].values():
        overrides = task.pop("quick", {})
        if quick:
            task.update(overrides)
    for section in ("run", "speed"):
        overrides = cfg[section].pop("quick", {})
        if quick:
            cfg[section].update(overrides)
    if quick:
        cfg["run"].update(cfg.get("quick", {}))
    return cfg


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


PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")


def placeholders(flags):
    """Names of the {placeholders} used in a flag list."""
    return {m.group(1) for flag in flags for m in PLACEHOLDER.finditer(flag)}


def expand(flags, mapping):
    """Replace {name} placeholders; unknown names raise :class:`ConfigError`."""
    def sub(match):
        key = match.group(1)
        if key not in mapping:
            raise ConfigError(f"unknown placeholder {{{key}}} in {flags!r} "
                              f"(known: {', '.join('{' + k + '}' for k in sorted(mapping))})")
        return str(mapping[key])

    return [PLACEHOLDER.sub(sub, str(flag)) for flag in flags]


def task_mapping(cfg, task_name, workdir, token_embeddings=None):
    """Placeholder values of one task."""
    task = cfg["tasks"][task_name]
    return {
        "python": sys.executable, "repo": REPO, "workdir": workdir,
        "data": resolve_path(task["data"]),
        "token_embeddings": token_embeddings or token_embeddings_path(cfg, task_name, workdir),
    }


def resolve_path(path):
    path = Path(path)
    return path if path.is_absolute() else REPO / path


def token_embeddings_path(cfg, task_name, workdir):
    lang = cfg["tasks"][task_name].get("target_lang", "tgt")
    return Path(workdir) / task_name / f"token_embeddings.{lang}.txt"


# ---------------------------------------------------------------------------
# data and token embeddings (quality.py and speed.py)
# ---------------------------------------------------------------------------

def ensure_data(cfg, task_name, logdir):
    """The task's data directory, prepared with its ``prepare`` command if ``check_file`` is missing."""
    task = cfg["tasks"][task_name]
    data = resolve_path(task["data"])
    check = data / task.get("check_file", "")
    if data.is_dir() and check.exists():
        return data
    if not task.get("prepare"):
        raise RuntimeError(f"{task_name}: data {data} missing and no 'prepare' command in the config")
    # two lanes started together on a task whose data is missing: the second waits for the first's
    # preparation instead of failing on its half-built directory
    data.parent.mkdir(parents=True, exist_ok=True)
    with open(data.parent / f".{data.name}.prepare.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if data.is_dir() and check.exists():
            return data
        cmd = expand(task["prepare"], task_mapping(cfg, task_name, logdir))
        print(f"[{task_name}] preparing data: {command_text(cmd)}", flush=True)
        code, _ = run_logged(cmd, Path(logdir) / task_name / "prepare.log")
    if code != 0 or not check.exists():
        raise RuntimeError(f"{task_name}: data preparation failed:\n"
                           + log_tail(Path(logdir) / task_name / "prepare.log"))
    return data


def ensure_token_embeddings(cfg, task_name, workdir):
    """The task's token embeddings (``{token_embeddings}``), built on first use."""
    path = token_embeddings_path(cfg, task_name, workdir)
    if path.exists():
        return path
    task = cfg["tasks"][task_name]
    path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(REPO / "examples" / "build_token_embeddings.py"),
           "--data", str(resolve_path(task["data"])), "--lang", task.get("target_lang", "tgt"),
           "--out", str(path)]
    print(f"[{task_name}] building token embeddings: {command_text(cmd)}", flush=True)
    code, _ = run_logged(cmd, path.with_suffix(".log"))
    if code != 0:
        raise RuntimeError(f"{task_name}: building token embeddings failed:\n"
                           + log_tail(path.with_suffix(".log")))
    return path


# ---------------------------------------------------------------------------
# does fairseq know a criterion and its flags?
# ---------------------------------------------------------------------------

def _import_plugin():
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import fairseq_seqlevel  # noqa: F401  (registers the plugin's criterions)


def known_criterions():
    _import_plugin()
    from fairseq.criterions import CRITERION_REGISTRY

    return sorted(CRITERION_REGISTRY)


def check_fairseq_args(argv):
    """None if fairseq-train would accept ``argv`` (argument parsing only), else a message.

    Unknown flags are reported with the closest known flag.
    """
    _import_plugin()
    from fairseq import options

    argv = [str(a) for a in argv]
    parser = options.get_training_parser()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            _, extra = options.parse_args_and_arch(parser, argv, parse_known=True)
    except SystemExit:
        return _argparse_message(err.getvalue())
    except Exception as e:  # fairseq raises RuntimeError for an unknown --arch, etc.
        return f"{type(e).__name__}: {e}"
    unknown = [a for a in extra if a.startswith("-")]
    if unknown:
        known = [s for s in parser._option_string_actions if s.startswith("--")]
        parts = []
        for flag in unknown:
            hint = difflib.get_close_matches(flag.split("=")[0], known, n=1, cutoff=0.6)
            parts.append(flag + (f" (did you mean {hint[0]}?)" if hint else ""))
        return "unknown flag(s): " + ", ".join(parts)
    if extra:
        return f"unexpected argument(s): {' '.join(extra)}"
    parser = options.get_training_parser()
    try:  # a second, strict parse: bad values (choices, types)
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            options.parse_args_and_arch(parser, argv)
    except SystemExit:
        return _argparse_message(err.getvalue())
    return None


def _argparse_message(text):
    lines = [l for l in text.strip().splitlines() if l.strip()]
    errors = [l for l in lines if "error:" in l]
    return (errors[-1] if errors else (lines[-1] if lines else "argument parsing failed")).split("error: ", 1)[-1]


def check_criterion(cfg, name, task_name, workdir=DEFAULT_WORKDIR):
    """None if fairseq knows criterion ``name``'s flags on ``task_name``, else why not.

    Checks the registry first (criterions are registered on import of the
    plugin), then parses the fine-tuning command line as fairseq-train would.
    """
    pre = pre_phase_of(cfg, name)
    runs = [("", criterion_flags(cfg, name, task_name))]
    if pre:
        runs.insert(0, (f" (pre_phase {pre['name']})", pre_phase_flags(pre, task_name)))
    known = known_criterions()
    task = cfg["tasks"][task_name]
    mapping = task_mapping(cfg, task_name, workdir)
    for what, flags in runs:
        registered = criterion_of(flags)
        if registered not in known:
            hint = difflib.get_close_matches(registered, known, n=3)
            return (f"criterion '{name}'{what}: fairseq does not know --criterion {registered} (not "
                    f"registered by fairseq or fairseq_seqlevel{'; close: ' + ', '.join(hint) if hint else ''})")
        argv = [str(mapping["data"]), "--user-dir", str(USER_DIR),
                *expand(task["train_flags"] + task["model_flags"] + task["optim_flags"], mapping),
                *expand(flags, mapping)]
        message = check_fairseq_args(argv)
        if message is not None:
            return f"criterion '{name}'{what} on {task_name}: {message}"
    return None


# ---------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------

def train_command(cfg, task_name, save_dir, seed, extra, workdir, log_interval=10):
    """fairseq-train command line (list of str) for one task."""
    task = cfg["tasks"][task_name]
    mapping = task_mapping(cfg, task_name, workdir)
    return [sys.executable, "-m", "fairseq_cli.train", str(mapping["data"]),
            "--user-dir", str(USER_DIR),
            *expand(task["train_flags"] + task["model_flags"] + task["optim_flags"], mapping),
            "--num-workers", "0", "--no-progress-bar", "--log-format", "simple",
            "--log-interval", str(log_interval), "--seed", str(seed),
            "--save-dir", str(save_dir), "--no-epoch-checkpoints",
            *expand(extra, mapping)]


def pretrain_command(cfg, task_name, save_dir, workdir, seed=1):
    task = cfg["tasks"][task_name]
    extra = criterion_flags(cfg, CONTROL, task_name) + list(task["pretrain_flags"])
    return train_command(cfg, task_name, save_dir, seed, extra, workdir, log_interval=50)


def pretrain_dir(workdir, task_name, pretrain=1):
    """Where pre-trained model ``pretrain`` (its pre-training seed) of a task lives:
    WORKDIR/TASK/pretrain for seed 1 (the layout before there were several),
    WORKDIR/TASK/pretrain{N} otherwise."""
    return Path(workdir) / task_name / ("pretrain" if pretrain == 1 else f"pretrain{pretrain}")


def curve_key(seed, pretrain=1):
    """quality_curves.json's key of a run: "S" from model 1, "pretrain{N}_seed{S}" from model N."""
    return str(seed) if pretrain == 1 else f"pretrain{pretrain}_seed{seed}"


def parse_curve_key(key):
    """(seed, pretrain) of a :func:`curve_key`."""
    if key.startswith("pretrain"):
        pre, seed = key[len("pretrain"):].split("_seed")
        return int(seed), int(pre)
    return int(key), 1


def run_dir(workdir, task_name, criterion, seed, pretrain=1):
    """A fine-tuning run: WORKDIR/TASK/CRIT/seed{S} from pre-trained model 1,
    WORKDIR/TASK/CRIT/pretrain{N}_seed{S} from model N."""
    name = f"seed{seed}" if pretrain == 1 else f"pretrain{pretrain}_seed{seed}"
    return Path(workdir) / task_name / criterion / name


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


def finetune_command(cfg, task_name, criterion, seed, save_dir, pretrained, workdir, phase=None):
    """The fine-tuning run of ``criterion`` from ``pretrained``; with ``phase="pre"``,
    its pre-phase run instead (the pre-phase's flags and updates).  The run after a
    pre-phase starts from the pre-phase's checkpoint (``pretrained``): fairseq's
    --finetune-from-model loads model and criterion state (the critic) and resets
    optimizer, meters and data iterator, the same as --restore-file with every --reset-*."""
    task = cfg["tasks"][task_name]
    crit = cfg["criterions"][criterion]
    if phase == "pre":
        pre = crit["pre_phase"]
        flags, own = pre_phase_flags(pre, task_name), list(pre.get("finetune_flags", []))
        updates = pre_phase_updates(cfg, task_name, pre)
    else:
        flags = criterion_flags(cfg, criterion, task_name)
        own, updates = list(crit.get("finetune_flags", [])), finetune_updates(cfg, task_name, criterion)
    # the criterion's own finetune_flags come last, so they win over the task's (e.g. --lr)
    extra = flags + list(task.get("finetune_flags", [])) + own
    extra += ["--finetune-from-model", str(pretrained), "--max-update", str(updates),
              "--no-save-optimizer-state"]
    if task.get("validate_every"):
        extra += ["--validate-interval-updates", str(task["validate_every"])]
    return train_command(cfg, task_name, save_dir, seed, extra, workdir, log_interval=10)


def subprocess_env():
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def omp_threads():
    """OMP_NUM_THREADS the fairseq subprocesses run with ("unset": torch's default, the
    cores). Recorded with every row: the same command at another thread count sums floats
    in another order, and a 24-epoch pre-training ends as another model (Bible, pre-training
    seed 2: 32.75 test BLEU at 1 thread, 32.98 at 2)."""
    return os.environ.get("OMP_NUM_THREADS") or "unset"


def run_logged(cmd, log_path):
    """Run ``cmd`` with stdout+stderr to ``log_path``; (returncode, wall seconds)."""
    import time

    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log_path, "w") as log:
        log.write("# " + " ".join(shell_quote(c) for c in cmd) + "\n")
        log.flush()
        proc = subprocess.run([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT,
                              env=subprocess_env())
    return proc.returncode, time.time() - start


def shell_quote(arg):
    import shlex

    return shlex.quote(str(arg))


def command_text(cmd):
    return " ".join(shell_quote(c) for c in cmd)


def log_tail(path, chars=2500):
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    errors = [l for l in text.splitlines() if l.startswith("error:")]
    return "\n".join(errors) if errors else text[-chars:]


# ---------------------------------------------------------------------------
# logs
# ---------------------------------------------------------------------------

_VALID = re.compile(r"\| valid \| (?:epoch (\d+) \| )?valid on '([^']+)' subset \| (.*)$")
_TRAIN_INNER = re.compile(r"\| train_inner \| epoch (\d+):\s+(\d+) / (\d+) (.*)$")


def _number(text):
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value


def parse_log(text):
    """fairseq-train ``--log-format simple`` output -> {"valid": [...], "train": [...]}.

    ``valid``: one dict per validation (``epoch``, ``subset``, every logged
    ``key value`` pair, e.g. ``loss``, ``reward``, ``greedy_bleu``,
    ``num_updates``); ``train``: one dict per ``train_inner`` line.
    """
    valid, train = [], []
    for line in text.splitlines():
        m = _VALID.search(line)
        if m:
            entry = {"epoch": int(m.group(1)) if m.group(1) else None, "subset": m.group(2)}
            for part in m.group(3).split(" | "):
                key, _, value = part.strip().partition(" ")
                if key:
                    entry[key] = _number(value.strip())
            valid.append(entry)
            continue
        m = _TRAIN_INNER.search(line)
        if m:
            entry = {"epoch": int(m.group(1)), "step": int(m.group(2)), "steps": int(m.group(3))}
            for part in m.group(4).split(", "):
                key, _, value = part.strip().partition("=")
                if key:
                    entry[key] = _number(value.strip())
            train.append(entry)
    return {"valid": valid, "train": train}


def curve(entries, key, scale=1.0, subset="valid"):
    """[(num_updates, value * scale)] of validation entries that logged ``key``.

    Sorted by updates; a repeated update keeps its last value.
    """
    points = {}
    for entry in entries:
        if entry.get("subset", subset) != subset or key not in entry or "num_updates" not in entry:
            continue
        value = entry[key]
        if isinstance(value, (int, float)):
            points[int(entry["num_updates"])] = float(value) * scale
    return sorted(points.items())


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


# ---------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------

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
    "pretrains", "delta", "delta_std", "delta_n", "delta_ci95", "wall_s",
    "updates"}}}.  Runs pair by (pre-trained model, seed): ``delta`` is the
    mean of the paired differences criterion − control (every run of the
    criterion that has its control run), ``delta_std`` their std and
    ``delta_ci95`` the half-width of their 95% t interval (None with < 2
    pairs).  For the pre-trained models' own rows (``PRETRAIN``) ``n`` counts
    the models.
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
            if crit == control:
                entry.update(delta=0.0, delta_std=None, delta_n=s["n"], delta_ci95=None)
            elif crit != PRETRAIN and s["mean"] is not None:
                paired = [values[k] - ctrl[k] for k in values if k in ctrl]
                d = summarize(paired)
                ci = t975(d["n"] - 1) * d["std"] / math.sqrt(d["n"]) if d["std"] is not None else None
                entry.update(delta=d["mean"], delta_std=d["std"], delta_n=d["n"], delta_ci95=ci)
            else:
                entry.update(delta=None, delta_std=None, delta_n=0, delta_ci95=None)
            if crit == PRETRAIN:  # each pre-trained model's own score
                entry["models"] = {k[0]: v for k, v in sorted(values.items())}
            out[task][crit] = entry
    return out


def verdict(entry, higher_is_better):
    """"ahead" / "behind" when the 95% interval of Δ excludes 0, else "tie" (None: too few pairs)."""
    if entry.get("delta_ci95") is None or entry.get("delta") is None:
        return None
    lo, hi = entry["delta"] - entry["delta_ci95"], entry["delta"] + entry["delta_ci95"]
    if lo > 0 or hi < 0:
        better = (lo > 0) == higher_is_better
        return "ahead" if better else "behind"
    return "tie"


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


def markdown_report(cfg, agg, speed=None, skipped=(), failed=(), order=None):
    """Markdown: one table per task (criterion, mean ± std, Δ vs MLE, seeds,
    fine-tune wall s, step time vs MLE) plus skipped / failed runs."""
    lines = []
    order = order or list(cfg["criterions"])
    for task_name, task_cfg in cfg["tasks"].items():
        if task_name not in agg:
            continue
        by_crit = agg[task_name]
        lines.append(f"### {task_name}: {metric_title(task_cfg)}")
        lines.append("")
        lines.append("| criterion | metric (mean ± std) | Δ vs MLE (± std of paired Δ) | 95% CI of Δ "
                     "| runs (models × seeds) | updates | fine-tune wall s | step time vs MLE |")
        lines.append("|---|---|---|---|---|---|---|---|")
        if PRETRAIN in by_crit:
            e = by_crit[PRETRAIN]
            own = ", ".join(f"{v:.2f}" for v in e.get("models", {}).values())
            lines.append(f"| *pre-trained MLE (start point{'s' if e['n'] > 1 else ''})* | {_fmt(e['mean'])}"
                         + (f" ({own})" if e["n"] > 1 and own else "")
                         + f" | | | {e['n']} model{'s' if e['n'] > 1 else ''} | {e['updates']} "
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
            runs = f"{e['n']} ({len(e['pretrains'])} × {len(e['seeds'])})"
            ratio = step_ratio(speed, crit, task_name, cfg)
            lines.append(f"| {crit} | {mean_std} | {delta} | {ci} | {runs} | {e['updates']} "
                         f"| {_fmt(e['wall_s'], 0)} | {_fmt(ratio) + '×' if ratio is not None else '–'} |")
        lines.append("")
    for what, items in (("Not run (skipped)", skipped), ("Failed", failed)):
        if items:
            lines.append(f"**{what}:**")
            lines.extend(f"- {item}" for item in items)
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


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


# ---------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------

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
    ax.set_xlabel("step time vs MLE (forward+backward, benchmarks/speed.py)")
    ax.set_ylabel("gain over MLE (BLEU points; edit-error points removed)")
    ax.set_title("cost vs gain (mean over seeds; bars: std of the paired Δ)")
    ax.grid(alpha=0.3, which="both")
    if points:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no data (run speed.py and quality.py)", transform=ax.transAxes, ha="center")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------
# small I/O helpers
# ---------------------------------------------------------------------------

def read_json(path, default=None):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


def write_json(path, obj):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


def fmt_duration(seconds):
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
