"""Scoring: per-study inference, the Ray Data pipeline, the output lock, the scoring job."""
