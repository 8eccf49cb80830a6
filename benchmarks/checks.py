"""Does fairseq know a criterion and its flags? Each command line is parsed as
fairseq-train would parse it (the plugin imported, so its criterions are
registered), before anything runs: an unregistered --criterion or an unknown flag
(with the closest known one) is a message, and the criterion is skipped."""

import contextlib
import difflib
import io

from benchmarks.config import DEFAULT_WORKDIR, USER_DIR, criterion_of
from benchmarks.plan import criterion_flags, pre_phase_flags, pre_phase_of
from benchmarks.runs import expand, task_mapping


def import_plugin():
    import fairseq_seqlevel  # noqa: F401  (registers the plugin's criterions)


def known_criterions():
    import_plugin()
    from fairseq.criterions import CRITERION_REGISTRY

    return sorted(CRITERION_REGISTRY)


def check_fairseq_args(argv):
    """None if fairseq-train would accept ``argv`` (argument parsing only), else a message.

    Unknown flags are reported with the closest known flag.
    """
    import_plugin()
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
