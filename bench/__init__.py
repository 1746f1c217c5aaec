"""Benchmark scripts that print measured numbers (never run as tests), each run from the repository root
as ``python -m bench.<name>``; what they printed is in docs/results.md."""
