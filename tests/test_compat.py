"""Safe checkpoint loading: fairseq checkpoints load, arbitrary pickles do not."""

import argparse
import io
import os
import pickle
import re

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


def _mbart_task(data):
    """fairseq-train's task for the mBART README fine-tuning recipe on the toy data."""
    from conftest import USER_DIR, build_training

    return build_training([
        data, "--user-dir", USER_DIR, "--task", "translation_from_pretrained_bart", "--arch", "mbart_base",
        "--langs", "src,tgt", "--source-lang", "src", "--target-lang", "tgt",
        "--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "16",
        "--decoder-embed-dim", "16", "--encoder-ffn-embed-dim", "16", "--decoder-ffn-embed-dim", "16",
        "--encoder-attention-heads", "2", "--decoder-attention-heads", "2", "--dropout", "0",
        "--criterion", "label_smoothed_cross_entropy",
    ])[1:3]


def test_translation_from_pretrained_bart_loads_and_decodes(toy_data):
    """fairseq-fixed's mBART task reads self.args, which dataclass-era tasks no
    longer have: without compat.fix_translation_from_pretrained_bart its
    load_dataset raises AttributeError."""
    task, model = _mbart_task(toy_data)
    d = task.target_dictionary
    task.load_dataset("train")
    ds = task.dataset("train")
    batch = ds.collater([ds[i] for i in range(8)])
    for row in range(8):  # target: words </s> [tgt]; prev_output_tokens starts with [tgt]; source ends </s> [src]
        tgt = batch["target"][row][batch["target"][row].ne(d.pad())]
        assert [d[t] for t in tgt[-2:]] == ["</s>", "[tgt]"]
        assert d[batch["net_input"]["prev_output_tokens"][row, 0]] == "[tgt]"
        assert [d[t] for t in batch["net_input"]["src_tokens"][row][-2:]] == ["</s>", "[src]"]
    generator = task.build_generator([model], argparse.Namespace(beam=1, max_len_b=3))
    assert generator.eos == d.index("[tgt]")
    hyps = task.inference_step(generator, [model], batch)
    assert len(hyps) == 8 and all(h[0]["tokens"][-1] == generator.eos for h in hyps)
    inference = task.build_dataset_for_inference([torch.tensor([d.index("w1"), d.eos()])], [2])
    assert [d[t] for t in inference[0]["source"]] == ["w1", "</s>", "[src]"]
    assert not compat.fix_translation_from_pretrained_bart()  # idempotent: already applied at import


def test_translation_from_pretrained_bart_fails_without_the_shim(toy_data, monkeypatch):
    from fairseq.tasks.translation_from_pretrained_bart import TranslationFromPretrainedBARTTask

    task, _ = _mbart_task(toy_data)
    monkeypatch.delattr(TranslationFromPretrainedBARTTask, "args")
    with pytest.raises(AttributeError, match="'args'"):
        task.load_dataset("valid")
    assert compat.fix_translation_from_pretrained_bart()  # re-applied (monkeypatch then restores its own)
    task.load_dataset("valid")


def test_fairseq_train_bf16_runs_without_a_tpu(toy_data, tmp_path):
    """fairseq sets --tpu with --bf16; without the shim the run dies on torch_xla
    ('NoneType' object has no attribute 'xla_device')."""
    from conftest import TINY_LSTM, USER_DIR, run_cli

    out = run_cli("train", toy_data, "--user-dir", USER_DIR, "--task", "seqlevel_translation", *TINY_LSTM,
                  "--criterion", "risk", "--risk-candidates", "3", "--optimizer", "adam", "--lr", "1e-3",
                  "--max-tokens", "400", "--max-update", "2", "--save-dir", tmp_path, "--no-save",
                  "--num-workers", "0", "--cpu", "--bf16", "--log-format", "simple", "--log-interval", "1")
    log = out.stdout + out.stderr
    assert "--bf16 without torch_xla" in log and re.search(r"num_updates 2\b", log), log[-3000:]


def test_a_sequence_level_run_says_where_it_starts(toy_data, tmp_path):
    """One warning line from random weights, and one when --finetune-from-model is not
    loaded because --save-dir already holds checkpoint_last.pt; none for a proper fine-tuning."""
    from conftest import TINY_LSTM, USER_DIR, run_cli

    def train(save_dir, *extra):
        out = run_cli("train", toy_data, "--user-dir", USER_DIR, "--task", "seqlevel_translation", *TINY_LSTM,
                      "--criterion", "risk", "--risk-candidates", "2", "--optimizer", "adam", "--lr", "1e-3",
                      "--max-tokens", "400", "--save-dir", save_dir, "--num-workers", "0", *extra)
        return [line for line in (out.stdout + out.stderr).splitlines() if "| WARNING | fairseq_seqlevel" in line]

    first = train(tmp_path / "a", "--max-update", "1")
    assert len(first) == 1 and "randomly initialised" in first[0] and "--finetune-from-model" in first[0]
    ignored = train(tmp_path / "a", "--max-update", "2", "--finetune-from-model", tmp_path / "a" / "checkpoint_last.pt")
    assert len(ignored) == 1 and "is not loaded" in ignored[0] and "new --save-dir" in ignored[0]
    assert train(tmp_path / "b", "--max-update", "1", "--finetune-from-model", tmp_path / "a" / "checkpoint_last.pt") == []


def test_each_patch_can_be_turned_off_by_name():
    """FAIRSEQ_SEQLEVEL_NO_PATCH leaves the named patches off; an unknown name is a one-line error."""
    from fairseq_seqlevel import compat
    from fairseq_seqlevel.errors import ConfigError

    applied = []
    patches = {name: (lambda name=name: applied.append(name)) for name in compat.PATCHES}
    original = dict(compat.PATCHES)
    compat.PATCHES.clear()
    compat.PATCHES.update(patches)
    try:
        off = compat.apply_patches({"FAIRSEQ_SEQLEVEL_NO_PATCH": "keep_last_batch, say_where_training_starts"})
        assert off == {"keep_last_batch", "say_where_training_starts"}
        assert applied == [n for n in original if n not in off]
        with pytest.raises(ConfigError, match="FAIRSEQ_SEQLEVEL_NO_PATCH: unknown patch nope"):
            compat.apply_patches({"FAIRSEQ_SEQLEVEL_NO_PATCH": "nope"})
    finally:
        compat.PATCHES.clear()
        compat.PATCHES.update(original)


def test_no_patch_leaves_fairseq_batch_by_size_as_installed():
    """End to end in a fresh interpreter: with keep_last_batch off, fairseq's
    batch_by_size is the installed one; on, the plugin's (fairseq-fixed drops the last batch)."""
    import subprocess
    import sys

    code = ("import fairseq.data.data_utils as d; before = d.batch_by_size; import fairseq_seqlevel; "
            "print(d.batch_by_size is before)")

    def unpatched(no_patch):
        env = {**os.environ, "FAIRSEQ_SEQLEVEL_NO_PATCH": no_patch}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        return out.stdout.strip().splitlines()[-1] == "True"

    assert unpatched("keep_last_batch")
    assert not unpatched("")
