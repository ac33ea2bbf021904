"""Benchmarks against the reference implementations, measured side by side in one process: python3 -m mmdit.bench."""
