"""The coded concepts of lumbar-ray's DICOM Structured Reports (:mod:`lumbar_ray.outputs.sr`).

Standard codes where one exists: SNOMED CT (``SCT``) for lumbar spinal stenosis, the five disc
levels, left/right, the severity attribute and the Moderate/Severe grades; DICOM (``DCM``) for the
report title and the device observer; UCUM ``1`` for unitless values. Everything the standards do
not name comes from the private coding scheme :data:`PRIVATE_SCHEME` (``99LUMBARRAY``; DICOM
reserves designators starting with ``99`` for private schemes), declared in every SR's
CodingSchemeIdentificationSequence:

==========================  ===========================================================
``NEURAL_FORAMINAL``        finding: neural foraminal narrowing (side as laterality)
``SUBARTICULAR``            finding: subarticular (lateral recess) stenosis
``NORMAL_MILD``             severity value: the competition's merged Normal/Mild class
``P_NORMAL_MILD`` etc.      measurement: the model's probability of one class (unit 1)
``DETECTION_CONFIDENCE``    measurement: the detector's confidence at the point (unit 1)
``LOCALIZATION``            qualitative evaluation: was the target found on an image?
``LOCALIZED``               ... yes: the group holds an image region (SCOORD POINT)
``NOT_LOCALIZED``           ... no: the probabilities are the prior; no image reference
==========================  ===========================================================

Codes are keyed by the one targets table (:mod:`lumbar_ray.targets`): per condition family,
per level and per severity, in the table's order; nothing here lists the 25 targets.
"""

from __future__ import annotations

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes

from lumbar_ray.targets import FAMILIES, LEVELS, PROBABILITY_COLUMNS, SEVERITIES, Target

__all__ = [
    "PRIVATE_SCHEME",
    "CODING_SCHEME",
    "ALGORITHM_NAME",
    "DEVICE_NAME",
    "TITLE",
    "PROCEDURE",
    "UNITLESS",
    "SEVERITY",
    "LOCALIZATION",
    "LOCALIZED",
    "NOT_LOCALIZED",
    "DETECTION_CONFIDENCE",
    "FINDING_BY_FAMILY",
    "LEVEL_SITE",
    "LATERALITY",
    "SEVERITY_VALUES",
    "PROBABILITY_NAMES",
    "finding_code",
    "level_code",
    "laterality_code",
    "same_code",
    "index_of_code",
]

PRIVATE_SCHEME = "99LUMBARRAY"
CODING_SCHEME = CodingSchemeIdentificationItem(
    designator=PRIVATE_SCHEME,
    name="lumbar-ray private codes",
    version="1",
    responsible_organization="lumbar-ray",
)
ALGORITHM_NAME = "lumbar-ray DeepScoreNet"
DEVICE_NAME = "lumbar-ray"


def _private(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value=value, scheme_designator=PRIVATE_SCHEME, meaning=meaning)


def _sct(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value=value, scheme_designator="SCT", meaning=meaning)


TITLE = CodedConcept.from_code(codes.DCM.ImagingMeasurementReport)  # CID 7021
PROCEDURE = CodedConcept.from_code(codes.SCT.ImagingProcedure)  # CID 100
UNITLESS = CodedConcept.from_code(codes.UCUM.NoUnits)
SEVERITY = _sct("246112005", "Severity")
LOCALIZATION = _private("LOCALIZATION", "Target localization")
LOCALIZED = _private("LOCALIZED", "Localized on a source image")
NOT_LOCALIZED = _private("NOT_LOCALIZED", "Not localized: prior probabilities")
DETECTION_CONFIDENCE = _private("DETECTION_CONFIDENCE", "Detection confidence")

# Per condition family (targets.FAMILIES); the side of a condition is the finding site's laterality.
FINDING_BY_FAMILY: dict[str, CodedConcept] = dict(zip(FAMILIES, (
    _sct("18347007", "Spinal stenosis of lumbar region"),
    _private("NEURAL_FORAMINAL", "Neural foraminal narrowing"),
    _private("SUBARTICULAR", "Subarticular stenosis"),
), strict=True))

# Per level (targets.LEVELS, in order): the intervertebral disc of that level.
LEVEL_SITE: dict[str, CodedConcept] = dict(zip(LEVELS, (
    CodedConcept.from_code(codes.SCT.L1L2Disc),
    CodedConcept.from_code(codes.SCT.L2L3Disc),
    CodedConcept.from_code(codes.SCT.L3L4Disc),
    CodedConcept.from_code(codes.SCT.L4L5Disc),
    CodedConcept.from_code(codes.SCT.L5S1Disc),
), strict=True))

LATERALITY: dict[str, CodedConcept] = {
    "left": CodedConcept.from_code(codes.SCT.Left),
    "right": CodedConcept.from_code(codes.SCT.Right),
}

# Per severity id (targets.SEVERITIES): the competition merges Normal and Mild, which no
# standard code names, so that class is private.
SEVERITY_VALUES: tuple[CodedConcept, ...] = tuple(code for _, code in zip(SEVERITIES, (
    _private("NORMAL_MILD", "Normal/Mild"),
    _sct("6736007", "Moderate"),
    _sct("24484000", "Severe"),
), strict=True))

# Per probability column (targets.PROBABILITY_COLUMNS), named after its class.
PROBABILITY_NAMES: tuple[CodedConcept, ...] = tuple(
    _private(f"P_{column.upper()}", f"Probability of {severity}")
    for column, severity in zip(PROBABILITY_COLUMNS, SEVERITIES, strict=True)
)


def finding_code(target: Target) -> CodedConcept:
    return FINDING_BY_FAMILY[target.family]


def level_code(target: Target) -> CodedConcept:
    return LEVEL_SITE[target.level]


def laterality_code(target: Target) -> CodedConcept | None:
    return LATERALITY[target.side] if target.side else None


def same_code(a, b) -> bool:
    """Two codes name the same concept (value and scheme; the meaning text may differ)."""
    return (str(a.value), str(a.scheme_designator)) == (str(b.value), str(b.scheme_designator))


def index_of_code(code, choices) -> int:
    """Position of ``code`` in ``choices`` (by :func:`same_code`); ValueError when absent."""
    for i, choice in enumerate(choices):
        if same_code(code, choice):
            return i
    raise ValueError(f"code ({code.value}, {code.scheme_designator}, {code.meaning!r}) is not one of "
                     f"{[(c.value, c.scheme_designator) for c in choices]}")
