"""``seqlevel_translation``: fairseq's translation task plus a sequence reward.

Adds ``--reward`` (``task.reward(hyp, refs)`` on raw padded target ids, bound
to pad/eos and optionally to a word merger), ``--extra-references`` (batches
carry ``sample["references"]``, B x R x T'; a missing file is an error) and
``--eval-reward`` (greedy validation logging ``reward``, ``greedy_bleu`` and
``greedy_chrf``) and, for ``fairseq-generate`` / ``fairseq-interactive``,
minimum Bayes risk decoding (``--mbr-candidates N``: ``build_generator``
returns a :class:`~fairseq_seqlevel.decoding.mbr.MbrGenerator`).

Design: docs/task.md, "What it adds to `translation`"; MBR: docs/mbr.md.
"""

import logging
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

from fairseq_seqlevel.decoding.mbr import SAMPLINGS, MbrGenerator
from fairseq_seqlevel.errors import InputFileError, check
from fairseq_seqlevel.rewards.binding import bind_reward, bleu_from_flat_stats, validate_reward_name
from fairseq_seqlevel.tasks.multi_reference_dataset import MultiReferenceDataset

logger = logging.getLogger(__name__)

REWARD_LEVELS = ChoiceEnum(["token", "word"])
SUBWORD_STYLES = ChoiceEnum(["auto", "sentencepiece", "subword_nmt", "none"])
MBR_SAMPLINGS = ChoiceEnum(list(SAMPLINGS))


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
    mbr_candidates: int = field(
        default=0,
        metadata={"help": "fairseq-generate / fairseq-interactive: minimum Bayes risk decoding over this many "
                  "candidates per source (0: off, the usual beam search); the output is the candidate of highest "
                  "mean --mbr-utility against all candidates (itself included, as the mbrs library), --nbest "
                  "lists the distinct candidates in that order; --beam and --sampling do not apply "
                  "(docs/mbr.md); fairseq-train refuses it"},
    )
    mbr_utility: str = field(
        default="chrf",
        metadata={"help": "MBR utility u(candidate, pseudo-reference): a --reward name (bleu, chrf, chrf_pp, edit, "
                  "...; a mix or python:MODULE:FUNCTION too), scored at --reward-level; chrF: the string utility "
                  "of sampling-based MBR (Müller & Sennrich 2021), where sentence BLEU between two short samples is "
                  "mostly its smoothing"},
    )
    mbr_sampling: MBR_SAMPLINGS = field(
        default="epsilon",
        metadata={"help": "MBR candidates: epsilon sampling (tokens of probability >= --mbr-epsilon, "
                  "renormalized: Freitag et al. 2023's choice for MBR), multinomial (ancestral) sampling, or the "
                  "task's beam search with a beam of --mbr-candidates (its n-best); sampling follows "
                  "--temperature, --max-len-a/b, --min-len and --seed"},
    )
    mbr_epsilon: float = field(
        default=0.02,
        metadata={"help": "--mbr-sampling epsilon: the probability threshold ε in [0, 1) (0.02: Freitag et al. "
                  "2023; 0 is multinomial sampling)"},
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
        check_mbr_flags(cfg)
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

    def build_criterion(self, cfg, from_checkpoint=False):
        # training and validation decode with plain generators (greedy validation,
        # the criterions' candidates): MBR is a decoding rule of generate / interactive
        check(getattr(self.cfg, "mbr_candidates", 0) == 0,
              "--mbr-candidates: minimum Bayes risk is a decoding rule of fairseq-generate / fairseq-interactive; "
              "drop it from fairseq-train / fairseq-validate")
        return super().build_criterion(cfg, from_checkpoint)

    def build_generator(self, models, args, seq_gen_cls=None, extra_gen_cls_kwargs=None,
                        prefix_allowed_tokens_fn=None):
        """fairseq's generator; with ``--mbr-candidates N`` an :class:`MbrGenerator` over it
        (not for ``--score-reference``, which scores the reference)."""
        n = getattr(self.cfg, "mbr_candidates", 0)
        if n <= 0 or getattr(args, "score_reference", False):
            return super().build_generator(models, args, seq_gen_cls, extra_gen_cls_kwargs, prefix_allowed_tokens_fn)
        sampling = str(self.cfg.mbr_sampling)
        check(not getattr(args, "sampling", False),
              "--sampling: MBR draws its own candidates (--mbr-sampling epsilon|multinomial|beam); drop --sampling")
        if sampling != "beam":
            extra = extra_gen_cls_kwargs or {}
            check(len(models) == 1, f"--path: --mbr-sampling {sampling} samples one model, got an ensemble of "
                  f"{len(models)}; use --mbr-sampling beam (the ensemble's beam search)")
            check(not getattr(args, "constraints", False) and prefix_allowed_tokens_fn is None
                  and extra.get("lm_model") is None,
                  f"--mbr-sampling {sampling}: sampled candidates take no --constraints, prefix_allowed_tokens_fn "
                  "or --lm-path; use --mbr-sampling beam")
        base = super().build_generator(models, _Overridden(args, beam=n) if sampling == "beam" else args,
                                       seq_gen_cls, extra_gen_cls_kwargs, prefix_allowed_tokens_fn)
        utility = bind_reward(self.cfg.mbr_utility, self.tgt_dict, self.cfg.reward_level, self.cfg.subword_style,
                              flag="--mbr-utility")
        logger.info(f"minimum Bayes risk decoding: {n} candidates per source ({sampling}"
                    + (f", ε = {self.cfg.mbr_epsilon}" if sampling == "epsilon" else "")
                    + f"), utility {self.cfg.mbr_utility}")
        return MbrGenerator(models[0], base, self.tgt_dict, utility, n, sampling, self.cfg.mbr_epsilon,
                            max_len_a=getattr(args, "max_len_a", 0), max_len_b=getattr(args, "max_len_b", 200),
                            min_len=getattr(args, "min_len", 1), temperature=getattr(args, "temperature", 1.0),
                            normalize_scores=not getattr(args, "unnormalized", False),
                            len_penalty=getattr(args, "lenpen", 1))

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


def check_mbr_flags(cfg):
    """One-line errors for the MBR flags, at start-up (before any data is loaded)."""
    candidates = getattr(cfg, "mbr_candidates", 0)
    check(candidates >= 0, f"--mbr-candidates: must be >= 0 (0: off), got {candidates}")
    validate_reward_name(getattr(cfg, "mbr_utility", "chrf"), "--mbr-utility")
    epsilon = getattr(cfg, "mbr_epsilon", 0.02)
    check(0 <= epsilon < 1, f"--mbr-epsilon: must be in [0, 1), got {epsilon}")


class _Overridden:
    """``args`` (a generation config) with some attributes replaced."""

    def __init__(self, args, **values):
        self._args, self._values = args, values

    def __getattr__(self, name):
        if name in self._values:
            return self._values[name]
        return getattr(self._args, name)
