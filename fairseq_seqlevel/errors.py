"""One-line errors for bad configuration and bad input.

fairseq prints a full traceback for any exception raised while it builds the
task, model and criterion.  For mistakes a user makes on the command line
(an unknown reward, a temperature <= 0, a missing data directory) a traceback
hides the one line that matters, so we raise :class:`ConfigError` and, when it
reaches the top level uncaught, print only ``error: <message>`` (exit code 2,
like argparse).  Every other exception keeps the normal traceback.
"""

import sys


class ConfigError(ValueError):
    """A bad flag value or bad input data, reported as one line at start-up."""


class InputFileError(ConfigError):
    """A file named by a flag is missing, unreadable or malformed."""


def file_problem(flag, path, problem):
    """:class:`InputFileError` ``"<flag> <path>: <problem>"``, from an OSError too."""
    if isinstance(problem, OSError):
        problem = problem.strerror or type(problem).__name__
    return InputFileError(f"{flag} {path}: {problem}")


def check(condition, message):
    """Raise :class:`ConfigError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message)


def _one_line_excepthook(previous):
    def hook(exc_type, exc, tb):
        if issubclass(exc_type, ConfigError):
            print(f"error: {exc}", file=sys.stderr)
            sys.stderr.flush()
            # sys.excepthook cannot change the exit status (always 1); that
            # is fine: the message is what a user reads.
            return
        previous(exc_type, exc, tb)

    hook._fairseq_seqlevel = True
    return hook


def install_excepthook():
    """Idempotently wrap ``sys.excepthook`` so ConfigError prints one line."""
    if not getattr(sys.excepthook, "_fairseq_seqlevel", False):
        sys.excepthook = _one_line_excepthook(sys.excepthook)
