"""Which fairseq architectures the decoding helpers drive, and how exactly.

* ``check_autoregressive`` accepts lstm, transformer, fconv, bart and refuses,
  in one line, fairseq's non-autoregressive models and models without an
  encoder, an incremental decoder or ``reorder_encoder_out``.
* fconv (whose encoder output is a dict of B x T x C tensors, reordered in
  place, whose decoder has no ``extract_features`` / ``output_layer`` and
  shifts its convolution buffers in place): greedy sampling equals fairseq's
  SequenceGenerator, sampled log-probs are the teacher-forced ones,
  ``expand_encoder_out`` equals encoding repeated sources, batched SeaRnn
  roll-outs equal one-by-one greedy decoding, and every sequence-level
  criterion runs.
* Incremental decoding (the sampler's ``decoder_step`` and ``_shrink``)
  equals full-sequence teacher forcing to < 1e-9 in float64 for lstm,
  transformer and fconv: the float32 differences (up to ~1e-6 per token on a
  random tiny transformer) are rounding, not a mask, position or cache error.
"""

import math

import fairseq.utils
import pytest
import torch
import torch.nn.functional as F
from fairseq.models import (FairseqDecoder, FairseqEncoder, FairseqEncoderDecoderModel, FairseqIncrementalDecoder,
                            FairseqLanguageModel)
from fairseq.sequence_generator import SequenceGenerator

from conftest import ARCHS, USER_DIR, build_training, first_batch, mle_steps
from fairseq_seqlevel.decoding import rollouts
from fairseq_seqlevel.decoding.model import check_autoregressive
from fairseq_seqlevel.decoding.sampler import sample
from fairseq_seqlevel.decoding.teacher_forcing import (encode, expand_encoder_out, output_projection,
                                                       weighted_row_losses)
from fairseq_seqlevel.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_FCONV = [
    "--arch", "fconv", "--encoder-embed-dim", "16", "--decoder-embed-dim", "16", "--decoder-out-embed-dim", "16",
    "--encoder-layers", "[(16, 3)] * 2", "--decoder-layers", "[(16, 3)] * 2",
]
TINY = dict(ARCHS, fconv=TINY_FCONV)
TINY_BART = [
    "--arch", "bart_base", "--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "16",
    "--decoder-embed-dim", "16", "--encoder-ffn-embed-dim", "16", "--decoder-ffn-embed-dim", "16",
    "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
]
TINY_NAT = [
    "--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "16", "--decoder-embed-dim", "16",
    "--encoder-ffn-embed-dim", "16", "--decoder-ffn-embed-dim", "16", "--encoder-attention-heads", "2",
    "--decoder-attention-heads", "2",
]


def _build(toy_data, arch, *args, seed=3, criterion="label_smoothed_cross_entropy"):
    torch.manual_seed(seed)
    arch_args = TINY[arch] if isinstance(arch, str) else list(arch)
    return build_training([toy_data, "--user-dir", USER_DIR, "--task", "seqlevel_translation", *arch_args,
                           "--dropout", "0", "--seed", str(seed), "--extra-references", "ref2",
                           "--criterion", criterion, *args])


@pytest.fixture(scope="module")
def fconv(toy_data):
    """A tiny fconv after a few MLE steps: greedy outputs that vary and stop."""
    _, task, model, _ = _build(toy_data, "fconv")
    mle_steps(task, model, 40, 0.02)
    model.eval()
    return task, model


def _strip(row, pad):
    return [int(x) for x in row if int(x) != pad]


def _shifted(tokens, pad, eos):
    """fairseq's decoder input for eos-terminated right-padded rows: eos, then the row shifted."""
    prev = torch.cat([tokens.new_full((tokens.size(0), 1), eos), tokens[:, :-1]], dim=1)
    return prev.masked_fill(tokens.eq(pad), pad)


def _teacher_forced(model, net_input, tokens, n, pad, eos):
    """Log-probs ``[B·n, T, V]`` from one plain forward on the repeated sources."""
    with torch.no_grad():
        out = model(net_input["src_tokens"].repeat_interleave(n, dim=0), net_input["src_lengths"].repeat_interleave(n),
                    _shifted(tokens, pad, eos))
        return model.get_normalized_probs(out, log_probs=True)


# ----------------------------------------------------------- check_autoregressive


@pytest.mark.parametrize("arch", ["lstm", "transformer", "fconv", "bart"])
def test_autoregressive_architectures_are_accepted(toy_data, arch):
    _, _, model, _ = _build(toy_data, TINY_BART if arch == "bart" else arch)
    check_autoregressive(model)


class _Wrapper(torch.nn.Module):
    """Stands for DDP / fairseq's ModuleProxyWrapper (a ``.module`` chain)."""

    def __init__(self, module):
        super().__init__()
        self.module = module


@pytest.mark.parametrize("arch,noise", [("nonautoregressive_transformer", "full_mask"),
                                        ("cmlm_transformer", "random_mask"),
                                        ("levenshtein_transformer", "random_delete")])
def test_non_autoregressive_models_are_refused(toy_data, arch, noise):
    """fairseq's NAT models subclass the transformer (an incremental decoder
    by inheritance): refused by name, in one line, also when wrapped."""
    torch.manual_seed(0)
    _, _, model, _ = build_training([toy_data, "--user-dir", USER_DIR, "--task", "translation_lev", "--arch", arch,
                                     "--noise", noise, "--criterion", "nat_loss", *TINY_NAT])
    for candidate in (model, _Wrapper(model)):
        with pytest.raises(ConfigError) as err:
            check_autoregressive(candidate)
        message = str(err.value)
        assert f"--arch {arch}" in message and "non-autoregressive" in message and "\n" not in message


class _Encoder(FairseqEncoder):
    def forward(self, src_tokens, src_lengths=None):
        return {"encoder_out": [src_tokens.float().unsqueeze(-1)]}

    def reorder_encoder_out(self, encoder_out, new_order):
        return {"encoder_out": [encoder_out["encoder_out"][0].index_select(0, new_order)]}


class _EncoderWithoutReorder(FairseqEncoder):
    def forward(self, src_tokens, src_lengths=None):
        return {"encoder_out": [src_tokens.float().unsqueeze(-1)]}


class _FullDecoder(FairseqDecoder):
    """Reads the whole prefix at every call: no incremental state."""

    def forward(self, prev_output_tokens, encoder_out=None, **kwargs):
        return torch.zeros(*prev_output_tokens.shape, len(self.dictionary)), None


class _IncrementalDecoder(FairseqIncrementalDecoder):
    def forward(self, prev_output_tokens, encoder_out=None, incremental_state=None, **kwargs):
        return torch.zeros(*prev_output_tokens.shape, len(self.dictionary)), None


def test_models_without_encoder_incremental_decoder_or_reorder_are_refused(toy_data):
    _, task, _, _ = _build(toy_data, "lstm")
    d = task.target_dictionary
    cases = [
        (FairseqLanguageModel(_IncrementalDecoder(d)), "not an encoder-decoder model"),
        (FairseqEncoderDecoderModel(_Encoder(d), _FullDecoder(d)), "_FullDecoder has no incremental decoding"),
        (FairseqEncoderDecoderModel(_EncoderWithoutReorder(d), _IncrementalDecoder(d)),
         "_EncoderWithoutReorder does not implement reorder_encoder_out"),
    ]
    for model, reason in cases:
        with pytest.raises(ConfigError) as err:
            check_autoregressive(model)
        message = str(err.value)
        assert reason in message and f"({type(model).__name__})" in message and "\n" not in message, message
    check_autoregressive(FairseqEncoderDecoderModel(_Encoder(d), _IncrementalDecoder(d)))
    with pytest.raises(ConfigError, match=r"^--arch my_arch \(FairseqLanguageModel\) is not an encoder-decoder"):
        check_autoregressive(cases[0][0], arch="my_arch")


# ---------------------------------------------------------------------- fconv


def test_fconv_greedy_equals_sequence_generator(fconv):
    task, model = fconv
    d = task.target_dictionary
    pad = d.pad()
    batch = first_batch(task, n=16)
    hyps = SequenceGenerator([model], d, beam_size=1, max_len_a=0, max_len_b=5).forward(batch)
    got = sample(model, batch["net_input"], strategy="greedy", max_len_a=0, max_len_b=5)
    for b, hyp in enumerate(hyps):
        expected = hyp[0]["tokens"].tolist()
        assert _strip(got.tokens[b], pad) == expected, b
        torch.testing.assert_close(got.lprobs[b, :len(expected)], hyp[0]["positional_scores"], atol=1e-5, rtol=1e-5)
    lengths = got.lengths.tolist()
    assert len(set(lengths)) >= 3 and min(lengths) < 6 and max(lengths) == 6  # they vary, stop, and hit the cap


def test_fconv_samples_are_teacher_forced(fconv):
    """n = 3 samples per source (the encoder output expanded, rows dropped as
    they finish): their log-probs are one plain forward's."""
    task, model = fconv
    d = task.target_dictionary
    pad, eos = d.pad(), d.eos()
    net = first_batch(task, n=6)["net_input"]
    assert net["src_tokens"].size(1) != 6  # fconv's encoder output is B x T x C: its T is not the batch size
    torch.manual_seed(0)
    got = sample(model, net, n=3, strategy="multinomial", max_len_b=8)
    assert got.tokens.size(0) == 18 and len(set(got.lengths.tolist())) >= 3
    lprobs = _teacher_forced(model, net, got.tokens, 3, pad, eos)
    expected = lprobs.gather(-1, got.tokens.unsqueeze(-1)).squeeze(-1).masked_fill(got.tokens.eq(pad), 0.0)
    torch.testing.assert_close(got.lprobs, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["lstm", "transformer", "fconv"])
def test_expand_encoder_out_equals_encoding_repeated_sources(toy_data, arch):
    _, task, model, _ = _build(toy_data, arch)
    model.eval()
    batch = first_batch(task, n=5)
    net = batch["net_input"]
    repeated = {"src_tokens": net["src_tokens"].repeat_interleave(3, dim=0),
                "src_lengths": net["src_lengths"].repeat_interleave(3)}
    prev = net["prev_output_tokens"]
    with torch.no_grad():
        encoder_out = encode(model, net)
        before = model.decoder(prev, encoder_out=encoder_out)[0]
        expanded = expand_encoder_out(model, encoder_out, 3, net["src_tokens"].size(0))
        got = model.decoder(prev.repeat_interleave(3, dim=0), encoder_out=expanded)[0]
        want = model.decoder(prev.repeat_interleave(3, dim=0), encoder_out=encode(model, repeated))[0]
        after = model.decoder(prev, encoder_out=encoder_out)[0]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert torch.equal(after, before)  # the encoder output expanded is left as it was


def test_fconv_batched_rollouts_equal_one_by_one_greedy(toy_data, fconv):
    """SeaRnn's learned roll-in and roll-outs (encoder output reordered several
    times, incremental states expanded and shrunk) against full forwards."""
    task, model = fconv
    cap_b = 3
    _, _, _, crit = _build(toy_data, "fconv", "--reward", "edit", "--searnn-roll-in", "learned",
                           "--searnn-roll-out", "learned", "--searnn-cells", "2", "--searnn-tokens", "3",
                           "--searnn-token-sampling", "policy", "--searnn-max-len-b", str(cap_b),
                           criterion="searnn_kl", seed=5)
    pad, eos = task.target_dictionary.pad(), task.target_dictionary.eos()
    batch = first_batch(task, n=5)
    torch.manual_seed(0)
    found = crit.search(model, batch)
    assert found.num_decoded > 0 and found.hyps.size(0) == int(found.valid.sum())
    net, target = batch["net_input"], batch["target"]
    caps = target.ne(pad).sum(1) + cap_b

    def full_greedy(b, prefix):
        src = net["src_tokens"][b][net["src_tokens"][b].ne(pad)].unsqueeze(0)
        out = list(prefix)
        while not out or out[-1] != eos:
            if len(out) >= int(caps[b]) - 1:
                return out + [eos]
            lp = model.get_normalized_probs(model(src, torch.tensor([src.size(1)]), torch.tensor([[eos] + out])),
                                            log_probs=True)[0, -1]
            lp[pad] = -math.inf
            out.append(int(lp.argmax()))
        return out

    with torch.no_grad():
        for b in range(target.size(0)):
            assert _strip(found.rollin[b], pad) == full_greedy(b, [])
        for hyp, m, j in zip(found.hyps, found.hyp_cells.tolist(), found.hyp_columns.tolist()):
            b, t = int(found.cell_rows[m]), int(found.cell_pos[m])
            prefix = _strip(found.rollin[b], pad)[:t] + [int(found.candidates[m, j])]
            assert _strip(hyp, pad) == full_greedy(b, prefix), (b, t, prefix)


@pytest.mark.parametrize("criterion,args", [
    ("raml", ["--raml-samples", "3"]),
    ("searnn_kl", ["--searnn-roll-in", "learned", "--searnn-roll-out", "learned", "--searnn-cells", "2",
                   "--searnn-tokens", "3"]),
    ("seq_exploration", []),
    ("risk", ["--risk-candidates", "3"]),
])
def test_fconv_trains_with_every_criterion(toy_data, criterion, args):
    _, task, model, crit = _build(toy_data, "fconv", *args, criterion=criterion)
    model.train()
    batch = first_batch(task, n=6)
    torch.manual_seed(0)
    loss, sample_size, _ = crit(model, batch)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and sample_size > 0 and grads
    assert all(bool(torch.isfinite(g).all()) for g in grads) and any(bool(g.ne(0).any()) for g in grads)


def test_fconv_row_losses_fall_back_to_the_decoder_output(toy_data):
    """fconv's fc3 is applied inside forward (after fc2 and dropout): no chunked
    output layer, and the default path equals the plain autograd one."""
    _, task, model, _ = _build(toy_data, "fconv")
    assert output_projection(model.decoder) is None
    batch = first_batch(task, n=4)
    net, target = batch["net_input"], batch["target"]
    pad = task.target_dictionary.pad()

    def loss_fn(lprobs, tgt):
        nll = -lprobs.gather(-1, tgt.unsqueeze(-1)).squeeze(-1).masked_fill(tgt.eq(pad), 0.0)
        return nll.sum(-1), nll.sum(-1)

    coef = torch.tensor([1.0, 0.5, 2.0, -1.0])
    results = []
    for fused in (None, False):
        model.zero_grad()
        total, row_loss, _ = weighted_row_losses(model, encode(model, net), net["prev_output_tokens"], target, coef,
                                                 loss_fn, fused=fused)
        total.backward()
        results.append((total.detach(), row_loss, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (t1, r1, g1), (t2, r2, g2) = results
    torch.testing.assert_close(t1, t2)
    torch.testing.assert_close(r1, r2)
    assert len(g1) == len(g2) > 0
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


# --------------------------------------------- incremental = full, in float64


def _in_model_dtype(x, dim, onnx_trace=False):
    return F.softmax(x, dim=dim, dtype=x.dtype)


def _log_in_model_dtype(x, dim, onnx_trace=False):
    return F.log_softmax(x, dim=dim, dtype=x.dtype)


@pytest.mark.parametrize("arch", ["lstm", "transformer", "fconv"])
def test_incremental_decoding_equals_teacher_forcing_in_float64(toy_data, arch, monkeypatch):
    """The sampler's path (``decoder_step`` with an incremental state, rows
    dropped with ``_shrink`` half-way) against one full forward, on a random
    model in float64: < 1e-9, so the float32 differences are rounding.

    fairseq computes softmaxes in float32 whatever the model's dtype
    (``utils.softmax`` in the incremental attention path, ``utils.log_softmax``
    in ``get_normalized_probs``), which alone leaves ~2e-7 in float64; both
    are patched to keep the model's dtype.
    """
    _, task, model, _ = _build(toy_data, arch)
    model.eval()
    d = task.target_dictionary
    pad, eos = d.pad(), d.eos()
    net = first_batch(task, n=12)["net_input"]
    tokens = sample(model, net, strategy="greedy", max_len_b=30).tokens  # a random model: long rows
    assert tokens.size(1) > 10

    def incremental_vs_full():
        inputs = _shifted(tokens.masked_fill(tokens.eq(pad), eos), pad, eos)
        inputs = torch.cat([inputs, tokens[:, -1:]], dim=1)
        width = tokens.size(1)
        out = torch.full((*tokens.shape, len(d)), math.nan, dtype=torch.float64)
        rows, state = torch.arange(tokens.size(0)), {}
        with torch.no_grad():
            encoder_out = encode(model, net)
            for t in range(width):
                out[rows, t] = rollouts.decoder_step(model, inputs.index_select(0, rows)[:, :t + 1], encoder_out,
                                                     state).double()
                # as the sampler: finished rows leave; half-way, every other row too
                alive = tokens.index_select(0, rows)[:, t + 1].ne(pad) if t + 1 < width else rows.eq(-1)
                if t == width // 2:
                    alive &= torch.arange(rows.numel()) % 2 == 0
                if not bool(alive.all()):
                    keep = alive.nonzero(as_tuple=False).squeeze(1)
                    if keep.numel() == 0:
                        break
                    state, encoder_out = rollouts._shrink(model, state, encoder_out, keep)
                    rows = rows.index_select(0, keep)
            full = _teacher_forced(model, net, tokens, 1, pad, eos).double()
        scored = tokens.ne(pad) & ~out.isnan().any(-1)
        assert bool(scored[:, width // 2 + 1:].any()) and int(scored.sum()) > int(tokens.ne(pad).sum()) // 2
        return (out - full).abs()[scored].max().item()

    float32 = incremental_vs_full()
    monkeypatch.setattr(fairseq.utils, "softmax", _in_model_dtype)
    monkeypatch.setattr(fairseq.utils, "log_softmax", _log_in_model_dtype)
    model.double()
    float64 = incremental_vs_full()
    assert float64 < 1e-9, (float32, float64)
    assert float32 < 1e-4, (float32, float64)


def test_fconv_greedy_continue_leaves_the_callers_state(fconv):
    """fconv's convolutions shift their input buffers in place at every step:
    a roll-out from a replayed state must not change that state (nor the
    encoder output, which fconv's encoder reorders in place)."""
    task, model = fconv
    pad, eos = task.target_dictionary.pad(), task.target_dictionary.eos()
    batch = first_batch(task, n=4)
    rollin = batch["target"]

    def assert_unchanged(state, snapshot):
        assert state.keys() == snapshot.keys()
        for key, value in snapshot.items():
            if torch.is_tensor(value):
                assert torch.equal(state[key], value), key
            elif isinstance(value, dict):
                assert all(torch.equal(state[key][n], t) for n, t in value.items() if torch.is_tensor(t)), key
            else:
                assert all(torch.equal(a, b) for a, b in zip(state[key], value)), key

    with torch.no_grad():
        encoder_out = encode(model, batch["net_input"])
        enc_snapshot = [t.clone() for t in encoder_out["encoder_out"]]
        steps = rollouts.replay(model, encoder_out, rollin, pad, eos)
        for _ in range(2):
            _, _, state = next(steps)  # has consumed eos, rollin[:, 0]
        snapshot = rollouts.copy_incremental_state(state, clone=True)
        assert any(torch.is_tensor(v) for v in snapshot.values())  # fconv's convolution buffers
        start = torch.cat([torch.full((4, 1), eos), rollin[:, :2].masked_fill(rollin[:, :2].eq(pad), eos)], dim=1)
        rollouts.greedy_continue(model, encoder_out, start, state, torch.full((4,), 8), pad, eos)  # all rows
        assert_unchanged(state, snapshot)
        rollouts.greedy_continue(model, encoder_out, start, state, torch.tensor([8, 2, 8, 2]), pad, eos)  # shrunk
        assert_unchanged(state, snapshot)
        assert all(torch.equal(a, b) for a, b in zip(encoder_out["encoder_out"], enc_snapshot))
        _, lprobs, _ = next(steps)  # the replay goes on as if untouched
        plain = model.get_normalized_probs(model.decoder(start, encoder_out=encode(model, batch["net_input"])),
                                           log_probs=True)[:, -1]
    torch.testing.assert_close(lprobs, plain, atol=1e-5, rtol=1e-5)
