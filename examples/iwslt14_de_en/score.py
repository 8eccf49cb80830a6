#!/usr/bin/env python3
"""Score fairseq-generate output against a prepared data directory; print one JSON line.

    python score.py --data DATA --gen GENERATE_OUTPUT [--split test] [--checkpoint PATH]

Two BLEU numbers, both corpus BLEU with sacrebleu:

* ``tok_bleu``: the papers' "tokenized BLEU" (multi-bleu.perl on the Moses
  tokenized text; lowercased for IWSLT): the ``H-`` lines of fairseq-generate
  ``--remove-bpe`` against ``DATA/tok/{split}.{tgt}``, no further tokenization
  (sacrebleu ``tokenize='none'``), so both sides are split exactly as the
  data was;
* ``sacrebleu``: the hypotheses Moses-detokenized, against the untokenized
  ``DATA/raw/{split}.{tgt}`` with sacrebleu's default 13a tokenization,
  case-insensitive when the data was lowercased (IWSLT): the comparable
  number across tokenizations.

The reference comes from the text files, not from fairseq's ``T-`` lines,
which have ``<unk>`` for words outside the dictionary.
"""

import argparse
import json
import os
import re
import sys

import sacrebleu

HYP = re.compile(r"^H-(\d+)\t[^\t]*\t(.*)$", re.M)


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def read(path):
    if not os.path.exists(path):
        fail(f"{path}: no such file (a data directory from examples/iwslt14_de_en/prepare.py "
             f"or examples/wmt14/prepare.py has it)")
    with open(path, encoding="utf-8", newline="\n") as f:
        return [line.rstrip("\n") for line in f]


def hypotheses(gen_text, n):
    """The best hypothesis of every source, in corpus order."""
    hyps = {}
    for m in HYP.finditer(gen_text):
        hyps.setdefault(int(m.group(1)), m.group(2))
    missing = [i for i in range(n) if i not in hyps]
    if missing or len(hyps) != n:
        fail(f"fairseq-generate translated {len(hyps)} sentences, the reference has {n}"
             + (f" (first missing id {missing[0]})" if missing else ""))
    return [hyps[i] for i in range(n)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--gen", required=True, help="fairseq-generate's stdout")
    p.add_argument("--split", default="test")
    p.add_argument("--checkpoint", default=None, help="recorded in the output")
    p.add_argument("--beam", type=int, default=None, help="recorded in the output")
    args = p.parse_args(argv)

    manifest_path = os.path.join(args.data, "manifest.json")
    if not os.path.exists(manifest_path):
        fail(f"{manifest_path}: no such file (not a directory made by the recipes' prepare.py)")
    with open(manifest_path, encoding="utf-8") as f:
        manifest = json.load(f)
    tgt, lowercase = manifest["tgt"], bool(manifest.get("lowercase"))
    tok_ref = read(os.path.join(args.data, "tok", f"{args.split}.{tgt}"))
    raw_ref = read(os.path.join(args.data, "raw", f"{args.split}.{tgt}"))
    if len(tok_ref) != len(raw_ref):
        fail(f"{args.data}: tok/{args.split}.{tgt} has {len(tok_ref)} lines, raw/ has {len(raw_ref)}")
    with open(args.gen, encoding="utf-8") as f:
        hyps = hypotheses(f.read(), len(tok_ref))

    from sacremoses import MosesDetokenizer

    detok = MosesDetokenizer(lang=tgt)
    detok_hyps = [detok.detokenize(h.split()) for h in hyps]
    tok = sacrebleu.BLEU(tokenize="none", force=True)
    sb = sacrebleu.BLEU(lowercase=lowercase)
    tok_score = tok.corpus_score(hyps, [tok_ref])
    sb_score = sb.corpus_score(detok_hyps, [raw_ref])
    print(json.dumps({
        "split": args.split, "sentences": len(hyps), "checkpoint": args.checkpoint, "beam": args.beam,
        "tok_bleu": round(tok_score.score, 2), "sacrebleu": round(sb_score.score, 2),
        "tok_bleu_signature": str(tok.get_signature()), "sacrebleu_signature": str(sb.get_signature()),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
