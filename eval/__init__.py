"""Benchmark harness (Video-MME, MLVU, synthetic); a client of keye's public API."""
