"""The flags of a criterion or of the task, read from their config dataclasses.

``fairseq-train --criterion risk --help`` cannot list them: fairseq prints its
help in the first of its two parsing passes, before a criterion's flags exist.

    python -m fairseq_seqlevel.flags risk                  # a criterion's flags
    python -m fairseq_seqlevel.flags seqlevel_translation  # the task's own flags
    python -m fairseq_seqlevel.flags risk --markdown       # as a Markdown table
    python -m fairseq_seqlevel.flags --write-docs          # regenerate docs/flags.md's tables
    python -m fairseq_seqlevel.flags --check-docs          # exit 1 naming each stale table

docs/flags.md is hand-written except between ``<!-- flags:NAME -->`` and
``<!-- /flags:NAME -->``: there sits NAME's table, as ``--markdown`` prints it.
"""

import argparse
import dataclasses
import enum
import re
import sys
from pathlib import Path

from omegaconf import MISSING

DOCS = Path(__file__).resolve().parent.parent / "docs" / "flags.md"
OPEN, CLOSE = re.compile(r"<!-- flags:(\S+) -->"), re.compile(r"<!-- /flags:(\S+) -->")
SECTION = re.compile(r"(<!-- flags:(\S+) -->\n)(.*?)(<!-- /flags:\2 -->)", re.S)


def _registries():
    import fairseq_seqlevel  # noqa: F401  (registers the plugin)
    from fairseq.criterions import CRITERION_DATACLASS_REGISTRY
    from fairseq.tasks import TASK_DATACLASS_REGISTRY

    return CRITERION_DATACLASS_REGISTRY, TASK_DATACLASS_REGISTRY


def plugin_names():
    """The plugin's criterions, then its task: each has a table in docs/flags.md."""
    return [n for registry in _registries() for n, cls in registry.items()
            if cls.__module__.startswith("fairseq_seqlevel")]


def config_class(name):
    """The config dataclass registered under ``name`` (a criterion or a task)."""
    for registry in _registries():
        if name in registry:
            return registry[name]
    ours = sorted(n for n in plugin_names() if n in _registries()[0])
    raise SystemExit(f"error: unknown criterion or task '{name}'; the plugin's criterions: {', '.join(ours)}, "
                     "and the task seqlevel_translation")


def own_fields(cls):
    """The fields ``cls`` adds to fairseq's (the plugin's flags), in declaration order;
    fields set from other config groups (``II(...)`` interpolations) left out."""
    bases = [b for b in cls.__mro__[1:] if dataclasses.is_dataclass(b) and not b.__module__.startswith("fairseq_seqlevel")]
    inherited = {f.name for b in bases for f in dataclasses.fields(b)}
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else MISSING)
        if f.name in inherited or (isinstance(default, str) and default.startswith("${")):
            continue
        out.append((f"--{f.name.replace('_', '-')}", default, f.metadata.get("help", "")))
    return out


def _shown(default):
    if isinstance(default, bool):
        return "on" if default else "off"
    return "–" if default is None or default is MISSING else str(default)


def _cell(text):
    return text.replace("|", "\\|")


def _choices(cls):
    """`` {a,b,...}`` for each flag whose field is a ``ChoiceEnum``."""
    return {f"--{f.name.replace('_', '-')}": " {" + ",".join(c.value for c in f.type) + "}"
            for f in dataclasses.fields(cls) if isinstance(f.type, type) and issubclass(f.type, enum.Enum)}


def format_flags(name, markdown=False):
    cls = config_class(name)
    choices = _choices(cls)
    rows = [(flag + choices.get(flag, ""), d, help) for flag, d, help in own_fields(cls)]
    if markdown:
        lines = ["| flag | default | meaning |", "|---|---|---|"]
        lines += [f"| `{flag}` | `{_shown(d)}` | {_cell(help)} |" for flag, d, help in rows]
        return "\n".join(lines)
    width = max((len(flag) for flag, _, _ in rows), default=0)
    return "\n".join(f"{flag:<{width}}  {_shown(d):<8}  {help}" for flag, d, help in rows)


def generated_docs(text):
    """``text`` (docs/flags.md) with every marked table as the code generates it; a ValueError
    where a marker has no partner or the plugin's criterion or task has no table."""
    paired = [m[2] for m in SECTION.finditer(text)]
    opened, closed = OPEN.findall(text), CLOSE.findall(text)
    unpaired = sorted({n for n in opened + closed if opened.count(n) != paired.count(n) or
                       closed.count(n) != paired.count(n)})
    if unpaired:
        raise ValueError("unpaired <!-- flags:NAME --> / <!-- /flags:NAME --> markers: " + ", ".join(unpaired))
    missing = [n for n in plugin_names() if n not in paired]
    if missing:
        raise ValueError("no <!-- flags:NAME --> ... <!-- /flags:NAME --> table for " + ", ".join(missing))
    return SECTION.sub(lambda m: f"{m[1]}\n{format_flags(m[2], markdown=True)}\n\n{m[4]}", text)


def stale_tables(text):
    """The names whose table in ``text`` differs from what the code generates."""
    new = {m[2]: m[3] for m in SECTION.finditer(generated_docs(text))}
    return [m[2] for m in SECTION.finditer(text) if m[3] != new[m[2]]]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fairseq_seqlevel.flags", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", nargs="?", help="a criterion (risk, raml, ...) or the task seqlevel_translation")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    for option, what in [("--write-docs", "regenerate the tables of"),
                         ("--check-docs", "exit 1 if a table is stale in")]:
        parser.add_argument(option, nargs="?", const=DOCS, type=Path, metavar="FILE",
                            help=f"{what} FILE (default: docs/flags.md)")
    args = parser.parse_args(argv)
    docs = args.write_docs or args.check_docs
    if docs is None:
        if args.name is None:
            parser.error("name a criterion or task, or give --write-docs / --check-docs")
        print(format_flags(args.name, args.markdown))
        return 0
    text = docs.read_text()
    try:
        new = generated_docs(text)
    except ValueError as e:
        print(f"error: {docs}: {e}", file=sys.stderr)
        return 1
    if args.check_docs:
        stale = stale_tables(text)
        if stale:
            print(f"error: {docs}: stale flag tables: {', '.join(stale)}; regenerate them with "
                  "python -m fairseq_seqlevel.flags --write-docs", file=sys.stderr)
        return 1 if stale else 0
    docs.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
