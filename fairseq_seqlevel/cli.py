"""The stock fairseq CLIs with this plugin's ``--user-dir`` filled in, from any directory.

    seqlevel-train | seqlevel-generate | seqlevel-interactive ARGS      (console scripts)
    python -m fairseq_seqlevel.cli train | generate | interactive ARGS  (the same)
    python -m fairseq_seqlevel.cli user-dir   (prints it, for the stock CLIs:
        fairseq-generate ... --user-dir "$(python -m fairseq_seqlevel.cli user-dir)")

ARGS go unchanged to ``fairseq_cli.{train,generate,interactive}.cli_main``, after
``--user-dir <this package's directory>`` unless they name a ``--user-dir`` themselves.
"""

import importlib
import os
import sys

USER_DIR = os.path.dirname(os.path.abspath(__file__))
COMMANDS = ("train", "generate", "interactive")
USAGE = "usage: python -m fairseq_seqlevel.cli {user-dir | train | generate | interactive} [ARGS...]"


def with_user_dir(argv):
    """``argv`` with ``--user-dir USER_DIR`` in front, unless it already gives a ``--user-dir``."""
    argv = [str(a) for a in argv]
    if any(a == "--user-dir" or a.startswith("--user-dir=") for a in argv):
        return argv
    return ["--user-dir", USER_DIR, *argv]


def run(command, argv=None):
    """``fairseq_cli.<command>.cli_main()`` on ``argv`` (default ``sys.argv[1:]``) plus the user dir."""
    argv = sys.argv[1:] if argv is None else argv
    sys.argv = [f"seqlevel-{command}", *with_user_dir(argv)]
    return importlib.import_module(f"fairseq_cli.{command}").cli_main()


def train():
    return run("train")


def generate():
    return run("generate")


def interactive():
    return run("interactive")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv == ["user-dir"]:
        print(USER_DIR)
        return 0
    if argv and argv[0] in COMMANDS:
        return run(argv[0], argv[1:])
    print(USAGE, file=sys.stderr)
    return 0 if argv[:1] in (["-h"], ["--help"]) else 2


if __name__ == "__main__":
    sys.exit(main())
