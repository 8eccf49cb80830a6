"""The flags of a criterion or of the task, read from their config dataclasses.

``fairseq-train --criterion risk --help`` cannot list them: fairseq prints its
help in the first of its two parsing passes, before a criterion's flags exist.

    python -m fairseq_seqlevel.flags risk                  # a criterion's flags
    python -m fairseq_seqlevel.flags seqlevel_translation  # the task's own flags
    python -m fairseq_seqlevel.flags risk --markdown       # as a Markdown table
"""

import argparse
import dataclasses
import sys

from omegaconf import MISSING


def config_class(name):
    """The config dataclass registered under ``name`` (a criterion or a task)."""
    import fairseq_seqlevel  # noqa: F401  (registers the plugin)
    from fairseq.criterions import CRITERION_DATACLASS_REGISTRY
    from fairseq.tasks import TASK_DATACLASS_REGISTRY

    for registry in (CRITERION_DATACLASS_REGISTRY, TASK_DATACLASS_REGISTRY):
        if name in registry:
            return registry[name]
    ours = sorted(n for n in CRITERION_DATACLASS_REGISTRY
                  if CRITERION_DATACLASS_REGISTRY[n].__module__.startswith("fairseq_seqlevel"))
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
    return "–" if default is None or default is MISSING else str(default)


def _cell(text):
    return text.replace("|", "\\|")


def format_flags(name, markdown=False):
    rows = own_fields(config_class(name))
    if markdown:
        lines = ["| flag | default | meaning |", "|---|---|---|"]
        lines += [f"| `{flag}` | `{_shown(d)}` | {_cell(help)} |" for flag, d, help in rows]
        return "\n".join(lines)
    width = max((len(flag) for flag, _, _ in rows), default=0)
    return "\n".join(f"{flag:<{width}}  {_shown(d):<8}  {help}" for flag, d, help in rows)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fairseq_seqlevel.flags", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="a criterion (risk, raml, ...) or the task seqlevel_translation")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args(argv)
    print(format_flags(args.name, args.markdown))


if __name__ == "__main__":
    sys.exit(main())
