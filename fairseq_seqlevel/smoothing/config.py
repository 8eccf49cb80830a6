"""The token-smoothing flags, shared by ``token_smooth`` and ``raml`` (Tok-Seq)."""

from dataclasses import dataclass, field
from typing import Optional

from fairseq.dataclass import FairseqDataclass
from omegaconf import II


@dataclass
class TokenSmoothConfig(FairseqDataclass):
    token_smooth_alpha: float = field(
        default=0.3, metadata={"help": "α of eq. 16: weight of the smoothed target (0 = MLE)"}
    )
    token_smooth_temperature: float = field(
        default=0.1, metadata={"help": "τ of eq. 13 (similarities are cosines in [-1, 1])"}
    )
    token_smooth_beta: float = field(
        default=0.0, metadata={"help": "β of eq. 14: rare-token promotion (0 = off)"}
    )
    token_smooth_topk: int = field(
        default=20, metadata={"help": "neighbours kept per token (the rest has probability 0)"}
    )
    token_embeddings: Optional[str] = field(
        default=None,
        metadata={"help": "word2vec/GloVe text file of target-token embeddings "
                  "(examples/build_token_embeddings.py builds one from the training data)"},
    )
    sentence_avg: bool = II("optimization.sentence_avg")
