"""Q_φ(ŷ_<t, w; y*) for every vocabulary entry w at every step: the critic reads
the reference y* (not the source), as in dai2018 and Bahdanau et al. 2017."""

from typing import Dict

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


class ReferenceCritic(nn.Module):
    """A bidirectional LSTM over y*, an LSTM over the hypothesis with dot-product
    attention over the reference states, and a linear layer to |V| values.

    ``forward(refs [N, T'], prev_tokens [N, T]) -> Q [N, T, V]``: ``Q[:, t]``
    are the values of every next token after the hypothesis prefix whose
    decoder input is ``prev_tokens[:, :t+1]`` (fairseq's layout: eos, then the
    tokens), so one pass gives every state of a trajectory.  Pad positions of
    ``refs`` are masked out of the attention; rows of ``prev_tokens`` may be
    right-padded (their outputs there are not used).
    """

    def __init__(self, num_tokens: int, pad: int, embed_dim: int = 256, hidden_size: int = 256, layers: int = 1):
        super().__init__()
        if hidden_size % 2:
            raise ValueError(f"critic hidden size must be even (two reference directions), got {hidden_size}")
        self.pad = pad
        self.embed = nn.Embedding(num_tokens, embed_dim, padding_idx=pad)
        self.reference_encoder = nn.LSTM(embed_dim, hidden_size // 2, num_layers=layers, batch_first=True,
                                         bidirectional=True)
        self.decoder = nn.LSTM(embed_dim, hidden_size, num_layers=layers, batch_first=True)
        self.output = nn.Linear(2 * hidden_size, num_tokens)

    @torch.no_grad()
    def init_embeddings(self, weight: Tensor) -> None:
        """Copy the actor's target embeddings (same shape) into the critic's."""
        if weight.shape != self.embed.weight.shape:
            raise ValueError(f"critic embeddings are {tuple(self.embed.weight.shape)}, the actor's "
                             f"{tuple(weight.shape)}: set --critic-embed-dim to the actor's decoder embed dim")
        self.embed.weight.copy_(weight)

    def encode_reference(self, refs: Tensor):
        mask = refs.ne(self.pad)
        lengths = mask.sum(dim=1).clamp(min=1).cpu()  # an all-pad row attends to one pad state
        packed = pack_padded_sequence(self.embed(refs), lengths, batch_first=True, enforce_sorted=False)
        states, _ = self.reference_encoder(packed)
        states, _ = pad_packed_sequence(states, batch_first=True, total_length=refs.size(1))
        mask[:, 0] = True
        return states, mask

    def forward(self, refs: Tensor, prev_tokens: Tensor) -> Tensor:
        ref_states, ref_mask = self.encode_reference(refs)
        hyp_states, _ = self.decoder(self.embed(prev_tokens))
        scores = torch.bmm(hyp_states, ref_states.transpose(1, 2))
        scores = scores.masked_fill(~ref_mask.unsqueeze(1), float("-inf"))
        context = torch.bmm(scores.softmax(dim=-1), ref_states)
        return self.output(torch.cat([hyp_states, context], dim=-1))


# ---- buffer copies of a module's parameters (target network, frozen snapshot)

def register_shadow(owner: nn.Module, module: nn.Module, prefix: str) -> Dict[str, str]:
    """A buffer of ``owner`` holding a copy of each parameter of ``module``, so
    the copy is checkpointed with ``owner`` but never optimized; returns
    {parameter name: buffer name}."""
    names = {}
    for name, p in module.named_parameters():
        names[name] = f"{prefix}__" + name.replace(".", "__")
        owner.register_buffer(names[name], p.detach().clone().float())
    # kept fp32 when fairseq casts the criterion for --fp16/--bf16 (the owner's
    # _apply honours it): β·(φ − φ̄) at β = 0.001 is below half precision's
    # resolution, a half-precision target network would never move
    owner.__dict__.setdefault("fp32_buffers", set()).update(names.values())
    return names


def shadow(owner: nn.Module, names: Dict[str, str]) -> Dict[str, Tensor]:
    """The copy as a parameter dict for ``torch.func.functional_call``."""
    return {name: getattr(owner, buffer) for name, buffer in names.items()}


@torch.no_grad()
def blend_shadow(owner: nn.Module, module: nn.Module, names: Dict[str, str], rate: float) -> None:
    """copy ← rate·θ + (1 − rate)·copy (rate 1: a fresh copy)."""
    for name, p in module.named_parameters():
        getattr(owner, names[name]).mul_(1.0 - rate).add_(p.detach().float(), alpha=rate)
