"""The quality benchmark: ``python benchmarks/quality/run.py --preset reduced``
(see docs/claims.md)."""
