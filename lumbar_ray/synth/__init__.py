"""Synthetic RSNA-layout studies: the lumbar phantom and the writer of synthetic data sets."""
