"""Secrets stay on the nodes (issue #17, item 6): the driver forwards storage settings to its Ray
tasks and actors, never credentials, so no secret lands in a runtime env, the session's logs, the
state API or job info."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from lumbar_ray import storage

SECRETS = {  # sentinel values: none may travel
    "AWS_ACCESS_KEY_ID": "AKIDSENTINEL7Q2W9E4R",
    "AWS_SECRET_ACCESS_KEY": "sentinel-secret-access-key-5d1c0f9e",
    "AWS_SESSION_TOKEN": "sentinel-session-token-8b3e72aa",
    "AWS_SECURITY_TOKEN": "sentinel-security-token-41f0c6d2",
    "LUMBAR_RAY_S3_SECRET_KEY": "sentinel-lumbar-secret-0e9a77b1",
    "LUMBAR_RAY_S3_PASSWORD": "sentinel-lumbar-password-c3d5e8f0",
}


def _allowed(tmp: Path) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:1",
        "AWS_DEFAULT_REGION": "eu-central-1",
        "AWS_PROFILE": "lumbar",
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "credentials"),
        "AWS_CONFIG_FILE": str(tmp / "config"),
        "LUMBAR_RAY_S3_ENDPOINT": "http://127.0.0.1:2",
    }


def test_runtime_env_carries_settings_never_secrets(monkeypatch, tmp_path):
    for name in [n for n in os.environ if n.startswith(("AWS_", "LUMBAR_RAY_S3_"))]:
        monkeypatch.delenv(name)
    assert storage.ray_remote_args_with_storage_env(num_cpus=1) == {"num_cpus": 1}
    allowed = _allowed(tmp_path)
    for name, value in {**SECRETS, **allowed}.items():
        monkeypatch.setenv(name, value)
    args = storage.ray_remote_args_with_storage_env(num_cpus=1, runtime_env={"env_vars": {"A": "1"}})
    assert args["runtime_env"]["env_vars"] == {"A": "1", **allowed}
    assert not [v for v in SECRETS.values() if v in repr(args)]
    assert storage.storage_env() == allowed
    for name in SECRETS:
        assert not storage.is_forwarded_env_var(name), name


def test_a_forwarded_credentials_file_is_where_botocore_finds_the_keys(monkeypatch, tmp_path):
    """What a worker sees: the path travels, the keys come from the file on its node."""
    import botocore.session

    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    credentials = tmp_path / "credentials"
    credentials.write_text("[default]\naws_access_key_id = id-from-file\naws_secret_access_key = s\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    env = storage.storage_env()
    assert env["AWS_SHARED_CREDENTIALS_FILE"] == str(credentials)
    assert botocore.session.Session().get_credentials().access_key == "id-from-file"


def _state_api_dump(address: str) -> str:
    from ray.util import state

    lists = (state.list_tasks, state.list_actors, state.list_jobs, state.list_runtime_envs,
             state.list_workers, state.list_nodes)
    return "\n".join(repr(fn(address=address, detail=True, limit=10_000, raise_on_missing_output=False))
                     for fn in lists)


def _files_holding(folder: str, needles: list[str]) -> dict[str, list[str]]:
    hits: dict[str, list[str]] = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(dirpath, name)
            if not os.path.isfile(path) or os.path.islink(path):
                continue
            try:
                data = Path(path).read_bytes()
            except OSError:
                continue
            found = [n for n in needles if n.encode() in data]
            if found:
                hits[path] = found
    return hits


@pytest.mark.slow
@pytest.mark.ray
def test_scoring_leaves_no_secret_in_ray(ray_runtime_with_state_api, synthetic_root, trained, tmp_path, monkeypatch):
    """A scoring run with sentinel secrets in the driver's environment (set after the runtime
    started, as on a cluster): 0 hits in the state API, job info and the session's log folder.
    An allowed setting set alongside is found in the state API: the search does see runtime envs."""
    import ray

    from lumbar_ray.config import ScoreConfig
    from lumbar_ray.scoring.pipeline import run_scoring

    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    marker = "http://allowed-setting-sentinel.invalid:9000"  # not used: the input is local
    monkeypatch.setenv("LUMBAR_RAY_S3_ENDPOINT", marker)
    summary = run_scoring(ScoreConfig(input=str(synthetic_root), models=str(trained.registry),
                                      out=str(tmp_path / "scores"), split="test", flush_studies=2))
    assert summary.n_scored > 0

    node = ray._private.worker._global_node
    dump = ""
    for _ in range(30):  # task events reach the GCS within a second or so
        dump = _state_api_dump(node.address)
        if marker in dump:
            break
        time.sleep(1.0)
    assert marker in dump, "the state API shows no runtime env of the scoring tasks"
    needles = list(SECRETS.values())
    assert not [n for n in needles if n in dump], "a secret in the state API"
    jobs = ray._private.state.state.job_table()
    assert not [n for n in needles if n in repr(jobs)], "a secret in job info"
    hits = _files_holding(node.get_session_dir_path(), needles)
    assert not hits, f"secrets in the session folder: {hits}"
