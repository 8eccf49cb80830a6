"""Diversity of K outputs per input (chen2019 §3.2, Table 4):

    python -m fairseq_seqlevel.diversity HYPS --k K

HYPS holds K consecutive whitespace-tokenized hypotheses per input.  Prints
one JSON line: ``div1`` / ``div2`` (distinct unigrams / bigrams of the K
hypotheses over their number of words), ``mbleu4`` (each hypothesis scored
by sacrebleu sentence BLEU, tokenize none, default smoothing, against the
other K−1; mean), each averaged over inputs, as fractions in [0, 1].
"""

import argparse
import json
import sys

from fairseq_seqlevel.errors import ConfigError, install_excepthook


def group_diversity(hypotheses, bleu):
    """(div1, div2, mbleu4) of one input's K hypotheses (lists of words)."""
    words = sum(len(h) for h in hypotheses)
    unigrams = {w for h in hypotheses for w in h}
    bigrams = {tuple(h[i:i + 2]) for h in hypotheses for i in range(len(h) - 1)}
    div1 = len(unigrams) / words if words else 0.0
    div2 = len(bigrams) / words if words else 0.0
    k = len(hypotheses)
    texts = [" ".join(h) for h in hypotheses]
    scores = [bleu.sentence_score(texts[j], texts[:j] + texts[j + 1:]).score / 100.0 for j in range(k)]
    return div1, div2, sum(scores) / k


def read_groups(path, k):
    if k < 2:
        raise ConfigError(f"--k must be >= 2 (mBLEU compares each hypothesis with the others), got {k}")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: {getattr(e, 'strerror', None) or e}") from None
    if not lines:
        raise ConfigError(f"{path}: empty file, expected {k} hypotheses per input")
    if len(lines) % k:
        raise ConfigError(f"{path}: {len(lines)} lines is not a multiple of --k {k}")
    return [[line.split() for line in lines[i:i + k]] for i in range(0, len(lines), k)]


def diversity(groups):
    from sacrebleu.metrics import BLEU

    bleu = BLEU(tokenize="none", effective_order=True)
    per_group = [group_diversity(g, bleu) for g in groups]
    n = len(per_group)
    div1, div2, mbleu4 = (sum(v[i] for v in per_group) / n for i in range(3))
    return {"div1": div1, "div2": div2, "mbleu4": mbleu4, "inputs": n, "k": len(groups[0])}


def main(argv=None):
    install_excepthook()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("hyps", help="K consecutive hypotheses per input, one per line")
    parser.add_argument("--k", type=int, required=True, help="hypotheses per input")
    args = parser.parse_args(argv)
    try:
        result = diversity(read_groups(args.hyps, args.k))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({key: round(v, 6) if isinstance(v, float) else v for key, v in result.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
