"""One DICOM file: parse it, check its declared size, decode its pixels; and every file of a series
folder parsed into slices with their patient geometry (nothing decoded yet).

* Sizes are checked before anything big is allocated: the stored file size before the file is
  read, and ``Rows x Columns x frames x samples x bytes`` from the header before the pixel data
  is decoded (:class:`~lumbar_ray.dicom.errors.ReadLimits`).
* Pixels: compressed transfer syntaxes are decoded by pydicom's pixel decoders (RLE natively;
  JPEG baseline/extended/lossless, JPEG-LS and JPEG 2000 through pylibjpeg with its libjpeg and
  openjpeg plugins). Values are float32 after ``RescaleSlope``/``RescaleIntercept``; MONOCHROME1
  is inverted so that bright means high signal, as in MONOCHROME2 (``v' = lo + hi - v`` with
  ``lo``/``hi`` the rescaled range of the stored bits, the same for every slice). Colour images
  (RGB / YBR) are reduced to luminance; palette colour and multi-frame files are refused.
"""

from __future__ import annotations

import io
import os
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import pydicom
from fsspec import AbstractFileSystem
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID

from lumbar_ray import storage
from lumbar_ray.dicom.errors import (
    DEFAULT_LIMITS,
    AbsurdImageSizeError,
    DicomReadError,
    EmptyFileError,
    MissingGeometryError,
    NotDicomError,
    PixelDecodeError,
    ReadLimits,
    SkippedFile,
    TruncatedDicomError,
    UnsupportedPixelDataError,
)
from lumbar_ray.dicom.series import DicomImage

__all__ = [
    "read_image",
    "decode_pixels",
    "header_int",
    "header_float",
    "ParsedSlice",
    "load_folder_slices",
]

_COLOUR_PHOTOMETRICS = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "YBR_PARTIAL_420")


# --------------------------------------------------------------------------------------------
# Parsing


# warnings.catch_warnings swaps the process-wide warning filters (not thread-safe before Python
# 3.14): files read on several threads (export-sr, report: outputs/parallel.py) would lose or
# swap each other's end-of-file warnings, i.e. accept a truncated file or refuse a good one.
# Parsing holds the GIL anyway; the reads from storage stay parallel.
_WARNINGS_LOCK = threading.Lock()


def _parse(data: bytes, path: str) -> Dataset:
    """Parse a whole file (PixelData stays raw bytes); typed errors for non-DICOM/truncation."""
    if len(data) == 0:
        raise EmptyFileError(path, "file is empty (0 bytes)")
    has_marker = len(data) >= 132 and data[128:132] == b"DICM"
    ds = _dcmread(data, path, has_marker)
    _check_element_lengths(ds, data, path, has_marker)
    _check_image_header(ds, data, path, has_marker)
    return ds


def _dcmread(data: bytes, path: str, has_marker: bool) -> Dataset:
    """pydicom's parse, with its failures and its end-of-file warnings turned into typed errors."""
    with _WARNINGS_LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=not has_marker)
        except InvalidDicomError as exc:
            raise NotDicomError(path, f"not a DICOM file ({exc})") from None
        except Exception as exc:  # noqa: BLE001 - any parser failure is this file's problem
            if has_marker:
                raise TruncatedDicomError(path, f"cannot parse the DICOM structure ({type(exc).__name__}: {exc})") from None
            raise NotDicomError(path, f"no 'DICM' marker and not parseable as DICOM ({type(exc).__name__})") from None
    for w in caught:
        text = str(w.message)
        if "End of file" in text or "end of file" in text:
            if not has_marker:
                raise NotDicomError(path, f"no 'DICM' marker and not a consistent DICOM structure ({text})")
            raise TruncatedDicomError(path, f"file ends inside an element ({len(data)} bytes): {text}")
    return ds


def _check_element_lengths(ds: Dataset, data: bytes, path: str, has_marker: bool) -> None:
    """A value that runs past the end of the file: pydicom keeps the short value silently.
    (Undefined-length items are covered by the end-of-file warnings.)"""
    try:
        for elem in ds.elements():
            tell = getattr(elem, "value_tell", None)
            length = getattr(elem, "length", None)
            if tell is not None and length is not None and length != 0xFFFFFFFF and tell + length > len(data):
                reason = f"element {elem.tag} needs {length} bytes at offset {tell}, the file has {len(data)} bytes"
                if not has_marker:
                    raise NotDicomError(path, f"no 'DICM' marker and not a consistent DICOM structure ({reason})")
                raise TruncatedDicomError(path, reason)
    except DicomReadError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise NotDicomError(path, f"unreadable element structure ({type(exc).__name__}: {exc})") from None


def _check_image_header(ds: Dataset, data: bytes, path: str, has_marker: bool) -> None:
    """The file is an image with a transfer syntax (a headerless file gets the one it was read with)."""
    try:
        if not has_marker:
            # Accept a headerless ("no meta") file only when it clearly is an image.
            if not ("PixelData" in ds and ds.get("Rows") and ds.get("Columns") and ("SOPClassUID" in ds or "Modality" in ds)):
                raise NotDicomError(path, "no 'DICM' marker at byte 128 and no image elements: not a DICOM file")
            if "TransferSyntaxUID" not in ds.file_meta:
                implicit, little = ds.original_encoding
                ds.file_meta.TransferSyntaxUID = (
                    pydicom.uid.ImplicitVRLittleEndian
                    if implicit
                    else (pydicom.uid.ExplicitVRLittleEndian if little else pydicom.uid.ExplicitVRBigEndian)
                )
        elif "TransferSyntaxUID" not in ds.file_meta:
            raise TruncatedDicomError(path, f"file meta information incomplete (no TransferSyntaxUID; {len(data)} bytes)")
        if "PixelData" not in ds:
            sop = ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID")
            sop_name = UID(str(sop)).name if sop else "unknown"
            if "Image Storage" in sop_name:
                raise TruncatedDicomError(
                    path, f"no Pixel Data although the SOP class is {sop_name!r}: truncated at {len(data)} bytes?"
                )
            raise UnsupportedPixelDataError(path, f"no Pixel Data element (not an image; SOP class {sop_name!r})")
    except DicomReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - garbage that only fails on access
        raise NotDicomError(path, f"unreadable header ({type(exc).__name__}: {exc})") from None


def header_int(ds: Dataset, keyword: str, default: int | None = None) -> int | None:
    """An integer header value, or ``default`` when absent, empty or not a number."""
    try:
        value = ds.get(keyword)
        return default if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return default


def header_float(ds: Dataset, keyword: str, default: float | None = None) -> float | None:
    """A numeric header value, or ``default`` when absent, empty or not a number."""
    try:
        value = ds.get(keyword)
        return default if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        return default


def _check_size(ds: Dataset, path: str, limits: ReadLimits) -> None:
    rows, cols = header_int(ds, "Rows", 0), header_int(ds, "Columns", 0)
    frames = header_int(ds, "NumberOfFrames", 1) or 1
    samples = header_int(ds, "SamplesPerPixel", 1) or 1
    bits = header_int(ds, "BitsAllocated", 16) or 16
    if rows <= 0 or cols <= 0:
        raise UnsupportedPixelDataError(path, f"image size {rows}x{cols} is empty")
    if rows > limits.max_rows or cols > limits.max_cols:
        raise AbsurdImageSizeError(path, f"image {rows}x{cols} exceeds the cap {limits.max_rows}x{limits.max_cols}")
    pixels = rows * cols * frames
    if pixels > limits.max_pixels:
        raise AbsurdImageSizeError(path, f"{rows}x{cols}x{frames} frames = {pixels} pixels exceeds {limits.max_pixels}")
    nbytes = pixels * samples * max(bits, 8) // 8
    if nbytes > limits.max_bytes:
        raise AbsurdImageSizeError(path, f"decoded size {nbytes} bytes exceeds {limits.max_bytes}")


# --------------------------------------------------------------------------------------------
# Decoding


def decode_pixels(ds: Dataset, path: str) -> np.ndarray:
    """float32 (rows, cols): rescaled, MONOCHROME1 inverted, colour -> luminance."""
    frames = header_int(ds, "NumberOfFrames", 1) or 1
    if frames > 1:
        raise UnsupportedPixelDataError(path, f"multi-frame image ({frames} frames) is not supported")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    colour = photometric in _COLOUR_PHOTOMETRICS
    if photometric not in ("MONOCHROME1", "MONOCHROME2") and not colour:
        raise UnsupportedPixelDataError(path, f"PhotometricInterpretation {photometric} is not supported")
    arr = _pixel_array(ds, path)
    if colour:
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise UnsupportedPixelDataError(path, f"colour image of unexpected shape {arr.shape}")
        arr = arr.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if arr.ndim != 2:
        raise UnsupportedPixelDataError(path, f"pixel array of shape {arr.shape}; expected one 2-D image")
    out = arr.astype(np.float32)
    slope = header_float(ds, "RescaleSlope", 1.0) or 1.0
    intercept = header_float(ds, "RescaleIntercept", 0.0) or 0.0
    if slope != 1.0 or intercept != 0.0:
        out = out * np.float32(slope) + np.float32(intercept)
    if photometric == "MONOCHROME1":
        lo, hi = _rescaled_range(ds, slope, intercept)
        out = np.float32(lo + hi) - out
    return np.ascontiguousarray(out, dtype=np.float32)


def _pixel_array(ds: Dataset, path: str) -> np.ndarray:
    """pydicom's pixel array; a missing codec or refused data becomes a typed error."""
    tsyntax = UID(str(ds.file_meta.TransferSyntaxUID))
    if tsyntax.is_compressed:
        try:
            decoder = get_decoder(tsyntax)
        except NotImplementedError:
            raise UnsupportedPixelDataError(path, f"no pixel decoder for transfer syntax {tsyntax.name}") from None
        if not decoder.is_available:
            raise UnsupportedPixelDataError(
                path, f"no installed plugin decodes {tsyntax.name} (install pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg)"
            )
    with _WARNINGS_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return ds.pixel_array
        except ValueError as exc:
            if "less than expected" in str(exc) or "too short" in str(exc):
                raise TruncatedDicomError(path, f"pixel data shorter than the header says ({exc})") from None
            raise PixelDecodeError(path, f"cannot decode {tsyntax.name}: {_first_line(exc)}") from None
        except Exception as exc:  # noqa: BLE001 - codec failures come as many types
            raise PixelDecodeError(path, f"cannot decode {tsyntax.name}: {_first_line(exc)}") from None


def _rescaled_range(ds: Dataset, slope: float, intercept: float) -> tuple[float, float]:
    """(lo, hi): the rescaled range of the stored bits, the same for every slice of a series."""
    bits = header_int(ds, "BitsStored", None) or header_int(ds, "BitsAllocated", 16) or 16
    if header_int(ds, "PixelRepresentation", 0) == 1:
        lo_raw, hi_raw = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        lo_raw, hi_raw = 0, 2**bits - 1
    lo, hi = sorted((lo_raw * slope + intercept, hi_raw * slope + intercept))
    return lo, hi


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split("\n")[:3]).strip()
    return text[:300] or type(exc).__name__


def _header_only(ds: Dataset) -> Dataset:
    header = Dataset()
    header.file_meta = ds.file_meta
    for elem in ds:
        if elem.keyword not in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            header.add(elem)
    return header


def read_image(
    path_or_url: str | os.PathLike,
    *,
    fs: AbstractFileSystem | None = None,
    limits: ReadLimits | None = None,
    max_pixels: int | None = None,
) -> DicomImage:
    """Read and decode one DICOM image file; typed :class:`DicomReadError` on any problem."""
    limits = (limits or DEFAULT_LIMITS).with_max_pixels(max_pixels)
    if fs is None:
        fs, path = storage.filesystem_for(path_or_url)
        shown = os.fspath(path_or_url)
    else:
        path = os.fspath(path_or_url)
        shown = storage.to_url(fs, path)
    try:
        size = storage.retry_transient(fs.size, path, what=f"reading {shown}")
    except FileNotFoundError:
        raise DicomReadError(shown, "file does not exist") from None
    if size is not None and size > limits.max_file_bytes:
        raise AbsurdImageSizeError(shown, f"file of {size} bytes exceeds {limits.max_file_bytes}")
    ds = _parse(storage.retry_transient(fs.cat_file, path, what=f"reading {shown}"), shown)
    _check_size(ds, shown, limits)
    pixels = decode_pixels(ds, shown)
    return DicomImage(shown, pixels, _header_only(ds))


# --------------------------------------------------------------------------------------------
# The slices of a folder


@dataclass
class ParsedSlice:
    """One parsed file of a series folder: its header (pixel data still raw) and its geometry."""

    path: str
    ds: Dataset
    rows: int
    cols: int
    instance_number: int
    position: np.ndarray
    orientation: np.ndarray
    pixel_spacing: tuple[float, float]
    slice_thickness: float | None
    image_type: tuple[str, ...]
    description: str | None
    series_uid: str | None

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.orientation[:3], self.orientation[3:])

    @property
    def is_localizer(self) -> bool:
        return "LOCALIZER" in self.image_type


def _numbers(ds: Dataset, keyword: str, n: int) -> np.ndarray | None:
    try:
        value = ds.get(keyword)
        if value is None:
            return None
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        return None
    return arr


def _slice_from(ds: Dataset, path: str) -> ParsedSlice:
    position = _numbers(ds, "ImagePositionPatient", 3)
    orientation = _numbers(ds, "ImageOrientationPatient", 6)
    spacing = _numbers(ds, "PixelSpacing", 2)
    if spacing is None:
        spacing = _numbers(ds, "ImagerPixelSpacing", 2)
    missing = [
        name
        for name, value in (("ImagePositionPatient", position), ("ImageOrientationPatient", orientation), ("PixelSpacing", spacing))
        if value is None
    ]
    if missing:
        raise MissingGeometryError(path, f"no valid {', '.join(missing)}: cannot place the slice in patient space")
    row, col = orientation[:3], orientation[3:]
    if abs(np.linalg.norm(row) - 1) > 0.05 or abs(np.linalg.norm(col) - 1) > 0.05 or abs(row @ col) > 0.05:
        raise MissingGeometryError(path, f"ImageOrientationPatient {orientation.tolist()} is not two orthonormal cosines")
    if np.any(spacing <= 0):
        raise MissingGeometryError(path, f"PixelSpacing {spacing.tolist()} is not positive")
    row = row / np.linalg.norm(row)
    col = col - (col @ row) * row
    col = col / np.linalg.norm(col)
    instance = header_int(ds, "InstanceNumber", None)
    if instance is None:
        stem = os.path.splitext(os.path.basename(path))[0]
        instance = int(stem) if stem.isdigit() else -1
    try:
        image_type = tuple(str(v).upper() for v in (ds.get("ImageType") or ()))
    except TypeError:
        image_type = (str(ds.get("ImageType")).upper(),)
    description = ds.get("SeriesDescription")
    return ParsedSlice(
        path=path,
        ds=ds,
        rows=header_int(ds, "Rows", 0),
        cols=header_int(ds, "Columns", 0),
        instance_number=int(instance),
        position=position,
        orientation=np.concatenate([row, col]),
        pixel_spacing=(float(spacing[0]), float(spacing[1])),
        slice_thickness=header_float(ds, "SliceThickness", None),
        image_type=image_type,
        description=str(description).strip() if description else None,
        series_uid=str(ds.get("SeriesInstanceUID")) if ds.get("SeriesInstanceUID") else None,
    )


def load_folder_slices(
    fs: AbstractFileSystem, folder: str, limits: ReadLimits
) -> tuple[list[ParsedSlice], list[SkippedFile], bool]:
    """Parse every file of a folder (headers + raw pixel bytes; nothing decoded yet).

    Returns (slices, skipped, folder_exists).

    Storage failures that are transient (timeouts, resets, 5xx, throttling) are retried
    (:func:`lumbar_ray.storage.cat_files`); if a file still cannot be fetched,
    :class:`~lumbar_ray.errors.StorageUnavailableError` is raised: a series is never built from
    the slices that happened to arrive. A file that is gone or unreadable for good is skipped
    and recorded, as a corrupt one is.
    """
    where = storage.to_url(fs, folder)
    try:
        entries = storage.retry_transient(fs.ls, folder, detail=True, what=f"listing {where}")
    except FileNotFoundError:
        return [], [], False
    to_read, skipped = _files_to_read(fs, folder, entries, limits)
    # One call a round: s3fs fetches the objects concurrently.
    contents = storage.cat_files(fs, to_read, what=f"reading {where}")
    slices: list[ParsedSlice] = []
    for name in to_read:
        url = storage.to_url(fs, name)
        data = contents[name]
        if isinstance(data, BaseException):
            skipped.append(SkippedFile(url, f"cannot read ({type(data).__name__}: {data})", "DicomReadError"))
            continue
        try:
            ds = _parse(data, url)
            _check_size(ds, url, limits)
            slices.append(_slice_from(ds, url))
        except DicomReadError as exc:
            skipped.append(SkippedFile(url, exc.reason, exc.error_type))
    return slices, skipped, True


def _files_to_read(
    fs: AbstractFileSystem, folder: str, entries: list[dict], limits: ReadLimits
) -> tuple[list[str], list[SkippedFile]]:
    """The folder's files worth fetching (by name order); sub-folders, empty and oversized files
    are skipped from the listing alone."""
    skipped: list[SkippedFile] = []
    to_read: list[str] = []
    for entry in sorted(entries, key=lambda e: e["name"]):
        name = entry["name"].rstrip("/")
        if name == folder.rstrip("/"):
            continue
        url = storage.to_url(fs, name)
        if entry.get("type") == "directory":
            skipped.append(SkippedFile(url, "a sub-folder inside a series folder is not read", "NotDicomError"))
            continue
        size = entry.get("size")
        if size == 0:
            skipped.append(SkippedFile(url, "file is empty (0 bytes)", "EmptyFileError"))
            continue
        if size is not None and size > limits.max_file_bytes:
            skipped.append(
                SkippedFile(url, f"file of {size} bytes exceeds {limits.max_file_bytes}", "AbsurdImageSizeError")
            )
            continue
        to_read.append(name)
    return to_read, skipped
