"""A new user's first run: train into an empty registry (its version becomes the champion, through
the promotion lock, recorded), the next command printed, and expected errors as one line and an
exit code. No Ray: training is replaced by a stub that publishes a version."""

import contextlib
import json
import os
import socket
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from lumbar_ray.cli import app
from lumbar_ray.errors import EXIT_BUSY, EXIT_DATA, EXIT_REGISTRY
from lumbar_ray.models.registry import ModelRegistry
from lumbar_ray.scoring import job as score_job
from lumbar_ray.scoring.output_lock import OutputLock, pid_namespace
from lumbar_ray.training import job as train_job
from lumbar_ray.training import retrain_job
from lumbar_ray.training.promotion import (
    FIRST_VERSION,
    LOCK_NAME,
    PromotionLock,
    PromotionLockBusy,
    champion_after_training,
    decisions,
    pin_champion,
)
from registries import registry_with_versions

LUMBAR_RAY = Path(sys.executable).parent / "lumbar-ray"


def _kaggle_root(root, split="train"):
    (root / f"{split}_images").mkdir(parents=True)
    for name in ("train.csv", "train_label_coordinates.csv"):
        (root / name).write_text("study_id\n")
    return root


def _lock_file(registry, **held):
    path = Path(registry.path(*LOCK_NAME.split("/")))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"owner": "ghost", "token": "t", "since": datetime.now(timezone.utc).isoformat(),
                                **held}))
    return path


def _dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _one_error_line(err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert lines and lines[-1].startswith("error: "), err
    return lines[-1]


# --- the pointer ---------------------------------------------------------------------------


def test_first_version_into_an_empty_registry_becomes_champion_and_is_recorded(tmp_path):
    registry = registry_with_versions(tmp_path / "reg", "v1")
    decision = champion_after_training(registry, "v1", pinned=False)
    assert decision.promoted and decision.reason == FIRST_VERSION and decision.by == "train"
    assert registry.champion()["version"] == "v1" and registry.champion()["reason"] == FIRST_VERSION
    [recorded] = decisions(registry)
    assert recorded["challenger"] == "v1" and recorded["champion"] is None and recorded["reason"] == FIRST_VERSION
    assert not Path(registry.path(*LOCK_NAME.split("/"))).exists()


def test_a_later_version_does_not_replace_the_champion_unless_pinned(tmp_path):
    registry = registry_with_versions(tmp_path / "reg", "v1", "v2", "v3")
    champion_after_training(registry, "v1", pinned=False)
    assert champion_after_training(registry, "v2", pinned=False) is None
    assert registry.champion()["version"] == "v1" and len(decisions(registry)) == 1
    decision = champion_after_training(registry, "v3", pinned=True)
    assert decision.promoted and decision.by == "train --champion" and decision.champion == "v1"
    assert registry.champion()["version"] == "v3" and len(decisions(registry)) == 2


def test_first_version_stays_out_while_the_lock_is_held_and_that_is_recorded(tmp_path):
    registry = registry_with_versions(tmp_path / "reg", "v1")
    with PromotionLock(registry, owner="other"):
        decision = champion_after_training(registry, "v1", pinned=False)
    assert not decision.promoted and "held by other" in decision.reason
    assert registry.champion() is None and decisions(registry)[0]["promoted"] is False


def test_champion_set_goes_through_the_lock_and_records_a_decision(tmp_path):
    registry = registry_with_versions(tmp_path / "reg", "v1", "v2")
    pin_champion(registry, "v1", reason="start", by="champion --set")
    with PromotionLock(registry, owner="retrain v9"):
        with pytest.raises(PromotionLockBusy, match=r"held by retrain v9 .* expires"):
            pin_champion(registry, "v2", reason="roll", by="champion --set")
    assert registry.champion()["version"] == "v1" and len(decisions(registry)) == 1
    decision = pin_champion(registry, "v2", reason="roll forward", by="champion --set")
    assert decision.champion == "v1" and registry.champion()["version"] == "v2"
    assert [d["by"] for d in decisions(registry)] == ["champion --set", "champion --set"]


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    registry = registry_with_versions(tmp_path / "reg", "v1")
    lock = _lock_file(registry, host=socket.gethostname(), pid_ns=pid_namespace(), pid=_dead_pid())
    pin_champion(registry, "v1", reason="after a crash", by="champion --set")
    assert registry.champion()["version"] == "v1" and not lock.exists()


def test_a_lock_from_another_host_expires_by_age(tmp_path):
    registry = registry_with_versions(tmp_path / "reg", "v1")
    lock = _lock_file(registry, host="elsewhere", pid=1)
    with pytest.raises(PromotionLockBusy, match="held by ghost"):
        pin_champion(registry, "v1", reason="x", by="champion --set")
    old = (datetime.now(timezone.utc) - timedelta(seconds=PromotionLock.stale_after_s + 5)).isoformat()
    _lock_file(registry, host="elsewhere", pid=1, since=old)
    pin_champion(registry, "v1", reason="x", by="champion --set")
    assert registry.champion()["version"] == "v1" and not lock.exists()


def test_a_live_holder_on_this_host_is_never_taken_over(tmp_path):
    registry = registry_with_versions(tmp_path / "reg", "v1")
    old = (datetime.now(timezone.utc) - timedelta(hours=1)).isoformat()
    _lock_file(registry, host=socket.gethostname(), pid_ns=pid_namespace(), pid=os.getpid(), since=old)
    with pytest.raises(PromotionLockBusy):
        pin_champion(registry, "v1", reason="x", by="champion --set")


# --- train: champion and the next command --------------------------------------------------


def test_train_makes_the_first_version_champion_and_prints_the_score_command(tmp_path, monkeypatch, capsys):
    import lumbar_ray.training.cv as cv

    data, reg = _kaggle_root(tmp_path / "data"), tmp_path / "reg"

    def fake_training(cfg, echo):
        registry_with_versions(Path(cfg.registry), "v1")
        return SimpleNamespace(version="v1", report="(cv report)")

    monkeypatch.setattr(cv, "run_training", fake_training)
    monkeypatch.setattr(train_job, "ray_session", lambda *a, **k: contextlib.nullcontext())
    assert train_job.run(["--data", str(data), "--out", str(reg)]) == 0
    out = capsys.readouterr().out
    assert f"champion -> v1 ({FIRST_VERSION})" in out
    assert out.strip().splitlines()[-1] == f"next: lumbar-ray score --input {data} --models {reg}@champion --out scores"
    assert decisions(ModelRegistry(str(reg)))[0]["by"] == "train"


def test_next_command_names_the_version_when_it_is_not_the_champion():
    assert train_job.next_command("s3://b/data", "s3://b/models", "v2", champion=False) == (
        "next: lumbar-ray score --input s3://b/data --models s3://b/models@v2 --out scores")


# --- expected errors: one line, an exit code, no traceback ---------------------------------


def test_score_without_a_champion_or_with_an_unknown_version(tmp_path, capsys):
    data = _kaggle_root(tmp_path / "data", split="test")
    reg = tmp_path / "reg"
    run = lambda models: score_job.run(["--input", str(data), "--models", models, "--out", str(tmp_path / "o")])  # noqa: E731
    assert run(str(reg)) == EXIT_REGISTRY
    assert "holds no versions; train one first" in _one_error_line(capsys.readouterr().err)
    registry_with_versions(reg, "v1")
    assert run(str(reg)) == EXIT_REGISTRY
    assert "has no champion" in _one_error_line(capsys.readouterr().err)
    assert run(f"{reg}@v9") == EXIT_REGISTRY
    assert "has no version 'v9'" in _one_error_line(capsys.readouterr().err)


def test_score_and_train_with_missing_data(tmp_path, capsys):
    registry_with_versions(tmp_path / "reg", "v1")
    args = ["--models", f"{tmp_path / 'reg'}@v1", "--out", str(tmp_path / "o")]
    assert score_job.run(["--input", str(tmp_path / "nope"), *args]) == EXIT_DATA
    assert "does not exist" in _one_error_line(capsys.readouterr().err)
    (tmp_path / "empty").mkdir()
    assert score_job.run(["--input", str(tmp_path / "empty"), *args]) == EXIT_DATA
    assert "no test_images/ folder" in _one_error_line(capsys.readouterr().err)
    assert train_job.run(["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r2")]) == EXIT_DATA
    assert "does not exist" in _one_error_line(capsys.readouterr().err)
    (tmp_path / "empty" / "train_images").mkdir()
    assert retrain_job.run(["--data", str(tmp_path / "empty"), "--registry", str(tmp_path / "r2")]) == EXIT_DATA
    assert "no train.csv or train_label_coordinates.csv" in _one_error_line(capsys.readouterr().err)


def test_score_on_a_busy_output(tmp_path, monkeypatch, capsys):
    import lumbar_ray.scoring.pipeline as pipeline

    data = _kaggle_root(tmp_path / "data", split="test")
    registry_with_versions(tmp_path / "reg", "v1")

    def fake_scoring(cfg, echo):
        with OutputLock(cfg.out, "second"):
            raise AssertionError("the output was free")

    monkeypatch.setattr(pipeline, "run_scoring", fake_scoring)
    monkeypatch.setattr(score_job, "ray_session", lambda *a, **k: contextlib.nullcontext())
    with OutputLock(tmp_path / "o", "first"):
        code = score_job.run(["--input", str(data), "--models", f"{tmp_path / 'reg'}@v1", "--out", str(tmp_path / "o")])
    assert code == EXIT_BUSY
    assert "scoring run 'first'" in _one_error_line(capsys.readouterr().err)


def test_unexpected_errors_keep_their_traceback(tmp_path, monkeypatch):
    monkeypatch.setattr(score_job, "require_inputs", lambda cfg: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        score_job.run(["--input", "d", "--models", "r", "--out", "o"])


def test_champion_command_errors(tmp_path):
    registry = registry_with_versions(tmp_path / "reg", "v1")
    runner = CliRunner()
    result = runner.invoke(app, ["champion", "--registry", str(tmp_path / "reg"), "--set", "v9"])
    assert result.exit_code == EXIT_REGISTRY
    assert "has no version 'v9'" in _one_error_line(result.output)
    with PromotionLock(registry, owner="someone"):
        result = runner.invoke(app, ["champion", "--registry", str(tmp_path / "reg"), "--set", "v1"])
    assert result.exit_code == EXIT_BUSY
    assert "held by someone" in _one_error_line(result.output)
    result = runner.invoke(app, ["champion", "--registry", str(tmp_path / "reg"), "--set", "v1"])
    assert result.exit_code == 0 and "champion -> v1" in result.output


def test_the_installed_command_prints_one_line(tmp_path):
    """The real entry point, as a user runs it: `score` with a registry that has no champion."""
    registry_with_versions(tmp_path / "reg", "v1")
    proc = subprocess.run([str(LUMBAR_RAY), "score", "--input", str(tmp_path), "--models", str(tmp_path / "reg"),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_REGISTRY, proc.stderr
    assert "has no champion" in _one_error_line(proc.stderr)
