"""In-process fixtures for timing and probing criterions: a speed setting's fairseq
task, model (pre-trained when its checkpoint exists) and fixed batches (real training
batches or random Zipf-token batches over a synthetic dictionary), criterions built
from config rows, and one forward+backward step. Used by benchmarks.speed,
benchmarks.gpu_speed and the probes."""

import os
import sys
import time
from pathlib import Path

from benchmarks.checks import import_plugin
from benchmarks.config import CONTROL, DEFAULT_CONFIG, DEFAULT_WORKDIR, REPO, USER_DIR, load_config
from benchmarks.plan import criterion_flags, pre_phase_of, pre_phase_speed_name, speed_entry
from benchmarks.runs import ensure_data, ensure_token_embeddings, expand, placeholders, task_mapping


def quiet():
    """fairseq/hydra print warnings and INFO lines on import; keep the report readable."""
    import logging
    import warnings

    warnings.simplefilter("ignore")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)


def log(msg=""):
    print(msg, flush=True)


def probe_setting(name="bible", batches=None, criterions=(), experiments=None):
    """A speed setting built for a probe (benchmarks/probes): the task's model and ``batches``
    fixed training batches (None: the setting's own count); ``experiments="all"`` makes every
    experiment's row a criterion the probe can build."""
    setting = Setting(load_config(DEFAULT_CONFIG, experiments=experiments), name, DEFAULT_WORKDIR)
    if batches is not None:
        setting.num_batches = batches
    setting.prepare_files(list(criterions))
    return setting.build()


class Setting:
    """One speed setting: fairseq task + model + fixed batches (built once)."""

    def __init__(self, cfg, name, workdir):
        self.cfg, self.name, self.workdir = cfg, name, Path(workdir)
        self.spec = cfg["speed"]["settings"][name]
        self.task_name = self.spec["task"]
        self.synthetic = "synthetic_vocab" in self.spec
        self.quick = cfg["mode"] == "quick"
        self.num_batches = int(cfg["speed"].get("batches", self.spec.get("batches", 4))) if self.quick \
            else int(self.spec.get("batches", 4))

    # -- argv ------------------------------------------------------------
    def mapping(self):
        if self.synthetic:
            return {"python": sys.executable, "repo": REPO, "workdir": self.workdir,
                    "data": self.data_dir, "token_embeddings": self.data_dir / "token_embeddings.txt"}
        return task_mapping(self.cfg, self.task_name, self.workdir)

    def base_argv(self):
        task = self.cfg["tasks"][self.task_name]
        mapping = self.mapping()
        train_flags = (["--task", "seqlevel_translation", "-s", "src", "-t", "tgt"] if self.synthetic
                       else task["train_flags"])
        return [str(self.data_dir), "--user-dir", str(USER_DIR), "--seed", "1", "--num-workers", "0",
                *expand(train_flags + task["model_flags"] + task["optim_flags"], mapping)]

    def criterion_flags(self, criterion):
        return expand(criterion_flags(self.cfg, criterion, self.task_name), self.mapping())

    # -- building --------------------------------------------------------
    def prepare_files(self, criterions):
        """Data (real: prepared if missing; synthetic: written) and token embeddings if needed."""
        if self.synthetic:
            self.data_dir = write_synthetic_data(self.workdir / "speed" / f"synthetic_{self.spec['synthetic_vocab']}",
                                                 self.spec["synthetic_vocab"])
            return
        self.data_dir = ensure_data(self.cfg, self.task_name, self.workdir)
        if any("token_embeddings" in placeholders(criterion_flags(self.cfg, speed_entry(self.cfg, c)[0],
                                                                  self.task_name))
               for c in criterions):
            ensure_token_embeddings(self.cfg, self.task_name, self.workdir)

    def build(self):
        import torch

        from fairseq.dataclass.utils import convert_namespace_to_omegaconf
        from fairseq import tasks

        args = parse_fairseq(self.base_argv() + criterion_flags(self.cfg, CONTROL, self.task_name))
        self.fs_cfg = convert_namespace_to_omegaconf(args)
        self.task = tasks.setup_task(self.fs_cfg.task)
        torch.manual_seed(1)
        self.model = self.task.build_model(self.fs_cfg.model)
        self.trained_from = None
        if self.spec.get("checkpoint"):
            # a trained model: samples stop near the reference length (an untrained one
            # runs every sample to its length cap, which inflates the sampling criterions)
            path = Path(expand([self.spec["checkpoint"]], self.mapping())[0])
            if path.exists():
                state = torch.load(path, map_location="cpu", weights_only=False)
                self.model.load_state_dict(state["model"])
                self.trained_from = str(path)
            else:
                log(f"[{self.name}] {path} not found: timing an untrained model "
                    "(run benchmarks.quality for the task first)")
        self.model.train()
        self.batches = self.synthetic_batches() if self.synthetic else self.real_batches()
        return self

    def real_batches(self):
        from fairseq import utils

        self.task.load_dataset("train")
        dataset = self.task.dataset("train")
        ds_cfg = self.fs_cfg.dataset
        itr = self.task.get_batch_iterator(
            dataset=dataset, max_tokens=ds_cfg.max_tokens, max_sentences=ds_cfg.batch_size,
            max_positions=utils.resolve_max_positions(self.task.max_positions(), self.model.max_positions()),
            ignore_invalid_inputs=True, required_batch_size_multiple=ds_cfg.required_batch_size_multiple,
            seed=1, num_workers=0,
        ).next_epoch_itr(shuffle=True)
        return [next(itr) for _ in range(self.num_batches)]

    def synthetic_batches(self):
        import torch
        from fairseq.data import LanguagePairDataset

        dictionary = self.task.target_dictionary
        n_sent = int(self.spec.get("synthetic_sentences", 128))
        lo, hi = self.spec.get("synthetic_len", [10, 40])
        gen = torch.Generator().manual_seed(0)
        first = dictionary.nspecial
        weights = 1.0 / torch.arange(1, len(dictionary) - first + 1, dtype=torch.float)  # Zipf
        batches = []
        for _ in range(self.num_batches):
            def sentences():
                lengths = torch.randint(lo, hi + 1, (n_sent,), generator=gen)
                return [torch.cat([torch.multinomial(weights, int(n), replacement=True, generator=gen) + first,
                                   torch.tensor([dictionary.eos()])]) for n in lengths]
            src, tgt = sentences(), sentences()
            ds = LanguagePairDataset(src, [len(s) for s in src], dictionary, tgt, [len(t) for t in tgt],
                                     dictionary, left_pad_source=self.task.cfg.left_pad_source,
                                     left_pad_target=self.task.cfg.left_pad_target)
            batches.append(ds.collater([ds[i] for i in range(n_sent)]))
        return batches

    def build_criterion(self, name):
        """The criterion of a speed.json name.  A criterion with a ``pre_phase`` (erac
        after its critic phase) starts from the state one pre-phase step leaves, as its
        fine-tuning run starts from the pre-phase's checkpoint; ``NAME_PRE`` is the
        pre-phase step itself."""
        from fairseq.dataclass.utils import convert_namespace_to_omegaconf

        criterion, phase = speed_entry(self.cfg, name)
        pre = pre_phase_of(self.cfg, criterion)
        flags = expand(pre["flags"], self.mapping()) if phase == "pre" else self.criterion_flags(criterion)
        args = parse_fairseq(self.base_argv() + flags)
        built = self.task.build_criterion(convert_namespace_to_omegaconf(args).criterion)
        if pre and phase is None:
            before = self.build_criterion(pre_phase_speed_name(criterion, pre))
            step(self.model, before, self.batches[0])
            built.load_state_dict(before.state_dict())
        return built

    def describe(self):
        sent = sum(b["nsentences"] for b in self.batches)
        toks = sum(b["ntokens"] for b in self.batches)
        return {"task": self.task_name, "synthetic": self.synthetic, "vocab": len(self.task.target_dictionary),
                "batches": len(self.batches), "sentences": sent, "target_tokens": toks,
                "params": sum(p.numel() for p in self.model.parameters()), "trained_from": self.trained_from}


def parse_fairseq(argv):
    from fairseq import options

    import_plugin()
    parser = options.get_training_parser()
    return options.parse_args_and_arch(parser, [str(a) for a in argv])


def write_synthetic_data(directory, vocab):
    """A data dir with a joined dictionary of exactly ``vocab`` entries (4 specials
    included) and random 64-d token embeddings over it; only dictionaries, no data."""
    import torch

    directory = Path(directory)
    emb = directory / "token_embeddings.txt"
    if emb.exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    n = vocab - 4  # fairseq adds <s> <pad> </s> <unk>
    lines = [f"t{i} {n - i}" for i in range(n)]
    for side in ("src", "tgt"):
        (directory / f"dict.{side}.txt").write_text("\n".join(lines) + "\n")
    gen = torch.Generator().manual_seed(0)
    vectors = torch.randn(vocab, 64, generator=gen)
    symbols = ["<s>", "<pad>", "</s>", "<unk>"] + [f"t{i}" for i in range(n)]
    tmp = emb.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write(f"{vocab} 64\n")
        for sym, row in zip(symbols, vectors.tolist()):
            f.write(sym + " " + " ".join(f"{x:.5f}" for x in row) + "\n")
    os.replace(tmp, emb)
    return directory


def step(model, criterion, batch):
    """(wall seconds, process CPU seconds) of one forward+backward."""
    model.zero_grad(set_to_none=True)
    criterion.zero_grad(set_to_none=True)  # a critic's gradients
    wall, cpu = time.perf_counter(), time.process_time()
    loss, _, _ = criterion(model, batch)
    loss.backward()
    return time.perf_counter() - wall, time.process_time() - cpu
