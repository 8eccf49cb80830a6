"""Drives a fairseq model: gradient paths data parallelism sees, batched
sampling, roll-outs and teacher forcing."""
