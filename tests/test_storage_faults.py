"""Transient storage failures leave no wrong results behind (issue #17, items 1 and 2).

Unit tests: what counts as transient, the bounded retries, a folder never read in part, retryable
error rows not counted as scored, the score job's exit status. Then a real S3 server behind a
TCP proxy that resets connections at random and goes down mid-run: after the faulty run and one
healthy rerun every study has exactly its 25 rows, equal to a clean run's.
"""

from __future__ import annotations

import errno
import os
import random
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lumbar_ray import storage
from lumbar_ray.dicom.errors import DEFAULT_LIMITS, NotDicomError
from lumbar_ray.dicom.files import load_folder_slices
from lumbar_ray.errors import EXIT_TRANSIENT, StorageUnavailableError, exit_code_of
from lumbar_ray.outputs.store import OutputWriter, read_errors, read_predictions, scored_studies
from lumbar_ray.scoring.pipeline import PartFiles, StudyItem, read_study_row
from lumbar_ray.targets import TARGETS
from registries import untrained_registry  # tests/ is on sys.path (conftest.py)

PROBS = ["normal_mild", "moderate", "severe"]
FAST = storage.RetryPolicy(attempts=3, base_s=0.01, max_s=0.02)


def _client_error(status: int, code: str):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "GetObject")


def _caused(exc: BaseException, cause: BaseException) -> BaseException:
    exc.__cause__ = cause
    return exc


# --------------------------------------------------------------------------------------------
# Classification and retries (no server)


def test_transient_and_permanent_errors_are_told_apart():
    import aiohttp
    from botocore.exceptions import ConnectionClosedError, EndpointConnectionError, ReadTimeoutError

    transient = [
        ConnectionResetError(errno.ECONNRESET, "reset"), ConnectionRefusedError(), TimeoutError("slow"),
        EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), ReadTimeoutError(endpoint_url="http://x"),
        ConnectionClosedError(endpoint_url="http://x"), aiohttp.ServerDisconnectedError(),
        _client_error(503, "SlowDown"), _client_error(500, "InternalError"), _client_error(429, "TooManyRequests"),
        _client_error(400, "RequestTimeout"),
        _caused(OSError(errno.EIO, "s3fs wrapped it"), _client_error(502, "BadGateway")),  # s3fs's translation
        OSError(errno.EBUSY, "SlowDown"), StorageUnavailableError("gave up"),
    ]
    permanent = [
        FileNotFoundError("gone"), PermissionError("denied"), _client_error(403, "AccessDenied"),
        _client_error(404, "NoSuchKey"), NotDicomError("x.dcm", "not DICOM"), ValueError("bad"),
        OSError(errno.EIO, "unknown"), _caused(FileNotFoundError("gone"), ConnectionResetError()),
    ]
    assert [e for e in transient if not storage.is_transient(e)] == []
    assert [e for e in permanent if storage.is_transient(e)] == []


def test_retries_are_bounded_with_backoff_and_permanent_errors_are_not_retried(monkeypatch):
    calls, waits = [], []

    def flaky(fail_times: int, exc: BaseException):
        def fn(x):
            calls.append(x)
            if len(calls) <= fail_times:
                raise exc
            return x * 2
        return fn

    assert storage.retry_transient(flaky(2, ConnectionResetError()), 21, what="t", policy=FAST, sleep=waits.append) == 42
    assert len(calls) == 3 and len(waits) == 2
    assert all(0.5 * min(FAST.max_s, FAST.base_s * 2**i) <= w <= min(FAST.max_s, FAST.base_s * 2**i)
               for i, w in enumerate(waits))

    calls.clear(), waits.clear()
    with pytest.raises(StorageUnavailableError, match="3 tries") as info:
        storage.retry_transient(flaky(99, TimeoutError("slow")), 1, what="reading s3://b/k", policy=FAST,
                                sleep=waits.append)
    assert len(calls) == 3 and len(waits) == 2 and isinstance(info.value.__cause__, TimeoutError)
    assert "reading s3://b/k" in str(info.value) and exit_code_of(info.value) == EXIT_TRANSIENT == 7

    calls.clear(), waits.clear()
    with pytest.raises(FileNotFoundError):
        storage.retry_transient(flaky(99, FileNotFoundError("k")), 1, what="t", policy=FAST, sleep=waits.append)
    assert len(calls) == 1 and waits == []

    policy = storage.RetryPolicy(attempts=10, base_s=1.0, max_s=4.0)
    rng = random.Random(0)
    assert max(policy.delay(i, rng) for i in range(10)) <= 4.0 and policy.delay(0, rng) >= 0.5

    monkeypatch.setenv("LUMBAR_RAY_S3_RETRY_ATTEMPTS", "2")
    monkeypatch.setenv("LUMBAR_RAY_S3_RETRY_BASE_S", "0.25")
    assert storage.READ_RETRY.from_env(storage.READ_RETRY_ENV) == storage.RetryPolicy(2, 0.25, storage.READ_RETRY.max_s)
    assert storage.is_forwarded_env_var("LUMBAR_RAY_S3_RETRY_ATTEMPTS")  # reaches the Ray workers
    monkeypatch.setenv("LUMBAR_RAY_S3_RETRY_ATTEMPTS", "many")
    with pytest.raises(ValueError, match="LUMBAR_RAY_S3_RETRY_ATTEMPTS"):
        storage.READ_RETRY.from_env(storage.READ_RETRY_ENV)


class FlakyFS:
    """A local file system whose ``cat`` returns a transient error for some files, ``fails``
    rounds in a row (None: for ever), as s3fs does with ``on_error="return"``."""

    def __init__(self, flaky: set[str], fails: int | None):
        import fsspec

        self.fs = fsspec.filesystem("file")
        self.flaky, self.fails, self.rounds = flaky, fails, 0

    def __getattr__(self, name):
        return getattr(self.fs, name)

    def cat(self, paths, on_error="raise"):
        assert on_error == "return"
        self.rounds += 1
        out = {}
        for p in paths:
            broken = os.path.basename(p) in self.flaky and (self.fails is None or self.rounds <= self.fails)
            try:
                out[p] = ConnectionResetError(errno.ECONNRESET, "reset by peer") if broken else self.fs.cat_file(p)
            except FileNotFoundError as exc:
                out[p] = exc
        return out


def test_cat_files_retries_the_failed_files_and_keeps_permanent_errors(tmp_path):
    for name in ("a", "b", "c"):
        (tmp_path / name).write_bytes(name.encode())
    paths = [str(tmp_path / n) for n in ("a", "b", "c", "missing")]
    fs = FlakyFS({"b"}, fails=2)
    got = storage.cat_files(fs, paths, what="t", policy=FAST, sleep=lambda s: None)
    assert (got[paths[0]], got[paths[1]], got[paths[2]]) == (b"a", b"b", b"c") and fs.rounds == 3
    assert isinstance(got[paths[3]], FileNotFoundError)
    with pytest.raises(StorageUnavailableError, match="1 of 4 files"):
        storage.cat_files(FlakyFS({"b"}, fails=None), paths, what="t", policy=FAST, sleep=lambda s: None)


def _series_folder(root) -> str:
    from lumbar_ray.dicom.write import uid_for, write_mr_series
    from lumbar_ray.targets import SAGITTAL_T2

    folder = str(root / "images" / "1" / "2")
    write_mr_series(folder, np.random.default_rng(0).integers(0, 2000, (5, 16, 16)), study_uid=uid_for("study", "1"),
                    series_uid=uid_for("series", "1", "2"), study_id="1", series_description=SAGITTAL_T2,
                    series_number=2, image_orientation=(0.0, 1.0, 0.0, 0.0, 0.0, -1.0),
                    positions=[(float(k), 0.0, 0.0) for k in range(5)], pixel_spacing=(0.5, 0.5), slice_thickness=1.0)
    return folder


def test_a_folder_is_never_read_in_part_when_storage_fails(tmp_path, monkeypatch):
    monkeypatch.setenv("LUMBAR_RAY_S3_RETRY_BASE_S", "0.01")
    monkeypatch.setenv("LUMBAR_RAY_S3_RETRY_ATTEMPTS", "3")
    folder = _series_folder(tmp_path)
    names = sorted(os.listdir(folder))
    (tmp_path / "images" / "1" / "2" / "junk.dcm").write_bytes(b"not a dicom file" * 20)  # permanent: skipped
    slices, skipped, found = load_folder_slices(FlakyFS({names[1]}, fails=2), folder, DEFAULT_LIMITS)
    assert found and len(slices) == 5 and [s.error_type for s in skipped] == ["NotDicomError"]
    with pytest.raises(StorageUnavailableError, match=names[1]):
        load_folder_slices(FlakyFS({names[1]}, fails=None), folder, DEFAULT_LIMITS)


class FlakyListingFS:
    """A local file system whose ``isdir`` and ``ls`` reset the connection ``fails`` times each
    (None: for ever) before answering."""

    def __init__(self, fails: int | None):
        import fsspec

        self.fs = fsspec.filesystem("file")
        self.fails, self.calls = fails, {"isdir": 0, "ls": 0}

    def __getattr__(self, name):
        return getattr(self.fs, name)

    def _maybe_reset(self, name: str) -> None:
        self.calls[name] += 1
        if self.fails is None or self.calls[name] <= self.fails:
            raise ConnectionResetError(errno.ECONNRESET, "reset by peer")

    def isdir(self, path):
        self._maybe_reset("isdir")
        return self.fs.isdir(path)

    def ls(self, path, detail=True, **kwargs):
        self._maybe_reset("ls")
        return self.fs.ls(path, detail=detail, **kwargs)


def test_a_study_folder_listing_is_retried_like_its_files(tmp_path, monkeypatch):
    from lumbar_ray.dicom.read import read_study

    monkeypatch.setenv("LUMBAR_RAY_S3_RETRY_BASE_S", "0.01")
    monkeypatch.setenv("LUMBAR_RAY_S3_RETRY_ATTEMPTS", "3")
    _series_folder(tmp_path)
    (tmp_path / "train_images").symlink_to(tmp_path / "images")
    real = storage.filesystem_for
    flaky = FlakyListingFS(fails=2)
    monkeypatch.setattr(storage, "filesystem_for", lambda url, **kw: (flaky, real(url, **kw)[1]))
    study = read_study(str(tmp_path), "1", descriptions=pd.DataFrame(columns=["study_id", "series_id", "series_description"]))
    # two resets then an answer for the study's isdir and ls; the series folder's own listing follows
    assert flaky.calls == {"isdir": 3, "ls": 4} and len(study.series) == 1
    flaky = FlakyListingFS(fails=None)
    with pytest.raises(StorageUnavailableError, match="checking .*train_images/1"):
        read_study(str(tmp_path), "1", descriptions=pd.DataFrame(columns=["study_id", "series_id", "series_description"]))


# --------------------------------------------------------------------------------------------
# Recorded as retryable, not counted as scored


def _rows(study_ids):
    return pd.DataFrame([{"study_id": s, "condition": t.condition.slug, "level": t.level, "normal_mild": 0.5,
                          "moderate": 0.3, "severe": 0.2, "detected": False, "confidence": None, "series_id": None,
                          "instance_number": None, "x": None, "y": None} for s in study_ids for t in TARGETS])


def _errors(study_ids, retryable):
    return pd.DataFrame({"study_id": study_ids, "stage": "read", "error_type": "X", "message": "m",
                         "retryable": retryable})


def test_retryable_error_rows_do_not_count_as_scored_and_old_parts_still_read(tmp_path):
    out = str(tmp_path / "scores")
    with OutputWriter(out, "r1", "v1") as w:
        w.write(_rows(["1"]), _errors(["2", "3"], [False, True]))
        w.write(None, pd.DataFrame({"study_id": ["5"], "stage": ["read"], "error_type": ["X"], "message": ["m"]}))
    # A part written before the column existed: read as retryable = false.
    old = read_errors(out).drop(columns="retryable").iloc[:1].assign(study_id="4")
    pq.write_table(pa.Table.from_pandas(old, preserve_index=False), os.path.join(out, "errors", "part-old-000000.parquet"))
    errors = read_errors(out).set_index("study_id")["retryable"]
    assert errors.to_dict() == {"2": False, "3": True, "4": False, "5": False}
    assert scored_studies(out, "v1") == {"1", "2", "4", "5"}  # 3: only a retryable row
    assert scored_studies(out, "v1", include_errors=False) == {"1"}
    from lumbar_ray.outputs.query import query

    assert query(out, "SELECT count(*) AS n FROM errors WHERE retryable")["n"].item() == 1


def test_a_storage_failure_becomes_a_retryable_row_and_is_counted(tmp_path, monkeypatch):
    from lumbar_ray.scoring import pipeline

    def failing(exc):
        def read_study(*args, **kwargs):
            raise exc
        return read_study

    monkeypatch.setattr(pipeline, "read_study", failing(StorageUnavailableError("storage kept failing")))
    assert read_study_row({"study_id": 1}, str(tmp_path), "test", None)["item"].error["retryable"] is True
    monkeypatch.setattr(pipeline, "read_study", failing(_client_error(503, "SlowDown")))  # outside the retries
    assert read_study_row({"study_id": 1}, str(tmp_path), "test", None)["item"].error["retryable"] is True
    monkeypatch.undo()
    item = read_study_row({"study_id": 42}, str(tmp_path / "none"), "test", None)["item"]  # really missing
    assert item.error["retryable"] is False

    parts = PartFiles(SimpleNamespace(write=lambda p, e: None), SimpleNamespace(check=lambda: None))
    frame = pipeline.error_rows_frame([{"study_id": "1", "series_id": None, "stage": "read", "error_type": "E",
                                        "message": "m", "retryable": True}], "v1", "r", pd.Timestamp.now(tz="UTC"))
    parts.add(StudyItem("1", errors=frame))
    parts.add(StudyItem("2", errors=frame.assign(retryable=False)))
    assert (parts.n_failed, parts.n_retryable) == (2, 1)


def test_score_job_exits_7_naming_the_transient_failures(monkeypatch, capsys):
    from lumbar_ray.scoring import job, pipeline

    summary = pipeline.ScoreSummary("r", "v1", 5, 0, 3, 0, 2, 1.0, 75, n_retryable=2)
    monkeypatch.setattr(job, "require_inputs", lambda cfg: None)
    monkeypatch.setattr(job, "ray_session", lambda *a, **k: nullcontext())
    monkeypatch.setattr(pipeline, "run_scoring", lambda cfg, echo: summary)
    args = job.get_args_parser().parse_args(["--input", "i", "--models", "m", "--out", "o"])
    assert job.main(args) == EXIT_TRANSIENT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2 studies failed transiently" in err[0] and "rerunning the same command" in err[0]
    summary.n_retryable = 0
    assert job.main(args) == 0


# --------------------------------------------------------------------------------------------
# A real S3 server behind a faulty proxy


def test_proxy_resets_and_refuses_during_an_outage():
    import socket
    import socketserver
    import threading

    class Echo(socketserver.BaseRequestHandler):
        def handle(self):
            while data := self.request.recv(1024):
                self.request.sendall(data)

    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            with __import__("faultproxy").FaultProxy(f"127.0.0.1:{server.server_address[1]}", marker=b"!") as proxy:
                with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as c:
                    c.sendall(b"hello")
                    assert c.recv(1024) == b"hello"
                    proxy.outage(1.0)
                    with pytest.raises(OSError):  # reset (or closed) mid-connection
                        c.sendall(b"again")
                        if not c.recv(1024):
                            raise ConnectionResetError
                with pytest.raises(ConnectionRefusedError):
                    socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
                assert proxy.wait_up(10)
                with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as c:
                    c.sendall(b"back")
                    assert c.recv(1024) == b"back"
        finally:
            server.shutdown()


@pytest.fixture(scope="module")
def fault_inputs(tmp_path_factory):
    """(data root with 4 small synthetic test studies, the untrained registry spec, DICOM files)."""
    from lumbar_ray.synth import writer as synth

    root = tmp_path_factory.mktemp("faults")
    synth.synthesize(str(root / "data"), n_studies=4, seed=31, split="test", size="small")
    n_files = sum(len(files) for _, _, files in os.walk(root / "data" / "test_images"))
    return root / "data", untrained_registry(root), n_files


def _non_retryable(errors: pd.DataFrame) -> set[tuple]:
    errors = errors[~errors["retryable"]]
    return set(zip(errors["study_id"], errors["series_id"].fillna(""), errors["error_type"], errors["message"]))


@pytest.mark.s3
@pytest.mark.ray
@pytest.mark.slow
def test_outage_and_resets_mid_run_then_a_rerun_give_the_clean_run(ray_runtime, s3_env, fault_inputs, monkeypatch,
                                                                    capsys):
    from faultproxy import FaultProxy

    from lumbar_ray.scoring import job as score_job

    data, models, n_files = fault_inputs
    fs, _ = storage.filesystem_for(f"s3://{s3_env.bucket}/x")
    prefix = f"{s3_env.bucket}/faults"
    fs.put(str(data / "test_images"), f"{prefix}/test_images", recursive=True)
    fs.put_file(str(data / "test_series_descriptions.csv"), f"{prefix}/test_series_descriptions.csv")
    study_ids = sorted(os.listdir(data / "test_images"))

    def score(out: str) -> int:
        # One study a read task and a part file: studies reach storage one by one around the outage.
        return score_job.main(score_job.get_args_parser().parse_args(
            ["--input", f"s3://{prefix}", "--models", models, "--out", out, "--split", "test",
             "--read-batch-studies", "1", "--flush-studies", "1", "--scorer-batch-studies", "1"]))

    clean_out, out = f"s3://{s3_env.bucket}/faults-clean", f"s3://{s3_env.bucket}/faults-scores"
    assert score(clean_out) == 0  # storage healthy, straight to the server
    clean = read_predictions(clean_out).set_index("row_id").sort_index()
    assert len(clean) == len(study_ids) * len(TARGETS)
    clean_errors = read_errors(clean_out)

    # botocore's own retries off, ours short for reads and long for writes: a read caught in the
    # outage fails (and is recorded as retryable) within it, a part file waits it out.
    for name, value in {"AWS_MAX_ATTEMPTS": "1", "AWS_RETRY_MODE": "standard", "LUMBAR_RAY_S3_RETRY_ATTEMPTS": "2",
                        "LUMBAR_RAY_S3_RETRY_BASE_S": "0.2", "LUMBAR_RAY_S3_RETRY_MAX_S": "0.2",
                        "LUMBAR_RAY_S3_WRITE_RETRY_ATTEMPTS": "40", "LUMBAR_RAY_S3_WRITE_RETRY_BASE_S": "0.5",
                        "LUMBAR_RAY_S3_WRITE_RETRY_MAX_S": "1"}.items():
        monkeypatch.setenv(name, value)
    # The outage starts at a DICOM request a third of the way through the files (that request is
    # lost), and lasts 4 s, far longer than a read's retries (< 1 s).
    with FaultProxy(s3_env.endpoint, reset_probability=0.05, seed=7, outage_after=max(1, n_files // 3),
                    outage_s=4.0) as proxy:
        monkeypatch.setenv("LUMBAR_RAY_S3_ENDPOINT", proxy.url)
        capsys.readouterr()
        assert score(out) == EXIT_TRANSIENT
        err = capsys.readouterr().err
        assert proxy.stats.outages == 1 and "failed transiently" in err and "rerunning the same command" in err
        assert proxy.wait_up(30)
        faulty = read_errors(out)
        failed = set(faulty.loc[faulty["retryable"], "study_id"])
        assert failed and not failed & set(read_predictions(out)["study_id"])  # never scored from part of a study
        proxy.reset_probability = 0.0
        assert score(out) == 0  # the same command, storage healthy: scores exactly those
        preds = read_predictions(out)
        errors = read_errors(out)
        faulty_run = faulty.loc[faulty["retryable"], "run_id"].iloc[0]
        assert set(preds.loc[preds["run_id"] != faulty_run, "study_id"]) == failed  # the rerun scored those only

    assert sorted(preds["study_id"].unique()) == study_ids
    assert (preds.groupby("study_id").size() == len(TARGETS)).all() and preds["row_id"].is_unique  # none doubled
    preds = preds.set_index("row_id").sort_index()
    np.testing.assert_allclose(preds[PROBS].to_numpy(), clean[PROBS].to_numpy(), atol=1e-6)
    for column in ("flags", "detected", "series_id", "instance_number", "x", "y"):  # no flag left from the outage
        pd.testing.assert_series_equal(preds[column], clean[column], check_names=False)
    assert _non_retryable(errors) == _non_retryable(clean_errors)
    assert set(errors.loc[errors["retryable"], "study_id"]) == failed
