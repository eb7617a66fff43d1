"""The DICOM reader: pydicom's real test files, typed errors, geometry, series choice, NIfTI."""

from __future__ import annotations

import os
import pickle
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file, get_testdata_files

from lumbar_ray.dicom import files as dicom_files
from lumbar_ray.dicom.errors import (
    AbsurdImageSizeError,
    DicomReadError,
    EmptyFileError,
    NoUsableSlicesError,
    NotDicomError,
    PixelDecodeError,
    ReadLimits,
    SeriesNotFoundError,
    SkippedFile,
    StudyNotFoundError,
    TruncatedDicomError,
    UnsupportedPixelDataError,
)
from lumbar_ray.dicom.files import read_image
from lumbar_ray.dicom.read import list_studies, load_descriptions, read_series, read_study
from lumbar_ray.dicom.write import uid_for, write_mr_series
from lumbar_ray.targets import AXIAL_T2, SAGITTAL_T1, SAGITTAL_T2

REAL_NIFTI = Path(__file__).resolve().parents[2] / "shared" / "real_mri" / "t2_lumbar.nii.gz"

SAG = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
AX = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
COR = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)


def _offline(pattern: str) -> list[str]:
    """pydicom test files matching ``pattern`` that are on disk (no download)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "download failures" for files listed in urls.json
        return sorted(get_testdata_files(pattern))


def _mr_small() -> np.ndarray:
    return pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array.astype(np.float32)


# --------------------------------------------------------------------------------------------
# pydicom's real files

LOSSLESS_VARIANTS = [
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_expb.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_padded.dcm",
]
CORRUPT_ON_PURPOSE = {
    "JPEG-lossy.dcm": PixelDecodeError,  # a misplaced JPEG marker (pydicom's README)
    "JPEG2000-embedded-sequence-delimiter.dcm": PixelDecodeError,  # 4 codestream bytes overwritten
    "MR_truncated.dcm": TruncatedDicomError,  # pixel data shorter than Rows x Columns
}
OTHER_OFFLINE = [
    "examples_overlay.dcm",  # MR, 12-bit unsigned
    "JPEG2000.dcm",
    "JPGExtended.dcm",  # JPEG extended 12-bit
    "JPEGLSNearLossless_08.dcm",
    "JPEGLSNearLossless_16.dcm",
    "693_J2KI.dcm",  # JPEG 2000 lossy, rescale intercept -1024
    "J2K_pixelrep_mismatch.dcm",
    "SC_rgb_jpeg_gdcm.dcm",  # JPEG lossless (process 14 SV1), RGB -> luminance
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline, YBR -> luminance
]


@pytest.mark.parametrize("name", LOSSLESS_VARIANTS)
def test_lossless_variants_give_the_pixels_of_mr_small(name):
    image = read_image(get_testdata_file(name))
    assert image.pixels.dtype == np.float32
    np.testing.assert_array_equal(image.pixels, _mr_small())
    assert "PixelData" not in image.dataset


def test_every_offline_mr_file_reads_or_fails_typed():
    files = _offline("MR*")
    assert len(files) >= 9
    for path in files:
        name = os.path.basename(path)
        if name in CORRUPT_ON_PURPOSE:
            with pytest.raises(CORRUPT_ON_PURPOSE[name]) as info:
                read_image(path)
            assert name in str(info.value)
            continue
        image = read_image(path)
        assert image.pixels.shape == (64, 64), name
        assert np.isfinite(image.pixels).all()


@pytest.mark.parametrize("name", sorted(CORRUPT_ON_PURPOSE))
def test_corrupt_files_raise_typed_errors_naming_the_file(name):
    with pytest.raises(CORRUPT_ON_PURPOSE[name]) as info:
        read_image(get_testdata_file(name))
    err = info.value
    assert isinstance(err, DicomReadError)
    assert err.path.endswith(name) and err.reason and name in str(err)


@pytest.mark.parametrize("name", OTHER_OFFLINE + [os.path.basename(p) for p in _offline("JP*")])
def test_other_offline_jpeg_and_mr_variants(name):
    path = get_testdata_file(name)
    if name in CORRUPT_ON_PURPOSE:
        with pytest.raises(CORRUPT_ON_PURPOSE[name]):
            read_image(path)
        return
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    image = read_image(path)
    assert image.pixels.shape == (ds.Rows, ds.Columns)
    assert image.pixels.dtype == np.float32 and np.isfinite(image.pixels).all()
    assert image.pixels.max() > image.pixels.min()


def test_rescale_is_applied():
    ct = read_image(get_testdata_file("693_J2KI.dcm"))
    raw = pydicom.dcmread(get_testdata_file("693_J2KI.dcm")).pixel_array.astype(np.float32)
    np.testing.assert_array_equal(ct.pixels, raw - 1024.0)


def _mr_small_variant(tmp_path: Path, name: str, **changes) -> str:
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    for key, value in changes.items():
        setattr(ds, key, value)
    out = tmp_path / name
    ds.save_as(out)
    return str(out)


def test_rescale_slope_intercept_on_mr(tmp_path):
    path = _mr_small_variant(tmp_path, "rescaled.dcm", RescaleSlope="2.5", RescaleIntercept="-100")
    np.testing.assert_allclose(read_image(path).pixels, _mr_small() * 2.5 - 100, rtol=0, atol=1e-3)


def test_monochrome1_is_inverted(tmp_path):
    path = _mr_small_variant(tmp_path, "mono1.dcm", PhotometricInterpretation="MONOCHROME1")
    pixels = read_image(path).pixels
    # signed 16-bit stored range [-32768, 32767]: v' = lo + hi - v = -1 - v
    np.testing.assert_array_equal(pixels, -1.0 - _mr_small())
    assert np.corrcoef(pixels.ravel(), _mr_small().ravel())[0, 1] < -0.999


def test_monochrome1_inversion_after_rescale(tmp_path):
    path = _mr_small_variant(
        tmp_path, "mono1r.dcm", PhotometricInterpretation="MONOCHROME1", RescaleSlope="2", RescaleIntercept="10"
    )
    lo, hi = -32768 * 2 + 10, 32767 * 2 + 10
    np.testing.assert_array_equal(read_image(path).pixels, (lo + hi) - (_mr_small() * 2 + 10))


def test_absurd_size_refused_before_decoding(tmp_path, monkeypatch):
    path = _mr_small_variant(tmp_path, "absurd.dcm", Rows=60000, Columns=60000)
    decoded = []
    monkeypatch.setattr(dicom_files, "decode_pixels", lambda *a, **k: decoded.append(a))
    with pytest.raises(AbsurdImageSizeError) as info:
        read_image(path)
    assert "60000x60000" in str(info.value) and "absurd.dcm" in str(info.value)
    assert decoded == []
    # A cap below the real size refuses it too; max_pixels overrides the default.
    with pytest.raises(AbsurdImageSizeError):
        read_image(get_testdata_file("MR_small.dcm"), max_pixels=32 * 32)
    with pytest.raises(AbsurdImageSizeError):
        read_image(get_testdata_file("MR_small.dcm"), limits=ReadLimits(max_rows=32))


def test_not_dicom_empty_and_non_images(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("this is not a DICOM file\n" * 40)
    with pytest.raises(NotDicomError, match="notes.txt"):
        read_image(text)
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    with pytest.raises(EmptyFileError, match="empty"):
        read_image(empty)
    with pytest.raises(UnsupportedPixelDataError, match="no Pixel Data"):
        read_image(get_testdata_file("rtplan.dcm"))
    with pytest.raises(UnsupportedPixelDataError, match="multi-frame"):
        read_image(get_testdata_file("rtdose.dcm"))
    with pytest.raises(DicomReadError, match="does not exist"):
        read_image(tmp_path / "missing.dcm")


def test_errors_pickle_for_ray():
    err = TruncatedDicomError("s3://b/x.dcm", "ends early")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is TruncatedDicomError and back.path == err.path and str(back) == str(err)
    skipped = [SkippedFile("a", "b", "NotDicomError")]
    back = pickle.loads(pickle.dumps(NoUsableSlicesError("d", "nothing", skipped)))
    assert back.skipped == skipped


# --------------------------------------------------------------------------------------------
# Tiny series written in tmp_path


def _series(
    folder: Path,
    *,
    n: int = 6,
    orientation=SAG,
    spacing: float = 4.0,
    origin=(0.0, -40.0, 40.0),
    instance_numbers=None,
    description: str = "Sagittal T2/STIR",
    size: int = 24,
    study_id: str = "1",
    transfer_syntax=None,
    value_of=None,
    series_number: int = 1,
) -> list[str]:
    """``n`` slices; slice k (in geometry order, along the normal) is filled with 100 + 10 k
    (or ``value_of(k)``) plus a marker pixel at (row 2, col 3)."""
    o = np.asarray(orientation, dtype=float)
    normal = np.cross(o[:3], o[3:])
    positions = [np.asarray(origin) + k * spacing * normal for k in range(n)]
    vol = np.zeros((n, size, size), np.uint16)
    for k in range(n):
        vol[k] = value_of(k) if value_of else 100 + 10 * k
        vol[k, 2, 3] = 1000
    kw = {} if transfer_syntax is None else {"transfer_syntax": transfer_syntax}
    return write_mr_series(
        str(folder),
        vol,
        study_uid=uid_for("study", study_id),
        series_uid=uid_for("series", study_id, folder.name),
        study_id=study_id,
        series_description=description,
        series_number=series_number,
        image_orientation=orientation,
        positions=positions,
        pixel_spacing=(0.8, 0.6),
        slice_thickness=3.5,
        instance_numbers=instance_numbers,
        **kw,
    )


def _edit(paths, delete=(), **changes) -> None:
    for p in paths:
        ds = pydicom.dcmread(p)
        for key, value in changes.items():
            setattr(ds, key, value)
        for key in delete:
            if key in ds:
                delattr(ds, key)
        ds.save_as(p)


def test_slices_sorted_by_geometry_not_instance_or_name(tmp_path):
    shuffled = [5, 2, 6, 1, 4, 3]  # instance number of geometric slice k
    _series(tmp_path / "7", instance_numbers=shuffled, orientation=AX)
    series = read_series(str(tmp_path / "7"))
    normal = np.cross(np.asarray(AX[:3]), np.asarray(AX[3:]))
    proj = series.positions @ normal
    assert np.all(np.diff(proj) > 0)
    np.testing.assert_array_equal(series.volume[:, 0, 0], 100 + 10 * np.arange(6))
    np.testing.assert_array_equal(series.instance_numbers, shuffled)
    assert [os.path.basename(f) for f in series.files] == [f"{i}.dcm" for i in shuffled]
    assert series.index_of_instance(1) == 3
    with pytest.raises(KeyError):
        series.index_of_instance(99)
    assert series.plane == "axial" and series.series_type == SAGITTAL_T2  # the description says so
    assert series.pixel_spacing == (0.8, 0.6) and series.slice_thickness == 3.5
    assert series.slice_spacing == pytest.approx(4.0)
    assert series.series_id == "7" and series.volume.dtype == np.float32


def test_pixel_patient_round_trip(tmp_path):
    rot = np.deg2rad(7.0)  # a slightly rotated sagittal stack
    orientation = (0.0, np.cos(rot), np.sin(rot), 0.0, np.sin(rot), -np.cos(rot))
    _series(tmp_path / "s", orientation=orientation, n=5, spacing=3.3)
    s = read_series(str(tmp_path / "s"))
    assert s.plane == "sagittal"
    p = s.pixel_to_patient(2, 3.0, 2.0)  # the marker pixel
    expected = s.positions[2] + 3.0 * 0.6 * s.orientation[:3] + 2.0 * 0.8 * s.orientation[3:]
    np.testing.assert_allclose(p, expected)
    k, x, y = s.patient_to_pixel(p)
    assert (k, x, y) == pytest.approx((2.0, 3.0, 2.0), abs=1e-6)
    k, _, _ = s.patient_to_pixel(p + 0.5 * 3.3 * s.normal)
    assert k == pytest.approx(2.5, abs=1e-6)
    k, _, _ = s.patient_to_pixel(s.positions[0] - 3.3 * s.normal)
    assert k == pytest.approx(-1.0, abs=1e-6)
    assert s.volume[int(round(k + 1)), 2, 3] == 1000


def test_compressed_series_reads_like_uncompressed(tmp_path):
    from pydicom.uid import JPEG2000Lossless, RLELossless

    plain = read_series(str(Path(_series(tmp_path / "a", n=4, size=64)[0]).parent))
    for name, ts in (("rle", RLELossless), ("j2k", JPEG2000Lossless)):
        files = _series(tmp_path / name, n=4, size=64, transfer_syntax=ts)  # J2K needs >= 64 px
        assert str(pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID) == str(ts)
        other = read_series(str(tmp_path / name))
        np.testing.assert_array_equal(other.volume, plain.volume)


def test_bad_files_are_skipped_with_reasons(tmp_path):
    folder = tmp_path / "train_images" / "1" / "10"
    files = _series(folder, n=6)
    good = Path(files[0]).read_bytes()
    (folder / "notes.txt").write_text("not dicom\n" * 30)
    (folder / "empty.dcm").write_bytes(b"")
    cuts = {"cut_meta.dcm": 150, "cut_header.dcm": 600, "cut_pixels.dcm": len(good) - 300, "cut_last.dcm": len(good) - 1}
    for name, cut in cuts.items():
        (folder / name).write_bytes(good[:cut])
    absurd = pydicom.dcmread(files[1])
    absurd.Rows, absurd.Columns = 60000, 60000
    absurd.InstanceNumber = 99
    absurd.save_as(folder / "absurd.dcm")
    (folder / "sub").mkdir()
    series = read_series(str(folder))
    assert series.n_slices == 6 and series.study_id == "1" and series.series_id == "10"
    reasons = {os.path.basename(s.path): s for s in series.skipped}
    assert reasons["notes.txt"].error_type == "NotDicomError"
    assert reasons["empty.dcm"].error_type == "EmptyFileError"
    for name in cuts:
        assert reasons[name].error_type == "TruncatedDicomError", (name, reasons[name])
    assert reasons["absurd.dcm"].error_type == "AbsurdImageSizeError"
    assert "sub" in reasons
    assert all(s.reason for s in series.skipped)


def test_files_read_on_many_threads_keep_their_own_verdicts(tmp_path):
    """export-sr and report read studies on threads (outputs/parallel.py): one file's end-of-file
    warning must never be lost (a truncated file accepted) nor land on another (a good file
    refused)."""
    from concurrent.futures import ThreadPoolExecutor

    from pydicom.uid import RLELossless

    # Encapsulated pixel data cut before its delimiter: pydicom warns ("End of file reached
    # before delimiter") instead of raising, and the reader turns the warning into the error.
    files = _series(tmp_path / "s", n=4, transfer_syntax=RLELossless)
    good = Path(files[0]).read_bytes()
    cut = tmp_path / "cut_pixels.dcm"
    cut.write_bytes(good[:-100])
    paths = [*files, str(cut)] * 40

    def verdict(path):
        try:
            read_image(path)
            return "read"
        except TruncatedDicomError:
            return "truncated"

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch often, as they would on slow storage
    try:
        with ThreadPoolExecutor(8) as pool:
            verdicts = list(pool.map(verdict, paths))
    finally:
        sys.setswitchinterval(interval)
    assert verdicts == ["truncated" if p == str(cut) else "read" for p in paths]
    assert verdict(files[0]) == "read" and verdict(str(cut)) == "truncated"  # and no filter left behind


def test_nothing_readable_is_a_typed_error(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "a.txt").write_text("x" * 500)
    (folder / "b.dcm").write_bytes(b"")
    with pytest.raises(NoUsableSlicesError) as info:
        read_series(str(folder))
    assert {os.path.basename(s.path) for s in info.value.skipped} == {"a.txt", "b.dcm"}
    with pytest.raises(SeriesNotFoundError):
        read_series(str(tmp_path / "nope"))
    (tmp_path / "hollow").mkdir()
    with pytest.raises(SeriesNotFoundError):
        read_series(str(tmp_path / "hollow"))


def test_missing_geometry_is_skipped(tmp_path):
    files = _series(tmp_path / "s", n=4)
    _edit(files[:1], delete=("ImagePositionPatient",))
    series = read_series(str(tmp_path / "s"))
    assert series.n_slices == 3
    assert [s.error_type for s in series.skipped] == ["MissingGeometryError"]


def test_mixed_orientation_folder_reads_the_larger_stack(tmp_path):
    folder = tmp_path / "s"
    _series(folder, n=8)
    # two localizer-ish slices of other orientations in the same folder
    _series(folder, n=1, orientation=AX, instance_numbers=[101], value_of=lambda k: 7)
    _series(folder, n=1, orientation=COR, instance_numbers=[102], value_of=lambda k: 7)
    series = read_series(str(folder))
    assert series.n_slices == 8 and series.plane == "sagittal"
    assert (series.volume[:, 0, 0] != 7).all()
    assert sorted(os.path.basename(s.path) for s in series.skipped) == ["101.dcm", "102.dcm"]
    assert {s.error_type for s in series.skipped} == {"ExtraStack"}


# --------------------------------------------------------------------------------------------
# Studies


def _csv(root: Path, rows, split: str = "train") -> None:
    pd.DataFrame(rows, columns=["study_id", "series_id", "series_description"]).to_csv(
        root / f"{split}_series_descriptions.csv", index=False
    )


def _study(root: Path, study_id: str = "1001", split: str = "train") -> Path:
    base = root / f"{split}_images" / study_id
    _series(base / "11", n=10, description="Sagittal T1", study_id=study_id, value_of=lambda k: 300)
    _series(base / "12", n=12, description="Sagittal T2/STIR", study_id=study_id)
    _series(base / "13", n=7, orientation=AX, description="Axial T2", study_id=study_id, origin=(-40, -40, 0))
    return base


def test_study_chosen_by_description_csv(tmp_path):
    base = _study(tmp_path)
    # a 3-plane localizer series with no CSV row, plus an ImageType LOCALIZER stack
    _series(base / "5", n=1, orientation=SAG, instance_numbers=[1])
    _series(base / "5", n=1, orientation=AX, instance_numbers=[2])
    _series(base / "5", n=1, orientation=COR, instance_numbers=[3])
    loc = _series(base / "6", n=6, description="Sagittal T2/STIR")
    _edit(loc, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    _csv(tmp_path, [(1001, 11, "Sagittal T1"), (1001, 12, "Sagittal T2/STIR"), (1001, 13, "Axial T2"), (1001, 99, "Axial T2")])
    study = read_study(str(tmp_path), 1001)
    assert study.study_id == "1001"
    assert {t: s.series_id for t, s in study.series.items()} == {SAGITTAL_T1: "11", SAGITTAL_T2: "12", AXIAL_T2: "13"}
    assert all(s.type_source == "csv" for s in study.series.values())
    assert study.series[AXIAL_T2].plane == "axial" and study.series[SAGITTAL_T1].plane == "sagittal"
    assert study.other_series == []
    skipped = {(os.path.basename(os.path.dirname(s.path)), os.path.basename(s.path)): s.error_type for s in study.skipped}
    assert skipped[("5", "1.dcm")] == skipped[("5", "2.dcm")] == skipped[("5", "3.dcm")] == "Localizer"
    assert all(skipped[("6", f"{i}.dcm")] == "Localizer" for i in range(1, 7))
    assert skipped[("1001", "99")] == "SeriesNotFoundError"
    assert list_studies(str(tmp_path)) == ["1001"]


def test_geometric_fallback_without_descriptions(tmp_path):
    base = tmp_path / "train_images" / "2002"
    _series(base / "21", n=10, description="SAG T1 TSE", study_id="2002", value_of=lambda k: 300)
    stir = _series(base / "22", n=11, description="", study_id="2002")
    ax = _series(base / "23", n=6, orientation=AX, description="", study_id="2002", origin=(-40, -40, 0))
    _edit(stir, EchoTime="80", RepetitionTime="3500", delete=("SeriesDescription",))
    _edit(ax, delete=("SeriesDescription",))
    study = read_study(str(tmp_path), "2002")  # no CSV at all
    assert {t: (s.series_id, s.type_source) for t, s in study.series.items()} == {
        SAGITTAL_T1: ("21", "description_keywords"),
        SAGITTAL_T2: ("22", "echo_times"),
        AXIAL_T2: ("23", "geometry"),
    }
    assert study.series[SAGITTAL_T2].description is None
    assert study.series[SAGITTAL_T1].description == "SAG T1 TSE"
    assert list_studies(str(tmp_path)) == ["2002"]


def test_fallback_by_elimination_and_brightness(tmp_path):
    base = tmp_path / "train_images" / "3003"
    t1 = _series(base / "31", n=9, description="", study_id="3003", value_of=lambda k: 300)

    def bright_csf(k):  # a thin, very bright stripe on a dim background (T2-like)
        img = np.full((24, 24), 100, np.uint16)
        img[:, 11:13] = 900
        return img

    t2 = _series(base / "32", n=9, description="", study_id="3003", value_of=bright_csf)
    _edit(t1 + t2, delete=("SeriesDescription",))
    # CSV names only the T1 (no row for 32): 32 takes the missing sagittal type
    _csv(tmp_path, [(3003, 31, "Sagittal T1")])
    study = read_study(str(tmp_path), "3003")
    assert study.series[SAGITTAL_T1].series_id == "31"
    assert (study.series[SAGITTAL_T2].series_id, study.series[SAGITTAL_T2].type_source) == ("32", "elimination")
    # without any description: relative brightness decides
    os.remove(tmp_path / "train_series_descriptions.csv")
    study = read_study(str(tmp_path), "3003")
    assert {t: (s.series_id, s.type_source) for t, s in study.series.items()} == {
        SAGITTAL_T1: ("31", "brightness"),
        SAGITTAL_T2: ("32", "brightness"),
    }
    assert AXIAL_T2 in study.missing_types()


def test_most_slices_wins_and_others_are_kept(tmp_path):
    base = _study(tmp_path)
    _series(base / "14", n=20, description="Sagittal T2/STIR", study_id="1001")
    _series(base / "15", n=4, orientation=AX, description="Axial T2", study_id="1001", origin=(-40, -40, 0))
    _csv(tmp_path, [(1001, 11, "Sagittal T1"), (1001, 12, "Sagittal T2/STIR"), (1001, 13, "Axial T2"),
                    (1001, 14, "Sagittal T2/STIR"), (1001, 15, "Axial T2")])
    descriptions = load_descriptions(str(tmp_path))
    study = read_study(str(tmp_path), "1001", descriptions=descriptions)
    assert study.series[SAGITTAL_T2].series_id == "14" and study.series[SAGITTAL_T2].n_slices == 20
    assert study.series[AXIAL_T2].series_id == "13"
    assert sorted(s.series_id for s in study.other_series) == ["12", "15"]
    assert all(s.volume.shape[0] == len(s.files) for s in study.other_series)


def test_study_with_bad_files_and_int_descriptions(tmp_path):
    base = _study(tmp_path)
    (base / "12" / "junk.bin").write_bytes(os.urandom(2000))
    (base / "stray.dcm").write_bytes(Path(base / "12" / "1.dcm").read_bytes())
    descriptions = pd.DataFrame(
        {"study_id": [1001, 1001, 1001], "series_id": [11, 12, 13], "series_description": ["Sagittal T1", "Sagittal T2/STIR", "Axial T2"]}
    )
    study = read_study(str(tmp_path), 1001, descriptions=descriptions)
    assert set(study.series) == {SAGITTAL_T1, SAGITTAL_T2, AXIAL_T2}
    assert [(os.path.basename(s.path), s.error_type) for s in study.skipped] == [
        ("stray.dcm", "UnexpectedFile"), ("junk.bin", "NotDicomError")]
    assert study.series[SAGITTAL_T2].n_slices == 12


def test_missing_study_and_split(tmp_path):
    _study(tmp_path)
    with pytest.raises(StudyNotFoundError, match="4242"):
        read_study(str(tmp_path), 4242)
    with pytest.raises(StudyNotFoundError):
        list_studies(str(tmp_path), split="test")
    _csv(tmp_path, [(9, 1, "Axial T2"), (1001, 11, "Sagittal T1"), (10, 2, "Axial T2")], split="test")
    assert list_studies(str(tmp_path), split="test") == ["9", "10", "1001"]


# --------------------------------------------------------------------------------------------
# A real MRI volume: NIfTI -> DICOM series -> reader


@pytest.mark.skipif(not REAL_NIFTI.exists(), reason="shared/real_mri/t2_lumbar.nii.gz not present")
def test_real_nifti_round_trip(tmp_path):
    import nibabel as nib

    from lumbar_ray.dicom.nifti import nifti_to_dicom_series

    out = tmp_path / "train_images" / "77" / "770"
    files = nifti_to_dicom_series(str(REAL_NIFTI), str(out), study_id=77)
    img = nib.load(str(REAL_NIFTI))
    data = np.asarray(img.dataobj)
    assert len(files) == data.shape[0]  # sagittal: one file per R-L voxel column
    study = read_study(str(tmp_path), 77)  # no CSV: the DICOM description names the type
    series = study.series[SAGITTAL_T2]
    assert series.plane == "sagittal" and series.n_slices == 38
    np.testing.assert_allclose(series.orientation, [0, 1, 0, 0, 0, -1], atol=1e-6)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ img.affine
    inv = np.linalg.inv(lps)
    rng = np.random.default_rng(0)
    n, rows, cols = series.volume.shape
    for k, r, c in [(0, 0, 0), (n - 1, rows - 1, cols - 1), *zip(rng.integers(0, n, 20), rng.integers(0, rows, 20), rng.integers(0, cols, 20))]:
        p = series.pixel_to_patient(int(k), float(c), float(r))
        ijk = inv[:3, :3] @ p + inv[:3, 3]
        nearest = np.round(ijk)
        assert np.abs(lps[:3, :3] @ nearest + lps[:3, 3] - p).max() < 1e-3  # on a voxel centre
        assert series.volume[k, r, c] == data[tuple(nearest.astype(int))]
        assert series.patient_to_pixel(p) == pytest.approx((k, c, r), abs=1e-3)
    # every IPP is the affine's voxel position of that slice's first pixel
    for k in range(n):
        ijk = inv[:3, :3] @ series.positions[k] + inv[:3, 3]
        assert np.abs(ijk - np.round(ijk)).max() < 1e-3
    # same intensities, as a whole
    assert series.volume.sum() == pytest.approx(float(data.sum()))
    assert series.pixel_spacing == pytest.approx(tuple(float(z) for z in img.header.get_zooms()[1:]))
