"""Evaluation harness: long-context tasks, metrics, methods at one budget, and diagnostics."""
