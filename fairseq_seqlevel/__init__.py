"""fairseq_seqlevel: sequence-level training criterions for fairseq.

Use as ``fairseq-train DATA --user-dir fairseq_seqlevel --task seqlevel_translation
--criterion raml ...``.  fairseq auto-imports only ``tasks/`` and ``models/`` of a
user dir, so importing this package registers everything explicitly.
"""

__version__ = "0.1.0"

from fairseq_seqlevel import compat  # noqa: F401  (every patch, first: compat.PATCHES)

from fairseq_seqlevel import tasks, criterions  # noqa: E402,F401
