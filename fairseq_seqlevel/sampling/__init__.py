"""Samplers and model-sampling helpers (pure functions, batched, device-agnostic).

* :mod:`.raml`: RAML samplers around a reference (hamming, edit, ngram),
  importance weights.
* :mod:`.vocab`: substitution vocabularies V, V_batch, V_refs.
* :mod:`.token_similarity`: sparse token-level smoothing targets (eq. 13-14).
* :mod:`.teacher_forcing`: score many target rows per source with one encoder pass.
"""

from .raml import (RamlSamples, edit_sampler, effective_sample_size, hamming_distance_log_prior,
                   hamming_sampler, importance_weights, ngram_sampler)
from .vocab import SubstitutionVocab, batch_vocab, full_vocab, refs_vocab

__all__ = [
    "RamlSamples", "edit_sampler", "effective_sample_size", "hamming_distance_log_prior",
    "hamming_sampler", "importance_weights", "ngram_sampler",
    "SubstitutionVocab", "batch_vocab", "full_vocab", "refs_vocab",
]
