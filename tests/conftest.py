import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
USER_DIR = str(REPO / "fairseq_seqlevel")
sys.path.insert(0, str(REPO))

TINY_LSTM = [
    "--arch", "lstm", "--encoder-embed-dim", "16", "--decoder-embed-dim", "16",
    "--encoder-hidden-size", "16", "--decoder-hidden-size", "16",
    "--decoder-out-embed-dim", "16", "--decoder-attention", "True",
]
TINY_TRANSFORMER = [
    "--arch", "transformer", "--encoder-layers", "1", "--decoder-layers", "1",
    "--encoder-embed-dim", "16", "--decoder-embed-dim", "16", "--encoder-ffn-embed-dim", "16",
    "--decoder-ffn-embed-dim", "16", "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
]
ARCHS = {"lstm": TINY_LSTM, "transformer": TINY_TRANSFORMER}


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models, many small steps: extra threads only contend (2 shared cores).
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_cli(module, *args, check=True, input=None, cwd=None):
    """Run a fairseq CLI (``fairseq_cli.<module>``) in a subprocess."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", f"fairseq_cli.{module}", *map(str, args)],
        capture_output=True, text=True, env=env, input=input, cwd=cwd,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def write_toy_corpus(root, n_train=120, n_valid=12, seed=0, extra_ref=True):
    """A word-reversal task: tiny, learnable, with a second reference set."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(12)]
    root.mkdir(parents=True, exist_ok=True)
    for split, n in [("train", n_train), ("valid", n_valid), ("test", n_valid)]:
        src, tgt, ref2 = [], [], []
        for _ in range(n):
            s = [rng.choice(vocab) for _ in range(rng.randint(1, 7))]
            src.append(" ".join(s))
            tgt.append(" ".join(reversed(s)))
            ref2.append(" ".join(reversed(s[1:] or s)))
        (root / f"{split}.src").write_text("\n".join(src) + "\n")
        (root / f"{split}.tgt").write_text("\n".join(tgt) + "\n")
        if extra_ref:
            (root / f"{split}.ref2").write_text("\n".join(ref2) + "\n")
    return root


def binarize_toy(raw, dest):
    run_cli("preprocess", "--source-lang", "src", "--target-lang", "tgt",
            "--trainpref", raw / "train", "--validpref", raw / "valid", "--testpref", raw / "test",
            "--destdir", dest, "--joined-dictionary", "--workers", "1")
    tmp = dest.parent / (dest.name + "_ref2")
    run_cli("preprocess", "--source-lang", "ref2", "--only-source", "--srcdict", dest / "dict.tgt.txt",
            "--trainpref", raw / "train", "--validpref", raw / "valid", "--testpref", raw / "test",
            "--destdir", tmp, "--workers", "1")
    for split in ("train", "valid", "test"):
        for ext in ("bin", "idx"):
            os.replace(tmp / f"{split}.ref2-None.ref2.{ext}", dest / f"{split}.src-tgt.ref2.{ext}")
    return dest


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    raw = write_toy_corpus(root / "raw")
    return binarize_toy(raw, root / "bin")


def build_training(argv):
    """(cfg, task, model, criterion) from fairseq-train style arguments, in-process."""
    import fairseq_seqlevel  # noqa: F401  (register the plugin)
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [str(a) for a in argv])
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    return cfg, task, model, criterion


def build_toy(toy_data, *args, arch="lstm", seed=3):
    """build_training on the toy data: seqlevel_translation with both references,
    a tiny ``arch`` without dropout, torch and fairseq seeded."""
    import torch

    torch.manual_seed(seed)
    return build_training([toy_data, "--user-dir", USER_DIR, "--task", "seqlevel_translation", *ARCHS[arch],
                           "--dropout", "0", "--seed", str(seed), "--extra-references", "ref2", *args])


def first_batch(task, split="train", n=16):
    task.load_dataset(split)
    dataset = task.dataset(split)
    return dataset.collater([dataset[i] for i in range(min(n, len(dataset)))])


def mle_steps(task, model, steps, lr=0.02, batch_size=24):
    """A few plain-NLL Adam steps on the toy training set: a model whose greedy
    outputs vary and stop (a random tiny model repeats one token up to the cap)."""
    import torch

    task.load_dataset("train")
    ds, pad = task.dataset("train"), task.target_dictionary.pad()
    batches = [ds.collater([ds[i] for i in range(j, min(j + batch_size, len(ds)))])
               for j in range(0, len(ds), batch_size)]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for step in range(steps):
        b = batches[step % len(batches)]
        lp = model.get_normalized_probs(model(**b["net_input"]), log_probs=True)
        nll = -lp.gather(-1, b["target"].unsqueeze(-1)).squeeze(-1).masked_fill(b["target"].eq(pad), 0.0)
        loss = nll.sum() / b["ntokens"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def train_sentencepiece(sentences, vocab_size, character_coverage=1.0):
    """A sentencepiece unigram model trained in memory on ``sentences`` (one thread, quiet)."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
                                   character_coverage=character_coverage, model_type="unigram", num_threads=1,
                                   minloglevel=2)
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def levenshtein(a, b):
    """Plain dynamic-programming edit distance between two sequences (test oracle)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


# the pipeline matrix's session fixtures (tests/pipelines.py imports this module, so at the end)
from pipelines import pipeline_data_dirs, pipeline_mle_checkpoints  # noqa: E402,F401
