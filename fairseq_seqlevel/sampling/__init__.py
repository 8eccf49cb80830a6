"""Samplers and model-sampling helpers (pure functions, batched, device-agnostic).

* :mod:`.raml`: RAML samplers around a reference (hamming, edit, ngram),
  importance weights.
* :mod:`.vocab`: substitution vocabularies V, V_batch, V_refs.
* :mod:`.gumbel`: k tokens without replacement (Gumbel-top-k).
"""

from .raml import (RamlSamples, edit_sampler, effective_sample_size, hamming_distance_log_prior,
                   hamming_sampler, importance_weights, ngram_sampler)
from .vocab import SubstitutionVocab, batch_vocab, full_vocab, never_sampled_ids, refs_vocab

__all__ = [
    "RamlSamples", "edit_sampler", "effective_sample_size", "hamming_distance_log_prior",
    "hamming_sampler", "importance_weights", "ngram_sampler",
    "SubstitutionVocab", "batch_vocab", "full_vocab", "never_sampled_ids", "refs_vocab",
]
