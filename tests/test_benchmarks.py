"""The benchmark package (benchmarks/): config loading and validation, log parsing,
aggregation, and one tiny end-to-end quality + speed run on the toy data (a few updates)."""

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from benchmarks import checks, config as C, logs, plan as P, plots, quality, report, runs as R, speed, stats

TOY_CONFIG = """
[run]
seeds = [1]
startup_s = 5

[tasks.toy]
data = "{data}"
check_file = "dict.tgt.txt"
target_lang = "tgt"
train_flags = ["--task", "seqlevel_translation", "-s", "src", "-t", "tgt",
               "--extra-references", "ref2", "--reward", "bleu", "--eval-reward"]
model_flags = ["--arch", "lstm", "--encoder-embed-dim", "16", "--decoder-embed-dim", "16",
               "--encoder-hidden-size", "16", "--decoder-hidden-size", "16",
               "--decoder-out-embed-dim", "16"]
optim_flags = ["--optimizer", "adam", "--lr", "0.005", "--max-tokens", "400"]
pretrain_flags = ["--max-update", "2"]
finetune_updates = 2
validate_every = 1
metric = "bleu"
refs = ["tgt", "ref2"]
beam = 2
curve_key = "greedy_bleu"
higher_is_better = true
est_sec_per_update = 0.1
est_updates_per_epoch = 2
est_validate_s = 1
est_eval_s = 4

[criterions.mle]
flags = ["--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0"]
tasks = ["toy"]
notes = "the control"

[criterions.raml]
flags = ["--criterion", "raml", "--raml-samples", "2", "--raml-temperature", "0.3"]
tasks = ["toy"]
est_step_cost = 2.0
notes = "toy raml"

[criterions.erac]
flags = ["--criterion", "erac", "--erac-phase", "joint", "--critic-embed-dim", "8", "--critic-hidden-size", "8"]
tasks = ["toy"]
est_step_cost = 3.0
pre_phase = { name = "critic", updates = 3, est_step_cost = 2.0, flags = [
    "--criterion", "erac", "--erac-phase", "critic", "--critic-embed-dim", "8", "--critic-hidden-size", "8"] }
notes = "toy erac: a critic phase, then joint training from its checkpoint"

[criterions.typo]
flags = ["--criterion", "raml", "--raml-samplez", "2"]
tasks = ["toy"]
notes = "a misspelled flag"

[criterions.unknown]
flags = ["--criterion", "no_such_criterion"]
tasks = ["toy"]
notes = "not registered"

[speed.settings.toy]
task = "toy"
batches = 1
"""


@pytest.fixture(scope="module")
def toy_bench(toy_data, tmp_path_factory):
    """A toy data dir with raw/ references and a config pointing at it."""
    root = tmp_path_factory.mktemp("bench")
    data = root / "data"
    shutil.copytree(toy_data, data)
    shutil.copytree(toy_data.parent / "raw", data / "raw")
    config = root / "toy.toml"
    config.write_text(TOY_CONFIG.replace("{data}", str(data)))
    return {"root": root, "config": config, "data": data}


@pytest.fixture(scope="module")
def toy_run(toy_bench):
    """One tiny quality run (pre-train 2 updates, fine-tune 2 updates, 1 seed)."""
    root = toy_bench["root"]
    argv = ["--config", str(toy_bench["config"]), "--workdir", str(root / "work"),
            "--results", str(root / "results")]
    code = quality.main(argv)
    return {"argv": argv, "code": code, "work": root / "work", "results": root / "results"}


# --------------------------------------------------------------------- config

def test_shipped_config_is_valid_and_complete():
    cfg = C.load_config(C.DEFAULT_CONFIG, experiments="all")  # the main rows and every experiment's
    assert {"mle", "raml", "tok_seq", "token_smooth", "searnn_kl"} <= set(cfg["criterions"])
    assert {"bible_es_en", "spelling_0.3", "spelling_0.5"} <= set(cfg["tasks"])
    for name, crit in cfg["criterions"].items():
        assert crit["notes"].strip(), name
    assert cfg["tasks"]["bible_es_en"]["beam"] == 5 and cfg["tasks"]["spelling_0.3"]["beam"] == 1
    quick = C.load_config(C.DEFAULT_CONFIG, quick=True, experiments="all")
    assert quick["run"]["seeds"] == [1]
    assert quick["run"]["results"] != cfg["run"].get("results", "benchmarks/results")
    for name in cfg["tasks"]:
        assert quick["tasks"][name]["finetune_updates"] < cfg["tasks"][name]["finetune_updates"]
    # --quick runs every criterion that has a task, on its default tasks, within its budget
    q_tasks, q_crits, q_seeds = quality.select(quick)
    q_runs = quality.plan_runs(quick, q_tasks, q_crits, q_seeds)
    assert {c for c in cfg["criterions"] if P.criterion_tasks(cfg, c) and not cfg["criterions"][c].get("skip_quick")
            and set(P.criterion_tasks(cfg, c)) & set(q_tasks)} == {r[1] for r in q_runs}
    assert "erac_critic8" not in {r[1] for r in q_runs}  # a diagnostic variant, run when named
    assert {"mle", "raml", "searnn_kl", "erac", "vaml", "interpolation", "risk", "scst"} <= {r[1] for r in q_runs}
    assert P.estimate_plan(quick, q_runs, [(t, 1) for t in q_tasks])["total"] <= quick["run"]["budget_s"]
    assert len(cfg["run"]["seeds"]) >= 3
    # every piece (one task's pre-training, one criterion and its MLE control, all
    # seeds: quality.py --tasks T --criterions mle,C) fits the budget, estimated
    # from the config's own cost figures
    tasks, crits, seeds = quality.select(cfg)
    for task in tasks:
        for crit in crits:
            # a budget variant's piece is one seed (it and its control, --seeds S)
            own = cfg["criterions"][crit].get("finetune_updates") is not None
            runs = quality.plan_runs(cfg, [task], sorted({"mle", P.control_of(cfg, crit), crit}),
                                     seeds[:1] if own else seeds)
            if any(r[1] == crit for r in runs):
                est = P.estimate_plan(cfg, runs, [task])
                assert est["total"] <= cfg["run"]["budget_s"], (task, crit, est["total"])


def test_pre_phase_config_is_checked(toy_bench, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(toy_bench["config"].read_text().replace(
        'pre_phase = { name = "critic", updates = 3,', 'pre_phase = { name = "critic phase", updates = 0, uptades = 1,'))
    with pytest.raises(C.ConfigError) as e:
        C.load_config(bad)
    text = str(e.value)
    assert "criterions.erac.pre_phase: unknown key 'uptades' (did you mean 'updates'?)" in text
    assert "criterions.erac.pre_phase.updates: must be >= 1" in text
    assert "criterions.erac.pre_phase.name: letters, digits and _ only" in text
    cfg = C.load_config(toy_bench["config"])
    cfg["criterions"]["erac"]["pre_phase"]["flags"] = ["--criterion", "erac", "--erac-phaze", "critic"]
    message = checks.check_criterion(cfg, "erac", "toy")
    assert message.startswith("criterion 'erac' (pre_phase critic) on toy:") and "--erac-phaze" in message
    assert P.setting_criterions(cfg, "toy")[:1] == ["mle"]
    # a pre-phase's task_flags follow its flags on that task only (later flags win in fairseq)
    cfg = C.load_config(toy_bench["config"])
    pre = cfg["criterions"]["erac"]["pre_phase"]
    pre["task_flags"] = {"toy": ["--erac-tau", "0.5"]}
    cmd = R.finetune_command(cfg, "toy", "erac", 1, tmp_path / "run", tmp_path / "pre.pt", tmp_path, phase="pre")
    assert " ".join(pre["flags"] + ["--erac-tau", "0.5"]) in " ".join(cmd)
    assert P.pre_phase_flags(pre, "other") == pre["flags"]
    assert checks.check_criterion(cfg, "erac", "toy") is None
    pre["task_flags"] = {"nope": ["--erac-tau", "0.5"]}
    assert "criterions.erac.pre_phase.task_flags: unknown task 'nope'" in C.validate_config(cfg)
    cfg = C.load_config(toy_bench["config"])
    assert P.speed_entry(cfg, "erac_critic") == ("erac", "pre") and P.speed_entry(cfg, "erac") == ("erac", None)


def test_default_task_selection_is_checked_and_used(toy_bench, tmp_path):
    cfg = C.load_config(toy_bench["config"])
    cfg["run"]["tasks"] = []
    assert quality.select(cfg)[0] == ["toy"]  # empty: every task
    raw = tomllib.loads(toy_bench["config"].read_text())
    raw.setdefault("quick", {})["tasks"] = ["toy", "nope"]
    assert any(e.startswith("quick.tasks: expected a list of task names") for e in C.validate_config(raw))


def test_validate_config_reports_every_problem():
    raw = {
        "tasks": {"t": {"data": "d", "train_flags": [], "model_flags": [], "optim_flags": [],
                        "pretrain_flags": [], "finetune_updates": 0, "metric": "rouge", "refs": ["x"],
                        "beam": 1, "curve_key": "reward", "higher_is_better": True, "bogus": 1}},
        "criterions": {"raml": {"flgs": ["--criterion", "raml"], "tasks": ["t", "nope"], "notes": "n"}},
    }
    errors = "\n".join(C.validate_config(raw))
    assert "needs a [criterions.mle]" in errors
    assert "tasks.t: unknown key 'bogus'" in errors
    assert "tasks.t.metric" in errors and "finetune_updates: must be >= 1" in errors
    assert "criterions.raml: unknown key 'flgs' (did you mean 'flags'?)" in errors
    assert "criterions.raml: missing key 'flags'" in errors
    assert "unknown task 'nope'" in errors


def test_load_config_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[tasks\n")
    with pytest.raises(C.ConfigError, match="bad.toml"):
        C.load_config(bad)
    with pytest.raises(C.ConfigError, match="not found"):
        C.load_config(tmp_path / "missing.toml")


def test_canonical_config_and_every_experiment_load_into_the_dataclasses():
    """config.toml has one row per criterion; each experiments/*.toml opens with the
    question it answered, holds only [criterions.*] tables and loads over it."""
    cfg = C.load_config(C.DEFAULT_CONFIG)
    assert isinstance(cfg, C.BenchConfig) and isinstance(cfg.run, C.RunConfig)
    assert all(isinstance(t, C.TaskConfig) for t in cfg.tasks.values())
    assert all(isinstance(c, C.CriterionConfig) for c in cfg.criterions.values())
    assert isinstance(cfg.criterions["erac"].pre_phase, C.PrePhase) and cfg.criterions["erac"].pre_phase.updates == 214
    assert isinstance(cfg.speed.settings["bible"], C.SpeedSetting) and isinstance(cfg.speed.sampler, C.SamplerConfig)
    assert cfg.experiments == [] and cfg.tasks["spelling_0.3"].beam == 1
    experiments = sorted(C.EXPERIMENTS.glob("*.toml"))
    assert len(experiments) >= 5
    seen = set(cfg.criterions)
    for path in experiments:
        text = path.read_text()
        assert text.startswith("# Experiment: ") and "?" in text.split("\n\n")[0], path  # its question
        raw = tomllib.loads(text)
        assert set(raw) == {"criterions"} and raw["criterions"], path
        assert not set(raw["criterions"]) & seen, path  # every variant in one file only
        seen |= set(raw["criterions"])
        exp = C.load_config(C.DEFAULT_CONFIG, experiments=[path.stem])
        assert set(raw["criterions"]) <= set(exp.criterions) and str(path) in exp.experiments
        assert all(isinstance(exp.criterions[n], C.CriterionConfig) for n in raw["criterions"])
    everything = C.load_config(C.DEFAULT_CONFIG, quick=True, experiments="all")
    assert set(everything.criterions) == seen and everything.mode == "quick"
    # a variant whose `like` names a row of another experiment file brings that file
    assert "scst_mean_mle" in C.load_config(C.DEFAULT_CONFIG, experiments="budget_e4").criterions


def test_a_bad_key_or_type_is_a_one_line_error_naming_file_and_key(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text(C.DEFAULT_CONFIG.read_text().replace("[criterions.raml]\n", "[criterions.raml]\nflgs = 1\n"))
    with pytest.raises(C.ConfigError) as e:
        C.load_config(bad)
    assert str(e.value) == f"{bad}: criterions.raml: unknown key 'flgs' (did you mean 'flags'?)"
    assert quality.main(["--config", str(bad), "--dry-run"]) == 2
    assert capsys.readouterr().err == f"error: {bad}: criterions.raml: unknown key 'flgs' (did you mean 'flags'?)\n"
    bad.write_text(C.DEFAULT_CONFIG.read_text().replace("beam = 5\n", 'beam = "5"\n'))
    with pytest.raises(C.ConfigError) as e:
        C.load_config(bad)
    assert str(e.value) == f"{bad}: tasks.bible_es_en.beam: expected int, got '5'"
    exp = tmp_path / "exp.toml"
    exp.write_text('[criterions.raml_x]\nlike = "raml"\ntasks = ["spelling_0.3"]\nnotes = "n"\nest_step_cost = "low"\n')
    with pytest.raises(C.ConfigError) as e:
        C.load_config(C.DEFAULT_CONFIG, experiments=[str(exp)])
    assert str(e.value) == f"{exp}: criterions.raml_x.est_step_cost: expected int/float, got 'low'"
    exp.write_text('[tasks.x]\ndata = "d"\n[criterions.raml]\nflags = []\ntasks = []\nnotes = ""\n')
    with pytest.raises(C.ConfigError) as e:
        C.load_config(C.DEFAULT_CONFIG, experiments=[str(exp)])
    assert str(e.value).splitlines() == [f"{exp}: tasks: an experiment file holds [criterions.*] tables only",
                                         f"{exp}: criterions.raml: already defined in {C.DEFAULT_CONFIG}"]


def test_quality_finds_a_named_variant_in_its_experiment_file(tmp_path, capsys):
    argv = ["--dry-run", "--tasks", "bible_es_en", "--workdir", str(tmp_path / "w"), "--results", str(tmp_path / "r")]
    assert quality.main(argv + ["--criterions", "risk_beam"]) == 0
    assert "criterions: mle, risk_beam;" in capsys.readouterr().out
    assert quality.main(argv + ["--experiment", "budget_e4", "--criterions", "vaml_e4"]) == 0
    assert "criterions: mle, mle_e4, vaml_e4;" in capsys.readouterr().out
    assert quality.main(argv + ["--experiment", "risk_beam"]) == 0  # an experiment's own rows, in file order
    assert "criterions: mle, risk_beam, risk_beam_mean;" in capsys.readouterr().out


def test_check_criterion_messages(toy_bench):
    cfg = C.load_config(toy_bench["config"])
    assert checks.check_criterion(cfg, "raml", "toy") is None
    assert checks.check_criterion(cfg, "mle", "toy") is None
    msg = checks.check_criterion(cfg, "typo", "toy")
    assert "unknown flag(s): --raml-samplez (did you mean --raml-samples?)" in msg
    msg = checks.check_criterion(cfg, "unknown", "toy")
    assert "fairseq does not know --criterion no_such_criterion" in msg
    cfg["criterions"]["raml"]["flags"] += ["--raml-sampler", "gaussian"]
    assert "invalid choice" in checks.check_criterion(cfg, "raml", "toy")


def test_expand_placeholders():
    assert R.expand(["--x", "{data}/f"], {"data": "/d"}) == ["--x", "/d/f"]
    with pytest.raises(C.ConfigError, match="unknown placeholder"):
        R.expand(["{nope}"], {"data": "/d"})
    assert R.placeholders(["--token-embeddings", "{token_embeddings}"]) == {"token_embeddings"}


# ------------------------------------------------------------ pure functions

def _rows(task, crit, values, metric="bleu"):
    return [{"task": task, "criterion": crit, "seed": s, "metric": metric, "value": v, "updates": 10,
             "wall_s": 100.0 + s} for s, v in values.items()]


def test_summarize():
    assert stats.summarize([]) == {"n": 0, "mean": None, "std": None}
    assert stats.summarize([2.0]) == {"n": 1, "mean": 2.0, "std": None}
    s = stats.summarize([1.0, 2.0, 3.0, 6.0])
    assert s["mean"] == 3.0 and math.isclose(s["std"], math.sqrt(14 / 3))


def test_aggregate_delta_and_paired_std():
    rows = (_rows("t", "mle", {1: 20.0, 2: 22.0, 3: 21.0})
            + _rows("t", "raml", {1: 21.0, 2: 22.5, 3: 22.5})
            + _rows("t", "x", {1: 30.0})
            + _rows("t", C.PRETRAIN, {1: 19.0}))
    agg = stats.aggregate(rows)["t"]
    assert agg["mle"]["mean"] == 21.0 and agg["mle"]["std"] == 1.0 and agg["mle"]["delta"] == 0.0
    raml = agg["raml"]
    assert math.isclose(raml["mean"], 22.0) and math.isclose(raml["delta"], 1.0)
    assert math.isclose(raml["delta_std"], stats.summarize([1.0, 0.5, 1.5])["std"])  # paired by seed
    assert raml["n"] == 3 and raml["seeds"] == [1, 2, 3] and raml["wall_s"] == 102.0
    # Δ is over pairs: x has only seed 1, paired with mle's seed 1 (not with mle's mean)
    assert math.isclose(agg["x"]["delta"], 10.0) and agg["x"]["delta_std"] is None
    assert agg[C.PRETRAIN]["delta"] is None


def test_budget_variant_runs_longer_and_pairs_with_its_own_control(toy_bench, tmp_path):
    cfg = C.load_config(toy_bench["config"])
    crits = cfg["criterions"]
    crits["mle_x4"] = {**crits["mle"], "finetune_updates": 40}
    crits["raml_x4"] = {**crits["raml"], "finetune_updates": 40, "control": "mle_x4"}
    assert C.validate_config(cfg) == []
    cmd = R.finetune_command(cfg, "toy", "raml_x4", 1, tmp_path / "r", tmp_path / "p.pt", tmp_path)
    assert cmd[cmd.index("--max-update") + 1] == "40"
    plain = R.finetune_command(cfg, "toy", "raml", 1, tmp_path / "r", tmp_path / "p.pt", tmp_path)
    assert plain[plain.index("--max-update") + 1] == str(cfg["tasks"]["toy"]["finetune_updates"])
    assert P.finetune_updates({**cfg, "mode": "quick"}, "toy", "raml_x4") == cfg["tasks"]["toy"]["finetune_updates"]
    # selecting the variant selects its control (and the control of every criterion)
    assert quality.select(cfg, criterions=["raml_x4"])[1] == ["mle", "mle_x4", "raml_x4"]
    rows = (_rows("toy", "mle", {1: 20.0, 2: 22.0}) + _rows("toy", "mle_x4", {1: 21.0, 2: 23.0})
            + _rows("toy", "raml_x4", {1: 21.5, 2: 23.0}))
    agg = stats.aggregate(rows, controls={c: P.control_of(cfg, c) for c in crits})["toy"]
    assert math.isclose(agg["raml_x4"]["delta"], 0.25) and agg["raml_x4"]["control"] == "mle_x4"
    assert math.isclose(agg["mle_x4"]["delta"], 1.0) and agg["mle_x4"]["control"] == "mle"
    md = report.markdown_report(cfg, {"toy": agg})
    assert "| raml_x4 | 22.25 ± 1.06 | +0.25 ± 0.35 (vs mle_x4) |" in md
    # a control of another budget, or none, is a config error
    crits["raml_x4"]["finetune_updates"] = 30
    assert any("control: 'mle_x4' has another budget (finetune_updates 40 vs 30)" in e for e in C.validate_config(cfg))
    crits["raml_x4"]["control"] = "mle_x8"
    assert "criterions.raml_x4.control: unknown criterion 'mle_x8'" in C.validate_config(cfg)


def test_markdown_report_and_cost_gain(toy_bench):
    cfg = C.load_config(toy_bench["config"])
    rows = (_rows("toy", "mle", {1: 20.0, 2: 22.0}) + _rows("toy", "raml", {1: 21.0, 2: 22.5})
            + _rows("toy", C.PRETRAIN, {1: 19.0}))
    speed_json = {"raml": {"step_time_vs_mle": 2.5, "by_setting": {"toy": {"step_time_vs_mle": 2.5}}}}
    md = report.markdown_report(cfg, stats.aggregate(rows), speed_json, skipped=["x -- skipped"])
    assert "| mle | 21.00 ± 1.41 | (control) | – | – | 2 (1 × 2) | 10 | 102 | – |" in md
    # one pre-trained model: its two seeds are not independent units, so no interval
    assert "| raml | 21.75 ± 1.06 | +0.75 ± 0.35 | – | – | 2 (1 × 2) | 10 | 102 | 2.50× |" in md
    two = lambda crit, values: [{**r, "pretrain": p} for p in (1, 2)  # noqa: E731
                                for r in _rows("toy", crit, {s: v + p for s, v in values.items()})]
    # per model Δ: model 1 (+1.0, +0.9, +1.0), model 2 the same -> a zero-width interval
    ahead = two("mle", {1: 20.0, 2: 22.0, 3: 21.0}) + two("raml", {1: 21.0, 2: 22.9, 3: 22.0})
    boot = {"toy": {"raml": {"ahead": 4, "tie": 2, "behind": 0}}}
    md2 = report.markdown_report(cfg, stats.aggregate(ahead), bootstrap=boot)
    assert "| **[+0.97, +0.97] ahead** | 4/2/0 | 6 (2 × 3) |" in md2
    assert "pre-trained MLE (start point)* | 19.00" in md and "- x -- skipped" in md
    points = plots.cost_gain_points(cfg, stats.aggregate(rows), speed_json)
    assert ("toy", "raml", 2.5, 0.75) == points[-1][:4] and points[0][1:3] == ("mle", 1.0)
    cfg["tasks"]["toy"]["higher_is_better"] = False  # an error metric: gain = -delta
    assert plots.cost_gain_points(cfg, stats.aggregate(rows), speed_json)[-1][3] == -0.75


def test_pretrained_models_pair_and_interval():
    """Runs pair by (pre-trained model, seed); the 95% t interval counts pre-trained models
    (the independent units), not runs, and decides 'ahead'."""
    rows = [{"task": "t", "criterion": c, "pretrain": p, "seed": s, "metric": "bleu", "value": v}
            for c, p, s, v in [("mle", 1, 1, 30.0), ("mle", 1, 2, 30.4), ("mle", 2, 1, 31.0), ("mle", 2, 2, 31.2),
                               ("a", 1, 1, 30.5), ("a", 1, 2, 30.9), ("a", 2, 1, 31.6), ("a", 2, 2, 31.4),
                               ("b", 1, 1, 30.1), ("b", 2, 1, 30.9), ("c", 1, 1, 30.3), ("c", 1, 2, 30.7),
                               ("c", 2, 1, 31.2),
                               (C.PRETRAIN, 1, 1, 29.0), (C.PRETRAIN, 2, 2, 29.5)]]
    agg = stats.aggregate(rows)["t"]
    a, b = agg["a"], agg["b"]
    diffs = [0.5, 0.5, 0.6, 0.2]
    assert a["delta_n"] == 4 and a["pretrains"] == [1, 2] and a["seeds"] == [1, 2]
    assert a["delta_models"] == pytest.approx({1: 0.5, 2: 0.4}) and math.isclose(a["delta"], 0.45)
    # over models: t(1) = 12.706 · std(0.5, 0.4) / √2 -> a tie
    assert math.isclose(a["delta_ci95"], 12.706 * stats.summarize([0.5, 0.4])["std"] / math.sqrt(2))
    assert stats.verdict(a, higher_is_better=True) == "tie"
    # the old interval took the four runs as independent: t(3) · sd / 2 -> "ahead"
    assert math.isclose(a["delta_ci95_runs"], 3.182 * stats.summarize(diffs)["std"] / 2)
    assert stats.verdict(a, True, key="delta_ci95_runs") == "ahead"
    assert stats.verdict(a, False, key="delta_ci95_runs") == "behind"
    # b pairs with (1, 1) and (2, 1) only: +0.1, -0.1 -> an interval around 0
    assert b["delta_n"] == 2 and math.isclose(b["delta"], 0.0, abs_tol=1e-9)
    assert stats.verdict(b, True) == "tie"
    # unbalanced: model 1 has two seeds (+0.3, +0.3), model 2 one (+0.2): Δ = mean of the models' means
    assert math.isclose(agg["c"]["delta"], 0.25) and agg["c"]["delta_models"] == pytest.approx({1: 0.3, 2: 0.2})
    assert agg[C.PRETRAIN]["models"] == {1: 29.0, 2: 29.5} and agg[C.PRETRAIN]["n"] == 2
    rows_1 = [r for r in rows if r["criterion"] == "a" and r["pretrain"] == 1] + \
        [r for r in rows if r["criterion"] == "mle"]
    assert stats.verdict(stats.aggregate(rows_1)["t"]["a"], True) is None  # one model: no interval
    # rows of two models with the same seed are different rows
    merged = report.merge_rows(rows, [{**rows[0], "value": 1.0}])
    assert len(merged) == len(rows) and sum(r["value"] == 1.0 for r in merged) == 1
    assert P.run_dir("/w", "t", "a", 3) == Path("/w/t/a/seed3")
    assert P.run_dir("/w", "t", "a", 3, pretrain=2) == Path("/w/t/a/pretrain2_seed3")
    assert P.pretrain_dir("/w", "t") == Path("/w/t/pretrain") and P.pretrain_dir("/w", "t", 2).name == "pretrain2"


def test_merge_rows():
    old = _rows("t", "mle", {1: 1.0, 2: 2.0}) + _rows("u", "mle", {1: 5.0})
    new = _rows("t", "mle", {2: 9.0})
    merged = report.merge_rows(old, new)
    assert sorted((r["task"], r["seed"], r["value"]) for r in merged) == [("t", 1, 1.0), ("t", 2, 9.0), ("u", 1, 5.0)]
    assert report.merge_rows(old, new, replace_all=True) == new
    # a piece's pre-trained model must be the model quality.json pairs under its id
    start = {"task": "t", "criterion": C.PRETRAIN, "seed": 2, "pretrain": 2, "value": 32.75,
             "details": {"omp_threads": "1"}}
    report.check_same_model(old + [start], {**start, "value": 32.75})  # the same model: fine
    report.check_same_model(old + [start], {**start, "pretrain": 3, "value": 32.98})  # a new id: fine
    with pytest.raises(C.ConfigError, match="pre-trained model 2 scores 32.9800 here but 32.7500"):
        report.check_same_model(old + [start], {**start, "value": 32.98, "details": {"omp_threads": "2"}})


def test_curves():
    entries = [{"subset": "valid", "num_updates": 2, "reward": -0.5},
               {"subset": "valid", "num_updates": 1, "reward": -0.25},
               {"subset": "valid", "num_updates": 2, "reward": -0.4},  # repeated update: last wins
               {"subset": "valid", "num_updates": 3}]                  # key missing: skipped
    assert logs.curve(entries, "reward", scale=-100) == [(1, 25.0), (2, 40.0)]
    mean = stats.mean_curve([[(1, 1.0), (2, 3.0)], [(1, 3.0)]])
    assert mean[0][:2] == (1, 2.0) and math.isclose(mean[0][2], math.sqrt(2)) and mean[0][3] == 2
    assert mean[1] == (2, 3.0, None, 1)


def test_estimate_plan(toy_bench):
    cfg = C.load_config(toy_bench["config"])
    # pre-train: startup 5 + 2 updates x 0.1 + 1 validation x 1 + eval 4
    assert math.isclose(P.estimate_pretrain_s(cfg, "toy"), 5 + 0.2 + 1 + 4)
    # fine-tune: startup 5 + 2 updates x 0.1 x cost + 2 validations x 1 + eval 4
    est = P.estimate_plan(cfg, [("toy", "mle", 1), ("toy", "raml", 1), ("toy", "raml", 2)], [])
    assert math.isclose(est["finetune"][("toy", "mle")], 5 + 0.2 + 2 + 4)
    assert math.isclose(est["finetune"][("toy", "raml")], 2 * (5 + 0.4 + 2 + 4))
    speed_json = {"raml": {"by_setting": {"toy": {"step_time_vs_mle": 3.0}}}}  # measured ratio wins
    est = P.estimate_plan(cfg, [("toy", "raml", 1)], [], speed_json)
    assert math.isclose(est["total"], 5 + 0.6 + 2 + 4)
    # a pre-phase adds its own run: startup 5 + 3 updates x 0.1 x 2.0 + 3 validations x 1
    est = P.estimate_plan(cfg, [("toy", "erac", 1)], [])
    assert math.isclose(est["total"], (5 + 2 * 0.1 * 3.0 + 2 + 4) + (5 + 3 * 0.1 * 2.0 + 3))
    speed_json = {"erac_critic": {"by_setting": {"toy": {"step_time_vs_mle": 1.0}}}}
    est = P.estimate_plan(cfg, [("toy", "erac", 1)], [], speed_json)
    assert math.isclose(est["total"], (5 + 2 * 0.1 * 3.0 + 2 + 4) + (5 + 3 * 0.1 * 1.0 + 3))
    quick = C.load_config(toy_bench["config"], quick=True)  # --quick: the task's fine-tuning updates
    assert P.pre_phase_updates(quick, "toy", quick["criterions"]["erac"]["pre_phase"]) == 2


def test_speed_summaries(toy_bench):
    times = {"mle": [1.0, 2.0, 1.5], "raml": [2.0, 3.0, 4.5]}
    out = speed.summarize_times(times)
    assert out["mle"]["step_time_vs_mle"] == 1.0
    assert math.isclose(out["raml"]["step_time_vs_mle"], 3.0 / 1.5)
    assert math.isclose(out["raml"]["median_paired_ratio"], 2.0)  # median of 2.0, 1.5, 3.0
    cfg = C.load_config(toy_bench["config"])
    cfg["criterions"]["raml"]["speed_targets"] = [{"setting": "toy", "max_ratio": 1.5}]
    targets = speed.check_targets(cfg, {"toy": out})
    assert targets == [{"criterion": "raml", "setting": "toy", "vs": "mle", "ratio": 2.0,
                        "max_ratio": 1.5, "ok": False}]


def test_plugin_commit_is_the_last_change_to_the_plugin(tmp_path, monkeypatch):
    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), *args], capture_output=True, text=True,
                              check=True).stdout.strip()
    monkeypatch.setattr(R, "REPO", tmp_path)
    monkeypatch.setattr(R, "USER_DIR", tmp_path / "fairseq_seqlevel")
    assert R.plugin_commit() == "unknown"  # not a git checkout
    git("init", "-q")
    (tmp_path / "fairseq_seqlevel").mkdir()
    (tmp_path / "fairseq_seqlevel" / "risk.py").write_text("x = 1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "criterion")
    code = git("rev-parse", "--short", "HEAD")
    (tmp_path / "results.json").write_text("{}\n")  # a later results-only commit does not count
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "results")
    assert code != git("rev-parse", "--short", "HEAD") and R.plugin_commit() == code
    (tmp_path / "fairseq_seqlevel" / "risk.py").write_text("x = 2\n")
    assert R.plugin_commit() == code + "+dirty"


# ------------------------------------------------------------ end to end

def test_quality_end_to_end(toy_run):
    assert toy_run["code"] == 0
    results = toy_run["results"]
    rows = json.loads((results / "quality.json").read_text())
    assert {(r["criterion"], r["seed"]) for r in rows} == {("mle", 1), ("raml", 1), ("erac", 1), (C.PRETRAIN, 1)}
    for row in rows:
        assert set(row) >= {"task", "criterion", "seed", "metric", "value", "updates", "wall_s"}
        assert row["task"] == "toy" and row["metric"] == "bleu" and 0.0 <= row["value"] <= 100.0
        assert row["updates"] == 2 and row["wall_s"] > 0
        # the thread count is part of what makes a run reproducible (float summation order)
        assert row["details"]["omp_threads"] == (os.environ.get("OMP_NUM_THREADS") or "unset")
        if row["criterion"] != C.PRETRAIN:  # which version of the criterion code trained it
            assert row["details"]["plugin_commit"] == R.plugin_commit() != "unknown"
    md = (results / "quality.md").read_text()
    assert "| mle |" in md and "| raml |" in md
    assert "--raml-samplez (did you mean --raml-samples?)" in md and "no_such_criterion" in md
    assert (results / "quality_curves_toy.png").stat().st_size > 0
    assert (results / "cost_vs_gain.png").stat().st_size > 0
    curves = json.loads((results / "quality_curves.json").read_text())
    assert [p[0] for p in curves["toy"]["raml"]["1"]] == [1, 2]
    work = toy_run["work"]
    assert (work / "toy" / "pretrain" / "command.txt").read_text().startswith(sys.executable)
    assert not list((work / "toy" / "raml" / "seed1").glob("*.pt"))  # scored, then deleted


def test_quality_pre_phase_runs_first_and_counts_in_the_cost(toy_run):
    """erac's critic phase: its own run of pre_phase.updates from the MLE model, then the
    joint run from the critic phase's checkpoint (joint refuses to start without a trained
    critic, so a joint run that finished had the critic state); both walls in wall_s."""
    rows = json.loads((toy_run["results"] / "quality.json").read_text())
    row = next(r for r in rows if r["criterion"] == "erac")
    pre = row["details"]["pre_phase"]
    assert pre["name"] == "critic" and pre["updates"] == 3
    assert 0 < pre["wall_s"] < row["wall_s"]
    seed_dir = toy_run["work"] / "toy" / "erac" / "seed1"
    critic_cmd, joint_cmd = (seed_dir / "command.txt").read_text().strip().splitlines()
    assert "--erac-phase critic" in critic_cmd and "--max-update 3" in critic_cmd
    assert "pretrain/checkpoint_last.pt" in critic_cmd
    assert "--erac-phase joint" in joint_cmd and "--max-update 2" in joint_cmd
    assert f"--finetune-from-model {seed_dir / 'critic' / 'checkpoint_last.pt'}" in joint_cmd
    assert "erac_td" in (seed_dir / "critic" / "train.log").read_text()
    assert not list(seed_dir.glob("**/*.pt"))  # both phases' checkpoints deleted after scoring


def test_log_parsing_on_a_real_fairseq_log(toy_run):
    text = (toy_run["work"] / "toy" / "raml" / "seed1" / "train.log").read_text()
    parsed = logs.parse_log(text)
    valid = parsed["valid"]
    assert [v["num_updates"] for v in valid] == [1, 2]
    for v in valid:
        assert v["subset"] == "valid" and v["epoch"] >= 1
        assert isinstance(v["loss"], float) and 0.0 <= v["reward"] <= 1.0 and "greedy_bleu" in v
    assert logs.curve(valid, "greedy_bleu") == [(1, float(valid[0]["greedy_bleu"])),
                                             (2, float(valid[1]["greedy_bleu"]))]


def test_quality_rerun_is_cached(toy_run, capsys):
    assert quality.main(toy_run["argv"] + ["--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "reusing pre-trained MLE model" in out
    assert "mle seed 1: cached" in out and "raml seed 1: cached" in out and "erac seed 1: cached" in out
    assert "fine-tuning 2 updates" not in out


def test_quality_force_reruns_the_named_criterions_not_their_control(toy_run, capsys):
    assert quality.main(toy_run["argv"] + ["--no-plots", "--criterions", "raml", "--force"]) == 0
    out = capsys.readouterr().out
    assert "mle seed 1: cached" in out and "raml seed 1: fine-tuning" in out


def test_quality_second_pretrained_model(toy_run, capsys):
    """--pretrain-seeds 1,2: model 1 is the cached one, model 2 is trained with seed 2
    into pretrain2, and its runs pair with its own continued-MLE runs."""
    argv = toy_run["argv"] + ["--no-plots", "--criterions", "raml", "--pretrain-seeds", "1,2"]
    assert quality.main(argv) == 0
    out = capsys.readouterr().out
    assert "pre-trained models (pre-training seeds): [1, 2]" in out
    assert "raml seed 1: cached" in out and "raml pretrain 2 seed 1: fine-tuning" in out
    work = toy_run["work"] / "toy"
    assert "--seed 2 " in (work / "pretrain2" / "command.txt").read_text()
    assert (work / "raml" / "pretrain2_seed1" / "result.json").exists()
    rows = json.loads((toy_run["results"] / "quality.json").read_text())
    assert {(r["criterion"], r.get("pretrain", 1)) for r in rows} >= {
        ("mle", 1), ("mle", 2), ("raml", 1), ("raml", 2), (C.PRETRAIN, 1), (C.PRETRAIN, 2)}
    md = (toy_run["results"] / "quality.md").read_text()
    assert "| raml |" in md and "(2 × 1)" in md and "2 models" in md


def test_quality_dry_run_prints_estimate(toy_bench, capsys):
    code = quality.main(["--config", str(toy_bench["config"]), "--workdir", str(toy_bench["root"] / "dry"),
                         "--dry-run", "--criterions", "raml"])
    out = capsys.readouterr().out
    assert code == 0 and "estimated wall time" in out and "total" in out
    assert "criterions: mle, raml" in out  # the control is always added
    assert not (toy_bench["root"] / "dry").exists()


def test_speed_end_to_end(toy_bench, tmp_path):
    out = tmp_path / "speed.json"
    code = speed.main(["--config", str(toy_bench["config"]), "--workdir", str(toy_bench["root"] / "work"),
                       "--rounds", "1", "--no-reward", "--json", str(out), "--criterions", "mle,raml,erac,unknown"])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["mle"]["step_time_vs_mle"] == 1.0 and data["raml"]["step_time_vs_mle"] > 0
    # erac is timed in its joint phase (built from the state a critic-phase step leaves;
    # without it, joint refuses to start) and its critic phase as erac_critic
    assert data["erac"]["step_time_vs_mle"] > 0 and data["erac_critic"]["step_time_vs_mle"] > 0
    assert list(data).index("erac_critic") == list(data).index("erac") - 1
    for crit in ("mle", "raml", "erac", "erac_critic"):
        assert data[crit]["setting"] == "toy" and data[crit]["peak_mem_mb"] >= 0
    assert "no_such_criterion" in data["unknown"]["skipped"]
    assert data["_meta"]["settings"]["toy"]["batches"] == 1


def test_speed_times_the_pretrained_model_when_it_exists(toy_run, toy_bench, tmp_path):
    config = tmp_path / "toy_ckpt.toml"
    text = toy_bench["config"].read_text()
    config.write_text(text.replace('[speed.settings.toy]\ntask = "toy"\n',
                                   '[speed.settings.toy]\ntask = "toy"\n'
                                   'checkpoint = "{workdir}/toy/pretrain/checkpoint_last.pt"\n'))
    out = tmp_path / "speed.json"
    argv = ["--config", str(config), "--rounds", "1", "--no-reward", "--no-sampler", "--no-memory",
            "--json", str(out), "--criterions", "mle"]
    assert speed.main(argv + ["--workdir", str(toy_run["work"])]) == 0
    trained = json.loads(out.read_text())["_meta"]["settings"]["toy"]["trained_from"]
    assert trained == str(toy_run["work"] / "toy" / "pretrain" / "checkpoint_last.pt")
    assert speed.main(argv + ["--workdir", str(tmp_path / "nowhere")]) == 0  # no checkpoint: untrained
    assert json.loads(out.read_text())["_meta"]["settings"]["toy"]["trained_from"] is None


def test_speed_sampler_only_merges_into_the_output(toy_bench, tmp_path):
    """--sampler-only: decoding.sampler vs SequenceGenerator(--sampling) on the
    toy setting, added to an existing speed.json without touching the rest."""
    config = tmp_path / "toy_sampler.toml"
    config.write_text(toy_bench["config"].read_text()
                      + '\n[speed.sampler]\nsetting = "toy"\nsamples = 2\nmax_len_b = 3\nmax_ratio = 100.0\n')
    out = tmp_path / "speed.json"
    out.write_text(json.dumps({"mle": {"step_time_vs_mle": 1.0}}))
    code = speed.main(["--config", str(config), "--workdir", str(toy_bench["root"] / "work"),
                       "--rounds", "1", "--json", str(out), "--sampler-only"])
    assert code == 0
    data = json.loads(out.read_text())
    res = data["_sampler"]
    assert data["mle"] == {"step_time_vs_mle": 1.0}
    assert res["samples_per_source"] == 2 and res["ok"] is True and res["ratio"] > 0
    # both drew 2 samples of at most 3 tokens + eos per source
    assert 0 < res["ours_tokens_per_round"] <= 4 * 2 * res["sources"]
    assert 0 < res["fairseq_tokens_per_round"] <= 4 * 2 * res["sources"]
    bad = tmp_path / "bad.toml"
    bad.write_text(config.read_text().replace('setting = "toy"\nsamples', 'setting = "nope"\nsampels'))
    with pytest.raises(C.ConfigError, match=r"speed.sampler.setting: unknown speed setting 'nope'"):
        C.load_config(bad)
    with pytest.raises(C.ConfigError, match=r"unknown key 'sampels'"):
        C.load_config(bad)


def test_like_variants_run_their_base_s_commands_with_their_own_budget():
    cfg = C.load_config(C.DEFAULT_CONFIG, experiments="all")
    raw = C.raw_config(C.DEFAULT_CONFIG, experiments="all")[0]
    variants = {n: c["like"] for n, c in cfg["criterions"].items() if "like" in c}
    assert {"mle_e4": "mle", "vaml_e4": "vaml", "tok_seq_e4": "tok_seq"}.items() <= variants.items()
    for name, base in variants.items():
        own = raw["criterions"][name]  # what the variant sets itself
        for phase in ([None, "pre"] if "pre_phase" in cfg["criterions"][base] else [None]):
            mine, theirs = (R.finetune_command(cfg, "bible_es_en", c, 1, "/r", "/p.pt", "/w", phase=phase)
                            for c in (name, base))
            if phase == "pre" and "pre_phase_updates" in own:  # its own pre-phase length: only that differs
                i, j = mine.index("--max-update") + 1, theirs.index("--max-update") + 1
                assert mine[i] == str(own["pre_phase_updates"]) != theirs[j]
                mine, theirs = mine[:i] + mine[i + 1:], theirs[:j] + theirs[j + 1:]
            if phase is None and "finetune_updates" in own:  # each at its own index: own flags may precede it
                i, j = mine.index("--max-update") + 1, theirs.index("--max-update") + 1
                assert mine[i] == str(own["finetune_updates"]) != theirs[j]
                mine, theirs = mine[:i] + mine[i + 1:], theirs[:j] + theirs[j + 1:]
            if phase is None and "finetune_flags" in own:  # its own flags, once, added to the base's
                extra = list(own["finetune_flags"])
                at = [i for i in range(len(mine)) if mine[i:i + len(extra)] == extra]
                assert len(at) == 1, (name, extra)
                mine = mine[:at[0]] + mine[at[0] + len(extra):]
            assert mine == theirs, (name, phase)
    raw["criterions"]["vaml_e4"]["like"] = "vaml_e4"
    assert "criterions.vaml_e4.like: 'vaml_e4' is not a criterion without its own 'like'" in C.validate_config(raw)
    raw["criterions"]["mle_e4"]["pre_phase_updates"] = 5
    assert "criterions.mle_e4.pre_phase_updates: no pre_phase (its own or its 'like' base's) to set" in \
        C.validate_config(raw)


def test_criterion_finetune_flags_win_over_the_task_s():
    cfg = C.load_config(C.DEFAULT_CONFIG)
    cmd = R.finetune_command(cfg, "bible_es_en", "scst", 1, "/tmp/x", "/tmp/p.pt", C.DEFAULT_WORKDIR)
    lrs = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--lr"]
    assert lrs[-1] == "5e-5" and "0.001" in lrs  # fairseq's parser keeps the last value
    mle = R.finetune_command(cfg, "bible_es_en", "mle", 1, "/tmp/x", "/tmp/p.pt", C.DEFAULT_WORKDIR)
    assert [mle[i + 1] for i, a in enumerate(mle) if a == "--lr"][-1] == "0.001"


def test_pretrain_ids_and_curve_keys():
    assert quality.pretrain_ids([1, 2]) == {1: 1, 2: 2}
    assert quality.pretrain_ids([2], "3") == {2: 3}
    for bad in ("3,4", "x", "1,1", "0"):
        with pytest.raises(C.ConfigError, match="--pretrain-ids"):
            quality.pretrain_ids([1, 2] if bad == "1,1" else [2], bad)
    row = {"task": "t", "criterion": "raml", "seed": 1, "pretrain": 2, "value": 1.0, "details": {"x": 1}}
    moved = quality.relabel(row, 3)
    assert moved["pretrain"] == 3 and moved["details"] == {"x": 1, "pretrain_seed": 2} and row["pretrain"] == 2
    assert quality.relabel(row, 2) is row
    for seed, pre in [(1, 1), (2, 1), (1, 3), (12, 10)]:
        assert P.parse_curve_key(P.curve_key(seed, pre)) == (seed, pre)
    assert P.curve_key(2) == "2" and P.curve_key(1, 3) == "pretrain3_seed1"


def test_quality_piece_under_another_id_then_merged(toy_run, toy_bench, tmp_path, capsys):
    """A piece on pre-training seed 2 recorded as model 3 in its own --results, then
    --merge'd into a copy of the main results: its rows and curves arrive under id 3,
    the report counts the new model, and a piece whose model 1 differs is refused
    before anything is written."""
    piece = tmp_path / "piece"
    argv = ["--config", str(toy_bench["config"]), "--workdir", str(toy_run["work"]), "--no-plots",
            "--criterions", "raml", "--pretrain-seeds", "2", "--pretrain-ids", "3", "--results", str(piece)]
    assert quality.main(argv) == 0
    assert "pre-training seeds): [2] recorded as [3]" in capsys.readouterr().out
    rows = json.loads((piece / "quality.json").read_text())
    assert {(r["criterion"], r["pretrain"], r["details"]["pretrain_seed"]) for r in rows} == {
        (C.PRETRAIN, 3, 2), ("mle", 3, 2), ("raml", 3, 2)}

    main = tmp_path / "main"
    shutil.copytree(toy_run["results"], main)
    before = json.loads((main / "quality.json").read_text())
    start_before = json.loads((main / "quality_curves.json").read_text())["toy"]["_start"]
    assert all(r.get("pretrain", 1) != 3 for r in before)
    merge = ["--config", str(toy_bench["config"]), "--results", str(main), "--no-plots", "--merge", str(piece)]
    assert quality.main(merge) == 0
    after = json.loads((main / "quality.json").read_text())
    assert len(after) == len(before) + 3 and all(r in after for r in before)
    curves = json.loads((main / "quality_curves.json").read_text())["toy"]
    assert "pretrain3_seed1" in curves["raml"] and "pretrain3_seed1" in curves["mle"]
    assert curves["_start"] == start_before  # the curves' start stays the first model's
    # results with curves but no start point take the piece's
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "quality_curves.json").write_text(json.dumps({"toy": {"raml": {"1": [[1, 1.0]]}}}))
    assert quality.main(["--config", str(toy_bench["config"]), "--results", str(fresh), "--no-plots",
                         "--merge", str(piece)]) == 0
    piece_start = json.loads((piece / "quality_curves.json").read_text())["toy"]["_start"]
    assert json.loads((fresh / "quality_curves.json").read_text())["toy"]["_start"] == piece_start
    md = (main / "quality.md").read_text()
    assert "(--merge of 1 piece(s) into the full results," in md.splitlines()[0]
    models = {r.get("pretrain", 1) for r in after if r["criterion"] == "raml"}
    assert 3 in models and f"({len(models)} × 1)" in md

    # a piece whose model 1 is another model than the one main pairs under id 1
    bad = tmp_path / "bad"
    bad.mkdir()
    start = next(r for r in after if r["criterion"] == C.PRETRAIN and r.get("pretrain", 1) == 1)
    (bad / "quality.json").write_text(json.dumps([{**start, "value": start["value"] + 1.0},
                                                   {**start, "criterion": "raml", "seed": 9}]))
    snapshot = (main / "quality.json").read_text()
    assert quality.main(merge[:-1] + [f"{piece},{bad}"]) == 2
    assert "pre-trained model 1 scores" in capsys.readouterr().err
    assert (main / "quality.json").read_text() == snapshot
    assert quality.main(merge[:-1] + [str(tmp_path / "nowhere")]) == 2
    assert "nowhere/quality.json is missing" in capsys.readouterr().err


def test_two_lanes_on_missing_data_prepare_it_once(tmp_path):
    """Two quality.py processes started together on a task whose data is missing:
    the second waits for the first's preparation (a prepare command that fails when
    its destination exists, as examples/prepare_text.py does) and both get the data."""
    import concurrent.futures
    import multiprocessing

    data, count = tmp_path / "data", tmp_path / "runs.txt"
    script = ("import os, sys, time; d = sys.argv[1]; os.mkdir(d); time.sleep(1.0); "
              "open(os.path.join(d, 'dict.txt'), 'w').close(); open(sys.argv[2], 'a').write('x')")
    cfg = {"tasks": {"t": {"data": str(data), "check_file": "dict.txt",
                           "prepare": ["{python}", "-c", script, "{data}", str(count)]}}}
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx) as pool:
        got = list(pool.map(R.ensure_data, [cfg, cfg], ["t", "t"], [str(tmp_path / "a"), str(tmp_path / "b")]))
    assert got == [data, data] and count.read_text() == "x"


def test_speed_update_replaces_only_the_timed_criterions():
    old = {"mle": {"step_time_vs_mle": 1.0}, "raml": {"step_time_vs_mle": 2.2}, "risk": {"step_time_vs_mle": 14.5},
           "_targets": [{"criterion": "risk", "ratio": 14.5, "ok": False}, {"criterion": "raml", "ratio": 2.2, "ok": True}],
           "_meta": {"date": "old", "rounds": 7}}
    new = {"mle": {"step_time_vs_mle": 1.0, "by_setting": {"bible": {"median_s": 1.3}}},
           "risk": {"step_time_vs_mle": 6.3}, "_targets": [{"criterion": "risk", "ratio": 6.3, "ok": True}],
           "_meta": {"date": "new", "threads": 2, "settings": {"bible": {}}}}
    out = speed.updated(old, new, "--settings bible --criterions risk --update")
    assert out["risk"]["step_time_vs_mle"] == 6.3 and out["raml"] == old["raml"] and out["mle"] == old["mle"]
    assert sorted(t["criterion"] for t in out["_targets"]) == ["raml", "risk"]
    assert next(t for t in out["_targets"] if t["criterion"] == "risk")["ok"] is True
    run = out["_meta"]["remeasured_runs"][-1]
    assert out["_meta"]["date"] == "old" and run["criterions"] == ["risk"] and run["mle_median_s"] == {"bible": 1.3}


def test_markdown_report_chrf_column(toy_bench):
    """BLEU tasks whose rows kept corpus chrF get a chrF column: mean, Δ vs the control and
    its interval over models, from the details key of every reference together."""
    cfg = C.load_config(toy_bench["config"])
    task = cfg["tasks"]["toy"]
    task["metric"], task["refs"] = "bleu", ["en", "kjv"]
    rows = [{"task": "toy", "criterion": c, "pretrain": p, "seed": s, "metric": "bleu", "value": 30.0,
             "updates": 10, "wall_s": 1.0, "details": {"chrf_en+kjv": v, "chrf_en": 0.0}}
            for c, p, s, v in [("mle", 1, 1, 50.0), ("mle", 1, 2, 50.2), ("mle", 2, 1, 51.0), ("mle", 2, 2, 51.0),
                               ("raml", 1, 1, 51.0), ("raml", 1, 2, 51.2), ("raml", 2, 1, 52.0), ("raml", 2, 2, 52.0)]]
    other = next(c for c in cfg["criterions"] if c not in ("mle", "raml"))
    rows.append({**rows[0], "criterion": other, "details": {}})  # kept no chrF
    chrf_rows = report.chrf_rows(cfg, rows)
    assert len(chrf_rows) == 8 and {r["metric"] for r in chrf_rows} == {"chrf"}
    md = report.markdown_report(cfg, stats.aggregate(rows), chrf=stats.aggregate(chrf_rows))
    assert "chrF: mean, Δ [95% CI] |" in md
    assert "| 50.55 |" in md.split("| mle |")[1].split("\n")[0]  # the control: its mean only
    assert md.split("| raml |")[1].split("\n")[0].endswith(" 51.55, +1.00 [+1.00, +1.00] ahead |")
    assert md.split(f"| {other} |")[1].split("\n")[0].endswith(" – |")
    task["metric"] = "edit"  # no chrF for other metrics
    assert report.chrf_rows(cfg, rows) == []
