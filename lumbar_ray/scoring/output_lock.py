"""One scoring run at a time per output root: ``{out}/scoring.lock``.

Why: two runs over the same output (a job submitted twice, a scheduled run that overlaps a slow
one, a driver that outlived its `ray job stop`) would each score the studies the other has not
written yet, so the same study would be scored twice; and on a small cluster the two runs' actor
pools can each hold part of the CPUs the other needs and wait for ever (seen on 2 CPUs: the
second run's DeepScoreNet actor took the half CPU the first run's reads needed, while the second
run's detector actor waited for the first run's).

The lock is a small JSON file created exclusively (``O_EXCL`` locally, ``If-None-Match: *`` on
S3), naming the run, its host, PID namespace and pid (no patient data). Its run rewrites the heartbeat every
``heartbeat_s``. A later run takes a lock over only when its holder is gone: on the same host
when the holder's process no longer exists (so a killed run's rerun starts at once), on another
host (or in another container of this host) when the heartbeat is older than ``stale_after_s``. Otherwise it refuses with
:class:`OutputBusy`, naming the run that holds the output. A run that finds its lock taken over
(its heartbeat thread sees another run id) stops writing at its next part file.

Nothing here imports Ray; the file goes through :mod:`lumbar_ray.storage`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from lumbar_ray import storage
from lumbar_ray.errors import BusyError

log = logging.getLogger(__name__)

LOCK_FILE = "scoring.lock"


class OutputBusy(BusyError, RuntimeError):
    """Another scoring run holds the output root (or took it over from this run)."""


def proc_stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (fields 3.. of proc(5): [0] state, [3] session,
    [19] start time); None when the process or /proc is not there."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ...": comm may hold spaces and parentheses, so split after the last ')'
    return raw[raw.rindex(")") + 2:].split()


def _start_time(fields: list[str] | None) -> str | None:
    return fields[19] if fields and len(fields) > 19 else None


def process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux): tells a live holder from a
    later process that reuses its pid. None where /proc does not tell."""
    return _start_time(proc_stat_fields(pid))


def process_alive(pid: int, start: str | None = None) -> bool:
    """Whether ``pid`` runs on this host (a zombie does not count), and, when ``start`` is given
    and /proc can tell, is the same process that had that start time."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        pass
    fields = proc_stat_fields(pid)
    if fields is None:
        return True
    if fields[0] in ("Z", "X"):
        return False
    current = _start_time(fields)
    return start is None or current is None or current == str(start)


def pid_namespace() -> str | None:
    """This process's PID namespace (Linux), e.g. ``pid:[4026531836]``: containers that share a
    host name (host networking) see different processes under the same pids."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _now() -> datetime:
    return datetime.now(timezone.utc)


def parse_time(text) -> datetime | None:
    """A lock's ISO timestamp as an aware datetime (naive ones are UTC); None if it is not one."""
    try:
        stamp = datetime.fromisoformat(str(text))
    except ValueError:
        return None
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)


def read_lock(path_or_url) -> dict | None:
    """A lock file's content; None when there is no lock, {} when it cannot be parsed (being
    written, or damaged)."""
    try:
        data = storage.read_bytes(path_or_url)
    except FileNotFoundError:
        return None
    try:
        held = json.loads(data)
    except ValueError:
        return {}
    return held if isinstance(held, dict) else {}


class OutputLock:
    """``with OutputLock(out, run_id):`` — hold ``{out}/scoring.lock`` for the run (see module doc)."""

    def __init__(self, out: str | os.PathLike, run_id: str, *, heartbeat_s: float = 30.0,
                 stale_after_s: float = 300.0, wait_s: float = 0.0):
        if stale_after_s <= heartbeat_s:
            raise ValueError("stale_after_s must exceed heartbeat_s")
        self.wait_s = max(0.0, float(wait_s))  # how long acquire() waits for a held lock
        self.out = os.fspath(out)
        self.path = storage.join(self.out, LOCK_FILE)
        self.run_id = run_id
        self.heartbeat_s = float(heartbeat_s)
        self.stale_after_s = float(stale_after_s)
        self.host = socket.gethostname()
        self.pid_ns = pid_namespace()
        self.pid = os.getpid()
        self.started = _now().isoformat()
        self.lost: str | None = None  # why this run no longer holds the lock, once it does not
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the file

    def _body(self) -> bytes:
        return json.dumps({"run_id": self.run_id, "host": self.host, "pid_ns": self.pid_ns, "pid": self.pid,
                           "pid_start": process_start(self.pid), "started": self.started,
                           "heartbeat": _now().isoformat()}).encode()

    def read(self) -> dict | None:
        """The lock's content (see :func:`read_lock`)."""
        return read_lock(self.path)

    def stale_reason(self, held: dict) -> str | None:
        """Why the holder of ``held`` is gone, or None while it may still be running."""
        pid = held.get("pid")
        if held.get("host") == self.host and held.get("pid_ns") == self.pid_ns and isinstance(pid, int):
            if process_alive(pid, held.get("pid_start")):
                return None  # alive here: never stale, whatever its heartbeat says
            return f"its process (pid {pid} on this host) is gone"
        beat = parse_time(held.get("heartbeat"))
        if beat is None:
            return None
        age = (_now() - beat).total_seconds()
        if age > self.stale_after_s:
            return f"its heartbeat is {age:.0f} s old (stale after {self.stale_after_s:.0f} s)"
        return None

    def _busy(self, held: dict) -> OutputBusy:
        if not held:
            return OutputBusy(f"{self.path} exists but cannot be read; if no scoring run is writing to {self.out}, "
                              "delete it and run again")
        return OutputBusy(
            f"scoring run {held.get('run_id')!r} (host {held.get('host')}, pid {held.get('pid')}, started "
            f"{held.get('started')}, last heartbeat {held.get('heartbeat')}) is writing to {self.out}; wait for it "
            f"to finish (a rerun then skips what it scored), or if it is gone for good delete {self.path}")

    # -- holding it

    def acquire(self) -> "OutputLock":
        """Take the lock; while another run holds it, wait up to ``wait_s`` (for it to end, or for
        its heartbeat to go stale: e.g. a retry on a fresh cluster after the old one died), then
        raise OutputBusy."""
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                return self._try_acquire()
            except OutputBusy as exc:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise
                log.warning("%s; waiting up to %.0f s more", exc, remaining)
                time.sleep(min(10.0, self.heartbeat_s, remaining))

    def _try_acquire(self) -> "OutputLock":
        for _ in range(3):
            if storage.create_exclusive(self.path, self._body()):
                self._thread = threading.Thread(target=self._beat, name="output-lock-heartbeat", daemon=True)
                self._thread.start()
                log.debug("run %s holds %s", self.run_id, self.path)
                return self
            held = self.read()
            if held is None:
                continue  # released meanwhile
            if not held:  # just being created by another run: give it a moment
                time.sleep(0.5)
                held = self.read()
                if held is None:
                    continue
            why = self.stale_reason(held) if held else None
            if why is None:
                raise self._busy(held)
            log.warning("taking over %s from run %r: %s", self.path, held.get("run_id"), why)
            storage.remove(self.path)
        raise OutputBusy(f"could not create {self.path}: other runs keep taking it")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                held = self.read()
                if held == {}:
                    raise ValueError(f"{self.path} cannot be parsed")  # a damaged read: next beat
                if held is None or held.get("run_id") != self.run_id:
                    who = f"run {held.get('run_id')!r}" if held else "nobody (the lock was deleted)"
                    self.lost = f"run {self.run_id!r} no longer holds {self.path}: it is held by {who}"
                    log.error(self.lost)
                    return
                storage.write_bytes(self.path, self._body())
            except Exception as exc:  # noqa: BLE001 - a storage hiccup: try again at the next beat
                log.warning("could not refresh %s: %s", self.path, exc)

    def check(self) -> None:
        """Raise OutputBusy if another run has taken the output over (call before each write)."""
        if self.lost:
            raise OutputBusy(self.lost)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None
            held = self.read()
            if held and held.get("run_id") == self.run_id:
                storage.remove(self.path)

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
