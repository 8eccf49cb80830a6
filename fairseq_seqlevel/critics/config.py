"""The critic's size flags, shared by erac and vaml."""

from dataclasses import dataclass, field

from fairseq.dataclass import FairseqDataclass

from fairseq_seqlevel.critics.network import ReferenceCritic
from fairseq_seqlevel.errors import check


@dataclass
class CriticConfig(FairseqDataclass):
    critic_embed_dim: int = field(default=256, metadata={"help": "critic token embedding size"})
    critic_hidden_size: int = field(default=256, metadata={"help": "critic LSTM size (even: the reference "
                                                           "encoder has two directions of half this size)"})
    critic_layers: int = field(default=1, metadata={"help": "critic LSTM layers"})
    critic_init_embeddings: bool = field(
        default=False, metadata={"help": "initialise the critic's embeddings from the actor's decoder "
                                 "embeddings (needs --critic-embed-dim = the actor's)"})


def build_critic(cfg: CriticConfig, dictionary) -> ReferenceCritic:
    check(cfg.critic_embed_dim >= 1 and cfg.critic_layers >= 1,
          f"--critic-embed-dim and --critic-layers must be >= 1, got {cfg.critic_embed_dim}, {cfg.critic_layers}")
    check(cfg.critic_hidden_size >= 2 and cfg.critic_hidden_size % 2 == 0,
          f"--critic-hidden-size must be even and >= 2, got {cfg.critic_hidden_size}")
    return ReferenceCritic(len(dictionary), dictionary.pad(), cfg.critic_embed_dim, cfg.critic_hidden_size,
                           cfg.critic_layers)
