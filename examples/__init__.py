"""Runnable examples of bsattn (run them from the repository root, e.g. ``python -m examples.enwik8.train``)."""
