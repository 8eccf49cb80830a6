"""One-off probes: scripts that each answered one question (python -m benchmarks.probes.NAME)."""
