"""What every sequence-level criterion shares: the reward rule, the ids that
are never sampled, and fairseq's stock logging (summable outputs)."""

import contextlib
import math

import torch
from fairseq import utils
from fairseq.criterions import FairseqCriterion
from fairseq.logging import metrics

from fairseq_seqlevel.compat import data_parallel_rank_and_size
from fairseq_seqlevel.decoding.layout import batch_layout, task_output
from fairseq_seqlevel.decoding.model import check_autoregressive
from fairseq_seqlevel.decoding.teacher_forcing import token_nll
from fairseq_seqlevel.rewards.binding import bind_reward
from fairseq_seqlevel.rewards.output_view import viewed
from fairseq_seqlevel.perturbation.vocab import never_sampled_ids


def references_of(sample):
    """B x R x T references: the task's multi-reference tensor, else the target."""
    refs = sample.get("references")
    return refs if refs is not None else sample["target"].unsqueeze(1)


def pad_right(tokens, width, pad):
    """Right-pad a B x T tensor to B x width (unchanged if already as wide)."""
    if tokens.size(1) >= width:
        return tokens
    return torch.cat([tokens, tokens.new_full((tokens.size(0), width - tokens.size(1)), pad)], dim=1)


def unforced(rows, prefix_len, pad):
    """``rows`` with their first ``prefix_len`` tokens (the task's forced prefix) as pad:
    what a sequence-level term scores of a sample (the model did not choose those)."""
    if prefix_len == 0:
        return rows
    rows = rows.clone()
    rows[..., :prefix_len] = pad
    return rows


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
    """loss / nll_loss / ppl exactly as fairseq's label_smoothed_cross_entropy."""
    loss_sum = sum(log.get("loss", 0) for log in logging_outputs)
    nll_loss_sum = sum(log.get("nll_loss", 0) for log in logging_outputs)
    ntokens = sum(log.get("ntokens", 0) for log in logging_outputs)
    sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
    metrics.log_scalar("loss", loss_sum / sample_size / math.log(2), sample_size, round=3)
    metrics.log_scalar("nll_loss", nll_loss_sum / ntokens / math.log(2), ntokens, round=3)
    metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["nll_loss"].avg))


def log_mean(logging_outputs, name, sum_key, count_key, round=3):
    """Log ``Σ sum_key / Σ count_key`` as ``name`` when the count is positive."""
    count = sum(log.get(count_key, 0) for log in logging_outputs if sum_key in log)
    if count > 0:
        total = sum(log.get(sum_key, 0) for log in logging_outputs)
        metrics.log_scalar(name, total / count, count, round=round)


class SeqlevelCriterion(FairseqCriterion):
    """Base of the plugin's criterions.

    * ``self.reward``-style binding: :meth:`resolve_reward` takes the
      criterion's own ``--<prefix>-reward``, else the task's ``--reward``
      (``seqlevel_translation``), else the criterion's documented default,
      bound to the target dictionary at the task's reward level.
    * ``self.special_ids``: ids no sample may contain (bos, pad, eos, unk,
      fairseq's madeupword fillers), a buffer on the criterion's device.
    * Logging: ``loss`` (base 2 per sample_size) and ``nll_loss`` (base 2 per
      target token) exactly as fairseq's ``label_smoothed_cross_entropy``;
      every logged value is a sum, so outputs of workers and batches add up.
    """

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
        MLE computes it: the validation loss of criterions whose training loss
        is not comparable to MLE's."""
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
        return {
            "loss": loss.data, "nll_loss": nll_loss.data, "ntokens": sample["ntokens"],
            "nsentences": sample["target"].size(0), "sample_size": sample_size, **extra,
        }

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        log_stock_metrics(logging_outputs)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
