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
    if server.kind != "seaweedfs" and os.environ.get("LUMBAR_RAY_TEST_S3", "").lower() != "moto":
        warnings.warn("SeaweedFS did not start; the S3 tests run against moto (no signature checks)")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point lumbar_ray.storage (s3fs/botocore) at the test server for one test."""
    for name in ("LUMBAR_RAY_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture(scope="module")
def ray_runtime():
    """One real local Ray runtime per test module (Ray 2.60 has no local_mode), 2 CPUs."""
    import ray

    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
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
def trained(synthetic_root, tmp_path_factory):
    """A registry version trained with 2-fold CV on Ray (tiny: fast, not accurate), made champion.

    The scorer trials' first worker is killed at epoch 1 (fault injection) and must resume from
    the epoch-0 checkpoint: tests/test_training.py checks that.
    """
    from lumbar_ray.config import DetectorConfig, ResourceConfig, ScorerConfig, TrainConfig
    from lumbar_ray.models.registry import ModelRegistry
    from lumbar_ray.runtime import ray_session
    from lumbar_ray.training.cv import run_training

    registry = tmp_path_factory.mktemp("registry")
    cfg = TrainConfig(
        data=str(synthetic_root), registry=str(registry), folds=2, seed=0, final_fit=False,
        scorer=ScorerConfig(epochs=2, batch_size=64),
        detector=DetectorConfig(epochs=1, imgsz=64, batch_size=8),
        resources=ResourceConfig(cpus_per_worker=1.0),
        inject_failure_at_epoch=1, inject_failure_job="scorer",
    )
    with ray_session(num_cpus=2):
        outcome = run_training(cfg)
    ModelRegistry(str(registry)).set_champion(outcome.version, reason="test fixture")
    return outcome
