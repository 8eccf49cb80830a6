"""Running fairseq for the benchmark: flag placeholders ({data}, {workdir}, ...),
the inputs a task needs (its data, its token embeddings: built by the config's
commands when missing), the fairseq-train command lines of pre-training and
fine-tuning runs, and running a command with its output in a log file."""

import fcntl
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.config import CONTROL, REPO, USER_DIR, ConfigError
from benchmarks.plan import criterion_flags, finetune_updates, pre_phase_flags, pre_phase_updates
from benchmarks.util import command_text, shell_quote

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
# data and token embeddings (quality and speed)
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


# ---------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------

def subprocess_env():
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def omp_threads():
    """OMP_NUM_THREADS the fairseq subprocesses run with ("unset": torch's default, the
    cores). Recorded with every row: the same command at another thread count sums floats
    in another order, and a 24-epoch pre-training ends as another model (Bible, pre-training
    seed 2: 32.75 test BLEU at 1 thread, 32.98 at 2)."""
    return os.environ.get("OMP_NUM_THREADS") or "unset"


def plugin_commit():
    """The last commit that changed the plugin's code (``fairseq_seqlevel/``), "+dirty" when
    the tree differs from it, or "unknown" outside a git checkout. Recorded with every row, so
    rows can be shown to come from one version of the criterion code whatever else (results,
    docs, benchmarks) was committed in between."""
    def git(*args):
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout
    try:
        commit = git("log", "-1", "--format=%h", "--", USER_DIR.name).strip()
        dirty = git("status", "--porcelain", "--", USER_DIR.name).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return (commit or "unknown") + ("+dirty" if dirty else "")


def run_logged(cmd, log_path):
    """Run ``cmd`` with stdout+stderr to ``log_path``; (returncode, wall seconds)."""
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log_path, "w") as log:
        log.write("# " + " ".join(shell_quote(c) for c in cmd) + "\n")
        log.flush()
        proc = subprocess.run([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT,
                              env=subprocess_env())
    return proc.returncode, time.time() - start


def log_tail(path, chars=2500):
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    errors = [l for l in text.splitlines() if l.startswith("error:")]
    return "\n".join(errors) if errors else text[-chars:]
