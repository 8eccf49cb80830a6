"""Every criterion's own curves reach TensorBoard (``fairseq-train --tensorboard-logdir``).

Each criterion trains 2 updates on the toy data with ``--eval-reward``; erac
and vaml train their critic phase (2 updates), then their second phase from
that checkpoint (2 updates, counted from 0 again: ``--reset-optimizer``).
All runs go through one Python process (a fairseq start costs more than a
tiny run; see DRIVER), each writing its own log directory.  The event files
are read back with TensorBoard's ``EventAccumulator``: the metrics of each
criterion's ``reduce_metrics`` (docs/monitoring.md) must be scalars of
``train_inner`` (every ``--log-interval``), ``train`` (the end-of-epoch
summary) and, for what validation logs, ``valid``.
"""

import os
import random
import subprocess
import sys

import pytest

from conftest import REPO, TINY_LSTM, USER_DIR

COMMON = ["--user-dir", USER_DIR, "--task", "seqlevel_translation", *TINY_LSTM, "--dropout", "0",
          "--optimizer", "adam", "--lr", "0.005", "--max-tokens", "400", "--extra-references", "ref2",
          "--eval-reward", "--no-progress-bar", "--log-format", "simple", "--log-interval", "1",
          "--seed", "1", "--num-workers", "0", "--no-epoch-checkpoints", "--no-save-optimizer-state"]
CRITIC = ["--critic-embed-dim", "8", "--critic-hidden-size", "8"]

# run name: criterion flags (fairseq-train argv after COMMON); "EMB" is the embeddings file
RUNS = {
    "raml": ["--criterion", "raml", "--raml-alpha", "0.5", "--raml-samples", "2", "--raml-reward", "bleu"],
    "token_smooth": ["--criterion", "token_smooth", "--token-smooth-topk", "4", "--token-embeddings", "EMB"],
    "searnn_kl": ["--criterion", "searnn_kl", "--searnn-max-len-ref-b", "2", "--searnn-tokens", "3"],
    "risk": ["--criterion", "risk", "--risk-candidates", "3"],
    "seq_exploration": ["--criterion", "seq_exploration", "--seq-exploration-samples", "3",
                        "--seq-exploration-entropy-weight", "0.01"],
    "interpolation": ["--criterion", "interpolation", "--interpolation-lambdas", "0.3,0.3,0.4"],
    "preference": ["--criterion", "preference", "--preference-candidates", "3"],
    "erac": ["--criterion", "erac", "--erac-samples", "2", *CRITIC, "--erac-phase", "critic"],
    "erac_joint": ["--criterion", "erac", "--erac-samples", "2", *CRITIC, "--erac-phase", "joint"],
    "vaml": ["--criterion", "vaml", "--vaml-samples", "2", *CRITIC, "--vaml-phase", "q"],
    "vaml_actor": ["--criterion", "vaml", "--vaml-samples", "2", *CRITIC, "--vaml-phase", "actor"],
}
SECOND_PHASE = {"erac_joint": "erac", "vaml_actor": "vaml"}  # run: the run whose checkpoint it starts from

STOCK = {"loss", "nll_loss", "ppl"}  # every criterion (log_stock_metrics)
NO_MODEL = {"vaml"}  # critic-only training steps: no nll_loss / ppl in training (they read 0 and 1)
FAIRSEQ = {"wps", "ups", "wpb", "bsz", "lr", "gnorm", "clip", "loss_scale", "train_wall", "wall", "gb_free"}
TASK_VALID = {"reward", "greedy_bleu", "greedy_chrf"}  # seqlevel_translation --eval-reward
# run: (training metrics, validation metrics), each beside STOCK
OWN = {
    "raml": ({"raml_dist", "raml_ess"}, {"objective"}),
    "token_smooth": (set(), {"objective"}),
    "searnn_kl": ({"searnn_gt_best", "searnn_rollin_cost"}, {"objective"}),
    "risk": ({"risk", "risk_cost", "risk_distinct", "risk_q_max", "risk_q_entropy"}, {"objective"}),
    "seq_exploration": ({"sle_reward", "sle_greedy_reward", "sle_distance", "sle_entropy"}, {"objective"}),
    "interpolation": ({"interp_lambda1", "interp_lambda2", "interp_lambda3", "interp_from_model",
                       "interp_from_reward", "interp_from_reference"}, {"interp_valid_reward"}),
    "preference": ({"preference_reward_margin", "preference_accuracy", "preference_logratio", "preference_coverage",
                    "preference_pairs"}, {"objective"}),
    "erac": ({"erac_td", "erac_q", "erac_entropy", "erac_actor", "erac_reward", "erac_eos_preferred"}, set()),
    "erac_joint": ({"erac_td", "erac_q", "erac_entropy", "erac_actor", "erac_reward", "erac_eos_preferred"},
                   set()),
    "vaml": ({"vaml_td", "vaml_q", "vaml_reward"}, set()),
    "vaml_actor": ({"vaml_q"}, set()),
}

# All runs in one process: fairseq_cli.train.main per command line.  fairseq
# keeps one SummaryWriter per tag ("train_inner", "train", "valid") in a
# module-level dict for the whole process, so it is closed and emptied between
# runs (else a run would write into the first run's directory); the
# checkpoint/early-stop state of the previous run is dropped as
# tests/test_recipes.py's driver does.
DRIVER = r"""
import shlex, sys
from fairseq import checkpoint_utils
from fairseq.logging import progress_bar
from fairseq_cli import train
for line in sys.stdin.read().splitlines():
    for fn, attrs in ((checkpoint_utils.save_checkpoint, ("best",)), (train.should_stop_early, ("best", "num_runs"))):
        for a in attrs:
            if hasattr(fn, a):
                delattr(fn, a)
    sys.argv = ["fairseq-train", *shlex.split(line)]
    train.cli_main()
    progress_bar._close_writers()
    progress_bar._tensorboard_writers.clear()
    print("RAN " + sys.argv[sys.argv.index("--save-dir") + 1], file=sys.stderr, flush=True)
"""


def _embeddings(data, path, dim=4, seed=0):
    rng = random.Random(seed)
    words = [line.split()[0] for line in (data / "dict.tgt.txt").read_text().splitlines()]
    lines = [f"{w} " + " ".join(f"{rng.gauss(0, 1):.4f}" for _ in range(dim)) for w in words]
    path.write_text(f"{len(lines)} {dim}\n" + "\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def logdirs(toy_data, tmp_path_factory):
    """{run: its --tensorboard-logdir}, after every run of RUNS."""
    import shlex

    pytest.importorskip("tensorboard")  # scripts/install.sh installs it (the tensorboard extra)

    root = tmp_path_factory.mktemp("tensorboard")
    emb = _embeddings(toy_data, root / "emb.txt")
    lines, dirs = [], {}
    for run, flags in RUNS.items():
        flags = [str(emb) if f == "EMB" else f for f in flags]
        dirs[run] = root / run / "tb"
        steps = ["--max-update", "2"]
        if run in SECOND_PHASE:  # as docs/monitoring.md: --reset-optimizer counts updates from 0 again
            steps += ["--restore-file", str(root / SECOND_PHASE[run] / "ckpt" / "checkpoint_last.pt"),
                      "--reset-optimizer"]
        argv = [str(toy_data), *COMMON, *flags, *steps, "--save-dir", str(root / run / "ckpt"),
                "--tensorboard-logdir", str(dirs[run])]
        lines.append(shlex.join(argv))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", DRIVER], input="\n".join(lines), capture_output=True, text=True,
                          env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return dirs


def scalars(logdir, tag):
    """{metric: [(step, value)]} of the event files fairseq wrote for ``tag``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir / tag), size_guidance={"scalars": 0})
    acc.Reload()
    return {name: [(e.step, e.value) for e in acc.Scalars(name)] for name in acc.Tags()["scalars"]}


@pytest.mark.parametrize("run", list(RUNS))
def test_own_metrics_reach_tensorboard(run, logdirs):
    train_own, valid_own = OWN[run]
    stock_train = {"loss"} if run in NO_MODEL else STOCK
    inner = scalars(logdirs[run], "train_inner")
    missing = (stock_train | train_own) - inner.keys()
    assert not missing, (run, "train_inner", missing, sorted(inner))
    # and nothing else: a new metric gets its line in OWN and in docs/monitoring.md
    assert inner.keys() - FAIRSEQ == stock_train | train_own, (run, sorted(inner.keys() - FAIRSEQ - STOCK - train_own))
    for name in stock_train | train_own:  # one point per update (--log-interval 1)
        assert [step for step, _ in inner[name]] == [1, 2], (run, name, inner[name])
    train = scalars(logdirs[run], "train")
    missing = (stock_train | train_own) - train.keys()
    assert not missing, (run, "train", missing, sorted(train))
    assert all([step for step, _ in train[name]] == [2] for name in stock_train | train_own), run
    valid = scalars(logdirs[run], "valid")
    missing = (STOCK | TASK_VALID | valid_own) - valid.keys()
    assert not missing, (run, "valid", missing, sorted(valid))
    extra = {k for k in valid.keys() - FAIRSEQ - STOCK - TASK_VALID - valid_own if not k.startswith("best_")}
    assert not extra, (run, "valid", sorted(extra))
    # training-only metrics stay out of validation (it logs the reference NLL, not a training step)
    assert not (train_own - valid_own) & valid.keys(), (run, sorted(valid))
    assert 0.0 <= valid["reward"][-1][1] <= 1.0 and 0.0 <= valid["greedy_chrf"][-1][1] <= 100.0


def test_monitoring_page_explains_every_curve():
    """docs/monitoring.md names every curve the runs above check."""
    page = (REPO / "docs" / "monitoring.md").read_text()
    names = STOCK | TASK_VALID | {"objective"} | set().union(*(train | valid for train, valid in OWN.values()))
    missing = sorted(name for name in names if f"`{name}`" not in page)
    assert not missing, missing
