"""fairseq_seqlevel: sequence-level training criterions as a fairseq plugin.

fairseq itself is deliberately NOT in install_requires: the ``fairseq`` module
comes either from a source install of fairseq (typical on GPU clusters, often
patched) or from the ``fairseq-fixed`` distribution (0.12.x API, imports on
Python 3.11).  pip cannot express "either distribution", and declaring one would
make pip install it over the other.  ``scripts/install.sh`` installs
``fairseq-fixed`` when no ``fairseq`` is importable; ``pip install
.[fairseq-fixed]`` is the pip-only route (it builds fairseq's extensions with
build isolation, which needs a torch wheel it can reach).
"""

from setuptools import find_packages, setup

setup(
    name="fairseq_seqlevel",
    version="0.1.0",
    description="Sequence-level training (RAML, token smoothing, SeaRnn, ERAC/VAML, ...) for fairseq",
    # benchmarks: for the seqlevel-evaluate entry point (the benchmark package runs from
    # the repository root: python -m benchmarks.quality)
    packages=find_packages(include=["fairseq_seqlevel", "fairseq_seqlevel.*", "benchmarks", "benchmarks.*"]),
    entry_points={"console_scripts": [
        "seqlevel-evaluate = benchmarks.evaluate:main",
        # the stock fairseq CLIs with --user-dir set to the installed plugin (fairseq_seqlevel/cli.py)
        "seqlevel-train = fairseq_seqlevel.cli:train",
        "seqlevel-generate = fairseq_seqlevel.cli:generate",
        "seqlevel-interactive = fairseq_seqlevel.cli:interactive",
    ]},
    python_requires=">=3.8",
    install_requires=[
        "torch>=1.13",
        "numpy",
        "sacrebleu>=2.0",
        "sentencepiece>=0.1.97",
    ],
    extras_require={
        "fairseq-fixed": ["fairseq-fixed==0.12.3.1"],
        "test": ["pytest", "rapidfuzz", "sacrebleu>=2.0", "scipy"],
        "bench": ["matplotlib", "rapidfuzz"],
        # examples/iwslt14_de_en, examples/wmt14: Moses tokenization and BPE without Perl
        "recipes": ["sacremoses", "subword-nmt"],
        # fairseq-train --tensorboard-logdir (fairseq writes with torch.utils.tensorboard): docs/monitoring.md
        "tensorboard": ["tensorboard"],
    },
)
