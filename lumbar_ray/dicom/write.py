"""Write real DICOM MR Image Storage objects (one file per slice) with pydicom.

Used by the synthetic study generator and by tests that need DICOM on local disk or object
storage. Output is deterministic: UIDs come from :func:`uid_for` (callers pass them in) and no
dates or times are written, so the same inputs give byte-identical files.

By default files hold no patient-identifying values: PatientID is the (already anonymous) study
id, PatientName is empty, there are no birth dates or accession numbers, and
PatientIdentityRemoved is "YES". A caller may pass ``patient`` values instead (the synthetic
generator passes the sentinels of :mod:`lumbar_ray.synth.phi`, which a test then searches every
output and log for); the files then say PatientIdentityRemoved "NO", as a real study would.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import fsspec
import numpy as np
from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    UID,
    generate_uid,
)
from pydicom.valuerep import validate_value

log = logging.getLogger(__name__)

__all__ = ["write_mr_series", "uid_for", "UID_PREFIX", "IMPLEMENTATION_VERSION_NAME", "PATIENT_KEYWORDS"]

# pydicom's own root for generated UIDs (1.2.826.0.1.3680043.8.498.): valid and registered.
UID_PREFIX = "1.2.826.0.1.3680043.8.498."
IMPLEMENTATION_VERSION_NAME = "LUMBAR_RAY_01"
# The identifying elements a caller may set through write_mr_series(patient=...).
PATIENT_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber")


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
    patient: Mapping[str, str] | None = None,
) -> list[str]:
    """Write one MR series as ``{out_dir}/{instance_number}.dcm``, one file per slice.

    volume: ``(n, rows, cols)`` array; floats are rounded and clipped to uint16.
    image_orientation: the 6 direction cosines (row cosine, column cosine), LPS; or an ``(n, 6)``
        array, one per slice (a series of differently angled slabs).
    positions: ``n`` ImagePositionPatient triples (mm), slice ``k`` of ``volume`` at ``positions[k]``.
    pixel_spacing: ``(row_spacing, col_spacing)`` in mm (DICOM order).
    instance_numbers: per slice (default ``1..n``); the file name uses it.
    out_dir: a local path or an fsspec URL (``s3://bucket/prefix``); or pass ``fs`` explicitly.
    transfer_syntax: Explicit/Implicit VR Little Endian, or a compressed syntax pydicom can
        encode (e.g. RLE Lossless).
    patient: values of identifying elements by keyword (any of :data:`PATIENT_KEYWORDS`), written
        into every slice in place of the anonymous defaults; None keeps the defaults.

    Returns the written paths (URLs keep their protocol), in slice order.
    """
    vol = _to_uint16(volume)
    n = vol.shape[0]
    positions = np.asarray(positions, dtype=float).reshape(-1, 3)
    if len(positions) != n:
        raise ValueError(f"{len(positions)} positions for {n} slices")
    per_slice = np.ndim(image_orientation) == 2
    if per_slice and np.shape(image_orientation) != (n, 6):
        raise ValueError(f"image_orientation must be 6 values or ({n}, 6), got shape {np.shape(image_orientation)}")
    orientations = np.asarray(image_orientation, dtype=float).reshape(n if per_slice else 1, 6)
    orientation = orientations[0]
    instance_numbers = _checked_instance_numbers(instance_numbers, n)
    normals = np.cross(orientations[:, :3], orientations[:, 3:])
    normal = normals[0]
    if not per_slice:
        spacing_between = float(np.median(np.abs(np.diff(positions @ normal)))) if n > 1 else float(slice_thickness)
    else:  # each gap along the first slice's own normal (slabs: the median is the in-slab spacing)
        gaps = np.einsum("ij,ij->i", np.diff(positions, axis=0), normals[:-1])
        spacing_between = float(np.median(np.abs(gaps))) if n > 1 else float(slice_thickness)
    transfer_syntax = UID(str(transfer_syntax))
    shared = _series_elements(
        vol,
        study_uid=study_uid,
        series_uid=series_uid,
        study_id=study_id,
        series_description=series_description,
        series_number=series_number,
        orientation=orientation,
        pixel_spacing=pixel_spacing,
        slice_thickness=slice_thickness,
        spacing_between=spacing_between,
    )
    if patient is not None:
        shared = _with_patient(shared, patient)
    target = _OutputFolder(out_dir, fs)
    written: list[str] = []
    for k in range(n):
        inst = instance_numbers[k]
        ds = _slice_dataset(shared, uid_for("sop", series_uid, inst), inst, positions[k], normals[k if per_slice else 0],
                            vol[k], transfer_syntax)
        if per_slice:
            ds.ImageOrientationPatient = _ds_str(orientations[k])
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        written.append(target.write(f"{inst}.dcm", buf.getvalue()))
    log.debug("wrote %d slices of %r to %s", n, series_description, out_dir)
    return written


def _checked_instance_numbers(instance_numbers: Sequence[int] | None, n: int) -> list[int]:
    """The slices' instance numbers (default ``1..n``); n distinct integers or ValueError."""
    if instance_numbers is None:
        instance_numbers = list(range(1, n + 1))
    instance_numbers = [int(i) for i in instance_numbers]
    if len(instance_numbers) != n or len(set(instance_numbers)) != n:
        raise ValueError("instance_numbers must be n distinct integers")
    return instance_numbers


def _series_elements(
    vol: np.ndarray,
    *,
    study_uid: str,
    series_uid: str,
    study_id,
    series_description: str,
    series_number: int,
    orientation: np.ndarray,
    pixel_spacing: Sequence[float],
    slice_thickness: float,
    spacing_between: float,
) -> dict[str, Any]:
    """The data elements every slice of the series shares, by keyword (file order is by tag)."""
    _, rows, cols = vol.shape
    row_sp, col_sp = (float(s) for s in pixel_spacing)
    sample = vol[:, ::4, ::4]
    lo, hi = np.percentile(sample, [1.0, 99.5]) if sample.size else (0.0, 1.0)
    window_center = round(float(lo + hi) / 2.0, 1)
    window_width = round(max(float(hi - lo), 1.0), 1)
    return {
        "SpecificCharacterSet": "ISO_IR 100",
        "ImageType": ["DERIVED", "SECONDARY", "OTHER"],
        "SOPClassUID": MRImageStorage,
        "Modality": "MR",
        "Manufacturer": "lumbar-ray synthetic",
        "SeriesDescription": series_description,
        "BodyPartExamined": "LSPINE",
        # Anonymised identity: the study id only.
        "PatientName": "",
        "PatientID": str(study_id),
        "PatientIdentityRemoved": "YES",
        "DeidentificationMethod": "synthetic phantom; no patient data",
        "StudyInstanceUID": study_uid,
        "SeriesInstanceUID": series_uid,
        "StudyID": str(study_id)[-16:],
        "SeriesNumber": int(series_number),
        "FrameOfReferenceUID": uid_for("frame-of-reference", study_uid),
        "PositionReferenceIndicator": "",
        "ScanningSequence": "SE",
        "SequenceVariant": "NONE",
        "MRAcquisitionType": "2D",
        "ImageOrientationPatient": _ds_str(orientation),
        "PixelSpacing": _ds_str([row_sp, col_sp]),
        "SliceThickness": _ds_str([slice_thickness])[0],
        "SpacingBetweenSlices": _ds_str([spacing_between])[0],
        "SamplesPerPixel": 1,
        "PhotometricInterpretation": "MONOCHROME2",
        "Rows": rows,
        "Columns": cols,
        "BitsAllocated": 16,
        "BitsStored": 16,
        "HighBit": 15,
        "PixelRepresentation": 0,
        "WindowCenter": _ds_str([window_center])[0],
        "WindowWidth": _ds_str([window_width])[0],
    }


def _with_patient(shared: dict[str, Any], patient: Mapping[str, str]) -> dict[str, Any]:
    """``shared`` with the caller's identifying values, and the identity no longer marked removed."""
    unknown = sorted(set(patient) - set(PATIENT_KEYWORDS))
    if unknown:
        raise ValueError(f"patient: unknown elements {unknown}; choose from {PATIENT_KEYWORDS}")
    out = {key: value for key, value in shared.items() if key != "DeidentificationMethod"}
    for key, value in patient.items():
        try:  # checked here, naming the element: pydicom itself only warns when it writes a bad value
            validate_value(dictionary_VR(key), str(value), pydicom_config.RAISE)
        except ValueError as exc:
            raise ValueError(f"patient: {key}: {exc}") from None
        out[key] = str(value)
    out["PatientIdentityRemoved"] = "NO"
    return out


def _slice_dataset(
    shared: dict[str, Any],
    sop_uid: str,
    instance_number: int,
    position: np.ndarray,
    normal: np.ndarray,
    pixels: np.ndarray,
    transfer_syntax: UID,
) -> FileDataset:
    """One slice's file: the series' shared elements, its own position and pixels, encoded in
    ``transfer_syntax``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian if transfer_syntax.is_compressed else transfer_syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME

    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    for keyword, value in shared.items():
        setattr(ds, keyword, value)
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = _ds_str(position)
    ds.SliceLocation = _ds_str([position @ normal])[0]
    ds.PixelData = np.ascontiguousarray(pixels).astype("<u2", copy=False).tobytes()

    if transfer_syntax.is_compressed:
        ds.compress(transfer_syntax, pixels, generate_instance_uid=False)
    elif transfer_syntax == ImplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    elif transfer_syntax != ExplicitVRLittleEndian:
        raise ValueError(f"unsupported transfer syntax {transfer_syntax!r}")
    return ds


class _OutputFolder:
    """The folder a series is written to: created on construction, local or any fsspec URL."""

    def __init__(self, out_dir: str | os.PathLike, fs: Any):
        self.fs, self.base = _resolve_fs(out_dir, fs)
        if self.fs is None:
            os.makedirs(self.base, exist_ok=True)
        else:
            self.fs.makedirs(self.base, exist_ok=True)
        self.protocol = None
        if self.fs is not None and "://" in os.fspath(out_dir):
            self.protocol = os.fspath(out_dir).split("://", 1)[0]

    def write(self, name: str, data: bytes) -> str:
        """Write one file; its path as the caller spells paths (URLs keep their protocol)."""
        if self.fs is None:
            path = os.path.join(self.base, name)
            with open(path, "wb") as f:
                f.write(data)
            return path
        path = f"{self.base.rstrip('/')}/{name}"
        with self.fs.open(path, "wb") as f:
            f.write(data)
        return f"{self.protocol}://{path}" if self.protocol else path
