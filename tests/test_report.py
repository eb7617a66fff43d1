"""Per-study overlays: one PNG per series present, markers coloured by grade."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from lumbar_ray.outputs import overlays
from lumbar_ray.outputs.store import OutputWriter
from lumbar_ray.outputs.overlays import write_study_report
from lumbar_ray.targets import AXIAL_T2, SAGITTAL_T1, SAGITTAL_T2, TARGETS

SIZE = 96


def phantom_volume(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    base = 800.0 * np.exp(-((xx - SIZE / 2) ** 2 + (yy - SIZE / 2) ** 2) / (2 * 20.0**2))
    return np.stack([base * (0.8 + 0.05 * k) + rng.normal(0, 20, base.shape) + 200 for k in range(n)]).astype(np.float32)


def predictions(study_id: str, *, undetected=(), severe=(), instance_of=lambda t: 3 + t.level_index % 2) -> pd.DataFrame:
    """25 rows; targets in ``severe`` get a Severe grade; ``undetected`` get a prior row."""
    rows = []
    for t in TARGETS:
        detected = t.index not in undetected
        p = [0.1, 0.09, 0.81] if t.index in severe else [0.8, 0.15, 0.05]
        rows.append({
            "study_id": study_id, "condition": t.condition.slug, "level": t.level,
            "normal_mild": p[0], "moderate": p[1], "severe": p[2], "detected": detected,
            "confidence": 0.9 if detected else None,
            "series_id": {SAGITTAL_T1: "11", SAGITTAL_T2: "22", AXIAL_T2: "33"}[t.series_type] if detected else None,
            "instance_number": instance_of(t) if detected else None,
            "x": 20.0 + 12 * t.level_index if detected else None,
            "y": 25.0 + 10 * t.level_index if detected else None,
            "flags": "skipped_files:1",
        })
    return pd.DataFrame(rows)


def fake_study(study_id: str, types=(SAGITTAL_T1, SAGITTAL_T2, AXIAL_T2)):
    ids = {SAGITTAL_T1: "11", SAGITTAL_T2: "22", AXIAL_T2: "33"}
    series = {
        t: SimpleNamespace(series_id=ids[t], volume=phantom_volume(6, i), instance_numbers=np.arange(1, 7),
                           pixel_spacing=(0.7, 0.7), description=t)
        for i, t in enumerate(types)
    }
    return SimpleNamespace(study_id=study_id, series=series, other_series=[], skipped=[])


def red_pixels(png: bytes) -> int:
    img = imread(io.BytesIO(png))
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    return int(((r > 0.7) & (g < 0.3) & (b < 0.3)).sum())


def test_one_png_per_series_with_content(tmp_path, monkeypatch):
    study = fake_study("123")
    calls = []
    monkeypatch.setattr(overlays, "read_study", lambda root, sid, split: calls.append((root, sid, split)) or study)
    out = tmp_path / "out"
    severe_spinal = TARGETS[3].index  # spinal canal stenosis L4/L5 -> Sagittal T2/STIR, drawn red
    with OutputWriter(out, "r", "v1") as w:
        w.write(predictions("123", undetected={0, 10}, severe={severe_spinal}))
    paths = write_study_report(out, "data-root", 123, tmp_path / "png")
    assert calls == [("data-root", "123", "test")]
    assert [Path(p).name for p in paths] == ["123_sagittal_t1.png", "123_sagittal_t2_stir.png", "123_axial_t2.png"]
    for p in paths:
        data = Path(p).read_bytes()
        assert data.startswith(b"\x89PNG")
        img = imread(io.BytesIO(data))
        assert img.shape[0] > 300 and img.shape[1] > 600
        assert img[..., :3].std() > 0.05  # an image, not a blank canvas
    # Only the sagittal T2 series has a severe target: red markers there, none elsewhere.
    reds = [red_pixels(Path(p).read_bytes()) for p in paths]
    assert reds[1] > 20 and reds[0] == 0 and reds[2] == 0, reds


def test_missing_series_and_no_detections(tmp_path, monkeypatch):
    study = fake_study("7", types=(SAGITTAL_T2, AXIAL_T2))
    monkeypatch.setattr(overlays, "read_study", lambda root, sid, split: study)
    axial = {t.index for t in TARGETS if t.series_type == AXIAL_T2}
    frame = predictions("7", undetected=axial)
    paths = write_study_report(frame, "root", "7", tmp_path, split="train")
    assert [Path(p).name for p in paths] == ["7_sagittal_t2_stir.png", "7_axial_t2.png"]
    assert imread(paths[1])[..., :3].std() > 0.05  # the middle slice plus the side note
    with pytest.raises(ValueError, match="no predictions for study 8"):
        write_study_report(frame, "root", "8", tmp_path)


def test_real_dicom_study(tmp_path):
    """The same report from DICOM files written by lumbar_ray.dicom.write and read back by lumbar_ray.dicom.read."""
    from lumbar_ray.dicom.write import uid_for, write_mr_series

    root, study_id, split = tmp_path / "data", "4242", "test"
    geometry = {
        # series type: (series id, orientation, position of slice k)
        SAGITTAL_T1: ("11", [0, 1, 0, 0, 0, -1], lambda k: [-10.0 + 4 * k, -40.0, 60.0]),
        SAGITTAL_T2: ("22", [0, 1, 0, 0, 0, -1], lambda k: [-10.0 + 4 * k, -40.0, 60.0]),
        AXIAL_T2: ("33", [1, 0, 0, 0, 1, 0], lambda k: [-35.0, -40.0, -20.0 + 5 * k]),
    }
    rows = []
    for i, (stype, (sid, orient, pos)) in enumerate(geometry.items()):
        write_mr_series(root / f"{split}_images" / study_id / sid, phantom_volume(6, i) * 2,
                        study_uid=uid_for("study", study_id), series_uid=uid_for("series", sid), study_id=study_id,
                        series_description=stype, series_number=i + 1, image_orientation=orient,
                        positions=[pos(k) for k in range(6)], pixel_spacing=(0.7, 0.7), slice_thickness=4.0)
        rows.append({"study_id": study_id, "series_id": sid, "series_description": stype})
    pd.DataFrame(rows).to_csv(root / f"{split}_series_descriptions.csv", index=False)
    frame = predictions(study_id, severe={TARGETS[3].index})
    paths = write_study_report(frame, root, study_id, tmp_path / "png")
    assert len(paths) == 3
    assert red_pixels(Path(paths[1]).read_bytes()) > 20
