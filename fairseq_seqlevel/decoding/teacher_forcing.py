"""Batched teacher-forced scoring of many target sequences per source.

Works with any fairseq encoder-decoder model (``lstm``, ``transformer``): the
source is encoded once and the encoder output is expanded with the model's own
``reorder_encoder_out`` (as fairseq's generator does for beams), so scoring L
extra sequences per example costs decoder work only.
"""

import torch

from fairseq_seqlevel.decoding.model import unwrap


def pad_right(tokens, width, pad):
    """Right-pad a B x T tensor to B x width (unchanged if already as wide)."""
    if tokens.size(1) >= width:
        return tokens
    return torch.cat([tokens, tokens.new_full((tokens.size(0), width - tokens.size(1)), pad)], dim=1)


def prev_output_tokens_from_target(target, pad, bos):
    """fairseq's decoder input for right-padded targets.

    ``[bos, y_1, ..., y_{T-1}]`` per row, pad where the target is pad: exactly
    what ``LanguagePairDataset`` builds with ``move_eos_to_beginning``.
    ``bos``: the start symbol, an int (eos in fairseq's translation layout)
    or a LongTensor ``[N]`` per row (the batch's ``prev_output_tokens[:, 0]``,
    see :mod:`fairseq_seqlevel.decoding.layout`).
    """
    if torch.is_tensor(bos):
        first = bos.to(target.device).view(-1, 1).expand(target.size(0), 1)
    else:
        first = target.new_full((target.size(0), 1), bos)
    prev = torch.cat([first, target[:, :-1]], dim=1)
    return prev.masked_fill(target.eq(pad), pad)


def _per_row(bos, per_source):
    """A per-source start symbol ``[B]`` repeated for ``per_source`` rows each (ints pass)."""
    return bos.repeat_interleave(per_source) if torch.is_tensor(bos) else bos


def rows_lprobs(model, net_input, rows, per_source, pad, eos, grad=True):
    """Log-probs ``[B·per_source, T, V]`` of ``rows`` (source b's rows at
    b·per_source ..; ``eos`` the start symbol, an int or per source ``[B]``)
    in one teacher-forced pass, each source repeated: through
    ``model(...)`` (what data parallelism sees) when they carry gradients, the
    inner model under ``no_grad`` otherwise."""
    batch_size = net_input["src_tokens"].size(0)
    index = torch.arange(batch_size, device=rows.device).repeat_interleave(per_source)
    inputs = {k: v.index_select(0, index) for k, v in net_input.items()
              if torch.is_tensor(v) and k != "prev_output_tokens"}
    inputs["prev_output_tokens"] = prev_output_tokens_from_target(rows, pad, _per_row(eos, per_source))
    if grad:
        return model.get_normalized_probs(model(**inputs), log_probs=True)
    with torch.no_grad():
        inner = unwrap(model)
        return inner.get_normalized_probs(inner(**inputs), log_probs=True)


def encode(model, net_input):
    """Run the encoder once on a fairseq ``net_input``."""
    return model.encoder(net_input["src_tokens"], src_lengths=net_input["src_lengths"])


def expand_encoder_out(model, encoder_out, repeats, batch_size):
    """Repeat each example's encoder output ``repeats`` times (row b*repeats+k).

    ``batch_size``: the number of sources encoded (``src_tokens.size(0)``),
    given by the caller because encoder outputs have no common layout
    (transformer: ``encoder_out`` T x B x C in a list; lstm: a tuple of
    T x B x C; fconv: a tuple of B x T x C).  ``encoder_out`` is left as it is.
    """
    device = _first_tensor(encoder_out).device
    new_order = torch.arange(int(batch_size), device=device).repeat_interleave(repeats)
    return reorder_encoder_out(model, encoder_out, new_order)


def reorder_encoder_out(model, encoder_out, new_order):
    """``model.encoder.reorder_encoder_out(encoder_out, new_order)`` that leaves
    ``encoder_out`` intact: fconv's reorders the dict it is given in place
    (a caller that reorders the same encoder output twice would lose rows), so
    it gets a copy of the containers (the tensors are shared, never written)."""
    return model.encoder.reorder_encoder_out(_copy_containers(encoder_out), new_order)


def _copy_containers(encoder_out):
    if isinstance(encoder_out, dict):
        return {k: (list(v) if isinstance(v, list) else v) for k, v in encoder_out.items()}
    if isinstance(encoder_out, list):
        return list(encoder_out)
    return encoder_out  # a tuple or a tensor: nothing to write into


def decoder_lprobs(model, encoder_out, prev_output_tokens):
    """Log-probabilities N x T x V of the next token given the decoder input."""
    net_output = model.decoder(prev_output_tokens, encoder_out=encoder_out)
    return model.get_normalized_probs(net_output, log_probs=True), net_output


def token_nll(lprobs, target, pad):
    """Per-token negative log-likelihood N x T, 0 at pad positions."""
    nll = -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return nll.masked_fill(target.eq(pad), 0.0)


def _first_tensor(obj):
    if torch.is_tensor(obj):
        return obj
    if isinstance(obj, dict):
        obj = list(obj.values())
    for x in obj:
        t = _first_tensor(x) if x is not None else None
        if t is not None:
            return t
    return None


# ---------------------------------------------------------------------------
# Weighted row losses without materializing N x T x V log-probabilities
# ---------------------------------------------------------------------------
# Scoring L samples per sentence multiplies the decoder's output by L+1, and at
# a 10k vocabulary the N x T x V logits, log-softmax and their gradients (four
# such tensors live at once) dominate both memory and time on CPU.  When the
# loss is a fixed linear combination of per-row losses (raml: the weights are
# constants), the projection, log-softmax, loss and their gradients can be
# computed chunk by chunk in the forward pass, keeping only the gradients of
# the (small) features and projection parameters: the same three matrix
# products as autograd, a fraction of the memory.

CHUNK_LOGITS = 1 << 22  # logits per chunk (16 MB in float32)


def splits_output_layer(decoder):
    """True if the decoder implements ``extract_features`` and ``output_layer``
    (transformer, lstm), False if only its ``forward`` runs (fconv: fairseq's
    base ``extract_features`` / ``output_layer`` raise NotImplementedError)."""
    from fairseq.models import FairseqDecoder, FairseqIncrementalDecoder

    cls = type(decoder)
    return (cls.extract_features not in (FairseqDecoder.extract_features, FairseqIncrementalDecoder.extract_features)
            and cls.output_layer is not FairseqDecoder.output_layer)


def decoder_features(model, prev_output_tokens, encoder_out):
    """The decoder's last hidden states ``[N, T, C]`` (``extract_features``); for
    a decoder that does not split its forward (fconv), its output ``[N, T, V]``,
    which :func:`project_features` then passes through."""
    if splits_output_layer(model.decoder):
        return model.decoder.extract_features(prev_output_tokens, encoder_out=encoder_out)[0]
    return model.decoder(prev_output_tokens, encoder_out=encoder_out)[0]


def project_features(model, features):
    """The decoder's output layer on :func:`decoder_features` (the identity where
    those already are the decoder's output)."""
    return model.decoder.output_layer(features) if splits_output_layer(model.decoder) else features


def output_projection(decoder):
    """(weight, bias) of the decoder's final vocabulary projection, or None.

    Known layouts: fairseq's transformer (``output_projection``) and lstm
    (``fc_out``, or the tied ``embed_tokens`` with ``share_input_output_embed``).
    Adaptive softmax, decoders without a separate ``output_layer`` (fconv:
    its ``fc3`` follows ``fc2`` and dropout inside ``forward``) and unknown
    decoders give None (callers fall back to the decoder's own output).
    """
    if getattr(decoder, "adaptive_softmax", None) is not None or not splits_output_layer(decoder):
        return None
    layer = getattr(decoder, "output_projection", None)
    if isinstance(layer, torch.nn.Linear):
        return layer.weight, layer.bias
    if getattr(decoder, "share_input_output_embed", False) and hasattr(decoder, "embed_tokens"):
        return decoder.embed_tokens.weight, None
    layer = getattr(decoder, "fc_out", None)
    if isinstance(layer, torch.nn.Linear):
        return layer.weight, layer.bias
    return None


def fused_projection_supported(model, features):
    """True if ``output_layer`` is exactly ``F.linear`` with :func:`output_projection`'s
    parameters and ``get_normalized_probs`` is a plain log-softmax (checked
    numerically on one position, so forks with extra layers fall back)."""
    params = output_projection(model.decoder)
    if params is None:
        return False
    probe = features[:1, :1].detach()
    with torch.no_grad():
        logits = model.decoder.output_layer(probe)
        expected = torch.nn.functional.linear(probe, *params)
        if logits.shape != expected.shape or not torch.allclose(logits, expected, atol=1e-5, rtol=1e-4):
            return False
        lprobs = model.get_normalized_probs((logits, None), log_probs=True)
        return torch.allclose(lprobs.float(), torch.log_softmax(expected.float(), dim=-1), atol=1e-5)


class _FusedRowLoss(torch.autograd.Function):
    """Σ_n coef_n · loss_fn(log_softmax(features_n W^T + b), target_n), chunked.

    Gradients for features, weight and bias are computed in ``forward`` one
    chunk of rows at a time (valid because the result is a scalar and
    ``coef`` is a constant) and multiplied by the incoming gradient in
    ``backward``.  Mixed precision: every chunk runs in fp32 (autocast off)
    and the gradients are kept in fp32 until ``backward`` has applied the
    incoming gradient (fairseq's loss scale under --fp16), so gradients too
    small for half precision at unit scale are not flushed to zero; only the
    scaled result is cast to the parameters' dtype.
    """

    @staticmethod
    def forward(ctx, features, weight, bias, coef, target, loss_fn, rows_per_chunk):
        needs = ctx.needs_input_grad
        f32 = torch.float32
        grad_features = torch.zeros(features.shape, dtype=f32, device=features.device) if needs[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=f32, device=weight.device) if needs[1] else None
        grad_bias = (torch.zeros(bias.shape, dtype=f32, device=bias.device)
                     if bias is not None and needs[2] else None)
        total = torch.zeros((), dtype=f32, device=features.device)
        row_loss, row_nll = [], []
        w = weight.detach().to(f32).requires_grad_(needs[1])
        b = bias.detach().to(f32).requires_grad_(needs[2]) if bias is not None else None
        for start in range(0, features.size(0), rows_per_chunk):
            end = min(start + rows_per_chunk, features.size(0))
            with torch.enable_grad(), torch.autocast(features.device.type, enabled=False):
                x = features[start:end].detach().to(f32).requires_grad_(needs[0])
                lprobs = torch.log_softmax(torch.nn.functional.linear(x, w, b), dim=-1)
                loss, nll = loss_fn(lprobs, target[start:end])
                chunk_total = (coef[start:end].to(loss.dtype) * loss).sum()
                inputs = [t for t, n in ((x, needs[0]), (w, needs[1]), (b, b is not None and needs[2])) if n]
                grads = iter(torch.autograd.grad(chunk_total, inputs)) if inputs else iter(())
            if needs[0]:
                grad_features[start:end] = next(grads)
            if needs[1]:
                grad_weight += next(grads)
            if b is not None and needs[2]:
                grad_bias += next(grads)
            total += chunk_total.detach().float()
            row_loss.append(loss.detach())
            row_nll.append(nll.detach())
        ctx.save_for_backward(grad_features, grad_weight, grad_bias)
        ctx.dtypes = (features.dtype, weight.dtype, None if bias is None else bias.dtype)
        row_loss, row_nll = torch.cat(row_loss), torch.cat(row_nll)
        ctx.mark_non_differentiable(row_loss, row_nll)
        return total, row_loss, row_nll

    @staticmethod
    def backward(ctx, grad_total, _grad_loss, _grad_nll):
        scale = grad_total.float()

        def scaled(grad, dtype):
            return None if grad is None else (grad * scale).to(dtype)

        grads = [scaled(g, dt) for g, dt in zip(ctx.saved_tensors, ctx.dtypes)]
        return (*grads, None, None, None, None)


def _chunked_projection(model, features, fused):
    """(weight, bias, rows_per_chunk) of the chunked output layer, or None when
    ``fused`` is False or the model's output layer is not a plain projection."""
    if fused is False or not (fused or fused_projection_supported(model, features)):
        return None
    weight, bias = output_projection(model.decoder)
    return weight, bias, _rows_per_chunk(features, weight)


def _rows_per_chunk(features, weight):
    """Rows of ``features`` [n, T, C] per chunk of the output layer (CHUNK_LOGITS logits)."""
    return max(1, CHUNK_LOGITS // max(features.size(1) * weight.size(0), 1))


def weighted_row_losses(model, encoder_out, prev_output_tokens, target, coef, loss_fn, fused=None, buckets=None):
    """Teacher-forced Σ_n coef_n · loss_n over rows, and the per-row loss / NLL.

    ``loss_fn(lprobs [n, T, V], target [n, T]) -> (loss [n], nll [n])``, which
    must ignore the positions where ``target`` is pad (rows are scored in
    length buckets, trailing pad cut: :func:`length_buckets`; ``buckets=1``
    scores all rows at the full width in one decoder call);
    ``coef`` [N] are constants (no gradient flows into them).  Returns
    ``(total, row_loss, row_nll)``; ``total`` carries the gradient, the per-row
    values are detached (for logging).  With ``fused`` None the chunked path is
    used whenever the model's output layer allows it (:func:`fused_projection_supported`);
    ``fused=False`` forces the plain autograd path (the tests compare both).
    """
    coef = coef.detach()
    plan = _bucket_plan(model, prev_output_tokens, target, buckets)
    if plan is not None:
        return _bucketed_row_losses(model, encoder_out, None, prev_output_tokens, target, coef, loss_fn, fused, plan)
    if fused is not False:
        features = decoder_features(model, prev_output_tokens, encoder_out)
        chunked = _chunked_projection(model, features, fused)
        if chunked is not None:
            return _FusedRowLoss.apply(features, *chunked[:2], coef, target, loss_fn, chunked[2])
        net_output = (project_features(model, features), None)
        lprobs = model.get_normalized_probs(net_output, log_probs=True)
    else:
        lprobs, _ = decoder_lprobs(model, encoder_out, prev_output_tokens)
    loss, nll = loss_fn(lprobs, target)
    return (coef.to(loss.dtype) * loss).sum(), loss.detach(), nll.detach()


def _bucketed_row_losses(model, encoder_out, rows_source, prev_output_tokens, target, coef, loss_fn, fused, plan):
    """:func:`weighted_row_losses` one length bucket at a time (``plan``: :func:`length_buckets`)."""
    totals, losses, nlls = [], [], []
    chunked = None
    for idx, width in plan:
        prev_b, target_b, enc_b = _bucket_inputs(model, encoder_out, rows_source, prev_output_tokens, target, idx,
                                                 width)
        coef_b = coef if idx is None else coef.index_select(0, idx)
        if fused is not False:
            features = decoder_features(model, prev_b, enc_b)
            if not totals:
                chunked = _chunked_projection(model, features, fused)
            if chunked is not None:
                total, loss, nll = _FusedRowLoss.apply(features, *chunked[:2], coef_b, target_b, loss_fn,
                                                       _rows_per_chunk(features, chunked[0]))
                totals.append(total)
                losses.append(loss)
                nlls.append(nll)
                continue
            lprobs = model.get_normalized_probs((project_features(model, features), None), log_probs=True)
        else:
            lprobs, _ = decoder_lprobs(model, enc_b, prev_b)
        loss, nll = loss_fn(lprobs, target_b)
        totals.append((coef_b.to(loss.dtype) * loss).sum())
        losses.append(loss.detach())
        nlls.append(nll.detach())
    n = prev_output_tokens.size(0)
    return sum(totals[1:], totals[0]), _scatter_rows(losses, plan, n), _scatter_rows(nlls, plan, n)


def _chunked_row_losses(features, weight, bias, target, loss_fn, rows_per_chunk):
    """Per-row (loss, nll) without gradients, the logits one chunk of rows at a time (fp32)."""
    losses, nlls = [], []
    with torch.no_grad(), torch.autocast(features.device.type, enabled=False):
        w = weight.float()
        b = bias.float() if bias is not None else None
        for start in range(0, features.size(0), rows_per_chunk):
            end = min(start + rows_per_chunk, features.size(0))
            lprobs = torch.log_softmax(torch.nn.functional.linear(features[start:end].float(), w, b), dim=-1)
            loss, nll = loss_fn(lprobs, target[start:end])
            losses.append(loss)
            nlls.append(nll)
    return torch.cat(losses), torch.cat(nlls)


def encoded_rows_objective(model, encoder_out, prev_output_tokens, target, loss_fn, objective, fused=None,
                           buckets=None):
    """Teacher-forced ``objective(row_loss)`` for any differentiable function of the
    per-row losses (risk's softmax over a candidate set, a policy gradient, ...).

    ``loss_fn`` as for :func:`weighted_row_losses` (its loss may have K
    components per row, ``[n, K]``; pad targets ignored); ``objective(row_loss [N] or [N, K]) ->
    scalar`` is evaluated on the detached fp32 losses, and its gradient
    c = ∂objective/∂row_loss turns the backward pass into Σ_n c_n ∇loss_n: the
    chunked output layer of :func:`weighted_row_losses`, so the N x T x V
    log-probabilities never exist at once (one extra chunked projection computes
    the losses first).  Returns ``(loss, row_loss, row_nll, features)``:
    ``loss`` has the value of the objective and its exact gradient; ``features``
    (:func:`decoder_features`, through :func:`project_features` to the
    decoder's output, ``[N, T, C]``) let a caller add terms on some rows.

    Rows are scored in length buckets (:func:`length_buckets`, at most
    ``buckets``, default :data:`MAX_BUCKETS`; 1: one decoder call at the full
    width), each cut to its longest row: the same losses and gradients, since
    a decoder's output at position t depends on no later token.  ``features``
    are then zero where a bucket was cut (positions after the row's last
    non-pad input and target token), their values elsewhere.
    """
    return _rows_objective(model, encoder_out, None, prev_output_tokens, target, loss_fn, objective, fused, buckets)


def _rows_objective(model, encoder_out, rows_source, prev_output_tokens, target, loss_fn, objective, fused, buckets):
    """:func:`encoded_rows_objective`; ``rows_source`` [N]: the row of ``encoder_out``
    each row reads (None: ``encoder_out`` has one row per row already)."""
    plan = _bucket_plan(model, prev_output_tokens, target, buckets)
    if plan is not None:
        return _bucketed_objective(model, encoder_out, rows_source, prev_output_tokens, target, loss_fn, objective,
                                   fused, plan)
    if rows_source is not None:
        encoder_out = reorder_encoder_out(model, encoder_out, rows_source)
    features = decoder_features(model, prev_output_tokens, encoder_out)
    chunked = _chunked_projection(model, features, fused)
    if chunked is not None:
        row_loss, row_nll = _chunked_row_losses(features, *chunked[:2], target, loss_fn, chunked[2])
    else:
        lprobs = model.get_normalized_probs((project_features(model, features), None), log_probs=True)
        graph_loss, row_nll = loss_fn(lprobs, target)
        row_loss, row_nll = graph_loss.detach(), row_nll.detach()
    value, coef = _objective_and_coef(objective, row_loss)
    if not _needs_grad(features, chunked):  # scoring only (a frozen copy under no_grad): no second pass
        return value.detach(), row_loss, row_nll, features
    if chunked is not None:
        total, _, _ = _FusedRowLoss.apply(features, *chunked[:2], coef, target, loss_fn, chunked[2])
    else:
        total = (coef.to(graph_loss.dtype) * graph_loss).sum()
    return total - total.detach() + value.detach(), row_loss, row_nll, features


def _needs_grad(features, chunked):
    """Whether a gradient can flow from the losses (into the features or the output layer)."""
    if not torch.is_grad_enabled():
        return False
    return features.requires_grad or (chunked is not None and any(
        p is not None and p.requires_grad for p in chunked[:2]))


def _objective_and_coef(objective, row_loss):
    """(objective(row_loss), ∂objective/∂row_loss) on the detached fp32 losses."""
    with torch.enable_grad():
        scored = row_loss.float().requires_grad_()
        value = objective(scored)
        (coef,) = torch.autograd.grad(value, scored)
    return value, coef


def _bucketed_objective(model, encoder_out, rows_source, prev_output_tokens, target, loss_fn, objective, fused, plan):
    """:func:`_rows_objective` one length bucket at a time: the losses of all rows
    first (each bucket's decoder features kept), then the objective's gradient
    through each bucket's output layer."""
    features, targets, graph_losses, losses, nlls = [], [], [], [], []
    chunked = None
    for idx, width in plan:
        prev_b, target_b, enc_b = _bucket_inputs(model, encoder_out, rows_source, prev_output_tokens, target, idx,
                                                 width)
        feats = decoder_features(model, prev_b, enc_b)
        if not features:
            chunked = _chunked_projection(model, feats, fused)
        if chunked is not None:
            loss, nll = _chunked_row_losses(feats, *chunked[:2], target_b, loss_fn, _rows_per_chunk(feats, chunked[0]))
        else:
            lprobs = model.get_normalized_probs((project_features(model, feats), None), log_probs=True)
            graph_loss, nll = loss_fn(lprobs, target_b)
            graph_losses.append(graph_loss)
            loss, nll = graph_loss.detach(), nll.detach()
        features.append(feats)
        targets.append(target_b)
        losses.append(loss)
        nlls.append(nll)
    n = prev_output_tokens.size(0)
    row_loss, row_nll = _scatter_rows(losses, plan, n), _scatter_rows(nlls, plan, n)
    value, coef = _objective_and_coef(objective, row_loss)
    if not any(_needs_grad(f, chunked) for f in features):
        return value.detach(), row_loss, row_nll, _scatter_positions(features, plan, n, prev_output_tokens.size(1))
    totals = []
    for k, (idx, _) in enumerate(plan):
        coef_b = coef if idx is None else coef.index_select(0, idx)
        if chunked is not None:
            total, _, _ = _FusedRowLoss.apply(features[k], *chunked[:2], coef_b, targets[k], loss_fn,
                                              _rows_per_chunk(features[k], chunked[0]))
        else:
            total = (coef_b.to(graph_losses[k].dtype) * graph_losses[k]).sum()
        totals.append(total)
    total = sum(totals[1:], totals[0])
    full = _scatter_positions(features, plan, n, prev_output_tokens.size(1))
    return total - total.detach() + value.detach(), row_loss, row_nll, full


def rows_objective(model, net_input, rows, per_source, pad, eos, loss_fn, objective, fused=None, loss_target=None,
                   buckets=None, keep=None):
    """:func:`encoded_rows_objective` of ``rows`` ``[B·m, T]`` (``m = per_source`` rows per
    source, source-major), the encoder run once per source.  Gradient-carrying:
    run it as the model's forward (``forward_through(model, rows_objective, ...)``).
    ``eos``: the start symbol, an int or per source ``[B]``; ``loss_target``:
    the rows as ``loss_fn`` sees them (pad where a token is not scored, e.g. a
    forced prefix), default ``rows``; ``buckets``: as for :func:`encoded_rows_objective`
    (each bucket reads its rows' sources from the one encoder output); ``keep``
    ``[B·m]`` bool: score only these rows (e.g. not a duplicate candidate), the others
    reach ``objective`` and the returned tensors as 0 (their gradient must not matter)."""
    batch_size = net_input["src_tokens"].size(0)
    encoder_out = encode(model, net_input)
    device = _first_tensor(encoder_out).device
    rows_source = torch.arange(int(batch_size), device=device).repeat_interleave(per_source)
    prev = prev_output_tokens_from_target(rows, pad, _per_row(eos, per_source))
    target = rows if loss_target is None else loss_target
    if keep is None or bool(keep.all()):
        return _rows_objective(model, encoder_out, rows_source, prev, target, loss_fn, objective, fused, buckets)
    idx = keep.nonzero().squeeze(1)
    n = rows.size(0)

    def scatter(part):  # kept rows' values back at their places, 0 elsewhere
        return part.new_zeros((n,) + tuple(part.shape[1:])).index_copy(0, idx, part)

    loss, row_loss, row_nll, features = _rows_objective(
        model, encoder_out, rows_source[idx], prev[idx], target[idx], loss_fn,
        lambda kept: objective(scatter(kept)), fused, buckets)
    return loss, scatter(row_loss), scatter(row_nll), scatter(features)


# ---------------------------------------------------------------------------
# Length buckets
# ---------------------------------------------------------------------------
# Candidate rows of one batch differ widely in length (a sample stops early, a
# repetition runs to the cap) and are padded to the longest: scored at the
# full width, a third of risk's positions are pad.  A causal decoder's output
# at position t does not depend on later tokens and the losses ignore pad
# targets, so the rows can be scored in a few groups of similar length, each
# cut to its longest row, with the same values and gradients.

MAX_BUCKETS = 4  # decoder calls per scoring at most; 1: the full width in one call (tests compare)
BUCKET_MIN_SAVING = 0.05  # every bucket after the first must save this fraction of the N·T positions


def row_lengths(prev_output_tokens, target, pad):
    """Positions each row needs ``[N]``: one past its last position where the
    decoder input or the target is not pad (at least 1)."""
    used = prev_output_tokens.ne(pad) | target.ne(pad)
    positions = torch.arange(1, used.size(1) + 1, device=used.device)
    return (used.long() * positions).max(dim=1).values.clamp(min=1)


def length_buckets(lengths, width, max_buckets=None, min_saving=None):
    """Rows grouped by length: ``[(rows, width_b)]`` (``rows`` a LongTensor of row
    indices in increasing order, or None for all rows in order), or None when one
    call at the full ``width`` is best (or ``max_buckets`` is 1).

    Each bucket is cut to its longest row.  The grouping minimizes the decoded
    positions Σ_b n_b·width_b plus ``min_saving``·N·width per bucket after the
    first (a decoder call's fixed cost: a split must save at least that many
    positions), over contiguous ranges of the sorted lengths (dynamic
    programming over the distinct lengths), at most ``max_buckets`` buckets.
    """
    max_buckets = MAX_BUCKETS if max_buckets is None else int(max_buckets)
    min_saving = BUCKET_MIN_SAVING if min_saving is None else float(min_saving)
    n = int(lengths.numel())
    if max_buckets <= 1 or n == 0:
        return None
    values, counts = torch.unique(lengths.cpu(), return_counts=True)  # sorted
    values, counts = values.tolist(), counts.tolist()
    cum = [0]
    for c in counts:
        cum.append(cum[-1] + c)
    d = len(values)
    penalty = min_saving * n * width
    inf = float("inf")
    # best[k][j]: cost of the first j distinct lengths in k + 1 buckets; back[k][j]: where its last bucket starts
    best = [[inf] * (d + 1) for _ in range(min(max_buckets, d))]
    back = [[0] * (d + 1) for _ in range(len(best))]
    for j in range(1, d + 1):
        best[0][j] = cum[j] * values[j - 1]
    for k in range(1, len(best)):
        prev, cur, arg = best[k - 1], best[k], back[k]
        for j in range(k + 1, d + 1):
            u = values[j - 1]
            cost, start = min((prev[i] + (cum[j] - cum[i]) * u, i) for i in range(k, j))
            cur[j], arg[j] = cost, start
    _, k = min((best[k][d] + k * penalty, k) for k in range(len(best)))
    if k == 0 and values[-1] >= width:
        return None  # one call at the full width: today's path
    ends, j = [], d
    for level in range(k, -1, -1):
        ends.append(j)
        j = back[level][j]
    widths = [values[j - 1] for j in reversed(ends)]  # increasing
    if len(widths) == 1:
        return [(None, widths[0])]
    bucket = torch.bucketize(lengths, torch.tensor(widths, device=lengths.device, dtype=lengths.dtype))
    return [(bucket.eq(b).nonzero().squeeze(1), w) for b, w in enumerate(widths)]


def _bucket_plan(model, prev_output_tokens, target, buckets):
    """:func:`length_buckets` of the rows, or None (the full-width path) where
    ``buckets`` is 1 or the decoder does not split its output layer (fconv)."""
    max_buckets = MAX_BUCKETS if buckets is None else int(buckets)
    if (max_buckets <= 1 or prev_output_tokens.dim() != 2 or target.shape != prev_output_tokens.shape
            or not splits_output_layer(model.decoder)):
        return None
    lengths = row_lengths(prev_output_tokens, target, model.decoder.dictionary.pad())
    return length_buckets(lengths, prev_output_tokens.size(1), max_buckets)


def _bucket_inputs(model, encoder_out, rows_source, prev_output_tokens, target, idx, width):
    """(decoder input, target, encoder output) of one bucket: rows ``idx`` (None:
    all), cut to ``width``; ``rows_source`` as for :func:`_rows_objective`."""
    if idx is not None:
        prev_output_tokens, target = prev_output_tokens.index_select(0, idx), target.index_select(0, idx)
    order = rows_source if idx is None else (idx if rows_source is None else rows_source.index_select(0, idx))
    if order is not None:
        encoder_out = reorder_encoder_out(model, encoder_out, order)
    return prev_output_tokens[:, :width], target[:, :width], encoder_out


def _scatter_rows(parts, plan, n):
    """Per-row values of the buckets back in the rows' order ``[n, ...]``."""
    if len(plan) == 1 and plan[0][0] is None:
        return parts[0]
    out = parts[0].new_empty((n,) + tuple(parts[0].shape[1:]))
    for (idx, _), part in zip(plan, parts):
        out[idx] = part.to(out.dtype)
    return out


def _scatter_positions(parts, plan, n, width):
    """Per-position ``[n_b, width_b, ...]`` bucket tensors back into ``[n, width, ...]``,
    zero where a bucket was cut (differentiable)."""
    out = parts[0].new_zeros((n, width) + tuple(parts[0].shape[2:]))
    for (idx, w), part in zip(plan, parts):
        if idx is None:
            out[:, :w] = part
        else:
            out[idx, :w] = part
    return out


def sequence_nll(lprobs, target, pad):
    """``loss_fn`` of whole sequences: (NLL [n], NLL [n]) summed over non-pad tokens."""
    nll = token_nll(lprobs, target, pad).sum(dim=-1)
    return nll, nll
