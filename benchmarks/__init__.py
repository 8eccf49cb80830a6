"""Benchmarks of fairseq_seqlevel: python -m benchmarks.quality, python -m benchmarks.speed (see README.md)."""
