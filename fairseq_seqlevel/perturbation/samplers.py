"""RAML samplers: sequence-level loss smoothing (Norouzi et al. 2016; Elbayad et al. 2018).

Draws the L samples approximating ``r(y|y*) ∝ exp(reward(y, y*) / τ)``:
``hamming_sampler``, ``edit_sampler``, ``ngram_sampler``.  Every sampler
also returns ``log_q`` so ``importance_weights`` can reweight for other
rewards.  The L samples of example b are rows b·L .. b·L+L-1; eos and pad
positions are never modified; randomness comes only from ``generator``.

Design: docs/perturbation.md, "Samplers", "Importance weights", "Conventions".
"""

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .vocab import SubstitutionVocab, draw_different_candidates, draw_uniform_candidates


class RamlSamples(NamedTuple):
    """Samples of a RAML sampler.

    Attributes:
        tokens: LongTensor[B·L, T'], sample l of example b at row b·L + l.
        distance: LongTensor[B·L], distance from the target actually applied.
        log_q: FloatTensor[B·L], log probability of the sample under the sampler.
    """

    tokens: Tensor
    distance: Tensor
    log_q: Tensor


# --------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------


def _check_arguments(target: Tensor, num_samples: int, substitution: SubstitutionVocab) -> None:
    if target.dim() != 2:
        raise ValueError(f"target must be B x T, got shape {tuple(target.shape)}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if substitution.sizes.size(0) != target.size(0):
        raise ValueError(
            f"substitution vocabulary has {substitution.sizes.size(0)} rows, "
            f"target has {target.size(0)}"
        )


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def log_binomial(n: Tensor, k: Tensor) -> Tensor:
    """log C(n, k) via lgamma, broadcast; -inf where k < 0 or k > n."""
    n = n.to(torch.get_default_dtype())
    k = k.to(n.dtype)
    valid = (k >= 0) & (k <= n)
    # Clamp before lgamma so that invalid entries do not produce NaNs.
    n_c, k_c = n.clamp(min=0), k.clamp(min=0)
    nk_c = (n - k).clamp(min=0)
    value = torch.lgamma(n_c + 1) - torch.lgamma(k_c + 1) - torch.lgamma(nk_c + 1)
    return torch.where(valid, value, torch.full_like(value, float("-inf")))


def _times_log(count: Tensor, base: Tensor) -> Tensor:
    """count · log(base) with the convention 0 · log 0 = 0 (log of an empty product).

    Needed because a row with a single candidate has |V_sub| - 1 = 0 choices:
    d = 0 must keep weight 1 while every d > 0 gets weight 0 (-inf in log).
    """
    count, base = torch.broadcast_tensors(count.to(torch.get_default_dtype()), base.to(torch.get_default_dtype()))
    return torch.special.xlogy(count, base)


def real_token_mask(target: Tensor, pad: int, eos: int) -> Tensor:
    """BoolTensor like ``target``: True on real tokens (neither pad nor eos)."""
    return target.ne(pad) & target.ne(eos)


def _repeat_per_sample(x: Tensor, num_samples: int) -> Tensor:
    """Repeat each row ``num_samples`` times: row b goes to rows b·L .. b·L+L-1."""
    return x.repeat_interleave(num_samples, dim=0)


def _uniform_ranks(eligible: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """Random rank of each position among the eligible ones of its row.

    Eligible positions of a row get ranks 0..n-1 in uniformly random order
    (other positions get larger ranks), so ``rank < k`` selects a uniformly
    random subset of k eligible positions, without any loop.

    Args:
        eligible: BoolTensor[N, W].

    Returns:
        LongTensor[N, W].
    """
    keys = torch.rand(eligible.shape, generator=generator, device=eligible.device)
    keys = keys.masked_fill(~eligible, 2.0)  # uniform keys are < 1: ineligible rank last
    return keys.argsort(dim=1).argsort(dim=1)


def _draw_from_log_probs(log_probs: Tensor, num_draws: int, generator: Optional[torch.Generator]) -> Tensor:
    """Draw ``num_draws`` indices per row of normalized ``log_probs`` [N, K] -> [N·num_draws]."""
    probs = log_probs.exp()
    return torch.multinomial(probs, num_draws, replacement=True, generator=generator).reshape(-1)


def _row_log_prob(log_probs: Tensor, index: Tensor) -> Tensor:
    """``log_probs[n, index[n]]`` for log_probs [N, K] and index [N]."""
    return log_probs.gather(1, index.unsqueeze(1)).squeeze(1)


def _per_example_vocab_view(x: Tensor, batch_size: int) -> Tensor:
    """[B·L, W] -> [B, L·W]: row b then holds all tokens served by vocab row b."""
    return x.reshape(batch_size, -1)


# --------------------------------------------------------------------------
# priors over the distance
# --------------------------------------------------------------------------


def hamming_distance_log_prior(lengths: Tensor, vocab_sizes: Tensor, temperature: float) -> Tensor:
    """Prior over the Hamming distance d of ``r(y|y*) ∝ exp(-d_H(y, y*) / τ)``.

    There are ``C(T, d) · (|V_sub| - 1)^d`` sequences at Hamming distance d from
    a target of T real tokens (choose d positions, each substituted by one of
    the |V_sub| - 1 other tokens), hence

        log p(d) = log C(T, d) + d·log(|V_sub| - 1) - d/τ - log Z,  d = 0..T.

    Rows with |V_sub| <= 1 cannot substitute anything and put all mass on d = 0.

    Scale of τ: each position is changed independently with probability
    ``(V-1)e^{-1/τ} / (1 + (V-1)e^{-1/τ})``, so with a full vocabulary
    (|V| ~ 3·10^4) τ = 1 changes almost every token; keeping d small needs
    τ of the order of 1/log|V_sub| or smaller (restricted vocabularies allow
    larger τ).

    Args:
        lengths: LongTensor[B], real tokens per row (eos excluded).
        vocab_sizes: LongTensor[B], |V_sub| of each row.
        temperature: τ > 0.

    Returns:
        FloatTensor[B, Tmax + 1] of normalized log probabilities, -inf for d > T_b.
    """
    _check_temperature(temperature)
    max_length = int(lengths.max()) if lengths.numel() > 0 else 0
    d = torch.arange(max_length + 1, device=lengths.device).unsqueeze(0)
    length = lengths.unsqueeze(1)
    num_alternatives = (vocab_sizes.unsqueeze(1) - 1).clamp(min=0)
    logits = log_binomial(length, d) + _times_log(d, num_alternatives) - d / temperature
    return logits - torch.logsumexp(logits, dim=1, keepdim=True)


def _edit_split_log_weights(lengths: Tensor, distance: Tensor, max_distance: int) -> Tensor:
    """log [C(T, k) · C(T + i, i)] of splitting d edits into k touched positions and i = d - k insertions.

    k positions are touched (deleted or substituted); the i insertions form a
    multiset of the T + 1 gaps (stars and bars: C(T + i, i)). ``lengths`` and
    ``distance`` broadcast together to a shape S; the result has shape
    [*S, max_distance + 1] over k = 0..max_distance, -inf where k > d or k > T.
    """
    lengths, distance = torch.broadcast_tensors(lengths, distance)
    k = torch.arange(max_distance + 1, device=lengths.device)
    length = lengths.unsqueeze(-1)
    insertions = distance.unsqueeze(-1) - k
    return log_binomial(length, k) + log_binomial(length + insertions, insertions)


def edit_distance_log_prior(lengths: Tensor, vocab_sizes: Tensor, temperature: float) -> Tensor:
    """Prior over the number d of edit operations for :func:`edit_sampler`.

    ``log p(d) = log N(d) - d/τ - log Z`` for d = 0..T, with the approximate
    stratum size (Norouzi et al. 2016 style: count edit *configurations*,
    ignoring that different configurations can give the same sequence):

        N(d) = Σ_{k+i=d} C(T, k) · |V|^k · C(T + i, i) · |V|^i
             = |V|^d · Σ_k C(T, k) · C(T + d - k, d - k)

    i.e. choose k touched positions, each either deleted or substituted by
    one of |V| - 1 other tokens (|V| choices), and a multiset of i insertion
    gaps among the T + 1 gaps, each inserted token one of |V|. d is capped at T.
    Rows with |V_sub| = 0 put all mass on d = 0.

    Args / Returns: as :func:`hamming_distance_log_prior`.
    """
    _check_temperature(temperature)
    max_length = int(lengths.max()) if lengths.numel() > 0 else 0
    d = torch.arange(max_length + 1, device=lengths.device).unsqueeze(0)
    split = _edit_split_log_weights(lengths.unsqueeze(1), d, max_length)  # [B, d, k]
    log_configurations = torch.logsumexp(split, dim=2)
    logits = log_configurations + _times_log(d, vocab_sizes.unsqueeze(1)) - d / temperature
    logits = logits.masked_fill(d > lengths.unsqueeze(1), float("-inf"))
    return logits - torch.logsumexp(logits, dim=1, keepdim=True)


# --------------------------------------------------------------------------
# samplers
# --------------------------------------------------------------------------


def hamming_sampler(
    target: Tensor,
    pad: int,
    eos: int,
    num_samples: int,
    temperature: float,
    substitution: SubstitutionVocab,
    generator: Optional[torch.Generator] = None,
) -> RamlSamples:
    """Stratified sampler of ``r(y|y*) ∝ exp(-d_H(y, y*) / τ)`` over V_sub (Norouzi et al. 2016).

    (i) d ~ :func:`hamming_distance_log_prior`; (ii) d real positions chosen
    uniformly; (iii) each replaced by a *different* token uniform in V_sub.

    ``log_q = log p(d) - log C(T, d) - Σ_{changed t} log m_t`` with
    m_t = |V_sub| - [y*_t ∈ V_sub] the number of allowed substitutes at t. When
    every target token is in V_sub (V_batch; V_refs containing the target),
    m_t = |V_sub| - 1 and log_q = log p(d) - log C(T, d) - d·log(|V_sub| - 1),
    i.e. the sample is drawn *exactly* from r(y|y*) (uniform inside the
    stratum). Used as an importance proposal, ``log_q`` is what the weights
    need. Target tokens outside V_sub (e.g. unk with the full V) have one more
    choice, so the sampler then only approximates r, but log_q stays exact.

    Args:
        target: LongTensor[B, T], tokens + eos + right padding.
        pad, eos: ids of the padding and end-of-sentence symbols.
        num_samples: L >= 1.
        temperature: τ > 0.
        substitution: SubstitutionVocab with B rows (see ``vocab.py``).
        generator: optional torch.Generator on target's device.

    Returns:
        RamlSamples(tokens [B·L, T], distance [B·L], log_q [B·L]); the samples
        of example b are rows b·L .. b·L+L-1; eos/pad positions untouched.
    """
    _check_arguments(target, num_samples, substitution)
    batch_size = target.size(0)
    real = real_token_mask(target, pad, eos)
    lengths = real.sum(dim=1)
    log_prior = hamming_distance_log_prior(lengths, substitution.sizes, temperature)
    distance = _draw_from_log_probs(log_prior, num_samples, generator)

    repeated = _repeat_per_sample(target, num_samples)
    repeated_real = _repeat_per_sample(real, num_samples)
    chosen = _uniform_ranks(repeated_real, generator) < distance.unsqueeze(1)

    substitutes, num_choices = draw_different_candidates(
        substitution, _per_example_vocab_view(repeated, batch_size), generator
    )
    substitutes = substitutes.view_as(repeated)
    num_choices = num_choices.view_as(repeated)
    tokens = torch.where(chosen, substitutes, repeated)

    no_cost = torch.zeros((), dtype=log_prior.dtype, device=target.device)
    log_substitutions = torch.where(chosen, num_choices.to(log_prior.dtype).log(), no_cost).sum(dim=1)
    sample_lengths = _repeat_per_sample(lengths, num_samples)
    log_q = (
        _row_log_prob(_repeat_per_sample(log_prior, num_samples), distance)
        - log_binomial(sample_lengths, distance)
        - log_substitutions
    )
    return RamlSamples(tokens, distance, log_q)


def _compact_left(values: Tensor, keep: Tensor, width: int, fill: int) -> Tensor:
    """Move the kept entries of each row to its left, in order, into a [N, width] tensor.

    Output position of a kept entry = number of kept entries before it
    (cumsum), written with one scatter; dropped entries go to a scratch column.
    """
    position = keep.long().cumsum(dim=1) - 1
    position = torch.where(keep, position, torch.full_like(position, width))
    out = torch.full((values.size(0), width + 1), fill, dtype=values.dtype, device=values.device)
    out.scatter_(1, position, values)
    return out[:, :width]


def edit_sampler(
    target: Tensor,
    pad: int,
    eos: int,
    num_samples: int,
    temperature: float,
    substitution: SubstitutionVocab,
    generator: Optional[torch.Generator] = None,
) -> RamlSamples:
    """Stratified sampler for ``exp(-d_edit / τ)`` with insertions, deletions, substitutions.

    Generative process, per sample (T = real length, V = |V_sub|):

    1. d ~ :func:`edit_distance_log_prior` (d in 0..T);
    2. k touched positions, ``P(k|d) ∝ C(T, k)·C(T + d - k, d - k)``, and
       i = d - k insertions;
    3. k real positions chosen uniformly; each is deleted with probability
       1/(m_t + 1) or substituted by one of its m_t different candidates
       (m_t = V - 1 when y*_t ∈ V_sub, see ``draw_different_candidates``);
    4. the i insertion gaps form a uniform multiset of the T + 1 gaps (before
       each real token and before eos), drawn by stars and bars: i "star"
       cells among T + i cells, real tokens filling the other cells in order;
       each inserted token is uniform in V_sub.

    Approximations (exact counting is intractable): N(d) counts edit
    configurations, not distinct sequences (e.g. delete + insert of the same
    token cancel, insertions next to an equal token coincide), so d is an
    *upper bound* of the Levenshtein distance and the prior is only
    approximately ``exp(-d_edit/τ)``-proportional. Likewise ``log_q`` is the
    exact log probability of the sampled edit *path* (which lower-bounds the
    marginal of the resulting sequence):

        log_q = log p(d) + log P(k|d) - log C(T, k) - Σ_touched log(m_t + 1)
                - log C(T + i, i) - i·log V
              = log p(d) - log N(d)      when all m_t = V - 1.

    Output: the sampled rows are re-laid out as ``tokens, eos, pad...`` with
    T' = max(T, longest sample + eos). Rows with d = 0 (including rows with no
    real token) are returned verbatim. Insertions need V >= 1: with V = 0 the
    prior forces d = 0.

    Args / Returns: as :func:`hamming_sampler`, tokens of shape [B·L, T'] and
    distance = d, the number of edit operations applied.
    """
    _check_arguments(target, num_samples, substitution)
    batch_size, width = target.shape
    device = target.device
    real = real_token_mask(target, pad, eos)
    lengths = real.sum(dim=1)
    log_prior = edit_distance_log_prior(lengths, substitution.sizes, temperature)
    distance = _draw_from_log_probs(log_prior, num_samples, generator)
    max_length = log_prior.size(1) - 1

    repeated = _repeat_per_sample(target, num_samples)
    repeated_real = _repeat_per_sample(real, num_samples)
    sample_lengths = _repeat_per_sample(lengths, num_samples)
    sample_sizes = _repeat_per_sample(substitution.sizes, num_samples)

    # Step 2: split the d edits into k touched positions and i insertions.
    split = _edit_split_log_weights(sample_lengths, distance, max_length)  # [N, k]
    log_split = split - torch.logsumexp(split, dim=1, keepdim=True)
    touched_count = _draw_from_log_probs(log_split, 1, generator)
    insertion_count = distance - touched_count

    # Step 3: touched positions, each deleted or substituted with prob 1/(m+1) per outcome.
    # Real tokens form the prefix of every row (fairseq right padding), so position
    # j < T is real token j.
    touched = _uniform_ranks(repeated_real, generator) < touched_count.unsqueeze(1)
    substitutes, num_choices = draw_different_candidates(
        substitution, _per_example_vocab_view(repeated, batch_size), generator
    )
    substitutes = substitutes.view_as(repeated)
    num_choices = num_choices.view_as(repeated)
    deletion_draw = torch.rand(repeated.shape, generator=generator, device=device)
    deleted = touched & (deletion_draw * (num_choices + 1) < 1)
    substituted = touched & ~deleted
    edited = torch.where(substituted, substitutes, repeated)

    # Step 4: stars and bars over T + i cells; bars carry the real tokens in order.
    num_cells = max_length + (int(insertion_count.max()) if insertion_count.numel() > 0 else 0)
    cell = torch.arange(num_cells, device=device).unsqueeze(0)
    valid_cell = cell < (sample_lengths + insertion_count).unsqueeze(1)
    is_insertion = valid_cell & (_uniform_ranks(valid_cell, generator) < insertion_count.unsqueeze(1))
    is_original = valid_cell & ~is_insertion
    source = (is_original.long().cumsum(dim=1) - 1).clamp(min=0, max=width - 1)
    inserted = draw_uniform_candidates(
        substitution, num_samples * num_cells, generator
    ).view(-1, num_cells)
    cell_tokens = torch.where(is_insertion, inserted, edited.gather(1, source))
    keep = is_insertion | (is_original & ~deleted.gather(1, source))

    # Re-layout: kept cells left-aligned, then eos (rows that had one), then pad.
    sample_real_length = keep.sum(dim=1)
    out_width = max(width, int(sample_real_length.max()) + 1 if sample_real_length.numel() > 0 else width)
    tokens = _compact_left(cell_tokens, keep, out_width, pad)
    has_eos = repeated.eq(eos).any(dim=1)
    eos_column = torch.where(has_eos, sample_real_length, torch.full_like(sample_real_length, out_width))
    tokens = torch.cat([tokens, tokens.new_full((tokens.size(0), 1), pad)], dim=1)
    tokens.scatter_(1, eos_column.unsqueeze(1), eos)
    tokens = tokens[:, :out_width]
    # Rows without edits are returned verbatim (also covers rows with another layout).
    unchanged = torch.full_like(tokens, pad)
    unchanged[:, :width] = repeated
    tokens = torch.where(distance.eq(0).unsqueeze(1), unchanged, tokens)

    dtype = log_prior.dtype
    log_touched = torch.where(
        touched, (num_choices + 1).to(dtype).log(), torch.zeros((), dtype=dtype, device=device)
    ).sum(dim=1)
    log_q = (
        _row_log_prob(_repeat_per_sample(log_prior, num_samples), distance)
        + _row_log_prob(log_split, touched_count)
        - log_binomial(sample_lengths, touched_count)
        - log_touched
        - log_binomial(sample_lengths + insertion_count, insertion_count)
        - _times_log(insertion_count, sample_sizes)
    )
    return RamlSamples(tokens, distance, log_q)


def ngram_sampler(
    target: Tensor,
    pad: int,
    eos: int,
    num_samples: int,
    temperature: float,
    substitution: SubstitutionVocab,
    generator: Optional[torch.Generator] = None,
    max_ngram: int = 4,
) -> RamlSamples:
    """Replace one random n-gram by random tokens (Ma et al. 2017; ERAC-VAML / Texar RAML).

    n is uniform in 1..n_max with n_max = min(max_ngram, T), the start
    position uniform among the T - n + 1 positions of an n-gram of real
    tokens, and each of the n tokens uniform in V_sub (it may equal the
    original token, as in the reference implementations). ``temperature`` is
    accepted for a uniform interface and ignored: this proposal has no prior.

    ``log_q = -log n_max - log(T - n + 1) - n·log|V_sub|`` is the log
    probability of the sampled (n, position, tokens) path; a sequence reachable
    through several paths (a drawn token equal to the original) has a
    slightly larger marginal, which is ignored. ``distance`` is the Hamming
    distance actually applied (<= n, positions whose token changed). Rows
    with T = 0 or an empty V_sub are returned unchanged with log_q = 0.

    Args / Returns: as :func:`hamming_sampler`; tokens of shape [B·L, T].
    """
    _check_arguments(target, num_samples, substitution)
    if max_ngram < 1:
        raise ValueError(f"max_ngram must be >= 1, got {max_ngram}")
    width = target.size(1)
    device = target.device
    real = real_token_mask(target, pad, eos)
    repeated = _repeat_per_sample(target, num_samples)
    sample_lengths = _repeat_per_sample(real.sum(dim=1), num_samples)
    sample_sizes = _repeat_per_sample(substitution.sizes, num_samples)
    active = (sample_lengths > 0) & (sample_sizes > 0)

    max_n = sample_lengths.clamp(max=max_ngram)
    uniform = torch.rand((2, repeated.size(0)), generator=generator, device=device)
    n = (uniform[0] * max_n).floor().long().clamp(max=(max_n - 1).clamp(min=0)) + 1
    num_starts = (sample_lengths - n + 1).clamp(min=1)
    start = (uniform[1] * num_starts).floor().long().clamp(max=num_starts - 1)

    position = torch.arange(width, device=device).unsqueeze(0)
    in_span = (position >= start.unsqueeze(1)) & (position < (start + n).unsqueeze(1))
    in_span = in_span & active.unsqueeze(1)
    replacements = draw_uniform_candidates(substitution, num_samples * width, generator).view_as(repeated)
    tokens = torch.where(in_span, replacements, repeated)
    distance = tokens.ne(repeated).sum(dim=1)

    dtype = torch.get_default_dtype()
    log_q = -(
        max_n.clamp(min=1).to(dtype).log()
        + num_starts.to(dtype).log()
        + _times_log(n, sample_sizes.clamp(min=1))
    )
    log_q = torch.where(active, log_q, torch.zeros_like(log_q))
    return RamlSamples(tokens, distance, log_q)


# --------------------------------------------------------------------------
# importance sampling (Elbayad et al. 2018, eq. 11-12)
# --------------------------------------------------------------------------


def importance_weights(log_reward_over_tau: Tensor, log_q: Tensor, num_samples: int) -> Tensor:
    """Self-normalized importance weights ``ω_l ∝ exp(r(y_l, y*)/τ - log q(y_l))`` (eq. 11).

    Normalized (softmax) within each group of L consecutive samples, i.e. per
    example under the row layout of the samplers. A group whose every logit is
    -inf (no sample has any mass) gets uniform weights instead of NaNs.

    Args:
        log_reward_over_tau: FloatTensor[B·L], r(y_l, y*)/τ.
        log_q: FloatTensor[B·L], log proposal probability of each sample.
        num_samples: L.

    Returns:
        FloatTensor[B·L], non-negative, summing to 1 over each group.
    """
    logits = (log_reward_over_tau - log_q).reshape(-1, num_samples)
    hopeless = torch.isneginf(logits).all(dim=1, keepdim=True)
    logits = logits.masked_fill(hopeless, 0.0)
    return torch.softmax(logits, dim=1).reshape(-1)


def effective_sample_size(weights: Tensor, num_samples: int) -> Tensor:
    """Effective sample size ``1 / Σ_l ω_l²`` of each group of L normalized weights.

    Args:
        weights: FloatTensor[B·L] (from :func:`importance_weights`).
        num_samples: L.

    Returns:
        FloatTensor[B], in [1, L].
    """
    return weights.reshape(-1, num_samples).pow(2).sum(dim=1).reciprocal()
