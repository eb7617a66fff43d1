"""A PACS in and out over DICOMweb (issue #18, item 2), against a real Orthanc with its DICOMweb plugin.

Small synthetic studies are stored in Orthanc with our STOW-RS client; the reader reads them back
through ``dicomweb://`` exactly as from their folder; the scoring pipeline scores straight from
the PACS (25 rows a study, resumable), a PACS that goes down mid-run leaves retryable error rows
and exit 7 (never a study scored from part of its series), one that refuses connections or is
the wrong service stops the run with its exit code; the SRs of the scores are stored back with
``export-sr --to dicomweb://…`` and found with QIDO-RS. Unit tests of the client need no server.
Skipped with a message when Orthanc or its DICOMweb plugin is not installed.
"""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from lumbar_ray import storage
from lumbar_ray.dicomweb import store_instances
from lumbar_ray.dicomweb.client import (
    PASSWORD_ENV,
    TOKEN_ENV,
    USER_ENV,
    DicomWebAuthError,
    DicomWebError,
    DicomWebRefusedError,
    all_values,
    client_for,
    first_value,
    parse_multipart,
)
from lumbar_ray.errors import EXIT_DATA, EXIT_TRANSIENT
from lumbar_ray.targets import TARGETS

import orthanc  # tests/ is on sys.path (conftest.py)
from registries import registry_with_versions, untrained_registry

PROBS = ["normal_mild", "moderate", "severe"]
N_STUDIES = 3


# --------------------------------------------------------------------------------------------
# The client alone (no server)


def test_multipart_responses_are_split_into_their_parts():
    body = (b"preamble\r\n--b0undary\r\nContent-Type: application/dicom\r\nContent-Length: 3\r\n\r\nabc\r\n"
            b"--b0undary\r\n\r\n\r\n--b0\r\n--b0undary--\r\nepilogue")
    parts = parse_multipart(body, 'multipart/related; type="application/dicom"; boundary="b0undary"')
    assert parts == [({"content-type": "application/dicom", "content-length": "3"}, b"abc"), ({}, b"\r\n--b0")]
    with pytest.raises(DicomWebError, match="ends inside part 2"):
        parse_multipart(body[:body.index(b"--b0undary\r\n\r\n") + 16], "multipart/related; boundary=b0undary")
    with pytest.raises(DicomWebError, match="expected a multipart"):
        parse_multipart(b"{}", "application/json")


def test_http_failures_are_classified_for_the_retry_layer():
    assert storage.is_transient(DicomWebError("busy", 503)) and storage.is_transient(DicomWebError("slow down", 429))
    assert not storage.is_transient(DicomWebError("bad request", 400))
    assert not storage.is_transient(DicomWebAuthError("no")) and isinstance(DicomWebAuthError("no"), PermissionError)
    assert not storage.is_transient(FileNotFoundError(errno.ENOENT, "gone"))


def test_urls_carry_no_credentials_and_paths_only_uids():
    from lumbar_ray.dicomweb.client import http_base_url
    from lumbar_ray.dicomweb.fs import parse_path

    assert http_base_url("dicomweb://pacs:8042/dicom-web/") == "http://pacs:8042/dicom-web"
    assert http_base_url("dicomwebs://pacs/rs") == "https://pacs/rs"
    with pytest.raises(ValueError, match=USER_ENV):
        http_base_url("dicomweb://user:secret@pacs:8042/dicom-web")
    with pytest.raises(ValueError, match="not a DICOM study UID"):
        client_for("dicomweb://pacs:8042/dicom-web").series("../../admin")
    loc = parse_path("pacs:8042/dicom-web/test_images/1.2/3.4/5.6.dcm")
    assert (loc.base, loc.split, loc.study, loc.series, loc.instance) == ("pacs:8042/dicom-web", "test", "1.2", "3.4", "5.6")
    assert parse_path("pacs:8042/dicom-web/test_series_descriptions.csv").other == "test_series_descriptions.csv"
    assert parse_path("pacs:8042/dicom-web").level == "root" and parse_path("pacs:8042/api/v1.0").level == "root"


class _Answer:
    def __init__(self, status: int, body: dict):
        import json

        self.status_code, self.content, self.text, self.url = status, json.dumps(body).encode(), "", "x"
        self.reason, self.headers = "", {}


def test_a_split_lists_studies_holding_mr_or_whose_modalities_are_unknown():
    from lumbar_ray.dicomweb.fs import scored_study_uids

    def study(uid, *modalities):
        item = {"0020000D": {"vr": "UI", "Value": [uid]}}
        if modalities:
            item["00080061"] = {"vr": "CS", "Value": list(modalities)}
        return item

    listed, left_out = scored_study_uids([
        study("1.1", "MR"), study("1.2", "MR", "SR"), study("1.3"), study("1.4", "CT"), study("1.5", "CR", "DX"),
        study("1.6", "mr"), {"00080061": {"vr": "CS", "Value": ["MR"]}}])
    assert listed == {"1.1", "1.2", "1.3", "1.6"}
    assert left_out == {"1.4": "CT", "1.5": "CR/DX"}


def test_a_refused_store_names_each_instance_and_why(monkeypatch):
    import requests

    datasets = [_instance(f"1.2.3.{i}") for i in range(3)]
    # The server stores the first, refuses the second (SOP class), and says nothing of the third.
    answer = {"00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.2.3.0"]}}]},
              "00081198": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.2.3.1"]},
                                                  "00081197": {"vr": "US", "Value": [0x0122]}}]}}
    sent = []
    monkeypatch.setattr(requests.Session, "post", lambda self, url, **kw: sent.append(kw) or _Answer(202, answer))
    with pytest.raises(DicomWebRefusedError) as caught:
        store_instances("dicomweb://pacs:1/dicom-web", datasets)
    assert caught.value.stored == 1 and set(caught.value.failed) == {"1.2.3.1", "1.2.3.2"}
    assert "SOP class not supported" in str(caught.value) and "not acknowledged" in str(caught.value)
    assert caught.value.exit_code == EXIT_DATA and len(sent) == 1  # one request, not retried
    assert b"1.2.3.2" in sent[0]["data"] and "multipart/related" in sent[0]["headers"]["Content-Type"]


def _instance(sop_uid: str) -> pydicom.Dataset:
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.4", sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = "1.2.9", "1.2.9.1", "MR"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


# --------------------------------------------------------------------------------------------
# A real Orthanc


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """A running Orthanc (stopped at the module's end), its credentials in this process's
    environment for the module (set before the module's Ray runtime starts: local workers
    inherit them, as workers on a node get them from the node)."""
    reason = orthanc.missing()
    if reason:
        pytest.skip(reason)
    with orthanc.running_orthanc(tmp_path_factory.mktemp("orthanc")) as server, pytest.MonkeyPatch.context() as env:
        env.delenv(TOKEN_ENV, raising=False)
        for name, value in server.credentials_env.items():
            env.setenv(name, value)
        yield server


@pytest.fixture(scope="module")
def loaded(pacs, tmp_path_factory):
    """(local data root, {local study id: StudyInstanceUID}, files stored): small synthetic
    studies written to disk and stored in the PACS with our STOW-RS."""
    from lumbar_ray.synth import writer as synth

    root = tmp_path_factory.mktemp("pacs-data")
    synth.synthesize(str(root), n_studies=N_STUDIES, seed=41, split="test", size="small")
    files = sorted((root / "test_images").glob("*/*/*.dcm"))
    uids, series_uids = {}, {}
    for path in files:
        if path.parts[-2] not in series_uids:
            header = pydicom.dcmread(path, stop_before_pixels=True)
            uids.setdefault(path.parts[-3], str(header.StudyInstanceUID))
            series_uids[path.parts[-2]] = str(header.SeriesInstanceUID)
    stored = store_instances(pacs.root, (p.read_bytes() for p in files))
    return root, uids, stored, len(files), series_uids


@pytest.mark.pacs
def test_stow_stores_every_instance_and_qido_finds_them(pacs, loaded):
    root, uids, stored, n_files, _ = loaded
    assert stored == n_files
    client = client_for(pacs.root)
    assert {first_value(s, "0020000D") for s in client.studies()} == set(uids.values())
    assert pacs.get("/statistics").json()["CountInstances"] == n_files
    # Storing again is harmless (same SOPInstanceUIDs): nothing doubled.
    again = sorted((root / "test_images").glob("*/*/*.dcm"))[:3]
    assert store_instances(pacs.root, [pydicom.dcmread(p) for p in again]) == 3
    assert pacs.get("/statistics").json()["CountInstances"] == n_files


@pytest.mark.pacs
def test_the_pacs_reads_like_the_folder(pacs, loaded):
    from lumbar_ray.dicom.errors import StudyNotFoundError
    from lumbar_ray.dicom.read import list_studies, read_study, require_split

    root, uids, _, _, _ = loaded
    require_split(pacs.root, "test")
    assert list_studies(pacs.root, "test") == sorted(uids.values())
    assert not storage.exists(storage.join(pacs.root, "test_series_descriptions.csv"))
    no_csv = pd.DataFrame(columns=["study_id", "series_id", "series_description"])  # a PACS has none
    for local_id, uid in uids.items():
        want = read_study(str(root), local_id, split="test", descriptions=no_csv)
        got = read_study(pacs.root, uid, split="test")
        assert got.study_id == uid and not got.skipped
        # The same series of each type, though the ids differ (folder numbers vs UIDs): a tie
        # between two series of one type and size goes by SeriesNumber, then SeriesInstanceUID.
        assert ({t: s.series_instance_uid for t, s in got.series.items()}
                == {t: s.series_instance_uid for t, s in want.series.items()})
        # Every series, typed the same way.
        want_all = {s.series_instance_uid: s for s in want.all_series()}
        got_all = {s.series_instance_uid: s for s in got.all_series()}
        assert set(got_all) == set(want_all)
        for series_uid, series in got_all.items():
            expected = want_all[series_uid]
            assert series.series_id == series_uid
            assert (series.series_type, series.type_source) == (expected.series_type, expected.type_source)
            assert list(series.instance_numbers) == list(expected.instance_numbers)
            np.testing.assert_array_equal(series.volume, expected.volume)
            np.testing.assert_allclose(series.positions, expected.positions)
            assert all(f.startswith(f"{pacs.root}/test_images/{uid}/{series_uid}/") and f.endswith(".dcm")
                       for f in series.files)
    with pytest.raises(StudyNotFoundError):
        read_study(pacs.root, "1.2.3.4.5", split="test")
    with pytest.raises(NotImplementedError, match="STOW-RS"):
        storage.open(storage.join(pacs.root, "test_images", "x.csv"), "wb")


@pytest.mark.pacs
def test_a_study_with_no_mr_series_is_left_out_of_the_listing_with_a_warning(pacs, loaded, caplog):
    from pydicom.uid import CTImageStorage, generate_uid

    from lumbar_ray.dicom.read import list_studies

    root, uids, _, _, _ = loaded
    client = client_for(pacs.root)
    # The server computes ModalitiesInStudy: the filter below is not blind. (SRs stored back by
    # another test of this module add "SR".)
    modalities = {first_value(s, "0020000D"): all_values(s, "00080061") for s in client.studies()}
    assert set(modalities) == set(uids.values()) and all("MR" in m for m in modalities.values())
    # One image of a loaded study, made a CT image of a study of its own.
    ct = pydicom.dcmread(sorted((root / "test_images").glob("*/*/*.dcm"))[0])
    ct.Modality, ct.SOPClassUID = "CT", CTImageStorage
    ct.StudyInstanceUID, ct.SeriesInstanceUID, ct.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ct.file_meta.MediaStorageSOPClassUID, ct.file_meta.MediaStorageSOPInstanceUID = CTImageStorage, ct.SOPInstanceUID
    assert store_instances(pacs.root, [ct]) == 1
    try:
        assert ct.StudyInstanceUID in {first_value(s, "0020000D") for s in client.studies()}
        with caplog.at_level("WARNING", logger="lumbar_ray.dicomweb.fs"):
            assert list_studies(pacs.root, "test") == sorted(uids.values())
        assert "1 studies left out, none of them holds an MR series (ModalitiesInStudy: CT 1)" in caplog.text
        # Only the listing leaves it out: named explicitly, the study is still there.
        assert storage.isdir(storage.join(pacs.root, "test_images", ct.StudyInstanceUID))
    finally:
        pacs.delete_study(ct.StudyInstanceUID)
    assert list_studies(pacs.root, "test") == sorted(uids.values())
    assert ct.StudyInstanceUID not in {first_value(s, "0020000D") for s in client.studies()}


@pytest.mark.pacs
def test_credentials_come_from_the_environment_and_never_show(pacs, monkeypatch):
    client = client_for(pacs.root)
    monkeypatch.delenv(USER_ENV)
    with pytest.raises(DicomWebAuthError, match=USER_ENV):
        client.studies()
    monkeypatch.setenv(USER_ENV, pacs.user)
    monkeypatch.setenv(PASSWORD_ENV, "wrong-" + pacs.password)
    with pytest.raises(DicomWebAuthError) as caught:
        client.studies()
    assert pacs.password not in str(caught.value) and "wrong-" not in str(caught.value)
    assert not storage.is_forwarded_env_var(USER_ENV) and not storage.is_forwarded_env_var(PASSWORD_ENV)


@pytest.fixture(scope="module")
def pacs_ray(pacs):
    """A Ray runtime for this module (2 CPUs), started after the PACS credentials are set."""
    import ray

    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return untrained_registry(tmp_path_factory.mktemp("pacs-models"))


def _score(root: str, models: str, out: Path) -> int:
    from lumbar_ray.scoring import job as score_job

    # One study a read task and a part file: studies reach the PACS one by one (around an outage).
    return score_job.main(score_job.get_args_parser().parse_args(
        ["--input", root, "--models", models, "--out", str(out), "--split", "test", "--read-batch-studies", "1",
         "--flush-studies", "1", "--scorer-batch-studies", "1"]))


@pytest.fixture(scope="module")
def pacs_scores(pacs_ray, pacs, loaded, models, tmp_path_factory):
    """The output of one scoring run straight from the PACS (one run: the tests below share it)."""
    out = tmp_path_factory.mktemp("pacs-scores") / "out"
    assert _score(pacs.root, models, out) == 0
    return out


@pytest.mark.pacs
@pytest.mark.ray
@pytest.mark.slow
def test_scoring_from_the_pacs_resumes_and_equals_scoring_the_folder(pacs_scores, pacs, loaded, models, capsys):
    import torch

    from lumbar_ray.dicom.read import read_study
    from lumbar_ray.outputs.store import read_errors, read_predictions
    from lumbar_ray.scoring.study import ModelBundle, score_in_process

    root, uids, _, _, series_uids = loaded
    preds = read_predictions(str(pacs_scores))
    assert sorted(preds["study_id"].unique()) == sorted(uids.values())
    assert (preds.groupby("study_id").size() == len(TARGETS)).all() and preds["row_id"].is_unique
    assert read_errors(str(pacs_scores)).empty  # the PACS added no problem of its own

    capsys.readouterr()
    assert _score(pacs.root, models, pacs_scores) == 0  # resume: every study done, nothing doubled
    assert f"scored: 0  failed: 0  skipped (done before): {N_STUDIES}" in capsys.readouterr().out
    assert len(read_predictions(str(pacs_scores))) == len(preds)

    # The same models over the same studies read from their folder, in one process: the same rows.
    bundle = ModelBundle.from_registry(models, device="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the actors: float sums independent of the thread split
    try:
        reference, _ = score_in_process(bundle, str(root), list(uids), split="test")
    finally:
        torch.set_num_threads(threads)
    reference["study_id"] = reference["study_id"].map(uids)
    reference["series_id"] = reference["series_id"].map(series_uids)
    key = ["study_id", "condition", "level"]
    merged = preds.merge(reference, on=key, suffixes=("", "_disk"))
    assert len(merged) == len(preds) == N_STUDIES * len(TARGETS)
    # Where a study holds two series of one type and size, the reader keeps the first by id, and
    # the ids differ (folder numbers vs UIDs): that type's rows may come from the other series.
    # Every other row is the same.
    tie = merged["series_id"].fillna("") != merged["series_id_disk"].fillna("")
    for study_uid, ours, disks in set(zip(merged.loc[tie, "study_id"], merged.loc[tie, "series_id"],
                                          merged.loc[tie, "series_id_disk"])):
        series = {s.series_id: s for s in read_study(pacs.root, study_uid, split="test").all_series()}
        assert (series[ours].series_type, series[ours].n_slices) == (series[disks].series_type, series[disks].n_slices)
    assert tie.sum() < len(merged) // 2
    merged = merged[~tie]
    for column in (*PROBS, "x", "y"):
        np.testing.assert_allclose(merged[column], merged[f"{column}_disk"], atol=1e-5)
    assert (merged["detected"] == merged["detected_disk"]).all()
    assert (merged["instance_number"].fillna(-1) == merged["instance_number_disk"].fillna(-1)).all()


@pytest.mark.pacs
def test_a_pacs_going_down_mid_study_gives_a_retryable_row_never_part_of_a_study(pacs, loaded, monkeypatch):
    """The read step of the pipeline (its Ray task's body) through a proxy that takes the PACS
    down at the second WADO-RS series request of a study: a retryable error row, no study. With
    connections reset at random instead, the bounded retries read the whole study, as it is."""
    from faultproxy import FaultProxy

    from lumbar_ray.dicom.read import read_study
    from lumbar_ray.scoring.pipeline import read_study_row

    _, uids, _, _, _ = loaded
    uid = sorted(uids.values())[0]
    for name, value in {"LUMBAR_RAY_S3_RETRY_ATTEMPTS": "3", "LUMBAR_RAY_S3_RETRY_BASE_S": "0.05",
                        "LUMBAR_RAY_S3_RETRY_MAX_S": "0.1"}.items():
        monkeypatch.setenv(name, value)
    wado = b"Accept: multipart/related"
    with FaultProxy(pacs.http_url, marker=wado, outage_after=2, outage_s=5.0) as proxy:
        root = f"dicomweb://127.0.0.1:{proxy.port}/dicom-web"
        item = read_study_row({"study_id": uid}, root, "test", None)["item"]
        assert proxy.stats.outages == 1 and item.study is None
        assert item.error["retryable"] and item.error["stage"] == "read"
        assert "StorageUnavailable" in item.error["error_type"] and "rerun" in item.error["message"]
    expected = read_study(pacs.root, uid, split="test")
    with FaultProxy(pacs.http_url, marker=wado, reset_probability=0.2, seed=3) as proxy:
        root = f"dicomweb://127.0.0.1:{proxy.port}/dicom-web"
        monkeypatch.setenv("LUMBAR_RAY_S3_RETRY_ATTEMPTS", "20")
        got = read_study(root, uid, split="test")
        assert proxy.stats.resets > 0
    for series_type, series in expected.series.items():
        np.testing.assert_array_equal(got.series[series_type].volume, series.volume)


@pytest.mark.pacs
def test_a_pacs_that_refuses_or_is_not_there_stops_the_run_with_its_code(pacs, tmp_path, monkeypatch, capsys):
    from lumbar_ray.scoring import job as score_job

    # The run stops before any model loads: a registry that resolves is enough.
    models = str(registry_with_versions(tmp_path / "registry", "v1").root) + "@v1"

    for name, value in {"LUMBAR_RAY_S3_RETRY_ATTEMPTS": "2", "LUMBAR_RAY_S3_RETRY_BASE_S": "0.1",
                        "LUMBAR_RAY_S3_RETRY_MAX_S": "0.1"}.items():
        monkeypatch.setenv(name, value)
    closed = orthanc.free_ports(1)[0]  # nothing listens: connections refused

    def run(root: str) -> tuple[int, str]:
        code = score_job.run(["--input", root, "--models", models, "--out", str(tmp_path / "o"), "--split", "test"])
        return code, capsys.readouterr().err

    code, err = run(f"dicomweb://127.0.0.1:{closed}/dicom-web")
    assert code == EXIT_TRANSIENT and "rerun the same command" in err
    code, err = run(f"dicomweb://127.0.0.1:{pacs.http_port}/not-dicomweb")  # a service that is not there: 404
    assert code == EXIT_DATA and "does not exist" in err
    assert not (tmp_path / "o").exists()  # stopped before Ray, nothing written


@pytest.mark.pacs
@pytest.mark.ray
@pytest.mark.slow
def test_srs_are_stored_back_and_found_with_qido(pacs_scores, pacs, loaded):
    pytest.importorskip("lumbar_ray.outputs.sr", reason="export-sr (issue #18 item 1) is not there yet")
    from typer.testing import CliRunner

    from lumbar_ray.cli import app
    from lumbar_ray.dicom.read import read_study
    from lumbar_ray.outputs.sr import read_sr_findings
    from lumbar_ray.outputs.store import read_predictions

    _, uids, _, _, _ = loaded
    result = CliRunner().invoke(app, ["export-sr", "--scores", str(pacs_scores), "--data", pacs.root,
                                      "--to", pacs.root])
    assert result.exit_code == 0, result.output
    assert f"stored {N_STUDIES} SRs" in result.output
    client = client_for(pacs.root)
    found = client.search("studies", {"ModalitiesInStudy": "SR"}, what="SR studies")
    assert {first_value(s, "0020000D") for s in found} == set(uids.values())
    preds = read_predictions(str(pacs_scores))
    for uid in uids.values():
        sr_series = client.search(f"studies/{uid}/series", {"Modality": "SR"}, what="SR series")
        assert len(sr_series) == 1
        instances = client.retrieve(uid, first_value(sr_series[0], "0020000E"))
        assert len(instances) == 1
        sr = pydicom.dcmread(io.BytesIO(next(iter(instances.values()))))
        assert sr.Modality == "SR" and sr.StudyInstanceUID == uid
        findings = read_sr_findings(sr).set_index(["condition", "level"]).sort_index()
        rows = preds[preds["study_id"] == uid].set_index(["condition", "level"]).sort_index()
        assert list(findings.index) == list(rows.index) and len(findings) == len(TARGETS)
        np.testing.assert_allclose(findings[PROBS].to_numpy(), rows[PROBS].to_numpy(), atol=1e-6)
        # Scored again later, the study reads as before: its report is not taken for an image series.
        assert not read_study(pacs.root, uid, split="test").skipped
