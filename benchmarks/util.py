"""Small I/O helpers of the benchmark package: JSON files written atomically,
durations and command lines as text."""

import json
import os
import shlex
from pathlib import Path


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


def shell_quote(arg):
    return shlex.quote(str(arg))


def command_text(cmd):
    return " ".join(shell_quote(c) for c in cmd)


def split_list(text):
    """"a, b" -> ["a", "b"]; None for an empty or missing value."""
    return [x.strip() for x in text.split(",") if x.strip()] if text else None
