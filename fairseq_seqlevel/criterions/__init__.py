"""Criterions register themselves with fairseq on import; list each module here."""

from fairseq_seqlevel.criterions import raml, token_smooth  # noqa: F401
from fairseq_seqlevel.criterions import searnn  # noqa: F401
from fairseq_seqlevel.criterions import risk  # noqa: F401
from fairseq_seqlevel.criterions import seq_exploration  # noqa: F401
from fairseq_seqlevel.criterions import interpolation  # noqa: F401
from fairseq_seqlevel.criterions import erac  # noqa: F401
from fairseq_seqlevel.criterions import vaml  # noqa: F401
from fairseq_seqlevel.criterions import preference  # noqa: F401
