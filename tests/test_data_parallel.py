"""Every criterion trained on 2 CPU processes (gloo) as fairseq's Trainer does,
under ``--ddp-backend pytorch_ddp`` and ``legacy_ddp``: after each of two
updates the reduced, normalized gradients of model and criterion parameters
must match across ranks and, where the criterion is deterministic, equal the
1-process gradient of the combined batch.  See ``ddp_harness.py``.

A criterion whose gradient-carrying forward bypasses the wrapper's forward
(``model.encoder(...)``/``model.decoder(...)`` on the ``ModuleProxyWrapper``)
is never all-reduced under pytorch_ddp: its replicas drift.  The last two
cases check that the harness sees that, and DDP's "Expected to have finished
reduction" error of a parameter left out of the loss.

New criterion (erac, vaml, ...): add a line to ``make_cases`` and its name to
``CASES``; a ``patch`` that replaces the criterion's random draws with ones
derived from the example ids (``_fixed_rows``) makes it deterministic.  One spawned pair of processes runs all cases under both backends.
"""

import random
from dataclasses import dataclass
from functools import partial
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass
from omegaconf import II

from conftest import TINY_LSTM, TINY_TRANSFORMER, USER_DIR
from ddp_harness import Case, check_report, examples, run_matrix, summary
from pipelines import PIPELINES

BACKENDS = ["pytorch_ddp", "legacy_ddp"]
THIS_MODULE = __name__  # the child imports it to register the test criterions


# ------------------------------------------------ criterions for the harness


@dataclass
class _TestCriterionConfig(FairseqDataclass):
    sentence_avg: bool = II("optimization.sentence_avg")


def _nll(lprobs, target, pad):
    nll = -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return nll.masked_fill(target.eq(pad), 0.0).sum()


@register_criterion("ddp_test_critic", dataclass=_TestCriterionConfig)
class CriticCriterion(FairseqCriterion):
    """A criterion owning parameters (as erac/vaml own a critic): NLL of the
    model's logits reshaped by a learned temperature and per-token bias."""

    def __init__(self, task, sentence_avg):
        super().__init__(task)
        self.log_temperature = torch.nn.Parameter(torch.zeros(()))
        self.bias = torch.nn.Parameter(torch.zeros(len(task.target_dictionary)))

    def forward(self, model, sample, reduce=True):
        net_output = model(**sample["net_input"])
        logits = net_output[0].float() * self.log_temperature.exp() + self.bias
        loss = _nll(F.log_softmax(logits, dim=-1), sample["target"], self.padding_idx)
        return loss, sample["ntokens"], {"loss": loss.data, "ntokens": sample["ntokens"],
                                         "nsentences": sample["target"].size(0),
                                         "sample_size": sample["ntokens"]}


@register_criterion("ddp_test_bypass", dataclass=_TestCriterionConfig)
class BypassCriterion(FairseqCriterion):
    """The bug the harness exists for: the loss forward through the inner
    modules of the wrapped model (not all-reduced under pytorch_ddp)."""

    def __init__(self, task, sentence_avg):
        super().__init__(task)

    def forward(self, model, sample, reduce=True):
        net_input = sample["net_input"]
        encoder_out = model.encoder(net_input["src_tokens"], src_lengths=net_input["src_lengths"])
        net_output = model.decoder(net_input["prev_output_tokens"], encoder_out=encoder_out)
        loss = _nll(model.get_normalized_probs(net_output, log_probs=True), sample["target"], self.padding_idx)
        return loss, sample["ntokens"], {"loss": loss.data, "sample_size": sample["ntokens"]}


@register_criterion("ddp_test_unused", dataclass=_TestCriterionConfig)
class UnusedParameterCriterion(CriticCriterion):
    """A criterion parameter outside the loss: pytorch_ddp (without
    --find-unused-parameters) fails at the second update."""

    def __init__(self, task, sentence_avg):
        super().__init__(task, sentence_avg)
        self.unused = torch.nn.Parameter(torch.zeros(3))


# --------------------------------------------- deterministic raml samples


def _fixed_rows(criterion, sample, num_samples, offset=0):
    """``num_samples`` same-length variants of each target derived from its
    id: variant l substitutes one token at position (id + l) mod |y*| (eos
    kept).  Returns (rows [B·L, T], number of changed tokens [B·L])."""
    target, ids = sample["target"], sample["id"].tolist()
    dictionary = criterion.task.target_dictionary
    pad, first, vocab = dictionary.pad(), dictionary.nspecial, len(dictionary)
    rows, distance = [], []
    for b, example in enumerate(ids):
        length = int(target[b].ne(pad).sum()) - 1  # tokens before eos
        for l in range(offset, offset + num_samples):
            row = target[b].clone()
            changed = 0
            if length > 0:
                pos, token = (example + l) % length, first + (7 * example + 3 * l) % (vocab - first)
                changed = int(row[pos] != token)
                row[pos] = token
            rows.append(row)
            distance.append(changed)
    return torch.stack(rows), torch.tensor(distance)


def _fixed_draw(criterion, sample):
    """raml's ``draw_samples`` with :func:`_fixed_rows` and uniform weights."""
    num_samples = criterion.cfg.raml_samples
    tokens, distance = _fixed_rows(criterion, sample, num_samples)
    n = tokens.size(0)
    drawn = SimpleNamespace(tokens=tokens, distance=distance, log_q=torch.zeros(n))
    return drawn, torch.full((n,), 1.0 / num_samples), None


def _fixed_candidates(criterion, model, sample):
    return _fixed_rows(criterion, sample, criterion.cfg.risk_candidates)[0]


def _fixed_outputs(criterion, model, sample):
    samples = _fixed_rows(criterion, sample, criterion.cfg.seq_exploration_samples)[0]
    greedy = _fixed_rows(criterion, sample, 1, offset=criterion.cfg.seq_exploration_samples)[0]
    return samples, greedy


def _fixed_sequences(criterion, model, sample, lambdas):
    rows = _fixed_rows(criterion, sample, 1)[0]
    return rows, rows.ne(criterion.padding_idx).long() * 2


def fixed_interp_sequences(criterion):
    """``patch``: interpolation's constructed sequences replaced by :func:`_fixed_rows`."""
    criterion.construct = partial(_fixed_sequences, criterion)


def _fixed_trajectories(criterion, model, sample):
    return _fixed_rows(criterion, sample, criterion.cfg.erac_samples)[0]


def fixed_erac_trajectories(criterion):
    """``patch``: erac's sampled trajectories replaced by :func:`_fixed_rows`."""
    criterion.trajectories = partial(_fixed_trajectories, criterion)


def fixed_erac_joint(criterion):
    """``patch``: as :func:`fixed_erac_trajectories`, with the critic marked pre-trained."""
    fixed_erac_trajectories(criterion)
    criterion.critic_batches.fill_(1)


def erac_joint(criterion):
    criterion.critic_batches.fill_(1)


def vaml_actor(criterion):
    criterion.q_batches.fill_(1)


def fixed_raml_samples(criterion):
    """``patch``: raml's random samples replaced by :func:`_fixed_draw`."""
    criterion.draw_samples = partial(_fixed_draw, criterion)


def fixed_risk_candidates(criterion):
    """``patch``: risk's sampled candidate sets replaced by :func:`_fixed_rows`."""
    criterion.candidates = partial(_fixed_candidates, criterion)


def _fixed_preference_candidates(criterion, model, sample):
    return _fixed_rows(criterion, sample, criterion.cfg.preference_candidates)[0]


def fixed_preference_candidates(criterion):
    """``patch``: preference's sampled candidates replaced by :func:`_fixed_rows`."""
    criterion.candidates = partial(_fixed_preference_candidates, criterion)


def fixed_sle_outputs(criterion):
    """``patch``: seq_exploration's samples and greedy outputs replaced by :func:`_fixed_rows`."""
    criterion.draw = partial(_fixed_outputs, criterion)


# ------------------------------------------------------------------ cases

CASES = [
    "mle", "mle_transformer", "raml", "raml_sampled", "raml_lazy", "raml_transformer", "token_smooth",
    "searnn", "searnn_reference", "searnn_learned", "searnn_mle", "critic",
    "risk", "risk_sampled", "risk_beam", "risk_transformer", "seq_exploration", "seq_exploration_sampled", "scst",
    "scst_mean_mle_sampled",
    "interpolation", "interpolation_sampled", "interpolation_transformer",
    "erac_critic", "erac_joint", "erac_joint_sampled", "erac_joint_transformer", "vaml_q", "vaml_actor",
    "vaml_actor_transformer", "multilingual_risk_beam", "multilingual_seq_exploration_sampled",
    "multilingual_raml_sampled", "preference",
]
SELF_TESTS = ["bypass", "unused_parameter"]


def make_cases(toy_data, embeddings, multilingual_data=None):
    def base(*args, arch=TINY_LSTM):
        return [toy_data, "--user-dir", USER_DIR, "--task", "seqlevel_translation", *arch,
                "--dropout", "0", "--seed", "3", *args]

    def multilingual(*args):  # translation_multi_simple_epoch, two target languages in each batch
        return [multilingual_data, "--user-dir", USER_DIR, *PIPELINES["multilingual-transformer"].argv, *args]

    mle = ["--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1"]
    raml = ["--criterion", "raml", "--raml-alpha", "0.5", "--raml-samples", "3"]
    searnn = ["--criterion", "searnn_kl", "--searnn-max-len-b", "2"]
    risk = ["--criterion", "risk", "--risk-candidates", "3", "--risk-mle-weight", "0.3", "--label-smoothing", "0.1"]
    sle = ["--criterion", "seq_exploration", "--sle-samples", "3"]
    erac = ["--criterion", "erac", "--erac-samples", "2", "--critic-embed-dim", "8", "--critic-hidden-size", "8"]
    vaml = ["--criterion", "vaml", "--vaml-samples", "2", "--critic-embed-dim", "8", "--critic-hidden-size", "8"]
    preference = ["--criterion", "preference", "--preference-candidates", "3", "--preference-pairs", "all",
                  "--preference-mle-weight", "0.3"]
    interp = ["--criterion", "interpolation", "--interp-lambdas", "0.3,0.3,0.4", "--interp-anneal", "none"]
    det = dict(deterministic_check=True)
    fixed = dict(deterministic_check=True, patch=fixed_raml_samples)
    ours = dict(imports=[THIS_MODULE])
    cases = [
        Case("mle", base(*mle), **det),
        Case("mle_transformer", base(*mle, arch=TINY_TRANSFORMER), **det),
        Case("raml", base(*raml), **fixed),
        Case("raml_sampled", base(*raml)),
        Case("raml_lazy", base(*raml, "--raml-lazy"), **fixed),
        Case("raml_transformer", base(*raml, arch=TINY_TRANSFORMER), **fixed),
        Case("token_smooth", base("--criterion", "token_smooth", "--token-smooth-alpha", "0.5",
                                  "--token-smooth-temperature", "0.5", "--token-smooth-topk", "4",
                                  "--token-embeddings", embeddings), **det),
        # sampled: learned roll-in, mixed roll-outs, K=3 tokens drawn from the policy
        Case("searnn", base(*searnn, "--searnn-roll-in", "learned", "--searnn-roll-out", "mixed",
                            "--searnn-tokens", "3", "--searnn-token-sampling", "policy"),
             batches_fn=examples(3)),
        # deterministic: all cells, every token
        Case("searnn_reference", base(*searnn, "--searnn-roll-in", "reference", "--searnn-roll-out",
                                      "reference"), batches_fn=examples(3), **det),
        Case("searnn_learned", base(*searnn, "--searnn-roll-in", "learned", "--searnn-roll-out", "learned"),
             batches_fn=examples(3), **det),
        # the reference NLL term: reference and roll-in rows in one forward of the wrapped model
        Case("searnn_mle", base(*searnn, "--searnn-roll-in", "learned", "--searnn-roll-out", "learned",
                                "--searnn-mle-weight", "0.3"), batches_fn=examples(3), **det),
        Case("critic", base("--criterion", "ddp_test_critic"), **det, **ours),
        Case("risk", base(*risk, "--risk-include-reference"), deterministic_check=True,
             patch=fixed_risk_candidates),
        Case("risk_sampled", base(*risk)),
        # candidates from fairseq's SequenceGenerator on the unwrapped model (beam search is deterministic)
        Case("risk_beam", base(*risk, "--risk-search", "beam"), **det),
        Case("risk_transformer", base(*risk, arch=TINY_TRANSFORMER), deterministic_check=True,
             patch=fixed_risk_candidates),
        Case("seq_exploration", base(*sle, "--sle-entropy-weight", "0.01"), deterministic_check=True,
             patch=fixed_sle_outputs),
        Case("seq_exploration_sampled", base(*sle)),
        Case("scst", base(*sle, "--sle-alpha", "1"), deterministic_check=True, patch=fixed_sle_outputs),
        Case("scst_mean_mle_sampled", base(*sle, "--sle-alpha", "1", "--sle-baseline", "mean",
                                           "--sle-mle-weight", "0.3")),
        Case("interpolation", base(*interp), deterministic_check=True, patch=fixed_interp_sequences),
        Case("interpolation_sampled", base(*interp)),
        Case("interpolation_transformer", base(*interp, arch=TINY_TRANSFORMER), deterministic_check=True,
             patch=fixed_interp_sequences),
        # with λ-return targets (the other erac cases with eq. 19's one-step target)
        Case("erac_critic", base(*erac, "--erac-td-lambda", "0.9"), deterministic_check=True,
             patch=fixed_erac_trajectories),
        # with the continuation targets at the trajectories' ends (the other erac cases without)
        Case("erac_joint", base(*erac, "--erac-phase", "joint", "--erac-continuations", "2"),
             deterministic_check=True, patch=fixed_erac_joint),
        Case("erac_joint_sampled", base(*erac, "--erac-phase", "joint"), patch=erac_joint),
        Case("erac_joint_transformer", base(*erac, "--erac-phase", "joint", arch=TINY_TRANSFORMER),
             deterministic_check=True, patch=fixed_erac_joint),
        Case("vaml_q", base(*vaml)),
        Case("vaml_actor", base(*vaml, "--vaml-phase", "actor"), patch=vaml_actor),
        Case("vaml_actor_transformer", base(*vaml, "--vaml-phase", "actor", arch=TINY_TRANSFORMER), patch=vaml_actor),
        # each row's own language token forced in every decode (beam search: deterministic; a fixed
        # length limit, as SequenceGenerator's a·|x| reads the batch's padded source width, which
        # differs between a rank's batch and the combined one)
        Case("multilingual_risk_beam", multilingual(*risk, "--risk-search", "beam", "--risk-max-len-a", "0",
                                                    "--risk-max-len-b", "8"), **det),
        Case("multilingual_seq_exploration_sampled", multilingual(*sle)),
        Case("multilingual_raml_sampled", multilingual(*raml)),
        # DPO against the frozen π_ref (criterion buffers, not parameters): π = π_ref at the first update
        Case("preference", base(*preference), deterministic_check=True, patch=fixed_preference_candidates),
        Case("bypass", base("--criterion", "ddp_test_bypass"), **det, **ours),
        Case("unused_parameter", base("--criterion", "ddp_test_unused"), **det, **ours),
    ]
    return {c.name: c for c in cases}


@pytest.fixture(scope="module")
def embeddings(toy_data, tmp_path_factory):
    """A tiny word2vec text file over the toy dictionary's symbols."""
    rng = random.Random(0)
    symbols = [line.split()[0] for line in (toy_data / "dict.tgt.txt").read_text().splitlines() if line.strip()]
    path = tmp_path_factory.mktemp("emb") / "vectors.txt"
    path.write_text(f"{len(symbols)} 4\n" + "".join(
        f"{s} " + " ".join(f"{rng.uniform(-1, 1):.4f}" for _ in range(4)) + "\n" for s in symbols))
    return path


@pytest.fixture(scope="module")
def reports(request, toy_data, embeddings, pipeline_data_dirs):
    """``{(backend, case): report}`` of the selected tests, all from one spawned pair."""
    selected = [(item.callspec.params["backend"], item.callspec.params["case"])
                for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec")]
    multilingual = any(name.startswith("multilingual") for _, name in selected)
    cases = make_cases(toy_data, embeddings, pipeline_data_dirs["multilingual"] if multilingual else None)
    wanted = [cases[name] for name in cases if any(name == n for _, n in selected)]
    backends = [b for b in BACKENDS if any(b == s for s, _ in selected)]
    try:
        result = run_matrix(wanted, backends)
    except AssertionError as e:  # the processes died or timed out: every test shows why
        result = e
    else:
        for (backend, _), report in result.items():
            print(backend, summary(report))
    return result


def _report(reports, backend, case):
    if isinstance(reports, Exception):
        raise reports
    return reports[backend, case]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_are_reduced(reports, backend, case):
    report = _report(reports, backend, case)
    print(summary(report))
    check_report(report)
    assert len(report["updates"]) == 2
    if case == "critic":
        assert report["criterion_has_parameters"]


@pytest.mark.parametrize("case", SELF_TESTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_harness_catches(reports, backend, case):
    """Under pytorch_ddp the bypass drifts and the unused parameter raises
    DDP's error at the second update (as a failure, not a hang); legacy_ddp
    all-reduces every gradient explicitly after backward, so both pass."""
    report = _report(reports, backend, case)
    print(summary(report))
    if backend == "legacy_ddp":
        check_report(report)
        return
    with pytest.raises(AssertionError) as failure:
        check_report(report)
    if case == "bypass":
        assert "differ across ranks" in str(failure.value)
        assert report["updates"][0]["cross_rank"]["max_rel"] > 1e-3
    else:  # the criterion's parameters are not reduced at the first update, DDP raises at the second
        assert "differ across ranks" in str(failure.value) and len(report["updates"]) == 1
        assert "Expected to have finished reduction in the prior iteration" in str(failure.value)
