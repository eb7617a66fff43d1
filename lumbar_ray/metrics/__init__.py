"""Metrics: the RSNA 2024 score, classification tables, baselines, and the label files they read."""
