"""No PHI leaves the input (issue #17, item 7): synthetic studies carry sentinel patient names,
ids, birth dates and accession numbers (lumbar_ray.synth.phi); after a training and a scoring run
on Ray, no file they wrote (registry, run storage, scores, errors, manifests, overlays, temp
files, the driver's log) and nothing in the Ray session's folder holds any of them.

The same run checks item 8 on Ray: the pipeline actors leave no model cache folder behind.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest

from lumbar_ray.dicom.write import uid_for, write_mr_series
from lumbar_ray.scoring.study import MODEL_CACHE_PREFIX
from lumbar_ray.synth.phi import SENTINEL_MARKERS, patient_tags
from lumbar_ray.targets import SAGITTAL_T1

TRAIN_STUDIES = 6
TEST_STUDIES = 3


# ------------------------------------------------------------------------ the sentinels (fast)
def _one_series(out_dir: Path, **kwargs) -> list[str]:
    return write_mr_series(out_dir, np.ones((2, 8, 8)), study_uid=uid_for("s"), series_uid=uid_for("se"),
                           study_id=4242, series_description="Sagittal T1", series_number=1,
                           image_orientation=(0, 1, 0, 0, 0, -1), positions=[(0, 0, 0), (3, 0, 0)],
                           pixel_spacing=(1.0, 1.0), slice_thickness=3.0, **kwargs)


def test_sentinels_are_valid_dicom_and_written_to_every_slice(tmp_path):
    tags = patient_tags(4_294_967_295)  # the longest Kaggle-like study id still fits
    assert all(any(marker in value for marker in SENTINEL_MARKERS) for value in tags.values()), tags
    paths = _one_series(tmp_path / "phi", patient=patient_tags(4242))
    for path in paths:
        ds = pydicom.dcmread(path)
        assert {key: str(ds.get(key)) for key in tags} == patient_tags(4242)
        assert ds.PatientIdentityRemoved == "NO" and "DeidentificationMethod" not in ds
    # Without them the files stay anonymous, as before.
    ds = pydicom.dcmread(_one_series(tmp_path / "plain")[0])
    assert ds.PatientID == "4242" and str(ds.PatientName) == "" and "PatientBirthDate" not in ds
    assert ds.PatientIdentityRemoved == "YES" and not files_holding(tmp_path / "plain", SENTINEL_MARKERS)


def test_bad_patient_values_are_refused_naming_the_element(tmp_path):
    with pytest.raises(ValueError, match=r"unknown elements \['PatientAddress'\]"):
        _one_series(tmp_path, patient={"PatientAddress": "Elm St"})
    with pytest.raises(ValueError, match="PatientBirthDate: Invalid value for VR DA"):
        _one_series(tmp_path, patient={"PatientBirthDate": "1888-08-08"})
    with pytest.raises(ValueError, match="too long for an AccessionNumber"):
        patient_tags(12_345_678_901)


def files_holding(folder: Path | str, markers=SENTINEL_MARKERS) -> dict[str, list[str]]:
    """{path: markers found} for every file under ``folder`` (bytes, any format) whose content
    or name holds one of ``markers``."""
    needles = [(m, m.encode()) for m in markers]
    hits: dict[str, list[str]] = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(dirpath, name)
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            try:
                data = Path(path).read_bytes()
            except OSError:  # a socket or a file removed while walking
                continue
            found = [m for m, b in needles if b in data or m in path]
            if found:
                hits[path] = found
    return hits


# ------------------------------------------------------------- a training and a scoring run (slow)
@pytest.fixture(scope="module")
def ray_with_own_temp_dir(tmp_path_factory):
    """A local Ray runtime (2 CPUs) whose processes, driver included, take this module's folder
    as their temp dir (TMPDIR), so that what this run leaves there is told apart from other runs
    on the machine. Ray's own session folder stays where it was (RAY_TMPDIR): its socket paths
    must stay short."""
    import ray

    temp = tmp_path_factory.mktemp("tmpdir")
    saved = {name: os.environ.get(name) for name in ("TMPDIR", "RAY_TMPDIR")}
    os.environ["RAY_TMPDIR"] = saved["RAY_TMPDIR"] or saved["TMPDIR"] or tempfile.gettempdir()
    os.environ["TMPDIR"] = str(temp)
    tempfile.tempdir = None  # tempfile caches its answer
    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray, temp
    finally:
        ray.shutdown()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        tempfile.tempdir = None


def require_sentinels(root: Path, split: str) -> None:
    """Every synthetic DICOM file carries its study's sentinels: without them the scan proves
    nothing. Fails until lumbar_ray/synth/writer.py passes ``patient=patient_tags(study_id)``."""
    files = sorted((root / f"{split}_images").rglob("*.dcm"))
    assert files, f"no DICOM files under {root}"
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        study_id = path.parent.parent.name
        found = {key: str(ds.get(key, "")) for key in patient_tags(study_id)}
        assert found == patient_tags(study_id), (
            f"{path}: synthetic studies must carry the PHI sentinels of lumbar_ray.synth.phi "
            f"(writer passes patient=patient_tags(study_id) to write_mr_series); found {found}")


@pytest.fixture(scope="module")
def runs(ray_with_own_temp_dir, tmp_path_factory):
    """Synthesize (with the sentinels), train a tiny version, score the test split and draw one
    study's overlays; the driver's log records, every level, go to a file that is scanned too."""
    from lumbar_ray.config import DetectorConfig, ResourceConfig, ScoreConfig, ScorerConfig, TrainConfig
    from lumbar_ray.outputs.overlays import write_study_report
    from lumbar_ray.scoring.pipeline import run_scoring
    from lumbar_ray.synth.writer import synthesize
    from lumbar_ray.training.cv import run_training

    ray, temp = ray_with_own_temp_dir
    base = tmp_path_factory.mktemp("phi")
    data, registry, scores, report, logs = (base / name for name in ("data", "registry", "scores", "report", "logs"))
    synthesize(str(data), n_studies=TRAIN_STUDIES, seed=31, split="train", size="small")
    synthesize(str(data), n_studies=TEST_STUDIES, seed=32, split="test", size="small")
    for split in ("train", "test"):
        require_sentinels(data, split)

    logs.mkdir()
    handler = logging.FileHandler(logs / "driver.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root_logger = logging.getLogger()
    level = root_logger.level
    root_logger.addHandler(handler)
    root_logger.setLevel(logging.DEBUG)
    try:
        trained = run_training(TrainConfig(
            data=str(data), registry=str(registry), folds=2, seed=0, final_fit=False, max_failures=0,
            scorer=ScorerConfig(epochs=1, batch_size=64),
            # One detector of the three: its path (slices, Ultralytics) is covered at a third of the time.
            detector=DetectorConfig(epochs=1, imgsz=64, batch_size=8, series_types=(SAGITTAL_T1,)),
            resources=ResourceConfig(cpus_per_worker=1.0)))
        summary = run_scoring(ScoreConfig(input=str(data), models=f"{registry}@{trained.version}", out=str(scores),
                                          split="test", flush_studies=2))
        first = min(p.name for p in (data / "test_images").iterdir())
        overlays = write_study_report(str(scores), str(data), first, report, split="test")
    finally:
        root_logger.removeHandler(handler)
        root_logger.setLevel(level)
        handler.close()
    return SimpleNamespace(data=data, outputs=[registry, scores, report, logs, temp], version=trained.version,
                           summary=summary, overlays=overlays, temp=temp,
                           session=Path(ray._private.worker._global_node.get_session_dir_path()))


@pytest.mark.slow
@pytest.mark.ray
def test_no_sentinel_in_any_output_or_log(runs):
    assert runs.summary.n_scored == TEST_STUDIES and runs.overlays
    # The search finds the sentinels where they are: in the input (all but the ISO birth date,
    # which only a reader that parsed the DA would write).
    written = {m for m in SENTINEL_MARKERS if any(m in value for value in patient_tags(0).values())}
    assert set().union(*files_holding(runs.data).values()) == written
    for folder in runs.outputs:
        # the run's temp dir may be empty: training's scratch folder and the model caches are
        # removed when done (tests/test_model_cache.py); what is left there is scanned all the same
        if folder != runs.temp:
            assert any(p.is_file() for p in Path(folder).rglob("*")), f"{folder} is empty: nothing was searched"
        hits = files_holding(folder)
        assert not hits, f"PHI sentinels in outputs: {hits}"
    assert (runs.session / "logs").is_dir()
    hits = files_holding(runs.session)
    assert not hits, f"PHI sentinels in the Ray session's folder: {hits}"


@pytest.mark.slow
@pytest.mark.ray
def test_scoring_actors_leave_no_model_folder(runs, ray_with_own_temp_dir):
    ray, temp = ray_with_own_temp_dir

    @ray.remote(num_cpus=0)
    def worker_temp_dir() -> str:
        return tempfile.gettempdir()

    # Workers do use this module's temp dir (else the check below would look in the wrong place).
    assert ray.get(worker_temp_dir.remote()) == str(temp)
    assert not sorted(temp.glob(f"{MODEL_CACHE_PREFIX}*")), "model cache folders left in the temp dir"
