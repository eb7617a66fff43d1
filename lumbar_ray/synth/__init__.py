"""Synthetic RSNA-layout studies: a lumbar MRI phantom (anatomy, render, acquisition, geometry)
and the writer of synthetic data sets (labels, writer, contact_sheet)."""
