"""benchmarks/mbr_quality.py: beam vs MBR decoding of kept checkpoints. The aggregation
(Δ, its interval over pre-trained models, the direction for edit error), the table,
the per-decode cache (a finished decode is not re-run, a killed run resumes, a new
checkpoint is decoded again) with fairseq-generate replaced by a stub, one-line errors."""

import gzip
import json
import math
import statistics

import pytest

from benchmarks import config as C, evaluate as E, mbr_quality as M, plan as P

TOY_CONFIG = """
[run]
seeds = [1]

[tasks.toy]
data = "{data}/toy"
train_flags = ["--task", "seqlevel_translation", "-s", "src", "-t", "tgt", "--extra-references", "ref2",
               "--reward", "bleu", "--reward-level", "word", "--eval-reward"]
model_flags = ["--arch", "lstm"]
optim_flags = ["--optimizer", "adam"]
pretrain_flags = ["--max-update", "2"]
finetune_updates = 2
metric = "bleu"
refs = ["tgt", "ref2"]
beam = 5
curve_key = "greedy_bleu"
higher_is_better = true

[tasks.spell]
data = "{data}/spell"
train_flags = ["--task", "seqlevel_translation", "-s", "noisy", "-t", "clean", "--reward", "edit"]
model_flags = ["--arch", "lstm"]
optim_flags = ["--optimizer", "adam"]
pretrain_flags = ["--max-update", "2"]
finetune_updates = 2
metric = "edit"
refs = ["clean"]
beam = 1
curve_key = "reward"
higher_is_better = false

[criterions.mle]
flags = ["--criterion", "label_smoothed_cross_entropy"]
tasks = ["toy", "spell"]
notes = "the control"

[criterions.raml]
flags = ["--criterion", "raml"]
tasks = ["toy"]
notes = "another"
"""

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def _sentences(n, seed):
    return [" ".join(WORDS[(i * 7 + j * 3 + seed) % len(WORDS)] for j in range(3 + i % 5)) for i in range(n)]


@pytest.fixture
def bench(tmp_path):
    data = tmp_path / "data"
    for task, langs in (("toy", ("tgt", "ref2")), ("spell", ("clean",))):
        (data / task / "raw").mkdir(parents=True)
        for k, lang in enumerate(langs):
            (data / task / "raw" / f"test.{lang}").write_text("\n".join(_sentences(40, k)) + "\n")
    config = tmp_path / "toy.toml"
    config.write_text(TOY_CONFIG.replace("{data}", str(data)))
    work, results = tmp_path / "work", tmp_path / "results"
    return {"config": config, "work": work, "results": results, "data": data,
            "argv": ["--config", str(config), "--workdir", str(work), "--results", str(results)]}


def _checkpoint(work, task, crit, seed, pretrain=1, content=b"weights"):
    path = P.run_dir(work, task, crit, seed, pretrain) / "checkpoint_last.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


@pytest.fixture
def stub(monkeypatch):
    """benchmarks.evaluate.generate replaced: the beam returns the references with the last
    word dropped on every other sentence, MBR the references themselves; calls recorded."""
    calls = []

    def generate(data, checkpoint, split="test", beam=5, batch_size=128, extra_args=()):
        calls.append({"data": str(data), "checkpoint": str(checkpoint), "beam": beam, "args": list(extra_args)})
        lang = "tgt" if str(data).endswith("toy") else "clean"
        refs = E.read_refs(data, split, (lang,))[lang]
        if "--mbr-candidates" in extra_args:
            return list(refs)
        return [" ".join(r.split()[:-1]) if i % 2 else r for i, r in enumerate(refs)]

    monkeypatch.setattr(E, "generate", generate)
    return calls


# ------------------------------------------------------------------ aggregation


def _rows(task, metric, deltas, beam_value=20.0, wall=(10.0, 30.0), verdicts=None):
    """Beam and mbr_chrf_16 rows of criterion mle: deltas[(model, seed)] = mbr − beam."""
    rows = []
    for i, ((model, seed), d) in enumerate(sorted(deltas.items())):
        base = beam_value + i
        rows.append({"task": task, "criterion": "mle", "pretrain": model, "seed": seed, "decoder": "beam5",
                     "metric": metric, "value": base, "details": {"wall_s": wall[0], "chrf": 50.0}})
        details = {"wall_s": wall[1], "chrf": 50.0 + 2 * d}
        if verdicts:
            details["bootstrap"] = {"verdict": verdicts[i]}
        rows.append({"task": task, "criterion": "mle", "pretrain": model, "seed": seed, "decoder": "mbr_chrf_16",
                     "metric": metric, "value": base + d, "details": details})
    return rows


DELTAS = {(1, 1): 1.0, (1, 2): 1.0, (2, 1): 1.1, (2, 2): 1.3, (3, 1): 1.4, (3, 2): 1.4}
CFG = {"tasks": {"toy": {"metric": "bleu", "refs": ["en", "kjv"], "higher_is_better": True},
                 "spell": {"metric": "edit", "refs": ["clean"], "higher_is_better": False}}}


def test_delta_is_per_model_mean_with_t_interval_over_models():
    agg = M.aggregate(_rows("toy", "bleu", DELTAS, verdicts=["ahead"] * 4 + ["tie", "behind"]), "beam5")
    base, mbr = agg["toy"]["mle"]["beam5"], agg["toy"]["mle"]["mbr_chrf_16"]
    assert list(agg["toy"]["mle"]) == ["beam5", "mbr_chrf_16"]
    assert base["delta"] == 0.0 and base["n"] == 6
    # per model: 1.0, 1.2, 1.4 -> mean 1.2, std 0.2, 95% t (2 df: 4.303) half-width 4.303 * 0.2 / sqrt(3)
    assert mbr["delta_models"] == pytest.approx({1: 1.0, 2: 1.2, 3: 1.4})
    assert mbr["delta"] == pytest.approx(1.2)
    assert mbr["delta_ci95"] == pytest.approx(4.303 * 0.2 / math.sqrt(3))
    assert mbr["chrf"]["delta"] == pytest.approx(2.4)  # chrF rows: twice the deltas
    assert mbr["bootstrap"] == {"ahead": 4, "tie": 1, "behind": 1}
    assert mbr["wall_ratio"] == pytest.approx(3.0)
    assert (mbr["n"], mbr["pretrains"], mbr["seeds"]) == (6, [1, 2, 3], [1, 2])


def test_direction_lower_is_better_for_edit_error():
    worse = M.aggregate(_rows("spell", "edit_error", DELTAS), "beam5")["spell"]["mle"]["mbr_chrf_16"]
    better = M.aggregate(_rows("spell", "edit_error", {k: -v for k, v in DELTAS.items()}), "beam5")
    better = better["spell"]["mle"]["mbr_chrf_16"]
    assert worse["delta"] == pytest.approx(1.2) and better["delta"] == pytest.approx(-1.2)
    assert M.delta_cell(worse, higher_is_better=False) == "+1.20 [+0.70, +1.70] behind"
    assert M.delta_cell(better, higher_is_better=False) == "**-1.20 [-1.70, -0.70] ahead**"
    # the same rows on a BLEU task read the other way
    assert M.delta_cell(worse, higher_is_better=True) == "**+1.20 [+0.70, +1.70] ahead**"
    # an interval that covers 0: no verdict word; one model: no interval
    tie = M.aggregate(_rows("toy", "bleu", {(1, 1): 1.0, (2, 1): -0.5}), "beam5")["toy"]["mle"]["mbr_chrf_16"]
    half = 12.706 * statistics.stdev([1.0, -0.5]) / math.sqrt(2)  # 1 df
    assert M.delta_cell(tie, True) == f"+0.25 [{0.25 - half:+.2f}, {0.25 + half:+.2f}]" == "+0.25 [-9.28, +9.78]"
    one = M.aggregate(_rows("toy", "bleu", {(1, 1): 1.0, (1, 2): 2.0}), "beam5")["toy"]["mle"]["mbr_chrf_16"]
    assert M.delta_cell(one, True) == "+1.50 (1 model, no interval)"


def test_table_has_the_numbers():
    rows = _rows("toy", "bleu", DELTAS, verdicts=["ahead"] * 4 + ["tie", "behind"]) + \
        _rows("spell", "edit_error", DELTAS, beam_value=5.0)
    md = M.markdown(CFG, M.aggregate(rows, "beam5"), "beam5")
    lines = md.splitlines()
    assert lines[0] == "### toy: test BLEU (sacrebleu, refs en+kjv), higher is better"
    assert "### spell: test character edit error %, lower is better" in lines
    toy_mbr = next(line for line in lines if line.startswith("| mle | mbr_chrf_16 | 23.70"))
    cells = [c.strip() for c in toy_mbr.strip("|").split("|")]
    # beam values 20..25 (mean 22.50), mbr = beam + delta (mean 23.70); chrF 50 + 2 delta
    mbr_std = statistics.stdev(20 + i + d for i, (_, d) in enumerate(sorted(DELTAS.items())))
    assert cells == ["mle", "mbr_chrf_16", f"23.70 ± {mbr_std:.2f}", "**+1.20 [+0.70, +1.70] ahead**", "52.40",
                     "**+2.40 [+1.41, +3.39] ahead**", "4/1/1", "6 (3 × 2)", "30.0", "3.00×"]
    assert "| mle | beam5 | 22.50 ± 1.87 | (baseline) | 50.00 |  |  | 6 (3 × 2) | 10.0 |  |" in lines
    spell = next(line for line in lines if line.startswith("| mle | mbr_chrf_16 | 8.70"))
    assert "+1.20 [+0.70, +1.70] behind" in spell and "chrF" not in spell
    assert spell.count("|") == 9  # no chrF columns for the edit task


# ------------------------------------------------------------------ cache and resume


def test_decodes_are_cached_and_resume(bench, stub, capsys):
    work, results = bench["work"], bench["results"]
    _checkpoint(work, "toy", "mle", 1)
    _checkpoint(work, "toy", "mle", 1, pretrain=2)
    argv = bench["argv"] + ["--tasks", "toy", "--criterions", "mle", "--pretrain-seeds", "1,2",
                            "--pretrain-ids", "1,7", "--seeds", "1,2", "--candidates", "4",
                            "--utilities", "chrf,bleu", "--mbr-seed", "3"]
    assert M.main(argv) == 0
    out = capsys.readouterr().out
    assert "skip: toy / mle / pretrain 1 / seed 2: no " in out and "pretrain 2 (id 7) / seed 2" in out
    assert len(stub) == 6  # 2 checkpoints x (beam5, mbr_chrf_4, mbr_bleu_4)
    beam_calls = [c for c in stub if not c["args"]]
    assert len(beam_calls) == 2 and all(c["beam"] == 5 for c in beam_calls)
    mbr = [c["args"] for c in stub if c["args"]]
    assert ["--mbr-candidates", "4", "--mbr-utility", "chrf", "--mbr-sampling", "epsilon", "--mbr-epsilon",
            "0.02", "--seed", "3", "--reward-level", "word"] in mbr
    assert any(a[:4] == ["--mbr-candidates", "4", "--mbr-utility", "bleu"] for a in mbr)

    rows = json.loads((results / "mbr.json").read_text())
    assert len(rows) == 6 and {r["pretrain"] for r in rows} == {1, 7}
    assert all(r["details"]["pretrain_seed"] == 2 for r in rows if r["pretrain"] == 7)
    beam = next(r for r in rows if r["decoder"] == "beam5" and r["pretrain"] == 1)
    best = next(r for r in rows if r["decoder"] == "mbr_chrf_4" and r["pretrain"] == 1)
    assert best["metric"] == "bleu" and best["value"] == pytest.approx(100.0) and beam["value"] < 100.0
    assert beam["value"] == pytest.approx(beam["details"]["scores"]["bleu_tgt+ref2"])
    assert best["details"]["chrf"] == pytest.approx(100.0)
    assert best["details"]["bootstrap"]["verdict"] == "ahead" and "bootstrap" not in beam["details"]
    kept = results / "translations" / "toy" / "mbr" / "mle.p7.s1.mbr_chrf_4.txt.gz"
    assert gzip.open(kept, "rt").read().splitlines() == E.read_refs(bench["data"] / "toy", "test", ("tgt",))["tgt"]
    md = (results / "mbr.md").read_text()
    assert "| mle | mbr_bleu_4 | 100.00 ± 0.00 |" in md and "2/0/0" in md

    # a rerun decodes nothing and keeps one row per decode
    assert M.main(argv) == 0
    assert len(stub) == 6 and "(cached)" in capsys.readouterr().out
    assert json.loads((results / "mbr.json").read_text()) == rows

    # killed in the middle (the second decode of a run): what finished stays, the rest runs next time
    (work / "toy" / "mle" / "seed1" / "mbr" / "mbr_bleu_4.json").unlink()
    (work / "toy" / "mle" / "seed1" / "mbr" / "mbr_chrf_4.json").unlink()
    real = E.generate

    def killed(*a, **k):
        if "bleu" in k.get("extra_args", ()):
            raise KeyboardInterrupt
        return real(*a, **k)

    E.generate = killed
    with pytest.raises(KeyboardInterrupt):
        M.main(argv)
    E.generate = real
    assert len(stub) == 7  # mbr_chrf_4 of seed1 ran, then the kill
    assert M.main(argv) == 0
    assert len(stub) == 8 and [c["args"][3] for c in stub[-2:]] == ["chrf", "bleu"]

    # another checkpoint in the same run directory (a rerun of the quality benchmark): decoded again
    _checkpoint(work, "toy", "mle", 1, pretrain=2, content=b"other weights")
    assert M.main(argv) == 0
    assert len(stub) == 11 and all("pretrain2_seed1" in c["checkpoint"] for c in stub[-3:])


def test_edit_error_task_direction_end_to_end(bench, stub):
    _checkpoint(bench["work"], "spell", "mle", 1)
    argv = bench["argv"] + ["--tasks", "spell", "--criterions", "mle", "--candidates", "8", "--utilities", "chrf"]
    assert M.main(argv) == 0
    assert stub[1]["args"][:4] == ["--mbr-candidates", "8", "--mbr-utility", "chrf"]
    assert "--reward-level" not in stub[1]["args"]  # spelling scores characters: the default level
    rows = {r["decoder"]: r for r in json.loads((bench["results"] / "mbr.json").read_text())}
    assert rows["beam5"]["metric"] == "edit_error" and rows["beam5"]["value"] > 0
    assert rows["mbr_chrf_8"]["value"] == 0.0
    assert rows["mbr_chrf_8"]["details"]["bootstrap"]["verdict"] == "ahead"  # less error is better
    assert rows["mbr_chrf_8"]["details"]["bootstrap"]["delta"] == pytest.approx(-rows["beam5"]["value"])
    assert "1/0/0" in (bench["results"] / "mbr.md").read_text()


def test_dry_run_lists_checkpoints_and_cached_decodes(bench, stub, capsys):
    _checkpoint(bench["work"], "toy", "mle", 1)
    argv = bench["argv"] + ["--tasks", "toy", "--criterions", "mle,raml", "--candidates", "4", "--utilities", "chrf"]
    assert M.main(argv + ["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "toy / mle / pretrain 1 / seed 1: beam5 to run, mbr_chrf_4 to run" in out
    assert "skip: toy / raml / pretrain 1 / seed 1: no " in out and "2 decodes to run, 0 cached" in out
    assert M.main(argv) == 0 and len(stub) == 2
    capsys.readouterr()
    assert M.main(argv + ["--dry-run"]) == 0
    assert "beam5 cached, mbr_chrf_4 cached" in capsys.readouterr().out
    assert len(stub) == 2 and not (bench["work"] / "toy" / "raml").exists()


def test_decoder_flags_follow_the_task_reward_level():
    cfg = C.load_config()
    assert M.decoder_args(cfg["tasks"]["bible_es_en"], "mbr_bleu_32")[-2:] == ["--reward-level", "word"]
    assert "--reward-level" not in M.decoder_args(cfg["tasks"]["spelling_0.3"], "mbr_chrf_16")
    assert M.decoder_args(cfg["tasks"]["bible_es_en"], "beam5") == []


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("extra,flag", [
    (["--tasks", "nope"], "--tasks: unknown task 'nope'"),
    (["--tasks", "toy", "--criterions", "mle,nope"], "--criterions: unknown criterion 'nope'"),
    (["--tasks", "toy", "--utilities", "chrf,nope"], "--utilities: unknown reward 'nope'"),
    (["--tasks", "toy", "--candidates", "16,0"], "--candidates: expected"),
    (["--tasks", "toy", "--pretrain-seeds", "1,2", "--pretrain-ids", "3"], "--pretrain-ids: expected"),
    (["--tasks", "toy"], "--workdir "),  # no checkpoint at all
])
def test_bad_input_is_one_line_naming_the_flag(bench, stub, capsys, extra, flag):
    assert M.main(bench["argv"] + extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: " + flag) and "\n" not in err, err
    assert not stub

