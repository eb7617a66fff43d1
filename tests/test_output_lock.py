"""One scoring run per output root: the lock file, its takeover rules and its heartbeat (no Ray)."""

import json
import os
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import pytest

from lumbar_ray import storage
from lumbar_ray.scoring.output_lock import LOCK_FILE, OutputBusy, OutputLock, pid_namespace, process_alive, process_start


def _write_lock(out, **fields) -> None:
    body = {"run_id": "other-run", "host": socket.gethostname(), "pid_ns": pid_namespace(), "pid": os.getpid(),
            "pid_start": process_start(os.getpid()), "started": "2026-11-30T00:00:00+00:00",
            "heartbeat": datetime.now(timezone.utc).isoformat(), **fields}
    storage.write_bytes(storage.join(str(out), LOCK_FILE), json.dumps(body).encode())


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid no longer exists
    return proc.pid


def _check_raises_once_lost(lock: OutputLock, why: str) -> None:
    """Wait (up to 10 s) for the heartbeat thread to notice, then check() must raise."""
    deadline = time.monotonic() + 10
    while lock.lost is None and time.monotonic() < deadline:
        time.sleep(0.02)
    with pytest.raises(OutputBusy, match=why):
        lock.check()


def test_second_run_is_refused_while_the_first_holds_the_output(tmp_path):
    out = tmp_path / "scores"
    with OutputLock(out, "run-a") as first:
        held = json.loads((out / LOCK_FILE).read_text())
        assert held["run_id"] == "run-a" and held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        with pytest.raises(OutputBusy, match=r"scoring run 'run-a' .* is writing to") as err:
            OutputLock(out, "run-b").acquire()
        assert str(out / LOCK_FILE) in str(err.value)  # says what to delete if the run is gone
        assert json.loads((out / LOCK_FILE).read_text())["run_id"] == "run-a"  # untouched
        first.check()  # still ours
    assert not (out / LOCK_FILE).exists()  # released
    with OutputLock(out, "run-b"):
        assert json.loads((out / LOCK_FILE).read_text())["run_id"] == "run-b"


def test_lock_of_a_process_gone_from_this_host_is_taken_over_at_once(tmp_path, caplog):
    out = tmp_path / "scores"
    _write_lock(out, pid=_dead_pid(), pid_start=None)
    with caplog.at_level("WARNING", logger="lumbar_ray.scoring.output_lock"):
        with OutputLock(out, "rerun"):
            assert json.loads((out / LOCK_FILE).read_text())["run_id"] == "rerun"
    assert "taking over" in caplog.text and "other-run" in caplog.text and "is gone" in caplog.text


def test_reused_pid_does_not_keep_a_dead_runs_lock(tmp_path):
    # Same pid as a live process (this one) but another start time: the holder is gone.
    assert process_alive(os.getpid(), process_start(os.getpid()))
    if process_start(os.getpid()) is None:
        pytest.skip("no /proc here to tell processes apart")
    assert not process_alive(os.getpid(), "1")
    out = tmp_path / "scores"
    _write_lock(out, pid_start="1")
    with OutputLock(out, "rerun"):
        pass


def test_other_hosts_lock_is_respected_until_its_heartbeat_is_stale(tmp_path):
    out = tmp_path / "scores"
    recent = datetime.now(timezone.utc) - timedelta(seconds=100)
    _write_lock(out, host="elsewhere", pid=1, heartbeat=recent.isoformat())
    with pytest.raises(OutputBusy, match="other-run"):
        OutputLock(out, "mine", heartbeat_s=30, stale_after_s=300).acquire()
    old = datetime.now(timezone.utc) - timedelta(seconds=400)
    _write_lock(out, host="elsewhere", pid=1, heartbeat=old.isoformat())
    with OutputLock(out, "mine", heartbeat_s=30, stale_after_s=300):
        assert json.loads((out / LOCK_FILE).read_text())["run_id"] == "mine"


def test_same_host_name_in_another_pid_namespace_goes_by_the_heartbeat(tmp_path):
    # Containers with host networking share the host name but not the pids: a pid that does not
    # exist here may be alive there, so only the heartbeat can tell.
    out = tmp_path / "scores"
    _write_lock(out, pid_ns="pid:[1]", pid=_dead_pid(), pid_start=None)
    with pytest.raises(OutputBusy, match="other-run"):
        OutputLock(out, "mine").acquire()
    old = datetime.now(timezone.utc) - timedelta(seconds=400)
    _write_lock(out, pid_ns="pid:[1]", pid=_dead_pid(), heartbeat=old.isoformat())
    with OutputLock(out, "mine", stale_after_s=300):
        pass


def test_acquire_waits_for_a_held_lock_to_go_stale_when_asked(tmp_path):
    out = tmp_path / "scores"
    _write_lock(out, host="elsewhere", pid=1)  # heartbeat now
    with pytest.raises(OutputBusy):
        OutputLock(out, "mine", heartbeat_s=0.1, stale_after_s=1.0).acquire()  # wait_s=0: at once
    started = time.monotonic()
    with OutputLock(out, "mine", heartbeat_s=0.1, stale_after_s=1.0, wait_s=30):
        waited = time.monotonic() - started
        assert json.loads((out / LOCK_FILE).read_text())["run_id"] == "mine"
    assert 0.5 < waited < 10  # until the other host's heartbeat was 1 s old, not the whole 30 s


def test_unreadable_lock_is_not_taken_over(tmp_path):
    out = tmp_path / "scores"
    out.mkdir()
    (out / LOCK_FILE).write_text("{not json")
    with pytest.raises(OutputBusy, match="cannot be read"):
        OutputLock(out, "mine").acquire()


def test_heartbeat_refreshes_and_a_taken_over_run_stops_writing(tmp_path):
    out = tmp_path / "scores"
    lock = OutputLock(out, "slow-run", heartbeat_s=0.05, stale_after_s=1.0).acquire()
    try:
        first = json.loads((out / LOCK_FILE).read_text())["heartbeat"]
        deadline = time.monotonic() + 10
        while json.loads((out / LOCK_FILE).read_text())["heartbeat"] == first and time.monotonic() < deadline:
            time.sleep(0.02)
        assert json.loads((out / LOCK_FILE).read_text())["heartbeat"] > first
        # Another run takes the output over (e.g. it judged this run's heartbeat stale).
        _write_lock(out, run_id="usurper")
        _check_raises_once_lost(lock, "usurper")
    finally:
        lock.release()
    # Releasing never deletes another run's lock.
    assert json.loads((out / LOCK_FILE).read_text())["run_id"] == "usurper"


def test_a_deleted_lock_stops_its_run_but_a_damaged_read_does_not(tmp_path):
    out = tmp_path / "scores"
    lock = OutputLock(out, "run", heartbeat_s=0.05, stale_after_s=1.0).acquire()
    try:
        (out / LOCK_FILE).write_text("{damaged")
        time.sleep(0.3)  # several beats
        assert lock.lost is None
        (out / LOCK_FILE).unlink()
        _check_raises_once_lost(lock, "deleted")
    finally:
        lock.release()


def test_create_exclusive_has_one_winner(tmp_path):
    path = tmp_path / "sub" / "x.lock"
    assert storage.create_exclusive(str(path), b"first")
    assert not storage.create_exclusive(str(path), b"second")
    assert path.read_bytes() == b"first"
    storage.remove(str(path))
    storage.remove(str(path))  # gone already: not an error
    assert not path.exists()


@pytest.mark.s3
def test_output_lock_is_exclusive_on_s3(s3_env):
    out = f"s3://{s3_env.bucket}/lock-scores"
    with OutputLock(out, "run-a"):
        with pytest.raises(OutputBusy, match="run-a"):
            OutputLock(out, "run-b").acquire()
    with OutputLock(out, "run-b"):
        assert json.loads(storage.read_bytes(f"{out}/{LOCK_FILE}"))["run_id"] == "run-b"
    assert not storage.exists(f"{out}/{LOCK_FILE}")
