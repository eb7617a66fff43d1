"""Scoring outputs: schema (tables and their checks), store (write, read, resume), kaggle (export),
query (SQL), evaluation (against labels), overlays (per-study PNG report)."""
