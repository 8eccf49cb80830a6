"""Perturbations of a reference, with no model (pure functions, batched, device-agnostic).

* :mod:`.samplers`: RAML samplers around a reference (hamming, edit, ngram),
  importance weights.
* :mod:`.vocab`: substitution vocabularies V, V_batch, V_refs.

Decoding the model (samples, roll-outs, Gumbel-top-k) is :mod:`fairseq_seqlevel.decoding`.
"""

from .samplers import (RamlSamples, edit_sampler, effective_sample_size, hamming_distance_log_prior,
                   hamming_sampler, importance_weights, ngram_sampler)
from .vocab import SubstitutionVocab, batch_vocab, full_vocab, never_sampled_ids, refs_vocab

__all__ = [
    "RamlSamples", "edit_sampler", "effective_sample_size", "hamming_distance_log_prior",
    "hamming_sampler", "importance_weights", "ngram_sampler",
    "SubstitutionVocab", "batch_vocab", "full_vocab", "never_sampled_ids", "refs_vocab",
]
