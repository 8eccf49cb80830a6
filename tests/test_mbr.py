"""Minimum Bayes risk decoding (decoding/mbr.py, --mbr-* of seqlevel_translation): one
candidate is the sampler's output, the selection is the medoid (ties to the lower id),
the utility matrix is sacrebleu's sentence scores of the decoded text, epsilon sampling
keeps to its set, the stock CLIs decode with it, bad flags are one line."""

import math
import random
import re

import pytest
import torch
from sacrebleu.metrics import BLEU, CHRF  # test dependencies: missing means failing

from conftest import TINY_LSTM, USER_DIR, build_toy, first_batch, mle_steps, run_cli
from fairseq_seqlevel.decoding.mbr import MbrGenerator, rank, utility_matrix
from fairseq_seqlevel.decoding.sampler import pick, sample
from fairseq_seqlevel.decoding.teacher_forcing import prev_output_tokens_from_target
from fairseq_seqlevel.errors import ConfigError
from fairseq_seqlevel.rewards.binding import bind_reward
from fairseq_seqlevel.rewards.registry import get_reward

pytestmark = pytest.mark.usefixtures("one_thread")

SP = "\u2581"


def generation_task(data, *flags):
    """(task, generation config) as fairseq-generate sets them up from ``flags``."""
    import fairseq_seqlevel  # noqa: F401
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    argv = [str(data), "--user-dir", USER_DIR, "--task", "seqlevel_translation", *map(str, flags)]
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_generation_parser(), argv))
    return tasks.setup_task(cfg.task), cfg.generation


@pytest.fixture(scope="module")
def pretrained(toy_data):
    """A toy LSTM after a few MLE steps (peaked distributions whose outputs stop)."""
    _, task, model, _ = build_toy(toy_data, "--criterion", "cross_entropy")
    mle_steps(task, model, 30)
    model.eval()
    return task, model


# ------------------------------------------------------------- the sampler's output


def test_one_candidate_is_the_sampler_output(toy_data, pretrained):
    """N = 1: the MBR output is the sampler's sample under the same seed (the task's
    layout, --max-len-a/b), the hypothesis carries its log-probs; same seed, same output."""
    _, model = pretrained
    task, gen_cfg = generation_task(toy_data, "--mbr-candidates", 1, "--max-len-a", 0.5, "--max-len-b", 3)
    generator = task.build_generator([model], gen_cfg)
    assert isinstance(generator, MbrGenerator) and generator.sampling == "epsilon" and generator.epsilon == 0.02
    batch = first_batch(task, "test", n=12)
    pad = task.target_dictionary.pad()
    outputs = []
    for _ in range(2):
        torch.manual_seed(7)
        outputs.append(task.inference_step(generator, [model], batch))
    torch.manual_seed(7)
    expected = sample(model, batch["net_input"], n=1, strategy="epsilon", epsilon=0.02, max_len_a=0.5, max_len_b=3)
    for b, hypos in enumerate(outputs[0]):
        assert len(hypos) == 1
        row = expected.tokens[b]
        assert hypos[0]["tokens"].tolist() == row[row.ne(pad)].tolist(), b
        torch.testing.assert_close(hypos[0]["positional_scores"], expected.lprobs[b, :int(expected.lengths[b])])
        assert math.isclose(float(hypos[0]["score"]), float(expected.lprobs[b].sum()) / int(expected.lengths[b]),
                            rel_tol=1e-5)
        assert hypos[0]["tokens"].tolist() == outputs[1][b][0]["tokens"].tolist()


# ----------------------------------------------------------------- the selection


def _medoid(rows, utility):
    """Brute force: the candidate of max summed utility, the first on ties."""
    sums = [sum(float(utility(torch.tensor([h]), torch.tensor([r]))) for r in rows) for h in rows]
    return max(range(len(rows)), key=lambda i: (sums[i], -i)), sums


@pytest.mark.parametrize("name", ["bleu", "edit", "chrf"])
def test_selection_is_the_medoid_ties_to_the_lower_id(name):
    pad, eos = 1, 2
    reward = get_reward(name)

    def utility(hyp, refs):
        return reward(hyp, refs, pad, eos)

    sets = [
        [[5, 6, 7, 8, 2], [5, 6, 7, 9, 2], [5, 6, 7, 8, 2], [9, 9, 2, 1, 1]],  # a duplicate wins
        [[5, 6, 2, 1], [7, 8, 2, 1], [5, 6, 2, 1], [7, 8, 2, 1]],  # two-way tie: id 0
        [[7, 8, 2, 1], [5, 6, 2, 1], [5, 6, 2, 1], [7, 8, 2, 1]],  # two-way tie: id 0 again
        [[4, 2, 1, 1], [5, 2, 1, 1], [6, 2, 1, 1], [7, 2, 1, 1]],  # all equal: id 0
        [[9, 5, 6, 7, 8, 2], [5, 6, 7, 8, 2, 1], [5, 6, 7, 2, 1, 1], [6, 7, 8, 9, 2, 1]],
    ]
    width = max(len(r) for s in sets for r in s)
    candidates = torch.tensor([[r + [pad] * (width - len(r)) for r in s] for s in sets])
    ranking = rank(candidates, utility)
    for b, rows in enumerate(candidates.tolist()):
        best, sums = _medoid(rows, utility)
        assert int(ranking.order[b, 0]) == best, (b, sums)
        # the ranking is by expected utility, mean over all candidates (itself included)
        expected = ranking.expected[b].tolist()
        for i, total in enumerate(sums):
            assert math.isclose(expected[i], total / len(rows), rel_tol=1e-6, abs_tol=1e-7)
        order = ranking.order[b].tolist()
        assert [expected[i] for i in order] == sorted(expected, reverse=True)
        for x, y in zip(order, order[1:]):  # equal utilities keep the candidates' order
            assert expected[x] > expected[y] or x < y
    # duplicates are listed once (their first id)
    assert ranking.distinct.tolist()[0] == [True, True, False, True]
    assert ranking.distinct.tolist()[1] == [True, True, False, False]


def test_generator_lists_distinct_candidates_by_expected_utility(toy_data, pretrained):
    """--nbest: the distinct candidates, best first; the first is the medoid of the N draws."""
    _, model = pretrained
    task, gen_cfg = generation_task(toy_data, "--mbr-candidates", 6, "--mbr-sampling", "multinomial",
                                    "--mbr-utility", "bleu", "--max-len-b", 6)
    generator = task.build_generator([model], gen_cfg)
    batch = first_batch(task, "test", n=6)
    pad = task.target_dictionary.pad()
    torch.manual_seed(3)
    hypos = task.inference_step(generator, [model], batch)
    torch.manual_seed(3)
    drawn = sample(model, batch["net_input"], n=6, strategy="multinomial", max_len_b=6).tokens.view(6, 6, -1)
    for b, listed in enumerate(hypos):
        rows = [[t for t in row if t != pad] for row in drawn[b].tolist()]
        best, sums = _medoid(rows, task.reward)  # --reward bleu: the same BLEU as the utility
        assert listed[0]["mbr_candidate"] == best and listed[0]["tokens"].tolist() == rows[best]
        texts = [tuple(h["tokens"].tolist()) for h in listed]
        assert len(set(texts)) == len(texts) and set(texts) == {tuple(r) for r in rows}
        utilities = [h["mbr_utility"] for h in listed]
        assert utilities == sorted(utilities, reverse=True)
        assert math.isclose(utilities[0], sums[best] / 6, rel_tol=1e-6)


def test_forced_prefix_is_kept_and_not_scored(toy_data, pretrained):
    """fairseq-generate's --prefix-size: every candidate starts with the forced tokens, which
    the utility does not see (they are every candidate's)."""
    _, model = pretrained
    task, gen_cfg = generation_task(toy_data, "--mbr-candidates", 5, "--mbr-utility", "bleu", "--max-len-b", 6)
    generator = task.build_generator([model], gen_cfg)
    batch = first_batch(task, "test", n=6)
    prefix = batch["target"][:, :2]
    torch.manual_seed(5)
    hypos = task.inference_step(generator, [model], batch, prefix_tokens=prefix)
    torch.manual_seed(5)
    layout = generator.layout(6, prefix, None, prefix.device)
    drawn = sample(model, batch["net_input"], n=5, strategy="epsilon", epsilon=0.02, max_len_b=6, layout=layout)
    drawn = drawn.tokens.view(6, 5, -1)
    assert torch.equal(drawn[:, :, :2], prefix.unsqueeze(1).expand(-1, 5, -1))
    unforced = rank(drawn[:, :, 2:], task.reward).expected  # --reward bleu: the utility's BLEU
    whole = rank(drawn, task.reward).expected
    assert not torch.allclose(unforced, whole)
    for b, listed in enumerate(hypos):
        for h in listed:
            assert h["tokens"][:2].tolist() == prefix[b].tolist()
            assert math.isclose(h["mbr_utility"], float(unforced[b, h["mbr_candidate"]]), rel_tol=1e-6)


# ------------------------------------------------------- utilities against sacrebleu

PIECES = [f"{SP}the", f"{SP}cat", "s", f"{SP}sat", f"{SP}on", f"{SP}mat", ".", f"{SP}a", "at", f"{SP}dog", ",",
          f"{SP}ran", "n", f"{SP}big", "ger", f"{SP}", "'"]


def _dictionary(symbols):
    from fairseq.data import Dictionary

    dictionary = Dictionary()
    for symbol in symbols:
        dictionary.add_symbol(symbol)
    return dictionary


def _text(dictionary, ids, style):
    from fairseq.data.data_utils import post_process

    row = []
    for i in ids:
        if i in (dictionary.pad(), dictionary.eos()):
            break
        row.append(i)
    return post_process(dictionary.string(torch.tensor(row, dtype=torch.long)), style) if row else ""


def _candidate_sets(dictionary, sources, n, seed):
    """``[B, n, T]``: perturbations of a random sentence per source (so they share n-grams)."""
    rng = random.Random(seed)
    ids = [dictionary.index(p) for p in PIECES]
    sets = []
    for _ in range(sources):
        base = [rng.choice(ids) for _ in range(rng.randint(3, 12))]
        rows = []
        for _ in range(n):
            row = [rng.choice(ids) if rng.random() < 0.25 else t for t in base if rng.random() > 0.1]
            rows.append((row or base[:1]) + [dictionary.eos()])
        sets.append(rows)
    width = max(len(r) for s in sets for r in s)
    return torch.tensor([[r + [dictionary.pad()] * (width - len(r)) for r in s] for s in sets])


@pytest.mark.parametrize("name,level", [("bleu", "word"), ("chrf", "token"), ("chrf_pp", "word"), ("bleu", "token")])
def test_utility_matrix_equals_sacrebleu_sentence_scores(name, level):
    """U[b, i, j] = sacrebleu's sentence score of candidate i's text against candidate j's,
    on a sentencepiece dictionary (word-level BLEU: tokenize none on the decoded words;
    chrF reads the decoded text at any level); token-level BLEU: the pieces as words."""
    dictionary = _dictionary(PIECES)
    utility = bind_reward(name, dictionary, level, "sentencepiece", flag="--mbr-utility")
    candidates = _candidate_sets(dictionary, sources=4, n=5, seed=len(name) + len(level))
    ours = utility_matrix(candidates, utility, budget=200)  # several chunks of sources
    assert ours.shape == (4, 5, 5) and ours.dtype == torch.float32
    if name == "bleu":
        metric = BLEU(tokenize="none", effective_order=True)
        style = "sentencepiece" if level == "word" else None
    else:
        metric = CHRF(word_order=2 if name == "chrf_pp" else 0)
        style = "sentencepiece"
    for b, rows in enumerate(candidates.tolist()):
        texts = [_text(dictionary, r, style) for r in rows]
        for i, hyp in enumerate(texts):
            for j, ref in enumerate(texts):
                want = metric.sentence_score(hyp, [ref]).score / 100
                assert abs(float(ours[b, i, j]) - want) < 1e-6, (name, level, hyp, ref, float(ours[b, i, j]), want)
    assert 0 < float(ours.mean()) < 1


# --------------------------------------------------------------- epsilon sampling


def test_pick_epsilon_keeps_to_its_set_and_zero_is_multinomial():
    torch.manual_seed(0)
    logits = torch.randn(64, 40) * 3
    logits[:, 5] = -math.inf  # an excluded token (pad)
    probs = logits.softmax(dim=-1)
    for epsilon in (0.02, 0.1, 0.3):
        for _ in range(20):
            chosen = pick(logits, "epsilon", epsilon=epsilon)
            p = probs.gather(1, chosen.unsqueeze(1)).squeeze(1)
            assert bool((p.ge(epsilon) | chosen.eq(probs.argmax(dim=-1))).all())
    # a threshold above every probability: the most likely token, never an empty set
    assert pick(logits, "epsilon", epsilon=0.99).tolist() == probs.argmax(dim=-1).tolist()
    torch.manual_seed(1)
    eps0 = pick(logits, "epsilon", epsilon=0.0)
    torch.manual_seed(1)
    assert torch.equal(eps0, pick(logits, "multinomial"))


def test_epsilon_sampler_never_emits_a_token_below_epsilon(pretrained):
    """Every sampled token (not forced) has probability >= ε under the distribution it was
    drawn from (the model's, pad and early eos excluded, renormalized) or is its most likely
    token (kept where no token reaches ε); multinomial samples of the same model do emit
    other tokens; ε = 0 draws the multinomial samples."""
    task, model = pretrained
    batch = first_batch(task, "train", n=16)
    net = batch["net_input"]
    d = task.target_dictionary
    pad, eos, epsilon, n = d.pad(), d.eos(), 0.1, 8

    def token_probs(tokens):
        prev = prev_output_tokens_from_target(tokens, pad, eos)
        with torch.no_grad():
            lprobs = model.get_normalized_probs(
                model(net["src_tokens"].repeat_interleave(n, 0), net["src_lengths"].repeat_interleave(n), prev),
                log_probs=True).float()
        lprobs[:, :, pad] = -math.inf
        lprobs[:, 0, eos] = -math.inf  # min_len 1
        probs = lprobs.softmax(dim=-1)
        p = probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        allowed = p.ge(epsilon - 1e-6) | tokens.eq(probs.argmax(dim=-1)) | tokens.eq(pad)
        return allowed, p.masked_fill(tokens.eq(pad), 1.0)

    torch.manual_seed(0)
    found = sample(model, net, n=n, strategy="epsilon", epsilon=epsilon, max_len_b=50)
    assert bool(found.lengths.lt(51).all())  # nothing reached the cap (where eos is forced)
    allowed, p = token_probs(found.tokens)
    assert bool(allowed.all()) and bool(p.ge(epsilon).any())
    torch.manual_seed(0)
    plain = sample(model, net, n=n, strategy="multinomial", max_len_b=50)
    assert not bool(token_probs(plain.tokens)[0].all())
    torch.manual_seed(0)
    zero = sample(model, net, n=n, strategy="epsilon", epsilon=0.0, max_len_b=50)
    assert torch.equal(zero.tokens, plain.tokens) and torch.equal(zero.lprobs, plain.lprobs)
    with pytest.raises(ValueError, match="epsilon"):
        sample(model, net, strategy="epsilon", epsilon=1.0)


# -------------------------------------------------------------------- bad flags


@pytest.mark.parametrize("flags,flag", [
    (["--mbr-candidates", "-1"], "--mbr-candidates"),
    (["--mbr-candidates", "4", "--mbr-utility", "blue"], "--mbr-utility"),
    (["--mbr-candidates", "4", "--mbr-epsilon", "1"], "--mbr-epsilon"),
    (["--mbr-candidates", "4", "--mbr-epsilon", "-0.1"], "--mbr-epsilon"),
])
def test_bad_flags_are_one_line_config_errors(toy_data, flags, flag):
    with pytest.raises(ConfigError) as error:
        generation_task(toy_data, *flags)
    message = str(error.value)
    assert message.startswith(flag + ":") and "\n" not in message, message


def test_training_refuses_mbr_and_generators_refuse_what_they_cannot_do(toy_data, pretrained):
    _, model = pretrained
    with pytest.raises(ConfigError, match="^--mbr-candidates: minimum Bayes risk is a decoding rule"):
        build_toy(toy_data, "--criterion", "cross_entropy", "--mbr-candidates", "4")
    task, gen_cfg = generation_task(toy_data, "--mbr-candidates", 4, "--sampling")
    with pytest.raises(ConfigError, match="^--sampling: MBR draws its own candidates"):
        task.build_generator([model], gen_cfg)
    task, gen_cfg = generation_task(toy_data, "--mbr-candidates", 4)
    with pytest.raises(ConfigError, match="^--path: --mbr-sampling epsilon samples one model"):
        task.build_generator([model, model], gen_cfg)
    # --score-reference scores the reference: fairseq's scorer, not MBR
    task, gen_cfg = generation_task(toy_data, "--mbr-candidates", 4, "--score-reference")
    assert not isinstance(task.build_generator([model], gen_cfg), MbrGenerator)


# -------------------------------------------------------------- the stock CLIs


def _hypotheses(stdout):
    out = {}
    for m in re.finditer(r"^H-(\d+)\t[-0-9.e]+\t(.*)$", stdout, re.M):
        out.setdefault(int(m.group(1)), []).append(m.group(2))
    return out


def test_generate_and_interactive_with_mbr(toy_data, tmp_path):
    ckpt = tmp_path / "ckpt"
    run_cli("train", toy_data, "--user-dir", USER_DIR, "--task", "seqlevel_translation", *TINY_LSTM,
            "--optimizer", "adam", "--lr", "0.005", "--max-tokens", "400", "--criterion", "cross_entropy", "--max-update", "1", "--save-dir", ckpt,
            "--no-epoch-checkpoints", "--no-progress-bar", "--seed", "1", "--num-workers", "0")
    common = [toy_data, "--user-dir", USER_DIR, "--task", "seqlevel_translation",
              "--path", ckpt / "checkpoint_last.pt", "--max-len-b", "8"]

    gen = run_cli("generate", *common, "--gen-subset", "test", "--mbr-candidates", "4", "--nbest", "2")
    found = _hypotheses(gen.stdout)
    assert sorted(found) == list(range(12)), gen.stdout[-3000:]
    assert all(1 <= len(h) <= 2 for h in found.values())
    assert "minimum Bayes risk decoding: 4 candidates per source (epsilon, ε = 0.02), utility chrf" in \
        gen.stdout + gen.stderr

    mbr = _hypotheses(run_cli("generate", *common, "--gen-subset", "test", "--mbr-candidates", "4",
                              "--mbr-sampling", "beam", "--mbr-utility", "bleu", "--nbest", "4").stdout)
    beam = _hypotheses(run_cli("generate", *common, "--gen-subset", "test", "--beam", "4", "--nbest", "4").stdout)
    assert sorted(mbr) == sorted(beam) == list(range(12))
    for i in beam:
        assert mbr[i][0] in beam[i]  # the chosen hypothesis is one of the beam's n-best
        assert sorted(mbr[i]) == sorted(beam[i])  # all of them, each once

    inter = run_cli("interactive", *common, "--mbr-candidates", "4", input="w1 w2 w3\nw4\n")
    assert len(re.findall(r"^H-\d+\t", inter.stdout, re.M)) == 2, inter.stdout[-3000:]
