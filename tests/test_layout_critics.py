"""erac and vaml in a task's output layout (decoding/layout.py) that is not
fairseq's plain one, built by hand on the toy task: the target's first token
plays a forced target-language token (P = 1, as translation_multi_simple_epoch
forces ``__tgt__``), the decoder starts from another symbol (mBART's
``[lang]``), or a row ends with a symbol other than eos (mBART's generator).

* rows start with the forced prefix, decoder and critic inputs with the
  start symbol, rows end with the layout's end symbol;
* the forced position is not the model's choice: perturbing the model's and
  the critic's outputs at position 0 changes neither the loss nor any
  gradient (and does, in the plain layout: the test has teeth);
* hand computations: erac's sampled-return target (rewards of what the task
  shows, the forced position's reward credited to the first choice, |y*| in
  words), vaml's α = 0 actor on the reference is MLE without the forced token.

With the plain layout the criterions are unchanged: tests/test_erac.py,
tests/test_vaml.py and tests/test_critics.py, unmodified, cover it.
"""

import pytest
import torch

from conftest import build_toy, first_batch, mle_steps
from fairseq_seqlevel.decoding import sampler as sampler_module
from fairseq_seqlevel.decoding.layout import OutputLayout
from fairseq_seqlevel.rewards.output_view import OutputView, ViewedReward

pytestmark = pytest.mark.usefixtures("one_thread")

CRITIC = ["--critic-embed-dim", "8", "--critic-hidden-size", "8"]


def _build(toy_data, criterion, *args):
    return build_toy(toy_data, "--criterion", criterion, *CRITIC, *args)


def force_layout(crit, bos=None, end=None):
    """Make ``crit`` see a task whose layout forces each target's first token
    (P = 1), starts the decoder with ``bos`` and ends rows with ``end`` (both
    default the dictionary's eos); its reward scores the view, as
    ``SeqlevelCriterion.output_layout`` sets up on a real task's first batch."""
    dictionary = crit.task.target_dictionary
    eos, pad = dictionary.eos(), dictionary.pad()
    bos = eos if bos is None else bos
    end = eos if end is None else end
    view = OutputView(1, {end}, (), eos, pad)
    crit.reward = ViewedReward(crit.reward, view)

    def output_layout(model, sample):
        target = sample["target"]
        return OutputLayout(torch.full((target.size(0),), bos, dtype=torch.long), target[:, :1].clone(), end, view)

    crit.output_layout = output_layout
    return view


def plain_again(crit):
    """Undo :func:`force_layout`: the toy task's own (plain) layout."""
    del crit.output_layout
    crit.reward = crit.reward.inner


class Recorder:
    """Pre-hooks recording the first argument(s) a module is called with."""

    def __init__(self, module, keep=1):
        self.calls = []
        self.handle = module.register_forward_pre_hook(lambda m, args: self.calls.append(args[:keep]))

    def remove(self):
        self.handle.remove()


class PerturbFirstStep:
    """Forward hooks adding fixed noise to the outputs at position 0 (every
    vocabulary entry) of the model's decoder (its logits, in teacher-forced
    passes) and of the critic (Q of the first state)."""

    def __init__(self, model, critic, scale=3.0):
        self.handles = [model.decoder.register_forward_hook(self._hook(lambda out: out[0], scale, 1)),
                        critic.register_forward_hook(self._hook(lambda out: out, scale, 2))]

    @staticmethod
    def _hook(get, scale, seed):
        def hook(module, args, out):
            x = get(out)
            noise = torch.zeros_like(x)
            g = torch.Generator().manual_seed(seed)
            noise[:, 0] = scale * torch.randn(x.size(0), x.size(2), generator=g).to(x.dtype)
            return x + noise if torch.is_tensor(out) else (x + noise, *out[1:])
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _loss_and_grads(model, crit, sample, seed=0):
    model.zero_grad()
    crit.zero_grad()
    torch.manual_seed(seed)
    loss, sample_size, log = crit(model, sample)
    loss.backward()
    grads = {f"model.{n}": p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    grads.update({f"critic.{n}": p.grad.clone() for n, p in crit.critic.named_parameters() if p.grad is not None})
    return loss.detach(), sample_size, grads


def _plain_and_perturbed(model, crit, sample):
    """(loss, sample size, gradients) as they are, and with the outputs at position 0 perturbed."""
    want = _loss_and_grads(model, crit, sample)
    perturb = PerturbFirstStep(model, crit.critic)
    try:
        return want, _loss_and_grads(model, crit, sample)
    finally:
        perturb.remove()


def _assert_unperturbed(model, crit, sample):
    """Loss, sample size and every gradient are the same with the outputs at
    position 0 perturbed."""
    want, got = _plain_and_perturbed(model, crit, sample)
    assert got[1] == want[1]
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    assert got[2].keys() == want[2].keys() and any(k.startswith("critic.") for k in want[2])
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], rtol=0, atol=0, msg=name)


def _moves_in_plain_layout(model, crit, sample):
    plain_again(crit)
    want, got = _plain_and_perturbed(model, crit, sample)
    return not torch.allclose(got[0], want[0])


# ---- erac ------------------------------------------------------------------


def frozen_trajectories(crit, model, sample):
    """erac's sampled trajectories of ``sample`` (seed 0), then fixed: later calls return them."""
    torch.manual_seed(0)
    with torch.no_grad():
        tokens = crit.trajectories(model, sample)
    crit.trajectories = lambda m, smp: tokens
    return tokens

def test_erac_rows_and_inputs_follow_the_layout(toy_data, monkeypatch):
    """(a) trajectories start with the forced token; the sampler, the teacher-forced
    passes and the critic start from the layout's start symbol; the token count is
    of the positions after the prefix."""
    s = 2
    _, task, model, crit = _build(toy_data, "erac", "--erac-phase", "joint", "--erac-samples", str(s))
    crit.critic_batches.fill_(1)
    mle_steps(task, model, 20)
    dictionary = task.target_dictionary
    bos, pad = dictionary.bos(), dictionary.pad()
    force_layout(crit, bos=bos)
    sample = first_batch(task, n=8)
    target = sample["target"]

    trajectories, sampler_inputs = [], []
    trajectories_of = crit.trajectories
    crit.trajectories = lambda m, smp: trajectories.append(trajectories_of(m, smp)) or trajectories[-1]
    step = sampler_module.decoder_step

    def recording_step(m, tokens, *args):
        sampler_inputs.append(tokens[:, 0].clone())
        return step(m, tokens, *args)

    monkeypatch.setattr(sampler_module, "decoder_step", recording_step)
    decoder_inputs, critic_inputs = Recorder(model.decoder), Recorder(crit.critic, keep=2)
    loss, sample_size, log = crit(model, sample)
    decoder_inputs.remove()
    critic_inputs.remove()
    loss.backward()

    (tokens,) = trajectories
    assert torch.equal(tokens[:, 0], target[:, 0].repeat_interleave(s))
    assert bool(tokens[:, 1:].ne(pad).any(dim=1).all())  # each has a chosen part after the prefix
    assert sampler_inputs and all(bool(x.eq(bos).all()) for x in sampler_inputs)
    assert decoder_inputs.calls and all(bool(prev[:, 0].eq(bos).all()) for (prev,) in decoder_inputs.calls)
    assert critic_inputs.calls
    for refs, prev in critic_inputs.calls:
        assert bool(prev[:, 0].eq(bos).all()) and torch.equal(refs[:, 0], target[:, 0].repeat_interleave(s))
        assert torch.equal(prev[:, 1], tokens[:, 0])  # the forced token is the second input
    assert log["erac_ntokens"] == sample_size == int(tokens.ne(pad).sum()) - tokens.size(0)
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("flags", [
    ["--erac-phase", "critic"],
    ["--erac-phase", "critic", "--erac-td-lambda", "0.5"],
    ["--erac-phase", "joint", "--erac-mle-weight", "0", "--erac-continuations", "2"],
], ids=["critic", "critic-lambda", "joint-continuations"])
def test_erac_ignores_the_forced_position(toy_data, flags):
    """(b) the model's distribution and the critic's values at the forced position
    enter neither the loss nor a gradient (the reference NLL, which MLE trains
    on every target token, is weighted 0 here)."""
    s = 2
    _, task, model, crit = _build(toy_data, "erac", "--erac-samples", str(s), *flags)
    crit.critic_batches.fill_(1)
    mle_steps(task, model, 20)
    force_layout(crit)
    sample = first_batch(task, n=8)
    tokens = frozen_trajectories(crit, model, sample)
    assert torch.equal(tokens[:, 0], sample["target"][:, 0].repeat_interleave(s))
    _assert_unperturbed(model, crit, sample)
    assert _moves_in_plain_layout(model, crit, sample)


@pytest.mark.parametrize("reward", ["bleu", "edit"])  # R(no words): 0 and -1
def test_erac_sampled_return_by_hand(toy_data, reward):
    """--erac-td-lambda 1 at τ = 0 (critic phase, no variance term): the loss is
    Σ_{t ≥ 1} (Q(ŷ_<t, ŷ_t) − |y*|·(R(w) − R(w_<t−1)))² over the positions after the
    forced token, w the row's words (no forced token, no eos), R of the empty
    words taken as 0 (the first choice earns all of R(w)), R scoring the
    references without their first token, |y*| the reference's words, the
    critic reading the decoder input [bos, ŷ_0, ŷ_1, ...] (as without a prefix,
    where the first step's reward is R(ŷ_0) − 0)."""
    s = 2
    _, task, model, crit = _build(toy_data, "erac", "--erac-reward", reward, "--erac-samples", str(s),
                                  "--erac-td-lambda", "1",
                                  "--erac-tau", "0", "--erac-var-weight", "0")
    mle_steps(task, model, 20)
    dictionary = task.target_dictionary
    bos, pad, eos = dictionary.bos(), dictionary.pad(), dictionary.eos()
    force_layout(crit, bos=bos)
    sample = first_batch(task, n=6)
    tokens = frozen_trajectories(crit, model, sample)
    loss = crit(model, sample)[0].detach()

    inner = crit.reward.inner
    target = sample["target"].repeat_interleave(s, 0)
    refs = sample["references"].repeat_interleave(s, 0)
    width = max(tokens.size(1), target.size(1))
    rows = torch.nn.functional.pad(tokens, (0, width - tokens.size(1)), value=pad)
    prev = torch.cat([rows.new_full((rows.size(0), 1), bos), rows[:, :-1]], dim=1).masked_fill(rows.eq(pad), pad)
    with torch.no_grad():
        q = crit.critic(target, prev)
    want = torch.zeros(())
    for i in range(rows.size(0)):
        row = rows[i][rows[i].ne(pad)].tolist()
        assert row[0] == int(target[i, 0]) and row[-1] == eos
        words = row[1:-1]
        ref_words = torch.stack([torch.nn.functional.pad(r[1:], (0, 1), value=pad) for r in refs[i]])
        scale = max(int(target[i].ne(pad).sum()) - 2, 1)

        def reward(prefix):
            return float(inner(torch.tensor([prefix + [eos]]), ref_words.unsqueeze(0)))

        whole = reward(words)
        for t in range(1, len(row)):
            before = reward(words[:t - 1]) if t > 1 else 0.0
            want = want + (q[i, t, row[t]] - scale * (whole - before)) ** 2
    assert float(want) > 0
    torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-4)


def test_erac_ends_rows_with_the_layouts_end_symbol(toy_data):
    """An end symbol other than eos (mBART's generator ends with [lang]; here <s>):
    trajectories end with it, the continuations end with it and never continue
    with it (eos is a word there), eos_preferred reads its value."""
    s = 2
    _, task, model, crit = _build(toy_data, "erac", "--erac-samples", str(s), "--erac-continuations", "100",
                                  "--erac-phase", "joint")
    crit.critic_batches.fill_(1)
    mle_steps(task, model, 20)
    dictionary = task.target_dictionary
    end, pad, eos = dictionary.bos(), dictionary.pad(), dictionary.eos()
    force_layout(crit, end=end)
    sample = first_batch(task, n=6)
    tokens = frozen_trajectories(crit, model, sample)
    rewarded = []
    prefix_of = crit.reward.prefix
    crit.reward.prefix = lambda hyp, refs: rewarded.append(hyp) or prefix_of(hyp, refs)
    _, _, log = crit(model, sample)

    lengths = tokens.ne(pad).sum(dim=1)
    ends = lengths - 1
    at = torch.arange(tokens.size(0))
    assert bool(tokens[at, ends].eq(end).all()) and int(tokens.eq(end).sum()) == tokens.size(0)
    assert torch.equal(tokens[:, 0], sample["target"][:, 0].repeat_interleave(s))
    trajectory_rows, continuation_rows = rewarded
    assert torch.equal(trajectory_rows[:, :tokens.size(1)], tokens)
    k = len(dictionary) - 2
    assert continuation_rows.size(0) == tokens.size(0) * k
    stop, ends_k = continuation_rows.ne(pad).sum(dim=1) - 1, ends.repeat_interleave(k)
    assert torch.equal(stop, ends_k + 1)
    rows_at = torch.arange(continuation_rows.size(0))
    assert bool(continuation_rows[rows_at, stop].eq(end).all())
    candidates = continuation_rows[rows_at, ends_k].view(-1, k)
    assert not bool(candidates.eq(end).any()) and not bool(candidates.eq(pad).any())
    assert bool(candidates.eq(eos).any(dim=1).all())  # eos is a word before mBART's [lang]

    # eos_preferred: at each trajectory's end, Q of the end symbol >= E_π Q
    width = max(tokens.size(1), sample["target"].size(1))
    rows = torch.nn.functional.pad(tokens, (0, width - tokens.size(1)), value=pad)
    prev = torch.cat([rows.new_full((rows.size(0), 1), eos), rows[:, :-1]], dim=1).masked_fill(rows.eq(pad), pad)
    net = sample["net_input"]
    with torch.no_grad():
        lprobs = model.get_normalized_probs(model(net["src_tokens"].repeat_interleave(s, 0),
                                                  net["src_lengths"].repeat_interleave(s, 0), prev), log_probs=True)
        q = crit.critic(sample["target"].repeat_interleave(s, 0), prev)
    q_end, p_end = q[at, ends].float(), lprobs[at, ends].float().exp()
    margin = q_end[:, end] - (p_end * q_end).sum(dim=-1)
    assert float(margin.abs().min()) > 1e-4  # no near tie: the comparison below is not float noise
    assert int(log["erac_eos_preferred_sum"]) == int(margin.ge(0).sum())
    assert int(margin.ge(0).sum()) != int((q_end[:, eos] >= (p_end * q_end).sum(dim=-1)).sum())


# ---- vaml ------------------------------------------------------------------

@pytest.mark.parametrize("phase", ["q", "actor"])
def test_vaml_rows_and_inputs_follow_the_layout(toy_data, phase, monkeypatch):
    """(a) every row (the reference and its Hamming samples) starts with the forced
    token, samples perturb only what follows it, decoder and critic inputs start
    from the layout's start symbol; token counts are of the positions after it."""
    from fairseq_seqlevel.criterions import vaml as vaml_module

    L = 3
    _, task, model, crit = _build(toy_data, "vaml", "--vaml-samples", str(L), "--vaml-sample-temperature", "0.5",
                                  "--vaml-phase", phase, "--vaml-actor-reference")
    crit.q_batches.fill_(1)
    dictionary = task.target_dictionary
    bos, pad = dictionary.bos(), dictionary.pad()
    force_layout(crit, bos=bos)
    sample = first_batch(task)
    target = sample["target"]
    teacher_forced = []
    prev_of = vaml_module.prev_output_tokens_from_target

    def recording_prev(rows, *args):
        teacher_forced.append(rows.clone())
        return prev_of(rows, *args)

    monkeypatch.setattr(vaml_module, "prev_output_tokens_from_target", recording_prev)
    decoder_inputs, critic_inputs = Recorder(model.decoder), Recorder(crit.critic, keep=2)
    torch.manual_seed(0)
    loss, sample_size, log = crit(model, sample)
    decoder_inputs.remove()
    critic_inputs.remove()
    loss.backward()
    assert torch.isfinite(loss)

    (rows,) = teacher_forced
    (refs, prev), = critic_inputs.calls
    assert bool(prev[:, 0].eq(bos).all()) and torch.equal(prev[:, 1], rows[:, 0])
    assert torch.equal(refs, target.repeat_interleave(L + 1, dim=0))
    width = target.size(1)
    assert rows.size(1) == width
    grouped = rows.view(target.size(0), L + 1, width)
    assert torch.equal(grouped[:, 0], target)  # the reference row
    samples, reference = grouped[:, 1:], target.unsqueeze(1).expand(-1, L, -1)
    assert torch.equal(samples[:, :, 0], reference[:, :, 0])  # the forced token kept ...
    assert bool(samples.ne(reference).any())  # ... the rest perturbed,
    assert torch.equal(samples.eq(pad), reference.eq(pad))  # each length kept
    assert log["vaml_ntokens"] == int(rows.ne(pad).sum()) - rows.size(0)
    if phase == "q":
        assert sample_size == log["vaml_ntokens"] and not decoder_inputs.calls
    else:
        assert sample_size == sample["ntokens"] - target.size(0)
        assert decoder_inputs.calls and all(bool(p[:, 0].eq(bos).all()) for (p,) in decoder_inputs.calls)


@pytest.mark.parametrize("flags", [["--vaml-phase", "q"], ["--vaml-phase", "actor", "--vaml-alpha", "0.5"]],
                         ids=["q", "actor"])
def test_vaml_ignores_the_forced_position(toy_data, flags):
    """(b) the critic's values and the model's distribution at the forced position
    enter neither the loss nor a gradient."""
    _, task, model, crit = _build(toy_data, "vaml", "--vaml-samples", "2", "--vaml-sample-temperature", "0.5",
                                  *flags)
    crit.q_batches.fill_(1)
    force_layout(crit)
    sample = first_batch(task, n=8)
    _assert_unperturbed(model, crit, sample)
    assert _moves_in_plain_layout(model, crit, sample)


def test_vaml_actor_alpha_zero_is_mle_after_the_prefix(toy_data):
    """α = 0 on samples that are the reference (a Hamming temperature this low
    draws it): the loss is the reference's NLL without the forced token, from
    the decoder input [bos, y*_0, ...], over the tokens after it; the logged
    nll_loss is the whole reference's, as MLE logs it."""
    _, task, model, crit = _build(toy_data, "vaml", "--vaml-phase", "actor", "--vaml-alpha", "0", "--vaml-samples",
                                  "2", "--vaml-sample-temperature", "1e-6")
    crit.q_batches.fill_(1)
    dictionary = task.target_dictionary
    bos, pad = dictionary.bos(), dictionary.pad()
    force_layout(crit, bos=bos)
    sample = first_batch(task)
    got = _loss_and_grads(model, crit, sample)
    _, _, log = crit(model, sample)

    target, net = sample["target"], sample["net_input"]
    prev = torch.cat([target.new_full((target.size(0), 1), bos), target[:, :-1]], dim=1).masked_fill(
        target.eq(pad), pad)
    model.zero_grad()
    lprobs = model.get_normalized_probs(model(net["src_tokens"], net["src_lengths"], prev), log_probs=True)
    nll = -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1).masked_fill(target.eq(pad), 0.0)
    want = nll[:, 1:].sum()
    want.backward()
    torch.testing.assert_close(got[0], want.detach(), rtol=1e-5, atol=1e-5)
    assert got[1] == sample["ntokens"] - target.size(0)
    torch.testing.assert_close(log["nll_loss"], nll.sum().detach(), rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[2][f"model.{name}"], p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_vaml_samples_end_with_the_layouts_end_symbol(toy_data, monkeypatch):
    """mBART-like rows (``y* </s> [lang]``, the generator's end symbol ``[lang]``;
    here <s>): samples keep the forced token and the end symbol where they are,
    and never draw the end symbol as a substitute (eos is a word there)."""
    from fairseq_seqlevel.criterions import vaml as vaml_module

    L = 3
    _, task, model, crit = _build(toy_data, "vaml", "--vaml-samples", str(L), "--vaml-sample-temperature", "0.5")
    dictionary = task.target_dictionary
    end, pad, eos = dictionary.bos(), dictionary.pad(), dictionary.eos()
    force_layout(crit, end=end)
    crit.special_ids = crit.special_ids[crit.special_ids.ne(end)]  # an ordinary symbol, as [lang] is
    sample = first_batch(task)
    ended = [row[row.ne(pad)].tolist() + [end] for row in sample["target"]]
    target = torch.full((len(ended), max(map(len, ended))), pad)
    for i, row in enumerate(ended):
        target[i, :len(row)] = torch.tensor(row)
    sample = dict(sample, target=target)
    teacher_forced = []
    prev_of = vaml_module.prev_output_tokens_from_target
    monkeypatch.setattr(vaml_module, "prev_output_tokens_from_target",
                        lambda rows, *args: teacher_forced.append(rows.clone()) or prev_of(rows, *args))
    torch.manual_seed(0)
    loss, _, _ = crit(model, sample)
    assert torch.isfinite(loss)

    (rows,) = teacher_forced
    samples = rows.view(target.size(0), L + 1, -1)[:, 1:]
    reference = target.unsqueeze(1).expand_as(samples)
    assert torch.equal(samples[:, :, 0], reference[:, :, 0])
    assert torch.equal(samples.eq(end), reference.eq(end)) and torch.equal(samples.eq(pad), reference.eq(pad))
    assert bool(samples.ne(reference).any())
