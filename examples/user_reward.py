"""A user reward for ``--reward python:user_reward:score`` (the contract: fairseq_seqlevel/rewards/user.py).

It runs here without downloads: a batched character-trigram cosine similarity, shaped like a
neural scorer (a model loaded once, then scored in batches of (hypothesis, reference) pairs).
Train with it through the stock CLI (the module must be importable: PYTHONPATH=examples):

    PYTHONPATH=examples fairseq-train DATA --user-dir fairseq_seqlevel --task seqlevel_translation \\
        --criterion risk --reward python:user_reward:score ...

Your own local COMET checkpoint instead (``pip install unbabel-comet``): change the two lines
marked (1) and (2) to

    (1)     from comet import load_from_checkpoint; return load_from_checkpoint("/path/to/model.ckpt")
    (2)     values = comet_scores(MODEL, flat_hyps, flat_refs)

Rewards see no source sentence (yet): COMET models read one, so :func:`comet_scores` repeats the
reference as ``src`` -- a stand-in that keeps COMET's input format; a reference-only scorer (BLEURT:
``BleurtScorer(path).score(references=flat_refs, candidates=flat_hyps)``) needs none.  The clamp
keeps the declared range [0, 1]: a value outside it stops training with a one-line error.
"""

import zlib

import torch

from fairseq_seqlevel.rewards.user import user_reward

MODEL = None  # loaded on the first call, not at import (fairseq-train imports this at start-up)


class CharTrigramCosine:
    """Cosine similarity of hashed character-trigram counts, for batches of string pairs."""

    def __init__(self, buckets=4096, device="cpu"):
        self.buckets, self.device = buckets, device

    def _counts(self, texts):
        rows, cols = [], []
        for i, text in enumerate(texts):
            padded = f" {text} "
            for j in range(len(padded) - 2):
                rows.append(i)
                cols.append(zlib.crc32(padded[j:j + 3].encode()) % self.buckets)
        counts = torch.zeros(len(texts), self.buckets, device=self.device)
        counts.index_put_((torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)),
                          torch.ones(len(rows)), accumulate=True)
        return counts

    def score(self, hyps, refs):
        h, r = self._counts(hyps), self._counts(refs)
        return torch.nn.functional.cosine_similarity(h, r, dim=1).clamp(0, 1)


def comet_scores(model, hyps, refs, batch_size=64):
    """COMET's scores of (hypothesis, reference) pairs, clamped to [0, 1] (``src``: the reference)."""
    data = [{"src": r, "mt": h, "ref": r} for h, r in zip(hyps, refs)]
    gpus = 1 if torch.cuda.is_available() else 0
    return torch.tensor(model.predict(data, batch_size=batch_size, gpus=gpus, progress_bar=False).scores).clamp(0, 1)


def _load():
    return CharTrigramCosine()  # (1)


@user_reward(low=0.0, high=1.0, batch_size=512)
def score(hyps, refs):
    """hyps: list[str] (detokenized), refs: list[list[str]] -> FloatTensor [len(hyps)] in [0, 1]:
    the best score over each hypothesis's references."""
    global MODEL
    if MODEL is None:
        MODEL = _load()
    flat_hyps = [h for h, rs in zip(hyps, refs) for _ in rs]
    flat_refs = [r for rs in refs for r in rs]
    values = MODEL.score(flat_hyps, flat_refs)  # (2)
    return torch.stack([v.max() for v in values.float().cpu().split([len(rs) for rs in refs])])
