#!/usr/bin/env python
"""Decode a split with fairseq-generate and score it with sacrebleu.

    python examples/evaluate.py DATA CHECKPOINT [--split test] [--beam 5]
           [--refs en,kjv] [--metric bleu|edit]

A thin wrapper of ``benchmarks/evaluate.py`` (also ``seqlevel-evaluate`` once the
package is installed, or ``python -m benchmarks.evaluate`` from the repository root),
kept so that this command and ``from evaluate import evaluate`` (examples/ on the
path, as examples/run_demo.py has it) work without the package on the path.
"""

import runpy
from pathlib import Path

_IMPL = Path(__file__).resolve().parents[1] / "benchmarks" / "evaluate.py"
globals().update({k: v for k, v in runpy.run_path(str(_IMPL)).items() if not k.startswith("__")})

if __name__ == "__main__":
    main()  # noqa: F821  (benchmarks/evaluate.py's)
