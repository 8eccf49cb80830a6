"""searnn_kl and interpolation in a task's output layout (decoding.layout), on
the toy seqlevel_translation setup with hand-made layouts (the multilingual and
mBART pipelines themselves are tests/pipelines.py's matrix):

* ``langtok``: as ``translation_multi_simple_epoch --decoder-langtok``: the
  target's first token is a forced prefix (P = 1, a stand-in 'language
  token'), the decoder starts from another symbol than eos (``<s>``);
* ``mbart``: as ``translation_from_pretrained_bart``: targets end with
  ``</s> E``, the decoder starts from E and a row ends with E (``<unk>`` stands
  in for ``[lang]``), which rewards read as eos.

Learned roll-ins, roll-outs and constructed sequences must start with the
prefix and be decoded from the start symbol, searnn must have no cell (no
cost, no gradient) at a forced position, and the losses teacher-force from the
start symbol."""

import math

import pytest
import torch

from conftest import build_toy, first_batch, levenshtein, mle_steps
from fairseq_seqlevel.criterions.base import references_of
from fairseq_seqlevel.criterions.interpolation import MODEL, REFERENCE, construct_sequences
from fairseq_seqlevel.decoding.layout import OutputLayout
from fairseq_seqlevel.decoding.sampler import sample as sample_outputs
from fairseq_seqlevel.rewards.output_view import OutputView
from test_interpolation import _single_reference
from test_raml import _assert_same, _loss_and_grads
from test_searnn import _full_greedy, _strip

pytestmark = pytest.mark.usefixtures("one_thread")

REFERENCE_SEARCH = ["--searnn-roll-in", "reference", "--searnn-roll-out", "reference"]


@pytest.fixture(scope="module")
def pretrained(toy_data):
    """A few MLE steps per architecture: greedy outputs that vary and stop."""
    cache = {}

    def get(arch):
        if arch not in cache:
            _, task, model, _ = build_toy(toy_data, "--criterion", "label_smoothed_cross_entropy",
                                          "--label-smoothing", "0", arch=arch)
            cache[arch] = (task, mle_steps(task, model, {"lstm": 40, "transformer": 30}[arch]))
        return cache[arch]

    return get


# ------------------------------------------------------------------ layouts


def _langtok(task, sample):
    """P = 1 (the target's first token forced), start symbol <s>, end symbol eos."""
    d = task.target_dictionary
    target = sample["target"]
    return OutputLayout(torch.full((target.size(0),), d.bos(), dtype=torch.long), target[:, :1].clone(), d.eos(),
                        OutputView(1, (), (), d.eos(), d.pad()))


def _mbart_end(task):
    return task.target_dictionary.unk()  # stands in for [lang]: in no target, never chosen by a toy model


def _mbart(task, sample):
    """No prefix; the start and end symbol E (rows end with ``</s> E``)."""
    d, end = task.target_dictionary, _mbart_end(task)
    return OutputLayout(torch.full((sample["target"].size(0),), end, dtype=torch.long),
                        sample["target"][:, :0], end, OutputView(0, {end}, {end}, d.eos(), d.pad()))


def _end_with(rows, end, pad):
    """Rows ``[..., T]`` ending in eos -> ``[..., T + 1]`` with ``end`` after it (empty rows stay pad)."""
    out = torch.cat([rows, rows.new_full(rows.shape[:-1] + (1,), pad)], dim=-1)
    length = rows.ne(pad).sum(dim=-1, keepdim=True)
    return out.scatter(-1, length, torch.where(length > 0, torch.full_like(length, end), torch.full_like(length, pad)))


def _mbart_sample(task, sample):
    """The batch as mBART lays it out: targets and references ``w.. </s> E``,
    decoder inputs ``E w.. </s>``."""
    d, end = task.target_dictionary, _mbart_end(task)
    pad = d.pad()
    target = _end_with(sample["target"], end, pad)
    prev = torch.cat([torch.full_like(target[:, :1], end), target[:, :-1]], dim=1).masked_fill(target.eq(pad), pad)
    out = dict(sample, target=target, ntokens=int(target.ne(pad).sum()),
               net_input=dict(sample["net_input"], prev_output_tokens=prev))
    if sample.get("references") is not None:
        out["references"] = _end_with(sample["references"], end, pad)
    return out


LAYOUTS = {"langtok": (_langtok, lambda task, sample: sample), "mbart": (_mbart, _mbart_sample)}


def _use_layout(monkeypatch, crit, layout):
    """The criterion's ``output_layout`` returns ``layout`` (nothing probed, the
    reward left unwrapped: the criterion must view rewards itself)."""
    monkeypatch.setattr(crit, "output_layout", lambda model, sample: layout)


def _record_decoder(monkeypatch, model):
    """Every decoder call's input tokens, whether incremental, and its output
    logits (gradient retained where they have one)."""
    calls = []
    forward = model.decoder.forward

    def recorded(prev_output_tokens, *args, **kwargs):
        out = forward(prev_output_tokens, *args, **kwargs)
        if out[0].requires_grad:
            out[0].retain_grad()
        calls.append((prev_output_tokens.clone(), kwargs.get("incremental_state") is not None, out[0]))
        return out

    monkeypatch.setattr(model.decoder, "forward", recorded)
    return calls


def _hand_nll(model, sample, tokens, bos, free_from=0):
    """Σ token NLL of ``tokens`` teacher-forced from ``[bos, tokens[:-1]]`` at
    positions >= free_from, with its gradients (computed here, not by the library)."""
    pad = 1
    prev = torch.cat([torch.full_like(tokens[:, :1], bos), tokens[:, :-1]], dim=1).masked_fill(tokens.eq(pad), pad)
    net = sample["net_input"]
    model.zero_grad()
    lprobs = model.get_normalized_probs(model(net["src_tokens"], net["src_lengths"], prev), log_probs=True)
    nll = -lprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    scored = tokens.ne(pad)
    scored[:, :free_from] = False
    loss = nll[scored].sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), int(scored.sum()), nll.masked_fill(~tokens.ne(pad), 0).sum().detach(), grads


# ------------------------------------------------------------------ searnn


@pytest.mark.parametrize("arch", ["lstm", "transformer"])
@pytest.mark.parametrize("kind", ["langtok", "mbart"])
def test_searnn_learned_rollins_and_rollouts_follow_the_layout(toy_data, pretrained, monkeypatch, arch, kind):
    """Learned roll-ins start with the forced prefix, decoded from the start
    symbol; every roll-out (a cell's token, then greedy) is the one-by-one
    greedy decoding from the start symbol; rows end with the end symbol; no
    cell at a forced position."""
    cap_b = 2
    task, model = pretrained(arch)
    _, _, _, crit = build_toy(toy_data, "--criterion", "searnn_kl", "--reward", "edit",
                              "--searnn-roll-in", "learned", "--searnn-roll-out", "learned",
                              "--searnn-cells", "2", "--searnn-tokens", "2", "--searnn-token-sampling", "policy",
                              "--searnn-max-len-b", str(cap_b), arch=arch, seed=5)
    make_layout, make_sample = LAYOUTS[kind]
    batch = make_sample(task, first_batch(task, n=4))
    layout = make_layout(task, batch)
    _use_layout(monkeypatch, crit, layout)
    d = task.target_dictionary
    pad, end, forced = d.pad(), layout.eos, layout.prefix_len
    torch.manual_seed(0)
    found = crit.search(model, batch)

    assert found.num_decoded > 0 and bool(found.cell_pos.ge(forced).all())
    net, target = batch["net_input"], batch["target"]
    caps = target.ne(pad).sum(1) + cap_b
    model.eval()
    with torch.no_grad():
        srcs = [net["src_tokens"][b][net["src_tokens"][b].ne(pad)] for b in range(target.size(0))]
        for b in range(target.size(0)):
            bos, prefix = int(layout.bos[b]), layout.prefix[b].tolist()
            expected = _full_greedy(model, srcs[b], net["src_lengths"][b], prefix, int(caps[b]), pad, end,
                                    bos=bos)
            rollin = _strip(found.rollin[b], pad)
            assert rollin == expected and rollin[:forced] == prefix and rollin[-1] == end
        for hyp, m, j in zip(found.hyps, found.hyp_cells.tolist(), found.hyp_columns.tolist()):
            b, t = int(found.cell_rows[m]), int(found.cell_pos[m])
            prefix = _strip(found.rollin[b], pad)[:t] + [int(found.candidates[m, j])]
            expected = _full_greedy(model, srcs[b], net["src_lengths"][b], prefix, int(caps[b]), pad, end,
                                    bos=int(layout.bos[b]))
            assert _strip(hyp, pad) == expected, (b, t, prefix)
            # the cost scores what the task outputs: no prefix, up to the end symbol
            refs = [_words(r, forced, pad, (d.eos(), end)) for r in batch["references"][b] if int(r.ne(pad).sum())]
            cost = min(levenshtein(_words(hyp, forced, pad, (d.eos(), end)), r) / max(len(r), 1) for r in refs)
            assert float(found.costs[m, j]) == pytest.approx(cost, abs=1e-6), (b, t, prefix)


def _words(row, forced, pad, ends):
    """The words of a row as the task outputs it: no forced prefix, up to the first end symbol."""
    words = []
    for x in _strip(row, pad)[forced:]:
        if x in ends:
            break
        words.append(x)
    return words


def test_searnn_forced_position_has_no_cell_and_no_gradient(toy_data, monkeypatch):
    """P = 1: the cells are exactly the free positions of the reference roll-in,
    the loss pass starts from the start symbol, and the loss does not depend on
    the model's distribution at the forced position (zero gradient on its
    logits), while the free positions get one."""
    _, task, model, crit = build_toy(toy_data, "--criterion", "searnn_kl", "--reward", "bleu",
                                     "--searnn-roll-in", "reference", "--searnn-roll-out", "mixed",
                                     "--searnn-tokens", "3")
    batch = first_batch(task, n=6)
    layout = _langtok(task, batch)
    _use_layout(monkeypatch, crit, layout)
    pad = task.target_dictionary.pad()
    target = batch["target"]
    torch.manual_seed(0)
    found = crit.search(model, batch)
    free = target.ne(pad)
    free[:, 0] = False
    cells = torch.zeros_like(free)
    cells[found.cell_rows, found.cell_pos] = True
    assert torch.equal(cells, free)
    # reference roll-outs (best-suffix: --reward bleu) append a suffix of the free target only
    eos = task.target_dictionary.eos()
    checked = 0
    for hyp, m, j in zip(found.hyps, found.hyp_cells.tolist(), found.hyp_columns.tolist()):
        b, t = int(found.cell_rows[m]), int(found.cell_pos[m])
        if bool(found.reference_out[b]) and int(found.candidates[m, j]) != eos:
            ref = _strip(target[b], pad)
            assert _strip(hyp, pad)[t + 1:] in [ref[k:] for k in range(1, len(ref))], (b, t)
            checked += 1
    assert checked > 0

    calls = _record_decoder(monkeypatch, model)
    model.train()
    torch.manual_seed(0)
    loss, sample_size, log = crit(model, batch)
    loss.backward()
    prev, incremental, logits = calls[-1]  # the loss pass: one teacher-forced forward
    assert not incremental and logits.grad is not None
    assert bool(prev[:, 0].eq(layout.bos).all()) and torch.equal(prev[:, 1:], target[:, :-1].masked_fill(
        target[:, 1:].eq(pad), pad))
    assert log["searnn_cells"] == sample_size == int(free.sum())
    assert float(logits.grad[:, 0].abs().max()) == 0.0
    assert float(logits.grad[:, 1:].abs().max()) > 0.0


@pytest.mark.parametrize("kind", ["langtok", "mbart"])
def test_searnn_ll_reference_hamming_is_mle_on_the_free_positions(toy_data, monkeypatch, kind):
    """Eq. 3, reference roll-in/out, Hamming on what the task outputs: a* is the
    ground truth at every cell, so loss, sample_size and gradients are the NLL
    of the free target positions teacher-forced from the start symbol (hand
    computation); the logged nll_loss is MLE's (every target position)."""
    _, task, model, crit = build_toy(toy_data, "--criterion", "searnn_kl", "--reward", "hamming",
                                     "--searnn-loss", "ll", *REFERENCE_SEARCH)
    make_layout, make_sample = LAYOUTS[kind]
    batch = make_sample(task, first_batch(task))
    layout = make_layout(task, batch)
    _use_layout(monkeypatch, crit, layout)
    got = _loss_and_grads(model, crit, batch)
    bos = int(layout.bos[0])
    loss, size, nll, grads = _hand_nll(model, batch, batch["target"], bos, free_from=layout.prefix_len)
    _assert_same(got, (loss, size, {"nll_loss": nll}, grads))
    assert got[2]["searnn_gt_best"] == got[2]["searnn_cells"] == size
    assert float(got[2]["searnn_rollin_cost"]) == 0.0


def test_searnn_mle_weight_teacher_forces_from_the_start_symbol(toy_data, monkeypatch):
    """--searnn-mle-weight 1 with reference roll-in: each sentence's mean token
    NLL (an MLE term: every target position, from the start symbol) counted
    once per scored cell, i.e. per free position."""
    _, task, model, crit = build_toy(toy_data, "--criterion", "searnn_kl", "--reward", "hamming",
                                     "--searnn-mle-weight", "1", *REFERENCE_SEARCH)
    batch = first_batch(task, n=8)
    layout = _langtok(task, batch)
    _use_layout(monkeypatch, crit, layout)
    pad, target = task.target_dictionary.pad(), batch["target"]
    loss, sample_size, _ = crit(model, batch)
    net = batch["net_input"]
    prev = torch.cat([layout.bos.unsqueeze(1), target[:, :-1]], dim=1).masked_fill(target.eq(pad), pad)
    with torch.no_grad():
        lprobs = model.get_normalized_probs(model(net["src_tokens"], net["src_lengths"], prev), log_probs=True)
    nll = (-lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)).masked_fill(target.eq(pad), 0.0).sum(dim=1)
    length = target.ne(pad).sum(dim=1)
    assert sample_size == int((length - 1).sum())
    torch.testing.assert_close(loss.detach(), ((length - 1) * nll / length).sum(), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------- interpolation


def test_interpolation_model_branch_keeps_the_forced_prefix(toy_data, monkeypatch):
    """λ = (1, 0, 0): every free token is the model's, the forced position is
    the prefix (z = REFERENCE there, not counted as a model token), the sampler
    starts from the start symbol, and the loss is the NLL of the constructed
    rows teacher-forced from it (forced positions are MLE positions)."""
    _, task, model, crit = build_toy(toy_data, "--criterion", "interpolation", "--interp-lambdas", "1,0,0",
                                     "--interp-anneal", "none")
    batch = first_batch(task)
    layout = _langtok(task, batch)
    _use_layout(monkeypatch, crit, layout)
    pad = task.target_dictionary.pad()
    calls = _record_decoder(monkeypatch, model)
    torch.manual_seed(0)
    tokens, z = crit.construct(model, batch, (1.0, 0.0, 0.0))
    assert torch.equal(calls[0][0][:, 0], layout.bos)  # the sampler's first step
    assert torch.equal(tokens[:, 0], batch["target"][:, 0])
    assert bool(z[:, 0].eq(REFERENCE).all())
    assert bool(z[:, 1:][tokens[:, 1:].ne(pad)].eq(MODEL).all())
    assert torch.equal(z.eq(0), tokens.eq(pad))

    built = []
    construct = crit.construct
    monkeypatch.setattr(crit, "construct", lambda m, s, lam: built.append(construct(m, s, lam)) or built[-1])
    got = _loss_and_grads(model, crit, batch, seed=1)
    rows = built[0][0]
    loss, size, nll, grads = _hand_nll(model, batch, rows, int(layout.bos[0]))
    _assert_same(got, (loss, size, {"nll_loss": nll}, grads))
    log = got[2]
    assert log["interp_reference_tokens"] == rows.size(0)
    assert log["interp_model_tokens"] == int(rows.ne(pad).sum()) - rows.size(0)


def test_interpolation_gains_and_validation_score_what_the_task_outputs(toy_data, monkeypatch):
    """ΔR (the reward branch) and the validation reward see rows without the
    forced prefix; at c → ∞ the reward branch still rebuilds the reference."""
    _, task, model, crit = build_toy(toy_data, "--criterion", "interpolation", "--interp-reward", "hamming")
    sample = _single_reference(first_batch(task), copies=2)
    layout = _langtok(task, sample)
    _use_layout(monkeypatch, crit, layout)
    viewed_refs = layout.view(references_of(sample))
    seen_refs = []
    gain_reward = crit.gain_reward

    def spy(hyp, refs):
        seen_refs.append(refs)
        return gain_reward(hyp, refs)

    torch.manual_seed(0)
    tokens, _ = construct_sequences(model, sample, (0.0, 1.0, 0.0), spy, 1e4, crit.banned_ids, 1.2, 10,
                                    layout=layout)
    assert torch.equal(tokens, sample["target"])
    allowed = {tuple(r.flatten().tolist()) for r in viewed_refs}
    assert seen_refs and all(tuple(r.flatten().tolist()) in allowed for refs in seen_refs for r in refs)

    # validation: the criterion decodes nothing itself; the task scores its own greedy
    # outputs (its inference_step: what it outputs) with the criterion's validation_reward
    valid = first_batch(task, "valid")
    scored = []
    monkeypatch.setattr(crit, "validation_reward", lambda hyp, refs: scored.append((hyp, refs)) or hyp.new_zeros(
        hyp.size(0)).float())
    crit.eval()
    with torch.no_grad():
        crit(model, valid)
        assert not scored
        task.valid_step(valid, model, crit)
        (hyp, refs), = scored
        assert torch.equal(hyp, task.greedy_outputs(model, valid)) and torch.equal(refs, references_of(valid))


def test_interpolation_mbart_rows_end_with_the_end_symbol(toy_data, monkeypatch):
    """mBART's layout: the reference branch through the sampler rebuilds the
    ``</s> E`` rows (``</s>`` does not end them), and with λ3 = 1 the loss is
    stock MLE on the batch (teacher-forced from E)."""
    _, task, model, stock = build_toy(toy_data, "--criterion", "label_smoothed_cross_entropy",
                                      "--label-smoothing", "0")
    _, _, _, crit = build_toy(toy_data, "--criterion", "interpolation", "--interp-lambdas", "0,0,1",
                              "--interp-anneal", "none")
    batch = _mbart_sample(task, first_batch(task))
    layout = _mbart(task, batch)
    _use_layout(monkeypatch, crit, layout)
    tokens, z = construct_sequences(model, batch, (0.0, 0.0, 1.0), crit.gain_reward, 1.0, crit.banned_ids, 1.2, 10,
                                    layout=layout)
    assert torch.equal(tokens, batch["target"])
    assert torch.equal(z, batch["target"].ne(task.target_dictionary.pad()).long() * REFERENCE)
    _assert_same(_loss_and_grads(model, crit, batch), _loss_and_grads(model, stock, batch))
