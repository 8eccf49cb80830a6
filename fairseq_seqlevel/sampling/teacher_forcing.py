"""Batched teacher-forced scoring of many target sequences per source.

Works with any fairseq encoder-decoder model (``lstm``, ``transformer``): the
source is encoded once and the encoder output is expanded with the model's own
``reorder_encoder_out`` (as fairseq's generator does for beams), so scoring L
extra sequences per example costs decoder work only.
"""

import torch


def prev_output_tokens_from_target(target, pad, eos):
    """fairseq's decoder input for right-padded targets ending in eos.

    ``[eos, y_1, ..., y_{T-1}]`` per row, pad where the target is pad: exactly
    what ``LanguagePairDataset`` builds with ``move_eos_to_beginning``.
    """
    prev = torch.cat([target.new_full((target.size(0), 1), eos), target[:, :-1]], dim=1)
    return prev.masked_fill(target.eq(pad), pad)


def encode(model, net_input):
    """Run the encoder once on a fairseq ``net_input``."""
    return model.encoder(net_input["src_tokens"], src_lengths=net_input["src_lengths"])


def expand_encoder_out(model, encoder_out, repeats):
    """Repeat each example's encoder output ``repeats`` times (row b*repeats+k)."""
    batch_size = _encoder_batch_size(encoder_out)
    device = _first_tensor(encoder_out).device
    new_order = torch.arange(batch_size, device=device).repeat_interleave(repeats)
    return model.encoder.reorder_encoder_out(encoder_out, new_order)


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


def _encoder_batch_size(encoder_out):
    # transformer: dict with "encoder_out": [T x B x C]; lstm: tuple (out T x B x C, h, c, mask)
    if isinstance(encoder_out, dict):
        return encoder_out["encoder_out"][0].size(1)
    return encoder_out[0].size(1)
