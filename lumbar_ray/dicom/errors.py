"""What can go wrong reading DICOM: the typed errors, the size caps checked before allocation, and
the record of a file that was skipped.

Every problem is a :class:`DicomReadError` whose message names the file and the reason; errors
pickle (Ray workers send them back). Inside a series folder unreadable files are skipped and
recorded as :class:`SkippedFile`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DicomReadError",
    "NotDicomError",
    "EmptyFileError",
    "TruncatedDicomError",
    "AbsurdImageSizeError",
    "UnsupportedPixelDataError",
    "PixelDecodeError",
    "MissingGeometryError",
    "NoUsableSlicesError",
    "SeriesNotFoundError",
    "StudyNotFoundError",
    "ReadLimits",
    "DEFAULT_LIMITS",
    "SkippedFile",
]


class DicomReadError(Exception):
    """A file, series or study that cannot be read; ``path`` says which, ``reason`` why."""

    def __init__(self, path: Any, reason: str):
        self.path = str(path)
        self.reason = str(reason)
        super().__init__(f"{self.path}: {self.reason}")

    @property
    def error_type(self) -> str:
        return type(self).__name__

    def __reduce__(self):  # picklable across Ray workers
        return (type(self), (self.path, self.reason))


class NotDicomError(DicomReadError):
    """The file is not DICOM (no 'DICM' marker and not parseable as a DICOM image)."""


class EmptyFileError(DicomReadError):
    """The file has zero bytes."""


class TruncatedDicomError(DicomReadError):
    """The file ends before its own structure does (header, pixel data or an element)."""


class AbsurdImageSizeError(DicomReadError):
    """The header (or file) declares a size above :class:`ReadLimits`; refused before decoding."""


class UnsupportedPixelDataError(DicomReadError):
    """No pixel data, or pixel data this reader does not handle (multi-frame, palette, no codec)."""


class PixelDecodeError(DicomReadError):
    """A codec refused the (compressed) pixel data: corrupt data."""


class MissingGeometryError(DicomReadError):
    """A slice lacks ImagePositionPatient / ImageOrientationPatient / PixelSpacing."""


class NoUsableSlicesError(DicomReadError):
    """A series folder where no readable image slice is left; ``skipped`` says why per file."""

    def __init__(self, path: Any, reason: str, skipped: Sequence[SkippedFile] = ()):
        super().__init__(path, reason)
        self.skipped = list(skipped)

    def __reduce__(self):
        return (type(self), (self.path, self.reason, self.skipped))


class SeriesNotFoundError(DicomReadError):
    """A series folder that does not exist or holds no files."""


class StudyNotFoundError(DicomReadError):
    """A study folder (or a split's listing) that does not exist."""


@dataclass(frozen=True)
class ReadLimits:
    """Caps checked before allocation. Defaults fit any real MR slice with a wide margin."""

    max_rows: int = 4096
    max_cols: int = 4096
    max_pixels: int = 4096 * 4096  # rows * cols * frames, per file
    max_bytes: int = 256 * 2**20  # decoded bytes per file (rows*cols*frames*samples*bytes)
    max_file_bytes: int = 512 * 2**20  # stored size of one file, checked before it is read
    max_series_bytes: int = 4 * 2**30  # the float32 volume of one series

    def with_max_pixels(self, max_pixels: int | None) -> ReadLimits:
        if max_pixels is None:
            return self
        return ReadLimits(
            self.max_rows, self.max_cols, int(max_pixels), self.max_bytes, self.max_file_bytes, self.max_series_bytes
        )


DEFAULT_LIMITS = ReadLimits()


@dataclass
class SkippedFile:
    """A file (or folder) that was not used, and why. ``error_type``: the error class name, or
    ``"Localizer"`` / ``"ExtraStack"`` for slices ignored on purpose."""

    path: str
    reason: str
    error_type: str
