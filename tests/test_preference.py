"""preference: the three losses against hand computations, their β → 0 limits,
margins and pairs, π = π_ref at the start (DPO's log 2), π_ref frozen through
optimizer steps and checkpoints (a resumed run continues bit-identically), the
loss and gradient against a brute-force per-sentence loop, bad flags."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import build_toy, first_batch
from fairseq_seqlevel.criterions.preference import paired_rows, preference_loss, preference_pairs
from fairseq_seqlevel.decoding.mbr import first_occurrences
from fairseq_seqlevel.decoding.teacher_forcing import prev_output_tokens_from_target
from fairseq_seqlevel.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def _build(toy_data, *args, arch="lstm"):
    return build_toy(toy_data, "--criterion", "preference", *args, arch=arch)


def _loss_and_grads(model, crit, batch, seed=0):
    model.zero_grad()
    torch.manual_seed(seed)
    loss, size, log = crit(model, batch)
    loss.backward()
    return loss.detach(), size, log, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------ pure math

LOGP = torch.tensor([[-2.0, -3.0, -4.0]])
REF = torch.tensor([[-2.5, -2.5, -2.5]])
LENGTHS = torch.tensor([[2.0, 3.0, 4.0]])


def _best_worst():
    return preference_pairs(torch.tensor([[0.9, 0.5, 0.1]]), "best-worst", 0.0)


def test_losses_match_hand_computations():
    chosen, rejected, gap, valid = _best_worst()
    assert chosen.tolist() == [[0]] and rejected.tolist() == [[2]] and valid.all()
    torch.testing.assert_close(gap, torch.tensor([[0.8]]))
    # h = (−2 + 2.5) − (−4 + 2.5) = 2
    dpo, h = preference_loss(LOGP, chosen, rejected, valid, "dpo", 0.1, REF)
    assert h.tolist() == [[2.0]]
    assert float(dpo) == pytest.approx(math.log(1 + math.exp(-0.2)), rel=1e-6)
    ipo, _ = preference_loss(LOGP, chosen, rejected, valid, "ipo", 0.1, REF)
    assert float(ipo) == pytest.approx((2.0 - 1 / 0.2) ** 2, rel=1e-6)  # (h − 1/(2β))² = 9
    # CPO: no π_ref, h = log π(y_w) − log π(y_l) = 2, plus y_w's NLL per token (2 nats / 2 tokens)
    cpo, h = preference_loss(LOGP, chosen, rejected, valid, "cpo", 0.1, REF, token_nll=-LOGP / LENGTHS)
    assert h.tolist() == [[2.0]]
    assert float(cpo) == pytest.approx(math.log(1 + math.exp(-0.2)) + 1.0, rel=1e-6)


def _grad(loss_name, beta, chosen, rejected, valid):
    logp = LOGP.clone().requires_grad_()
    loss, _ = preference_loss(logp, chosen, rejected, valid, loss_name, beta, REF, token_nll=-logp / LENGTHS)
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    return grad


def test_beta_to_zero_limits():
    chosen, rejected, _, valid = _best_worst()
    grad_h = torch.tensor([[1.0, 0.0, -1.0]])  # ∂h/∂log π
    beta = 1e-5
    # DPO: ∇ = −β·σ(−β·h)·∇h → −β/2·∇h
    torch.testing.assert_close(_grad("dpo", beta, chosen, rejected, valid) / beta, -0.5 * grad_h, rtol=1e-4, atol=1e-6)
    # IPO: ∇ = 2·(h − 1/(2β))·∇h, so β·∇ → −∇h
    torch.testing.assert_close(_grad("ipo", beta, chosen, rejected, valid) * beta, -grad_h, rtol=1e-4, atol=1e-4)
    # and at any β, exactly its formula (h = 2)
    torch.testing.assert_close(_grad("ipo", 0.1, chosen, rejected, valid), 2 * (2.0 - 5.0) * grad_h)


@pytest.mark.parametrize("loss_name", ["dpo", "ipo", "cpo"])
def test_identical_chosen_and_rejected_give_zero_preference_gradient(loss_name):
    same = torch.tensor([[1]])
    grad = _grad(loss_name, 0.1, same, same, torch.tensor([[True]]))
    if loss_name == "cpo":  # what is left is the NLL term of y_w, −1/|y_w| on it
        torch.testing.assert_close(grad, torch.tensor([[0.0, -1 / 3, 0.0]]))
    else:
        assert grad.abs().max() == 0


def test_margin_and_pairs():
    u = torch.tensor([[0.5, 0.2, 0.5, 0.1], [0.3, 0.3, 0.3, 0.3]])
    chosen, rejected, gap, valid = preference_pairs(u, "best-worst", 0.0)
    assert chosen.tolist() == [[0], [0]] and rejected.tolist() == [[3], [0]] and valid.tolist() == [[True], [False]]
    assert preference_pairs(u, "best-worst", 0.4)[3].tolist() == [[False], [False]]  # 0.4 is not > 0.4
    candidates = torch.tensor([[[4, 2], [5, 2], [4, 2], [6, 2]], [[4, 2]] * 4])
    distinct = first_occurrences(candidates, torch.ones(candidates.shape[:2], dtype=torch.bool))
    assert distinct.tolist() == [[True, True, False, True], [True, False, False, False]]
    chosen, rejected, gap, valid = preference_pairs(u, "all", 0.15, distinct)
    got = {(int(c), int(r)) for c, r in zip(chosen[0][valid[0]], rejected[0][valid[0]])}
    assert got == {(0, 3), (0, 1)}  # (2, ·) is a duplicate of 0; 0.2 − 0.1 is not > 0.15
    assert not valid[1].any()
    # no pair: loss 0 (not nan), zero gradient
    logp = LOGP.repeat(2, 2)[:, :4].clone().requires_grad_()
    loss, _ = preference_loss(logp, chosen, rejected, torch.zeros_like(valid), "dpo", 0.1, torch.zeros_like(logp))
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    assert loss.tolist() == [0.0, 0.0] and grad.abs().max() == 0


def test_paired_rows():
    u = torch.tensor([[0.5, 0.2, 0.5, 0.1], [0.3, 0.3, 0.3, 0.3], [0.1, 0.4, 0.2, 0.3]])
    chosen, rejected, _, valid = preference_pairs(u, "best-worst", 0.0)
    assert paired_rows(chosen, rejected, valid, 4).tolist() == [[True, False, False, True], [False] * 4,
                                                                 [True, True, False, False]]
    distinct = torch.tensor([[True, True, False, True], [True] * 4, [True] * 4])
    chosen, rejected, _, valid = preference_pairs(u, "all", 0.15, distinct)
    assert paired_rows(chosen, rejected, valid, 4).tolist() == [[True, True, False, True], [False] * 4,
                                                                 [True] * 4]  # (1, 0), (1, 2), (3, 0)


# ------------------------------------------------------------------ the criterion


def test_dpo_starts_at_log_2(toy_data):
    """π = π_ref at the first step: every pair's h is exactly 0, DPO's loss log 2 per paired source."""
    _, task, model, crit = _build(toy_data, "--preference-candidates", "4", "--sentence-avg")
    batch = first_batch(task)
    loss, size, log, grads = _loss_and_grads(model, crit, batch)
    paired = log["preference_paired_sources"]
    assert paired > 0 and float(log["preference_logratio_sum"]) == 0.0 and float(log["preference_accuracy_sum"]) == 0
    assert float(loss) == pytest.approx(paired * math.log(2), rel=1e-6)
    assert any(float(g.abs().max()) > 0 for g in grads.values())
    # the criterion holds π_ref as buffers only: no parameters, nothing in its state_dict
    assert not list(crit.parameters()) and not crit.state_dict()
    for name, p in model.named_parameters():
        assert torch.equal(crit.reference_weights()[name], p.detach().float())


def test_no_pair_gives_zero_loss_and_finite_gradient(toy_data):
    _, task, model, crit = _build(toy_data, "--preference-candidates", "3")
    batch = first_batch(task, n=6)
    crit.candidates = lambda model, sample: sample["target"].repeat_interleave(3, dim=0)  # all equal
    loss, _, log, grads = _loss_and_grads(model, crit, batch)
    assert float(loss) == 0.0 and log["preference_pairs"] == 0 and log["preference_paired_sources"] == 0
    assert grads and all(torch.isfinite(g).all() and float(g.abs().max()) == 0 for g in grads.values())


def test_mbr_rank_is_reference_free(toy_data):
    _, task, model, crit = _build(toy_data, "--preference-candidates", "4", "--preference-rank", "mbr")
    batch = first_batch(task, n=5)
    crit.output_layout(model, batch)
    torch.manual_seed(0)
    found = crit.candidates(model, batch)
    got = crit.utilities(found, batch)
    rows = found.view(5, 4, -1)
    for b in range(5):
        for j in range(4):
            every = [float(crit.reward(rows[b, j:j + 1], rows[b, k:k + 1].unsqueeze(1))[0])
                     for k in range(4)]  # itself included, as MBR decoding (and mbrs) count it
            assert float(got[b, j]) == pytest.approx(sum(every) / 4, abs=1e-6)
    shuffled = dict(batch, references=batch["references"].flip(0), target=batch["target"].flip(0))
    assert torch.equal(crit.utilities(found, shuffled), got)


def _candidates(target, pad, eos, words):
    """Per source: y*, y* without its first token, y* reversed, a fixed pair of words, and y*
    again (a duplicate), each + eos; right-padded."""
    out = []
    for row in target:
        seq = row[row.ne(pad)].tolist()[:-1]
        for cand in (seq, seq[1:] or seq, seq[::-1], words, seq):
            out.append(cand + [eos])
    width = max(len(s) for s in out)
    return torch.tensor([s + [pad] * (width - len(s)) for s in out])


def _sequence_logp(model, x, x_len, tokens, pad, eos):
    net_output = model(x, x_len, prev_output_tokens_from_target(tokens, pad, eos))
    return model.get_normalized_probs(net_output, log_probs=True)[0].gather(-1, tokens[0].unsqueeze(-1)).sum()


def _brute_force(model, ref_model, batch, rows, n, reward, cfg, pad, eos):
    """One forward per (source, candidate), Python loops over sources and pairs, autograd."""
    src, src_len, target, refs = (batch["net_input"]["src_tokens"], batch["net_input"]["src_lengths"],
                                  batch["target"], batch["references"])
    loss_name, beta, w, margin = cfg.preference_loss, cfg.preference_beta, cfg.preference_mle_weight, \
        cfg.preference_margin
    total = 0.0
    for b in range(target.size(0)):
        x = src[b][src[b].ne(pad)].unsqueeze(0)
        seqs = [r[r.ne(pad)].tolist() for r in rows[b * n:(b + 1) * n]]
        tokens = [torch.tensor([s]) for s in seqs]
        if cfg.preference_rank == "mbr":
            u = [sum(float(reward(tokens[j], tokens[k].unsqueeze(1))[0]) for k in range(n)) / n  # itself too
                 for j in range(n)]
        else:
            u = [float(reward(t, refs[b:b + 1])[0]) for t in tokens]
        if cfg.preference_pairs == "best-worst":
            best, worst = u.index(max(u)), u.index(min(u))
            pairs = [(best, worst)] if u[best] - u[worst] > margin else []
        else:
            first = [j for j in range(n) if seqs[j] not in seqs[:j]]
            pairs = [(j, k) for j in first for k in first if j != k and u[j] - u[k] > margin]
        logp = [_sequence_logp(model, x, src_len[b:b + 1], t, pad, eos) for t in tokens]
        with torch.no_grad():
            ref = [_sequence_logp(ref_model, x, src_len[b:b + 1], t, pad, eos) for t in tokens]
        losses = []
        for j, k in pairs:
            if loss_name == "cpo":
                h = logp[j] - logp[k]
                losses.append(-F.logsigmoid(beta * h) - logp[j] / len(seqs[j]))
            else:
                h = (logp[j] - ref[j]) - (logp[k] - ref[k])
                losses.append((h - 1 / (2 * beta)) ** 2 if loss_name == "ipo" else -F.logsigmoid(beta * h))
        ref_len = int(target[b].ne(pad).sum())
        source = sum(losses) / len(losses) if losses else 0.0
        y = target[b:b + 1, :ref_len]
        total = total + (1 - w) * ref_len * source - w * _sequence_logp(model, x, src_len[b:b + 1], y, pad, eos)
    return total


@pytest.mark.parametrize("arch,flags", [
    ("lstm", []),
    ("lstm", ["--preference-loss", "ipo", "--preference-pairs", "all", "--preference-margin", "0.05",
              "--preference-mle-weight", "0.3"]),
    ("transformer", ["--preference-loss", "cpo", "--preference-pairs", "all"]),
    ("lstm", ["--preference-rank", "mbr", "--preference-beta", "0.5"]),
])
def test_loss_and_gradient_equal_brute_force(toy_data, arch, flags):
    _, task, model, crit = _build(toy_data, *flags, arch=arch)
    batch = first_batch(task, n=6)
    d = task.target_dictionary
    pad, eos = d.pad(), d.eos()
    rows = _candidates(batch["target"], pad, eos, [d.index("w1"), d.index("w2")])
    n = 5
    crit.cfg.preference_candidates = n
    crit.candidates = lambda model, sample: rows
    ref_model = copy.deepcopy(model).eval()
    crit.ensure_reference(model)  # π_ref: the weights now; then π moves away from it
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    got = _loss_and_grads(model, crit, batch)
    assert got[2]["preference_pairs"] > 0
    model.zero_grad()
    expected = _brute_force(model, ref_model, batch, rows, n, crit.reward, crit.cfg, pad, eos)
    expected.backward()
    torch.testing.assert_close(got[0], expected.detach(), rtol=1e-5, atol=1e-5)
    scale = max(float(p.grad.abs().max()) for p in model.parameters() if p.grad is not None)
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[3][name], p.grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


def _moved_from_reference(toy_data, flags, arch="lstm"):
    """A criterion on :func:`_candidates` (n = 5, a duplicate), π_ref the weights at build,
    π moved away from it; (model, crit, batch, ref_model, n)."""
    _, task, model, crit = _build(toy_data, *flags, arch=arch)
    batch = first_batch(task, n=6)
    d = task.target_dictionary
    rows = _candidates(batch["target"], d.pad(), d.eos(), [d.index("w1"), d.index("w2")])
    crit.cfg.preference_candidates = 5
    crit.candidates = lambda model, sample: rows
    ref_model = copy.deepcopy(model).eval()
    crit.ensure_reference(model)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model, crit, batch, ref_model, 5


@pytest.mark.parametrize("arch,flags", [
    ("lstm", []),
    ("lstm", ["--preference-pairs", "all", "--preference-mle-weight", "0.3"]),
    ("lstm", ["--preference-loss", "cpo"]),
    ("transformer", ["--preference-loss", "cpo", "--preference-pairs", "all"]),
])
def test_scoring_only_paired_rows_changes_nothing(toy_data, arch, flags, monkeypatch):
    """Only y* and the candidates of a valid pair are scored (by π and π_ref): the loss,
    every gradient and the logged values equal those of scoring every row."""
    from fairseq_seqlevel.criterions import preference
    from fairseq_seqlevel.decoding import teacher_forcing

    model, crit, batch, _, n = _moved_from_reference(toy_data, flags, arch=arch)
    kept = []
    rows_objective = teacher_forcing.rows_objective

    def counting(*args, keep=None, **kwargs):
        kept.append(int(keep.sum()))
        return rows_objective(*args, keep=keep, **kwargs)

    monkeypatch.setattr(preference, "rows_objective", counting)
    got = _loss_and_grads(model, crit, batch)
    b = batch["target"].size(0)
    assert 0 < kept[-1] - b < b * n  # y* and some candidates, not all
    assert len(kept) == (2 if crit.uses_reference_model else 1) and kept[0] == kept[-1]
    monkeypatch.setattr(preference, "paired_rows",
                        lambda chosen, rejected, valid, n: torch.ones(valid.size(0), n, dtype=torch.bool))
    want = _loss_and_grads(model, crit, batch)
    assert kept[-1] == b * (n + 1)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    assert got[3].keys() == want[3].keys()
    for name in want[3]:
        torch.testing.assert_close(got[3][name], want[3][name], rtol=1e-6, atol=1e-6, msg=name)
    for key in ("nll_loss", "preference_pairs", "preference_logratio_sum", "preference_accuracy_sum"):
        torch.testing.assert_close(torch.as_tensor(got[2][key]).float(), torch.as_tensor(want[2][key]).float(),
                                   rtol=1e-6, atol=1e-6, msg=key)


@pytest.mark.parametrize("flags", [["--preference-mle-weight", "0.3"],
                                   ["--preference-loss", "cpo", "--preference-pairs", "all",
                                    "--preference-mle-weight", "0.3"]])
def test_no_pair_skips_reference_and_leaves_the_mle_mix(toy_data, flags, monkeypatch):
    """All candidates identical: no pair, no π_ref pass, y* alone scored; the loss and
    gradient are those of w·NLL(y*)."""
    from fairseq_seqlevel.criterions import preference

    model, crit, batch, _, n = _moved_from_reference(toy_data, flags)
    crit.candidates = lambda model, sample: sample["target"].repeat_interleave(n, dim=0)

    def no_reference_pass(*args, **kwargs):
        raise AssertionError("π_ref scored without a pair")

    monkeypatch.setattr(preference, "functional_call", no_reference_pass)
    loss, _, log, grads = _loss_and_grads(model, crit, batch)
    assert log["preference_pairs"] == 0 and torch.isfinite(loss)
    model.zero_grad()
    d = crit.task.target_dictionary
    pad, eos, src, src_len, target = (d.pad(), d.eos(), batch["net_input"]["src_tokens"],
                                      batch["net_input"]["src_lengths"], batch["target"])
    expected = -0.3 * sum(_sequence_logp(model, src[b][src[b].ne(pad)].unsqueeze(0), src_len[b:b + 1],
                                         target[b:b + 1, :int(target[b].ne(pad).sum())], pad, eos)
                          for b in range(target.size(0)))
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_beam_candidates_train(toy_data):
    from conftest import mle_steps

    _, task, model, crit = _build(toy_data, "--preference-search", "beam", "--preference-candidates", "3",
                                  "--preference-loss", "ipo")
    mle_steps(task, model, 20)  # a model whose beam n-best differ
    loss, _, log, grads = _loss_and_grads(model, crit, first_batch(task))
    assert torch.isfinite(loss) and log["preference_pairs"] > 0
    assert all(torch.isfinite(g).all() for g in grads.values())


# ------------------------------------------------------------------ π_ref through training and checkpoints


def _trainer(toy_data, *flags):
    from fairseq.trainer import Trainer

    cfg, task, model, crit = _build(toy_data, "--preference-candidates", "3", "--optimizer", "adam", "--lr", "0.01",
                                    *flags)
    return Trainer(cfg, task, model, crit), task


def _weights(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _step(trainer, batch):
    log = trainer.train_step([batch])
    return float(log["loss"])


def test_reference_is_frozen_and_resume_is_bit_identical(toy_data, tmp_path):
    from fairseq.logging import metrics

    metrics.reset()
    straight, task = _trainer(toy_data)
    start = {n: p.detach().clone() for n, p in straight.get_model().named_parameters()}
    task.load_dataset("train")
    ds = task.dataset("train")
    batches = [ds.collater([ds[i] for i in range(j, j + 12)]) for j in range(0, 36, 12)]
    with metrics.aggregate("train"):
        want_losses = [_step(straight, b) for b in batches]
    crit = straight.get_criterion()
    # π_ref: the starting weights, unchanged by three optimizer steps that moved the model
    optimized = {id(p) for group in straight.optimizer.optimizer.param_groups for p in group["params"]}
    for name, p in straight.get_model().named_parameters():
        assert torch.equal(crit.reference_weights()[name], start[name]), name
        assert id(crit.reference_weights()[name]) not in optimized
    assert any(not torch.equal(p, start[n]) for n, p in straight.get_model().named_parameters())
    want = _weights(straight.get_model())

    metrics.reset()
    first, _ = _trainer(toy_data)
    with metrics.aggregate("train"):
        first_losses = [_step(first, b) for b in batches[:2]]
    first.consolidate_optimizer()
    path = str(tmp_path / "checkpoint.pt")
    first.save_checkpoint(path, {"train_iterator": {"epoch": 1}})
    metrics.reset()
    resumed, _ = _trainer(toy_data)
    resumed.load_checkpoint(path)
    ref = resumed.get_criterion().reference_weights()
    assert ref is not None and all(torch.equal(ref[n], start[n]) and ref[n].dtype == torch.float32 for n in start)
    with metrics.aggregate("train"):
        resumed_losses = [_step(resumed, b) for b in batches[2:]]
    assert first_losses + resumed_losses == want_losses
    got = _weights(resumed.get_model())
    assert got.keys() == want.keys() and all(torch.equal(want[k], got[k]) for k in want)

    # fine-tuning from that checkpoint (--finetune-from-model resets the meters): π_ref is
    # the loaded model, taken at the first step, not the checkpoint's π_ref
    metrics.reset()
    tuned, _ = _trainer(toy_data)
    tuned.load_checkpoint(path, reset_optimizer=True, reset_lr_scheduler=True, reset_meters=True)
    assert tuned.get_criterion().reference_weights() is None
    loaded = {n: p.detach().clone() for n, p in tuned.get_model().named_parameters()}
    with metrics.aggregate("train"):
        _step(tuned, batches[2])
    ref = tuned.get_criterion().reference_weights()
    assert all(torch.equal(ref[n], loaded[n]) for n in loaded) and not all(torch.equal(ref[n], start[n]) for n in start)
    metrics.reset()


@pytest.mark.parametrize("flags, message", [
    (["--preference-candidates", "1"], "--preference-candidates"),
    (["--preference-beta", "0"], "--preference-beta"),
    (["--preference-beta", "nan"], "--preference-beta"),
    (["--preference-margin", "-0.1"], "--preference-margin"),
    (["--preference-mle-weight", "1"], "--preference-mle-weight"),
])
def test_bad_flags_name_the_flag(toy_data, flags, message):
    with pytest.raises(ConfigError, match=message):
        _build(toy_data, *flags)
