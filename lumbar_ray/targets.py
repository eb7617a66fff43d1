"""The one table of the 25 RSNA 2024 targets: 5 conditions x 5 disc levels.

Everything else (Kaggle columns, row ids, detector classes per series type, label
parsing) derives from :data:`TARGETS`; never write a per-condition copy of anything.
"""

from __future__ import annotations

from dataclasses import dataclass

# Series types as spelled in {split}_series_descriptions.csv.
SAGITTAL_T1 = "Sagittal T1"
SAGITTAL_T2 = "Sagittal T2/STIR"
AXIAL_T2 = "Axial T2"
SERIES_TYPES: tuple[str, ...] = (SAGITTAL_T1, SAGITTAL_T2, AXIAL_T2)


def series_slug(series_type: str) -> str:
    """'Sagittal T2/STIR' -> 'sagittal_t2_stir' (file and model names)."""
    if series_type not in SERIES_TYPES:
        raise KeyError(f"unknown series type {series_type!r}; expected one of {SERIES_TYPES}")
    return series_type.lower().replace("/", "_").replace(" ", "_")

# Severity classes: label spelling in train.csv, and the probability columns of a submission.
SEVERITIES: tuple[str, ...] = ("Normal/Mild", "Moderate", "Severe")
PROBABILITY_COLUMNS: tuple[str, ...] = ("normal_mild", "moderate", "severe")
SEVERITY_TO_ID: dict[str, int] = {name: i for i, name in enumerate(SEVERITIES)}
# Sample weights of the competition metric, per severity class.
SEVERITY_WEIGHTS: tuple[float, ...] = (1.0, 2.0, 4.0)

LEVELS: tuple[str, ...] = ("L1/L2", "L2/L3", "L3/L4", "L4/L5", "L5/S1")


@dataclass(frozen=True)
class Condition:
    slug: str  # e.g. "left_neural_foraminal_narrowing"
    name: str  # as spelled in train_label_coordinates.csv
    family: str  # "spinal" | "foraminal" | "subarticular": the metric's groups
    side: str | None  # "left" | "right" | None
    series_type: str  # the series the condition is read on


CONDITIONS: tuple[Condition, ...] = (
    Condition("spinal_canal_stenosis", "Spinal Canal Stenosis", "spinal", None, SAGITTAL_T2),
    Condition("left_neural_foraminal_narrowing", "Left Neural Foraminal Narrowing", "foraminal", "left", SAGITTAL_T1),
    Condition("right_neural_foraminal_narrowing", "Right Neural Foraminal Narrowing", "foraminal", "right", SAGITTAL_T1),
    Condition("left_subarticular_stenosis", "Left Subarticular Stenosis", "subarticular", "left", AXIAL_T2),
    Condition("right_subarticular_stenosis", "Right Subarticular Stenosis", "subarticular", "right", AXIAL_T2),
)
FAMILIES: tuple[str, ...] = ("spinal", "foraminal", "subarticular")


def level_slug(level: str) -> str:
    """'L1/L2' -> 'l1_l2' (the spelling inside Kaggle column names and row ids)."""
    return level.lower().replace("/", "_")


@dataclass(frozen=True)
class Target:
    index: int  # 0..24, the order of train.csv's columns
    condition: Condition
    level: str  # "L1/L2" ...
    level_index: int  # 0..4
    detector_class_id: int  # class id inside the detector of condition.series_type

    @property
    def column(self) -> str:
        """Column name in train.csv, e.g. 'spinal_canal_stenosis_l1_l2'."""
        return f"{self.condition.slug}_{level_slug(self.level)}"

    @property
    def series_type(self) -> str:
        return self.condition.series_type

    @property
    def side(self) -> str | None:
        return self.condition.side

    @property
    def family(self) -> str:
        return self.condition.family

    def row_id(self, study_id: int | str) -> str:
        """Kaggle submission row id, e.g. '4003253_spinal_canal_stenosis_l1_l2'."""
        return f"{study_id}_{self.column}"

    @property
    def detector_class_name(self) -> str:
        return self.column


def _build_targets() -> tuple[Target, ...]:
    targets: list[Target] = []
    next_class_id: dict[str, int] = {s: 0 for s in SERIES_TYPES}
    for condition in CONDITIONS:
        for level_index, level in enumerate(LEVELS):
            class_id = next_class_id[condition.series_type]
            next_class_id[condition.series_type] += 1
            targets.append(Target(len(targets), condition, level, level_index, class_id))
    return tuple(targets)


TARGETS: tuple[Target, ...] = _build_targets()
TARGET_COLUMNS: tuple[str, ...] = tuple(t.column for t in TARGETS)
TARGET_BY_COLUMN: dict[str, Target] = {t.column: t for t in TARGETS}
TARGET_BY_NAME_LEVEL: dict[tuple[str, str], Target] = {(t.condition.name, t.level): t for t in TARGETS}


def targets_for_series(series_type: str) -> tuple[Target, ...]:
    """Targets read on one series type, in detector class-id order."""
    found = tuple(sorted((t for t in TARGETS if t.series_type == series_type), key=lambda t: t.detector_class_id))
    if not found:
        raise KeyError(f"unknown series type {series_type!r}; expected one of {SERIES_TYPES}")
    return found


def detector_class_names(series_type: str) -> dict[int, str]:
    """{class id: name} for the detector of one series type (Ultralytics' `names`)."""
    return {t.detector_class_id: t.detector_class_name for t in targets_for_series(series_type)}


def as_records() -> list[dict]:
    """The table as plain rows, for model cards and docs."""
    return [
        {
            "index": t.index,
            "column": t.column,
            "condition": t.condition.slug,
            "condition_name": t.condition.name,
            "family": t.family,
            "side": t.side,
            "level": t.level,
            "series_type": t.series_type,
            "detector_class_id": t.detector_class_id,
        }
        for t in TARGETS
    ]
