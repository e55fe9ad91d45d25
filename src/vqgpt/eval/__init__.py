"""Judging a trained pipeline: the shapes checker, caption metrics, held-out scores, the report."""
