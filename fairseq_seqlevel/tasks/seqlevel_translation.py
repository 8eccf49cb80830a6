"""``seqlevel_translation``: fairseq's translation task plus a sequence reward.

Adds ``--reward`` (``task.reward(hyp, refs)`` on raw padded target ids, bound
to pad/eos and optionally to a word merger), ``--extra-references`` (batches
carry ``sample["references"]``, B x R x T'; a missing file is an error) and
``--eval-reward`` (greedy validation logging ``reward``, ``greedy_bleu`` and
``greedy_chrf``).

Design: docs/task.md, "What it adds to `translation`".
"""

import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq import utils
from fairseq.data import data_utils
from fairseq.dataclass import ChoiceEnum
from fairseq.logging import metrics
from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask

from fairseq_seqlevel.errors import InputFileError, check
from fairseq_seqlevel.rewards.binding import bind_reward, bleu_from_flat_stats, validate_reward_name
from fairseq_seqlevel.tasks.multi_reference_dataset import MultiReferenceDataset

REWARD_LEVELS = ChoiceEnum(["token", "word"])
SUBWORD_STYLES = ChoiceEnum(["auto", "sentencepiece", "subword_nmt", "none"])


@dataclass
class SeqlevelTranslationConfig(TranslationConfig):
    reward: str = field(
        default="bleu",
        metadata={"help": "sequence reward used by criterions and --eval-reward: a name such as bleu, chrf, "
                  "edit or hamming (all: fairseq_seqlevel.rewards.available_rewards(); an unknown name "
                  "fails at start-up listing them), python:MODULE:FUNCTION "
                  "(fairseq_seqlevel.rewards.user; imported only when named on this command line), "
                  "or a mix NAME:WEIGHT,NAME:WEIGHT such as bleu:0.8,chrf:0.2 (fairseq_seqlevel.rewards.mixed)"},
    )
    reward_level: REWARD_LEVELS = field(
        default="token",
        metadata={"help": "score target ids as they are (token) or merge subwords "
                  "into words first (word), so BLEU on a sentencepiece vocabulary is word BLEU"},
    )
    subword_style: SUBWORD_STYLES = field(
        default="auto",
        metadata={"help": "how subwords form words for --reward-level word: "
                  "sentencepiece ('▁' starts a word), subword_nmt ('@@' continues), "
                  "none (every token is a word), auto (detect from the dictionary)"},
    )
    extra_references: Optional[str] = field(
        default=None,
        metadata={"help": "comma-separated extra reference sets, loaded from "
                  "{split}.{src}-{tgt}.{name}.bin/.idx (binarized with the target dict); batches "
                  "carry them as sample['references'], B x R x T; a split loaded without them is an "
                  "error naming the missing file"},
    )
    eval_reward: bool = field(
        default=False,
        metadata={"help": "validation: greedy-decode and log the mean sentence reward "
                  "(all references) as 'reward' and, whichever reward trains, corpus BLEU as "
                  "'greedy_bleu' and mean sentence chrF as 'greedy_chrf'"},
    )
    eval_reward_max_len_b: int = field(
        default=20, metadata={"help": "greedy validation decoding: max length = a*src_len + b (a=1.2)"}
    )


@register_task("seqlevel_translation", dataclass=SeqlevelTranslationConfig)
class SeqlevelTranslationTask(TranslationTask):
    """Translation with a sequence-level reward shared by criterions and validation."""

    cfg: SeqlevelTranslationConfig

    def __init__(self, cfg, src_dict, tgt_dict):
        super().__init__(cfg, src_dict, tgt_dict)
        self.reward = self.build_reward(cfg, tgt_dict)
        self.extra_reference_names = [
            n.strip() for n in (cfg.extra_references or "").split(",") if n.strip()
        ]

    @classmethod
    def setup_task(cls, cfg, **kwargs):
        paths = utils.split_paths(cfg.data) if cfg.data else []
        check(len(paths) > 0, "DATA: no data directory given")
        for path in paths:
            check(os.path.isdir(path), f"DATA: data directory not found: {path}")
        # Validate the reward before loading anything (fails at start-up).
        validate_reward_name(cfg.reward, "--reward")
        return super().setup_task(cfg, **kwargs)

    @classmethod
    def build_reward(cls, cfg, tgt_dict):
        return bind_reward(cfg.reward, tgt_dict, cfg.reward_level, cfg.subword_style, flag="--reward")

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        super().load_dataset(split, epoch=epoch, combine=combine, **kwargs)
        paths = utils.split_paths(self.cfg.data)
        data_path = paths[(epoch - 1) % len(paths)] if split == self.cfg.train_subset else paths[0]
        src, tgt = self.cfg.source_lang, self.cfg.target_lang
        extra = {}
        for name in self.extra_reference_names:
            prefix = os.path.join(data_path, f"{split}.{src}-{tgt}.{name}")
            refs = data_utils.load_indexed_dataset(prefix, self.tgt_dict, self.cfg.dataset_impl)
            # Never fall back to one reference silently: a typo in the name
            # would train and validate against a different objective.
            if refs is None:
                raise InputFileError(f"--extra-references {name}: {prefix}.bin/.idx not found (split {split})")
            extra[name] = refs
        self.datasets[split] = MultiReferenceDataset(self.datasets[split], extra, self.tgt_dict.pad())

    #: validation hands a criterion the rewards of this task's greedy decode (below)
    hands_validation_reward = True

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        self.greedy_generator = None
        if self.cfg.eval_reward:
            self.eval_chrf = bind_reward("chrf", self.tgt_dict, subword_style=self.cfg.subword_style, flag="chrf")
        return model

    def greedy_outputs(self, model, sample):
        """Greedy (beam 1) outputs as a right-padded B x T tensor, eos kept."""
        if getattr(self, "greedy_generator", None) is None:
            from argparse import Namespace

            while hasattr(model, "module"):  # built on the model itself, not a data-parallel wrapper
                model = model.module
            self.greedy_generator = self.build_generator(
                [model], Namespace(beam=1, max_len_a=1.2, max_len_b=self.cfg.eval_reward_max_len_b))
        gen_out = self.inference_step(self.greedy_generator, [model], sample, prefix_tokens=None)
        hyps = [out[0]["tokens"] for out in gen_out]
        return data_utils.collate_tokens(hyps, self.tgt_dict.pad()).to(sample["target"].device)

    def valid_step(self, sample, model, criterion):
        """Validation; with ``--eval-reward``, or for a criterion with a
        ``validation_reward`` (interpolation's annealing), one greedy decode
        scored per batch.  The criterion's sums reach it, summed over workers,
        through :meth:`reduce_metrics` (``criterion.add_validation_reward``)."""
        loss, sample_size, logging_output = super().valid_step(sample, model, criterion)
        criterion_reward = getattr(criterion, "validation_reward", None)
        if self.cfg.eval_reward or criterion_reward is not None:
            refs = sample.get("references", sample["target"].unsqueeze(1))
            hyps = self.greedy_outputs(model, sample)
        if criterion_reward is not None:
            logging_output["_criterion_reward_sum"] = float(criterion_reward(hyps, refs).sum())
            logging_output["_criterion_reward_count"] = hyps.size(0)
        if self.cfg.eval_reward:
            logging_output["_reward_sum"] = self.reward(hyps, refs).sum().item()
            # chrF beside the trained reward and BLEU: a metric the model was not trained on
            logging_output["_chrf_sum"] = self.eval_chrf(hyps, refs).sum().item()
            logging_output["_reward_count"] = hyps.size(0)
            logging_output["_gbleu_stats"] = self.reward.bleu_stats(hyps, refs).cpu()
        return loss, sample_size, logging_output

    def reduce_metrics(self, logging_outputs, criterion):
        super().reduce_metrics(logging_outputs, criterion)
        handed = sum(log.get("_criterion_reward_count", 0) for log in logging_outputs)
        if handed > 0 and hasattr(criterion, "add_validation_reward"):
            criterion.add_validation_reward(sum(log.get("_criterion_reward_sum", 0.0) for log in logging_outputs),
                                            handed)
        if not self.cfg.eval_reward:
            return
        count = sum(log.get("_reward_count", 0) for log in logging_outputs)
        if count == 0:
            return
        total = sum(log.get("_reward_sum", 0.0) for log in logging_outputs)
        chrf = sum(log.get("_chrf_sum", 0.0) for log in logging_outputs)
        metrics.log_scalar("greedy_chrf", 100.0 * chrf / count, count, round=2)
        # Weighted by sentence count so the mean is exact across batches/workers.
        metrics.log_scalar("reward", total / count, count, round=4)
        stats = sum(log["_gbleu_stats"] for log in logging_outputs if "_gbleu_stats" in log)
        metrics.log_scalar_sum("_gbleu_stats", stats)
        metrics.log_derived(
            "greedy_bleu",
            lambda meters: round(bleu_from_flat_stats(meters["_gbleu_stats"].sum), 2),
        )
