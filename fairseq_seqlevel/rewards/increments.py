"""ΔR(w | y_<t, y*) = R(y_<t + w) − R(y_<t) for every vocabulary entry w at once
(tan2019 eq. 3: the reward a token contributes).

BLEU, edit and Hamming rewards only compare tokens for equality, so every
token that occurs in none of the references changes the reward the same way
(it matches nothing, and adds one to the length).  Their increment is
computed once with a stand-in id; the tokens of the references are scored
exactly.  Per row that is (number of distinct reference tokens + 2) reward
evaluations instead of V.  Token level only (merging subwords into words
breaks the renaming invariance: a piece may or may not start a word).
"""

from typing import Callable

import torch
from torch import Tensor


def next_token_gains(reward: Callable[[Tensor, Tensor], Tensor], prefix: Tensor, refs: Tensor, pad: int,
                     vocab_size: int) -> Tensor:
    """``[B, V]`` ΔR of appending each token to each row of ``prefix``.

    Args:
        reward: ``reward(hyp [N, T], refs [N, R, T']) -> [N]`` on token ids
            (e.g. a token-level ``BoundReward``); must treat all tokens absent
            from the references alike.
        prefix: ``[B, t]`` the tokens so far (right-padded with ``pad``; t may be 0).
        refs: ``[B, R, T']`` references (pad-padded; eos and pad are not tokens).
        vocab_size: V; ids ``>= V`` are free for the stand-in.

    The pad column holds the no-match value like every token absent from the
    references (appending pad appends nothing; callers never choose it).
    """
    batch, device = prefix.size(0), prefix.device
    flat = refs.reshape(batch, -1)
    # distinct reference tokens per row, sorted, padded with pad (cf. perturbation.vocab.refs_vocab)
    ordered = flat.sort(dim=1).values
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    candidate = first & ordered.ne(pad) & ordered.lt(vocab_size)
    keyed = torch.where(candidate, ordered, torch.full_like(ordered, vocab_size + 1)).sort(dim=1).values
    width = int(candidate.sum(dim=1).max()) if batch else 0
    tokens = keyed[:, :width]  # [B, K]; vocab_size + 1 where a row has fewer distinct tokens
    valid = tokens.lt(vocab_size)
    # column K: a token of no reference (stand-in id vocab_size)
    tokens = torch.cat([tokens, torch.full((batch, 1), vocab_size, dtype=tokens.dtype, device=device)], dim=1)
    k = tokens.size(1)

    hyps = torch.cat([_append(prefix, None, pad), _append(prefix.repeat_interleave(k, dim=0), tokens.reshape(-1), pad)])
    scores = reward(hyps, torch.cat([refs, refs.repeat_interleave(k, dim=0)])).double()
    gains = (scores[batch:].view(batch, k) - scores[:batch].unsqueeze(1)).float()
    # every token gets the stand-in's gain, reference tokens their own; absent
    # candidate slots write to a spare column V that is cut off
    out = gains[:, -1:].expand(batch, vocab_size + 1).clone()
    out.scatter_(1, tokens[:, :-1].masked_fill(~valid, vocab_size), gains[:, :-1])
    return out[:, :vocab_size]


def _append(prefix: Tensor, tokens, pad: int) -> Tensor:
    """Rows of ``prefix`` with ``tokens [N]`` written after their last non-pad token."""
    lengths = prefix.ne(pad).sum(dim=1)
    out = torch.cat([prefix, prefix.new_full((prefix.size(0), 1), pad)], dim=1)
    if tokens is not None:
        out.scatter_(1, lengths.unsqueeze(1), tokens.unsqueeze(1))
    return out
