"""Where a sampling criterion's step goes: drawing its outputs (no grad) vs the
whole step, on the speed settings' model and batches, MLE step alongside.

    python -m benchmarks.probes.sample_cost [--setting bible] [--criterions risk,seq_exploration] [--repeats 3]

Medians over ``--repeats`` of the first batch; also the mean output length
against the reference length (an untrained model's samples run to their
length cap; the bible setting times the pre-trained model when it exists).
"""

import argparse
import statistics
import sys
import time

from benchmarks import config as C
from benchmarks.fixtures import probe_setting, quiet


def draw_of(name, criterion):
    """The no-grad drawing part of a criterion's step, by its class (so every config row of
    risk or seq_exploration works, whatever its name)."""
    from fairseq_seqlevel.criterions.risk import RiskCriterion
    from fairseq_seqlevel.criterions.seq_exploration import SeqExplorationCriterion

    if isinstance(criterion, RiskCriterion):
        return criterion.candidates
    if isinstance(criterion, SeqExplorationCriterion):
        return lambda model, batch: criterion.draw(model, batch)[0]
    sys.exit(f"error: --criterions: {name} is neither a risk nor a seq_exploration row")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", default="bible")
    p.add_argument("--criterions", default="risk,seq_exploration")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    quiet()
    setting = probe_setting(args.setting, experiments="all")  # any row, experiments' too
    model, batch = setting.model, setting.batches[0]
    pad = setting.task.target_dictionary.pad()

    def timed(fn):
        times = []
        for _ in range(args.repeats + 1):  # one warm-up
            start = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times[1:]), out

    def step(criterion):
        model.zero_grad()
        criterion(model, batch)[0].backward()

    mle = setting.build_criterion(C.CONTROL)
    mle_s, _ = timed(lambda: step(mle))
    ref_len = float(batch["target"].ne(pad).sum(dim=1).float().mean())
    print(f"[{args.setting}] {batch['nsentences']} sentences, reference length {ref_len:.1f}; "
          f"MLE step {mle_s:.3f} s")
    for name in args.criterions.split(","):
        criterion = setting.build_criterion(name)
        draw = draw_of(name, criterion)
        draw_s, tokens = timed(lambda: draw(model, batch))
        step_s, _ = timed(lambda: step(criterion))
        out_len = float(tokens.ne(pad).sum(dim=1).float().mean())
        print(f"  {name:<16} draw {draw_s:.3f} s ({draw_s / mle_s:.1f}x MLE), whole step {step_s:.3f} s "
              f"({step_s / mle_s:.1f}x), rest {(step_s - draw_s) / mle_s:.1f}x; {tokens.size(0)} outputs "
              f"of mean length {out_len:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
