"""The pipeline matrix: every criterion decodes and re-scores as the task does,
in the fairseq pipelines users already run (tests/pipelines.py builds them).

Per pipeline: greedy ``sample`` equals the task's ``inference_step`` at beam 1,
prefix included; the reference row's decoder input equals the batch's
``prev_output_tokens``; rewards do not see the forced prefix; every criterion
fine-tunes a stock MLE checkpoint for 3 updates to finite losses, its samples
starting with each row's own language token.
"""

import math
import re
from argparse import Namespace

import pytest
import torch

from conftest import USER_DIR, run_cli
from pipelines import (MLE_UPDATES, PIPELINES, build_pipeline, pipeline_batch, pipeline_pair_batch,
                       pipeline_train_argv)

pytestmark = pytest.mark.usefixtures("one_thread")

MULTI = "multilingual-transformer"

CRITERIONS = {
    "raml": ["--criterion", "raml", "--raml-alpha", "0.5", "--raml-samples", "2"],
    "token_smooth": ["--criterion", "token_smooth", "--token-smooth-topk", "4"],
    "searnn_kl": ["--criterion", "searnn_kl", "--searnn-max-len-b", "2", "--searnn-roll-in", "learned",
                  "--searnn-tokens", "3"],
    "risk": ["--criterion", "risk", "--risk-candidates", "3", "--label-smoothing", "0.1"],
    "risk_beam": ["--criterion", "risk", "--risk-candidates", "3", "--risk-search", "beam",
                  "--label-smoothing", "0.1"],
    "seq_exploration": ["--criterion", "seq_exploration", "--sle-samples", "3", "--sle-entropy-weight", "0.01"],
    "interpolation": ["--criterion", "interpolation", "--interp-lambdas", "0.3,0.3,0.4", "--interp-anneal", "none"],
    "erac": ["--criterion", "erac", "--erac-samples", "2", "--critic-embed-dim", "8", "--critic-hidden-size", "8",
             "--erac-phase", "joint"],
    "vaml": ["--criterion", "vaml", "--vaml-samples", "2", "--critic-embed-dim", "8", "--critic-hidden-size", "8",
             "--vaml-phase", "actor"],
}


def _argv(name, criterion, embeddings):
    argv = list(CRITERIONS[criterion])
    if criterion == "token_smooth":
        argv += ["--token-embeddings", embeddings]
    return argv


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory, pipeline_data_dirs):
    """A tiny word2vec file per data kind over the target dictionary (with the
    symbols the tasks add: language tokens, <mask>)."""
    cache = {}

    def build(name):
        kind = PIPELINES[name].data_fixture_kind
        if kind not in cache:
            _, task, _, _ = build_pipeline(name, pipeline_data_dirs[kind], *CRITERIONS["risk"])
            gen = torch.Generator().manual_seed(0)
            symbols = task.target_dictionary.symbols
            path = tmp_path_factory.mktemp("emb") / "vectors.txt"
            path.write_text(f"{len(symbols)} 4\n" + "".join(
                f"{s} " + " ".join(f"{float(v):.4f}" for v in torch.rand(4, generator=gen) * 2 - 1) + "\n"
                for s in symbols))
            cache[kind] = path
        return cache[kind]
    return build


def _trained(name, data_dirs, checkpoints, *criterion_argv, inference_pair=None):
    """(task, model, criterion) of pipeline ``name`` with the stock MLE checkpoint's weights."""
    from fairseq import checkpoint_utils

    _, task, model, criterion = build_pipeline(name, data_dirs[PIPELINES[name].data_fixture_kind],
                                               *criterion_argv, inference_pair=inference_pair)
    state = checkpoint_utils.load_checkpoint_to_cpu(str(checkpoints[name, MLE_UPDATES]))
    model.load_state_dict(state["model"], strict=True)
    return task, model, criterion


def _pairs(name):
    return ["src-tg1", "src-tg2"] if name == MULTI else [None]


def _batch(task, name, pair, split="train"):
    return pipeline_batch(task, split) if pair is None else pipeline_pair_batch(task, pair, split)


def _rows(tokens, pad):
    return [[t for t in row.tolist() if t != pad] for row in tokens]


@pytest.mark.parametrize("name", list(PIPELINES))
def test_greedy_sample_equals_the_task_s_inference_step(name, pipeline_data_dirs, pipeline_mle_checkpoints):
    from fairseq_seqlevel.decoding.sampler import sample

    for pair in _pairs(name):
        task, model, criterion = _trained(name, pipeline_data_dirs, pipeline_mle_checkpoints, *CRITERIONS["risk"],
                                          inference_pair=pair)
        batch = _batch(task, name, pair, "valid")
        layout = criterion.output_layout(model, batch)
        ours = sample(model, batch["net_input"], n=1, strategy="greedy", max_len_a=0, max_len_b=12, layout=layout)
        generator = task.build_generator([model], Namespace(beam=1, max_len_a=0, max_len_b=12, min_len=1))
        hypos = task.inference_step(generator, [model], batch)
        pad = task.target_dictionary.pad()
        theirs = [h[0]["tokens"].tolist() for h in hypos]
        assert _rows(ours.tokens, pad) == theirs, (name, pair)
        if pair is not None:  # every row starts with its own language's token
            lang_tok = task.target_dictionary.index(f"__{pair.split('-')[1]}__")
            assert all(row[0] == lang_tok for row in theirs)
        # positional scores: the same model log-probs (SequenceGenerator keeps running fp32 sums)
        for row, h in zip(ours.lprobs, hypos):
            assert torch.allclose(row[:len(h[0]["positional_scores"])], h[0]["positional_scores"], atol=1e-4)


@pytest.mark.parametrize("name", list(PIPELINES))
def test_reference_row_decoder_input_equals_the_batch_s(name, pipeline_data_dirs, pipeline_mle_checkpoints):
    from fairseq_seqlevel.decoding.teacher_forcing import prev_output_tokens_from_target

    task, model, criterion = _trained(name, pipeline_data_dirs, pipeline_mle_checkpoints, *CRITERIONS["risk"])
    batch = pipeline_batch(task)
    layout = criterion.output_layout(model, batch)
    pad = task.target_dictionary.pad()
    prev = prev_output_tokens_from_target(batch["target"], pad, layout.bos)
    assert torch.equal(prev, batch["net_input"]["prev_output_tokens"])
    if name == MULTI:  # a training batch mixes both target languages, each row keeps its own token
        assert len(set(layout.prefix[:, 0].tolist())) == 2
        assert torch.equal(layout.prefix[:, 0], batch["target"][:, 0])


@pytest.mark.parametrize("name", list(PIPELINES))
def test_rewards_do_not_see_the_forced_prefix(name, pipeline_data_dirs, pipeline_mle_checkpoints):
    from fairseq_seqlevel.decoding.sampler import sample
    from fairseq_seqlevel.rewards.binding import bind_reward

    task, model, criterion = _trained(name, pipeline_data_dirs, pipeline_mle_checkpoints, *CRITERIONS["risk"])
    batch = pipeline_batch(task)
    layout = criterion.output_layout(model, batch)
    dictionary = task.target_dictionary
    pad, eos = dictionary.pad(), dictionary.eos()
    torch.manual_seed(0)
    hyps = sample(model, batch["net_input"], n=1, strategy="multinomial", max_len_b=12, layout=layout).tokens
    target = batch["target"]
    plain = bind_reward("bleu", dictionary)

    def as_user_sees(rows):  # what fairseq-generate prints: no forced prefix, up to the generator's eos,
        words = []          # without the symbols it strips
        for row in rows.tolist():
            row = row[layout.prefix_len:]
            ends = [i for i, t in enumerate(row) if t in (layout.eos, eos, pad)]
            words.append([t for t in row[:ends[0] if ends else len(row)] if t not in layout.view.strip] + [eos])
        width = max(map(len, words))
        return torch.tensor([w + [pad] * (width - len(w)) for w in words])

    assert torch.allclose(criterion.reward(hyps, target), plain(as_user_sees(hyps), as_user_sees(target)))
    if layout.prefix_len:  # the plain reward, with the language token, would differ
        assert not torch.allclose(plain(hyps, target), plain(as_user_sees(hyps), as_user_sees(target)))


def _train_steps(task, model, criterion, batches):
    model.train()
    criterion.train()
    params = list(model.parameters()) + list(criterion.parameters())
    optimizer = torch.optim.SGD(params, lr=0.01)
    losses = []
    for batch in batches:
        optimizer.zero_grad()
        loss, sample_size, log = criterion(model, batch)
        (loss / max(sample_size, 1)).backward()
        grads = [p.grad for p in params if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        optimizer.step()
        losses.append(float(log["loss"]) / max(sample_size, 1))
    return losses


@pytest.mark.parametrize("criterion_name", list(CRITERIONS))
@pytest.mark.parametrize("name", list(PIPELINES))
def test_every_criterion_fine_tunes_3_updates(name, criterion_name, pipeline_data_dirs, pipeline_mle_checkpoints,
                                              embeddings, monkeypatch):
    from fairseq_seqlevel.decoding import sampler

    task, model, criterion = _trained(name, pipeline_data_dirs, pipeline_mle_checkpoints,
                                      *_argv(name, criterion_name, embeddings(name)))
    for flag in ("critic_batches", "q_batches"):  # erac / vaml: actor phases as after a critic phase
        if hasattr(criterion, flag):
            getattr(criterion, flag).fill_(1)
    batches = [pipeline_batch(task, seed=s) for s in (1, 2, 3)]
    drawn = []
    decode = sampler._decode
    monkeypatch.setattr(sampler, "_decode", lambda *a, **k: drawn.append(decode(*a, **k)) or drawn[-1])
    losses = _train_steps(task, model, criterion, batches)
    assert all(math.isfinite(x) for x in losses), losses
    if name == MULTI and drawn:  # whatever the criterion sampled starts with each row's own language token
        first = drawn[0].tokens[:, 0]
        target = batches[0]["target"]
        per_source = first.size(0) // target.size(0)
        assert torch.equal(first, target[:, 0].repeat_interleave(per_source))


# the CLI path users take: fine-tune the stock checkpoint with --finetune-from-model,
# one criterion per pipeline (each criterion at least once across the rows)
CLI_ROWS = [(name, list(CRITERIONS)[i % len(CRITERIONS)]) for i, name in enumerate(PIPELINES)]
CLI_ROWS += [(MULTI, "seq_exploration"), (MULTI, "vaml"), ("mbart", "risk_beam")]


@pytest.mark.parametrize("name,criterion_name", CLI_ROWS)
def test_fairseq_train_fine_tunes_the_stock_checkpoint(name, criterion_name, pipeline_data_dirs,
                                                       pipeline_mle_checkpoints, embeddings, tmp_path):
    data = pipeline_data_dirs[PIPELINES[name].data_fixture_kind]
    argv = _argv(name, criterion_name, embeddings(name))
    if criterion_name in ("erac", "vaml"):  # the CLI starts with the critic phase
        argv = [a for a in argv if a not in ("--erac-phase", "--vaml-phase", "joint", "actor")]
    out = run_cli("train", *pipeline_train_argv(name, data, *argv), "--optimizer", "adam", "--lr", "0.0005",
                  "--batch-size", "8", "--required-batch-size-multiple", "1", "--max-update", "3",
                  "--finetune-from-model", pipeline_mle_checkpoints[name, MLE_UPDATES], "--save-dir", tmp_path,
                  "--no-progress-bar", "--log-format", "simple", "--log-interval", "1", "--num-workers", "0",
                  "--no-epoch-checkpoints", "--no-save")
    log = out.stdout + out.stderr
    assert "loaded checkpoint" in log.lower() or "finetune" in log.lower(), log[-3000:]
    losses = [float(x) for x in re.findall(r"\| loss ([-0-9.naife]+)", log)]
    assert losses and all(math.isfinite(x) for x in losses), log[-3000:]
    assert re.search(r"num_updates 3\b", log), log[-3000:]


def test_lang_tok_replacing_bos_eos_starts_each_row_with_its_language(pipeline_data_dirs):
    """--lang-tok-replacing-bos-eos: no prefix; the language token is the decoder's start
    symbol, per row in a batch mixing pairs; greedy decoding of each pair equals the
    inference_step of a task set up for that pair (-s/-t), and beam candidates follow."""
    from fairseq_seqlevel.decoding.layout import generate
    from fairseq_seqlevel.decoding.sampler import sample

    data, flag = pipeline_data_dirs["multilingual"], "--lang-tok-replacing-bos-eos"
    _, task, model, criterion = build_pipeline(MULTI, data, *CRITERIONS["risk_beam"], flag)
    batch = pipeline_batch(task)
    layout = criterion.output_layout(model, batch)
    starts = batch["net_input"]["prev_output_tokens"][:, 0]
    assert layout.prefix_len == 0 and torch.equal(layout.bos, starts) and len(set(starts.tolist())) == 2
    pad = task.target_dictionary.pad()
    hypos = generate(task, model, batch, layout, beam=2, max_len_a=0, max_len_b=6)
    for pair in ("src-tg1", "src-tg2"):
        _, pair_task, _, pair_criterion = build_pipeline(MULTI, data, *CRITERIONS["risk"], flag, inference_pair=pair)
        pair_batch = pipeline_pair_batch(pair_task, pair, "valid")
        pair_layout = pair_criterion.output_layout(model, pair_batch)
        ours = sample(model, pair_batch["net_input"], n=1, strategy="greedy", max_len_a=0, max_len_b=8,
                      layout=pair_layout)
        generator = pair_task.build_generator([model], Namespace(beam=1, max_len_a=0, max_len_b=8, min_len=1))
        theirs = [h[0]["tokens"].tolist() for h in pair_task.inference_step(generator, [model], pair_batch)]
        assert _rows(ours.tokens, pad) == theirs
        # the mixed batch's beam candidates of this pair's rows: as the pair's own inference_step decodes them
        rows = [i for i, s in enumerate(starts.tolist()) if s == int(pair_layout.bos[0])]
        sub = {"net_input": {k: v[rows] for k, v in batch["net_input"].items()}}
        generator = pair_task.build_generator([model], Namespace(beam=2, max_len_a=0, max_len_b=6, min_len=1))
        expected = pair_task.inference_step(generator, [model], sub)
        assert [h[0]["tokens"].tolist() for h in expected] == [hypos[i][0]["tokens"].tolist() for i in rows]
    losses = _train_steps(task, model, criterion, [batch])
    assert all(math.isfinite(x) for x in losses)
