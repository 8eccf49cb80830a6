"""A 2-process data-parallel harness for criterions: fairseq-train argv in, assertions out.

Why: fairseq hands a criterion the *wrapped* model (``ModuleProxyWrapper(
DistributedDataParallel(model))`` under ``--ddp-backend pytorch_ddp``) whose
attribute access returns the inner modules, so a criterion that runs its
gradient-carrying forward through ``model.encoder``/``model.decoder`` bypasses
DDP's forward: its all-reduce silently does nothing and the replicas drift.
Single-process tests cannot see that; this harness trains for a few updates on
``world_size`` CPU processes (gloo) exactly as fairseq's ``Trainer`` does and
compares the gradients of the ranks.

Per rank, for each :class:`Case` and backend (all of them share one spawned
group of processes, start-up being the costly part; each has its own gloo
process group):

* parse the argv like ``fairseq-train`` (plus ``--ddp-backend``,
  ``--distributed-world-size``, ``--cpu``), seed as ``fairseq_cli.train``
  does, build task, model and criterion;
* wrap the model as ``Trainer.model`` does (``DistributedFairseqModel(
  cfg.distributed_training, model, process_group, device)``) and the
  criterion as ``Trainer.criterion`` does (the same wrapper when
  ``utils.has_parameters(criterion)``);
* per update, as ``Trainer.train_step``: seed ``cfg.common.seed + update``,
  ``zero_grad``, ``task.train_step`` (criterion forward + backward) on this
  rank's own batch, sum ``sample_size`` over the ranks,
  ``optimizer.all_reduce_grads(model)`` (and criterion; a no-op except for
  legacy_ddp), ``optimizer.multiply_grads(world_size / total_sample_size)``,
  then fairseq's SGD step;
* after each backward, gather the flattened gradients of model and criterion
  parameters to rank 0, which checks that they match across ranks and, with
  ``deterministic_check``, that they equal the gradient of a 1-process
  replica trained on the union of the ranks' batches (normalized by its
  sample_size), update after update.

Failures never hang: every collective of a case has a timeout (its process
group's), a case's exception is recorded with its traceback and re-raised in
the parent as an ``AssertionError``, the children are killed at an overall
deadline, and DDP errors of the second update ("Expected to have finished
reduction in the prior iteration ...") show up as failures of their case.

The only shim: PyTorch >= 2 refuses ``device_ids=[0]`` for a CPU module, which
``DistributedFairseqModel`` always passes for pytorch_ddp; the child drops
``device_ids``/``output_device`` for CPU modules (what torch asks for CPU).
"""

import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

#: max |g_rank - g_0| / max |g_0| allowed across ranks (all-reduce gives identical sums)
CROSS_RANK_RTOL = 1e-6
#: the same against the 1-process gradient of the combined batch (float32 sums in another order)
REFERENCE_RTOL = 1e-5


def consecutive_examples(task, update, world_size, per_rank=4):
    """Default ``batches_fn``: rank r of update u takes ``per_rank`` consecutive
    examples of the case's split, all ranks and updates disjoint."""
    start = update * world_size * per_rank
    return [list(range(start + r * per_rank, start + (r + 1) * per_rank)) for r in range(world_size)]


def examples(per_rank):
    """A picklable ``batches_fn`` with another number of examples per rank."""
    return partial(consecutive_examples, per_rank=per_rank)


@dataclass
class Case:
    """One criterion setting to train data-parallel.

    argv: fairseq-train arguments (data dir, --user-dir, --task, --arch ...,
        --criterion ...), without --ddp-backend / --distributed-world-size.
    batches_fn(task, update, world_size) -> one list of dataset indices per
        rank (picklable: a module-level function or a functools.partial).
    deterministic_check: also compare with the 1-process gradient of the
        combined batch (only for settings without randomness: dropout 0, no
        sampling, or sampling replaced by ``patch``).
    patch(criterion): called in the child on every criterion built (the
        data-parallel one and the 1-process replica) before training, e.g. to
        replace random sampling by samples derived from the batch's ids.
    imports: modules the child imports first (e.g. one registering a criterion).
    """

    name: str
    argv: Sequence[str]
    batches_fn: Callable = consecutive_examples
    deterministic_check: bool = False
    patch: Optional[Callable] = None
    imports: Sequence[str] = ()
    updates: int = 2
    lr: float = 0.5
    split: str = "train"
    rtol: float = CROSS_RANK_RTOL
    reference_rtol: float = REFERENCE_RTOL


@dataclass
class _Spec:
    jobs: List[Tuple[str, Case]]  # (backend, case)
    world_size: int
    store: str
    collective_timeout: float
    results: str
    imports: Sequence[str] = field(default_factory=tuple)


# ----------------------------------------------------------------- parent side


def run_data_parallel(argv, backend, batches_fn=consecutive_examples, *, deterministic_check,
                      patch=None, world_size=2, timeout=300.0, **case_kw):
    """Train one criterion setting data-parallel; raise AssertionError on any
    mismatch or error (with the child's traceback).  Returns the case's report."""
    case = Case("case", list(argv), batches_fn, deterministic_check, patch, **case_kw)
    report = run_cases([case], backend, world_size=world_size, timeout=timeout)["case"]
    check_report(report)
    return report


def run_cases(cases, backend, **kw) -> Dict[str, dict]:
    """Run several cases under one backend in one spawned group of processes:
    ``{case name: report}`` (see :func:`run_matrix`)."""
    return {name: report for (_, name), report in run_matrix(cases, [backend], **kw).items()}


def run_matrix(cases, backends, *, world_size=2, timeout=None, collective_timeout=60.0,
               workdir=None) -> Dict[Tuple[str, str], dict]:
    """Run every case under every backend in ONE spawned group of
    ``world_size`` processes (start-up is the costly part), each (backend,
    case) in its own process group.

    Returns ``{(backend, case name): report}``; use :func:`check_report` to
    assert.  A report holds ``updates`` (per update: ``sample_size`` per rank,
    ``cross_rank`` and ``reference`` max relative differences with the worst
    parameter), ``failures`` (assertion messages of rank 0), ``errors``
    (tracebacks per rank) and ``package`` (the fairseq_seqlevel directory the
    children imported).  Raises AssertionError (with the children's logs) if
    the processes die or exceed ``timeout`` seconds.
    """
    assert world_size >= 2, "data parallelism needs at least 2 ranks"
    cases = list(cases)
    names = [c.name for c in cases]
    assert len(set(names)) == len(names), f"case names must be unique: {names}"
    jobs = [(backend, case) for backend in backends for case in cases]
    keys = [(backend, case.name) for backend, case in jobs]
    if timeout is None:
        timeout = 60.0 + 30.0 * len(jobs)
    with tempfile.TemporaryDirectory(prefix="ddp_harness_", dir=workdir) as tmp:
        tmp = Path(tmp)
        spec = _Spec(jobs, world_size, str(tmp / "store"), collective_timeout,
                     str(tmp / "result_rank{rank}.json"),
                     imports=tuple(sorted({m for c in cases for m in c.imports})))
        with open(tmp / "spec.pkl", "wb") as f:
            pickle.dump(spec, f)
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([str(REPO), str(TESTS)] +
                                              [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        if sys.platform.startswith("linux"):
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        procs, logs = [], []
        for rank in range(world_size):
            log = open(tmp / f"rank{rank}.log", "w+")
            logs.append(log)
            procs.append(subprocess.Popen(
                [sys.executable, "-c", "import ddp_harness; ddp_harness._child_main()", str(tmp / "spec.pkl"),
                 str(rank)], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp))
        problem = _wait(procs, timeout, grace=collective_timeout + 10)
        results = [_read_json(Path(spec.results.format(rank=r))) for r in range(world_size)]
        tails = []
        for rank, log in enumerate(logs):
            log.seek(0)
            tails.append(f"--- rank {rank} (exit {procs[rank].returncode}) ---\n{log.read()[-6000:]}")
            log.close()
        if problem is not None:
            done = [k for k in keys if all(_key(*k) in r for r in results)]
            raise AssertionError(f"{problem}; completed: {done}\n" + "\n".join(tails))
        return {k: _merge(k[1], [r.get(_key(*k)) for r in results], "\n".join(tails)) for k in keys}


def _key(backend, name):
    return f"{backend}/{name}"


def _wait(procs, timeout, grace):
    """None when every process exits 0 before ``timeout``; else a message
    (the survivors are killed: ours, by their Popen handles)."""
    deadline = time.monotonic() + timeout
    first_failure = None
    try:
        while True:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes):
                bad = [(r, c) for r, c in enumerate(codes) if c != 0]
                return None if not bad else f"rank(s) exited with errors: {bad}"
            if first_failure is None and any(c not in (None, 0) for c in codes):
                first_failure = time.monotonic()
            now = time.monotonic()
            if now > deadline:
                return f"timed out after {timeout:.0f} s (exit codes {codes})"
            if first_failure is not None and now - first_failure > grace:
                return f"a rank died and the others did not finish within {grace:.0f} s (exit codes {codes})"
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _read_json(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _merge(name, per_rank, logs):
    report = dict(per_rank[0] or {})
    report["name"] = name
    report["errors"] = {}
    for rank, res in enumerate(per_rank):
        if res is None:
            report["errors"][rank] = "no result (the process died during this case)\n" + logs
        elif res.get("error"):
            report["errors"][rank] = res["error"]
    report.setdefault("failures", [])
    report.setdefault("updates", [])
    return report


def check_report(report):
    """AssertionError listing every failed check and error of a case report."""
    problems = [f"[{report['name']}] {msg}" for msg in report.get("failures", [])]
    for rank, tb in sorted(report.get("errors", {}).items()):
        problems.append(f"[{report['name']}] rank {rank} raised:\n{tb}")
    if problems:
        raise AssertionError("\n".join(problems))


def summary(report):
    """One line: the max relative differences per update (for logs and reports)."""
    parts = []
    for u in report.get("updates", []):
        text = f"u{u['update']}: cross-rank {u['cross_rank']['max_rel']:.2e}"
        if u.get("reference"):
            text += f", vs 1-process {u['reference']['max_rel']:.2e}"
        parts.append(text)
    return f"{report['name']} ({report.get('seconds', 0):.1f} s): " + "; ".join(parts)


# ------------------------------------------------------------------ child side


def _child_main():
    spec_path, rank = sys.argv[1], int(sys.argv[2])
    import torch

    torch.set_num_threads(1)
    with open(spec_path, "rb") as f:
        spec = pickle.load(f)
    import importlib

    for module in spec.imports:
        importlib.import_module(module)
    import torch.distributed as dist

    from fairseq_seqlevel import compat  # CPU pytorch_ddp (compat.allow_cpu_pytorch_ddp)  # noqa: F401
    timeout = timedelta(seconds=spec.collective_timeout)
    store = dist.FileStore(spec.store, spec.world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=spec.world_size, timeout=2 * timeout)
    results = {}
    out = Path(spec.results.format(rank=rank))
    for index, (backend, case) in enumerate(spec.jobs):
        # a fresh group per case: a case that failed mid-collective cannot desynchronize the next one
        group = dist.new_group(backend="gloo", timeout=timeout)
        report = results[_key(backend, case.name)] = {"backend": backend}
        began = time.monotonic()
        try:
            _run_case(case, backend, spec, rank, group, report)
        except BaseException:
            report["error"] = traceback.format_exc()  # the updates done so far stay in the report
        report["seconds"] = round(time.monotonic() - began, 2)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(results))
        os.replace(tmp, out)
        # all ranks leave the case together, even when one failed alone and the
        # other waited for a collective until its timeout
        store.set(f"done/{index}/{rank}", "1")
        store.wait([f"done/{index}/{r}" for r in range(spec.world_size)], 3 * timeout)
    dist.destroy_process_group()


def _build(case, backend, world_size, rank):
    """(cfg, task, model, criterion) as fairseq_cli.train builds them."""
    import numpy as np
    from fairseq import options, tasks, utils
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    argv = [str(a) for a in case.argv] + [
        "--ddp-backend", backend, "--distributed-world-size", str(world_size), "--cpu"]
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, argv)
    cfg = convert_namespace_to_omegaconf(args)
    cfg.distributed_training.distributed_rank = rank
    np.random.seed(cfg.common.seed)
    utils.set_torch_seed(cfg.common.seed)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    return cfg, task, model, criterion


def _named_params(model, criterion):
    out = [("model." + n, p) for n, p in model.named_parameters() if p.requires_grad]
    return out + [("criterion." + n, p) for n, p in criterion.named_parameters() if p.requires_grad]


def _flat(named, what):
    import torch

    parts = []
    for _, p in named:
        t = p.grad if what == "grad" else p.data
        parts.append(torch.zeros(p.numel(), dtype=torch.float64) if t is None else t.detach().double().reshape(-1))
    return torch.cat(parts)


def _compare(named, base, other):
    """(max |other - base| / max |base|, the worst parameter's name, scale)."""
    scale = float(base.abs().max()) if base.numel() else 0.0
    worst, worst_name, offset = 0.0, None, 0
    for name, p in named:
        n = p.numel()
        d = float((other[offset:offset + n] - base[offset:offset + n]).abs().max()) if n else 0.0
        if d > worst or worst_name is None:
            worst, worst_name = d, name
        offset += n
    return {"max_rel": worst / max(scale, 1e-30), "max_abs": worst, "worst": worst_name, "scale": scale}


def _gather(tensor, group, rank, world_size):
    """All ranks' copies of ``tensor`` on rank 0 (None elsewhere)."""
    import torch
    import torch.distributed as dist

    bucket = [torch.empty_like(tensor) for _ in range(world_size)] if rank == 0 else None
    dist.gather(tensor, bucket, dst=0, group=group)
    return bucket


def _sgd(params, lr):
    from argparse import Namespace

    from fairseq.optim.sgd import SGD

    return SGD(Namespace(lr=[lr], momentum=0.0, weight_decay=0.0), params)


def _train_step(task, model, criterion, optimizer, sample, update):
    """``Trainer.train_step`` up to the gradient all-reduce: (sample_size)."""
    from fairseq import utils

    model.train()
    criterion.train()
    optimizer.zero_grad()
    _, sample_size, _ = task.train_step(sample=sample, model=model, criterion=criterion,
                                        optimizer=optimizer, update_num=update)
    return float(sample_size)


def _run_case(case, backend, spec, rank, group, report):
    import copy

    import torch
    import torch.distributed as dist
    from fairseq import models, utils

    import fairseq_seqlevel

    world_size, device = spec.world_size, torch.device("cpu")
    failures = []
    report.update({"package": os.path.dirname(fairseq_seqlevel.__file__), "failures": failures, "updates": []})
    cfg, task, inner_model, inner_criterion = _build(case, backend, spec.world_size, rank)
    criterion_has_params = utils.has_parameters(inner_criterion)
    report["criterion_has_parameters"] = criterion_has_params
    reference = None
    if case.deterministic_check and rank == 0:
        keep = {id(task): task}  # the replica shares the task (and its dictionaries)
        ref_model, ref_criterion = copy.deepcopy(inner_model, keep), copy.deepcopy(inner_criterion, keep)
        reference = (ref_model, ref_criterion,
                     _sgd([p for _, p in _named_params(ref_model, ref_criterion)], case.lr))
        if case.patch is not None:
            case.patch(ref_criterion)
    if case.patch is not None:
        case.patch(inner_criterion)

    # as Trainer.model / Trainer.criterion
    model = models.DistributedFairseqModel(cfg.distributed_training, inner_model, process_group=group,
                                           device=device)
    criterion = inner_criterion
    if criterion_has_params:
        criterion = models.DistributedFairseqModel(cfg.distributed_training, inner_criterion,
                                                   process_group=group, device=device)
    named = _named_params(inner_model, inner_criterion)
    optimizer = _sgd([p for _, p in named], case.lr)  # Trainer: model + criterion parameters

    start = _gather(_flat(named, "data"), group, rank, world_size)
    if rank == 0:
        same = _compare(named, start[0], start[1]) if world_size > 1 else None
        report["initial_params"] = same
        if same and same["max_abs"] > 0:
            failures.append(f"initial parameters differ across ranks: {same}")

    task.load_dataset(case.split)
    dataset = task.dataset(case.split)
    for update in range(case.updates):
        parts = case.batches_fn(task, update, world_size)
        assert len(parts) == world_size, f"batches_fn gave {len(parts)} batches for {world_size} ranks"
        sample = dataset.collater([dataset[i] for i in parts[rank]])

        utils.set_torch_seed(cfg.common.seed + update)  # Trainer._set_seed
        local_size = _train_step(task, model, criterion, optimizer, sample, update)
        sizes = _gather(torch.tensor([local_size], dtype=torch.float64), group, rank, world_size)
        total = torch.tensor(local_size, dtype=torch.float64)
        dist.all_reduce(total, group=group)  # Trainer._aggregate_logging_outputs sums sample_size
        total = float(total)
        optimizer.all_reduce_grads(model)  # legacy_ddp all-reduces here; pytorch_ddp did in backward
        if criterion_has_params:
            optimizer.all_reduce_grads(criterion)
        optimizer.multiply_grads(world_size / (total or 1.0))  # numer = data_parallel_world_size

        grads = _gather(_flat(named, "grad"), group, rank, world_size)
        if rank == 0:
            entry = {"update": update, "sample_size": [float(s) for s in sizes], "total_sample_size": total}
            cross = max((_compare(named, grads[0], g) for g in grads[1:]), key=lambda c: c["max_rel"])
            entry["cross_rank"] = cross
            if cross["scale"] == 0:
                failures.append(f"update {update}: all gradients are zero (nothing is checked)")
            if not cross["max_rel"] <= case.rtol:
                failures.append(
                    f"update {update}: gradients differ across ranks after reduction: max relative "
                    f"difference {cross['max_rel']:.3e} (> {case.rtol:g}) at {cross['worst']}")
            if reference is not None:
                try:
                    entry["reference"] = _reference_step(case, cfg, task, dataset, parts, reference, named,
                                                         grads[0], update)
                except Exception:
                    entry["reference"] = None
                    failures.append(f"update {update}: the 1-process replica raised:\n{traceback.format_exc()}")
                ref = entry["reference"]
                if ref is not None and not ref["max_rel"] <= case.reference_rtol:
                    failures.append(
                        f"update {update}: reduced gradient differs from the 1-process gradient of the "
                        f"combined batch: max relative difference {ref['max_rel']:.3e} "
                        f"(> {case.reference_rtol:g}) at {ref['worst']}")
            report["updates"].append(entry)
        optimizer.step()  # task.optimizer_step

    final = _gather(_flat(named, "data"), group, rank, world_size)
    if rank == 0:
        report["final_params"] = max((_compare(named, final[0], f) for f in final[1:]),
                                     key=lambda c: c["max_rel"])
    dist.barrier(group=group)


def _reference_step(case, cfg, task, dataset, parts, reference, named, reduced, update):
    """The 1-process update on the combined batch; its normalized gradient vs ``reduced``."""
    from fairseq import utils

    ref_model, ref_criterion, ref_optimizer = reference
    combined = dataset.collater([dataset[i] for part in parts for i in part])
    utils.set_torch_seed(cfg.common.seed + update)
    size = _train_step(task, ref_model, ref_criterion, ref_optimizer, combined, update)
    ref_optimizer.multiply_grads(1.0 / (size or 1.0))  # numer = 1 without data parallelism
    ref_named = _named_params(ref_model, ref_criterion)
    assert [n for n, _ in ref_named] == [n for n, _ in named]
    result = _compare(named, _flat(ref_named, "grad"), reduced)
    result["sample_size"] = size
    ref_optimizer.step()
    return result
