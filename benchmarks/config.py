"""The benchmark configuration as typed dataclasses loaded from TOML.

``config.toml`` holds the tasks, one row per criterion (its main variant) and the
speed settings; ``experiments/NAME.toml`` hold the other variants, as
``[criterions.*]`` tables only, each answering one question (its opening comment).
:func:`load_config` overlays the experiments asked for (a list of names or paths,
or ``"all"``), resolves ``like`` and ``--quick``, and checks every key and type
against the dataclasses below: a problem is one line ``FILE: WHERE.KEY: message``
(:class:`ConfigError` lists every problem, one per line).

The tables keep the mapping interface of the TOML they come from (``task["beam"]``,
``crit.get("tasks", [])``), so code and tests written against dicts keep working;
an optional key that is not set reads as absent (``None`` attribute).
"""

import copy
import dataclasses
import difflib
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
USER_DIR = REPO / "fairseq_seqlevel"
DEFAULT_CONFIG = REPO / "benchmarks" / "config.toml"
EXPERIMENTS = REPO / "benchmarks" / "experiments"
DEFAULT_RESULTS = REPO / "benchmarks" / "results"
DEFAULT_WORKDIR = REPO / "work" / "bench"

CONTROL = "mle"               # the criterion every other one is compared with
PRETRAIN = "mle_pretrain"     # quality.json rows of the pre-trained start point
METRICS = {"bleu", "edit"}


class ConfigError(ValueError):
    """A problem with the benchmark configuration (one line per problem)."""


class Table(Mapping):
    """Mapping view of a config dataclass: the keys are the fields that are set."""

    def __getitem__(self, key):
        value = getattr(self, key, None) if key in self._names() else None
        if value is None:
            raise KeyError(key)
        return value

    def __setitem__(self, key, value):
        if key not in self._names():
            raise KeyError(f"{type(self).__name__} has no key {key!r}")
        setattr(self, key, value)

    def __iter__(self):
        return (name for name in self._names() if getattr(self, name) is not None)

    def __len__(self):
        return sum(1 for _ in self)

    @classmethod
    def _names(cls):
        return [f.name for f in dataclasses.fields(cls)]


# ---------------------------------------------------------------------------
# the tables (a field without a default is a required key)
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class RunConfig(Table):
    """[run], and [quick] (merged over [run] by --quick)."""
    seeds: Optional[list[int]] = None
    pretrain_seeds: Optional[list[int]] = None
    tasks: Optional[list[str]] = None            # the default task selection
    budget_s: Optional[float] = None
    startup_s: Optional[float] = None
    plot_metric_label: Optional[str] = None
    workdir: Optional[str] = None
    results: Optional[str] = None


@dataclasses.dataclass
class TaskConfig(Table):
    """[tasks.NAME]; its ``quick`` table overrides any other key with --quick."""
    data: str
    train_flags: list[str]
    model_flags: list[str]
    optim_flags: list[str]
    pretrain_flags: list[str]
    finetune_updates: int
    metric: str
    refs: list[str]
    beam: int
    curve_key: str
    higher_is_better: bool
    prepare: Optional[list[str]] = None
    check_file: Optional[str] = None
    target_lang: Optional[str] = None
    finetune_flags: Optional[list[str]] = None
    validate_every: Optional[int] = None
    eval_split: Optional[str] = None
    curve_scale: Optional[float] = None
    curve_label: Optional[str] = None
    est_sec_per_update: Optional[float] = None
    est_updates_per_epoch: Optional[int] = None
    est_validate_s: Optional[float] = None
    est_eval_s: Optional[float] = None
    quick: Optional[dict] = None                 # checked against the keys above


@dataclasses.dataclass
class PrePhase(Table):
    """[criterions.NAME.pre_phase]: a run before the fine-tuning run (erac's critic)."""
    name: str
    flags: list[str]
    updates: int
    finetune_flags: Optional[list[str]] = None
    est_step_cost: Optional[float] = None
    task_flags: Optional[dict[str, list[str]]] = None


@dataclasses.dataclass
class SpeedTarget(Table):
    """One of a criterion's ``speed_targets``: median step time / vs's <= max_ratio."""
    setting: str
    max_ratio: float
    vs: Optional[str] = None


@dataclasses.dataclass
class CriterionConfig(Table):
    """[criterions.NAME]."""
    flags: list[str]
    tasks: list[str]
    notes: str
    task_flags: Optional[dict[str, list[str]]] = None
    finetune_flags: Optional[list[str]] = None
    speed: Optional[list[str]] = None
    speed_targets: Optional[list[SpeedTarget]] = None
    est_step_cost: Optional[float] = None
    pre_phase: Optional[PrePhase] = None
    finetune_updates: Optional[int] = None       # a budget variant's own updates ...
    control: Optional[str] = None                # ... and the criterion its Δ pairs with
    like: Optional[str] = None                   # takes this criterion's flags, task_flags, finetune_flags, pre_phase
    skip_quick: Optional[bool] = None            # a diagnostic variant --quick runs only when named
    pre_phase_updates: Optional[int] = None      # the updates of its (or its base's) pre_phase


@dataclasses.dataclass
class SpeedSetting(Table):
    """[speed.settings.NAME]."""
    task: str
    covers: Optional[list[str]] = None
    batches: Optional[int] = None
    synthetic_vocab: Optional[int] = None
    synthetic_sentences: Optional[int] = None
    synthetic_len: Optional[list[int]] = None
    checkpoint: Optional[str] = None


@dataclasses.dataclass
class SamplerConfig(Table):
    """[speed.sampler]: decoding.sampler vs fairseq's SequenceGenerator."""
    setting: str
    samples: Optional[int] = None
    max_len_a: Optional[float] = None
    max_len_b: Optional[int] = None
    batches: Optional[int] = None
    max_ratio: Optional[float] = None


@dataclasses.dataclass
class SpeedQuick(Table):
    """[speed] keys --quick overrides."""
    rounds: Optional[int] = None
    batches: Optional[int] = None
    memory_steps: Optional[int] = None
    reward_speed_args: Optional[list[str]] = None


@dataclasses.dataclass
class SpeedConfig(SpeedQuick):
    """[speed]."""
    settings: Optional[dict[str, SpeedSetting]] = None
    sampler: Optional[SamplerConfig] = None
    quick: Optional[SpeedQuick] = None


@dataclasses.dataclass
class BenchConfig(Table):
    """A whole configuration: the TOML tables plus where it came from."""
    tasks: dict[str, TaskConfig]
    criterions: dict[str, CriterionConfig]
    run: Optional[RunConfig] = None
    quick: Optional[RunConfig] = None
    speed: Optional[SpeedConfig] = None
    path: Optional[str] = None                   # set by load_config, not in a file
    mode: Optional[str] = None                   # "full" / "quick"
    experiments: Optional[list[str]] = None      # the experiment files overlaid


FILE_KEYS = ("tasks", "criterions", "run", "quick", "speed")   # what a config file may hold


# ---------------------------------------------------------------------------
# checking a table against its dataclass
# ---------------------------------------------------------------------------

def _hints(cls):
    return typing.get_type_hints(cls)


def _strip_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _type_name(tp):
    tp = _strip_optional(tp)
    origin = typing.get_origin(tp)
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict or tp is dict or dataclasses.is_dataclass(tp):
        return "a table"
    return {bool: "bool", int: "int", float: "int/float", str: "str"}.get(tp, getattr(tp, "__name__", str(tp)))


def _check_value(tp, value, where, errors):
    tp = _strip_optional(tp)
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        check_table(tp, value, where, errors)
        return
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            errors.append(f"{where}: expected a table, got {value!r}")
        elif origin is dict:
            for key, item in value.items():
                _check_value(typing.get_args(tp)[1], item, f"{where}.{key}", errors)
        return
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            errors.append(f"{where}: expected {_type_name(tp)}, got {value!r}")
        elif dataclasses.is_dataclass(item_tp):
            for i, item in enumerate(value):
                check_table(item_tp, item, f"{where}[{i}]", errors)
        else:
            bad = []
            for item in value:
                _check_value(item_tp, item, where, bad)
            if bad:
                errors.append(f"{where}: expected {_type_name(tp)}, got {value!r}")
        return
    ok = (isinstance(value, bool) if tp is bool
          else isinstance(value, int) and not isinstance(value, bool) if tp is int
          else isinstance(value, (int, float)) and not isinstance(value, bool) if tp is float
          else isinstance(value, tp))
    if not ok:
        errors.append(f"{where}: expected {_type_name(tp)}, got {value!r}")


def check_table(cls, table, where, errors, partial=False, skip=()):
    """Problems of ``table`` (a mapping) as a ``cls``: unknown keys (with the closest
    known one), missing required keys (unless ``partial``), wrong types."""
    if not isinstance(table, Mapping):
        errors.append(f"{where}: expected a table, got {type(table).__name__}")
        return
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in skip}
    hints = _hints(cls)
    for key in table:
        if key not in fields:
            hint = difflib.get_close_matches(key, list(fields), n=1)
            errors.append(f"{where}: unknown key '{key}'"
                          + (f" (did you mean '{hint[0]}'?)" if hint else f"; known: {', '.join(fields)}"))
    for name, field in fields.items():
        if name not in table or table[name] is None:
            required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
            if required and not partial:
                errors.append(f"{where}: missing key '{name}'")
            continue
        _check_value(hints[name], table[name], f"{where}.{name}", errors)


def build(cls, table):
    """``cls`` from a checked mapping (nested tables become their dataclasses)."""
    hints = _hints(cls)
    return cls(**{k: _convert(hints[k], v) for k, v in table.items() if k in hints and v is not None})


def _convert(tp, value):
    tp = _strip_optional(tp)
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else build(tp, value)
    if origin is dict:
        return {k: _convert(typing.get_args(tp)[1], v) for k, v in value.items()}
    if origin is list:
        return [_convert(typing.get_args(tp)[0], v) for v in value]
    return copy.deepcopy(value)


def plain(obj):
    """A config (dataclasses, mappings, lists) as plain dicts and lists, unset keys left out."""
    if isinstance(obj, Mapping):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [plain(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------
# validation: the tables' keys and types, then what refers to what
# ---------------------------------------------------------------------------

def criterion_of(flags):
    """The value of ``--criterion`` in a flag list (None if absent)."""
    for i, flag in enumerate(flags):
        if flag == "--criterion" and i + 1 < len(flags):
            return flags[i + 1]
        if flag.startswith("--criterion="):
            return flag.split("=", 1)[1]
    return None


def validate_config(raw):
    """List of problems (``WHERE: message``) of a configuration: a parsed TOML dict or a
    loaded :class:`BenchConfig`; empty if fine."""
    raw = plain(raw)
    errors = []
    hints = _hints(BenchConfig)
    for key, value in raw.items():
        if key in ("path", "mode", "experiments"):  # a loaded config's own keys
            continue
        if key not in FILE_KEYS:
            hint = difflib.get_close_matches(key, FILE_KEYS, n=1)
            errors.append(f"{key}: unknown table" + (f" (did you mean '{hint[0]}'?)" if hint else
                                                     f"; known: {', '.join(FILE_KEYS)}"))
        elif value is not None:
            _check_value(hints[key], value, key, errors)
    tasks, crits = raw.get("tasks"), raw.get("criterions")
    tasks = tasks if isinstance(tasks, dict) else {}
    crits = crits if isinstance(crits, dict) else {}
    if not tasks:
        errors.append("config: needs at least one [tasks.NAME] table")
    if not crits:
        errors.append("config: needs at least one [criterions.NAME] table")
    elif CONTROL not in crits:
        errors.append(f"config: needs a [criterions.{CONTROL}] table (the control)")
    speed = raw.get("speed") if isinstance(raw.get("speed"), dict) else {}
    settings = speed.get("settings") if isinstance(speed.get("settings"), dict) else {}

    def known_tasks(where, names):
        for task in names if isinstance(names, (list, dict)) else []:
            if task not in tasks:
                errors.append(f"{where}: unknown task '{task}' (tasks: {', '.join(tasks)})")

    for name, task in tasks.items():
        where = f"tasks.{name}"
        if not isinstance(task, dict):
            continue
        if task.get("metric") not in METRICS and isinstance(task.get("metric"), str):
            errors.append(f"{where}.metric: must be one of {sorted(METRICS)}, got {task.get('metric')!r}")
        if isinstance(task.get("finetune_updates"), int) and task["finetune_updates"] < 1:
            errors.append(f"{where}.finetune_updates: must be >= 1")
        if isinstance(task.get("quick"), dict):
            check_table(TaskConfig, task["quick"], f"{where}.quick", errors, partial=True, skip=("quick",))
    for name, crit in crits.items():
        where = f"criterions.{name}"
        if not isinstance(crit, dict):
            continue
        if isinstance(crit.get("flags"), list) and criterion_of(crit["flags"]) is None:
            errors.append(f"{where}.flags: no '--criterion NAME'")
        if isinstance(crit.get("finetune_updates"), int) and crit["finetune_updates"] < 1:
            errors.append(f"{where}.finetune_updates: must be >= 1")
        if isinstance(crit.get("control"), str):
            other = crits.get(crit["control"])
            if not isinstance(other, dict) or crit["control"] == name:
                errors.append(f"{where}.control: unknown criterion '{crit['control']}'")
            elif other.get("finetune_updates") != crit.get("finetune_updates"):
                errors.append(f"{where}.control: '{crit['control']}' has another budget "
                              f"(finetune_updates {other.get('finetune_updates')} vs {crit.get('finetune_updates')})")
        if isinstance(crit.get("like"), str):
            base = crits.get(crit["like"])
            if not isinstance(base, dict) or crit["like"] == name or "like" in base:
                errors.append(f"{where}.like: '{crit['like']}' is not a criterion without its own 'like'")
        if "pre_phase_updates" in crit and "pre_phase" not in crit:
            errors.append(f"{where}.pre_phase_updates: no pre_phase (its own or its 'like' base's) to set")
        pre = crit.get("pre_phase")
        if isinstance(pre, dict):
            if isinstance(pre.get("flags"), list) and criterion_of(pre["flags"]) is None:
                errors.append(f"{where}.pre_phase.flags: no '--criterion NAME'")
            if isinstance(pre.get("updates"), int) and pre["updates"] < 1:
                errors.append(f"{where}.pre_phase.updates: must be >= 1")
            if isinstance(pre.get("name"), str) and not re.fullmatch(r"[A-Za-z0-9_]+", pre["name"]):
                errors.append(f"{where}.pre_phase.name: letters, digits and _ only, got {pre['name']!r}")
            for task in pre.get("task_flags") or {}:
                if task not in tasks:
                    errors.append(f"{where}.pre_phase.task_flags: unknown task '{task}'")
        known_tasks(f"{where}.tasks", crit.get("tasks"))
        for task in crit.get("task_flags") or {} if isinstance(crit.get("task_flags"), dict) else {}:
            if task not in tasks:
                errors.append(f"{where}.task_flags: unknown task '{task}'")
        for setting in crit.get("speed") or [] if isinstance(crit.get("speed"), list) else []:
            if setting not in settings:
                errors.append(f"{where}.speed: unknown speed setting '{setting}' "
                              f"(settings: {', '.join(settings) or 'none'})")
        for target in crit.get("speed_targets") or [] if isinstance(crit.get("speed_targets"), list) else []:
            if not isinstance(target, dict):
                continue
            if target.get("setting") not in settings:
                errors.append(f"{where}.speed_targets: {target!r}: 'setting' must name a speed setting")
            if isinstance(target.get("max_ratio"), (int, float)) and target["max_ratio"] <= 0:
                errors.append(f"{where}.speed_targets: {target!r}: needs max_ratio > 0")
            if target.get("vs", CONTROL) not in crits:
                errors.append(f"{where}.speed_targets: {target!r}: unknown criterion vs='{target.get('vs')}'")
    for name, setting in settings.items():
        if isinstance(setting, dict):
            if setting.get("task") not in tasks:
                errors.append(f"speed.settings.{name}.task: unknown task {setting.get('task')!r}")
            known_tasks(f"speed.settings.{name}.covers", setting.get("covers"))
    for section in ("run", "quick"):  # the default task selection of a full / --quick run
        chosen = (raw.get(section) or {}).get("tasks") if isinstance(raw.get(section), dict) else None
        if chosen is not None and (not isinstance(chosen, list) or not all(t in tasks for t in chosen)):
            errors.append(f"{section}.tasks: expected a list of task names (tasks: {', '.join(tasks)}), got {chosen!r}")
    sampler = speed.get("sampler")
    if isinstance(sampler, dict) and sampler.get("setting") not in settings:
        errors.append(f"speed.sampler.setting: unknown speed setting {sampler.get('setting')!r}")
    return list(dict.fromkeys(errors))


# ---------------------------------------------------------------------------
# loading: the file, its experiments, like, --quick
# ---------------------------------------------------------------------------

def _read_toml(path):
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None


def experiment_paths(names):
    """Paths of experiment files: NAME (``experiments/NAME.toml``), a path, or ``all``."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    out = []
    for name in names or []:
        if name == "all":
            out += sorted(EXPERIMENTS.glob("*.toml"))
            continue
        path = Path(name)
        out.append(path if path.suffix == ".toml" else EXPERIMENTS / f"{name}.toml")
    return list(dict.fromkeys(out))


def experiment_criterions(names):
    """The criterions the experiment files ``names`` define themselves, in file order."""
    out = []
    for path in experiment_paths(names):
        out += [n for n in _read_toml(path).get("criterions") or {} if n not in out]
    return out


def experiments_defining(criterions, skip=()):
    """Names of the experiment files that define any of ``criterions`` (not in ``skip``)."""
    wanted = set(criterions or []) - set(skip)
    found = []
    for path in sorted(EXPERIMENTS.glob("*.toml")) if wanted else []:
        try:
            names = set((tomllib.loads(path.read_text()).get("criterions") or {}))
        except (OSError, tomllib.TOMLDecodeError):
            continue
        if names & wanted:
            found.append(path.stem)
    return found


def raw_config(path=DEFAULT_CONFIG, experiments=()):
    """(merged raw TOML of ``path`` and its experiments, {criterion: the file defining it})."""
    path = Path(path)
    raw = _read_toml(path)
    origin = {name: path for name in raw.get("criterions") or {}}
    problems, todo = [], experiment_paths(experiments)
    while todo:
        exp = todo.pop(0)
        extra = _read_toml(exp)
        for key in extra:
            if key != "criterions":
                problems.append(f"{exp}: {key}: an experiment file holds [criterions.*] tables only")
        for name, crit in (extra.get("criterions") or {}).items():
            if name in origin:
                problems.append(f"{exp}: criterions.{name}: already defined in {origin[name]}")
                continue
            raw.setdefault("criterions", {})[name] = crit
            origin[name] = exp
        if not todo:  # the experiments that define what a `like` or `control` names
            refs = {c.get(k) for c in raw.get("criterions", {}).values() if isinstance(c, dict)
                    for k in ("like", "control")} - {None} - set(origin)
            todo = [p for p in experiment_paths(experiments_defining(refs)) if p not in origin.values()]
    if problems:
        raise ConfigError("\n".join(problems))
    return raw, origin


_WHERE_CRIT = re.compile(r"^criterions\.([^.:\[ ]+)")


def load_config(path=DEFAULT_CONFIG, quick=False, experiments=()):
    """Parse, check and resolve a config file and the experiment files ``experiments``
    (names, paths or "all") overlaid on it; a :class:`BenchConfig` with ``mode``
    ("full"/"quick") and, with ``quick``, every ``quick`` table merged over its parent.
    Raises :class:`ConfigError` naming the file and key of every problem."""
    path = Path(path)
    raw, origin = raw_config(path, experiments)
    crits = raw.get("criterions") if isinstance(raw.get("criterions"), dict) else {}
    for crit in crits.values():  # a variant takes its base's flags
        base = crits.get(crit.get("like")) if isinstance(crit, dict) else None
        if isinstance(base, dict) and "like" not in base:
            for key in ("flags", "task_flags", "finetune_flags", "pre_phase"):
                if key in base and key not in crit:
                    crit[key] = copy.deepcopy(base[key])
        if isinstance(crit, dict) and isinstance(crit.get("pre_phase"), dict) and "pre_phase_updates" in crit:
            crit["pre_phase"]["updates"] = crit["pre_phase_updates"]
    errors = validate_config(raw)
    if errors:
        def located(error):
            m = _WHERE_CRIT.match(error)
            return f"{origin.get(m.group(1), path) if m else path}: {error}"
        raise ConfigError("\n".join(located(e) for e in errors))
    raw.setdefault("run", {})
    raw.setdefault("speed", {}).setdefault("settings", {})
    for task in raw["tasks"].values():
        overrides = task.pop("quick", {})
        if quick:
            task.update(overrides)
    overrides = raw["speed"].pop("quick", {})
    if quick:
        raw["speed"].update(overrides)
        raw["run"].update(raw.get("quick", {}))
    cfg = build(BenchConfig, raw)
    cfg.path, cfg.mode = str(path), "quick" if quick else "full"
    cfg.experiments = [str(p) for p in dict.fromkeys(origin.values()) if p != path]
    return cfg
