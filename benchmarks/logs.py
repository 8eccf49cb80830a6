"""Reading fairseq-train's ``--log-format simple`` output: the validation and
train_inner lines as dicts, one validation value as a curve over updates, and the
last update a run reached."""

import re

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


def final_updates(parsed):
    """The last ``num_updates`` a parsed log mentions (None if none)."""
    updates = [e["num_updates"] for e in parsed["valid"] + parsed["train"] if "num_updates" in e]
    return max(updates) if updates else None
