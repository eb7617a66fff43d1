"""Peak memory of a process tree (this process and all its descendants), sampled in a background
thread, and waiting for a run's Ray actors to exit so they never count in the next run."""

from __future__ import annotations

import logging
import os
import threading
import time

try:
    import psutil
except ImportError:  # pragma: no cover - psutil comes with ray[default]; without it no memory column
    psutil = None

log = logging.getLogger(__name__)


def process_title(proc) -> str:
    """A short name: 'ray::<actor or task>' for Ray workers, else the program's name."""
    try:
        cmd = proc.cmdline()
    except Exception:
        return "?"
    if not cmd:
        return "?"
    if cmd[0].startswith("ray::"):
        return cmd[0].split(" ")[0]
    if any(c.endswith("default_worker.py") for c in cmd):
        return "ray::(starting worker)"
    scripts = [c for c in cmd[1:] if c.endswith(".py")]
    return os.path.basename(scripts[0] if scripts else cmd[0])


class MemorySampler:
    """Peak resident memory of this process and all its descendants, sampled every
    ``interval_s`` seconds in a daemon thread (``with MemorySampler() as m: ...; m.peak_mb``).

    The sum of RSS counts pages shared between processes (the torch libraries mapped by every
    actor, Ray's object store) once per process: an upper bound on what the machine spends.
    ``gpu=True`` also samples the device-wide used memory of the visible NVIDIA GPUs (NVML).
    """

    def __init__(self, interval_s: float = 0.2, gpu: bool = False):
        self.interval_s = float(interval_s)
        self.peak_bytes = 0
        self.baseline_bytes = 0
        self.group_peaks: dict[str, int] = {}
        self.max_processes = 0
        self.samples = 0
        self.gpu_peak_bytes: int | None = None
        self._gpu_handles: list = []
        self.peak_breakdown: list[tuple[str, int]] = []  # (process, RSS bytes) at the peak
        self.title_peaks: dict[str, int] = {}  # per process title: the largest one process reached
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if gpu:
            self._open_gpus()

    def _open_gpus(self) -> None:
        try:
            import pynvml  # optional: only with NVIDIA's management library installed

            pynvml.nvmlInit()
            self._gpu_handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self.gpu_peak_bytes = 0
        except Exception as exc:  # no NVML: no GPU memory column
            log.info("no GPU memory sampling: %s", exc)

    @property
    def available(self) -> bool:
        return psutil is not None

    def sample(self) -> int:
        """One sample; returns the summed RSS in bytes."""
        if psutil is None:
            return 0
        me = psutil.Process()
        try:
            procs = [me, *me.children(recursive=True)]
        except psutil.Error:
            procs = [me]
        total = 0
        groups: dict[str, int] = {}
        parts: list[tuple[str, int]] = []
        for proc in procs:
            try:
                rss = proc.memory_info().rss
            except psutil.Error:
                continue
            total += rss
            title = "driver" if proc.pid == me.pid else process_title(proc)
            kind = "driver" if title == "driver" else ("workers" if title.startswith("ray::") else "other")
            groups[kind] = groups.get(kind, 0) + rss
            parts.append((title, rss))
            self.title_peaks[title] = max(self.title_peaks.get(title, 0), rss)
        self.samples += 1
        if total > self.peak_bytes:
            self.peak_bytes = total
            self.peak_breakdown = sorted(parts, key=lambda p: -p[1])
        self.max_processes = max(self.max_processes, len(procs))
        for kind, value in groups.items():
            self.group_peaks[kind] = max(self.group_peaks.get(kind, 0), value)
        if self._gpu_handles:
            import pynvml  # optional, as in _open_gpus

            used = sum(pynvml.nvmlDeviceGetMemoryInfo(h).used for h in self._gpu_handles)
            self.gpu_peak_bytes = max(self.gpu_peak_bytes or 0, used)
        return total

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> "MemorySampler":
        self.baseline_bytes = self.sample()
        self._thread = threading.Thread(target=self._loop, name="memory-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20

    @property
    def baseline_mb(self) -> float:
        return self.baseline_bytes / 2**20


def wait_for_actor_exit(timeout_s: float = 30.0) -> None:
    """Ray Data ends a run's actors asynchronously: wait until their processes are gone, so one
    run's actors never count in the next run's memory."""
    if psutil is None:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        titles = [process_title(p) for p in psutil.Process().children(recursive=True)]
        if not any(t.startswith("ray::MapWorker") for t in titles):
            return
        time.sleep(0.25)
