"""The pipeline matrix's fixtures work with stock fairseq: every pipeline's toy
data binarizes, trains 30 updates of label-smoothed MLE (``fairseq-train``) and
decodes from the checkpoint (``fairseq-generate``); the in-process batches are
the ones fairseq-train's iterator yields."""

import math
import re

import pytest
import torch

from pipelines import (MLE_UPDATES, MULTI_PAIRS, PIPELINES, build_pipeline, collate, generate, index_batches,
                       item_pair, pipeline_batch, pipeline_pair_batch, target_langs)

HYP = re.compile(r"^H-(\d+)\t(\S+)\t(.*)$", re.M)
REF = re.compile(r"^T-(\d+)\t(.*)$", re.M)


def _raw_lines(data_dir, kind, lang):
    return (data_dir.parent / "raw" / f"valid.{lang}").read_text().splitlines()


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_stock_mle_train_and_generate(name, pipeline_data_dirs, pipeline_mle_checkpoints):
    kind = PIPELINES[name].data_fixture_kind
    data = pipeline_data_dirs[kind]
    checkpoint = pipeline_mle_checkpoints[name, MLE_UPDATES]  # shared with the matrix (test_pipelines.py)
    log = (checkpoint.parent / "train.log").read_text()
    losses = [float(x) for x in re.findall(r"\| loss (\S+) \|", log)]
    assert re.search(rf"num_updates {MLE_UPDATES}\b", log) and losses, log[-3000:]
    assert all(math.isfinite(x) for x in losses), losses

    if kind != "multilingual":
        out = generate(name, data, checkpoint).stdout
        hyps, refs = dict((int(i), h) for i, _, h in HYP.findall(out)), dict(REF.findall(out))
        assert len(hyps) == 8 and all(math.isfinite(float(s)) for _, s, _ in HYP.findall(out)), out[-3000:]
        tgt = "bb_XX" if kind == "mbart" else "tgt"
        # targets shown without the task's special tokens ([bb_XX] stripped as the generator's eos)
        assert sorted(refs.values()) == sorted(_raw_lines(data, kind, tgt)), out[-3000:]
        assert not any(f"[{tgt}]" in h for h in hyps.values())
        return
    # multilingual: one fairseq-generate per inference pair; each shows that
    # pair's references and strips its own language token from the outputs
    seen = {}
    for pair in MULTI_PAIRS:
        tgt = pair.split("-")[1]
        out = generate(name, data, checkpoint, pair=pair).stdout
        hyps, refs = HYP.findall(out), dict(REF.findall(out))
        assert len(hyps) == 8 and all(math.isfinite(float(s)) for _, s, _ in hyps), out[-3000:]
        assert sorted(refs.values()) == sorted(_raw_lines(data, kind, tgt)), out[-3000:]
        assert not any(f"__{tgt}__" in h for _, _, h in hyps), hyps
        seen[tgt] = refs
    assert seen["tg1"] != seen["tg2"]  # the two target languages differ (reversed vs. in order)


@pytest.mark.parametrize("name", ["translation-lstm", "seqlevel-transformer", "multilingual-transformer", "mbart"])
def test_pipeline_batch_is_the_iterators(name, pipeline_data_dirs):
    _, task, model, _ = build_pipeline(name, pipeline_data_dirs[PIPELINES[name].data_fixture_kind])
    batch = pipeline_batch(task)
    dataset, _ = index_batches(task, "train")
    real = next(task.get_batch_iterator(
        dataset=dataset, max_sentences=8, max_positions=task.max_positions(), ignore_invalid_inputs=True,
        required_batch_size_multiple=1, seed=1, num_workers=0, epoch=1).next_epoch_itr(shuffle=True))
    if name != "multilingual-transformer":  # (there the first batch with both languages is chosen)
        assert torch.equal(batch["target"], real["target"]) and torch.equal(batch["id"], real["id"])
    with torch.no_grad():
        logits = model(**batch["net_input"])[0]
    assert logits.shape[:2] == batch["target"].shape


def test_multilingual_batches(pipeline_data_dirs):
    data = pipeline_data_dirs["multilingual"]
    _, task, _, _ = build_pipeline("multilingual-transformer", data)
    d = task.target_dictionary
    batch = pipeline_batch(task)
    langs = target_langs(task, batch)
    assert set(langs) == {"tg1", "tg2"}  # one training batch mixes both target languages
    for row, lang in enumerate(langs):
        toks = batch["target"][row][batch["target"][row].ne(d.pad())]
        assert d[toks[0]] == f"__{lang}__" and toks[-1] == d.eos()
        assert batch["net_input"]["prev_output_tokens"][row, 0] == d.eos()
    for pair in MULTI_PAIRS:
        for split in ("train", "valid"):
            b = pipeline_pair_batch(task, pair, split=split)
            assert set(target_langs(task, b)) == {pair.split("-")[1]}
    dataset, batches = index_batches(task, "valid")
    for indices in batches:  # item_pair agrees with the language tokens in the collated batch
        assert sorted(item_pair(task, dataset, i).split("-")[1] for i in indices) == \
            sorted(target_langs(task, collate(dataset, indices)))
