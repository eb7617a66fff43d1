"""Storage helpers, and reading a study from a real S3 server exactly like from a local folder."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from lumbar_ray import storage
from lumbar_ray.dicom.errors import StudyNotFoundError
from lumbar_ray.dicom.read import list_studies, read_series, read_study
from lumbar_ray.dicom.write import uid_for, write_mr_series
from lumbar_ray.targets import AXIAL_T2, SAGITTAL_T1, SAGITTAL_T2

SAG = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
AX = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _write_study(root: str, study_id: str = "4003253") -> None:
    """A tiny Kaggle-layout study (3 series, one RLE-compressed, one junk file) + the CSV."""
    from pydicom.uid import RLELossless

    rng = np.random.default_rng(1)
    specs = [
        ("101", SAGITTAL_T1, SAG, 5, (10.0, -40.0, 40.0), {}),
        ("102", SAGITTAL_T2, SAG, 6, (10.0, -40.0, 40.0), {"transfer_syntax": RLELossless}),
        ("103", AXIAL_T2, AX, 4, (-40.0, -40.0, 0.0), {}),
    ]
    rows = []
    for series_id, desc, orientation, n, origin, kw in specs:
        o = np.asarray(orientation)
        normal = np.cross(o[:3], o[3:])
        positions = [np.asarray(origin) + k * 3.0 * normal for k in range(n)]
        order = list(rng.permutation(n) + 1)  # instance numbers not in geometric order
        write_mr_series(
            storage.join(root, "train_images", study_id, series_id),
            rng.integers(0, 2000, (n, 32, 40)),
            study_uid=uid_for("study", study_id),
            series_uid=uid_for("series", study_id, series_id),
            study_id=study_id,
            series_description=desc,
            series_number=int(series_id),
            image_orientation=orientation,
            positions=positions,
            pixel_spacing=(0.7, 0.5),
            slice_thickness=3.0,
            instance_numbers=order,
            **kw,
        )
        rows.append((study_id, series_id, desc))
    storage.write_bytes(storage.join(root, "train_images", study_id, "101", "junk.txt"), b"not a dicom file\n" * 20)
    csv = pd.DataFrame(rows, columns=["study_id", "series_id", "series_description"]).to_csv(index=False)
    storage.write_bytes(storage.join(root, "train_series_descriptions.csv"), csv.encode())


# --------------------------------------------------------------------------------------------
# Local storage helpers


def test_local_storage_helpers(tmp_path):
    root = str(tmp_path)
    target = storage.join(root, "a", "b.bin")
    assert storage.write_bytes(target, b"one") == target
    storage.write_bytes(target, b"two")  # atomic replace, no temporary left behind
    assert storage.read_bytes(target) == b"two"
    assert os.listdir(tmp_path / "a") == ["b.bin"]
    assert storage.exists(target) and storage.isdir(storage.join(root, "a"))
    assert storage.listdir(root) == ["a"] and storage.listdir(root, dirs=False) == []
    assert storage.glob(storage.join(root, "*", "*.bin")) == [target]
    storage.write_bytes(storage.join(root, "t.csv"), b"x,y\n1,2\n")
    assert storage.read_csv(storage.join(root, "t.csv")).to_dict("records") == [{"x": 1, "y": 2}]
    fs, path = storage.filesystem_for(f"file://{target}")
    assert path == target and storage.to_url(fs, path) == target
    with storage.open(storage.join(root, "new", "c.txt"), "wb") as f:
        f.write(b"c")
    assert (tmp_path / "new" / "c.txt").read_bytes() == b"c"
    assert storage.join("s3://bucket/prefix/", "x", "y.dcm") == "s3://bucket/prefix/x/y.dcm"


def test_s3_endpoint_comes_from_the_environment(monkeypatch):
    for name in storage.S3_ENDPOINT_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    assert storage.storage_options_for("s3://b/k") == {}
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    assert storage.storage_options_for("s3://b/k") == {"endpoint_url": "http://127.0.0.1:1"}
    monkeypatch.setenv("LUMBAR_RAY_S3_ENDPOINT", "http://127.0.0.1:2")
    assert storage.storage_options_for("s3://b/k") == {"endpoint_url": "http://127.0.0.1:2"}
    assert storage.storage_options_for("/tmp/x") == {}


# --------------------------------------------------------------------------------------------
# A real S3 server


@pytest.mark.s3
def test_read_study_from_s3_matches_local(tmp_path, s3_env):
    local = str(tmp_path / "data")
    _write_study(local)
    fs, _ = storage.filesystem_for(f"s3://{s3_env.bucket}")
    fs.put(local + "/", f"{s3_env.bucket}/kaggle/", recursive=True)
    remote = f"s3://{s3_env.bucket}/kaggle"

    assert storage.exists(storage.join(remote, "train_series_descriptions.csv"))
    assert storage.listdir(storage.join(remote, "train_images", "4003253")) == ["101", "102", "103"]
    assert list_studies(remote) == list_studies(local) == ["4003253"]

    a = read_study(local, 4003253)
    b = read_study(remote, "4003253")
    assert set(a.series) == set(b.series) == {SAGITTAL_T1, SAGITTAL_T2, AXIAL_T2}
    for series_type, sa in a.series.items():
        sb = b.series[series_type]
        np.testing.assert_array_equal(sa.volume, sb.volume)
        np.testing.assert_array_equal(sa.instance_numbers, sb.instance_numbers)
        np.testing.assert_array_equal(sa.positions, sb.positions)
        np.testing.assert_array_equal(sa.orientation, sb.orientation)
        for name in ("study_id", "series_id", "description", "series_type", "plane", "pixel_spacing",
                     "slice_thickness", "slice_spacing", "type_source", "series_instance_uid"):
            assert getattr(sa, name) == getattr(sb, name), name
        assert all(f.startswith(f"s3://{s3_env.bucket}/kaggle/train_images/4003253/") for f in sb.files)
        assert [os.path.basename(f) for f in sa.files] == [os.path.basename(f) for f in sb.files]
    assert [(os.path.basename(s.path), s.error_type) for s in b.skipped] == [("junk.txt", "NotDicomError")]
    assert [(os.path.basename(s.path), s.error_type) for s in a.skipped] == [("junk.txt", "NotDicomError")]

    one = read_series(remote, "train_images/4003253/102")
    np.testing.assert_array_equal(one.volume, a.series[SAGITTAL_T2].volume)
    with pytest.raises(StudyNotFoundError):
        read_study(remote, 1)


@pytest.mark.s3
def test_s3_requests_are_signed(s3_env):
    if s3_env.kind != "seaweedfs":
        pytest.skip("moto does not check signatures")
    from s3server import _client

    client = _client(s3_env.endpoint, s3_env.access_key, "wrong-secret", s3_env.region)
    with pytest.raises(Exception) as info:
        client.list_objects_v2(Bucket=s3_env.bucket)
    assert "AccessDenied" in str(info.value) or "SignatureDoesNotMatch" in str(info.value) or "403" in str(info.value)


@pytest.mark.s3
def test_storage_helpers_on_s3(s3_env):
    base = f"s3://{s3_env.bucket}/helpers"
    storage.write_bytes(storage.join(base, "x", "a.csv"), b"p,q\n3,4\n")
    assert storage.read_csv(storage.join(base, "x", "a.csv")).to_dict("records") == [{"p": 3, "q": 4}]
    assert storage.glob(storage.join(base, "*", "*.csv")) == [f"{base}/x/a.csv"]
    assert storage.listdir(base, dirs=True) == ["x"]
    assert storage.exists(storage.join(base, "x", "a.csv")) and not storage.exists(storage.join(base, "nope"))
    with storage.open(storage.join(base, "y.txt"), "wb") as f:
        f.write(b"y")
    assert storage.read_bytes(storage.join(base, "y.txt")) == b"y"
