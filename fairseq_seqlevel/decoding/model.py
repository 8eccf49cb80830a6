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
    decoders that keep one (fairseq's lstm), both restored afterwards."""
    was_training = model.training
    decoder = getattr(model, "decoder", None)
    beam_size = getattr(decoder, "_beam_size", None)
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
