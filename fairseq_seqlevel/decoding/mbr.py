"""Minimum Bayes risk (MBR) decoding behind fairseq's generator interface.

MBR (Kumar & Byrne 2004; Eikema & Aziz 2020) draws N candidate outputs of a
source and returns the one of highest expected utility, the candidates serving
as pseudo-references: ``argmax_i (1/N) Σ_j u(c_i, c_j)`` with ``c_i`` scored
as the hypothesis against ``c_j`` as the reference.  The candidate itself is
among the pseudo-references (``j = i`` included), as the ``mbrs`` library
computes it (``DecoderMBR``: the mean of the full H x R matrix).

:class:`MbrGenerator` is what ``seqlevel_translation``'s ``build_generator``
returns with ``--mbr-candidates N``: ``fairseq-generate`` and
``fairseq-interactive`` call its :meth:`~MbrGenerator.generate` through
``task.inference_step`` as they call a ``SequenceGenerator``.  Candidates come
from the batched sampler (:mod:`fairseq_seqlevel.decoding.sampler`: epsilon or
multinomial sampling, with the task's start symbol, forced prefix and end
symbol) or from the task's own beam search (its N-best); the N x N utility
matrices of a batch are one call of a batched reward (:func:`utility_matrix`).

Design: docs/mbr.md.
"""

from typing import List, NamedTuple, Optional

import torch
from torch import Tensor

from fairseq_seqlevel.decoding.layout import OutputLayout
from fairseq_seqlevel.decoding.sampler import sample as sample_outputs
from fairseq_seqlevel.rewards.output_view import OutputView, ViewedReward, viewed

#: ``--mbr-sampling``: where the candidates come from
SAMPLINGS = ("epsilon", "multinomial", "beam")

#: the largest pair tensor (pairs x width ids) that :func:`utility_matrix` builds at once
PAIR_ELEMENT_BUDGET = 1 << 22


def utility_matrix(candidates: Tensor, utility, budget: int = PAIR_ELEMENT_BUDGET) -> Tensor:
    """``U [B, N, N]`` with ``U[b, i, j] = utility(c_bi, c_bj)`` (``c_bi`` the
    hypothesis, ``c_bj`` its one reference) for ``candidates [B, N, T]``
    (right-padded rows; a bound reward's ``utility(hyp, refs)``).

    All ordered pairs, the diagonal included, in one call of ``utility`` per
    chunk of sources (a chunk's pair tensor stays below ``budget`` ids).  What
    does not depend on the pair is done once per candidate, not once per pair:
    the output view of a :class:`ViewedReward` and the word merging of a bound
    reward at ``--reward-level word`` (its ``merger``)."""
    out = torch.empty(candidates.shape[:2] + candidates.shape[1:2], dtype=torch.float, device=candidates.device)
    if candidates.size(0) == 0 or candidates.size(1) == 0:
        return out
    candidates, utility = _per_candidate(candidates, utility)
    batch, n, width = candidates.shape
    rows = torch.arange(n, device=candidates.device)
    hyp_index, ref_index = rows.repeat_interleave(n), rows.repeat(n)  # pair i*n + j
    chunk = max(1, budget // max(1, n * n * width))
    for start in range(0, batch, chunk):
        part = candidates[start:start + chunk]
        hyp = part[:, hyp_index].reshape(-1, width)
        ref = part[:, ref_index].reshape(-1, width)
        out[start:start + chunk] = utility(hyp, ref).float().view(-1, n, n)
    return out


def _per_candidate(candidates: Tensor, utility):
    """(candidates as ``utility``'s scorer reads them, that scorer): the view and the
    word merging applied to each candidate once (both act on each row alone)."""
    if isinstance(utility, ViewedReward):
        candidates, utility = utility.view(candidates), utility.inner
    merger = getattr(utility, "merger", None)
    if merger is None or not hasattr(utility, "reward"):  # ids as they are (chrF merges nothing)
        return candidates, utility
    batch, n, width = candidates.shape
    words = merger(candidates.reshape(-1, width))
    inner, pad, eos = utility.reward, utility.pad, utility.eos

    def on_words(hyp, refs):  # BoundReward.__call__ after its _words
        return inner(hyp, refs, pad, eos=eos)

    return words.view(batch, n, -1), on_words


def expected_utility(matrix: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """``[B, N]``: each candidate's mean utility against the valid candidates
    (itself included, as ``mbrs``); -inf for an invalid candidate (``valid [B, N]``,
    None: all valid)."""
    if valid is None:
        return matrix.mean(dim=-1)
    weights = valid.unsqueeze(1).to(matrix.dtype)
    mean = (matrix * weights).sum(dim=-1) / weights.sum(dim=-1).clamp(min=1)
    return mean.masked_fill(~valid, -float("inf"))


def first_occurrences(candidates: Tensor, valid: Tensor) -> Tensor:
    """``[B, N]``: valid and not equal to an earlier valid candidate of the same source."""
    equal = candidates.unsqueeze(2).eq(candidates.unsqueeze(1)).all(dim=-1)  # [B, N, N]
    equal &= valid.unsqueeze(1) & valid.unsqueeze(2)
    earlier = torch.ones_like(equal[0]).tril(diagonal=-1)  # j < i
    return valid & ~(equal & earlier).any(dim=-1)


class Ranking(NamedTuple):
    order: Tensor     # LongTensor [B, N]: candidate ids, highest expected utility first (stable: ties by id)
    expected: Tensor  # float [B, N]: expected utility of each candidate (by id), -inf if invalid
    distinct: Tensor  # BoolTensor [B, N]: by id, valid and the first of its equal candidates


def rank(candidates: Tensor, utility, valid: Optional[Tensor] = None, budget: int = PAIR_ELEMENT_BUDGET) -> Ranking:
    """MBR ranking of ``candidates [B, N, T]``: the first of ``order`` is the MBR
    output (the medoid under ``utility``); ties go to the lower candidate id
    (sampling order, or beam rank)."""
    if valid is None:
        valid = torch.ones(candidates.shape[:2], dtype=torch.bool, device=candidates.device)
    expected = expected_utility(utility_matrix(candidates, utility, budget), valid)
    order = expected.sort(dim=-1, descending=True, stable=True).indices
    return Ranking(order, expected, first_occurrences(candidates, valid))


def _grouped(rows: List[Tensor], per_source: int, pad: int, device) -> Tensor:
    """Rows (a source's ``per_source`` in a run, ``None`` for a missing one) as ``[B, N, T]``."""
    width = max([1] + [r.numel() for r in rows if r is not None])
    out = torch.full((len(rows), width), pad, dtype=torch.long, device=device)
    for k, row in enumerate(rows):
        if row is not None:
            out[k, :row.numel()] = row
    return out.view(-1, per_source, width)


class MbrGenerator:
    """A generator (``generate(models, sample, prefix_tokens=, constraints=,
    bos_token=)``, fairseq's output format) that returns, per source, its
    distinct candidates ordered by expected utility: ``--nbest k`` prints the
    k best.  Each hypothesis keeps the model's scores (``score``: the summed
    token log-probs over length ** ``len_penalty``, as ``SequenceGenerator``
    normalizes; ``positional_scores``) and adds ``mbr_utility`` (its expected
    utility) and ``mbr_candidate`` (its candidate id).

    Args:
        model: the model candidates are sampled from (an ensemble's first);
            ``base.generate`` decodes beam candidates.
        base: the task's own generator, with a beam of ``candidates`` for
            ``sampling == "beam"``; its ``eos`` and ``symbols_to_strip_from_output``
            are this generator's.
        utility: a bound reward ``utility(hyp, refs)`` on the target dictionary's
            ids (:func:`fairseq_seqlevel.rewards.binding.bind_reward`).
    """

    def __init__(self, model, base, dictionary, utility, candidates: int, sampling: str = "epsilon",
                 epsilon: float = 0.02, max_len_a: float = 0, max_len_b: float = 200, min_len: int = 1,
                 temperature: float = 1.0, normalize_scores: bool = True, len_penalty: float = 1.0,
                 budget: int = PAIR_ELEMENT_BUDGET):
        if sampling not in SAMPLINGS:
            raise ValueError(f"MbrGenerator: unknown sampling {sampling!r}; known: {', '.join(SAMPLINGS)}")
        if candidates < 1:
            raise ValueError(f"MbrGenerator: candidates must be >= 1, got {candidates}")
        self.model, self.base, self.dictionary, self.utility = model, base, dictionary, utility
        self.candidates, self.sampling, self.epsilon = int(candidates), sampling, float(epsilon)
        self.max_len_a, self.max_len_b, self.min_len = max_len_a, max_len_b, int(min_len)
        self.temperature, self.normalize_scores, self.len_penalty = temperature, normalize_scores, len_penalty
        self.budget = budget
        self.pad = dictionary.pad()
        self.eos = int(getattr(base, "eos", dictionary.eos()))
        strip = getattr(base, "symbols_to_strip_from_output", None)
        self.symbols_to_strip_from_output = set(strip) if strip is not None else {self.eos}

    def layout(self, batch_size: int, prefix_tokens: Optional[Tensor], bos_token: Optional[int],
               device) -> OutputLayout:
        """The rows as ``SequenceGenerator`` lays them out: ``bos_token`` (default:
        the end symbol) starts them, ``prefix_tokens`` are forced; the view drops
        the prefix and the stripped symbols before scoring (forced tokens are
        every candidate's, they neither earn nor lose utility)."""
        start = self.eos if bos_token is None else int(bos_token)
        bos = torch.full((batch_size,), start, dtype=torch.long, device=device)
        prefix = (torch.empty((batch_size, 0), dtype=torch.long, device=device) if prefix_tokens is None
                  else prefix_tokens.to(device))
        view = OutputView(prefix.size(1), {self.eos}, self.symbols_to_strip_from_output, self.dictionary.eos(),
                          self.pad)
        return OutputLayout(bos, prefix, self.eos, view)

    @torch.no_grad()
    def generate(self, models, sample, prefix_tokens: Optional[Tensor] = None, constraints=None,
                 bos_token: Optional[int] = None, **kwargs):
        net_input = sample["net_input"]
        device = net_input["src_tokens"].device
        batch_size, n = net_input["src_tokens"].size(0), self.candidates
        layout = self.layout(batch_size, prefix_tokens, bos_token, device)
        hypos, found = self._candidates(sample, layout, prefix_tokens, constraints, bos_token)
        if found is None:  # beam search: up to N hypotheses per source
            rows = [h[k]["tokens"] if k < len(h) else None for h in hypos for k in range(n)]
            found = _grouped(rows, n, self.pad, device)
            valid = torch.tensor([r is not None for r in rows], dtype=torch.bool, device=device).view(batch_size, n)
        else:
            valid = None
        ranking = rank(found, viewed(self.utility, layout.view), valid, self.budget)
        order, expected, distinct = (t.tolist() for t in ranking)
        out = []
        for b in range(batch_size):
            ranked = []
            for k in order[b]:
                if distinct[b][k]:
                    ranked.append(dict(hypos[b][k], mbr_utility=expected[b][k], mbr_candidate=k))
            out.append(ranked)
        return out

    def _candidates(self, sample, layout, prefix_tokens, constraints, bos_token):
        """Per source, its candidates as fairseq hypothesis dicts (up to N), and
        sampled candidates as ``[B, N, T]`` (None for beam candidates)."""
        if self.sampling == "beam":
            return self.base.generate([self.model], sample, prefix_tokens=prefix_tokens, constraints=constraints,
                                      bos_token=bos_token), None
        found = sample_outputs(self.model, sample["net_input"], n=self.candidates, strategy=self.sampling,
                               temperature=self.temperature, max_len_a=self.max_len_a, max_len_b=self.max_len_b,
                               min_len=self.min_len, layout=layout, epsilon=self.epsilon)
        hypos, n = [], self.candidates
        for row, length in enumerate(found.lengths.tolist()):
            if row % n == 0:
                hypos.append([])
            positional = found.lprobs[row, :length].clone()
            score = positional.sum()
            if self.normalize_scores:
                score = score / length ** self.len_penalty
            hypos[-1].append({"tokens": found.tokens[row, :length].clone(), "score": score, "attention": None,
                              "alignment": torch.empty(0), "positional_scores": positional})
        return hypos, found.tokens.view(len(hypos), n, -1)
