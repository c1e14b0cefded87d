"""Runnable examples of aiote (``python -m examples.kvcache`` from the repository root)."""
