"""Scoring: per-study inference, the Ray Data pipeline and its resource flags, the output lock, the scoring job."""
