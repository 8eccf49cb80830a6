"""How criterions call a fairseq model under data parallelism.

fairseq hands a criterion the *wrapped* model (``ModuleProxyWrapper(
DistributedDataParallel(model))`` under ``--ddp-backend pytorch_ddp``).  Its
attribute access returns the inner modules, so ``model.decoder(...)`` runs
without DDP's forward and the gradients it makes are never all-reduced.
Gradient-carrying computations therefore go through :func:`forward_through`,
which runs any function of the inner model *as the wrapper's forward*; no-grad
sampling and roll-outs may use the inner modules inside :func:`eval_mode`.
"""

import contextlib

import torch


def unwrap(model):
    """The innermost module under fairseq's and torch's wrappers (``.module`` chain)."""
    while hasattr(model, "module") and isinstance(getattr(model, "module"), torch.nn.Module):
        model = model.module
    return model


def forward_through(model, body, *args, **kwargs):
    """``body(inner_model, *args, **kwargs)``, called as ``model(...)``'s forward.

    The wrapper chain of ``model`` (DDP, legacy DDP, fairseq's proxy) runs
    its own forward logic (DDP's reducer preparation, buffer handling) around
    ``body`` exactly as for a stock ``model(**net_input)`` call, so gradients
    of whatever ``body`` returns are reduced like MLE's.  With no wrapper it
    is just ``body(model, ...)``.
    """
    inner = unwrap(model)
    if inner is model:
        return body(model, *args, **kwargs)
    had_own = "forward" in inner.__dict__
    previous = inner.__dict__.get("forward")
    inner.forward = lambda *a, **k: body(inner, *a, **k)
    try:
        return model(*args, **kwargs)
    finally:
        if had_own:
            inner.forward = previous
        else:
            del inner.forward


@contextlib.contextmanager
def eval_mode(model):
    """No-grad inference on ``model``: eval mode (no dropout), beam size 1 for
    decoders that keep one (fairseq's lstm), all restored afterwards.  Also
    restored: the beam size a generator leaves on every attention module and
    the encoder's ``reorder_encoder_out`` that BART's ``set_beam_size`` swaps
    (left set, teacher forcing after a beam search would read every beam-th
    key: wrong attention, or a shape error when the rows are not a multiple)."""
    was_training = model.training
    decoder = getattr(model, "decoder", None)
    beam_size = getattr(decoder, "_beam_size", None)
    beams = [(m, m.beam_size) for m in model.modules() if isinstance(getattr(m, "beam_size", None), int)]
    encoder = getattr(model, "encoder", None)
    own_reorder = None if encoder is None else encoder.__dict__.get("reorder_encoder_out")
    model.eval()
    if hasattr(decoder, "set_beam_size"):
        decoder.set_beam_size(1)
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)
        if beam_size is not None and beam_size != 1:
            decoder.set_beam_size(beam_size)
        for module, size in beams:
            module.beam_size = size
        if encoder is not None:
            if own_reorder is None:
                encoder.__dict__.pop("reorder_encoder_out", None)
            else:
                encoder.reorder_encoder_out = own_reorder


def _architecture(model):
    """The ``--arch`` of ``model`` where it kept it (``args.arch``), else its
    registered model name, else its class name."""
    for holder in (getattr(model, "args", None), getattr(model, "cfg", None)):
        arch = getattr(holder, "arch", None) if holder is not None else None
        if isinstance(arch, str) and arch:
            return arch
    from fairseq.models import MODEL_REGISTRY

    names = [name for name, cls in MODEL_REGISTRY.items() if cls is type(model)]
    return names[0] if names else type(model).__name__


def check_autoregressive(model, arch=None):
    """Raise :class:`~fairseq_seqlevel.errors.ConfigError` (one line naming the
    architecture and the reason) unless ``model`` (possibly wrapped) is an
    autoregressive encoder-decoder that sampling, roll-outs and batched
    teacher forcing can drive: a ``FairseqEncoderDecoderModel`` whose encoder
    implements ``reorder_encoder_out`` and whose decoder is a
    ``FairseqIncrementalDecoder`` (lstm, transformer, fconv, bart/mbart), and
    not one of fairseq's non-autoregressive models (``FairseqNATModel``:
    nonautoregressive_transformer, cmlm_transformer, levenshtein_transformer,
    ..., which subclass the transformer but decode all positions at once).
    ``arch``: the name to print (default: the model's own ``--arch``)."""
    from fairseq.models import FairseqEncoder, FairseqEncoderDecoderModel, FairseqIncrementalDecoder

    from fairseq_seqlevel.errors import ConfigError

    model = unwrap(model)
    name = f"--arch {arch or _architecture(model)} ({type(model).__name__})"
    try:
        from fairseq.models.nat import FairseqNATModel
    except ImportError:  # pragma: no cover - a fairseq without the NAT models
        FairseqNATModel = ()
    if isinstance(model, FairseqNATModel):
        raise ConfigError(f"{name} is non-autoregressive (FairseqNATModel: it predicts all target tokens in parallel); "
                          "sequence-level criterions need a left-to-right decoder to sample and score outputs "
                          "(lstm, transformer, fconv, bart)")
    if not isinstance(model, FairseqEncoderDecoderModel):
        raise ConfigError(f"{name} is not an encoder-decoder model (FairseqEncoderDecoderModel); sequence-level "
                          "criterions need a source encoder and a left-to-right decoder (lstm, transformer, fconv, bart)")
    decoder, encoder = model.decoder, model.encoder
    if not isinstance(decoder, FairseqIncrementalDecoder):
        raise ConfigError(f"{name}: its decoder {type(decoder).__name__} has no incremental decoding (not a "
                          "FairseqIncrementalDecoder), which sequence-level criterions need to sample and roll out")
    if type(encoder).reorder_encoder_out is FairseqEncoder.reorder_encoder_out:
        raise ConfigError(f"{name}: its encoder {type(encoder).__name__} does not implement reorder_encoder_out, "
                          "which sequence-level criterions need to decode several outputs per source")
