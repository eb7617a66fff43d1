"""Synthetic RSNA 2024 studies: Kaggle schema, valid anonymous DICOM, geometry, determinism,
anatomy that follows the labels, and the real label distribution."""

from __future__ import annotations

import gzip
import io
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.uid import MRImageStorage, RLELossless

from lumbar_ray.dicom.write import uid_for, write_mr_series
from lumbar_ray.synth.contact_sheet import write_contact_sheet
from lumbar_ray.synth.labels import sample_label_vectors
from lumbar_ray.metrics.labels import COORDINATE_COLUMNS
from lumbar_ray.synth.writer import SERIES_COLUMNS, list_study_ids, study_ids_of, synthesize
from lumbar_ray.targets import AXIAL_T2, CONDITIONS, LEVELS, SAGITTAL_T1, SAGITTAL_T2, SERIES_TYPES, SEVERITIES, TARGET_COLUMNS, TARGETS

SEED = 7
N_STUDIES = 4


def _designed_labels() -> pd.DataFrame:
    """4 studies whose severities alternate Normal/Mild and Severe by level (so every study has
    both), one Moderate and one missing label."""
    rows = []
    fam_offset = {"spinal": 0, "foraminal": 1, "subarticular": 0}
    for k in range(N_STUDIES):
        row = {"study_id": 1000 + k}
        for t in TARGETS:
            side = 1 if t.side == "right" else 0
            sev = "Severe" if (t.level_index + k + fam_offset[t.family] + side) % 2 == 0 else "Normal/Mild"
            row[t.column] = sev
        rows.append(row)
    rows[1]["spinal_canal_stenosis_l2_l3"] = "Moderate"
    rows[0]["right_subarticular_stenosis_l1_l2"] = np.nan
    return pd.DataFrame(rows, columns=["study_id", *TARGET_COLUMNS])


@pytest.fixture(scope="module")
def labels_csv(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("labels") / "train.csv"
    _designed_labels().to_csv(path, index=False)
    return str(path)


@pytest.fixture(scope="module")
def root(tmp_path_factory, labels_csv) -> Path:
    out = tmp_path_factory.mktemp("synth")
    summary = synthesize(out, N_STUDIES, SEED, size="small", labels_csv=labels_csv)
    assert summary.n_studies == N_STUDIES and summary.n_series == 3 * N_STUDIES
    return out


@pytest.fixture(scope="module")
def tables(root):
    return (
        pd.read_csv(root / "train.csv"),
        pd.read_csv(root / "train_label_coordinates.csv"),
        pd.read_csv(root / "train_series_descriptions.csv"),
    )


def _real_header() -> list[str]:
    with resources.files("lumbar_ray").joinpath("data", "rsna2024_train_labels.csv.gz").open("rb") as f:
        return gzip.decompress(f.read()).decode().splitlines()[0].split(",")


def _dicoms(root: Path, split: str = "train"):
    return sorted((root / f"{split}_images").glob("*/*/*.dcm"))


def _patient_point(ds, x: float, y: float) -> np.ndarray:
    """docs/CONVENTIONS.md: P = IPP + x * col_spacing * row_cosine + y * row_spacing * col_cosine."""
    ipp = np.array(ds.ImagePositionPatient, dtype=float)
    iop = np.array(ds.ImageOrientationPatient, dtype=float)
    row_sp, col_sp = (float(v) for v in ds.PixelSpacing)
    return ipp + x * col_sp * iop[:3] + y * row_sp * iop[3:]


# ------------------------------------------------------------------------------------ schema
def test_kaggle_schema(root, tables):
    train, coords, series = tables
    assert list(train.columns) == _real_header() == ["study_id", *TARGET_COLUMNS]
    assert list(coords.columns) == list(COORDINATE_COLUMNS)
    assert list(series.columns) == list(SERIES_COLUMNS)
    assert train.study_id.dtype == np.int64 and train.study_id.is_unique and train.study_id.is_monotonic_increasing
    assert set(train[list(TARGET_COLUMNS)].stack().dropna()) <= set(SEVERITIES)
    for col in ("study_id", "series_id", "instance_number"):
        assert coords[col].dtype == np.int64, col
    assert coords.x.dtype == np.float64 and coords.y.dtype == np.float64
    assert set(coords.condition) == {c.name for c in CONDITIONS}
    assert set(coords.level) == set(LEVELS)
    assert set(series.series_description) == set(SERIES_TYPES)
    for _, g in series.groupby("study_id"):
        assert sorted(g.series_description) == sorted(SERIES_TYPES)
    assert series.series_id.is_unique and not set(series.series_id) & set(train.study_id)
    assert (series.series_id > 0).all() and (series.series_id < 2**32).all()
    # same study order and per-study condition order as the real coordinates file
    assert coords.study_id.is_monotonic_increasing
    for _, g in coords.groupby("study_id"):
        assert list(dict.fromkeys(g.condition)) == sorted(set(g.condition))
    # a missing label stays an empty cell and has no coordinate row; every other label has one
    text = (root / "train.csv").read_text().splitlines()
    assert any(",," in line or line.endswith(",") for line in text[1:])
    assert train.isna().sum().sum() == 1
    assert len(coords) == train[list(TARGET_COLUMNS)].notna().sum().sum()
    merged = coords.merge(series, on=["study_id", "series_id"], how="left")
    expected = {c.name: c.series_type for c in CONDITIONS}
    assert (merged.series_description == merged.condition.map(expected)).all()


# ------------------------------------------------------------------------------------ DICOM
REQUIRED = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "Modality",
    "SeriesDescription", "SeriesNumber", "InstanceNumber", "ImagePositionPatient", "ImageOrientationPatient",
    "PixelSpacing", "SliceThickness", "SpacingBetweenSlices", "Rows", "Columns", "BitsAllocated", "BitsStored",
    "HighBit", "PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation", "WindowCenter", "WindowWidth",
    "PatientID",
)
IDENTIFYING = ("PatientBirthDate", "PatientBirthTime", "PatientAddress", "OtherPatientIDs", "OtherPatientNames",
               "ReferringPhysicianName", "InstitutionName", "InstitutionAddress", "StudyDate", "SeriesDate",
               "AcquisitionDate", "ContentDate", "StudyTime", "AccessionNumber", "PatientTelephoneNumbers")


def test_dicom_files_valid_and_anonymous(root, tables):
    _, _, series = tables
    desc = {(int(r.study_id), int(r.series_id)): r.series_description for r in series.itertuples()}
    files = _dicoms(root)
    assert len(files) > 3 * N_STUDIES * 8
    sop_uids, series_uid_of = set(), {}
    for path in files:
        raw = path.read_bytes()
        assert raw[128:132] == b"DICM"
        ds = pydicom.dcmread(io.BytesIO(raw))
        study_id, series_id = int(path.parent.parent.name), int(path.parent.name)
        for tag in REQUIRED:
            assert tag in ds, (path, tag)
        assert ds.file_meta.MediaStorageSOPClassUID == MRImageStorage == ds.SOPClassUID
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert "TransferSyntaxUID" in ds.file_meta and "ImplementationClassUID" in ds.file_meta
        assert ds.Modality == "MR" and ds.PhotometricInterpretation == "MONOCHROME2"
        assert ds.BitsAllocated == 16 and ds.PixelRepresentation == 0 and ds.SamplesPerPixel == 1
        assert int(ds.InstanceNumber) == int(path.stem)
        assert ds.SeriesDescription == desc[(study_id, series_id)]
        assert ds.PatientID == str(study_id) and str(ds.get("PatientName", "")) == ""
        for tag in IDENTIFYING:
            assert tag not in ds, (path, tag)
        arr = ds.pixel_array
        assert arr.shape == (ds.Rows, ds.Columns) and arr.dtype == np.uint16 and arr.max() > 0
        assert ds.SOPInstanceUID not in sop_uids
        sop_uids.add(ds.SOPInstanceUID)
        assert series_uid_of.setdefault((study_id, series_id), ds.SeriesInstanceUID) == ds.SeriesInstanceUID
    assert len(set(series_uid_of.values())) == len(series_uid_of)


def test_coordinates_inside_labelled_instance(root, tables):
    _, coords, _ = tables
    for r in coords.itertuples():
        path = root / "train_images" / str(r.study_id) / str(r.series_id) / f"{r.instance_number}.dcm"
        assert path.exists(), path
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert 0 <= r.x < ds.Columns and 0 <= r.y < ds.Rows


# ------------------------------------------------------------------------------------ geometry
def test_sagittal_and_axial_points_agree(root, tables):
    _, coords, series = tables
    merged = coords.merge(series, on=["study_id", "series_id"])
    checked = 0
    for (study_id, level), g in merged.groupby(["study_id", "level"]):
        pts = {}
        for r in g.itertuples():
            ds = pydicom.dcmread(root / "train_images" / str(study_id) / str(r.series_id) / f"{r.instance_number}.dcm",
                                 stop_before_pixels=True)
            pts[r.condition] = _patient_point(ds, r.x, r.y)
        spinal = pts["Spinal Canal Stenosis"]
        if "Left Subarticular Stenosis" in pts and "Right Subarticular Stenosis" in pts:
            left, right = pts["Left Subarticular Stenosis"], pts["Right Subarticular Stenosis"]
            for p in (left, right):
                assert abs(p[2] - spinal[2]) < 10.0, (study_id, level, p, spinal)
                assert abs(p[1] - spinal[1]) < 15.0
            assert left[0] > right[0] + 5.0  # +x is the patient's left
            checked += 1
        fl, fr = pts["Left Neural Foraminal Narrowing"], pts["Right Neural Foraminal Narrowing"]
        assert fl[0] > spinal[0] + 5.0 > spinal[0] - 5.0 > fr[0]
        assert abs(fl[2] - spinal[2]) < 20.0 and abs(fr[2] - spinal[2]) < 20.0
    assert checked >= N_STUDIES * 5 - 1


def test_levels_ordered_head_to_feet(root, tables):
    _, coords, _ = tables
    for (study_id, cond), g in coords.groupby(["study_id", "condition"]):
        zs = []
        for r in g.sort_values("level", key=lambda s: s.map(LEVELS.index)).itertuples():
            ds = pydicom.dcmread(root / "train_images" / str(study_id) / str(r.series_id) / f"{r.instance_number}.dcm",
                                 stop_before_pixels=True)
            zs.append(_patient_point(ds, r.x, r.y)[2])
        assert np.all(np.diff(zs) < -15.0), (study_id, cond, zs)  # one disc level is ~35-40 mm


# ------------------------------------------------------------------------------------ anatomy
def _window_mean(root: Path, r, half: int = 1) -> float:
    arr = pydicom.dcmread(root / "train_images" / str(r.study_id) / str(r.series_id) / f"{r.instance_number}.dcm").pixel_array
    x, y = int(round(r.x)), int(round(r.y))
    return float(arr[y - half : y + half + 1, x - half : x + half + 1].mean())


def test_anatomy_shows_the_labels(root, tables):
    """At the labelled point, Severe narrowing displaces the bright content (CSF on T2 for the
    canal and the lateral recess, fat on T1 for the foramen): clearly darker than Normal/Mild
    points of the same study and series."""
    train, coords, _ = tables
    sev = train.set_index("study_id")
    family = {c.name: next(t.family for t in TARGETS if t.condition == c) for c in CONDITIONS}
    column = {(t.condition.name, t.level): t.column for t in TARGETS}
    ratios: dict[str, list[float]] = {"spinal": [], "foraminal": [], "subarticular": []}
    for study_id, g in coords.groupby("study_id"):
        vals: dict[tuple[str, str], list[float]] = {}
        for r in g.itertuples():
            label = sev.loc[study_id, column[(r.condition, r.level)]]
            vals.setdefault((family[r.condition], label), []).append(_window_mean(root, r))
        for fam in ratios:
            if (fam, "Severe") in vals and (fam, "Normal/Mild") in vals:
                ratios[fam].append(np.mean(vals[(fam, "Severe")]) / np.mean(vals[(fam, "Normal/Mild")]))
    for fam, rs in ratios.items():
        assert len(rs) == N_STUDIES, fam
        assert np.mean(rs) < 0.75, (fam, rs)
        assert max(rs) < 0.95, (fam, rs)


# ------------------------------------------------------------------------------------ determinism
def test_deterministic_and_prefix_stable(root, tmp_path, labels_csv, tables):
    train, coords, _ = tables
    again = tmp_path / "again"
    synthesize(again, 2, SEED, size="small", labels_csv=labels_csv)
    first_two = sorted(int(p.name) for p in (again / "train_images").iterdir())
    for path in _dicoms(again):
        assert path.read_bytes() == (root / path.relative_to(again)).read_bytes(), path
    t2 = pd.read_csv(again / "train.csv")
    pd.testing.assert_frame_equal(t2, train[train.study_id.isin(first_two)].reset_index(drop=True))
    c2 = pd.read_csv(again / "train_label_coordinates.csv")
    pd.testing.assert_frame_equal(c2, coords[coords.study_id.isin(first_two)].reset_index(drop=True))

    other = tmp_path / "other"
    synthesize(other, 1, SEED + 1, size="small", labels_csv=labels_csv)
    (other_id,) = [int(p.name) for p in (other / "train_images").iterdir()]
    assert other_id not in set(train.study_id)
    a = pydicom.dcmread(_dicoms(other)[0]).pixel_array
    b = pydicom.dcmread(_dicoms(root)[0]).pixel_array
    assert a.shape != b.shape or not np.array_equal(a, b)


def test_test_split_has_no_labels(tmp_path):
    s = synthesize(tmp_path, 1, 3, split="test", size="small")
    assert s.n_coordinates == 0 and s.n_series == 3
    assert study_ids_of(s) == list_study_ids(tmp_path, "test") and len(s.study_ids) == 1
    assert (tmp_path / "test_series_descriptions.csv").exists()
    assert not (tmp_path / "train.csv").exists() and not (tmp_path / "train_label_coordinates.csv").exists()
    assert len(list((tmp_path / "test_images").glob("*/*/*.dcm"))) == s.n_images


# ------------------------------------------------------------------------------------ labels
def test_label_vectors_follow_the_real_distribution():
    vec = sample_label_vectors(200, seed=11)
    assert list(vec.columns) == ["source_study_id", *TARGET_COLUMNS]
    assert vec.source_study_id.is_unique  # a real study is used once per pass
    expected = {"spinal": 0.878, "foraminal": 0.780, "subarticular": 0.714}
    for fam, share in expected.items():
        cols = [t.column for t in TARGETS if t.family == fam]
        values = vec[cols].stack().dropna()
        assert abs((values == "Normal/Mild").mean() - share) < 0.04, fam
    assert sample_label_vectors(5, seed=11).equals(vec.head(5))


# ------------------------------------------------------------------------------------ writers
def test_contact_sheet(root, tables, tmp_path):
    train, _, _ = tables
    out = write_contact_sheet(root, int(train.study_id.iloc[0]), tmp_path / "sheet.png")
    data = Path(out).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000


def test_write_mr_series_to_fsspec_and_rle():
    fsspec = pytest.importorskip("fsspec")
    vol = np.linspace(0, 3000.7, 2 * 24 * 20).reshape(2, 24, 20)
    kw = dict(study_uid=uid_for("s", 1), series_uid=uid_for("se", 1), study_id=42, series_description=AXIAL_T2,
              series_number=3, image_orientation=[1, 0, 0, 0, 1, 0], positions=[[0, 0, 0], [0, 0, 4]],
              pixel_spacing=(0.5, 0.6), slice_thickness=4.0, instance_numbers=[7, 8])
    paths = write_mr_series("memory://lr-test/series", vol, **kw)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["7.dcm", "8.dcm"]
    with fsspec.open(paths[1], "rb") as f:
        ds = pydicom.dcmread(f)
    assert ds.InstanceNumber == 8 and np.array_equal(ds.pixel_array, np.rint(vol[1]).astype(np.uint16))
    assert float(ds.SpacingBetweenSlices) == 4.0 and [float(v) for v in ds.PixelSpacing] == [0.5, 0.6]
    mem = fsspec.filesystem("memory")
    local = write_mr_series("/lr-test/rle", vol, fs=mem, transfer_syntax=RLELossless, **kw)
    with mem.open(local[0], "rb") as f:
        ds = pydicom.dcmread(f)
    assert ds.file_meta.TransferSyntaxUID == RLELossless
    assert np.array_equal(ds.pixel_array, np.rint(vol[0]).astype(np.uint16))
    assert uid_for("a", 1) == uid_for("a", 1) != uid_for("a", 2)
    assert SAGITTAL_T1 in SERIES_TYPES and SAGITTAL_T2 in SERIES_TYPES
