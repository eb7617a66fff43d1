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
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
