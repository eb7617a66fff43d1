"""Write real DICOM MR Image Storage objects (one file per slice) with pydicom.

Used by the synthetic study generator and by tests that need DICOM on local disk or object
storage. Output is deterministic: UIDs come from :func:`uid_for` (callers pass them in) and no
dates or times are written, so the same inputs give byte-identical files.

Files hold no patient-identifying values: PatientID is the (already anonymous) study id,
PatientName is empty, there are no birth dates, and PatientIdentityRemoved is "YES".
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    UID,
    generate_uid,
)

log = logging.getLogger(__name__)

__all__ = ["write_mr_series", "uid_for", "UID_PREFIX", "IMPLEMENTATION_VERSION_NAME"]

# pydicom's own root for generated UIDs (1.2.826.0.1.3680043.8.498.): valid and registered.
UID_PREFIX = "1.2.826.0.1.3680043.8.498."
IMPLEMENTATION_VERSION_NAME = "LUMBAR_RAY_01"


def uid_for(*parts: Any) -> str:
    """A deterministic DICOM UID derived from ``parts`` (e.g. ``uid_for("study", seed, study_id)``).

    Same parts -> same UID; different parts -> (practically) different UIDs.
    """
    if not parts:
        raise ValueError("uid_for needs at least one part")
    return str(generate_uid(prefix=UID_PREFIX, entropy_srcs=["lumbar-ray"] + [str(p) for p in parts]))


def _to_uint16(volume: np.ndarray) -> np.ndarray:
    arr = np.asarray(volume)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"volume must be (n, rows, cols); got shape {arr.shape}")
    if arr.dtype == np.uint16:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        arr = np.nan_to_num(arr, nan=0.0, posinf=65535.0, neginf=0.0)
        arr = np.rint(arr)
    return np.clip(arr, 0, 65535).astype(np.uint16)


def _ds_str(values: Sequence[float], digits: int = 6) -> list[str]:
    # DS values are at most 16 characters; format them ourselves so output stays deterministic
    # and valid (pydicom would otherwise warn or raise on long reprs).
    out = []
    for v in values:
        s = f"{float(v):.{digits}f}".rstrip("0").rstrip(".")
        if s in ("-0", ""):
            s = "0"
        while len(s) > 16:
            digits -= 1
            s = f"{float(v):.{max(digits, 0)}f}".rstrip("0").rstrip(".")
        out.append(s)
    return out


def _resolve_fs(out_dir: str | os.PathLike, fs: Any):
    """(fs or None, path). None means plain local file system through ``open``/``os``."""
    path = os.fspath(out_dir)
    if fs is not None:
        return fs, path
    if "://" in path and not path.startswith("file://"):
        import fsspec

        fs, path = fsspec.core.url_to_fs(path)
        return fs, path
    if path.startswith("file://"):
        path = path[len("file://") :]
    return None, path


def write_mr_series(
    out_dir,
    volume,
    *,
    study_uid: str,
    series_uid: str,
    study_id,
    series_description: str,
    series_number: int,
    image_orientation: Sequence[float],
    positions: Sequence[Sequence[float]],
    pixel_spacing: Sequence[float],
    slice_thickness: float,
    instance_numbers: Sequence[int] | None = None,
    fs=None,
    transfer_syntax=ExplicitVRLittleEndian,
) -> list[str]:
    """Write one MR series as ``{out_dir}/{instance_number}.dcm``, one file per slice.

    volume: ``(n, rows, cols)`` array; floats are rounded and clipped to uint16.
    image_orientation: the 6 direction cosines (row cosine, column cosine), LPS.
    positions: ``n`` ImagePositionPatient triples (mm), slice ``k`` of ``volume`` at ``positions[k]``.
    pixel_spacing: ``(row_spacing, col_spacing)`` in mm (DICOM order).
    instance_numbers: per slice (default ``1..n``); the file name uses it.
    out_dir: a local path or an fsspec URL (``s3://bucket/prefix``); or pass ``fs`` explicitly.
    transfer_syntax: Explicit/Implicit VR Little Endian, or a compressed syntax pydicom can
        encode (e.g. RLE Lossless).

    Returns the written paths (URLs keep their protocol), in slice order.
    """
    vol = _to_uint16(volume)
    n, rows, cols = vol.shape
    positions = np.asarray(positions, dtype=float).reshape(-1, 3)
    if len(positions) != n:
        raise ValueError(f"{len(positions)} positions for {n} slices")
    orientation = np.asarray(image_orientation, dtype=float).reshape(6)
    if instance_numbers is None:
        instance_numbers = list(range(1, n + 1))
    instance_numbers = [int(i) for i in instance_numbers]
    if len(instance_numbers) != n or len(set(instance_numbers)) != n:
        raise ValueError("instance_numbers must be n distinct integers")
    row_sp, col_sp = (float(s) for s in pixel_spacing)
    normal = np.cross(orientation[:3], orientation[3:])
    spacing_between = float(np.median(np.abs(np.diff(positions @ normal)))) if n > 1 else float(slice_thickness)

    transfer_syntax = UID(str(transfer_syntax))
    frame_uid = uid_for("frame-of-reference", study_uid)
    sample = vol[:, ::4, ::4]
    lo, hi = np.percentile(sample, [1.0, 99.5]) if sample.size else (0.0, 1.0)
    window_center = round(float(lo + hi) / 2.0, 1)
    window_width = round(max(float(hi - lo), 1.0), 1)

    fs_obj, base = _resolve_fs(out_dir, fs)
    if fs_obj is None:
        os.makedirs(base, exist_ok=True)
    else:
        fs_obj.makedirs(base, exist_ok=True)
    protocol = None
    if fs_obj is not None and "://" in os.fspath(out_dir):
        protocol = os.fspath(out_dir).split("://", 1)[0]

    written: list[str] = []
    for k in range(n):
        inst = instance_numbers[k]
        sop_uid = uid_for("sop", series_uid, inst)

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian if transfer_syntax.is_compressed else transfer_syntax
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME

        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.Modality = "MR"
        ds.Manufacturer = "lumbar-ray synthetic"
        ds.SeriesDescription = series_description
        ds.BodyPartExamined = "LSPINE"
        # Anonymised identity: the study id only.
        ds.PatientName = ""
        ds.PatientID = str(study_id)
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = "synthetic phantom; no patient data"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = str(study_id)[-16:]
        ds.SeriesNumber = int(series_number)
        ds.InstanceNumber = inst
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.MRAcquisitionType = "2D"
        ds.ImagePositionPatient = _ds_str(positions[k])
        ds.ImageOrientationPatient = _ds_str(orientation)
        ds.SliceLocation = _ds_str([positions[k] @ normal])[0]
        ds.PixelSpacing = _ds_str([row_sp, col_sp])
        ds.SliceThickness = _ds_str([slice_thickness])[0]
        ds.SpacingBetweenSlices = _ds_str([spacing_between])[0]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = cols
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.WindowCenter = _ds_str([window_center])[0]
        ds.WindowWidth = _ds_str([window_width])[0]
        ds.PixelData = np.ascontiguousarray(vol[k]).astype("<u2", copy=False).tobytes()

        if transfer_syntax.is_compressed:
            ds.compress(transfer_syntax, vol[k], generate_instance_uid=False)
        elif transfer_syntax == ImplicitVRLittleEndian:
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        elif transfer_syntax != ExplicitVRLittleEndian:
            raise ValueError(f"unsupported transfer syntax {transfer_syntax!r}")

        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        name = f"{inst}.dcm"
        if fs_obj is None:
            path = os.path.join(base, name)
            with open(path, "wb") as f:
                f.write(buf.getvalue())
            written.append(path)
        else:
            path = f"{base.rstrip('/')}/{name}"
            with fs_obj.open(path, "wb") as f:
                f.write(buf.getvalue())
            written.append(f"{protocol}://{path}" if protocol else path)
    log.debug("wrote %d slices of %r to %s", n, series_description, out_dir)
    return written

