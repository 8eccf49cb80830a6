"""Benchmark harness of fairseq_seqlevel (quality.py, speed.py; shared code in harness.py)."""
