"""Synthetic RSNA 2024 studies: Kaggle schema, valid anonymous DICOM, geometry, determinism,
anatomy that follows the labels, the real label distribution, realistic acquisition patterns
(angled slabs, split axial, repeated sagittal, missing slices) and the pinned simple generator."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.uid import MRImageStorage, RLELossless

from lumbar_ray.dicom.write import uid_for, write_mr_series
from lumbar_ray.synth.phi import patient_tags
from lumbar_ray.synth.contact_sheet import write_contact_sheet
from lumbar_ray.synth.anatomy import PatientModel
from lumbar_ray.synth.labels import sample_label_vectors, severity_ids_of
from lumbar_ray.metrics.labels import COORDINATE_COLUMNS
from lumbar_ray.synth.protocols import (
    AXIAL_SLABS_SHARE,
    AXIAL_SPLIT_SHARE,
    MISSING_SLICE_SHARE,
    OBLIQUE_SAGITTAL_SHARE,
    REPEATED_SAGITTAL_SHARE,
    AcquisitionPlan,
    draw_plan,
)
from lumbar_ray.synth.writer import SERIES_COLUMNS, SynthConfig, draw_ids, list_study_ids, study_ids_of, study_rng, synthesize
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
    summary = synthesize(out, N_STUDIES, SEED, size="small", labels_csv=labels_csv)  # realistic by default
    assert summary.n_studies == N_STUDIES and summary.n_series >= 3 * N_STUDIES
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
        assert set(g.series_description) == set(SERIES_TYPES)
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
        # the patient elements hold sentinel PHI (tests/test_phi.py scans outputs and logs for it);
        # nothing else identifying is written
        for keyword, value in patient_tags(study_id).items():
            assert str(ds.get(keyword)) == value, (path, keyword)
        assert ds.PatientIdentityRemoved == "NO"
        for tag in IDENTIFYING:
            assert tag in patient_tags(study_id) or tag not in ds, (path, tag)
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
    assert s.n_coordinates == 0 and s.n_series >= 3
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


# ------------------------------------------------------------------------------------ simple mode, pinned
# A 2-study small "simple" synth (seed 5) is pinned: realistic acquisitions must not change it.
# Paths, label files and every DICOM header: byte for byte (sha256 of the paths, the CSV bytes and
# each header as sorted DICOM JSON). Pixels: numpy's exp/sin/cos differ in the last bit with the
# CPU's SIMD level (on an AVX-512 machine 19 of 1,163,264 pixels come out 1 grey level off the
# AVX2 result), so the pixels are pinned by their count and sum, within PIXEL_SUM_TOLERANCE:
# far below what any change to the phantom moves.
# History: a sha256 of every file's bytes until 2026-12-02, when a machine with AVX-512 broke it.
# These values were computed from the same generator (HEAD 873a3dc's; with AVX-512 dispatch off,
# NPY_DISABLE_CPU_FEATURES="X86_V4 AVX512_ICL", the files still match the old byte pin). If a
# deliberate change to the phantom moves them, update them in the same commit and say why.
SIMPLE_HEADERS_SHA256 = "99a613d2ad4f57cbde4517fae3a80b4d9e5df1c23e0ff57461f959a67e39dcdb"
SIMPLE_PIXELS = (1_163_264, 436_923_362)  # (pixels, sum of their stored values), AVX2
PIXEL_SUM_TOLERANCE = 64


def _pinned_parts(root: Path) -> tuple[str, int, int]:
    """(sha256 of the paths, non-DICOM bytes and DICOM headers; pixel count; pixel sum)."""
    h = hashlib.sha256()
    n_pixels = pixel_sum = 0
    for p in sorted(x for x in root.rglob("*") if x.is_file()):
        h.update(str(p.relative_to(root)).encode() + b"\0")
        if p.suffix != ".dcm":
            h.update(p.read_bytes())
            continue
        ds = pydicom.dcmread(p)
        pixels = ds.pixel_array.astype(np.int64)
        n_pixels += pixels.size
        pixel_sum += int(pixels.sum())
        del ds.PixelData
        h.update(json.dumps(ds.file_meta.to_json_dict(), sort_keys=True).encode())
        h.update(json.dumps(ds.to_json_dict(), sort_keys=True).encode())
    return h.hexdigest(), n_pixels, pixel_sum


def test_simple_mode_is_pinned(tmp_path):
    s = synthesize(tmp_path, 2, 5, size="small", acquisitions="simple")
    assert s.n_series == 6
    headers, n_pixels, pixel_sum = _pinned_parts(tmp_path)
    assert headers == SIMPLE_HEADERS_SHA256
    assert n_pixels == SIMPLE_PIXELS[0]
    assert abs(pixel_sum - SIMPLE_PIXELS[1]) <= PIXEL_SUM_TOLERANCE, pixel_sum - SIMPLE_PIXELS[1]


def test_acquisition_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="acquisitions"):
        SynthConfig(n_studies=1, seed=0, acquisitions="fancy")
    with pytest.raises(ValueError, match="plans"):
        synthesize(tmp_path, 2, 0, size="small", plans=[None])
    with pytest.raises(ValueError, match="plans"):
        synthesize(tmp_path, 1, 0, size="small", acquisitions="simple", plans=[None])
    with pytest.raises(ValueError, match="axial"):
        AcquisitionPlan(axial="diagonal")


# ------------------------------------------------------------------------------------ realistic plans
def test_plan_shares():
    """The documented shares, over 400 drawn plans (bounds about 3 standard errors)."""
    plans = [draw_plan(3, i) for i in range(400)]
    assert draw_plan(3, 17) == plans[17] and any(draw_plan(4, i) != plans[i] for i in range(10))

    def share(f) -> float:
        return float(np.mean([bool(f(p)) for p in plans]))

    assert abs(share(lambda p: p.axial == "slabs") - AXIAL_SLABS_SHARE) < 0.075
    assert abs(share(lambda p: p.axial == "split") - AXIAL_SPLIT_SHARE) < 0.055
    assert abs(share(lambda p: p.repeat is not None) - REPEATED_SAGITTAL_SHARE) < 0.045
    assert abs(share(lambda p: p.oblique_deg != (0.0, 0.0)) - OBLIQUE_SAGITTAL_SHARE) < 0.075
    present = [("sagittal_t1", "sagittal_t2", "axial") + (("axial_2",) if p.axial == "split" else ())
               + (("repeat",) if p.repeat else ()) for p in plans]
    n_missing = sum(len({r for r, _ in p.missing} & set(roles)) for p, roles in zip(plans, present))
    assert abs(n_missing / sum(map(len, present)) - MISSING_SLICE_SHARE) < 0.03
    assert {p.repeat for p in plans} == {None, SAGITTAL_T1, SAGITTAL_T2}


# Two studies forced to show every pattern: A angled slabs (one axial instance missing), its
# Sagittal T2/STIR repeated with the labels on the repeat, oblique sagittal planes; B axial split
# over a slab series (L1/L2, L2/L3) and a plain stack, Sagittal T1 repeated with the labels on the
# first, one slice missing from the Sagittal T2/STIR and from the second axial series.
PLAN_A = AcquisitionPlan(axial="slabs", repeat=SAGITTAL_T2, repeat_labelled=True, oblique_deg=(3.0, -3.0),
                         missing=(("axial", 0.5),))
PLAN_B = AcquisitionPlan(axial="split", split_after=2, split_slabs=(True, False), repeat=SAGITTAL_T1,
                         missing=(("sagittal_t2", 0.5), ("axial_2", 0.3)))


@pytest.fixture(scope="module")
def realistic(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("realistic")
    synthesize(out, 2, SEED, size="small", plans=[PLAN_A, PLAN_B])
    return out


def _read_tables(root: Path):
    return (pd.read_csv(root / "train.csv"), pd.read_csv(root / "train_label_coordinates.csv"),
            pd.read_csv(root / "train_series_descriptions.csv"))


def _headers(root: Path, study_id: int, series_id: int) -> dict[int, pydicom.Dataset]:
    """The series' headers by instance number."""
    folder = root / "train_images" / str(study_id) / str(series_id)
    out = {}
    for path in folder.glob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        out[int(ds.InstanceNumber)] = ds
    return out


def _normal(ds) -> np.ndarray:
    iop = np.array(ds.ImageOrientationPatient, dtype=float)
    return np.cross(iop[:3], iop[3:])


def _series_of(series: pd.DataFrame, study_id: int, series_type: str) -> list[int]:
    return [int(v) for v in series[(series.study_id == study_id) & (series.series_description == series_type)].series_id]


def _ordered_study_ids(seed: int, n: int) -> list[int]:
    return draw_ids(seed, n)[0]


def test_angled_slabs_in_one_series(realistic):
    _, coords, series = _read_tables(realistic)
    study_a = _ordered_study_ids(SEED, 2)[0]
    (axial,) = _series_of(series, study_a, AXIAL_T2)
    hdr = _headers(realistic, study_a, axial)
    assert len({ds.SeriesInstanceUID for ds in hdr.values()}) == 1
    slabs: dict[tuple, list[int]] = {}
    for inst, ds in hdr.items():
        slabs.setdefault(tuple(ds.ImageOrientationPatient), []).append(inst)
    assert len(slabs) == 5 and all(2 <= len(v) <= 4 for v in slabs.values())
    tilts = [np.degrees(np.arctan2(-_normal(hdr[v[0]])[1], _normal(hdr[v[0]])[2])) for v in slabs.values()]
    assert max(tilts) - min(tilts) > 8.0, tilts  # lordosis: L5/S1 is tilted well beyond L1/L2
    numbers = sorted(hdr)
    assert numbers[-1] - numbers[0] + 1 == len(numbers) + 1  # instance numbers run through, one missing
    missing = set(range(numbers[0], numbers[-1] + 1)) - set(numbers)
    assert not missing & set(coords[coords.series_id == axial].instance_number)
    assert 3.5 <= float(next(iter(hdr.values())).SpacingBetweenSlices) <= 4.5
    axial_rows = coords[(coords.study_id == study_a) & coords.condition.str.contains("Subarticular")]
    assert set(axial_rows.series_id) == {axial}


def test_split_axial_over_two_series(realistic):
    _, coords, series = _read_tables(realistic)
    study_b = _ordered_study_ids(SEED, 2)[1]
    axials = _series_of(series, study_b, AXIAL_T2)
    assert len(axials) == 2
    hdrs = {s: _headers(realistic, study_b, s) for s in axials}
    first, second = sorted(axials, key=lambda s: int(next(iter(hdrs[s].values())).SeriesNumber))
    assert len({tuple(ds.ImageOrientationPatient) for ds in hdrs[first].values()}) == 2  # slabs at L1/L2, L2/L3
    assert len({tuple(ds.ImageOrientationPatient) for ds in hdrs[second].values()}) == 1  # a plain stack
    rows = coords[(coords.study_id == study_b) & coords.condition.str.contains("Subarticular")]
    assert set(rows[rows.series_id == first].level) <= {"L1/L2", "L2/L3"}
    assert set(rows[rows.series_id == second].level) <= {"L3/L4", "L4/L5", "L5/S1"}
    assert len(rows[rows.series_id == second]) > 0
    numbers = sorted(hdrs[second])
    assert numbers[-1] - numbers[0] + 1 == len(numbers) + 1  # its missing slice


def test_repeated_sagittal_series(realistic):
    _, coords, series = _read_tables(realistic)
    study_a, study_b = _ordered_study_ids(SEED, 2)
    for study_id, st, labels_on_repeat in ((study_a, SAGITTAL_T2, True), (study_b, SAGITTAL_T1, False)):
        ids = _series_of(series, study_id, st)
        assert len(ids) == 2
        hdrs = {s: _headers(realistic, study_id, s) for s in ids}
        first, repeat = sorted(ids, key=lambda s: int(next(iter(hdrs[s].values())).SeriesNumber))
        numbers = [int(next(iter(hdrs[s].values())).SeriesNumber) for s in (first, repeat)]
        assert numbers[1] == numbers[0] + 1
        assert next(iter(hdrs[first].values())).SeriesInstanceUID != next(iter(hdrs[repeat].values())).SeriesInstanceUID
        pos = [np.array([ds.ImagePositionPatient for _, ds in sorted(hdrs[s].items())], dtype=float) for s in (first, repeat)]
        assert pos[0].shape != pos[1].shape or not np.allclose(pos[0], pos[1], atol=0.05)  # the patient moved
        conditions = [c.name for c in CONDITIONS if c.series_type == st]
        labelled = set(coords[(coords.study_id == study_id) & coords.condition.isin(conditions)].series_id)
        assert labelled == {repeat if labels_on_repeat else first}


def test_missing_slice_leaves_a_gap(realistic):
    _, coords, series = _read_tables(realistic)
    study_b = _ordered_study_ids(SEED, 2)[1]
    (sag_t2,) = _series_of(series, study_b, SAGITTAL_T2)
    numbers = sorted(_headers(realistic, study_b, sag_t2))
    gap = set(range(numbers[0], numbers[-1] + 1)) - set(numbers)
    assert len(gap) == 1 and not gap & set(coords[coords.series_id == sag_t2].instance_number)


def test_oblique_sagittal_planes(realistic):
    _, _, series = _read_tables(realistic)
    study_a = _ordered_study_ids(SEED, 2)[0]
    (t1,) = _series_of(series, study_a, SAGITTAL_T1)
    for ds in _headers(realistic, study_a, t1).values():
        n = _normal(ds)
        assert np.degrees(np.arccos(min(1.0, abs(n[0])))) > 3.0  # rolled 3 and yawed -3 (+-2) degrees


def _check_labels_on_nearest_slices(root: Path, seed: int, n: int, labels_csv: str | None = None) -> int:
    """Every label row's instance exists; the labelled 3-D point of the (re-sampled) patient lies
    within a slice spacing of that slice's own plane, nearer than any other slice of the series
    its type's labels use, and (x, y) is its projection onto the slice."""
    _, coords, _ = _read_tables(root)
    vectors = sample_label_vectors(n, seed, labels_csv)
    target = {(t.condition.name, t.level): t for t in TARGETS}
    checked = 0
    for i, study_id in enumerate(_ordered_study_ids(seed, n)):
        model = PatientModel.sample(study_rng(seed, i), severity_ids_of(vectors.iloc[i]))
        rows = coords[coords.study_id == study_id]
        headers = {s: _headers(root, study_id, s) for s in rows.series_id.unique()}
        for r in rows.itertuples():
            t = target[(r.condition, r.level)]
            assert r.instance_number in headers[r.series_id], r
            ds = headers[r.series_id][r.instance_number]
            P = model.label_point(t)
            n_k = _normal(ds)
            dist = float((P - np.array(ds.ImagePositionPatient, dtype=float)) @ n_k)
            assert abs(dist) <= float(ds.SpacingBetweenSlices) + 1e-6, (r, dist)
            same_type = rows[rows.condition.isin([c.name for c in CONDITIONS if c.series_type == t.series_type])]
            others = [d for s in same_type.series_id.unique() for d in headers[s].values()]
            nearest = min(abs(float((P - np.array(d.ImagePositionPatient, dtype=float)) @ _normal(d))) for d in others)
            assert abs(dist) <= nearest + 1e-3, (r, dist, nearest)
            assert np.linalg.norm(_patient_point(ds, r.x, r.y) + dist * n_k - P) < 0.01, r
            checked += 1
    return checked


def test_labels_on_their_nearest_slice(realistic, root, labels_csv):
    assert _check_labels_on_nearest_slices(realistic, SEED, 2) == len(pd.read_csv(realistic / "train_label_coordinates.csv"))
    assert _check_labels_on_nearest_slices(root, SEED, N_STUDIES, labels_csv) > 20 * N_STUDIES


def test_realistic_study_and_its_simple_twin(realistic, tmp_path):
    synthesize(tmp_path, 2, SEED, size="small", acquisitions="simple")
    real_train, real_coords, real_series = _read_tables(realistic)
    twin_train, twin_coords, twin_series = _read_tables(tmp_path)
    pd.testing.assert_frame_equal(real_train, twin_train)  # same study ids, same labels
    assert set(twin_series.series_id) < set(real_series.series_id)  # extra series have new ids
    assert len(real_coords) == len(twin_coords)
    pd.testing.assert_frame_equal(real_coords[["study_id", "condition", "level"]], twin_coords[["study_id", "condition", "level"]])


def test_write_mr_series_per_slice_orientation(tmp_path):
    vol = np.ones((2, 8, 8))
    iop = [[1, 0, 0, 0, 1, 0], [1, 0, 0, 0, 0.9805807, 0.1961161]]
    kw = dict(study_uid=uid_for("s", 2), series_uid=uid_for("se", 2), study_id=43, series_description=AXIAL_T2,
              series_number=1, positions=[[0, 0, 0], [0, 0, 4]], pixel_spacing=(1.0, 1.0), slice_thickness=3.0)
    paths = write_mr_series(tmp_path / "s", vol, image_orientation=iop, **kw)
    got = [[float(v) for v in pydicom.dcmread(p).ImageOrientationPatient] for p in paths]
    assert np.allclose(got, iop)
    with pytest.raises(ValueError, match="image_orientation"):
        write_mr_series(tmp_path / "t", vol, image_orientation=iop[:1], **kw)
