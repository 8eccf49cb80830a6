"""run_demo.py's progress line: parsed from fairseq's log lines while the full
log still goes to its file."""

import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "examples"))
import run_demo  # noqa: E402

TRAIN_INNER = ("2026-12-02 06:17:13 | INFO | train_inner | epoch 008:     52 / 214 loss=3.566, nll_loss=3.566, "
               "ppl=11.84, wps=1080, num_updates=1550, lr=0.002")
VALID = ("2026-12-02 06:16:16 | INFO | valid | epoch 007 | valid on 'valid' subset | loss 4.061 | nll_loss 4.061 | "
         "reward 0.1615 | ppl 16.69 | greedy_bleu 15.13 | wps 2387.8 | num_updates 1498")


EPOCH_END = ("2026-12-02 06:17:40 | INFO | train | epoch 008 | loss 3.701 | nll_loss 3.701 | ppl 13.01 | "
             "wps 1100 | num_updates 1712 | lr 0.002")


def test_progress_fields():
    state = {}
    assert run_demo.progress_fields(TRAIN_INNER, state)
    assert state == {"epoch": "008", "updates": "1550", "loss": "3.566"}
    assert not run_demo.progress_fields(TRAIN_INNER, state)  # nothing new
    assert not run_demo.progress_fields("2026-12-02 | INFO | fairseq_cli.train | loaded checkpoint", state)
    assert run_demo.progress_fields(VALID, state)
    assert state["valid BLEU"] == "15.13" and state["valid loss"] == "4.061" and state["loss"] == "3.566"
    # the epoch-end summary repeats the update count with the epoch's mean loss: not a new line
    assert not run_demo.progress_fields(EPOCH_END, state) and state["loss"] == "3.566"


def test_run_shows_progress_and_keeps_the_log(tmp_path, capsys):
    script = "print({!r}); print('other line'); print({!r})".format(TRAIN_INNER, VALID)
    log = tmp_path / "train.log"
    run_demo.run([sys.executable, "-c", script], log, label="mle")
    out = capsys.readouterr().out
    lines = [l for l in out.splitlines() if l.startswith("[mle]")]
    assert len(lines) == 2 and "updates 1550 | loss 3.566" in lines[0] and "valid BLEU 15.13" in lines[1]
    assert log.read_text().splitlines() == [TRAIN_INNER, "other line", VALID]


def test_demo_criterions_are_the_benchmarked_ones():
    """The demo fine-tunes with the flags whose Bible rows the README reports (a flag
    changed in one place and not the other would demo an unmeasured setting), and
    fairseq-train accepts every demo run's command line."""
    from benchmarks.checks import check_fairseq_args
    from benchmarks.config import DEFAULT_CONFIG, load_config
    from benchmarks.plan import criterion_flags, pre_phase_flags, pre_phase_of

    cfg = load_config(DEFAULT_CONFIG)
    for name, flags in run_demo.FINETUNE.items():
        if name != "mle" and "bible_es_en" in cfg["criterions"].get(name, {}).get("tasks", []):
            assert flags == criterion_flags(cfg, name, "bible_es_en"), name
        pre = pre_phase_of(cfg, name) if name in cfg["criterions"] else None
        assert (name in run_demo.PRE_PHASE) == (pre is not None), name
        if pre:
            assert run_demo.PRE_PHASE[name] == (pre["name"], pre_phase_flags(pre, "bible_es_en"))
    data = REPO / "data-bin" / "bible_es_en"
    for name, flags in [*run_demo.FINETUNE.items(), *((n, f) for n, (_, f) in run_demo.PRE_PHASE.items())]:
        flags = ["emb.txt" if f == "{token_embeddings}" else f for f in flags]
        argv = [data, *run_demo.COMMON, *run_demo.MODEL, *run_demo.OPTIM, *flags,
                "--finetune-from-model", "x.pt", "--max-epoch", "1"]
        assert check_fairseq_args(argv) is None, (name, check_fairseq_args(argv))
