"""Which series type a stack is: from its descriptions, its geometry, its echo timing or, last, the
brightness of its CSF; decided per stack, then per study for the sagittal stacks still unknown.

The first rule that decides wins (``Series.type_source`` says which):
``csv`` the description CSV names one of :data:`~lumbar_ray.targets.SERIES_TYPES`;
``dicom_description`` the DICOM SeriesDescription does; ``description_keywords`` the plane
from the geometry plus keywords in either description (``T1``; ``T2``/``STIR``/``TIRM``);
``geometry`` an axial stack (normal along z) is Axial T2 unless its description says T1;
``echo_times`` a sagittal stack (normal along x) is T1 when TE <= 30 ms and TR <= 1200 ms,
T2/STIR when TE >= 60 ms or an InversionTime below 250 ms (STIR) is set; ``elimination`` a
still-unknown sagittal stack takes the sagittal type the study still lacks; ``brightness`` last
resort: the relative brightness of the thin brightest structures (CSF on T2) -- the
middle slice's 99.5th percentile over the median of its foreground
(:func:`csf_brightness_score`); when two sagittal stacks are unknown, the higher score is
T2/STIR, the lower T1; a single one is T2/STIR above :data:`T2_BRIGHTNESS_THRESHOLD`.
Coronal stacks stay untyped.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from lumbar_ray.dicom.errors import DicomReadError
from lumbar_ray.dicom.files import ParsedSlice, decode_pixels, header_float
from lumbar_ray.dicom.series import id_sort_key
from lumbar_ray.dicom.stacks import geometry_sort, plane_of
from lumbar_ray.targets import AXIAL_T2, SAGITTAL_T1, SAGITTAL_T2, SERIES_TYPES

log = logging.getLogger(__name__)

__all__ = [
    "type_from_description",
    "csf_brightness_score",
    "T2_BRIGHTNESS_THRESHOLD",
    "CONFIDENT_SOURCES",
    "SeriesCandidate",
    "classify",
    "classify_alone",
    "resolve_pending",
]


def _normalise(text: str) -> str:
    return " ".join(str(text).replace("_", " ").split()).lower()


_EXACT = {_normalise(t): t for t in SERIES_TYPES}
_RE_T1 = re.compile(r"(?<![A-Z0-9])T1(?![0-9])")
_RE_T2 = re.compile(r"(?<![A-Z0-9])T2(?![0-9])")
_RE_STIR = re.compile(r"STIR|TIRM")
_RE_PLANE = (("sagittal", re.compile(r"SAG")), ("axial", re.compile(r"(?<![A-Z])AX|TRA")), ("coronal", re.compile(r"COR")))

# Type sources read from a description: such stacks beat guessed ones of the same type.
CONFIDENT_SOURCES = ("csv", "dicom_description", "description_keywords")


def type_from_description(text: str | None, plane: str | None = None) -> str | None:
    """Series type from a description: an exact Kaggle spelling, else plane + keywords.

    ``plane`` (from the geometry) wins over a plane named in the text. None when undecided.
    """
    if not text:
        return None
    exact = _EXACT.get(_normalise(text))
    if exact:
        return exact
    upper = str(text).upper()
    if plane is None:
        plane = next((p for p, rx in _RE_PLANE if rx.search(upper)), None)
    t1 = bool(_RE_T1.search(upper))
    t2 = bool(_RE_T2.search(upper) or _RE_STIR.search(upper))
    if plane == "sagittal":
        if t2 and not t1:
            return SAGITTAL_T2
        if t1 and not t2:
            return SAGITTAL_T1
    elif plane == "axial" and t2 and not t1:
        return AXIAL_T2
    return None


def _says_t1_only(text: str | None) -> bool:
    if not text:
        return False
    upper = str(text).upper()
    return bool(_RE_T1.search(upper)) and not (_RE_T2.search(upper) or _RE_STIR.search(upper))


def _type_from_timing(ds: Dataset) -> str | None:
    te, tr, ti = header_float(ds, "EchoTime"), header_float(ds, "RepetitionTime"), header_float(ds, "InversionTime")
    if ti is not None and 0 < ti < 250:
        return SAGITTAL_T2  # STIR: short-tau inversion recovery
    if te is not None and te >= 60:
        return SAGITTAL_T2
    if te is not None and tr is not None and te <= 30 and tr <= 1200:
        return SAGITTAL_T1
    return None


# Single unknown sagittal stack: T2/STIR above this score. Not calibrated on T1 (none here): the
# real T2 volume in shared/real_mri scores 3.1-4.2 per slice. A weak last resort after every header rule.
T2_BRIGHTNESS_THRESHOLD = 2.5


def csf_brightness_score(image: np.ndarray) -> float:
    """Brightness of the thin brightest structures relative to the tissue bulk of a slice:
    the 99.5th percentile over the median of the foreground (pixels above 10% of it). Fluid
    (CSF) is the brightest, thin structure on T2/STIR -> high score; on T1 CSF is dark and the
    bright tissue (fat, marrow) is bulky -> lower score."""
    img = np.asarray(image, dtype=np.float64)
    top = float(np.percentile(img, 99.5))
    if not np.isfinite(top) or top <= 0:
        return 0.0
    fg = img[img > 0.1 * top]
    med = float(np.median(fg)) if fg.size else 0.0
    return top / med if med > 0 else 0.0


def _middle_slice_score(stack: list[ParsedSlice]) -> float:
    """:func:`csf_brightness_score` of the middle slice (else the next one that decodes)."""
    ordered = geometry_sort(stack)
    for s in ordered[len(ordered) // 2 :] + ordered[: len(ordered) // 2]:
        try:
            return csf_brightness_score(decode_pixels(s.ds, s.path))
        except DicomReadError:
            continue
    return 0.0


@dataclass
class SeriesCandidate:
    """A stack of a series folder that may become a study's series of some type."""

    series_id: str
    stack: list[ParsedSlice]
    csv_description: str | None
    series_type: str | None = None
    type_source: str | None = None
    pending: bool = False  # an unknown sagittal stack, decided at study level

    @property
    def plane(self) -> str:
        return plane_of(self.stack[0].orientation)

    @property
    def dicom_description(self) -> str | None:
        return self.stack[0].description


def classify(c: SeriesCandidate) -> None:
    """Set the candidate's type by the header rules; an unknown sagittal stack is left ``pending``."""
    plane = c.plane
    if c.csv_description and _normalise(c.csv_description) in _EXACT:
        c.series_type, c.type_source = _EXACT[_normalise(c.csv_description)], "csv"
        return
    if c.dicom_description and _normalise(c.dicom_description) in _EXACT:
        c.series_type, c.type_source = _EXACT[_normalise(c.dicom_description)], "dicom_description"
        return
    for text in (c.csv_description, c.dicom_description):
        found = type_from_description(text, plane)
        if found:
            c.series_type, c.type_source = found, "description_keywords"
            return
    if plane == "axial":
        if not (_says_t1_only(c.csv_description) or _says_t1_only(c.dicom_description)):
            c.series_type, c.type_source = AXIAL_T2, "geometry"
        return
    if plane == "sagittal":
        if _says_t1_only(c.csv_description) or _says_t1_only(c.dicom_description):
            c.series_type, c.type_source = SAGITTAL_T1, "description_keywords"
            return
        found = _type_from_timing(c.stack[0].ds)
        if found:
            c.series_type, c.type_source = found, "echo_times"
            return
        c.pending = True


def classify_alone(c: SeriesCandidate) -> None:
    """Type a series read on its own (no study around it): :func:`classify`, then an unknown
    sagittal stack by its brightness alone."""
    classify(c)
    if c.pending:
        score = _middle_slice_score(c.stack)
        c.series_type = SAGITTAL_T2 if score >= T2_BRIGHTNESS_THRESHOLD else SAGITTAL_T1
        c.type_source = "brightness"


def resolve_pending(candidates: list[SeriesCandidate]) -> None:
    """Type a study's pending sagittal stacks: by elimination when the study lacks exactly one
    sagittal type, else by brightness."""
    confident = {c.series_type for c in candidates if c.series_type and not c.pending}
    pending = [c for c in candidates if c.pending]
    if not pending:
        return
    missing = [t for t in (SAGITTAL_T1, SAGITTAL_T2) if t not in confident]
    if len(missing) == 1:
        for c in pending:
            c.series_type, c.type_source = missing[0], "elimination"
    else:
        _type_by_brightness(pending)
    for c in pending:
        c.pending = False
        log.info("series %s typed %r by %s", c.series_id, c.series_type, c.type_source)


def _type_by_brightness(pending: list[SeriesCandidate]) -> None:
    scores = {id(c): _middle_slice_score(c.stack) for c in pending}
    if len(pending) == 1:
        c = pending[0]
        c.series_type = SAGITTAL_T2 if scores[id(c)] >= T2_BRIGHTNESS_THRESHOLD else SAGITTAL_T1
        c.type_source = "brightness"
        return
    hi, lo = max(scores.values()), min(scores.values())
    if hi > lo:  # the brighter half (relative to the extremes) is T2/STIR
        mid = (hi + lo) / 2
        for c in pending:
            c.series_type = SAGITTAL_T2 if scores[id(c)] >= mid else SAGITTAL_T1
    else:  # indistinguishable: the largest stack is T2/STIR, the others T1 (a guess)
        ordered = sorted(pending, key=lambda c: (-len(c.stack), id_sort_key(c.series_id)))
        for i, c in enumerate(ordered):
            c.series_type = SAGITTAL_T2 if i == 0 else SAGITTAL_T1
    for c in pending:
        c.type_source = "brightness"
