"""How the task lays out an output row, read from the task itself.

Every place that decodes from the model or re-scores rows takes its start
symbol, forced prefix and end symbol from here, so samples look like the
task's own ``inference_step`` output (multilingual language tokens, mBART's
``[lang]`` end symbol).  Per row, the start symbol is the batch's own
``prev_output_tokens[:, 0]`` and the prefix its target's first tokens.

Design: docs/decoding.md, "Output layout".
"""

import contextlib
from argparse import Namespace
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from fairseq_seqlevel.decoding.model import eval_mode, unwrap
from fairseq_seqlevel.errors import ConfigError
from fairseq_seqlevel.rewards.output_view import OutputView


class TaskOutput(NamedTuple):
    """What does not change from batch to batch."""

    prefix_len: int          # tokens inference_step forces after the start symbol
    bos: Optional[int]       # inference_step's start symbol (None: the generator's eos)
    eos: int                 # the generator's end symbol
    strip: Tuple[int, ...]   # symbols the generator strips from its output


class OutputLayout(NamedTuple):
    """The layout of one batch's output rows (source-major, ``B`` sources)."""

    bos: Tensor       # LongTensor [B]: the decoder's first input
    prefix: Tensor    # LongTensor [B, P]: forced tokens after it (P may be 0)
    eos: int          # the end symbol of a generated row
    view: OutputView  # what the task shows a user of a row (what rewards score)

    @property
    def prefix_len(self) -> int:
        return self.prefix.size(1)

    def repeat(self, n: int) -> "OutputLayout":
        """The layout of ``n`` rows per source."""
        if n == 1:
            return self
        return self._replace(bos=self.bos.repeat_interleave(n), prefix=self.prefix.repeat_interleave(n, dim=0))


class _Recorder:
    """Stands in for a generator: records what ``inference_step`` passes."""

    def __init__(self):
        self.kwargs = None

    def generate(self, models, sample, **kwargs):
        self.kwargs = kwargs
        return [[] for _ in range(sample["net_input"]["src_tokens"].size(0))]


def task_output(task, model, sample) -> TaskOutput:
    """Probe the task's ``inference_step`` and ``build_generator`` (module docstring).

    A many-pair task trained without a target language (``translation_multi_simple_epoch``
    on several ``--lang-pairs``: its ``inference_step`` needs ``target_lang``) is probed
    once per target language of its ``lang_pairs``; the prefix length and the end symbol
    must agree, the stripped symbols are their union."""
    try:
        return _probe(task, model, sample)
    except Exception as failure:  # noqa: BLE001 - any failure: try per target language, else say why
        languages = _unset_target_languages(task)
        if not languages:
            raise ConfigError(f"--task {type(task).__name__}: its inference_step cannot decode a training "
                              f"batch ({type(failure).__name__}: {failure}); sequence-level criterions "
                              "decode as the task does") from failure
    outputs = []
    for language in languages:
        with _target_language(task, language):
            outputs.append(_probe(task, model, sample))
    if len({(o.prefix_len, o.eos) for o in outputs}) > 1:
        raise ConfigError(f"--lang-pairs: the task decodes its target languages {languages} with different "
                          f"forced prefixes or end symbols ({outputs}); train one layout at a time")
    bos = outputs[0].bos if len({o.bos for o in outputs}) == 1 else None
    strip = tuple(sorted({s for o in outputs for s in o.strip}))
    return TaskOutput(outputs[0].prefix_len, bos, outputs[0].eos, strip)


def _options(task):
    return getattr(task, "args", None) or getattr(task, "cfg", None)


def _unset_target_languages(task):
    """The target languages of a many-pair task whose ``target_lang`` is unset (training), else []."""
    options = _options(task)
    if options is None or getattr(options, "target_lang", None) is not None:
        return []
    return sorted({pair.split("-")[1] for pair in getattr(task, "lang_pairs", None) or ()})


@contextlib.contextmanager
def _target_language(task, language):
    """The task as ``fairseq-generate`` sets it up for one target language (``-t``)."""
    options = _options(task)
    previous = options.target_lang
    options.target_lang = language
    try:
        yield task
    finally:
        options.target_lang = previous


def generate(task, model, sample, layout, **generator_args):
    """The task's own generator (``build_generator`` with ``generator_args``, e.g.
    ``beam``) decoding ``sample`` as its ``inference_step`` does, with each row's
    forced prefix and start symbol from ``layout`` (a batch mixing language pairs
    is decoded per start symbol).  Returns the generator's hypotheses per source."""
    inner = unwrap(model)
    languages = _unset_target_languages(task)
    # built per call, not kept: a generator is a module holding the model; its
    # constructor puts the model in eval mode, which eval_mode restores
    with eval_mode(inner), (_target_language(task, languages[0]) if languages else contextlib.nullcontext()):
        generator = task.build_generator([inner], Namespace(**generator_args))
        prefix = layout.prefix if layout.prefix_len else None
        starts = layout.bos.unique()
        if starts.numel() == 1:
            return generator.generate([inner], sample, prefix_tokens=prefix, bos_token=int(starts))
        hypos = [None] * layout.bos.size(0)
        for start in starts.tolist():
            rows = layout.bos.eq(start).nonzero().squeeze(1)
            part = {"net_input": {k: v.index_select(0, rows) if torch.is_tensor(v) else v
                                  for k, v in sample["net_input"].items()}}
            found = generator.generate([inner], part, bos_token=start,
                                       prefix_tokens=None if prefix is None else prefix.index_select(0, rows))
            for row, hypo in zip(rows.tolist(), found):
                hypos[row] = hypo
        return hypos


def _probe(task, model, sample) -> TaskOutput:
    recorder = _Recorder()
    task.inference_step(recorder, [model], sample)
    kwargs = recorder.kwargs or {}
    prefix, bos = kwargs.get("prefix_tokens"), kwargs.get("bos_token")
    inner = unwrap(model)
    # built per probe, not kept (a generator is a module that holds the model);
    # its constructor puts the model in eval mode, eval_mode restores it
    with eval_mode(inner):
        generator = task.build_generator([inner], Namespace(beam=1, max_len_a=0, max_len_b=200, min_len=1))
    dictionary = task.target_dictionary
    eos = int(getattr(generator, "eos", dictionary.eos()))
    strip = tuple(sorted(int(s) for s in (getattr(generator, "symbols_to_strip_from_output", None) or ())))
    return TaskOutput(0 if prefix is None else int(prefix.size(1)), None if bos is None else int(bos), eos, strip)


def batch_layout(static: TaskOutput, sample, dictionary) -> OutputLayout:
    """The layout of ``sample``'s rows under ``static`` (module docstring)."""
    target = sample["target"]
    pad = dictionary.pad()
    prev = sample["net_input"].get("prev_output_tokens")
    if prev is not None and prev.size(1) > 0 and bool(prev[:, 0].eq(pad).any()):
        raise ConfigError("--left-pad-target: sequence-level criterions need right-padded targets "
                          "(fairseq's default); drop --left-pad-target")
    if prev is not None and prev.size(1) > 0:
        bos = prev[:, 0]
    else:
        start = static.eos if static.bos is None else static.bos
        bos = torch.full((target.size(0),), start, dtype=torch.long, device=target.device)
    prefix = target[:, :static.prefix_len]
    view = OutputView(static.prefix_len, {static.eos}, static.strip, dictionary.eos(), pad)
    return OutputLayout(bos, prefix, static.eos, view)


def plain_layout(batch_size: int, dictionary, device=None) -> OutputLayout:
    """fairseq's translation layout: eos starts and ends a row, no prefix."""
    eos = dictionary.eos()
    return OutputLayout(torch.full((batch_size,), eos, dtype=torch.long, device=device),
                        torch.empty((batch_size, 0), dtype=torch.long, device=device), eos,
                        OutputView(0, (), (), eos, dictionary.pad()))
