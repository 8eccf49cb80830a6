"""What a task shows a user of an output row, so rewards score only that.

A task may lay out its target rows with tokens that are not words: a forced
prefix (the target-language token of ``translation_multi_simple_epoch``), an
end symbol other than the dictionary's eos (mBART's ``[lang]``), symbols its
generator strips from the output.  :class:`OutputView` maps rows in the
task's layout to plain rows (words, then the dictionary's eos, then pad), the
way ``fairseq-generate`` turns hypotheses and targets into text; a
:class:`ViewedReward` applies it to hypotheses and references before scoring,
so forced tokens can neither earn nor lose reward.
"""

from typing import Iterable

import torch
from torch import Tensor


class OutputView:
    """Rows ``[..., T]`` -> the same rows without their first ``prefix_len``
    tokens and without ``strip`` symbols, each ``end`` symbol turned into
    ``eos``; right-padded with ``pad``, the width kept.

    The identity (returns its input) when there is nothing to drop or map."""

    def __init__(self, prefix_len: int, end: Iterable[int], strip: Iterable[int], eos: int, pad: int):
        self.prefix_len = int(prefix_len)
        self.end = sorted({int(e) for e in end} - {eos})
        self.strip = sorted({int(s) for s in strip} - {eos, pad} - set(self.end))
        self.eos, self.pad = eos, pad
        self.identity = self.prefix_len == 0 and not self.end and not self.strip

    def kept(self, rows: Tensor) -> Tensor:
        """BoolTensor like ``rows``: the positions the view keeps."""
        keep = torch.ones_like(rows, dtype=torch.bool)
        keep[..., :self.prefix_len] = False
        if self.strip:
            keep &= ~torch.isin(rows, torch.tensor(self.strip, device=rows.device))
        return keep

    def __call__(self, rows: Tensor) -> Tensor:
        if self.identity:
            return rows
        if self.end:
            rows = rows.masked_fill(torch.isin(rows, torch.tensor(self.end, device=rows.device)), self.eos)
        keep = self.kept(rows)
        # kept tokens first, in order (a stable sort), then pad
        order = (~keep).to(torch.uint8).argsort(dim=-1, stable=True)
        out = rows.gather(-1, order)
        width = keep.sum(dim=-1, keepdim=True)
        position = torch.arange(rows.size(-1), device=rows.device)
        return out.masked_fill(position >= width, self.pad)

    def prefix_values(self, rows: Tensor, viewed_values: Tensor, empty_value: Tensor) -> Tensor:
        """Per-position values ``[N, T]`` of the original rows, from the values
        of every prefix of the viewed rows (``viewed_values [N, T]``): a
        position gets the value of the viewed prefix that ends at or before it,
        ``empty_value [N]`` before the first kept token."""
        if self.identity:
            return viewed_values
        if self.end:
            rows = rows.masked_fill(torch.isin(rows, torch.tensor(self.end, device=rows.device)), self.eos)
        last = self.kept(rows).long().cumsum(dim=-1) - 1
        values = viewed_values.gather(-1, last.clamp(min=0))
        return torch.where(last >= 0, values, empty_value.to(values.dtype).unsqueeze(-1))


class ViewedReward:
    """A bound reward (``reward(hyp, refs)``, ``cost``, ``prefix``,
    ``bleu_stats``) that scores what ``view`` shows of hypotheses and
    references.  ``prefix(hyp, refs) [B, T]`` stays aligned with ``hyp``'s
    positions: a dropped token keeps the value of the prefix before it."""

    def __init__(self, reward, view: OutputView):
        self.inner, self.view = reward, view

    @property
    def name(self):
        return self.inner.name

    @property
    def higher_is_better(self):
        return self.inner.higher_is_better

    def _both(self, hyp, refs):
        return self.view(hyp), self.view(refs)

    def __call__(self, hyp, refs):
        return self.inner(*self._both(hyp, refs))

    def cost(self, hyp, refs):
        return self.inner.cost(*self._both(hyp, refs))

    def bleu_stats(self, hyp, refs):
        return self.inner.bleu_stats(*self._both(hyp, refs))

    def prefix(self, hyp, refs):
        viewed, viewed_refs = self._both(hyp, refs)
        values = self.inner.prefix(viewed, viewed_refs)
        if self.view.identity:
            return values
        empty = viewed.new_full((viewed.size(0), 1), self.view.eos)
        return self.view.prefix_values(hyp, values, self.inner(empty, viewed_refs))


def viewed(reward, view: OutputView):
    """``reward`` scoring what ``view`` shows; ``reward`` itself where the view
    is the identity or the reward already scores a view."""
    if view.identity or isinstance(reward, ViewedReward):
        return reward
    return ViewedReward(reward, view)
