"""Token-level smoothing as criterions use it: the table from the flags, and
the per-token loss of eq. 16 for one or many targets per distribution."""

import logging

import torch

from fairseq_seqlevel.errors import InputFileError, check, file_problem
from fairseq_seqlevel.perturbation.vocab import never_sampled_ids

from .embeddings import EmbeddingFileError, load_text_embeddings
from .targets import SparseTokenTargets, smoothed_token_loss_many

logger = logging.getLogger(__name__)


def check_token_smooth_config(cfg, alpha_flag="--token-smooth-alpha"):
    check(0.0 <= cfg.token_smooth_alpha <= 1.0,
          f"{alpha_flag} must be in [0, 1], got {cfg.token_smooth_alpha}")
    check(cfg.token_smooth_temperature > 0,
          f"--token-smooth-temperature must be > 0, got {cfg.token_smooth_temperature}")
    check(cfg.token_smooth_beta >= 0, f"--token-smooth-beta must be >= 0, got {cfg.token_smooth_beta}")
    check(cfg.token_smooth_topk >= 1, f"--token-smooth-topk must be >= 1, got {cfg.token_smooth_topk}")


def build_token_targets(cfg, dictionary):
    """The sparse smoothing table for ``dictionary`` (None when α = 0).

    Special symbols (bos, pad, eos, unk, madeupword fillers) take no part:
    their own target stays one-hot and no word is smoothed towards them.
    """
    if cfg.token_smooth_alpha == 0:
        return None
    path = cfg.token_embeddings
    check(path is not None,
          "--token-embeddings FILE is required when --token-smooth-alpha > 0 "
          "(build one with examples/build_token_embeddings.py)")
    try:
        embeddings, report = load_text_embeddings(path, dictionary)
    except EmbeddingFileError as e:  # "path:line: why"
        raise InputFileError(f"--token-embeddings {e}") from None
    except OSError as e:
        # a checkpoint remembers the path; fairseq-validate/generate can point elsewhere
        raise file_problem("--token-embeddings", path,
                           f"{e.strerror or e} (to evaluate a checkpoint trained with it, pass "
                           f"--model-overrides \"{{'token_embeddings': 'NEW_PATH'}}\")") from None
    logger.info(f"token embeddings: {report}")
    freqs = torch.tensor(dictionary.count, dtype=torch.float)
    candidates = torch.ones(len(dictionary), dtype=torch.bool)
    candidates[never_sampled_ids(dictionary)] = False
    return SparseTokenTargets.from_embeddings(
        embeddings, k=min(cfg.token_smooth_topk, len(dictionary)), freqs=freqs,
        beta=cfg.token_smooth_beta, candidate_mask=candidates,
    )


def smoothed_sequence_loss(lprobs, target, pad, token_targets=None, alpha=0.0, temperature=1.0):
    """Per-token loss N x T of eq. 16 and the plain NLL N x T (pad -> 0).

    With ``token_targets`` None or α = 0 both are the NLL.
    """
    loss, nll = _token_losses(lprobs, target.unsqueeze(-1), pad, token_targets, alpha, temperature)
    return loss.squeeze(-1), nll.squeeze(-1)


def lazy_sample_losses(lprobs, samples, pad, token_targets=None, alpha=0.0, temperature=1.0):
    """Per-token loss and NLL [B, L, T] of L sequences per row scored with the
    row's own distributions (eq. 19): ``lprobs`` [B, T, V], ``samples`` [B, L, T].

    The same values as :func:`smoothed_sequence_loss` on ``lprobs`` expanded
    to [B, L, T, V], but the samples are gathered along the vocabulary axis,
    so the backward pass scatters into [B, T, V] instead of [B, L, T, V].
    """
    loss, nll = _token_losses(lprobs, samples.transpose(1, 2), pad, token_targets, alpha, temperature)
    return loss.transpose(1, 2), nll.transpose(1, 2)


def _token_losses(lprobs, targets_many, pad, token_targets, alpha, temperature):
    """Eq. 16 loss and NLL of M targets per distribution: lprobs [*, V], targets [*, M]."""
    nll = -lprobs.gather(-1, targets_many).masked_fill(targets_many.eq(pad), 0.0)
    if token_targets is None or alpha == 0:
        return nll, nll
    ce = smoothed_token_loss_many(lprobs, targets_many, token_targets, temperature, ignore_index=pad)
    return alpha * ce + (1.0 - alpha) * nll, nll
