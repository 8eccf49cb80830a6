"""User rewards (``python:MODULE:FUNCTION``) and mixed rewards (``bleu:0.8,edit:0.2``):
the contract, one-line errors, every criterion, and that a checkpoint's reward spec is
never imported by a process whose command line does not name it."""

import itertools
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from fairseq import utils as fairseq_utils
from fairseq.data import Dictionary

from conftest import REPO, TINY_LSTM, USER_DIR, build_toy, first_batch
from fairseq_seqlevel import rewards as R
from fairseq_seqlevel.errors import ConfigError
from fairseq_seqlevel.rewards import user
from fairseq_seqlevel.rewards.binding import bind_reward, validate_reward_name
from fairseq_seqlevel.rewards.mixed import MixedReward
from fairseq_seqlevel.rewards.user import UntrustedReward, UserReward, UserRewardError

pytestmark = pytest.mark.usefixtures("one_thread")
_names = itertools.count()


@pytest.fixture
def trusted(monkeypatch):
    """A fresh trust set; returns a function that trusts specs (as a command line naming them)."""
    monkeypatch.setattr(user, "_TRUSTED", set())
    return lambda *specs: [user.trust_reward_spec(s) for s in specs]


@pytest.fixture
def make_module(tmp_path, monkeypatch):
    """Write a uniquely named module into an importable folder; returns its name."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def make(source):
        name = f"ur_mod_{os.getpid()}_{next(_names)}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        return name
    return make


def _dictionary(symbols):
    d = Dictionary()
    for s in symbols:
        d.add_symbol(s)
    return d


SP_DICT = _dictionary(["▁the", "▁ca", "t", "▁sat", "s", "▁on", "▁", "at"])
NMT_DICT = _dictionary(["the", "ca@@", "t", "sat", "s@@", "on", "a@@", "mat"])
WORD_DICT = _dictionary(["the", "cat", "sat", "on", "a", "mat"])


def _rows(d, n, length, seed, with_unk=True):
    """Random eos-terminated, pad-padded rows of ``d``'s words (and unk)."""
    g = torch.Generator().manual_seed(seed)
    out = torch.full((n, length + 1), d.pad())
    low = d.unk() if with_unk else d.nspecial
    for i in range(n):
        k = int(torch.randint(0, length + 1, (1,), generator=g))
        out[i, :k] = torch.randint(low, len(d), (k,), generator=g)
        out[i, k] = d.eos()
    return out


def _recording(module_source_extra=""):
    return f"""
        CALLS = []
        def score(hyps, refs):
            CALLS.append((list(hyps), [list(r) for r in refs]))
            return [float(len(h)) / (1 + len(h)) for h in hyps]
        {module_source_extra}
        """


# ---------------------------------------------------------------- contract

@pytest.mark.parametrize("d,style", [(SP_DICT, "sentencepiece"), (NMT_DICT, "subword_nmt"), (WORD_DICT, "none")])
def test_strings_are_detokenized_like_fairseq(d, style, trusted, make_module):
    name = make_module(_recording())
    spec = f"python:{name}:score"
    trusted(spec)
    reward = bind_reward(spec, d, subword_style=style)
    assert isinstance(reward, UserReward)
    hyp, ref = _rows(d, 40, 7, seed=1), _rows(d, 40, 7, seed=2, with_unk=False)
    values = reward(hyp, ref)
    (hyps, refs), = sys.modules[name].CALLS
    fairseq_text = lambda row: d.string(fairseq_utils.strip_pad(row, d.pad()), style)  # noqa: E731
    expected = {(fairseq_text(h), fairseq_text(r)) for h, r in zip(hyp, ref)}
    got = [(h, rs[0]) for h, rs in zip(hyps, refs)]
    assert len(got) == len(set(got)) and set(got) == expected  # every distinct pair once
    assert all(len(rs) == 1 for rs in refs)
    lookup = {pair: v for pair, v in zip(got, [len(h) / (1 + len(h)) for h, _ in got])}
    assert torch.allclose(values, torch.tensor([lookup[fairseq_text(h), fairseq_text(r)] for h, r in zip(hyp, ref)]))
    assert values.dtype == torch.float32 and values.shape == (40,)
    # with auto detection the style is the dictionary's
    assert R.detect_subword_style(d.symbols) == style


def test_repeated_pairs_are_scored_once_in_batches(trusted, make_module):
    name = make_module(_recording("score.batch_size = 2"))
    spec = f"python:{name}:score"
    trusted(spec)
    reward = bind_reward(spec, WORD_DICT)
    w = {s: WORD_DICT.index(s) for s in ["the", "cat", "sat", "on", "a", "mat"]}
    pad, eos = WORD_DICT.pad(), WORD_DICT.eos()
    hyp = torch.tensor([[w["the"], w["cat"], eos], [w["a"], eos, pad], [w["the"], w["cat"], eos],
                        [w["the"], w["cat"], eos]])
    refs = torch.tensor([  # B x R x T': an absent (all-pad) reference, an example with none
        [[w["the"], w["cat"], w["sat"], eos], [pad, pad, pad, pad]],
        [[w["a"], w["mat"], eos, pad], [w["on"], w["a"], w["mat"], eos]],
        [[w["the"], w["cat"], w["sat"], eos], [pad, pad, pad, pad]],
        [[pad, pad, pad, pad], [pad, pad, pad, pad]],
    ])
    values = reward(hyp, refs)
    calls = sys.modules[name].CALLS
    assert [len(h) for h, _ in calls] == [2, 1]  # 3 distinct pairs, at most 2 per call
    hyps = [h for c in calls for h in c[0]]
    refs_seen = [r for c in calls for r in c[1]]
    assert hyps == ["the cat", "a", "the cat"]
    assert refs_seen == [["the cat sat"], ["a mat", "on a mat"], [""]]
    assert torch.allclose(values, torch.tensor([7 / 8, 1 / 2, 7 / 8, 7 / 8]))


def test_token_id_inputs(trusted, make_module):
    name = make_module("""
        CALLS = []
        def score(hyps, refs):
            CALLS.append((hyps, refs))
            return [float(len(h)) for h in hyps]
        score.inputs = "ids"
        score.low, score.high = 0, 100
        """)
    spec = f"python:{name}:score"
    trusted(spec)
    reward = bind_reward(spec, SP_DICT)
    bos, pad, eos = SP_DICT.bos(), SP_DICT.pad(), SP_DICT.eos()
    hyp = torch.tensor([[bos, 5, 6, eos, pad], [7, eos, 8, 9, pad]])
    ref = torch.tensor([[5, 6, 7, eos], [4, eos, pad, pad]])
    assert reward(hyp, ref).tolist() == [2.0, 1.0]
    (hyps, refs), = sys.modules[name].CALLS
    assert hyps == [[5, 6], [7]] and refs == [[[5, 6, 7]], [[4]]]
    assert reward.cost(hyp, ref).tolist() == [98.0, 99.0]


def test_declared_range_cost_prefix_and_bleu_stats(trusted, make_module):
    name = make_module("""
        from fairseq_seqlevel.rewards.user import user_reward

        @user_reward(low=-2.0, high=3.0)
        def score(hyps, refs):
            return [1.0 for _ in hyps]
        """)
    spec = f"python:{name}:score"
    trusted(spec)
    reward = bind_reward(spec, WORD_DICT)
    hyp, ref = _rows(WORD_DICT, 6, 5, seed=3), _rows(WORD_DICT, 6, 5, seed=4)
    assert (reward.low, reward.high) == (-2.0, 3.0)
    assert torch.equal(reward.cost(hyp, ref), torch.full((6,), 2.0))
    assert torch.equal(reward.bleu_stats(hyp, ref), bind_reward("bleu", WORD_DICT).bleu_stats(hyp, ref))
    with pytest.raises(ConfigError, match="no prefix variant"):
        reward.prefix(hyp, ref)


def _one_line_error(excinfo, *parts):
    message = str(excinfo.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, message
    return message


BAD_MODULES = {
    "no module": (None, "score", "cannot import module"),
    "import fails": ("raise RuntimeError('no checkpoint at /x')", "score", "RuntimeError: no checkpoint at /x"),
    "no function": ("def other(h, r): return [0.0] * len(h)", "score", "has no attribute 'score'"),
    "not callable": ("score = 3", "score", "is not callable"),
    "bad range": ("def score(h, r): return []\nscore.low, score.high = 0, float('inf')", "score", "finite high"),
    "low >= high": ("def score(h, r): return []\nscore.low, score.high = 1, 1", "score", "low < high"),
    "bad inputs": ("def score(h, r): return []\nscore.inputs = 'tokens'", "score", "inputs must be one of"),
    "bad batch": ("def score(h, r): return []\nscore.batch_size = 0", "score", "batch_size must be"),
}


@pytest.mark.parametrize("case", sorted(BAD_MODULES))
def test_bad_module_or_function_is_one_config_error(case, trusted, make_module):
    source, function, problem = BAD_MODULES[case]
    name = make_module(source) if source is not None else f"ur_missing_{next(_names)}"
    spec = f"python:{name}:{function}"
    trusted(spec)
    with pytest.raises(ConfigError) as err:
        validate_reward_name(spec, "--risk-reward")  # what setup_task / criterion init run
    _one_line_error(err, f"--risk-reward {spec}: ", problem)
    with pytest.raises(ConfigError) as err:
        bind_reward(spec, WORD_DICT, flag="--risk-reward")
    _one_line_error(err, f"--risk-reward {spec}: ", problem)


@pytest.mark.parametrize("spec", ["python:mod", "python:mod:", "python::f", "python:a-b:f", "python:m:f/x"])
def test_malformed_spec_is_one_config_error(spec, trusted):
    trusted(spec)
    with pytest.raises(ConfigError) as err:
        bind_reward(spec, WORD_DICT)
    _one_line_error(err, f"--reward {spec}: ")


BAD_OUTPUTS = {
    "too few": ("[0.5] * (len(h) - 1)", "returned shape"),
    "2-D": ("torch.zeros(len(h), 1)", "returned shape"),
    "scalar": ("torch.tensor(0.5)", "returned shape"),
    "nan": ("[float('nan')] * len(h)", "returned nan"),
    "inf": ("torch.full((len(h),), float('inf'))", "returned inf"),
    "strings": ("['good'] * len(h)", "not numbers"),
    "none": ("None", "not numbers"),
    "complex": ("torch.zeros(len(h), dtype=torch.complex64)", "not real numbers"),
    "outside range": ("[1.5] * len(h)", "outside its declared range [0.0, 1.0]"),
}


@pytest.mark.parametrize("case", sorted(BAD_OUTPUTS))
def test_wrong_output_is_one_line_naming_the_function(case, trusted, make_module):
    expression, problem = BAD_OUTPUTS[case]
    name = make_module(f"import torch\ndef score(h, r):\n    return {expression}\n")
    spec = f"python:{name}:score"
    trusted(spec)
    reward = bind_reward(spec, WORD_DICT)  # binding succeeds: the output is checked per call
    hyp, ref = _rows(WORD_DICT, 5, 4, seed=5, with_unk=False), _rows(WORD_DICT, 5, 4, seed=6)
    hyp[:, 0] = WORD_DICT.index("cat")  # no empty hypothesis, distinct from each other's refs
    hyp[:, 1] = torch.arange(5) + WORD_DICT.nspecial
    with pytest.raises(UserRewardError) as err:
        reward(hyp, ref)
    _one_line_error(err, f"user reward {spec} ", problem)


def test_good_outputs_of_every_kind(trusted, make_module):
    name = make_module("""
        import numpy, torch
        def as_list(h, r): return [1] * len(h)
        def as_numpy(h, r): return numpy.full(len(h), 0.25)
        def as_tensor(h, r): return torch.full((len(h),), 0.5, dtype=torch.float16)
        def as_bools(h, r): return [True] * len(h)
        """)
    hyp, ref = _rows(WORD_DICT, 4, 4, seed=7), _rows(WORD_DICT, 4, 4, seed=8)
    for fn, value in [("as_list", 1.0), ("as_numpy", 0.25), ("as_tensor", 0.5), ("as_bools", 1.0)]:
        spec = f"python:{name}:{fn}"
        trusted(spec)
        assert torch.equal(bind_reward(spec, WORD_DICT)(hyp, ref), torch.full((4,), value))


# ---------------------------------------------------------------- security

IMPORT_MARKER = """
    import pathlib
    pathlib.Path(__file__).with_suffix(".imported").write_text("imported")
    def score(hyps, refs):
        return [float(h == rs[0]) for h, rs in zip(hyps, refs)]
    """


def test_spec_not_on_the_command_line_is_never_imported(make_module, tmp_path, monkeypatch):
    monkeypatch.setattr(user, "_TRUSTED", set())
    name = make_module(IMPORT_MARKER)
    marker = tmp_path / f"{name}.imported"
    spec, mixed = f"python:{name}:score", f"bleu:0.5,python:{name}:score:0.5"
    monkeypatch.setattr(sys, "argv", ["fairseq-validate", "--path", "ckpt.pt", "--reward", "bleu"])
    for s in [spec, mixed]:
        validate_reward_name(s, "--reward")
        reward = bind_reward(s, WORD_DICT)
        assert isinstance(reward, UntrustedReward)
        hyp = _rows(WORD_DICT, 2, 3, seed=9)
        for method in (reward, reward.cost, reward.bleu_stats):
            with pytest.raises(ConfigError) as err:
                method(hyp, hyp)
            _one_line_error(err, f"--reward {s}: ", "not imported")
    assert not marker.exists() and name not in sys.modules
    # the same spec on this process's command line is imported
    monkeypatch.setattr(sys, "argv", ["fairseq-train", "--reward", spec])
    assert isinstance(bind_reward(spec, WORD_DICT), UserReward) and marker.exists()


@pytest.mark.parametrize("argv,named", [
    (["--reward", "python:m:f"], True),
    (["--reward=python:m:f"], True),
    (["task.reward=python:m:f"], True),
    (["--model-overrides", "{'reward': 'python:m:f'}"], True),
    (["--reward", "python:m:f_other"], False),
    (["--reward", "python:m:f:0.5"], False),
    (["--reward", "xpython:m:f"], False),
    (["--save-dir", "python:m:fx"], False),
])
def test_named_on_command_line(argv, named, monkeypatch):
    monkeypatch.setattr(user, "_TRUSTED", set())
    assert user.named_on_command_line("python:m:f", argv) is named


# ---------------------------------------------------------------- mixed

def test_mixed_reward_value_cost_prefix_and_bleu_stats():
    hyp, ref = _rows(WORD_DICT, 30, 8, seed=10, with_unk=False), _rows(WORD_DICT, 30, 8, seed=11, with_unk=False)
    bleu, edit, ham = (bind_reward(n, WORD_DICT) for n in ["bleu", "edit", "hamming"])
    mixed = bind_reward("bleu:0.8,edit:0.2,hamming:1.5", WORD_DICT)
    assert isinstance(mixed, MixedReward) and mixed.has_prefix
    expect = lambda m: 0.8 * getattr(bleu, m)(hyp, ref) + 0.2 * getattr(edit, m)(hyp, ref) \
        + 1.5 * getattr(ham, m)(hyp, ref)  # noqa: E731
    for method in ["__call__", "cost", "prefix"]:
        assert torch.allclose(getattr(mixed, method)(hyp, ref), expect(method)), method
    assert (mixed.cost(hyp, ref) >= 0).all()
    assert torch.allclose(mixed.cost(hyp, ref), mixed.high - mixed(hyp, ref))
    assert mixed.high == pytest.approx(0.8) and mixed.low == float("-inf")
    assert torch.equal(mixed.bleu_stats(hyp, ref), bleu.bleu_stats(hyp, ref))
    # at word level: each part merges subwords; prefixes need token level
    sp_hyp, sp_ref = _rows(SP_DICT, 10, 8, seed=12), _rows(SP_DICT, 10, 8, seed=13)
    word = bind_reward("bleu:0.5,edit:0.5", SP_DICT, "word")
    parts = [bind_reward(n, SP_DICT, "word") for n in ["bleu", "edit"]]
    assert torch.allclose(word(sp_hyp, sp_ref), 0.5 * parts[0](sp_hyp, sp_ref) + 0.5 * parts[1](sp_hyp, sp_ref))
    assert not word.has_prefix
    with pytest.raises(ConfigError):
        bind_reward("bleu:0.5,edit:0.5", SP_DICT, "word", needs_prefix=True)


@pytest.mark.parametrize("spec,problem", [
    ("bleu,edit:0.2", "needs a weight"),
    ("bleu:0.8,edit", "needs a weight"),
    ("bleu:0,edit:1", "positive number"),
    ("bleu:-1,edit:1", "positive number"),
    ("bleu:nan,edit:1", "positive number"),
    ("bleu:inf,edit:1", "positive number"),
    ("bleu:x,edit:1", "positive number"),
    ("bleu:0.5,bleu:0.5", "appears twice"),
    ("bleu:0.8,blue:0.2", "unknown reward 'blue'; known rewards: " + ", ".join(R.available_rewards())),
    ("bleu:0.5,python:m:0.5", "needs a weight"),
])
def test_bad_mixed_spec_is_one_config_error(spec, problem):
    for check in (lambda: validate_reward_name(spec, "--reward"), lambda: bind_reward(spec, WORD_DICT)):
        with pytest.raises(ConfigError) as err:
            check()
        _one_line_error(err, f"--reward {spec}: ", problem)


def test_mixed_with_a_user_part(trusted, make_module):
    name = make_module("def score(h, r):\n    return [0.5] * len(h)\n")
    spec = f"bleu:0.5,python:{name}:score:2"
    trusted(spec)
    mixed = bind_reward(spec, WORD_DICT)
    hyp, ref = _rows(WORD_DICT, 8, 5, seed=14), _rows(WORD_DICT, 8, 5, seed=15)
    assert torch.allclose(mixed(hyp, ref), 0.5 * bind_reward("bleu", WORD_DICT)(hyp, ref) + 1.0)
    assert mixed.high == pytest.approx(2.5) and not mixed.has_prefix
    with pytest.raises(ConfigError, match="prefix variant only when every part"):
        mixed.prefix(hyp, ref)
    with pytest.raises(ConfigError) as err:
        bind_reward(spec, WORD_DICT, needs_prefix=True)
    _one_line_error(err, f"--reward {spec}: ", "no prefix variant")


# ---------------------------------------------------------------- criterions

CRITIC = ["--critic-embed-dim", "8", "--critic-hidden-size", "8"]
CRITERIONS = {  # every criterion that takes a reward, with its own small settings
    "risk": ["--risk-candidates", "3"],
    "preference": ["--preference-candidates", "3"],
    "seq_exploration": [],
    "raml": ["--raml-samples", "2", "--raml-reward", "REWARD"],
    "searnn_kl": [],
    "interpolation": [],
    "erac": CRITIC + ["--erac-samples", "2"],
    "vaml": CRITIC,
}
NEEDS_PREFIX = {"erac": "--erac-reward", "vaml": "--vaml-reward", "interpolation": "--interpolation-reward"}


def _criterion_args(criterion, reward):
    return ["--criterion", criterion, "--reward", reward,
            *[reward if a == "REWARD" else a for a in CRITERIONS[criterion]]]


@pytest.mark.parametrize("criterion", sorted(CRITERIONS))
def test_every_criterion_trains_with_a_mixed_reward(toy_data, criterion):
    _, task, model, crit = build_toy(toy_data, *_criterion_args(criterion, "bleu:0.8,edit:0.2"))
    assert isinstance(getattr(crit, "reward", None) or crit.gain_reward, MixedReward)
    loss, sample_size, _ = crit(model, first_batch(task, n=6))
    loss.backward()
    assert torch.isfinite(loss) and sample_size > 0


@pytest.mark.parametrize("criterion", sorted(CRITERIONS))
def test_user_reward_in_every_criterion_or_one_line_refusal(toy_data, criterion, trusted, make_module):
    name = make_module(_recording())
    spec = f"python:{name}:score"
    trusted(spec)
    args = _criterion_args(criterion, spec)
    if criterion in NEEDS_PREFIX:
        with pytest.raises(ConfigError) as err:
            build_toy(toy_data, *args)
        _one_line_error(err, f"{NEEDS_PREFIX[criterion]} {spec}: ", "no prefix variant")
        return
    _, task, model, crit = build_toy(toy_data, *args)
    loss, _, _ = crit(model, first_batch(task, n=6))
    loss.backward()
    assert torch.isfinite(loss) and sys.modules[name].CALLS  # the user function scored the samples


# ---------------------------------------------------------------- stock CLIs

TRAIN = ["--user-dir", USER_DIR, "--task", "seqlevel_translation", *TINY_LSTM,
         "--optimizer", "adam", "--lr", "0.005", "--max-tokens", "400", "--no-progress-bar",
         "--log-format", "simple", "--log-interval", "1", "--seed", "1", "--num-workers", "0"]


def _cli(module, *args, pythonpath, check=True, input=None):
    """A stock fairseq CLI in a subprocess with ``pythonpath`` importable too."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(pythonpath)]), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", f"fairseq_cli.{module}", *map(str, args)],
                          capture_output=True, text=True, env=env, input=input)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def test_example_trains_two_updates_through_the_cli(toy_data, tmp_path):
    out = _cli("train", toy_data, *TRAIN, "--save-dir", tmp_path / "c", "--criterion", "risk",
               "--risk-candidates", "4", "--reward", "python:user_reward:score", "--max-update", "2",
               "--extra-references", "ref2", "--eval-reward", pythonpath=REPO / "examples")
    log = out.stdout + out.stderr
    assert re.search(r"num_updates 2\b", log), log[-3000:]
    m = re.search(r"valid on 'valid' subset.*\| reward ([0-9.]+)", log)
    assert m and 0.0 <= float(m.group(1)) <= 1.0, log[-3000:]


def test_bad_function_on_the_cli_is_one_line(toy_data, tmp_path):
    out = _cli("train", toy_data, *TRAIN, "--save-dir", tmp_path / "c", "--criterion", "risk",
               "--reward", "python:user_reward:nope", "--max-update", "1", pythonpath=REPO / "examples", check=False)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.rstrip().splitlines()[-1] == \
        "error: --reward python:user_reward:nope: module 'user_reward' has no attribute 'nope'"


def test_checkpoint_with_a_user_reward_never_imports_it(toy_data, tmp_path, monkeypatch):
    """A checkpoint trained with --reward python:M:score (task and criterion config) is
    generated from, served, validated, fine-tuned from and restored without importing M, although
    M is importable: only a command line naming the spec imports it."""
    name = f"ur_marker_{os.getpid()}"
    folder = tmp_path / "mods"
    folder.mkdir()
    (folder / f"{name}.py").write_text(textwrap.dedent(IMPORT_MARKER))
    marker = folder / f"{name}.imported"
    spec = f"python:{name}:score"
    ckpt = tmp_path / "ckpt"
    _cli("train", toy_data, *TRAIN, "--save-dir", ckpt, "--criterion", "risk", "--risk-candidates", "3",
         "--reward", spec, "--risk-reward", spec, "--eval-reward", "--max-update", "2", pythonpath=folder)
    assert marker.exists()  # the training run imported it
    marker.unlink()
    last = ckpt / "checkpoint_last.pt"

    gen = _cli("generate", toy_data, "--user-dir", USER_DIR, "--task", "seqlevel_translation", "--path", last,
               "--beam", "2", "--gen-subset", "test", pythonpath=folder)
    assert len(re.findall(r"^H-\d+\t", gen.stdout, re.M)) == 12
    inter = _cli("interactive", toy_data, "--user-dir", USER_DIR, "--task", "seqlevel_translation", "--path", last,
                 "--beam", "2", pythonpath=folder, input="w1 w2 w3\n")
    assert len(re.findall(r"^H-\d+\t", inter.stdout, re.M)) == 1
    # fairseq-validate rebuilds task and criterion from the checkpoint's config
    val = _cli("validate", toy_data, "--user-dir", USER_DIR, "--task", "seqlevel_translation", "--path", last,
               "--max-tokens", "400", "--no-progress-bar", pythonpath=folder, check=False)
    assert "Traceback" not in val.stderr, val.stderr[-3000:]
    # risk's validation loss needs its reward: the placeholder says so in one line
    assert val.returncode != 0 and re.fullmatch(rf"error: --risk-reward {re.escape(spec)}: .* not imported; .*",
                                                val.stderr.rstrip().splitlines()[-1]), val.stderr[-3000:]
    for extra in (["--finetune-from-model", last], ["--restore-file", last, "--reset-optimizer"]):
        out = _cli("train", toy_data, *TRAIN, "--save-dir", tmp_path / extra[0].strip("-"), "--criterion", "risk",
                   "--risk-candidates", "3", "--reward", "bleu", "--max-update", "3", *extra, pythonpath=folder)
        assert re.search(r"[Ll]oaded checkpoint", out.stdout + out.stderr)
    assert not marker.exists()

    # in-process, as fairseq-validate and hub loading do it: the task from the checkpoint
    from fairseq import checkpoint_utils

    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setattr(user, "_TRUSTED", set())
    _, saved_cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(last)])
    assert saved_cfg.task.reward == spec and saved_cfg.criterion.risk_reward == spec
    assert isinstance(task.reward, UntrustedReward)
    assert isinstance(task.build_criterion(saved_cfg.criterion).reward, UntrustedReward)
    with pytest.raises(ConfigError, match="not imported"):
        task.reward(torch.tensor([[4, 2]]), torch.tensor([[4, 2]]))
    assert not marker.exists() and name not in sys.modules


def test_example_scorer_and_its_comet_helper(monkeypatch):
    """examples/user_reward.py: the offline scorer keeps the contract; comet_scores feeds
    COMET's predict() its documented input (a fake model stands in for COMET)."""
    monkeypatch.syspath_prepend(str(REPO / "examples"))
    import user_reward as example

    values = example.score(["the cat sat", "a dog", ""], [["the cat sat"], ["the cat", "a dog ran"], [""]])
    assert values.shape == (3,) and values[0] == pytest.approx(1.0) and 0 < values[1] < 1
    assert ((values >= example.score.low) & (values <= example.score.high)).all()

    class FakeComet:
        def predict(self, data, batch_size, gpus, progress_bar):
            self.data = data
            return type("Prediction", (), {"scores": [1.2, 0.3]})()

    model = FakeComet()
    assert example.comet_scores(model, ["h1", "h2"], ["r1", "r2"]).tolist() == pytest.approx([1.0, 0.3])
    assert model.data == [{"src": "r1", "mt": "h1", "ref": "r1"}, {"src": "r2", "mt": "h2", "ref": "r2"}]
