"""n samples per source from a fairseq encoder-decoder, all decoded in one
batched incremental loop: greedy, multinomial, top-k, nucleus, epsilon, or a
caller's rule, under ``SequenceGenerator``'s length limits.

Length limits, per source: eos is forced at step
``min(int(max_len_a * src_len + max_len_b), max_decoder_positions - 1)``
(``SequenceGenerator``'s ``max_len``; steps count from 0, so at most that many
tokens before eos), eos is banned before step ``min_len``, pad is never chosen.
The limit wins over ``min_len``.  Unlike ``SequenceGenerator``, which takes
``src_len`` as the padded width of the whole batch, each source uses its own
``src_lengths``: the outputs do not depend on what a source is batched with.
"""

import math
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from fairseq_seqlevel.decoding.model import eval_mode, unwrap
from fairseq_seqlevel.decoding.rollouts import IncrementalState, _shrink, decoder_step
from fairseq_seqlevel.decoding.teacher_forcing import encode, expand_encoder_out

STRATEGIES = ("greedy", "multinomial", "topk", "nucleus", "epsilon")

# choose(step, lprobs [rows, V], prefix [rows, step], rows [rows]) -> tokens [rows]
Choose = Callable[[int, Tensor, Tensor, Tensor], Tensor]


class Samples(NamedTuple):
    """Rows ``b*n .. b*n+n-1`` belong to source ``b``."""

    tokens: Tensor   # LongTensor [B*n, T]: eos-terminated, right-padded with pad
    lprobs: Tensor   # float32 [B*n, T]: the model's log-prob (temperature 1) of each token, 0 at pad
    lengths: Tensor  # LongTensor [B*n]: tokens including eos


def last_steps(src_lengths: Tensor, max_len_a: float, max_len_b: float, max_positions: int) -> Tensor:
    """Per source, the step at which eos is forced (``SequenceGenerator``'s ``max_len``)."""
    # double, then truncation: the same arithmetic as Python's int(a * src_len + b)
    limit = (src_lengths.double() * max_len_a + max_len_b).long()
    return limit.clamp(max=int(max_positions) - 1).clamp(min=0)


def constrain(lprobs: Tensor, step: int, min_len: int, at_limit: Optional[Tensor], pad: int, eos: int) -> Tensor:
    """A copy of ``lprobs [rows, V]`` with the excluded tokens at -inf: pad, eos
    before ``min_len``, everything but eos in the rows ``at_limit`` (None: no
    row is at its limit)."""
    masked = lprobs.clone()
    masked[:, pad] = -math.inf
    if step < min_len:
        masked[:, eos] = -math.inf
    if at_limit is not None:
        eos_lprobs = lprobs[:, eos]
        masked.masked_fill_(at_limit.unsqueeze(1), -math.inf)
        masked[:, eos] = torch.where(at_limit, eos_lprobs, masked[:, eos])
    return masked


def draw(weights: Tensor) -> Tensor:
    """One index per row of ``weights [rows, V]`` (>= 0, not all 0), ∝ the weights.

    Inverse CDF: one uniform per row and a binary search, exact up to float
    rounding.  ``torch.multinomial`` does the same but takes ~10x longer on
    CPU (about half of a sampling step of a 4k-vocabulary LSTM).
    """
    cdf = weights.cumsum(dim=-1)
    total = cdf[:, -1:].contiguous()
    # the first entry with cdf > u has a positive weight; u may round up to the
    # total, whose first occurrence is the last positive entry
    u = torch.rand_like(total) * total
    return torch.minimum(torch.searchsorted(cdf, u, right=True), torch.searchsorted(cdf, total)).squeeze(1)


def _draw(logits: Tensor) -> Tensor:
    """One index per row, ∝ softmax(logits)."""
    return draw(logits.softmax(dim=-1))


def pick(masked: Tensor, strategy: str, temperature: float = 1.0, topk: int = 0, topp: float = 1.0,
         epsilon: float = 0.0) -> Tensor:
    """Tokens ``[rows]`` drawn from ``masked [rows, V]`` (log-probs, -inf = excluded).

    The top-k, nucleus and epsilon sets are taken from the tempered distribution
    softmax(masked / temperature), as fairseq's ``Sampling`` search does
    (the top-k set does not depend on the temperature).  Epsilon sampling
    (Hewitt et al. 2022) keeps the tokens of probability >= ``epsilon`` and the
    most likely token (never an empty set), renormalized; ``epsilon`` 0 is
    multinomial sampling, the same draws.
    """
    if strategy == "greedy":
        return masked.argmax(dim=-1)
    logits = masked if temperature == 1.0 else masked / temperature
    if strategy == "topk" and 0 < topk < logits.size(-1):
        values, ids = logits.topk(topk, dim=-1)
        return ids.gather(1, _draw(values).unsqueeze(1)).squeeze(1)
    if strategy == "nucleus" and topp < 1.0:
        probs, ids = logits.softmax(dim=-1).sort(dim=-1, descending=True)
        mass_before = probs.cumsum(dim=-1) - probs
        # the smallest prefix of the sorted tokens with mass >= topp: those preceded by < topp
        probs = probs.masked_fill(mass_before >= topp, 0.0)
        return ids.gather(1, draw(probs).unsqueeze(1)).squeeze(1)
    if strategy == "epsilon" and epsilon > 0:
        probs = logits.softmax(dim=-1)
        keep = probs.ge(epsilon).scatter_(1, probs.argmax(dim=-1, keepdim=True), True)
        return draw(probs.masked_fill(~keep, 0.0))
    return _draw(logits)


def _check(n, strategy, temperature, topk, topp, min_len, choose, epsilon=0.0):
    if n < 1:
        raise ValueError(f"sample: n must be >= 1, got {n}")
    if choose is None and strategy not in STRATEGIES:
        raise ValueError(f"sample: unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    if not temperature > 0:
        raise ValueError(f"sample: temperature must be > 0, got {temperature}")
    if strategy == "topk" and topk < 1:
        raise ValueError(f"sample: strategy 'topk' needs topk >= 1, got {topk}")
    if not 0 < topp <= 1:
        raise ValueError(f"sample: topp must be in (0, 1], got {topp}")
    if min_len < 0:
        raise ValueError(f"sample: min_len must be >= 0, got {min_len}")
    if not 0 <= epsilon < 1:
        raise ValueError(f"sample: epsilon must be in [0, 1), got {epsilon}")


def sample(model, net_input, n: int = 1, strategy: str = "greedy", temperature: float = 1.0, topk: int = 0,
           topp: float = 1.0, max_len_a: float = 0, max_len_b: float = 200, min_len: int = 1,
           choose: Optional[Choose] = None, last_step: Optional[Tensor] = None, layout=None,
           epsilon: float = 0.0) -> Samples:
    """``n`` outputs per source of ``net_input`` (``src_tokens``, ``src_lengths``).

    Args:
        model: a fairseq encoder-decoder, possibly wrapped (DDP, fairseq's
            proxy); run in eval mode under ``torch.no_grad()``, its mode restored.
        strategy: ``greedy`` (arg-max), ``multinomial`` (softmax(lprobs /
            temperature)), ``topk`` (the ``topk`` most likely tokens, then
            sampled at the temperature), ``nucleus`` (the smallest set whose
            tempered probability reaches ``topp``, then sampled), ``epsilon``
            (the tokens of tempered probability >= ``epsilon``, and the most
            likely one, then sampled: Hewitt et al. 2022; ``epsilon`` 0 is
            ``multinomial``).
        max_len_a, max_len_b, min_len: ``SequenceGenerator``'s limits (module
            docstring), eos forced at the limit.
        choose: replaces the strategy: ``choose(step, lprobs, prefix, rows)``
            returns the next token ``[r]`` of the ``r`` unfinished rows, given
            their fp32 model log-probs ``[r, V]`` at temperature 1 with the
            limits applied (-inf: pad, eos before ``min_len``, all but eos at
            the limit), their tokens so far ``prefix [r, step]`` (without the
            leading eos) and their row ids ``rows [r]`` in ``0 .. B*n-1``.  Its
            tokens are kept as they are (it may end a row before ``min_len``)
            except at a row's limit, where eos is forced; it must not return
            pad nor modify its arguments.
        last_step: ``[B]`` per source, the step at which eos is forced,
            instead of the limit from ``max_len_a``/``max_len_b`` (still capped
            by the model's ``max_decoder_positions``).
        layout: the task's :class:`~fairseq_seqlevel.decoding.layout.OutputLayout`
            of the batch (start symbol, forced prefix, end symbol), as its
            ``inference_step`` decodes; None: eos starts and ends a row.  The
            prefix is forced at steps ``0 .. P-1`` (``choose`` is not asked
            there) unless a row is at its limit, as ``SequenceGenerator`` does.

    Returns :class:`Samples`; ``lprobs`` holds the unmasked temperature-1
    model log-prob of each emitted token, whatever chose it.
    """
    _check(n, strategy, temperature, topk, topp, min_len, choose, epsilon)
    inner = unwrap(model)
    # eval mode on the inner model: a wrapper that does not forward attributes
    # (plain DDP) would hide the decoder whose beam size eval_mode resets to 1
    with eval_mode(inner):
        return _decode(inner, net_input, n, strategy, temperature, topk, topp, max_len_a, max_len_b, min_len,
                       choose, last_step, layout, epsilon)


def _decode(model, net_input, n, strategy, temperature, topk, topp, max_len_a, max_len_b, min_len, choose,
            last_step=None, layout=None, epsilon=0.0):
    dictionary = model.decoder.dictionary
    pad = dictionary.pad()
    eos = dictionary.eos() if layout is None else layout.eos
    src_lengths = net_input["src_lengths"]
    device = net_input["src_tokens"].device
    num_rows = src_lengths.numel() * n
    if last_step is None:
        last = last_steps(src_lengths, max_len_a, max_len_b, model.max_decoder_positions())
    else:
        last = last_step.to(device=src_lengths.device, dtype=torch.long).clamp(0, model.max_decoder_positions() - 1)
    last = last.repeat_interleave(n)
    if num_rows == 0:
        return Samples(torch.empty((0, 0), dtype=torch.long, device=device),
                       torch.empty((0, 0), dtype=torch.float, device=device),
                       torch.empty((0,), dtype=torch.long, device=device))
    first_limit, final_step = (int(x) for x in torch.stack([last.min(), last.max()]).tolist())
    tokens = torch.full((num_rows, final_step + 1), pad, dtype=torch.long, device=device)
    scores = torch.zeros((num_rows, final_step + 1), dtype=torch.float, device=device)

    encoder_out = encode(model, net_input)
    if n > 1:
        encoder_out = expand_encoder_out(model, encoder_out, n, src_lengths.numel())
    state: IncrementalState = {}
    rows = torch.arange(num_rows, device=device)  # original ids of the unfinished rows
    if layout is None:  # the start symbol, then their tokens so far
        inputs = torch.full((num_rows, 1), eos, dtype=torch.long, device=device)
        prefix = inputs[:, :0]
    else:
        inputs = layout.bos.to(device).repeat_interleave(n).unsqueeze(1)
        prefix = layout.prefix.to(device).repeat_interleave(n, dim=0)
    step = 0
    for step in range(final_step + 1):
        lprobs = decoder_step(model, inputs, encoder_out, state).float()
        # rows at their limit: none before the smallest limit, which spares the V-wide masking
        at_limit = last.le(step) if step >= first_limit else None
        if step < prefix.size(1):  # the task's forced tokens (SequenceGenerator._prefix_tokens)
            chosen = prefix[:, step]
        elif choose is None:
            masked = constrain(lprobs, step, min_len, at_limit, pad, eos)
            chosen = pick(masked, strategy, temperature, topk, topp, epsilon)
        else:
            masked = constrain(lprobs, step, min_len, at_limit, pad, eos)
            chosen = choose(step, masked, inputs[:, 1:], rows)
            if chosen.shape != rows.shape:
                raise ValueError(f"choose returned shape {tuple(chosen.shape)}, expected {tuple(rows.shape)}")
        if at_limit is not None:
            chosen = chosen.masked_fill(at_limit, eos)
        tokens[rows, step] = chosen
        scores[rows, step] = lprobs.gather(1, chosen.unsqueeze(1)).squeeze(1)
        finished = chosen.eq(eos)
        # the step's one host sync (with choose, it also counts pads)
        if choose is None or step < prefix.size(1):
            num_finished, num_pad = int(finished.sum()), 0
        else:
            num_finished, num_pad = torch.stack([finished.sum(), chosen.eq(pad).sum()]).tolist()
        if num_pad:
            raise ValueError(f"choose returned pad at step {step}")
        if num_finished == rows.numel():
            break
        inputs = torch.cat([inputs, chosen.unsqueeze(1)], dim=1)
        if num_finished:
            # the unfinished rows in order, without nonzero()'s second sync: a
            # stable sort puts them first and their count is known
            keep = finished.to(torch.uint8).argsort(stable=True)[:rows.numel() - num_finished]
            state, encoder_out = _shrink(model, state, encoder_out, keep)
            inputs, rows, last = inputs.index_select(0, keep), rows.index_select(0, keep), last.index_select(0, keep)
            prefix = prefix.index_select(0, keep)
    tokens, scores = tokens[:, :step + 1], scores[:, :step + 1]
    return Samples(tokens, scores, tokens.ne(pad).sum(dim=1))
