"""Every patch the plugin applies to fairseq, torch or Python at import, in one
table (:data:`PATCHES`); what each patches and why is in its docstring and in
docs/patches.md.  Any of them is turned off by naming it in the environment
variable ``FAIRSEQ_SEQLEVEL_NO_PATCH`` (comma-separated, e.g.
``FAIRSEQ_SEQLEVEL_NO_PATCH=keep_last_batch``).
"""

import argparse
import logging

import torch

logger = logging.getLogger(__name__)


def _numpy_scalar_globals():
    """The globals numpy uses to pickle a scalar such as ``np.float64(1.5)``."""
    try:
        import numpy as np
    except ImportError:  # numpy is a fairseq dependency, but stay importable
        return []
    try:  # numpy >= 2 moved the reconstructor to numpy._core
        from numpy._core.multiarray import scalar
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import scalar
    dtype_classes = [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    return [scalar, np.dtype, *dtype_classes]


def fairseq_checkpoint_globals():
    """The exact list of non-primitive globals found in fairseq checkpoints."""
    allowed = [argparse.Namespace, *_numpy_scalar_globals()]
    try:
        from fairseq.distributed.utils import _TensorPlaceholder

        allowed.append(_TensorPlaceholder)
    except ImportError:  # pragma: no cover - fairseq forks without it
        pass
    return allowed


def allow_fairseq_checkpoints():
    """Allowlist fairseq checkpoint classes for ``torch.load(weights_only=True)``.

    Idempotent; a no-op on PyTorch without ``add_safe_globals`` (< 2.4), where
    ``torch.load`` still unpickles anything by default.
    """
    add_safe_globals = getattr(torch.serialization, "add_safe_globals", None)
    if add_safe_globals is None:
        return False
    add_safe_globals(fairseq_checkpoint_globals())
    return True


def _drops_last_batch(batch_by_size):
    import numpy as np

    batches = batch_by_size(np.arange(3, dtype=np.int64), lambda i: 1, max_tokens=100,
                            required_batch_size_multiple=2)
    return sum(len(b) for b in batches) != 3


def keep_last_batch():
    """Undo fairseq-fixed's dropping of the last batch (docs/patches.md).

    Returns True if the installed fairseq needed the fix.
    """
    from fairseq.data import data_utils

    original = data_utils.batch_by_size
    if getattr(original, "_fairseq_seqlevel", False) or not _drops_last_batch(original):
        return False

    def batch_by_size(indices, num_tokens_fn, num_tokens_vec=None, max_tokens=None,
                      max_sentences=None, required_batch_size_multiple=1, fixed_shapes=None):
        if fixed_shapes is not None:  # that branch is unchanged upstream
            return original(indices, num_tokens_fn, num_tokens_vec, max_tokens, max_sentences,
                            required_batch_size_multiple, fixed_shapes)
        import numpy as np
        from fairseq.data.data_utils_fast import batch_by_size_fn, batch_by_size_vec

        max_tokens = int(max_tokens) if max_tokens is not None else -1
        max_sentences = max_sentences if max_sentences is not None else -1
        if not isinstance(indices, np.ndarray):
            indices = np.fromiter(indices, dtype=np.int64, count=-1)
        if num_tokens_vec is None:
            return batch_by_size_fn(indices, num_tokens_fn, max_tokens, max_sentences,
                                    required_batch_size_multiple)
        if not isinstance(num_tokens_vec, np.ndarray):
            num_tokens_vec = np.fromiter(num_tokens_vec, dtype=np.int64, count=-1)
        return batch_by_size_vec(indices, num_tokens_vec, max_tokens, max_sentences,
                                 required_batch_size_multiple)

    batch_by_size._fairseq_seqlevel = True
    batch_by_size.__doc__ = original.__doc__
    data_utils.batch_by_size = batch_by_size
    logger.info("fairseq_seqlevel: restored upstream batch_by_size (keeps the last batch)")
    return True


def allow_cpu_pytorch_ddp():
    """Let ``--ddp-backend pytorch_ddp`` wrap a CPU model (multi-process CPU training).

    fairseq's ``DistributedFairseqModel`` always passes ``device_ids=[device_id]``,
    which torch >= 2 rejects for CPU modules ("device_ids ... only work with
    ... GPU modules"); for them only, ``device_ids``/``output_device`` are
    dropped, which is what torch expects for CPU.  GPU models are untouched.
    """
    from torch.nn.parallel import DistributedDataParallel

    from fairseq.models import distributed_fairseq_model as dfm

    if getattr(dfm.DistributedDataParallel, "_fairseq_seqlevel", False):
        return False

    class CpuAwareDistributedDataParallel(DistributedDataParallel):
        _fairseq_seqlevel = True

        def __init__(self, module, device_ids=None, output_device=None, **kwargs):
            if all(p.device.type == "cpu" for p in module.parameters()):
                device_ids = output_device = None
            super().__init__(module, device_ids=device_ids, output_device=output_device, **kwargs)

    dfm.DistributedDataParallel = CpuAwareDistributedDataParallel
    return True


CRITERION_STATE_KEY = "seqlevel_criterion_state"


def keep_criterion_training_state():
    """Checkpoint ``criterion.training_state_dict()`` in ``extra_state`` and
    restore it on resume (docs/patches.md).  Idempotent."""
    from fairseq.trainer import Trainer

    if getattr(Trainer, "_seqlevel_keeps_criterion_state", False):
        return
    state_dict, load_checkpoint = Trainer.state_dict, Trainer.load_checkpoint

    def state_dict_with_criterion_state(self):
        state = state_dict(self)
        get = getattr(self.get_criterion(), "training_state_dict", None)
        if get is not None:
            state["extra_state"][CRITERION_STATE_KEY] = get()
        return state

    def load_checkpoint_with_criterion_state(self, filename, reset_optimizer=False, reset_lr_scheduler=False,
                                             optimizer_overrides=None, reset_meters=False):
        extra_state = load_checkpoint(self, filename, reset_optimizer=reset_optimizer,
                                      reset_lr_scheduler=reset_lr_scheduler,
                                      optimizer_overrides=optimizer_overrides, reset_meters=reset_meters)
        load = getattr(self.get_criterion(), "load_training_state_dict", None)
        if load is not None and extra_state and CRITERION_STATE_KEY in extra_state and not reset_meters:
            load(extra_state[CRITERION_STATE_KEY])
        return extra_state

    Trainer.state_dict = state_dict_with_criterion_state
    Trainer.load_checkpoint = load_checkpoint_with_criterion_state
    Trainer._seqlevel_keeps_criterion_state = True


def fix_translation_from_pretrained_bart():
    """Give ``TranslationFromPretrainedBARTTask`` the ``self.args`` it reads
    (``= self.cfg``, the argparse namespace; docs/patches.md).  Idempotent;
    returns True if the installed fairseq needed it."""
    try:
        from fairseq.tasks.translation_from_pretrained_bart import TranslationFromPretrainedBARTTask as task_cls
    except ImportError:  # pragma: no cover - fairseq without the task
        return False
    if hasattr(task_cls, "args"):  # already patched, or a fairseq that defines it
        return False
    task_cls.args = property(lambda self: self.cfg, doc="the task's cfg (fairseq_seqlevel compat shim)")
    return True


def bf16_without_tpu():
    """Undo ``--bf16``'s implied ``--tpu`` where no TPU stack is installed
    (docs/patches.md).  Idempotent; returns True if it wrapped ``call_main``."""
    import importlib.util

    from fairseq.distributed import utils as distributed_utils

    call_main = distributed_utils.call_main
    if getattr(call_main, "_fairseq_seqlevel", False):
        return False

    def call_main_without_implied_tpu(cfg, main, **kwargs):
        common = cfg.common
        if getattr(common, "bf16", False) and getattr(common, "tpu", False) \
                and importlib.util.find_spec("torch_xla") is None:
            logger.info("fairseq_seqlevel: --bf16 without torch_xla: not on a TPU (fairseq sets --tpu with --bf16)")
            common.tpu = False
        return call_main(cfg, main, **kwargs)

    call_main_without_implied_tpu._fairseq_seqlevel = True
    distributed_utils.call_main = call_main_without_implied_tpu
    return True


def say_where_training_starts():
    """One warning line when a plugin criterion starts from random weights or its
    ``--finetune-from-model`` is not loaded (docs/patches.md).  Idempotent."""
    import os

    from fairseq import checkpoint_utils

    load_checkpoint = checkpoint_utils.load_checkpoint
    if getattr(load_checkpoint, "_fairseq_seqlevel", False):
        return False

    def load_checkpoint_saying_where(cfg, trainer, **kwargs):
        criterion = type(trainer.get_criterion())
        if criterion.__module__.startswith("fairseq_seqlevel.criterions") and cfg.restore_file == "checkpoint_last.pt":
            last = os.path.join(cfg.save_dir, "checkpoint_last{}.pt".format(trainer.checkpoint_suffix))
            if os.path.exists(last) and cfg.finetune_from_model:
                logger.warning(f"--finetune-from-model {cfg.finetune_from_model} is not loaded: --save-dir "
                               f"{cfg.save_dir} holds checkpoint_last.pt, which fairseq resumes from (fine for a "
                               "restart of this run; to fine-tune a model, give a new --save-dir)")
            elif not os.path.exists(last) and not cfg.finetune_from_model and not getattr(cfg, "continue_once", None):
                logger.warning("starting from randomly initialised weights: sequence-level criterions fine-tune a "
                               "trained model; pass --finetune-from-model CHECKPOINT (or --restore-file CHECKPOINT)")
        return load_checkpoint(cfg, trainer, **kwargs)

    load_checkpoint_saying_where._fairseq_seqlevel = True
    checkpoint_utils.load_checkpoint = load_checkpoint_saying_where
    return True


def _install_excepthook():
    from fairseq_seqlevel.errors import install_excepthook

    install_excepthook()


#: the patches, in the order they are applied at import
PATCHES = {
    "allow_fairseq_checkpoints": allow_fairseq_checkpoints,
    "keep_last_batch": keep_last_batch,
    "allow_cpu_pytorch_ddp": allow_cpu_pytorch_ddp,
    "keep_criterion_training_state": keep_criterion_training_state,
    "fix_translation_from_pretrained_bart": fix_translation_from_pretrained_bart,
    "bf16_without_tpu": bf16_without_tpu,
    "say_where_training_starts": say_where_training_starts,
    "one_line_errors": _install_excepthook,
}


def apply_patches(environ=None):
    """Apply every patch not named in ``FAIRSEQ_SEQLEVEL_NO_PATCH``; returns the names left off."""
    import os

    raw = (os.environ if environ is None else environ).get("FAIRSEQ_SEQLEVEL_NO_PATCH", "")
    off = {name.strip() for name in raw.split(",") if name.strip()}
    unknown = off - set(PATCHES)
    if unknown:
        from fairseq_seqlevel.errors import ConfigError

        raise ConfigError(f"FAIRSEQ_SEQLEVEL_NO_PATCH: unknown patch {', '.join(sorted(unknown))} "
                          f"(known: {', '.join(PATCHES)})")
    for name, patch in PATCHES.items():
        if name not in off:
            patch()
    return off


apply_patches()
