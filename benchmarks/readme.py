"""The generated parts of README.md and docs/, so they cannot drift from the results and the
config: README's criterion table (Δ vs MLE with its 95% interval over pre-trained models from
results/quality.json, the step cost from results/speed.json), one fine-tuning command per
criterion (docs/commands.md: the Bible benchmark's flags from config.toml), and the papers'
orderings checked on quality.json (docs/benchmarks.md).

    python -m benchmarks.readme            # rewrite the parts between their markers
    python -m benchmarks.readme --check    # exit 1 naming a stale file (tests/test_readme.py)
"""

import argparse
import shlex
import sys

from benchmarks import config as C, plan as P, stats
from benchmarks.util import read_json

README = C.REPO / "README.md"
DOC = C.REPO / "docs" / "benchmarks.md"
COMMANDS_DOC = C.REPO / "docs" / "commands.md"
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
    "erac": ("`erac`", "Dai et al. 2018", "not yet: on Bible the one-epoch critic teaches the actor not to "
             "stop (outputs ~24% longer), with eq. 20's entropy term or the authors' (erac_l2, the same BLEU)"),
    "ac": ("`erac --erac-tau 0` (AC)", "Bahdanau et al. 2017 as Dai et al. 2018", "as erac"),
    "vaml": ("`vaml --vaml-tau 0.1`", "Dai et al. 2018", "ahead on Bible, +1.13 at four epochs; needs a "
             "critic phase first"),
    "vaml_tau04": ("`vaml` (τ = 0.4, the authors')", "Dai et al. 2018", "the default since issue 44: beat τ = 0.1 "
                   "in every spelling run; above MLE in all 4 Bible runs; at four epochs ahead of MLE on Bible "
                   "and spelling (every run), below raml's error on spelling"),
    "interpolation": ("`interpolation`", "Tan et al. 2019", "a tie at one epoch; its validation-driven "
                      "annealing moves on noise from a converged model"),
    "ss": ("`interpolation` (scheduled sampling)", "Bengio et al. 2015 as Tan et al. 2019", "a tie"),
    "risk": ("`risk --risk-score sum`", "Shen et al. 2016", "the default until issue 44: "
             "summed scores at α = 1 make Q nearly one-hot (risk_q_max ≈ 0.9); a tie"),
    "risk_lennorm": ("`risk` (length-normalized scores)", "Edunov et al. 2018", "the default since issue 44: Q "
                     "spreads over the candidates; above summed scores in all 4 Bible runs (+0.44)"),
    "risk_beam": ("`risk --risk-search beam --risk-score sum`", "Edunov et al. 2018", "beam candidates: ahead on "
                  "both Bible models"),
    "risk_beam_mean": ("`risk --risk-search beam`", "Edunov et al. 2018", "beam candidates at the default "
                       "score: ahead of MLE on Bible (both models agree); Q near uniform over the beam; on "
                       "spelling behind sampled candidates"),
    "seq_exploration": ("`seq_exploration`", "Chen et al. 2019", "noisy short outputs (spelling p=0.5); "
                        "~3 BLEU behind on Bible (most samples score below the greedy baseline)"),
    "scst": ("`seq_exploration --seq-exploration-alpha 1` (SCST)", "Rennie et al. 2017 as Chen et al. 2019",
             "as seq_exploration"),
}
TABLE = "criterions"
COMMANDS = "commands"
ORDERINGS_PART = "orderings"
# what each paper's results table ranks: (claim (paper), its pairs as (better, worse) criterions
# of quality.json). Hand-written; each pair is checked on every task where the two share runs.
ORDERINGS = [
    ("Tok-Seq ≥ RAML ≥ MLE (elbayad2018)",
     [("tok_seq", "raml"), ("raml", "mle"), ("tok_seq_e4", "raml_e4"), ("raml_e4", "mle_e4")]),
    ("SeaRNN (KL) > MLE (leblond2018)", [("searnn_kl", "mle")]),
    ("ERAC > AC > MLE (dai2018)", [("erac", "ac"), ("ac", "mle")]),
    ("VAML ≥ RAML, VAML > MLE (dai2018)",
     [("vaml", "raml"), ("vaml_e4", "raml_e4"), ("vaml", "mle"), ("vaml_e4", "mle_e4"),
      ("vaml_tau04", "raml"), ("vaml_tau04_e4", "raml_e4"), ("vaml_tau04", "mle"), ("vaml_tau04_e4", "mle_e4")]),
    ("interpolation ≥ RAML > MLE (tan2019)", [("interpolation", "raml"), ("raml", "mle")]),
    ("interpolation > SS (tan2019)", [("interpolation", "ss")]),
    ("SLE ≥ SCST > MLE (chen2019)", [("seq_exploration", "scst"), ("scst", "mle")]),
    ("MRT > MLE (shen2016; edunov2018)",
     [("risk", "mle"), ("risk_beam", "mle"), ("risk_lennorm", "mle"), ("risk_beam_mean", "mle")]),
    ("the papers' / authors' settings beat ours and MLE (issue 44)",
     [("risk_lennorm", "risk"), ("risk_beam_mean", "risk_beam"), ("vaml_tau04", "vaml"),
      ("vaml_tau04_e4", "vaml_e4"), ("interpolation_rollback", "interpolation"), ("erac_l2", "erac")]),
    ("DPO > MLE, CPO > MLE (beyond the papers)", [("preference_dpo", "mle"), ("preference_cpo", "mle")]),
]
METRICS = {"bleu": "BLEU", "edit_error": "edit error"}
SHOWN = {"--num-workers", "--no-progress-bar", "--log-format", "--log-interval", "--no-epoch-checkpoints",
         "--no-save-optimizer-state", "--validate-interval-updates", "--user-dir"}  # the harness's own flags, left out


def _numbers(entry):
    """Δ and its 95% interval over models: "+0.12 [-0.30, +0.54]" ("+0.12" with one model)."""
    text = f"{entry['delta']:+.2f}"
    if entry.get("delta_ci95") is not None:
        lo, hi = entry["delta"] - entry["delta_ci95"], entry["delta"] + entry["delta_ci95"]
        text += f" [{lo:+.2f}, {hi:+.2f}]"
    return text


def _interval(entry, higher_is_better):
    if entry is None or entry.get("delta") is None:
        return "–"
    text = _numbers(entry)
    if entry.get("delta_ci95") is not None:
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


def orderings_table(cfg, rows):
    """The papers' orderings (ORDERINGS) on quality.json's ``rows``: per claim, task and pair,
    Δ = better − worse paired by (pre-trained model, seed), its interval over models, and
    whether it has the claim's sign (lower is better where the task's metric says so)."""
    head = ["claim (paper)", "task, metric", "better − worse: Δ [95% CI over models]",
            "pairs (models × seeds)", "holds?"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for claim, pairs in ORDERINGS:
        shown = claim
        for task, t in cfg["tasks"].items():
            for better, worse in pairs:
                two = [r for r in rows if r["task"] == task and r["criterion"] in (better, worse)]
                keys = {c: {stats.run_key(r) for r in two if r["criterion"] == c} for c in (better, worse)}
                shared = keys[better] & keys[worse]
                if not shared:
                    continue
                entry = stats.aggregate(two, controls={better: worse})[task][better]
                seeds = [sum(1 for m, _ in shared if m == model) for model in sorted({m for m, _ in shared})]
                runs = (f"{len(seeds)} × {seeds[0]}" if len(set(seeds)) == 1
                        else f"{len(seeds)} ({' + '.join(map(str, seeds))} seeds)")
                hib = t["higher_is_better"]
                sign = "✓" if (entry["delta"] if hib else -entry["delta"]) > 0 else "✗"
                word = stats.verdict(entry, hib)
                holds = {"ahead": "✓ (ahead)", "behind": "✗ (behind)", "tie": sign, None: f"{sign} (1 model)"}[word]
                metric = METRICS.get(two[0]["metric"], two[0]["metric"])
                lines.append(f"| {shown} | {task}, {metric} {'↑' if hib else '↓'} | {better} − {worse}: "
                             f"{_numbers(entry)} | {runs} | {holds} |")
                shown = ""
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
    """{file: {part: its generated text}}."""
    cfg = cfg or C.load_config(experiments=C.experiments_defining(ROWS, skip=()))
    rows = rows if rows is not None else read_json(C.DEFAULT_RESULTS / "quality.json", [])
    speed = speed if speed is not None else read_json(C.DEFAULT_RESULTS / "speed.json", {})
    return {README: {TABLE: criterion_table(cfg, rows, speed)}, COMMANDS_DOC: {COMMANDS: commands(cfg)},
            DOC: {ORDERINGS_PART: orderings_table(cfg, rows)}}


def rewrite(text, generated):
    """``text`` with each ``<!-- generated:NAME -->`` ... ``<!-- /generated:NAME -->`` part replaced."""
    for name, body in generated.items():
        start, end = f"<!-- generated:{name} -->", f"<!-- /generated:{name} -->"
        if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
            raise ValueError(f"needs one {start} ... {end} pair")
        before, rest = text.split(start)
        _, after = rest.split(end)
        text = f"{before}{start}\n{body}\n{end}{after}"
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if a file's generated parts are stale")
    args = p.parse_args(argv)
    stale = []
    for path, generated in parts().items():
        name = path.relative_to(C.REPO)
        text = path.read_text()
        try:
            new = rewrite(text, generated)
        except ValueError as e:
            print(f"error: {name} {e}", file=sys.stderr)
            return 1
        if args.check and new != text:
            print(f"{name}'s generated parts are stale: run python -m benchmarks.readme", file=sys.stderr)
            stale.append(name)
        elif not args.check:
            path.write_text(new)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
