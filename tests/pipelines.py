"""The fairseq pipelines users already run, on toy data: a test matrix helper.

Not a test file.  Each :class:`Pipeline` is the ``fairseq-train`` argv of one
real recipe (everything except DATA, ``--user-dir``, ``--criterion`` and the
criterion's flags), shrunk to a tiny model without dropout, and the kind of
toy data it needs:

``bilingual``  (``translation-*``, ``seqlevel-*``)
    conftest's word-reversal corpus ``src -> tgt`` (reference ``ref2`` too),
    one joined dictionary (``--share-all-embeddings`` works).
``multilingual``  (``multilingual-transformer``)
    ``translation_multi_simple_epoch`` as M2M-100/NLLB are fine-tuned: pairs
    ``src-tg1,src-tg2`` on the *same* source sentences, ``tg1`` = the source
    words reversed, ``tg2`` = the source words in order, so a wrong language
    token shows in the output.  Files ``{split}.src-tg1.{src,tg1}.bin/.idx``
    etc. and ``dict.{src,tg1,tg2}.txt``, all one dictionary; the task itself
    adds ``__src__``, ``__tg1__``, ``__tg2__`` to it (``--encoder-langtok src
    --decoder-langtok``).
``mbart``  (``mbart``)
    ``translation_from_pretrained_bart`` as in fairseq's mBART README:
    ``aa_XX -> bb_XX`` (word reversal) binarized with one shared dictionary
    (``--srcdict D --tgtdict D``); the task adds ``[aa_XX]``, ``[bb_XX]`` and
    ``<mask>`` to it.  Needs the plugin's compat shim (``--user-dir``).

Training the multilingual pipeline on both pairs requires *not* passing
``--source-lang/--target-lang``: with either set, the task switches to its
inference mode and loads only that one pair (``training=False``).  Inference
(``fairseq-generate``, or :func:`build_pipeline` with ``inference_pair``) adds
``-s src -t tg1`` like fairseq's ``multilingual_fairseq_gen.sh``; see
:func:`generate_argvs`.
"""

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Tuple

import pytest

from conftest import TINY_LSTM, TINY_TRANSFORMER, USER_DIR, binarize_toy, run_cli, write_toy_corpus

TINY_FCONV = [
    "--arch", "fconv", "--encoder-embed-dim", "16", "--decoder-embed-dim", "16",
    "--decoder-out-embed-dim", "16", "--encoder-layers", "[(16, 3)] * 2",
    "--decoder-layers", "[(16, 3)] * 2",
]
TINY_MBART = [  # mbart_base's arch function fills in the rest (learned positions, gelu, shared embeddings)
    "--arch", "mbart_base", "--encoder-layers", "1", "--decoder-layers", "1",
    "--encoder-embed-dim", "16", "--decoder-embed-dim", "16", "--encoder-ffn-embed-dim", "16",
    "--decoder-ffn-embed-dim", "16", "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
]
COMMON = ["--dropout", "0", "--seed", "1"]

MULTI_LANGS = ("src", "tg1", "tg2")
MULTI_PAIRS = ("src-tg1", "src-tg2")
MBART_LANGS = ("aa_XX", "bb_XX")


@dataclass(frozen=True)
class Pipeline:
    name: str
    data_fixture_kind: str  # "bilingual" | "multilingual" | "mbart"
    argv: Tuple[str, ...]  # fairseq-train argv without DATA, --user-dir and the criterion


def _pipeline(name, kind, *argv):
    return Pipeline(name, kind, tuple(str(a) for a in argv))


PIPELINES = {p.name: p for p in [
    _pipeline("translation-lstm", "bilingual", "--task", "translation", *TINY_LSTM, *COMMON),
    _pipeline("translation-transformer", "bilingual", "--task", "translation", *TINY_TRANSFORMER,
              "--share-all-embeddings", *COMMON),
    _pipeline("translation-fconv", "bilingual", "--task", "translation", *TINY_FCONV, *COMMON),
    _pipeline("seqlevel-lstm", "bilingual", "--task", "seqlevel_translation", *TINY_LSTM, *COMMON),
    _pipeline("seqlevel-transformer", "bilingual", "--task", "seqlevel_translation", *TINY_TRANSFORMER,
              "--share-all-embeddings", *COMMON),
    _pipeline("seqlevel-fconv", "bilingual", "--task", "seqlevel_translation", *TINY_FCONV, *COMMON),
    # examples/multilingual/finetune_multilingual_model.sh, M2M-100's task flags
    _pipeline("multilingual-transformer", "multilingual", "--task", "translation_multi_simple_epoch",
              "--lang-pairs", ",".join(MULTI_PAIRS), "--langs", ",".join(MULTI_LANGS),
              "--encoder-langtok", "src", "--decoder-langtok",
              "--sampling-method", "temperature", "--sampling-temperature", "1.5",
              *TINY_TRANSFORMER, "--share-all-embeddings",
              "--encoder-normalize-before", "--decoder-normalize-before", "--layernorm-embedding", *COMMON),
    # examples/mbart/README.md "Finetune on EN-RO" (no --prepend-bos there)
    _pipeline("mbart", "mbart", "--task", "translation_from_pretrained_bart", *TINY_MBART,
              "--encoder-normalize-before", "--decoder-normalize-before", "--layernorm-embedding",
              "--langs", ",".join(MBART_LANGS), "--source-lang", MBART_LANGS[0],
              "--target-lang", MBART_LANGS[1], *COMMON),
]}

# The task flags fairseq-generate needs beside DATA --path (and --user-dir):
# the training task flags minus the model ones; for the multilingual pipeline
# one entry per target language (the inference pair is fixed per run).
_TASK_FLAGS = {
    "translation": ["--task", "translation"],
    "seqlevel_translation": ["--task", "seqlevel_translation"],
    "translation_multi_simple_epoch": [
        "--task", "translation_multi_simple_epoch", "--lang-pairs", ",".join(MULTI_PAIRS),
        "--langs", ",".join(MULTI_LANGS), "--encoder-langtok", "src", "--decoder-langtok"],
    "translation_from_pretrained_bart": [
        "--task", "translation_from_pretrained_bart", "--langs", ",".join(MBART_LANGS),
        "--source-lang", MBART_LANGS[0], "--target-lang", MBART_LANGS[1]],
}


def task_name(name):
    argv = PIPELINES[name].argv
    return argv[argv.index("--task") + 1]


def generate_argvs(name):
    """{label: task argv} for fairseq-generate on pipeline ``name``: one entry
    (label None) except for the multilingual pipeline, one per target language."""
    flags = _TASK_FLAGS[task_name(name)]
    if PIPELINES[name].data_fixture_kind != "multilingual":
        return {None: list(flags)}
    return {pair: [*flags, "--source-lang", pair.split("-")[0], "--target-lang", pair.split("-")[1]]
            for pair in MULTI_PAIRS}


# ----------------------------------------------------------------------------- data

def _sentences(rng, n, vocab):
    return [[rng.choice(vocab) for _ in range(rng.randint(1, 7))] for _ in range(n)]


def _write(path, sents):
    path.write_text("\n".join(" ".join(s) for s in sents) + "\n")


SPLITS = (("train", 60), ("valid", 8), ("test", 8))


def _write_multilingual(raw, seed=0):
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(12)]
    for split, n in SPLITS:
        src = _sentences(rng, n, vocab)
        _write(raw / f"{split}.src", src)
        _write(raw / f"{split}.tg1", [list(reversed(s)) for s in src])
        _write(raw / f"{split}.tg2", src)


def _write_mbart(raw, seed=0):
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(12)]
    a, b = MBART_LANGS
    for split, n in SPLITS:
        src = _sentences(rng, n, vocab)
        _write(raw / f"{split}.{a}", src)
        _write(raw / f"{split}.{b}", [list(reversed(s)) for s in src])


def _preprocess(raw, dest, src, tgt, dictionary=None):
    """fairseq-preprocess ``raw/{split}.{src,tgt}`` into ``dest`` with a joined
    dictionary, or with ``dictionary`` on both sides."""
    args = ["--source-lang", src, "--target-lang", tgt, "--trainpref", raw / "train",
            "--validpref", raw / "valid", "--testpref", raw / "test", "--destdir", dest, "--workers", "1"]
    if dictionary is None:
        args.append("--joined-dictionary")
    else:
        args += ["--srcdict", dictionary, "--tgtdict", dictionary]
    run_cli("preprocess", *args)


def pipeline_data(kind, root):
    """Write and binarize (fairseq-preprocess) the toy data of ``kind`` under
    ``root``; returns the DATA directory."""
    root = Path(root)
    raw, dest = root / "raw", root / "bin"
    raw.mkdir(parents=True, exist_ok=True)
    if kind == "bilingual":
        return binarize_toy(write_toy_corpus(raw, n_train=60, n_valid=8), dest)
    if kind == "multilingual":
        _write_multilingual(raw)
        # One dictionary for all languages (M2M-100's --fixed-dictionary): counted
        # on src+tg1 (tg2 has the same words), then given to the other pair;
        # the task checks dict.{src,tg1,tg2}.txt are equal.
        first, *others = MULTI_PAIRS
        _preprocess(raw, dest, *first.split("-"))
        for pair in others:
            _preprocess(raw, dest, *pair.split("-"), dictionary=dest / f"dict.{MULTI_LANGS[0]}.txt")
        return dest
    if kind == "mbart":
        # like the README's --srcdict dict.txt --tgtdict dict.txt: one dictionary
        # (without [lang] tokens and <mask>, which the task appends)
        _write_mbart(raw)
        _preprocess(raw, dest, *MBART_LANGS)
        return dest
    raise ValueError(f"unknown data kind {kind!r}")


# ----------------------------------------------------------------------------- in-process

def pipeline_train_argv(name, data_dir, *criterion_argv):
    """The full fairseq-train argv (without the program) of pipeline ``name``."""
    return [str(data_dir), "--user-dir", USER_DIR, *PIPELINES[name].argv, *map(str, criterion_argv)]


def build_pipeline(name, data_dir, *criterion_argv, seed=1, inference_pair=None):
    """(cfg, task, model, criterion) of pipeline ``name`` built in-process the
    way fairseq-train builds them (conftest.build_training), torch seeded.

    ``inference_pair`` ("src-tg1") builds the multilingual task as
    fairseq-generate does (``-s/-t`` set: one pair, inference mode); without it
    the task is the training one (both pairs, no target language)."""
    import torch

    from conftest import build_training

    extra = []
    if inference_pair is not None:
        assert PIPELINES[name].data_fixture_kind == "multilingual", "inference_pair: multilingual only"
        src, tgt = inference_pair.split("-")
        extra = ["--source-lang", src, "--target-lang", tgt]
    torch.manual_seed(seed)
    return build_training([*pipeline_train_argv(name, data_dir, *criterion_argv), *extra, "--seed", str(seed)])


def index_batches(task, split, n=8, seed=1, shuffle=True):
    """The index batches fairseq-train's iterator visits in epoch 1 (at most
    ``n`` sentences each): ``task.get_batch_iterator``'s length-sorted batches
    in the order of ``EpochBatchIterator``'s seeded shuffle.  Returns
    (dataset, batches); ``dataset.collater([dataset[i] for i in batch])`` is
    the batch the iterator yields."""
    import numpy as np
    from fairseq.data import data_utils

    if split not in task.datasets:  # translation_multi_simple_epoch cannot load a split twice
        task.load_dataset(split)
    dataset = task.dataset(split)
    itr = task.get_batch_iterator(
        dataset=dataset, max_tokens=None, max_sentences=n, max_positions=task.max_positions(),
        ignore_invalid_inputs=True, required_batch_size_multiple=1, seed=seed, num_workers=0, epoch=1,
    )
    batches = [list(b) for b in itr.frozen_batches]
    if shuffle:
        with data_utils.numpy_seed(seed + 1):  # EpochBatchIterator: seed + epoch
            np.random.shuffle(batches)
    return dataset, batches


def collate(dataset, indices):
    return dataset.collater([dataset[int(i)] for i in indices])


def item_pair(task, dataset, index):
    """The language pair ("src-tg1") of item ``index`` of a multilingual split."""
    import bisect

    if hasattr(dataset, "keys"):  # SampledMultiDataset: items are (dataset index, item); keys "main:src-tg1"
        return dataset.keys[dataset[int(index)][0]].split(":")[-1]
    # ConcatDataset of the pairs (valid/test without --lang-tok-replacing-bos-eos), in task order
    return task.lang_pairs[bisect.bisect_right(dataset.cumulative_sizes, int(index))]


def target_langs(task, batch):
    """The target language of each row of a collated multilingual batch, read
    from the decoder language token the task put in it (``target[:, 0]``, or
    ``prev_output_tokens[:, 0]`` with ``--lang-tok-replacing-bos-eos``); None
    for another task or without ``--decoder-langtok``."""
    if not hasattr(task, "data_manager"):
        return None
    _, spec = task.args.langtoks["main"]
    if spec is None:
        return None
    langs = {lang for pair in task.lang_pairs for lang in pair.split("-")}
    toks = {task.data_manager.get_decoder_langtok(lang, spec): lang for lang in sorted(langs)}
    if task.args.lang_tok_replacing_bos_eos:
        first = batch["net_input"]["prev_output_tokens"][:, 0]
    else:
        first = batch["target"][:, 0]
    return [toks.get(int(t)) for t in first]


def pipeline_batch(task, split="train", n=8, seed=1):
    """A batch of ``split`` as fairseq-train's iterator yields it
    (:func:`index_batches`; at most ``n`` sentences).  Multilingual: the first
    batch in that order holding rows of *every* target language of the task
    (the sampled multi-dataset mixes pairs in one batch when their lengths
    match), else the first batch."""
    dataset, batches = index_batches(task, split, n, seed)
    if not hasattr(task, "data_manager"):
        return collate(dataset, batches[0])
    wanted = {p.split("-")[1] for p in task.lang_pairs}
    for indices in batches:
        if {item_pair(task, dataset, i).split("-")[1] for i in indices} >= wanted:
            return collate(dataset, indices)
    return collate(dataset, batches[0])


def pipeline_pair_batch(task, pair, split="train", n=8, seed=1):
    """A multilingual batch whose rows all belong to ``pair`` ("src-tg1"): of
    the iterator's batches (:func:`index_batches`) the one with the most rows
    of ``pair`` (the first on ties), restricted to them and collated by the
    task's own collater."""
    dataset, batches = index_batches(task, split, n, seed)
    best = max(([i for i in indices if item_pair(task, dataset, i) == pair] for indices in batches), key=len)
    assert best, f"no {pair} rows in {split}"
    return collate(dataset, best)


# ----------------------------------------------------------------------------- stock MLE training

#: updates of the stock MLE checkpoints the matrix fine-tunes (outputs vary and stop by then)
MLE_UPDATES = 30

MLE_TRAIN = ["--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
             "--optimizer", "adam", "--lr", "0.005", "--batch-size", "16", "--required-batch-size-multiple", "1",
             "--no-progress-bar", "--log-format", "simple", "--log-interval", "1",
             "--num-workers", "0", "--no-epoch-checkpoints"]


def train_mle_checkpoint(name, data_dir, save_dir, updates, *extra_argv):
    """Stock ``fairseq-train`` of pipeline ``name`` (subprocess) with
    ``label_smoothed_cross_entropy`` (no plugin criterion; ``--user-dir`` still
    given: the seqlevel task and the mBART shim) for ``updates`` updates.
    Returns ``save_dir/checkpoint_last.pt`` -- what users pass to
    ``--finetune-from-model``; the log (stdout + stderr) is ``save_dir/train.log``."""
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    proc = run_cli("train", *pipeline_train_argv(name, data_dir, *MLE_TRAIN), "--max-update", str(updates),
                   "--save-dir", save_dir, *extra_argv)
    (save_dir / "train.log").write_text(proc.stdout + proc.stderr)
    checkpoint = save_dir / "checkpoint_last.pt"
    assert checkpoint.exists(), (proc.stdout + proc.stderr)[-3000:]
    return checkpoint


def generate(name, data_dir, checkpoint, *extra_argv, pair=None):
    """Stock ``fairseq-generate`` (subprocess, ``--user-dir``) of a pipeline's
    checkpoint: beam 2 on ``valid``.  ``pair`` picks the multilingual
    inference pair (required there).  Returns the CompletedProcess."""
    flags = generate_argvs(name)[pair]
    return run_cli("generate", data_dir, "--user-dir", USER_DIR, *flags, "--path", checkpoint,
                   "--beam", "2", "--gen-subset", "valid", "--batch-size", "16", "--max-len-b", "20",
                   *extra_argv)


# ----------------------------------------------------------------------------- pytest fixtures
# Session-scoped, built on first use; register them by importing them into
# conftest.py or a test module (``from pipelines import pipeline_data_dirs``).

class _Lazy(dict):
    def __init__(self, build):
        super().__init__()
        self._build = build

    def __missing__(self, key):
        value = self[key] = self._build(key)
        return value


@pytest.fixture(scope="session")
def pipeline_data_dirs(tmp_path_factory):
    """``pipeline_data_dirs[kind]``: the binarized toy data of ``kind``, built once a session."""
    return _Lazy(lambda kind: pipeline_data(kind, tmp_path_factory.mktemp(f"pipeline_{kind}")))


@pytest.fixture(scope="session")
def pipeline_mle_checkpoints(tmp_path_factory, pipeline_data_dirs):
    """``pipeline_mle_checkpoints[name, updates]``: :func:`train_mle_checkpoint`
    of pipeline ``name`` on its toy data, trained once a session."""
    def build(key):
        name, updates = key
        data = pipeline_data_dirs[PIPELINES[name].data_fixture_kind]
        return train_mle_checkpoint(name, data, tmp_path_factory.mktemp(f"mle_{name}_{updates}"), updates)
    return _Lazy(build)
