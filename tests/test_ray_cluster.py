"""Real Ray clusters on this one machine: `ray job submit` to a head the test starts and stops,
and a two-node cluster that shares scoring and cross-validation between its nodes.

- ``job_scores`` (module fixture): ``ray start --head`` on free ports in its own session
  (tests/raycluster.py), then ``ray job submit --working-dir <repo> -- python jobs/score.py …``
  exactly as a user runs it; the head is always stopped, and only this head.
- ``two_node_cluster`` (module fixture): ``ray.cluster_utils.Cluster`` with a head and a second
  node of 1 CPU each, in this process, under a private ``RAY_TMPDIR``.

The single-node reference for the two-node outputs is the job's output: same registry version,
same studies, scored by a 2-CPU single-node head.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from lumbar_ray.outputs.store import read_predictions
from lumbar_ray.targets import TARGETS

pytestmark = [pytest.mark.slow, pytest.mark.ray]
REPO = Path(__file__).resolve().parents[1]
PROBS = ["normal_mild", "moderate", "severe"]


def _test_ids(root) -> list[str]:
    from lumbar_ray.dicom.read import list_studies

    return [str(s) for s in list_studies(str(root), "test")]


def _check_complete(preds, ids, version) -> None:
    assert sorted(preds["study_id"].astype(str).unique()) == sorted(ids)
    assert (preds.groupby("study_id").size() == len(TARGETS)).all()
    assert len(preds) == len(ids) * len(TARGETS) and preds["row_id"].is_unique
    np.testing.assert_allclose(preds[PROBS].sum(axis=1), 1.0, atol=1e-5)
    assert (preds["model_version"] == version).all()


# ----------------------------------------------------------------------------------------------
# 1. `ray job submit` against a real head
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def job_scores(synthetic_root, trained, tmp_path_factory):
    """Submit jobs/score.py to a fresh single-node head (2 CPUs); stop the head; return what the
    test needs to check (the head's files stay until the module ends)."""
    from raycluster import start_ray_head

    out = tmp_path_factory.mktemp("job") / "scores"
    started = time.monotonic()
    head = start_ray_head(num_cpus=2)
    submission_id = f"lumbar-ray-test-{os.getpid()}-{int(time.time())}"
    info = {"out": out, "head": head, "startup_s": time.monotonic() - started, "submission_id": submission_id}
    try:
        # env_vars reach the job's driver and every worker. An empty PYTHONDONTWRITEBYTECODE counts
        # as unset: Python then leaves .pyc files next to the sources it imported, which shows below
        # which copy of lumbar_ray the job ran.
        runtime_env = {"env_vars": {"YOLO_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": ""}}
        try:
            info["submit"] = head.ray(
                "job", "submit", "--address", head.dashboard_url, "--submission-id", submission_id,
                "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env), "--",
                "python", "jobs/score.py", "--input", str(synthetic_root), "--models", str(trained.registry),
                "--out", str(out), "--split", "test", "--flush-studies", "2", timeout=420)
        except BaseException:
            with contextlib.suppress(Exception):
                head.ray("job", "stop", "--address", head.dashboard_url, submission_id, timeout=60)
            raise
        info["status"] = head.ray("job", "status", "--address", head.dashboard_url, submission_id, timeout=60)
        # The working_dir as the head unpacked it (.zip contents; the zip itself is gone).
        files = Path(head.temp_dir, "session_latest", "runtime_resources", "working_dir_files")
        info["packages"] = [p for p in files.glob("_ray_pkg_*") if p.is_dir()]
    finally:
        info["leftovers"] = head.stop()
        info["after_stop"] = head.processes()
    yield info
    shutil.rmtree(head.temp_dir, ignore_errors=True)


def test_ray_job_submit_scores_every_test_study_then_head_is_gone(job_scores, synthetic_root, trained):
    submit = job_scores["submit"]
    log = submit.stdout + submit.stderr
    assert submit.returncode == 0, log[-6000:]
    done = f"Job '{job_scores['submission_id']}' succeeded"
    assert done in log and done in job_scores["status"].stdout + job_scores["status"].stderr
    ids = _test_ids(synthetic_root)
    assert f"scored: {len(ids)}  failed: 0" in log, log[-4000:]
    preds = read_predictions(str(job_scores["out"]))
    _check_complete(preds, ids, trained.version)

    # The upload holds the code and nothing heavy: .rayignore/.gitignore keep out .venv (7 GB),
    # caches and data; Ray leaves out .git by default.
    [package] = job_scores["packages"]
    names = {p.name for p in package.iterdir()}
    assert {"jobs", "lumbar_ray", "pyproject.toml"} <= names
    assert not names & {".venv", ".git", ".pytest_cache", "work", ".lumbar-ray"}, names
    assert not list(package.rglob("*.parquet")) and not list(package.rglob("*.egg-info"))
    # Python compiled the package it imported next to the source it imported it from: the job
    # ran the uploaded copy of lumbar_ray (working_dir on sys.path), not the checkout it came from.
    assert list((package / "lumbar_ray" / "scoring" / "__pycache__").glob("job.*.pyc")), "job did not import the uploaded copy"
    # The unpacked upload, less the bytecode the job wrote into it: a few MiB of code and docs.
    code = sum(p.stat().st_size for p in package.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert code < 20 * 2**20, f"working_dir upload is {code / 2**20:.1f} MiB"

    # Stopped: nothing of this head is left (gcs_server, raylet, dashboard, agents, workers).
    assert job_scores["after_stop"] == {}
    assert job_scores["head"].process.returncode is not None


# ----------------------------------------------------------------------------------------------
# 2. Two nodes on one machine
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_node_cluster(trained):
    """Head + one more node, 1 CPU each, joined by this process. (``trained`` first: its local
    runtime must be gone before this process joins another cluster.)"""
    import ray
    from ray.cluster_utils import Cluster

    from raycluster import end_processes

    from lumbar_ray.bench.localcluster import node_args, private_ray_tmpdir

    assert not ray.is_initialized()
    with private_ray_tmpdir() as temp_dir:
        cluster = None
        try:
            cluster = Cluster(initialize_head=True, head_node_args=node_args(temp_dir, 1, head=True))
            second = cluster.add_node(**node_args(temp_dir, 1, head=False))
            cluster.wait_for_nodes()
            # Cluster wrote its address to $RAY_TMPDIR/ray/ray_current_cluster, the file a bare
            # ray.init() anywhere on this machine would join: it must be our private one.
            from ray._common.utils import get_ray_address_file

            assert get_ray_address_file(None).startswith(temp_dir) and os.path.exists(get_ray_address_file(None))
            ray.init(address=cluster.address, log_to_driver=False)
            nodes = {"head": cluster.head_node.node_id, "second": second.node_id}
            alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
            assert alive == set(nodes.values()), (alive, nodes)
            yield nodes
        finally:
            ray.shutdown()
            if cluster is not None:
                cluster.shutdown()
            end_processes(temp_dir, grace=10)
            shutil.rmtree(temp_dir, ignore_errors=True)


def _actor_nodes(class_part: str) -> list[str]:
    """Node of every actor (alive or finished) whose class name mentions ``class_part``, from the
    GCS actor table (works without the dashboard, which this cluster does not run)."""
    import ray

    table = ray._private.state.actors()
    return [a["Address"]["NodeID"] for a in table.values() if class_part in a["ActorClassName"]]


def test_two_node_scoring_uses_both_nodes_and_equals_single_node(two_node_cluster, job_scores, synthetic_root,
                                                                   trained, tmp_path):
    from lumbar_ray.config import ScoreConfig
    from lumbar_ray.scoring.pipeline import run_scoring

    ids = _test_ids(synthetic_root)
    # Sizes that leave the scheduler one choice: a detector actor takes 0.6 CPU, so two never fit
    # on one 1-CPU node; a scorer actor takes 0.3, so each node holds one detector + one scorer
    # (0.9 CPU) and the 0.1-CPU read tasks fit beside them.
    cfg = ScoreConfig(input=str(synthetic_root), models=str(trained.registry), out=str(tmp_path / "scores"),
                      split="test", detector_pool=2, detector_cpus=0.6, scorer_pool=2, scorer_cpus=0.3,
                      read_cpus=0.1, detector_batch_studies=1, scorer_batch_studies=1, flush_studies=2)
    summary = run_scoring(cfg)
    assert summary.n_scored == len(ids) and summary.n_failed == 0

    both = set(two_node_cluster.values())
    detect_nodes, score_nodes = _actor_nodes("DetectStage"), _actor_nodes("ScoreStage")
    assert len(detect_nodes) == 2 and set(detect_nodes) == both, detect_nodes
    assert len(score_nodes) == 2 and set(score_nodes) == both, score_nodes

    # Same rows and the same probabilities as the single-node run (the `ray job submit` head).
    multi = read_predictions(str(tmp_path / "scores"))
    _check_complete(multi, ids, trained.version)
    single = read_predictions(str(job_scores["out"]))
    assert sorted(multi["row_id"]) == sorted(single["row_id"])
    merged = multi.merge(single, on="row_id", suffixes=("", "_single"))
    assert len(merged) == len(single)
    for col in PROBS:
        np.testing.assert_allclose(merged[col], merged[f"{col}_single"], atol=1e-5, err_msg=col)
    assert (merged["detected"] == merged["detected_single"]).all()


def test_two_node_cross_validation_runs_folds_on_both_nodes(two_node_cluster, synthetic_root, tmp_path):
    from lumbar_ray.config import ResourceConfig, ScorerConfig, TrainConfig
    from lumbar_ray.training.cv import run_training

    # One 1-CPU worker per fold trial and 1 CPU per node: the two folds run at once, one per node.
    cfg = TrainConfig(data=str(synthetic_root), registry=str(tmp_path / "registry"), folds=2, seed=0,
                      models=("scorer",), final_fit=False, scorer=ScorerConfig(epochs=1, batch_size=64),
                      resources=ResourceConfig(cpus_per_worker=1.0))
    outcome = run_training(cfg)
    trials = sorted(outcome.trials, key=lambda t: t.fold)
    assert [(t.job, t.fold) for t in trials] == [("scorer", 0), ("scorer", 1)]
    assert {t.node_id for t in trials} == set(two_node_cluster.values()), [(t.fold, t.node_id) for t in trials]
    assert len(outcome.metric_table)  # out-of-fold metrics from both folds made it back to the driver
