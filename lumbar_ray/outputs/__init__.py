"""Outputs: the Parquet schema, writer/reader/resume, Kaggle export, SQL query, evaluation, overlays."""
