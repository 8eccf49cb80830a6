"""Small pieces every sequence-level criterion needs."""

import torch


def references_of(sample):
    """B x R x T references: the task's multi-reference tensor, else the target."""
    refs = sample.get("references")
    return refs if refs is not None else sample["target"].unsqueeze(1)


def pad_right(tokens, width, pad):
    """Right-pad a B x T tensor to B x width (unchanged if already as wide)."""
    if tokens.size(1) >= width:
        return tokens
    return torch.cat([tokens, tokens.new_full((tokens.size(0), width - tokens.size(1)), pad)], dim=1)


def unsampleable_ids(dictionary, include_eos=True):
    """Ids a generated or sampled sentence must never contain as a word.

    bos, pad, unk (and eos unless ``include_eos`` is False), plus the
    "madeupword" fillers fairseq pads dictionaries with up to a multiple of 8.
    """
    ids = {dictionary.bos(), dictionary.pad(), dictionary.unk()}
    if include_eos:
        ids.add(dictionary.eos())
    ids |= {i for i, s in enumerate(dictionary.symbols) if s.startswith("madeupword")}
    return sorted(ids)
