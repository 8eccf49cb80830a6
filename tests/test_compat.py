"""Safe checkpoint loading: fairseq checkpoints load, arbitrary pickles do not."""

import argparse
import io
import os
import pickle

import numpy as np
import pytest
import torch

import fairseq_seqlevel  # noqa: F401  (installs the allowlist on import)
from fairseq_seqlevel import compat


class _RunsCode:
    """A pickle payload that would run a command when unpickled."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf)  # the default: weights_only=True on torch >= 2.6


def test_fairseq_checkpoint_objects_load_with_weights_only():
    state = {
        "args": argparse.Namespace(arch="lstm", lr=[0.001]),
        "cfg": {"model": argparse.Namespace(encoder_layers=1), "task": {"_name": "x"}},
        "model": {"w": torch.ones(2, 2)},
        "extra_state": {"best": np.float64(12.5), "val_loss": np.float32(3.0)},
    }
    loaded = _roundtrip(state)
    assert loaded["args"].arch == "lstm"
    assert loaded["cfg"]["model"].encoder_layers == 1
    assert float(loaded["extra_state"]["best"]) == 12.5
    assert torch.equal(loaded["model"]["w"], torch.ones(2, 2))


def test_malicious_pickle_still_refused_after_import():
    assert compat.allow_fairseq_checkpoints()  # idempotent, may run twice
    buf = io.BytesIO()
    torch.save({"x": _RunsCode()}, buf)
    buf.seek(0)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(buf)


def test_allowlist_is_exact():
    names = {f"{g.__module__}.{g.__qualname__}" for g in compat.fairseq_checkpoint_globals()}
    assert "argparse.Namespace" in names
    assert not any(n.startswith(("os.", "builtins.", "subprocess.", "posix.")) for n in names)
    assert set(compat.fairseq_checkpoint_globals()) <= set(torch.serialization.get_safe_globals())


def test_last_batch_is_kept():
    """fairseq-fixed drops the last batch when its size is not a multiple of
    --required-batch-size-multiple; with the plugin imported every index is batched."""
    from fairseq.data import data_utils

    idx = np.arange(12, dtype=np.int64)
    for vec in (None, np.full(12, 6, dtype=np.int64)):
        batches = data_utils.batch_by_size(idx, lambda i: 6, num_tokens_vec=vec, max_tokens=12000,
                                           required_batch_size_multiple=8)
        assert sorted(np.concatenate(batches).tolist()) == idx.tolist()
        assert [len(b) for b in batches] == [8, 4]
