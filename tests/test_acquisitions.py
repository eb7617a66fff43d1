"""Real-world acquisition patterns, read as a real archive holds them: an Axial T2 series made of
per-level slabs each tilted to its disc, axial coverage split over two series, a repeated sagittal
series. The reader keeps every slice with its own geometry and offers every series of a type."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from lumbar_ray.cli import app
from lumbar_ray.dicom.read import read_series, read_study
from lumbar_ray.dicom.write import uid_for, write_mr_series
from lumbar_ray.targets import AXIAL_T2, SAGITTAL_T1, SAGITTAL_T2, TARGETS

TARGETS_TYPE = {t.index: t.series_type for t in TARGETS}

SAG = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
SIZE = 24
PIXEL = (0.8, 0.6)  # (row spacing, column spacing) mm
SLAB_TILTS_DEG = (-14.0, -6.0, 0.0, 8.0, 16.0)  # L1/L2 .. L5/S1, as lordosis tilts real discs
SLAB_CENTRES_Z = (100.0, 60.0, 20.0, -20.0, -60.0)


def _tilted_axial(tilt_deg: float) -> np.ndarray:
    """Axial orientation rotated about the patient's x axis by ``tilt_deg``."""
    t = math.radians(tilt_deg)
    return np.array([1.0, 0.0, 0.0, 0.0, math.cos(t), math.sin(t)])


def _write(folder: Path, volume, orientation, positions, instance_numbers, *, study_id: str,
           description: str, series_uid: str) -> None:
    write_mr_series(str(folder), np.asarray(volume, np.uint16), study_uid=uid_for("study", study_id),
                    series_uid=series_uid, study_id=study_id, series_description=description, series_number=1,
                    image_orientation=tuple(orientation), positions=positions, pixel_spacing=PIXEL,
                    slice_thickness=3.0, instance_numbers=list(instance_numbers))


def write_slab_series(folder: Path, study_id: str, levels=range(5), per_slab: int = 4, first_instance: int = 1,
                      skip_instances=()) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """An Axial T2 series of one slab per level in ``levels`` (``per_slab`` slices 3 mm apart,
    tilted to the level's disc), instance numbers running through the slabs; instances in
    ``skip_instances`` are left out (a lost slice). Returns {instance: (position, orientation)}."""
    geometry = {}
    instance = first_instance
    series_uid = uid_for("series", study_id, folder.name)
    for level in levels:
        o = _tilted_axial(SLAB_TILTS_DEG[level])
        normal = np.cross(o[:3], o[3:])
        centre = np.array([0.0, 0.0, SLAB_CENTRES_Z[level]])
        half = (SIZE - 1) / 2
        corner = centre - half * PIXEL[1] * o[:3] - half * PIXEL[0] * o[3:]
        for k in range(per_slab):
            if instance not in skip_instances:
                position = corner + (k - (per_slab - 1) / 2) * 3.0 * normal
                image = np.full((1, SIZE, SIZE), 100 + instance, np.uint16)
                _write(folder, image, o, [position], [instance], study_id=study_id, description="Axial T2",
                       series_uid=series_uid)
                geometry[instance] = (position, o)
            instance += 1
    return geometry


def write_sagittal(folder: Path, study_id: str, description: str, n: int = 8, x0: float = -14.0) -> None:
    o = np.asarray(SAG)
    normal = np.cross(o[:3], o[3:])
    positions = [np.array([x0, -10.0, 130.0]) + k * 4.0 * normal for k in range(n)]
    _write(folder, np.full((n, SIZE, SIZE), 300, np.uint16), SAG, positions, range(1, n + 1), study_id=study_id,
           description=description, series_uid=uid_for("series", study_id, folder.name))


def _csv(root: Path, rows) -> None:
    pd.DataFrame(rows, columns=["study_id", "series_id", "series_description"]).to_csv(
        root / "train_series_descriptions.csv", index=False)


def test_tilted_slabs_are_read_as_one_series_with_each_slice_geometry(tmp_path):
    base = tmp_path / "train_images" / "7001"
    geometry = write_slab_series(base / "3", "7001", skip_instances={7})
    write_sagittal(base / "1", "7001", "Sagittal T1")
    write_sagittal(base / "2", "7001", "Sagittal T2/STIR")
    _csv(tmp_path, [(7001, 1, "Sagittal T1"), (7001, 2, "Sagittal T2/STIR"), (7001, 3, "Axial T2")])

    study = read_study(str(tmp_path), "7001")
    axial = study.series[AXIAL_T2]
    assert study.other_series == [] and study.skipped == []
    assert axial.n_slices == 19 == len(geometry)  # 5 slabs x 4 slices, instance 7 lost
    assert sorted(axial.instance_numbers.tolist()) == sorted(geometry)
    assert axial.is_multi_oriented and axial.orientations.shape == (19, 6)
    # ordered along the body (inferior -> superior: ascending along the first slice's normal)
    centres_z = [axial.pixel_to_patient(k, (SIZE - 1) / 2, (SIZE - 1) / 2)[2] for k in range(axial.n_slices)]
    assert np.all(np.diff(centres_z) > 0)
    for k, instance in enumerate(axial.instance_numbers):
        position, orientation = geometry[int(instance)]
        np.testing.assert_allclose(axial.positions[k], position, atol=1e-4)
        np.testing.assert_allclose(axial.slice_orientation(k), orientation, atol=1e-5)
        assert axial.volume[k, 5, 5] == 100 + instance  # pixels stay with their own slice
        # pixel <-> patient per slice, in the slice's own plane
        point = axial.pixel_to_patient(k, 7.0, 11.0)
        expected = position + 7.0 * PIXEL[1] * orientation[:3] + 11.0 * PIXEL[0] * orientation[3:]
        np.testing.assert_allclose(point, expected, atol=1e-4)
        k_back, x, y = axial.patient_to_pixel(point)
        assert (k_back, round(x, 6), round(y, 6)) == (k, 7.0, 11.0)
        assert abs(axial.distances_to_planes(point)[k]) < 1e-6

    # read on its own, the folder is one series too
    alone = read_series(str(base / "3"))
    assert alone.n_slices == 19 and alone.series_type == AXIAL_T2 and alone.skipped == []


def test_inspect_lists_every_slab_instance(tmp_path):
    base = tmp_path / "train_images" / "7002"
    geometry = write_slab_series(base / "3", "7002")
    _csv(tmp_path, [(7002, 3, "Axial T2")])
    result = CliRunner().invoke(app, ["inspect", "--data", str(tmp_path), "--study", "7002"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    axial = report["series"][AXIAL_T2]
    assert sorted(axial["instances"]) == sorted(geometry) and len(geometry) == 20
    assert axial["orientations"] == len(SLAB_TILTS_DEG)
    assert report["other_series"] == [] and report["skipped"] == []


def test_split_axial_coverage_and_repeated_sagittal_are_all_offered(tmp_path):
    base = tmp_path / "train_images" / "7003"
    upper = write_slab_series(base / "30", "7003", levels=range(0, 3))
    lower = write_slab_series(base / "31", "7003", levels=range(3, 5), per_slab=5)
    write_sagittal(base / "10", "7003", "Sagittal T1")
    write_sagittal(base / "20", "7003", "Sagittal T2/STIR", n=8)
    write_sagittal(base / "21", "7003", "Sagittal T2/STIR", n=8, x0=-13.0)  # repeated after motion
    _csv(tmp_path, [(7003, 10, "Sagittal T1"), (7003, 20, "Sagittal T2/STIR"), (7003, 21, "Sagittal T2/STIR"),
                    (7003, 30, "Axial T2"), (7003, 31, "Axial T2")])
    study = read_study(str(tmp_path), "7003")
    axials = study.series_of_type(AXIAL_T2)
    assert sorted(s.series_id for s in axials) == ["30", "31"]
    assert {s.series_id: s.n_slices for s in axials} == {"30": len(upper), "31": len(lower)}
    assert sorted(s.series_id for s in study.series_of_type(SAGITTAL_T2)) == ["20", "21"]
    assert [s.series_id for s in study.series_of_type(SAGITTAL_T1)] == ["10"]
    # labels may point at any of them: found by id and instance
    assert study.find_series("31", 3).series_id == "31"
    assert study.find_series("99") is None


def test_stacks_of_another_image_size_in_a_folder_are_found_by_instance(tmp_path):
    """Two stacks of one plane but different matrices in one folder cannot share a volume: they
    stay two series with the folder's id, and a label finds the one holding its instance."""
    base = tmp_path / "train_images" / "7004"
    folder = base / "3"
    write_slab_series(folder, "7004", levels=range(0, 2))  # instances 1..8, 24 x 24
    o = _tilted_axial(0.0)
    positions = [np.array([-10.0, -10.0, z]) for z in (-20.0, -24.0, -28.0, -32.0)]
    write_mr_series(str(folder), np.full((4, 16, 16), 50, np.uint16), study_uid=uid_for("study", "7004"),
                    series_uid=uid_for("series", "7004", "3"), study_id="7004", series_description="Axial T2",
                    series_number=1, image_orientation=tuple(o), positions=positions, pixel_spacing=PIXEL,
                    slice_thickness=3.0, instance_numbers=[21, 22, 23, 24])
    _csv(tmp_path, [(7004, 3, "Axial T2")])
    study = read_study(str(tmp_path), "7004")
    both = [s for s in study.all_series() if s.series_id == "3"]
    assert sorted(s.n_slices for s in both) == [4, 8]
    assert study.find_series("3", 22).n_slices == 4
    assert study.find_series("3", 2).n_slices == 8


@pytest.mark.parametrize("tilt", [-20.0, 25.0])
def test_strongly_tilted_slab_stays_axial(tilt):
    from lumbar_ray.dicom.stacks import plane_of

    assert plane_of(_tilted_axial(tilt)) == "axial"


# --------------------------------------------------------------------------------------------
# Levels in 3-D: the axial targets are chosen per level among the slices at that level's disc


def _fake_detector(level_z: dict[int, float], axial_class_of_side: dict[str, int], offsets=None):
    """A stand-in for detect_series: on a Sagittal T2/STIR series, the canal at each level's
    disc (0, 0, z); on Axial T2 slices, a left and a right subarticular detection on every slice,
    all labelled with one level's class (the detector cannot tell the levels apart: geometry must),
    most confident on the slice through each slab's middle."""
    from lumbar_ray.models.detector_inference import Detection
    from lumbar_ray.targets import targets_for_series

    spinal = {t.level_index: t.detector_class_id for t in targets_for_series(SAGITTAL_T2) if t.family == "spinal"}

    def detect(detector, series, **kwargs):
        found = []
        if series.series_type == SAGITTAL_T2:
            for level, z in level_z.items():
                k, x, y = series.patient_to_pixel([0.0, 0.0, z + (offsets or {}).get(level, 0.0)])
                k = int(round(k))
                found.append(Detection(spinal[level], k, int(series.instance_numbers[k]), x, y, 0.9))
        elif series.series_type == AXIAL_T2:
            for k in range(series.n_slices):
                centre = series.pixel_to_patient(k, (SIZE - 1) / 2, (SIZE - 1) / 2)
                closeness = 1.0 / (1.0 + min(abs(centre[2] - z) for z in level_z.values()))
                for side, class_id in axial_class_of_side.items():
                    x = (SIZE - 1) / 2 + (4 if side == "left" else -4)  # +x (columns) is the patient's left
                    found.append(Detection(class_id, k, int(series.instance_numbers[k]), x, 12.0, 0.5 * closeness))
        return found

    return detect


def _detector_bundle():
    import torch

    from lumbar_ray.scoring.study import ModelBundle

    return ModelBundle(version="v-test", detectors={t: object() for t in (SAGITTAL_T2, AXIAL_T2)}, scorer=None,
                       channels="repeat", crop_mm=None, priors={}, device=torch.device("cpu"), parts=("detectors",))


def _big_sagittal(folder: Path, study_id: str, description: str) -> None:
    """8 sagittal slices through x = +14 .. -14 mm (their normal points to the patient's right),
    covering z = -100 .. +140 mm."""
    o = np.asarray(SAG)
    normal = np.cross(o[:3], o[3:])
    positions = [np.array([14.0, -40.0, 140.0]) + k * 4.0 * normal for k in range(8)]
    write_mr_series(str(folder), np.full((8, 300, 100), 300, np.uint16), study_uid=uid_for("study", study_id),
                    series_uid=uid_for("series", study_id, folder.name), study_id=study_id,
                    series_description=description, series_number=1, image_orientation=SAG, positions=positions,
                    pixel_spacing=PIXEL, slice_thickness=3.0, instance_numbers=list(range(1, 9)))


@pytest.mark.parametrize("pattern", ["slabs", "split"])
def test_axial_targets_are_chosen_on_their_levels_slices(tmp_path, monkeypatch, pattern):
    from lumbar_ray.models import detector_inference
    from lumbar_ray.scoring.study import detect_study
    from lumbar_ray.targets import targets_for_series

    base = tmp_path / "train_images" / "7005"
    if pattern == "slabs":
        geometry = {"30": write_slab_series(base / "30", "7005")}
    else:  # axial coverage split over two series
        geometry = {"30": write_slab_series(base / "30", "7005", levels=range(0, 2)),
                    "31": write_slab_series(base / "31", "7005", levels=range(2, 5), first_instance=1)}
    _big_sagittal(base / "20", "7005", "Sagittal T2/STIR")
    _csv(tmp_path, [(7005, 20, "Sagittal T2/STIR")] + [(7005, int(s), "Axial T2") for s in geometry])
    axial_targets = targets_for_series(AXIAL_T2)
    # every axial detection carries the L1/L2 class of its side
    class_of_side = {t.side: t.detector_class_id for t in axial_targets if t.level_index == 0}
    level_z = dict(enumerate(SLAB_CENTRES_Z))
    monkeypatch.setattr(detector_inference, "detect_series", _fake_detector(level_z, class_of_side))

    study = read_study(str(tmp_path), "7005")
    detected = detect_study(_detector_bundle(), study)
    for t in axial_targets:
        hit = detected.hits[t.index]
        assert hit.detected, t.column
        position, orientation = geometry[hit.series_id][hit.instance_number]
        # the slice chosen is in the slab of the target's level (tilted to that disc)
        np.testing.assert_allclose(orientation, _tilted_axial(SLAB_TILTS_DEG[t.level_index]), atol=1e-6)
        assert (hit.x > (SIZE - 1) / 2) == (t.side == "left")
    assert not [f for f in detected.flags if f.startswith(("levels_out_of_order", "wrong_side", "axial_level"))]
    assert len(detected.crops) == sum(h.detected for h in detected.hits)


def test_without_a_sagittal_series_axial_levels_fall_back_and_are_flagged(tmp_path, monkeypatch):
    from lumbar_ray.models import detector_inference
    from lumbar_ray.scoring.study import detect_study
    from lumbar_ray.targets import targets_for_series

    base = tmp_path / "train_images" / "7006"
    write_slab_series(base / "30", "7006")
    _csv(tmp_path, [(7006, 30, "Axial T2")])
    class_of_side = {t.side: t.detector_class_id for t in targets_for_series(AXIAL_T2) if t.level_index == 0}
    monkeypatch.setattr(detector_inference, "detect_series", _fake_detector(dict(enumerate(SLAB_CENTRES_Z)), class_of_side))
    detected = detect_study(_detector_bundle(), read_study(str(tmp_path), "7006"))
    assert "axial_levels_unchecked" in detected.flags
    assert f"series_missing:{SAGITTAL_T2}" in detected.flags
    # today's whole-series choice: each class's best detection; only the L1/L2 classes fire here
    found = {detected.hits[t.index].detected for t in targets_for_series(AXIAL_T2) if t.level_index == 0}
    assert found == {True}


def test_levels_out_of_order_and_wrong_side_are_flagged():
    from lumbar_ray.dicom.series import Series
    from lumbar_ray.models.detector_inference import Detection
    from lumbar_ray.models.levels import LocatedDetection, geometry_flags
    from lumbar_ray.targets import TARGETS

    o = np.asarray(SAG, dtype=float)
    n = 9
    positions = np.array([[-16.0 + 4.0 * k, -40.0, 140.0] for k in range(n)])  # x = -16 .. +16
    series = Series("1", "2", None, SAGITTAL_T2, "sagittal", np.zeros((n, 300, 100), np.float32),
                    np.arange(1, n + 1), positions, o, PIXEL, 3.0, 4.0, [f"{k}.dcm" for k in range(n)])

    def at(index, k, z):
        y = (140.0 - z) / PIXEL[0]
        return LocatedDetection(series, Detection(TARGETS[index].detector_class_id, k, k + 1, 50.0, y, 0.9))

    spinal = [t for t in TARGETS if t.family == "spinal"]
    good = {t.index: at(t.index, 4, z) for t, z in zip(spinal, SLAB_CENTRES_Z)}
    assert geometry_flags(good) == []
    swapped = dict(good)
    swapped[spinal[1].index], swapped[spinal[2].index] = at(spinal[1].index, 4, 20.0), at(spinal[2].index, 4, 60.0)
    assert geometry_flags(swapped) == ["levels_out_of_order:spinal"]
    left = next(t for t in TARGETS if t.family == "foraminal" and t.side == "left" and t.level_index == 2)
    right = next(t for t in TARGETS if t.family == "foraminal" and t.side == "right" and t.level_index == 2)
    on_sides = {**good, left.index: at(left.index, 8, 20.0), right.index: at(right.index, 0, 20.0)}
    assert geometry_flags(on_sides) == []  # slice 8 is x = +16 (patient left), slice 0 x = -16
    crossed = {**good, left.index: at(left.index, 0, 20.0), right.index: at(right.index, 8, 20.0)}
    assert geometry_flags(crossed) == [f"wrong_side:{left.column}", f"wrong_side:{right.column}"]


# --------------------------------------------------------------------------------------------
# Training examples: every labelled point of every acquisition pattern gives a crop and a slice


@pytest.fixture(scope="module")
def realistic_root(tmp_path_factory):
    """Four small synthetic studies, one per acquisition pattern (forced plans)."""
    from lumbar_ray.synth.protocols import AcquisitionPlan
    from lumbar_ray.synth.writer import synthesize

    root = tmp_path_factory.mktemp("realistic")
    plans = [
        AcquisitionPlan(axial="slabs", missing=(("axial", 0.5),)),
        AcquisitionPlan(axial="split", split_after=2, split_slabs=(True, False)),
        AcquisitionPlan(axial="stack", repeat=SAGITTAL_T2, repeat_labelled=True, oblique_deg=(3.0, -3.0)),
        AcquisitionPlan(axial="split", split_after=3, split_slabs=(False, True), repeat=SAGITTAL_T1,
                        missing=(("sagittal_t2", 0.3),)),
    ]
    synthesize(root, len(plans), seed=11, size="small", plans=plans)
    return root


def test_every_label_of_every_pattern_gives_training_examples(realistic_root):
    from lumbar_ray.config import ScorerConfig
    from lumbar_ray.metrics import labels as label_io
    from lumbar_ray.training.examples import study_examples

    root = str(realistic_root)
    points = label_io.labelled_points(label_io.read_labels(root), label_io.read_coordinates(root))
    series_csv = pd.read_csv(realistic_root / "train_series_descriptions.csv")
    assert (series_csv.groupby("study_id").size() > 3).sum() >= 3  # split / repeated series are there
    for study_id, own in points.groupby("study_id"):
        examples = study_examples(root, int(study_id), own, ScorerConfig())
        assert not [p for p in examples.problems if "not found" in p or "no instance" in p], examples.problems
        assert len(examples.crops) == len(own) == len(examples.points)
        # each labelled series' slices go to its type's detector, labels on the right series
        study = read_study(root, str(study_id))
        for series_id, rows in own.groupby("series_id"):
            series = study.find_series(series_id, int(rows["instance_number"].iloc[0]))
            assert series is not None and series.series_type == TARGETS_TYPE[int(rows["target_index"].iloc[0])]
            assert set(rows["instance_number"]) <= set(series.instance_numbers.tolist())
        n_slices = {t: len(s) for t, s in examples.slices.items()}
        assert set(n_slices) == {SAGITTAL_T1, SAGITTAL_T2, AXIAL_T2}


def test_inspect_keeps_every_axial_slice_of_realistic_studies(realistic_root):
    import pydicom

    for study_dir in sorted((realistic_root / "train_images").iterdir()):
        study = read_study(str(realistic_root), study_dir.name)
        read = {(s.series_id, int(i)) for s in study.series_of_type(AXIAL_T2) for i in s.instance_numbers}
        on_disk = {(f.parent.name, int(pydicom.dcmread(f, stop_before_pixels=True).InstanceNumber))
                   for f in study_dir.rglob("*.dcm")
                   if pydicom.dcmread(f, stop_before_pixels=True).SeriesDescription == AXIAL_T2}
        assert read == on_disk and study.skipped == []



def test_axial_detector_validation_chooses_by_level_across_series(realistic_root, monkeypatch):
    """The detector CV's axial table chooses targets as scoring does, per level over every axial
    series (levels from the labelled canal points): a detector that finds each recess but cannot
    tell the levels apart still scores every target."""
    import torch

    from lumbar_ray.metrics import labels as label_io
    from lumbar_ray.models.detector_inference import Detection
    from lumbar_ray.targets import targets_for_series
    from lumbar_ray.training import detector_validation

    root = str(realistic_root)
    points = label_io.labelled_points(label_io.read_labels(root), label_io.read_coordinates(root))
    axial = {t.index: t for t in targets_for_series(AXIAL_T2)}
    class_of_side = {t.side: t.detector_class_id for t in axial.values() if t.level_index == 0}

    def detect(model, series, **kwargs):  # each labelled recess found, always with the L1/L2 class
        own = points[(points["series_id"].astype(str) == series.series_id) & points["target_index"].isin(list(axial))]
        return [Detection(class_of_side[axial[int(r.target_index)].side], series.index_of_instance(int(r.instance_number)),
                          int(r.instance_number), float(r.x), float(r.y), 0.8) for r in own.itertuples()]

    monkeypatch.setattr(detector_validation, "detect_series", detect)
    study_ids = sorted(points["study_id"].unique())
    studies = detector_validation.ValidationStudies(root, "train", study_ids, points, AXIAL_T2, cache_mb=1024)
    records, rates = detector_validation.validation_records(None, studies, 0.01, torch.device("cpu"))
    n_axial = int(points["target_index"].isin(list(axial)).sum())
    assert len(records) == n_axial > 20
    assert records["detected"].all() and records["right_slice"].all()
    assert (records["dist_3d_mm"] < 1e-6).all() and (records["dist_mm"] < 1e-6).all()


def test_an_overlapping_oblique_stack_of_the_same_size_is_not_merged(tmp_path):
    """Slabs lie side by side along the body; a same-size oblique reformat of the same anatomy
    overlaps the main stack and stays apart (read, not merged into it)."""
    base = tmp_path / "train_images" / "7007"
    folder = base / "2"
    write_sagittal(folder, "7007", "Sagittal T2/STIR", n=10)
    yaw = math.radians(8.0)
    oblique = np.array([math.sin(yaw), math.cos(yaw), 0.0, 0.0, 0.0, -1.0])
    normal = np.cross(oblique[:3], oblique[3:])
    positions = [np.array([-20.0, -10.0, 130.0]) + k * 4.0 * normal for k in range(6)]
    write_mr_series(str(folder), np.full((6, SIZE, SIZE), 50, np.uint16), study_uid=uid_for("study", "7007"),
                    series_uid=uid_for("series", "7007", "2"), study_id="7007", series_description="Sagittal T2/STIR",
                    series_number=1, image_orientation=tuple(oblique), positions=positions, pixel_spacing=PIXEL,
                    slice_thickness=3.0, instance_numbers=list(range(101, 107)))
    _csv(tmp_path, [(7007, 2, "Sagittal T2/STIR")])
    study = read_study(str(tmp_path), "7007")
    main = study.series[SAGITTAL_T2]
    assert main.n_slices == 10 and not main.is_multi_oriented
    assert [s.n_slices for s in study.other_series] == [6]


def test_a_repeated_series_of_equal_size_is_chosen_by_its_headers_not_its_folder_name(tmp_path):
    """Disk folders are numbers and PACS folders UIDs, which sort differently: the tie between a
    series and its repeat goes to the higher SeriesNumber (the repeat), whatever the folders are
    called, so both reads score the same series first."""
    def study_with_folders(root: Path, first: str, repeat: str) -> None:
        base = root / "train_images" / "7005"
        for folder, number, x0 in ((first, 4, -14.0), (repeat, 5, -13.0)):
            o = np.asarray(SAG)
            normal = np.cross(o[:3], o[3:])
            positions = [np.array([x0, -10.0, 130.0]) + k * 4.0 * normal for k in range(8)]
            write_mr_series(str(base / folder), np.full((8, SIZE, SIZE), 300, np.uint16),
                            study_uid=uid_for("study", "7005"), series_uid=f"1.2.826.0.1.{number}",
                            study_id="7005", series_description="Sagittal T2/STIR", series_number=number,
                            image_orientation=tuple(o), positions=positions, pixel_spacing=PIXEL,
                            slice_thickness=3.0, instance_numbers=list(range(1, 9)))

    # the repeat's folder sorts first on disk ("10" < "20") and last as a UID
    study_with_folders(tmp_path / "disk", first="20", repeat="10")
    study_with_folders(tmp_path / "pacs", first="1.2.826.0.1.4", repeat="1.2.826.0.1.5")
    on_disk = read_study(str(tmp_path / "disk"), "7005")
    from_pacs = read_study(str(tmp_path / "pacs"), "7005")
    assert on_disk.series[SAGITTAL_T2].series_id == "10"
    assert from_pacs.series[SAGITTAL_T2].series_id == "1.2.826.0.1.5"
    assert on_disk.series[SAGITTAL_T2].series_instance_uid == from_pacs.series[SAGITTAL_T2].series_instance_uid
    assert [s.series_instance_uid for s in on_disk.series_of_type(SAGITTAL_T2)] == \
        [s.series_instance_uid for s in from_pacs.series_of_type(SAGITTAL_T2)]
