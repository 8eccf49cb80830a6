"""README.md's generated parts (criterion table, one command per criterion) equal what
benchmarks/readme.py generates from the checked-in results and config, and every generated
command is one fairseq-train parses with the criterion's flags, as bash expands it."""

import re
import subprocess

import pytest

from benchmarks import readme
from conftest import REPO, USER_DIR


def test_generated_parts_are_current():
    text = readme.README.read_text()
    assert readme.rewrite(text, readme.parts()) == text, "run python -m benchmarks.readme"


def test_rewrite_refuses_a_missing_marker():
    with pytest.raises(ValueError, match="generated:criterions"):
        readme.rewrite("no markers here", {"criterions": "x"})


def _command_lines():
    """Each seqlevel-train line of the commands block, as bash word-splits it."""
    text = readme.README.read_text()
    block = text.split("<!-- generated:commands -->")[1].split("<!-- /generated:commands -->")[0]
    script = re.search(r"```bash\n(.*)```", block, re.S).group(1)
    # a seqlevel-train that prints its arguments, one run per line, NUL between words
    shim = 'seqlevel-train() { printf "%s\\0" "$@"; printf "\\n"; }\n'
    out = subprocess.run(["bash", "-c", shim + script], capture_output=True, text=True, check=True).stdout
    return [line.split("\0")[:-1] for line in out.splitlines() if line]


def test_every_generated_command_parses(toy_data):
    from fairseq import options

    runs = _command_lines()
    assert len(runs) == 1 + len(readme.ROWS) + 3  # MLE, each row, and the three critic/q phases
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
