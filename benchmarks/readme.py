"""README.md's generated parts, so they cannot drift from the results and the config: the
criterion table (Δ vs MLE with its 95% interval over pre-trained models from
results/quality.json, the step cost from results/speed.json) and one fine-tuning command
per criterion (the Bible benchmark's flags from config.toml).

    python -m benchmarks.readme            # rewrite the parts between their markers
    python -m benchmarks.readme --check    # exit 1 naming a stale part (tests/test_readme.py)
"""

import argparse
import shlex
import sys

from benchmarks import config as C, plan as P, stats
from benchmarks.util import read_json

README = C.REPO / "README.md"
TASKS = (("bible_es_en", "Bible es→en Δ BLEU"), ("spelling_0.3", "spelling p=0.3 Δ edit err."),
         ("spelling_0.5", "spelling p=0.5 Δ edit err."))
# benchmark row: (criterion as run, paper, when to use it, from the benchmark). Each line
# is hand-written; the numbers beside it are generated.
ROWS = {
    "raml": ("`raml`", "Elbayad et al. 2018", "first to try: 2× MLE, no decoding, never behind; "
             "+0.20 on Bible at four epochs"),
    "tok_seq": ("`raml` + `--token-smooth-*` (Tok-Seq)", "Elbayad et al. 2018", "raml plus token "
                "neighbours; needs target embeddings, no gain over raml measured"),
    "token_smooth": ("`token_smooth`", "Elbayad et al. 2018", "free (MLE's cost); no gain measured at our scale"),
    "searnn_kl": ("`searnn_kl`", "Leblond et al. 2018", "short outputs with an edit-type cost (spelling "
                  "p=0.5); roll-outs make it costly on sentences"),
    "erac": ("`erac`", "Dai et al. 2018", "not at the authors' settings here: the critic teaches the actor "
             "not to stop (Bible)"),
    "ac": ("`erac --erac-tau 0` (AC)", "Bahdanau et al. 2017 as Dai et al. 2018", "as erac"),
    "vaml": ("`vaml`", "Dai et al. 2018", "ahead on Bible, +1.13 at four epochs; needs a "
             "critic phase first"),
    "interpolation": ("`interpolation`", "Tan et al. 2019", "a tie at one epoch; its validation-driven "
                      "annealing moves on noise from a converged model"),
    "ss": ("`interpolation` (scheduled sampling)", "Bengio et al. 2015 as Tan et al. 2019", "a tie"),
    "risk": ("`risk`", "Shen et al. 2016; Edunov et al. 2018", "a tie with sampled candidates "
             "(Q is nearly one-hot: see risk_q_max)"),
    "risk_beam": ("`risk --risk-search beam`", "Edunov et al. 2018", "beam candidates: ahead on both "
                  "Bible models"),
    "seq_exploration": ("`seq_exploration`", "Chen et al. 2019", "noisy short outputs (spelling p=0.5); "
                        "~3 BLEU behind on Bible (most samples score below the greedy baseline)"),
    "scst": ("`seq_exploration --seq-exploration-alpha 1` (SCST)", "Rennie et al. 2017 as Chen et al. 2019",
             "as seq_exploration"),
}
TABLE = "criterions"
COMMANDS = "commands"
SHOWN = {"--num-workers", "--no-progress-bar", "--log-format", "--log-interval", "--no-epoch-checkpoints",
         "--no-save-optimizer-state", "--validate-interval-updates", "--user-dir"}  # the harness's own flags, left out


def _interval(entry, higher_is_better):
    if entry is None or entry.get("delta") is None:
        return "–"
    text = f"{entry['delta']:+.2f}"
    if entry.get("delta_ci95") is not None:
        lo, hi = entry["delta"] - entry["delta_ci95"], entry["delta"] + entry["delta_ci95"]
        text += f" [{lo:+.2f}, {hi:+.2f}]"
        word = stats.verdict(entry, higher_is_better)
        text = f"**{text}**" if word == "ahead" else f"{text} behind" if word == "behind" else text
    else:
        text += f" (1 model, {entry['delta_n']} run{'s' if entry['delta_n'] > 1 else ''})"
    return text


def criterion_table(cfg, rows, speed):
    agg = stats.aggregate(rows, controls={c: P.control_of(cfg, c) for c in cfg["criterions"]})
    head = ["criterion", "paper", "step vs MLE (Bible)", *(title for _, title in TASKS), "use it when"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, (shown, paper, when) in ROWS.items():
        by = (speed or {}).get(name, {}).get("by_setting", {}).get("bible", {})
        step = f"{by['step_time_vs_mle']:.1f}×" if by.get("step_time_vs_mle") else "–"
        cells = [_interval(agg.get(task, {}).get(name), cfg["tasks"][task]["higher_is_better"])
                 for task, _ in TASKS]
        lines.append(f"| {shown} | {paper} | {step} | " + " | ".join(cells) + f" | {when} |")
    return "\n".join(lines)


def _groups(words):
    """fairseq-train options as [(flag, values)], a repeated flag once, at its last place and
    with its last values (argparse's rule), without the harness's own flags."""
    groups = []
    for word in words:
        if word.startswith("--") or not groups:
            groups.append((word, []))
        else:
            groups[-1][1].append(word)
    last = {flag: i for i, (flag, _) in enumerate(groups)}
    return [g for i, g in enumerate(groups) if last[g[0]] == i and g[0] not in SHOWN]


def _wrap(words, indent="    ", width=100):
    lines, line = [], ""
    for word in words:
        if line.strip() and len(line) + len(word) > width:
            lines.append(line + " \\")
            line = indent
        line += ("" if not line.strip() else " ") + word
    return "\n".join(lines + [line])


def commands(cfg, task="bible_es_en"):
    """The benchmark's pre-training and fine-tuning commands on ``task`` as seqlevel-train
    lines: the flags every run shares once as $BIBLE, those every fine-tuning shares as $FT
    (a later flag wins over $FT's, as argparse reads them)."""
    from benchmarks import runs as R

    t = cfg["tasks"][task]
    workdir = "work/bench"  # where the benchmark builds the token embeddings

    def options(cmd):
        words = [str(a) for a in cmd[cmd.index("fairseq_cli.train") + 2:]]  # after the data path
        return _groups(words)

    start = "ckpt/mle/checkpoint_last.pt"
    runs = [(None, R.pretrain_command(cfg, task, "ckpt/mle", workdir))]
    for name in ROWS:
        crit = cfg["criterions"][name]
        if crit.get("pre_phase"):
            phase = crit["pre_phase"]["name"]
            runs.append((f"# {name}: its {phase} phase, then the fine-tuning from it",
                         R.finetune_command(cfg, task, name, 1, f"ckpt/{name}_{phase}", start, workdir, phase="pre")))
            runs.append((None, R.finetune_command(cfg, task, name, 1, f"ckpt/{name}", f"ckpt/{name}_{phase}/"
                                                  "checkpoint_last.pt", workdir)))
        else:
            runs.append((None, R.finetune_command(cfg, task, name, 1, f"ckpt/{name}", start, workdir)))
    groups = [options(cmd) for _, cmd in runs]
    shared = _groups(t["train_flags"] + t["model_flags"] + t["optim_flags"])
    ft = [("--seed", ["1"]), *_groups(t.get("finetune_flags", [])),
          ("--max-update", [str(t["finetune_updates"])]), ("--finetune-from-model", [start])]
    names = {flag for flag, _ in shared}
    if any(names - {flag for flag, _ in g} for g in groups):
        raise ValueError("a benchmark command lacks one of the task's shared flags")
    flat = lambda gs: [" ".join((flag, *values)) for flag, values in gs]  # noqa: E731  (wrapped as units)
    lines = [f"# from the repository root; {t['data']} as ./run-demo.sh prepares it",
             _wrap([f'BIBLE="{t["data"]}', *flat(shared)]) + '"',
             _wrap(['FT="$BIBLE', *flat(ft)]) + '"',
             "# MLE pre-training (the benchmarks' model)",
             _wrap(["seqlevel-train", "$BIBLE", *flat(x for x in groups[0] if x not in shared)]),
             f"# {t['finetune_updates']} updates of each criterion from it (the benchmark's settings, "
             "benchmarks/config.toml)"]
    for (comment, _), g in zip(runs[1:], groups[1:]):
        own = [x for x in g if x not in shared and x not in ft]
        lines += [comment] if comment else []
        lines.append(_wrap(["seqlevel-train", "$FT", *flat(own)]))
    return "```bash\n" + "\n".join(lines) + "\n```"


def parts(cfg=None, rows=None, speed=None):
    cfg = cfg or C.load_config(experiments=C.experiments_defining(ROWS, skip=()))
    rows = rows if rows is not None else read_json(C.DEFAULT_RESULTS / "quality.json", [])
    speed = speed if speed is not None else read_json(C.DEFAULT_RESULTS / "speed.json", {})
    return {TABLE: criterion_table(cfg, rows, speed), COMMANDS: commands(cfg)}


def rewrite(text, generated):
    """``text`` with each ``<!-- generated:NAME -->`` ... ``<!-- /generated:NAME -->`` part replaced."""
    for name, body in generated.items():
        start, end = f"<!-- generated:{name} -->", f"<!-- /generated:{name} -->"
        if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
            raise ValueError(f"README.md needs one {start} ... {end} pair")
        before, rest = text.split(start)
        _, after = rest.split(end)
        text = f"{before}{start}\n{body}\n{end}{after}"
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if README.md's generated parts are stale")
    args = p.parse_args(argv)
    text = README.read_text()
    try:
        new = rewrite(text, parts())
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.check:
        if new != text:
            print("README.md's generated parts are stale: run python -m benchmarks.readme", file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
