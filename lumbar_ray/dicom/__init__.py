"""DICOM in and out: reading studies and series (geometry, stacks, series types), writing MR series, NIfTI."""
