"""Roll-ins and batched greedy roll-outs for learning-to-search criterions (SeaRnn).

Pure functions driving a fairseq encoder-decoder model step by step with an
``incremental_state``, as ``SequenceGenerator`` does; callers run them in
eval mode under ``torch.no_grad()``.  Decoder ``tokens`` start with the
task's start symbol; outputs are right-padded with pad and end with eos
(forced at ``max_len - 1``).  Reference roll-outs (``gather_suffix``,
``best_suffix_starts``) need no model call.

Design: docs/decoding.md, "Roll-ins and roll-outs".
"""

import math
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch
from torch import Tensor

from fairseq_seqlevel.decoding.teacher_forcing import reorder_encoder_out

IncrementalState = Dict[str, Dict[str, Optional[Tensor]]]


# ------------------------------------------------------------------ model steps


def decoder_step(model, tokens: Tensor, encoder_out, incremental_state: IncrementalState) -> Tensor:
    """Log-probabilities ``[N, V]`` of the token after ``tokens`` ``[N, t]``.

    With a non-empty ``incremental_state`` the decoder only reads the last
    token (the earlier ones are cached); the transformer still needs the full
    ``tokens`` to know the position.  Updates ``incremental_state``.
    """
    out = model.decoder.forward(tokens, encoder_out=encoder_out, incremental_state=incremental_state)
    extra = out[1] if len(out) > 1 else None
    return model.get_normalized_probs((out[0][:, -1:, :], extra), log_probs=True)[:, -1, :]


def greedy_choice(lprobs: Tensor, pad: int) -> Tensor:
    """Arg-max token ``[N]`` of ``lprobs [N, V]``, never pad (as SequenceGenerator)."""
    lprobs = lprobs.clone()
    lprobs[:, pad] = -math.inf
    return lprobs.argmax(dim=-1)


def copy_incremental_state(incremental_state: IncrementalState, clone: bool = False) -> IncrementalState:
    """A copy of the two dict levels; the tensors are shared unless ``clone``
    (fairseq modules keep a dict of tensors, or a tensor or tuple, per key).

    Sharing is enough before a reorder (every fairseq module replaces its
    cached tensors with ``index_select`` copies there).  Decoding on from a
    copy needs ``clone``: fconv's ``LinearizedConvolution`` shifts its input
    buffer in place at every step, which would change the original state too.
    """
    if clone:
        return {k: _clone(v) for k, v in incremental_state.items()}
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in incremental_state.items()}


def _clone(value):
    # a module's cache: a dict of tensors (transformer, lstm), a tensor or a tuple of them (fconv)
    if torch.is_tensor(value):
        return value.clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(v) for v in value)
    return value


def _static_attention_modules(decoder):
    return [m for m in decoder.modules()
            if getattr(m, "encoder_decoder_attention", False) and hasattr(m, "_set_input_buffer")]


def expand_incremental_state(model, incremental_state: IncrementalState, new_order: Tensor) -> IncrementalState:
    """A new state whose row i is row ``new_order[i]`` of ``incremental_state``
    (left untouched, so the roll-in can go on from it).

    Encoder-decoder attention caches are dropped rather than reordered: they
    are recomputed from the (reordered) encoder output at the next step.
    fairseq's ``MultiheadAttention.reorder_incremental_state`` skips those
    caches whenever the new order has as many rows as the cache (it assumes
    beams of the same sentence), which a roll-out batch can have by chance.
    """
    state = copy_incremental_state(incremental_state)
    for module in _static_attention_modules(model.decoder):
        module._set_input_buffer(state, {})
    model.decoder.reorder_incremental_state_scripting(state, new_order)
    return state


def _shrink(model, state: IncrementalState, encoder_out, keep: Tensor):
    """Keep rows ``keep`` (strictly fewer rows than before, so fairseq's
    same-size shortcut for static caches cannot apply).  ``state`` and
    ``encoder_out`` are left as they are (fconv's encoder reorders in place)."""
    state = copy_incremental_state(state)
    model.decoder.reorder_incremental_state_scripting(state, keep)
    return state, reorder_encoder_out(model, encoder_out, keep)


def greedy_continue(model, encoder_out, tokens: Tensor, incremental_state: IncrementalState,
                    max_len: Tensor, pad: int, eos: int) -> Tensor:
    """Greedy continuation of every row of ``tokens`` ``[N, t+1]`` (the decoder's
    start symbol, then t output tokens) until ``eos`` (the task's end symbol),
    eos forced at output position ``max_len - 1``.

    ``incremental_state`` and ``encoder_out`` have N rows and hold everything
    before the last column of ``tokens`` (an empty state with t = 0: nothing
    decoded yet; :func:`greedy_rollin` fills it for a forced prefix).
    Rows whose output already contains eos get nothing.  Finished rows leave
    the batch.  Returns the new tokens ``[N, S]``, pad after each row's eos.

    Cost: one decoder step per generated position over the unfinished rows.
    """
    num_rows, width = tokens.shape
    first_position = width - 1
    max_len = max_len.to(tokens.device)
    done = tokens[:, 1:].eq(eos).any(dim=1)
    steps = int(max(int(max_len.max()) - first_position, 1)) if num_rows else 0
    out = tokens.new_full((num_rows, steps), pad)
    active = (~done).nonzero(as_tuple=False).squeeze(1)
    if active.numel() == 0:
        return out[:, :0]
    state, cur = incremental_state, tokens
    if active.numel() < num_rows:
        if len(state) > 0:
            state, encoder_out = _shrink(model, state, encoder_out, active)
        else:
            encoder_out = reorder_encoder_out(model, encoder_out, active)
        cur = tokens.index_select(0, active)
    elif len(state) > 0:
        state = copy_incremental_state(state, clone=True)
    caps = max_len.index_select(0, active)
    for step in range(steps):
        lprobs = decoder_step(model, cur, encoder_out, state)
        chosen = greedy_choice(lprobs, pad)
        chosen = chosen.masked_fill(first_position + step >= caps - 1, eos)
        out[active, step] = chosen
        finished = chosen.eq(eos)
        if bool(finished.all()):
            return out[:, :step + 1]
        cur = torch.cat([cur, chosen.unsqueeze(1)], dim=1)
        if bool(finished.any()):
            keep = (~finished).nonzero(as_tuple=False).squeeze(1)
            state, encoder_out = _shrink(model, state, encoder_out, keep)
            cur, caps, active = cur.index_select(0, keep), caps.index_select(0, keep), active.index_select(0, keep)
    return out


def greedy_rollin(model, encoder_out, max_len: Tensor, pad: int, eos: int, bos=None,
                  prefix: Optional[Tensor] = None) -> Tensor:
    """Greedy decoding ``[N, max(max_len)]`` of every encoded row from scratch.

    ``bos``: the decoder's start symbol, an int or a LongTensor ``[N]``
    (default ``eos``); ``prefix``: ``[N, P]`` tokens forced at output
    positions ``0 .. P-1`` (the task's forced prefix, e.g. a target-language
    token), as ``SequenceGenerator`` forces ``prefix_tokens``; greedy choices
    start at position P.  The output starts with the prefix."""
    num_rows = max_len.size(0)
    device = max_len.device
    start = _start_column(bos if bos is not None else eos, num_rows, device)
    forced = 0 if prefix is None else prefix.size(1)
    state: IncrementalState = {}
    if forced:
        start = torch.cat([start, prefix.to(device)], dim=1)
        # the decoder consumes the start symbol and all but the last forced token
        for p in range(forced):
            decoder_step(model, start[:, :p + 1], encoder_out, state)
    out = greedy_continue(model, encoder_out, start, state, max_len, pad, eos)
    if forced:
        out = torch.cat([start[:, 1:], out], dim=1)
    width = max(int(max_len.max()) if num_rows else 0, out.size(1))
    if out.size(1) < width:
        out = torch.cat([out, out.new_full((num_rows, width - out.size(1)), pad)], dim=1)
    return out


def _start_column(bos, num_rows: int, device) -> Tensor:
    """``[N, 1]`` start symbols from an int or a LongTensor ``[N]``."""
    if torch.is_tensor(bos):
        return bos.to(device=device, dtype=torch.long).view(-1, 1).expand(num_rows, 1).contiguous()
    return torch.full((num_rows, 1), int(bos), dtype=torch.long, device=device)


def replay(model, encoder_out, rollin: Tensor, pad: int, eos: int, bos=None
           ) -> Iterator[Tuple[int, Tensor, IncrementalState]]:
    """Teacher-force ``rollin`` ``[B, L]`` through the decoder one step at a time.

    Yields ``(t, lprobs_t [B, V], state)`` for t = 0..L-1, where ``state`` has
    consumed the decoder inputs ``bos, rollin[:, :t]`` (``bos``: the start
    symbol, an int or a LongTensor ``[B]``, default ``eos``): a roll-out from
    cell t expands it (:func:`expand_incremental_state`) and feeds its own
    token at position t.  The caller must not modify ``state`` and must be done
    with it before asking for the next step.  Rows past their end are fed eos.
    """
    start = _start_column(bos if bos is not None else eos, rollin.size(0), rollin.device)
    inputs = torch.cat([start, rollin.masked_fill(rollin.eq(pad), eos)], dim=1)
    state: IncrementalState = {}
    for t in range(rollin.size(1)):
        lprobs = decoder_step(model, inputs[:, :t + 1], encoder_out, state)
        yield t, lprobs, state


# ---------------------------------------------------------- reference roll-outs


def gather_suffix(target: Tensor, start: Tensor, pad: int, eos: int) -> Tensor:
    """``target[n, start[n]:]`` for every row, ``[N, W]`` right-padded.

    ``target`` ``[N, T]`` is right-padded and ends in eos; a start past the
    target's eos gives just ``[eos]`` (the reference stops).
    """
    num_rows, width = target.shape
    span = torch.arange(width, device=target.device)
    index = start.unsqueeze(1) + span.unsqueeze(0)
    suffix = target.gather(1, index.clamp(max=width - 1)).masked_fill(index >= width, pad)
    empty = suffix[:, 0].eq(pad)
    suffix[:, 0] = suffix[:, 0].masked_fill(empty, eos)
    return suffix


def best_suffix_starts(prefix: Tensor, target: Tensor, pad: int, eos: int,
                       score: Callable[[Tensor, Tensor], Tensor], copy_start: Tensor,
                       budget: int = 1 << 21) -> Tensor:
    """SeaRnn Appendix C.2 reference policy: the start j of the ground-truth
    suffix ``target[n, j:]`` whose concatenation to ``prefix[n]`` scores best.

    Args:
        prefix: ``[N, P]`` output tokens so far (no pad, no eos).
        target: ``[N, T]`` right-padded, ending in eos.
        score: ``score(hyp [M, W], refs [M, T]) -> [M]`` (e.g. BLEU-1 from
            :mod:`fairseq_seqlevel.rewards`); higher is better.
        copy_start: ``[N]`` preferred start on ties (plain copy: position + 1).
        budget: max tokens scored per chunk.
    Returns:
        LongTensor ``[N]`` with values in ``0..len(target[n]) - 1`` (the last
        is the eos-only suffix).
    """
    num_rows, width = target.shape
    lengths = target.ne(pad).sum(dim=1)  # eos included
    starts = torch.arange(width, device=target.device)
    hyp_width = prefix.size(1) + width
    scores = torch.full((num_rows, width), -math.inf, dtype=torch.double, device=target.device)
    rows_per_chunk = max(1, budget // max(1, width * hyp_width))
    for lo in range(0, num_rows, rows_per_chunk):
        hi = min(lo + rows_per_chunk, num_rows)
        n = hi - lo
        tgt = target[lo:hi].repeat_interleave(width, dim=0)
        suffix = gather_suffix(tgt, starts.repeat(n), pad, eos)
        hyp = torch.cat([prefix[lo:hi].repeat_interleave(width, dim=0), suffix], dim=1)
        scores[lo:hi] = score(hyp, tgt).double().view(n, width)
    scores = scores.masked_fill(starts.unsqueeze(0) >= lengths.unsqueeze(1), -math.inf)
    best = scores.max(dim=1, keepdim=True).values
    distance = (starts.unsqueeze(0) - copy_start.unsqueeze(1)).abs().double()
    distance = distance.masked_fill(scores < best, math.inf)
    return distance.argmin(dim=1)
