"""Shared pytest fixtures (keep minimal; add yours below)."""

from __future__ import annotations

import os
import sys
import warnings

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/s3server.py importable as `s3server`


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS `weed mini` on free loopback ports; moto as fallback) with
    an empty bucket ``server.bucket``. Always stopped (process-group kill) at session end."""
    from s3server import start_s3_server

    server = start_s3_server(tmp_path_factory.mktemp("s3server"))
    server.credentials_file = server.write_credentials_file(tmp_path_factory.mktemp("s3credentials") / "credentials")
    if server.kind != "seaweedfs" and os.environ.get("LUMBAR_RAY_TEST_S3", "").lower() != "moto":
        warnings.warn("SeaweedFS did not start; the S3 tests run against moto (no signature checks)")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point lumbar_ray.storage (s3fs/botocore) at the test server for one test, credentials
    handed over as a cluster does: in a file (mode 0600) whose path alone is in the environment,
    so that the driver forwards only that path to Ray workers started before (storage_env())."""
    for name in ("LUMBAR_RAY_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
                 "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(s3_server.credentials_file))
    return s3_server


# ----- fault injection: a training worker that dies, for the fault-tolerance test --------------

KILLED_JOB = "scorer"  # the job whose trials lose their first worker ...
KILLED_AT_EPOCH = 1  # ... when it reports this epoch


def kill_first_attempt(job: str, epoch: int, markers: str):
    """A Ray ``worker_process_setup_hook``: while ``{markers}/armed`` exists, the first attempt
    of every trial of ``job`` dies (``os._exit``) when its worker reports ``epoch`` — the epoch
    trained, its report and checkpoint not yet given to Ray — so the retry must resume from the
    previous epoch's checkpoint. A marker file per trial tells the first attempt from the retry.

    It dies a few seconds after the previous report, as a worker lost mid-epoch would: Ray
    Train's controller collects reports (and their checkpoints) when it polls the workers, every
    2 s by default, so a worker that dies within that window after reporting loses that report
    too and resumes from the one before.

    The hook is a closure, so Ray pickles it by value (tests/ is not importable in the workers).
    """

    def install() -> None:
        import os
        import time
        from pathlib import Path

        import ray.train

        report = ray.train.report

        def report_or_die(metrics, *args, **kwargs):
            if metrics.get("epoch") == epoch and Path(markers, "armed").exists():
                trial = ray.train.get_context().get_experiment_name()  # {version}-{job}-{fold}
                marker = Path(markers, f"{trial}.killed")
                if f"-{job}-" in trial and not marker.exists():
                    time.sleep(6.0)
                    marker.write_text(f"killed reporting epoch {epoch}, pid {os.getpid()}\n")
                    os._exit(1)
            return report(metrics, *args, **kwargs)

        ray.train.report = report_or_die

    return install


@pytest.fixture(scope="session")
def killed_trials(tmp_path_factory):
    """The fault injection's marker folder, and the setup hook that installs it in every Ray
    worker process of a runtime (``trained`` arms it while it trains)."""
    markers = tmp_path_factory.mktemp("killed-trials")
    return markers, kill_first_attempt(KILLED_JOB, KILLED_AT_EPOCH, str(markers))


# ----- fault injection: a study that kills the scoring process that detects it -----------------


def crash_on_studies(markers: str):
    """A Ray ``worker_process_setup_hook``: while ``{markers}/armed`` exists, detecting any study
    whose id is a line of ``{markers}/poison`` ends the process at once (``os._exit``, as a
    decoder crash or the OOM killer would: no exception, no cleanup), in the pipeline's detector
    actors and in the one-study tasks alike. Each crash leaves a file ``crash-*`` in ``markers``.
    It wraps ``lumbar_ray.scoring.pipeline.detect_study``, the name DetectStage calls."""

    def install() -> None:
        import os
        import time
        from pathlib import Path

        from lumbar_ray.scoring import pipeline

        detect = pipeline.detect_study

        def detect_or_die(bundle, study, *args, **kwargs):
            armed, poison = Path(markers, "armed"), Path(markers, "poison")
            if armed.exists() and poison.exists() and str(study.study_id) in poison.read_text().split():
                Path(markers, f"crash-{study.study_id}-{os.getpid()}-{time.time_ns()}").touch()
                os._exit(1)
            return detect(bundle, study, *args, **kwargs)

        pipeline.detect_study = detect_or_die

    return install


@pytest.fixture(scope="module")
def ray_runtime_crashing_studies(tmp_path_factory):
    """(Ray runtime, markers folder): a module's own local runtime, 2 CPUs, with
    :func:`crash_on_studies` installed in every worker (disarmed until ``{markers}/armed`` exists)."""
    import ray

    markers = tmp_path_factory.mktemp("crashing-studies")
    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env=with_setup_hook(crash_on_studies(str(markers))))
    try:
        yield ray, markers
    finally:
        ray.shutdown()


def with_setup_hook(hook) -> dict:
    """A fresh ``runtime_env`` for each ``ray.init``: Ray writes the exported hook's key (which
    names the job) into the dict it is given, and a second ``ray.init`` with that dict would
    then refuse the hook as a conflicting one."""
    return {"worker_process_setup_hook": hook}


@pytest.fixture(scope="module")
def ray_runtime(killed_trials):
    """One real local Ray runtime per test module (Ray 2.60 has no local_mode), 2 CPUs; with the
    fault injection installed, since ``trained`` may train in it."""
    import ray

    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env=with_setup_hook(killed_trials[1]))
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_runtime_with_state_api(killed_trials):
    """``ray_runtime`` with the dashboard process, which serves ``ray.util.state`` (on a free
    port: another Ray instance on this machine may hold the default 8265). The state API needs
    the runtime's address (``ray._private.worker._global_node.address``) when several run here."""
    import socket

    import ray

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_port=port, log_to_driver=False,
             runtime_env=with_setup_hook(killed_trials[1]))
    try:
        yield ray
    finally:
        ray.shutdown()


# ----- shared synthetic data and a small trained model (built once per test session) -----------

TRAIN_STUDIES = 8
TEST_STUDIES = 6


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A small synthetic dataset in the Kaggle layout: a labelled train split and a test split."""
    from lumbar_ray.synth import writer as synth

    root = tmp_path_factory.mktemp("rsna")
    synth.synthesize(str(root), n_studies=TRAIN_STUDIES, seed=11, split="train", size="small")
    synth.synthesize(str(root), n_studies=TEST_STUDIES, seed=12, split="test", size="small")
    return root


@pytest.fixture(scope="session")
def trained(synthetic_root, tmp_path_factory, killed_trials):
    """A registry version trained with 2-fold CV on Ray (tiny: fast, not accurate), made champion.

    The scorer trials' first worker is killed at epoch 1 (``kill_first_attempt``) and must
    resume from the epoch-0 checkpoint: tests/test_training.py checks that.
    """
    import ray

    from lumbar_ray.config import DetectorConfig, ResourceConfig, ScorerConfig, TrainConfig
    from lumbar_ray.models.registry import ModelRegistry
    from lumbar_ray.training.cv import run_training

    registry = tmp_path_factory.mktemp("registry")
    cfg = TrainConfig(
        data=str(synthetic_root), registry=str(registry), folds=2, seed=0, final_fit=False,
        scorer=ScorerConfig(epochs=2, batch_size=64),
        # one epoch at 64 px finds nothing: no retries of collapsed folds (test_fold_selection.py tests them)
        detector=DetectorConfig(epochs=1, imgsz=64, batch_size=8, collapse_retries=0),
        resources=ResourceConfig(cpus_per_worker=1.0),
    )
    markers, hook = killed_trials
    started_ray = not ray.is_initialized()  # else a module's ray_runtime, hook installed
    if started_ray:
        os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True,
                 runtime_env=with_setup_hook(hook))
    (markers / "armed").touch()
    try:
        outcome = run_training(cfg)
    finally:
        (markers / "armed").unlink()
        if started_ray:
            ray.shutdown()
    ModelRegistry(str(registry)).set_champion(outcome.version, reason="test fixture")
    return outcome


# ----- services CI must have: a skip there is a failure -------------------------------------------

# `.ci/run` installs Orthanc and chromium and sets this to the markers whose tests must run; a
# developer's machine without them skips those tests with a message instead.
REQUIRED_MARKERS_ENV = "LUMBAR_RAY_REQUIRE_SERVICES"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    required = set(os.environ.get(REQUIRED_MARKERS_ENV, "").split())
    if report.skipped and required & {m.name for m in item.iter_markers()}:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"{REQUIRED_MARKERS_ENV} requires this test to run, but it skipped: {reason}"
