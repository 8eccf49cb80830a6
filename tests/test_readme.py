"""README.md's generated part (criterion table), docs/commands.md's (one command per criterion) and
docs/benchmarks.md's (the papers' orderings) equal what benchmarks/readme.py generates from the
checked-in results and config, the orderings table computes Δ, its interval and the verdict as
by hand, and every generated command is one fairseq-train parses with the criterion's flags, as
bash expands it."""

import re
import subprocess

import pytest

from benchmarks import readme
from conftest import REPO, USER_DIR


def test_generated_parts_are_current():
    generated = readme.parts()
    assert set(generated) == {readme.README, readme.COMMANDS_DOC, readme.DOC}
    for path, parts in generated.items():
        text = path.read_text()
        assert readme.rewrite(text, parts) == text, f"{path.name}: run python -m benchmarks.readme"


def test_docs_orderings_part_is_current():
    text = readme.DOC.read_text()
    table = readme.parts()[readme.DOC][readme.ORDERINGS_PART]
    assert f"<!-- generated:orderings -->\n{table}\n<!-- /generated:orderings -->" in text
    assert "| claim (paper) |" in table and "elbayad2018" in table


def test_orderings_table_by_hand(monkeypatch):
    """Two tasks (BLEU ↑, edit error ↓), two pre-trained models × two seeds. Δ is averaged over
    each model's seeds, then over the models; with two models the 95% t interval is
    Δ ± 12.706 · std(model means) / √2."""
    monkeypatch.setattr(readme, "ORDERINGS", [
        ("A > B (p1)", [("a", "b"), ("c", "b")]),
        ("B > A (p2)", [("b", "a")]),
        ("A > D (p3)", [("a", "d")]),  # no d runs: the claim is left out
    ])
    cfg = {"tasks": {"hi": {"higher_is_better": True}, "lo": {"higher_is_better": False}}}
    rows = []

    def add(task, crit, model, seed, value):
        metric = "bleu" if task == "hi" else "edit_error"
        rows.append(dict(task=task, criterion=crit, pretrain=model, seed=seed, metric=metric, value=value))

    for task, sign in (("hi", 1), ("lo", -1)):
        # a − b: model 1 (1.9, 2.1) → 2.0, model 2 (2.1, 2.3) → 2.2; Δ 2.1, std 0.1414 → ± 1.2706
        for (model, seed), diff in {(1, 1): 1.9, (1, 2): 2.1, (2, 1): 2.1, (2, 2): 2.3}.items():
            add(task, "b", model, seed, 30.0 + seed)
            add(task, "a", model, seed, 30.0 + seed + sign * diff)
        add(task, "mle_pretrain", 1, 1, 25.0)  # the pre-trained models' rows are no pair's
    # hi, c − b with three seeds on model 2: model 1 (−0.5, −1.5) → −1.0, model 2 (0, 1, 0.5) →
    # 0.5; Δ −0.25, std 1.0607 → ± 9.5295: the wrong sign, a tie
    add("hi", "b", 2, 3, 33.0)
    for (model, seed), diff in {(1, 1): -0.5, (1, 2): -1.5, (2, 1): 0.0, (2, 2): 1.0, (2, 3): 0.5}.items():
        add("hi", "c", model, seed, 30.0 + seed + diff)
    # lo, c − b on model 1 only: (−0.3, −0.5) → Δ −0.40, lower error: the claim's sign, no interval
    for seed, diff in ((1, -0.3), (2, -0.5)):
        add("lo", "c", 1, seed, 30.0 + seed + diff)

    lines = readme.orderings_table(cfg, rows).splitlines()
    assert lines[0] == ("| claim (paper) | task, metric | better − worse: Δ [95% CI over models] "
                        "| pairs (models × seeds) | holds? |")
    assert lines[2:] == [
        "| A > B (p1) | hi, BLEU ↑ | a − b: +2.10 [+0.83, +3.37] | 2 × 2 | ✓ (ahead) |",
        "|  | hi, BLEU ↑ | c − b: -0.25 [-9.78, +9.28] | 2 (2 + 3 seeds) | ✗ |",
        # lower is better: a's error is 2.1 below b's, so the claim holds
        "|  | lo, edit error ↓ | a − b: -2.10 [-3.37, -0.83] | 2 × 2 | ✓ (ahead) |",
        "|  | lo, edit error ↓ | c − b: -0.40 | 1 × 2 | ✓ (1 model) |",
        "| B > A (p2) | hi, BLEU ↑ | b − a: -2.10 [-3.37, -0.83] | 2 × 2 | ✗ (behind) |",
        "|  | lo, edit error ↓ | b − a: +2.10 [+0.83, +3.37] | 2 × 2 | ✗ (behind) |",
    ]


def test_rewrite_refuses_a_missing_marker():
    with pytest.raises(ValueError, match="generated:criterions"):
        readme.rewrite("no markers here", {"criterions": "x"})


def _command_lines():
    """Each seqlevel-train line of the commands block, as bash word-splits it."""
    text = readme.COMMANDS_DOC.read_text()
    block = text.split("<!-- generated:commands -->")[1].split("<!-- /generated:commands -->")[0]
    script = re.search(r"```bash\n(.*)```", block, re.S).group(1)
    # a seqlevel-train that prints its arguments, one run per line, NUL between words
    shim = 'seqlevel-train() { printf "%s\\0" "$@"; printf "\\n"; }\n'
    out = subprocess.run(["bash", "-c", shim + script], capture_output=True, text=True, check=True).stdout
    return [line.split("\0")[:-1] for line in out.splitlines() if line]


def test_every_generated_command_parses(toy_data):
    from fairseq import options

    runs = _command_lines()
    assert len(runs) == 1 + len(readme.ROWS) + 4  # MLE, each row, and the four critic/q phases (erac, ac, vaml, vaml_tau04)
    for argv in runs:
        assert argv[0] == "data-bin/bible_es_en"
        # the toy data stands in for the Bible data (parsing reads its dictionaries, not its size)
        args = options.parse_args_and_arch(options.get_training_parser(),
                                           [str(toy_data), "--user-dir", USER_DIR, *argv[1:]])
        assert args.task == "seqlevel_translation" and args.save_dir.startswith("ckpt/")
        if args.criterion != "label_smoothed_cross_entropy":
            assert args.max_update == 214 and args.finetune_from_model.endswith("checkpoint_last.pt")
    # erac: its critic phase, then the joint phase from that phase's checkpoint
    critic = runs.index(next(a for a in runs if "ckpt/erac_critic" in a))
    assert runs[critic][runs[critic].index("--erac-phase") + 1] == "critic"
    joint = runs[critic + 1]
    assert joint[joint.index("--erac-phase") + 1] == "joint"
    assert joint[len(joint) - 1 - joint[::-1].index("--finetune-from-model") + 1] == "ckpt/erac_critic/checkpoint_last.pt"
    assert REPO.joinpath("benchmarks", "config.toml").exists()
