"""Per-worker random draws under data parallelism (criterions.base.worker_rng).

fairseq seeds every worker with the same ``seed + num_updates``; the
criterions draw their samples inside ``worker_rng``, which reseeds per rank
and restores the shared stream afterwards.  Checked on raml's sampler with the
rank faked (the 2-process harness runs the criterions for real)."""

import pytest
import torch

from conftest import build_toy, first_batch
from fairseq_seqlevel.criterions import base


def _draw(criterion, sample, seed):
    torch.manual_seed(seed)
    with base.worker_rng():
        drawn, _, _ = criterion.draw_samples(sample)
    after = torch.rand(3)  # the stream outside: dropout and the rest of fairseq
    return drawn.tokens, after


@pytest.fixture(scope="module")
def raml(toy_data):
    _, task, _, criterion = build_toy(toy_data, "--criterion", "raml", "--raml-samples", "4",
                                      "--raml-temperature", "0.5")
    return criterion, first_batch(task)


def test_alone_nothing_changes(raml):
    criterion, sample = raml
    assert base.data_parallel_rank_and_size() == (0, 1)  # no process group: one worker
    torch.manual_seed(5)
    plain = criterion.draw_samples(sample)[0].tokens
    plain_after = torch.rand(3)
    tokens, after = _draw(criterion, sample, 5)
    assert torch.equal(tokens, plain) and torch.equal(after, plain_after)


def test_workers_draw_differently_and_keep_the_shared_stream(raml, monkeypatch):
    criterion, sample = raml
    out = {}
    for rank in (0, 1):
        monkeypatch.setattr(base, "data_parallel_rank_and_size", lambda rank=rank: (rank, 2))
        out[rank] = _draw(criterion, sample, 5)
    (tokens0, after0), (tokens1, after1) = out[0], out[1]
    assert tokens0.shape == tokens1.shape and not torch.equal(tokens0, tokens1)
    # the same seed outside: every worker continues the same fairseq stream
    assert torch.equal(after0, after1)
    # and each rank is reproducible (a resumed run draws the same)
    monkeypatch.setattr(base, "data_parallel_rank_and_size", lambda: (1, 2))
    again, _ = _draw(criterion, sample, 5)
    assert torch.equal(again, tokens1)
