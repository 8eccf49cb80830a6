"""The stock fairseq CLIs drive the plugin end to end on toy data."""

import random
import re

import sacrebleu

from conftest import TINY_LSTM, USER_DIR, run_cli

TRAIN = ["--user-dir", USER_DIR, "--task", "seqlevel_translation",
         "--optimizer", "adam", "--lr", "0.005", "--max-tokens", "400",
         "--no-progress-bar", "--log-format", "simple", "--log-interval", "1",
         "--seed", "1", "--num-workers", "0"]


def _train(data, save_dir, *extra):
    return run_cli("train", data, *TRAIN, *TINY_LSTM, "--save-dir", save_dir, *extra)


def test_train_generate_resume(toy_data, tmp_path):
    ckpt = tmp_path / "ckpt"
    out = _train(toy_data, ckpt, "--criterion", "cross_entropy", "--max-update", "2",
                 "--extra-references", "ref2", "--eval-reward", "--reward", "bleu")
    log = out.stdout + out.stderr
    assert (ckpt / "checkpoint_last.pt").exists()
    # validation logged the greedy reward over both references
    m = re.search(r"valid on 'valid' subset.*\| reward ([0-9.]+)", log)
    assert m, log[-3000:]
    assert 0.0 <= float(m.group(1)) <= 1.0
    assert re.search(r"\| greedy_bleu [0-9.]+", log) and re.search(r"\| greedy_chrf [0-9.]+", log)

    gen = run_cli("generate", toy_data, "--user-dir", USER_DIR, "--task", "seqlevel_translation",
                  "--path", ckpt / "checkpoint_last.pt", "--beam", "2", "--gen-subset", "test")
    hyps = {int(m.group(1)): m.group(2) for m in re.finditer(r"^H-(\d+)\t[-0-9.e]+\t(.*)$", gen.stdout, re.M)}
    refs = {int(m.group(1)): m.group(2) for m in re.finditer(r"^T-(\d+)\t(.*)$", gen.stdout, re.M)}
    assert len(hyps) == 12 and hyps.keys() == refs.keys(), gen.stdout[:6000]
    ids = sorted(hyps)
    bleu = sacrebleu.corpus_bleu([hyps[i] for i in ids], [[refs[i] for i in ids]])
    assert 0.0 <= bleu.score <= 100.0

    inter = run_cli("interactive", toy_data, "--user-dir", USER_DIR, "--task", "seqlevel_translation",
                    "--path", ckpt / "checkpoint_last.pt", "--beam", "2",
                    input="w1 w2 w3\nw4\n")
    assert len(re.findall(r"^H-\d+\t", inter.stdout, re.M)) == 2

    # resume: continues from update 2 to 4 from checkpoint_last.pt
    out = _train(toy_data, ckpt, "--criterion", "cross_entropy", "--max-update", "4")
    log = out.stdout + out.stderr
    assert re.search(r"[Ll]oaded checkpoint .*checkpoint_last\.pt .*\(epoch \d+ @ 2 updates\)", log), log[-3000:]
    assert re.search(r"num_updates 4\b", log)


def test_unknown_reward_is_one_line(toy_data, tmp_path):
    out = run_cli("train", toy_data, *TRAIN, *TINY_LSTM, "--save-dir", tmp_path / "c",
                  "--criterion", "cross_entropy", "--max-update", "1", "--reward", "blue", check=False)
    assert out.returncode != 0
    err_lines = [l for l in out.stderr.splitlines() if l.startswith("error:")]
    assert err_lines == [err_lines[0]] and "--reward" in err_lines[0] and "bleu" in err_lines[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr


def test_missing_data_dir_is_one_line(tmp_path):
    out = run_cli("train", tmp_path / "nope", *TRAIN, *TINY_LSTM, "--save-dir", tmp_path / "c",
                  "--criterion", "cross_entropy", "--max-update", "1", check=False)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    assert re.search(r"^error: DATA: data directory not found: .*nope$", out.stderr, re.M), out.stderr[-2000:]
    # fairseq itself creates --save-dir before the task is set up; it stays empty
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())


def test_help_lists_our_criterions():
    out = run_cli("train", "--user-dir", USER_DIR, "--help")
    choices = re.search(r"--criterion \{([^}]*)\}", out.stdout).group(1).split(",")
    assert {"raml", "token_smooth"} <= set(choices)


def test_missing_extra_references_is_one_line(toy_data, tmp_path):
    """A reference set missing for a split stops training: no silent fallback to one reference."""
    out = run_cli("train", toy_data, *TRAIN, *TINY_LSTM, "--save-dir", tmp_path / "c",
                  "--criterion", "cross_entropy", "--max-update", "1", "--extra-references", "ref2,kjv",
                  check=False)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    err_lines = [l for l in out.stderr.splitlines() if l.startswith("error:")]
    prefix = toy_data / "valid.src-tgt.kjv"
    assert err_lines == [f"error: --extra-references kjv: {prefix}.bin/.idx not found (split valid)"], \
        out.stderr[-2000:]
    assert out.stderr.rstrip().splitlines()[-1] == err_lines[0]


def write_toy_embeddings(data, path, dim=4, seed=0):
    """A word2vec text file with a random vector for every word of the toy target dictionary."""
    rng = random.Random(seed)
    words = [line.split()[0] for line in (data / "dict.tgt.txt").read_text().splitlines()]
    lines = [f"{w} " + " ".join(f"{rng.gauss(0, 1):.5f}" for _ in range(dim)) for w in words]
    path.write_text(f"{len(lines)} {dim}\n" + "\n".join(lines) + "\n")
    return path


def test_validate_after_embeddings_moved(toy_data, tmp_path):
    """A token_smooth checkpoint remembers its --token-embeddings path: once the
    file has moved, fairseq-validate says so in one line, and the override the
    message suggests makes fairseq-validate work."""
    emb = write_toy_embeddings(toy_data, tmp_path / "emb.txt")
    ckpt = tmp_path / "ckpt"
    _train(toy_data, ckpt, "--criterion", "token_smooth", "--token-embeddings", emb,
           "--max-epoch", "1", "--no-epoch-checkpoints", "--no-save-optimizer-state")
    moved = emb.rename(tmp_path / "moved.txt")
    validate = [toy_data, "--user-dir", USER_DIR, "--task", "seqlevel_translation",
                "--path", ckpt / "checkpoint_last.pt", "--max-tokens", "400", "--no-progress-bar"]

    out = run_cli("validate", *validate, check=False)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    last = out.stderr.rstrip().splitlines()[-1]
    assert last.startswith(f"error: --token-embeddings {emb}: No such file or directory"), out.stderr[-2000:]
    hint = re.search(r"""--model-overrides "(\{.*NEW_PATH.*\})\"""", last)
    assert hint, last

    out = run_cli("validate", *validate, "--model-overrides", hint.group(1).replace("NEW_PATH", str(moved)))
    assert re.search(r"valid on 'valid' subset \| loss [0-9.]+ \| nll_loss [0-9.]+", out.stdout + out.stderr), \
        (out.stdout + out.stderr)[-3000:]
