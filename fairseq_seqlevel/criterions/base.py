"""The kit every sequence-level criterion is written on: rows with their
reference, length weights, the reward at the level a criterion needs, the
MLE-mix and length-limit rules, the task's output layout, the reference NLL
as validation loss, deprecated flag aliases and fairseq's stock logging
(summable outputs).  Design: docs/concepts.md."""

import argparse
import contextlib
import logging
import math

import torch
from fairseq import utils
from fairseq.criterions import FairseqCriterion
from fairseq.data import data_utils
from fairseq.logging import metrics

from fairseq_seqlevel.decoding.layout import batch_layout, generate as generate_like_task, task_output
from fairseq_seqlevel.decoding.model import check_autoregressive
from fairseq_seqlevel.decoding.sampler import sample as sample_outputs
from fairseq_seqlevel.decoding.teacher_forcing import pad_right, token_nll  # noqa: F401 (pad_right: the kit's name)
from fairseq_seqlevel.rewards.binding import bind_reward
from fairseq_seqlevel.perturbation.vocab import never_sampled_ids
from fairseq_seqlevel.rewards.output_view import viewed

logger = logging.getLogger(__name__)


def trainer_num_updates():
    """The trainer's update count (criterions read it as ``self.num_updates``),
    from the ``num_updates`` value it logs to fairseq's metrics (0 before the
    first update).  A criterion is not told the update number; this is where
    fairseq keeps it.  Read from the *active*
    aggregators: on resume ``metrics.load_state_dict`` replaces the registered
    ``default`` aggregator by a copy that nothing logs to any more, while the
    active one keeps receiving the trainer's counts."""
    for aggregator in metrics.get_active_aggregators():
        meter = aggregator.get("num_updates")
        if meter is not None and meter.val is not None:
            return int(meter.val)
    return 0


def data_parallel_rank_and_size():
    """(rank, world size) of this worker among fairseq's data-parallel workers; (0, 1) alone."""
    import torch.distributed as dist
    from fairseq.distributed import utils as distributed_utils

    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return distributed_utils.get_data_parallel_rank(), distributed_utils.get_data_parallel_world_size()


def references_of(sample):
    """B x R x T references: the task's multi-reference tensor, else the target."""
    refs = sample.get("references")
    return refs if refs is not None else sample["target"].unsqueeze(1)


def unforced(rows, prefix_len, pad):
    """``rows`` with their first ``prefix_len`` tokens (the task's forced prefix) as pad:
    what a sequence-level term scores of a sample (the model did not choose those)."""
    if prefix_len == 0:
        return rows
    rows = rows.clone()
    rows[..., :prefix_len] = pad
    return rows


def reference_and_samples(target, samples, per_source, pad):
    """Rows ``[y*_b, s_b1..s_bm]`` per source b (``samples [B·m, T']``, source-major):
    ``[B·(m+1), max(T, T')]``, right-padded."""
    width = max(target.size(1), samples.size(1))
    grouped = torch.cat([pad_right(target, width, pad).unsqueeze(1),
                         pad_right(samples, width, pad).view(target.size(0), per_source, width)], dim=1)
    return grouped.view(-1, width)


def scored_part(rows, per_source, prefix_len, pad):
    """``rows`` of :func:`reference_and_samples` (``per_source`` samples after each
    reference) as a loss scores them: a sample's forced prefix is not the model's
    choice (pad there), the reference is scored whole, as MLE scores it."""
    if prefix_len == 0:
        return rows
    grouped = rows.view(-1, per_source + 1, rows.size(1)).clone()
    grouped[:, 1:] = unforced(grouped[:, 1:], prefix_len, pad)
    return grouped.view_as(rows)


def mle_mix(objective, reference_nll, weight):
    """The one MLE-mix rule: (1 − w)·objective + w·NLL(y*) (w = 1: MLE alone)."""
    if weight == 0:
        return objective
    return (1.0 - weight) * objective + weight * reference_nll


def reference_length_limit(target, a, b, pad):
    """Last output step per row [B] of an output limited by its reference:
    a·|y*| + b positions, never fewer than |y*| (``*-max-len-ref-a/b`` flags;
    ``*-max-len-src-a/b`` limit by the source, as fairseq-generate's flags)."""
    ref_len = target.ne(pad).sum(dim=1)
    return torch.maximum((ref_len.double() * a + b).long(), ref_len - 1)


class _DeprecatedFlag(argparse.Action):
    """An old flag name that sets the new flag's field, with a warning."""

    def __init__(self, option_strings, dest, new_flag=None, **kwargs):
        self.new_flag = new_flag
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        logger.warning(f"{option_string} is deprecated: use {self.new_flag}")
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def add_deprecated_flags(parser, aliases):
    """Each ``old: new`` flag of ``aliases`` as a hidden option setting new's field
    (same type, choices); ``old: (new, value)``: a switch that sets new's field to value.
    Recipes written with the old name keep running."""
    for old, new in aliases.items():
        new, value = new if isinstance(new, tuple) else (new, None)
        action = parser._option_string_actions.get(new)
        if action is None or old in parser._option_string_actions:
            continue
        kwargs = dict(dest=action.dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, new_flag=new)
        if value is not None:
            parser.add_argument(old, action=_DeprecatedFlag, nargs=0, const=value,
                                **{**kwargs, "new_flag": f"{new} {value}"})
        elif action.nargs == 0:
            parser.add_argument(old, action=_DeprecatedFlag, nargs=0, const=action.const, **kwargs)
        else:
            parser.add_argument(old, action=_DeprecatedFlag, type=action.type, choices=action.choices, **kwargs)


#: rank stride of the per-worker sampling seed (a prime: seeds of ranks never coincide)
WORKER_SEED_STRIDE = 1_000_003


@contextlib.contextmanager
def worker_rng():
    """Random draws (samples, roll-outs, candidates) of this data-parallel worker.

    fairseq seeds every worker alike (``seed + num_updates`` in
    ``Trainer._set_seed``), so without this two workers would draw the same
    random numbers for their rows: correlated samples, fewer distinct ones in
    the global batch.  Inside, torch's generator is seeded with ``s + rank ×
    WORKER_SEED_STRIDE``, ``s`` drawn from the (shared) stream outside; the
    outside stream is restored afterwards, so dropout and everything else stay
    as fairseq has them.  Alone (world size 1) it changes nothing."""
    rank, world_size = data_parallel_rank_and_size()
    if world_size <= 1:
        yield
        return
    base = int(torch.randint(0, 2 ** 62, ()))
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed((base + rank * WORKER_SEED_STRIDE) % 2 ** 63)
        yield


def log_stock_metrics(logging_outputs):
    """loss / nll_loss / ppl exactly as fairseq's label_smoothed_cross_entropy; no nll_loss
    (and no ppl) from steps that do not run the model (a critic-only phase leaves it out)."""
    loss_sum = sum(log.get("loss", 0) for log in logging_outputs)
    nll_loss_sum = sum(log.get("nll_loss", 0) for log in logging_outputs)
    ntokens = sum(log.get("ntokens", 0) for log in logging_outputs if "nll_loss" in log)
    sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
    metrics.log_scalar("loss", loss_sum / sample_size / math.log(2), sample_size, round=3)
    if ntokens > 0:
        metrics.log_scalar("nll_loss", nll_loss_sum / ntokens / math.log(2), ntokens, round=3)
        metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["nll_loss"].avg))


def log_objective(logging_outputs):
    """Validation: the criterion's own loss beside the reference NLL, as ``objective`` (base 2, as loss)."""
    size = sum(log.get("objective_size", 0) for log in logging_outputs)
    if size > 0:
        total = sum(log.get("objective", 0) for log in logging_outputs)
        metrics.log_scalar("objective", total / size / math.log(2), size, round=3)


def log_mean(logging_outputs, name, sum_key, count_key, round=3):
    """Log ``Σ sum_key / Σ count_key`` as ``name`` when the count is positive."""
    count = sum(log.get(count_key, 0) for log in logging_outputs if sum_key in log)
    if count > 0:
        total = sum(log.get(sum_key, 0) for log in logging_outputs)
        metrics.log_scalar(name, total / count, count, round=round)


class SeqlevelCriterion(FairseqCriterion):
    """Base of the plugin's criterions (the kit; docs/concepts.md).

    A criterion defines :meth:`training_loss`; ``forward`` calls it in training
    and, in validation, returns the reference's token NLL (comparable with MLE
    and across criterions) with the criterion's own loss logged beside it as
    ``objective`` (``validates_objective``; off where a training step changes
    state: critic phases, schedules).  ``deprecated_flags`` maps old flag
    names to the new ones (hidden aliases, a warning when used).
    """

    validates_objective = True
    deprecated_flags = {}

    def __init__(self, task, cfg):
        super().__init__(task)
        self.cfg = cfg
        self.sentence_avg = getattr(cfg, "sentence_avg", False)
        dictionary = task.target_dictionary
        self.eos = dictionary.eos()
        self.num_tokens = len(dictionary)
        self.register_buffer("special_ids", torch.tensor(never_sampled_ids(dictionary), dtype=torch.long),
                             persistent=False)
        self._task_output = None  # decoding.layout.TaskOutput, probed on the first batch
        self.fused = None  # re-scoring's chunked output layer: None = where the model allows it (tests: False)

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        add_deprecated_flags(parser, cls.deprecated_flags)

    def forward(self, model, sample, reduce=True):
        if self.training:
            return self.training_loss(model, sample)
        loss, sample_size, logging_output = self.reference_nll_output(model, sample)
        if self.validates_objective:
            objective, objective_size, _ = self.training_loss(model, sample)
            logging_output.update(objective=objective.data, objective_size=objective_size)
        return loss, sample_size, logging_output

    def training_loss(self, model, sample):
        """(loss, sample_size, logging output) of a training step."""
        raise NotImplementedError

    @property
    def num_updates(self) -> int:
        """The trainer's update count: the one place criterions read it
        (:func:`trainer_num_updates`)."""
        return trainer_num_updates()

    def length_weights(self, target):
        """Weight of each source's sequence-level loss [B]: its reference length
        |y*| (fairseq then divides by the batch's target tokens: a length-weighted
        mean on the token scale of the NLL), or 1 with ``--sentence-avg``."""
        if self.sentence_avg:
            return torch.ones(target.size(0), device=target.device)
        return target.ne(self.padding_idx).sum(dim=1).float()

    def token_reward(self, own_name, flag):
        """The reward on target-token ids with prefix values (per-step rewards of a
        critic, reward increments): the criterion's ``own_name``, else the task's
        ``--reward``, else bleu."""
        name = own_name or getattr(getattr(self.task, "cfg", None), "reward", None) or "bleu"
        return bind_reward(name, self.task.target_dictionary, "token", flag=flag, needs_prefix=True)

    def draw_candidates(self, model, sample, n, search, max_len_a, max_len_b, layout=None):
        """n candidates per source, ``[B·n, T]`` right-padded in the task's layout (no grad):
        ``search="sample"`` n multinomial samples of the shared sampler; ``"beam"`` the n-best
        of the task's own generator as its inference_step runs it (prefix, start and end
        symbols), the last repeated where the beam returns fewer than n.  Lengths at most
        a·|x| + b, x the source (as fairseq-generate's --max-len-a/b)."""
        net_input = sample["net_input"]
        layout = layout if layout is not None else self.output_layout(model, sample)
        if search == "sample":
            return sample_outputs(model, net_input, n=n, strategy="multinomial", max_len_a=max_len_a,
                                  max_len_b=max_len_b, layout=layout).tokens
        hypos = generate_like_task(self.task, model, {"net_input": net_input}, layout, beam=n,
                                   max_len_a=max_len_a, max_len_b=max_len_b)
        rows = [h[min(k, len(h) - 1)]["tokens"] for h in hypos for k in range(n)]
        return data_utils.collate_tokens(rows, self.padding_idx).to(sample["target"].device)

    def output_layout(self, model, sample):
        """The task's layout of this batch's output rows (start symbol, forced
        prefix, end symbol: :mod:`fairseq_seqlevel.decoding.layout`).  The first
        call probes the task and makes ``self.reward`` score what the task
        outputs (:class:`~fairseq_seqlevel.rewards.output_view.ViewedReward`)."""
        if self._task_output is None:
            check_autoregressive(model)
            self._task_output = task_output(self.task, model, sample)
            layout = batch_layout(self._task_output, sample, self.task.target_dictionary)
            if getattr(self, "reward", None) is not None:
                self.reward = viewed(self.reward, layout.view)
            return layout
        return batch_layout(self._task_output, sample, self.task.target_dictionary)

    def _apply(self, fn, *args, **kwargs):
        # buffers named in ``fp32_buffers`` (a critic's shadow copies, see
        # critics.register_shadow) follow the device but keep fp32 under
        # fairseq's .half() / .to(bfloat16) of the criterion
        keep = {n: self._buffers[n] for n in getattr(self, "fp32_buffers", ()) if n in self._buffers}
        out = super()._apply(fn, *args, **kwargs)
        for name, old in keep.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        return out

    def load_state_dict(self, state_dict, strict=True, **kwargs):
        # A checkpoint of a criterion without parameters (an MLE checkpoint)
        # has criterion state None: a criterion with a critic starts it fresh.
        if state_dict is None:
            return None
        return super().load_state_dict(state_dict, strict=strict, **kwargs)

    def resolve_reward(self, own_name, flag, default):
        """The reward of this criterion (a :class:`~fairseq_seqlevel.rewards.BoundReward`)."""
        if own_name is None and getattr(self.task, "reward", None) is not None:
            return self.task.reward
        cfg = getattr(self.task, "cfg", None)
        return bind_reward(own_name or default, self.task.target_dictionary, getattr(cfg, "reward_level", "token"),
                           getattr(cfg, "subword_style", "auto"), flag=flag)

    def reference_nll_output(self, model, sample):
        """(loss, sample_size, logging output) of the reference's token NLL, as
        MLE computes it: every criterion's validation loss."""
        target = sample["target"]
        lprobs = model.get_normalized_probs(model(**sample["net_input"]), log_probs=True)
        nll = token_nll(lprobs, target, self.padding_idx).sum()
        size = self.sample_size_of(sample)
        return nll, size, self.stock_logging_output(nll, nll, sample, size)

    def sample_size_of(self, sample, tokens=None):
        """fairseq's normalizer: sentences with ``--sentence-avg``, else tokens."""
        if self.sentence_avg:
            return sample["target"].size(0)
        return sample["ntokens"] if tokens is None else tokens

    def stock_logging_output(self, loss, nll_loss, sample, sample_size, **extra):
        """fairseq's keys; ``nll_loss=None``: the step did not run the model (no nll_loss logged)."""
        out = {"loss": loss.data, "ntokens": sample["ntokens"], "nsentences": sample["target"].size(0),
               "sample_size": sample_size, **extra}
        if nll_loss is not None:
            out["nll_loss"] = nll_loss.data
        return out

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        log_stock_metrics(logging_outputs)
        log_objective(logging_outputs)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
