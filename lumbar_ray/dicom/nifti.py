"""Convert a NIfTI volume into a DICOM MR series (one file per slice), with exact geometry.

NIfTI affines map voxel indices to RAS millimetres; DICOM uses LPS (``x -> -x, y -> -y``).
The volume is reoriented (axis permutation and flips only, no resampling) so that the written
series follows docs/CONVENTIONS.md:

- sagittal: slices along patient x (towards Left), rows towards the feet, columns towards
  Posterior -> ImageOrientationPatient row = (0,1,0), column = (0,0,-1) for an unrotated scan;
- axial: slices along z (towards Superior), rows towards Posterior, columns towards Left ->
  row = (1,0,0), column = (0,1,0).

ImagePositionPatient of each slice is the LPS position of its first voxel, straight from the
affine, so the DICOM geometry reproduces the affine exactly (up to the 16-character DS text).
"""

from __future__ import annotations

import gzip
import logging
import os

import nibabel as nib
import numpy as np
from nibabel import orientations as ornt

from lumbar_ray import storage
from lumbar_ray.dicom.write import uid_for, write_mr_series

log = logging.getLogger(__name__)

__all__ = ["nifti_to_dicom_series", "load_nifti", "reorient_for_dicom", "DicomGeometry"]

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def load_nifti(nii_path: str | os.PathLike):
    """A nibabel image from a local path or an fsspec URL (``.nii`` or ``.nii.gz``)."""
    text = os.fspath(nii_path)
    if not storage.is_url(text):
        return nib.load(text)
    data = storage.read_bytes(text)
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return nib.Nifti1Image.from_bytes(data)


class DicomGeometry:
    """Per-slice DICOM geometry of a reoriented volume (LPS, mm)."""

    def __init__(self, volume: np.ndarray, lps_affine: np.ndarray):
        self.volume = volume  # (n, rows, cols)
        self.lps_affine = lps_affine  # voxel (slice, row, col) -> LPS
        a = lps_affine[:3, :3]
        self.slice_step = a[:, 0]
        self.row_step = a[:, 1]  # moving one row down
        self.col_step = a[:, 2]  # moving one column right
        row_spacing = float(np.linalg.norm(self.row_step))
        col_spacing = float(np.linalg.norm(self.col_step))
        row_cosine = self.col_step / col_spacing  # DICOM "row" direction: along a row = columns
        column_cosine = self.row_step / row_spacing
        if abs(float(row_cosine @ column_cosine)) > 1e-4:
            raise ValueError("the NIfTI affine is sheared in-plane; DICOM needs orthogonal cosines")
        self.image_orientation = np.concatenate([row_cosine, column_cosine])
        self.pixel_spacing = (row_spacing, col_spacing)
        n = volume.shape[0]
        self.positions = np.array([lps_affine[:3, :3] @ [k, 0.0, 0.0] + lps_affine[:3, 3] for k in range(n)])
        normal = np.cross(row_cosine, column_cosine)
        self.slice_thickness = float(abs(self.slice_step @ normal)) or float(np.linalg.norm(self.slice_step))


def reorient_for_dicom(img, plane: str = "sagittal") -> DicomGeometry:
    """Permute/flip the NIfTI data to (slice, row, col) as the module doc describes."""
    target = {"sagittal": ("L", "I", "P"), "axial": ("S", "P", "L")}.get(plane)
    if target is None:
        raise ValueError(f"plane must be 'sagittal' or 'axial', not {plane!r}")
    data = np.asanyarray(img.dataobj)  # scl_slope/scl_inter applied by nibabel
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"expected a 3-D volume, got shape {data.shape}")
    transform = ornt.ornt_transform(ornt.io_orientation(img.affine), ornt.axcodes2ornt(target))
    volume = ornt.apply_orientation(data, transform)
    affine = img.affine @ ornt.inv_ornt_aff(transform, data.shape)
    return DicomGeometry(np.ascontiguousarray(volume), _RAS_TO_LPS @ affine)


def _fit_uint16(volume: np.ndarray) -> np.ndarray:
    """Integer data in [0, 65535] stays as is; anything else is mapped linearly to [0, 4095]."""
    v = np.asarray(volume)
    finite = np.isfinite(v) if np.issubdtype(v.dtype, np.floating) else np.ones(v.shape, bool)
    lo, hi = (float(v[finite].min()), float(v[finite].max())) if finite.any() else (0.0, 0.0)
    integral = not np.issubdtype(v.dtype, np.floating) or bool(np.all(np.equal(np.mod(v[finite], 1), 0)))
    if integral and lo >= 0 and hi <= 65535:
        return np.where(finite, v, 0).astype(np.uint16)
    log.warning("NIfTI values [%g, %g] do not fit uint16 integers: mapped linearly to [0, 4095]", lo, hi)
    scaled = (np.where(finite, v, lo) - lo) / max(hi - lo, 1e-12) * 4095.0
    return np.rint(scaled).astype(np.uint16)


def nifti_to_dicom_series(
    nii_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    study_id: str | int,
    series_description: str = "Sagittal T2/STIR",
    *,
    series_id: str | int | None = None,
    series_number: int = 1,
    plane: str | None = None,
    transfer_syntax=None,
) -> list[str]:
    """Write a NIfTI volume as a DICOM MR series into ``out_dir`` (local path or URL).

    ``plane`` defaults to 'axial' when the description starts with "Axial", else 'sagittal'.
    UIDs derive deterministically from ``study_id`` / ``series_id`` (default: the name of
    ``out_dir``). Returns the written file paths in slice order (instance numbers 1..n).
    """
    if plane is None:
        plane = "axial" if series_description.strip().lower().startswith("axial") else "sagittal"
    img = load_nifti(nii_path)
    geo = reorient_for_dicom(img, plane)
    if series_id is None:
        series_id = os.fspath(out_dir).rstrip("/").rsplit("/", 1)[-1]
    study_uid = uid_for("study", study_id)
    series_uid = uid_for("series", study_id, series_id)
    kwargs = {}
    if transfer_syntax is not None:
        kwargs["transfer_syntax"] = transfer_syntax
    return write_mr_series(
        os.fspath(out_dir),
        _fit_uint16(geo.volume),
        study_uid=study_uid,
        series_uid=series_uid,
        study_id=study_id,
        series_description=series_description,
        series_number=int(series_number),
        image_orientation=geo.image_orientation,
        positions=geo.positions,
        pixel_spacing=geo.pixel_spacing,
        slice_thickness=geo.slice_thickness,
        **kwargs,
    )
