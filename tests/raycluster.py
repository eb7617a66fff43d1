"""Real Ray clusters for tests, on one shared machine, that touch nothing but themselves.

Two kinds:

- :func:`start_ray_head` runs ``ray start --head --block`` in its own session (``setsid``) with
  every port it opens chosen free (GCS, dashboard, dashboard agent HTTP + gRPC, node manager,
  object manager, Ray Client server, runtime-env agent, metrics export, the dashboard's and the
  autoscaler's own metrics ports, and the worker port range), its own ``--temp-dir`` and the
  dashboard on (the Jobs API lives there). :meth:`RayHead.stop` ends exactly this head: SIGTERM
  to its process group, then every process left in its session (Ray workers put themselves in
  their own process group but keep the session) or carrying its temp dir, SIGKILL after a grace
  period. ``ray stop`` is never used: it kills every Ray instance on the machine (other tests,
  other developers).
- In-process multi-node clusters (``ray.cluster_utils.Cluster``) use the package's
  :mod:`lumbar_ray.bench.localcluster` (``private_ray_tmpdir``, ``node_args``): ``make bench-nodes``
  starts the same kind of cluster.

Temp dirs are short paths under ``/tmp`` on purpose: Ray puts unix sockets under
``{temp_dir}/session_<timestamp>_<pid>/sockets/`` and a socket path must fit in 107 bytes,
which a pytest ``tmp_path`` plus that suffix does not.

Token authentication (Ray 2.60): when ``~/.ray/auth_token`` exists and ``RAY_AUTH_MODE`` is
unset, ``ray start`` turns token auth on ("Token authentication is enabled for this Ray
cluster"), and a ``ray job submit`` whose process does not run in token mode gets HTTP 401 from
the dashboard. The test head is a throw-away cluster on loopback, so :func:`ray_env` sets
``RAY_AUTH_MODE=disabled`` for the head *and* for the ``ray job`` client; the job's driver and
workers inherit it from the head. (On a real cluster keep token auth on and give the client the
token: ``RAY_AUTH_MODE=token`` + ``RAY_AUTH_TOKEN``/``~/.ray/auth_token``.)
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

# Free ports (and the private RAY_TMPDIR of in-process clusters) live in the package: make
# bench-nodes needs them too.
from lumbar_ray.bench.localcluster import ENV_PORTS, free_ports
from lumbar_ray.scoring.output_lock import proc_stat_fields

BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")

# Ports named on `ray start` (each chosen free) and the two only settable through the environment.
HEAD_PORT_FLAGS = (
    "port",  # GCS
    "dashboard-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "node-manager-port",
    "object-manager-port",
    "ray-client-server-port",
    "runtime-env-agent-port",
    "metrics-export-port",
)
WORKER_PORTS = 64  # --min-worker-port .. --max-worker-port: one port per worker process


# ----------------------------------------------------------------------------------------------
# processes
# ----------------------------------------------------------------------------------------------


def _stat_sid(pid: int) -> int | None:
    fields = proc_stat_fields(pid)
    return int(fields[3]) if fields else None


def _read(pid: int, name: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:
        return b""


def processes_of(marker: str, session: int | None = None) -> dict[int, str]:
    """pid -> command line of every live process that belongs to one test cluster: its command
    line or environment names ``marker`` (the cluster's unique temp dir), or (for a head started
    with :func:`start_ray_head`) it sits in the cluster's session."""
    me = os.getpid()
    found: dict[int, str] = {}
    needle = marker.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        pid = int(entry)
        cmdline = _read(pid, "cmdline")
        stat = _read(pid, "stat")
        if not stat or b") Z " in stat:  # gone, or a zombie (already dead, waits for its reaper)
            continue
        ours = needle in cmdline or needle in _read(pid, "environ")
        if not ours and session is not None:
            ours = _stat_sid(pid) == session
        if ours:
            found[pid] = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()[:300]
    return found


def end_processes(marker: str, session: int | None = None, grace: float = 15.0) -> dict[int, str]:
    """SIGTERM every process of this cluster (by pid), SIGKILL those left after ``grace``.
    Returns what had to be SIGKILLed."""
    deadline = time.monotonic() + grace
    killed: dict[int, str] = {}
    signalled: set[int] = set()
    while True:
        alive = processes_of(marker, session)
        if not alive:
            return killed
        late = time.monotonic() > deadline
        for pid, cmd in alive.items():
            if late or pid not in signalled:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL if late else signal.SIGTERM)
                signalled.add(pid)
                if late:
                    killed[pid] = cmd
        if late:
            time.sleep(0.5)
            if time.monotonic() > deadline + 10:
                return killed
        time.sleep(0.3)


# ----------------------------------------------------------------------------------------------
# `ray start --head` in its own session
# ----------------------------------------------------------------------------------------------


def ray_env(temp_dir: str | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a test head and for the ``ray`` CLI talking to it (see module doc)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env["RAY_AUTH_MODE"] = "disabled"
    env["RAY_DISABLE_USAGE_STATS"] = "1"
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # `python` in a job entrypoint = this venv
    if temp_dir is not None:
        env["RAY_TMPDIR"] = temp_dir  # and the marker that tells our processes from everyone else's
    env.update(extra or {})
    return env


@dataclass
class RayHead:
    process: subprocess.Popen
    temp_dir: str
    ports: dict[str, int]
    worker_ports: tuple[int, int]
    log_path: Path
    env: dict[str, str]
    leftovers: dict[int, str] = field(default_factory=dict)  # what stop() had to SIGKILL

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['dashboard-port']}"

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.ports['port']}"

    def processes(self) -> dict[int, str]:
        return processes_of(self.temp_dir, session=self.process.pid)

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def ray(self, *args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run the ``ray`` CLI against this head (``ray job ...``)."""
        return subprocess.run([RAY, *args], env={**self.env, **(env or {})}, capture_output=True, text=True,
                              timeout=timeout, start_new_session=True)

    def stop(self, grace: float = 15.0) -> dict[int, str]:
        """End this head and everything it started; nothing else. Idempotent.

        SIGTERM to ``ray start --block`` first (it tears its node down itself; draining is off,
        see :func:`start_ray_head`), then SIGTERM to its process group, then every process still
        in its session or marked with its temp dir (Ray workers sit in process groups of their
        own), SIGKILL after ``grace``. Returns what needed SIGKILL."""
        pid = self.process.pid
        for target in (lambda: os.kill(pid, signal.SIGTERM), lambda: os.killpg(pid, signal.SIGTERM)):
            if self.process.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                target()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=grace)
        self.leftovers.update(end_processes(self.temp_dir, session=pid, grace=grace))
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        return self.leftovers


def _get_json(url: str, timeout: float = 2.0):
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback only
        return json.loads(response.read().decode())


def start_ray_head(num_cpus: int = 2, timeout: float = 120.0, extra_env: dict[str, str] | None = None,
                   object_store_mb: int = 300) -> RayHead:
    """``ray start --head --block`` on free ports; returns once the Jobs API answers."""
    temp_dir = tempfile.mkdtemp(prefix="lr-head-", dir="/tmp")
    ports_list, worker_ports = free_ports(len(HEAD_PORT_FLAGS) + len(ENV_PORTS), span=WORKER_PORTS)
    ports = dict(zip(HEAD_PORT_FLAGS + ENV_PORTS, ports_list))
    env = ray_env(temp_dir, {**{name: str(ports[name]) for name in ENV_PORTS},
                             # On SIGTERM `ray start --block` would first drain the node for up to
                             # 30 s (meant for Serve on Kubernetes); a test head has nothing to drain.
                             "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
                             **(extra_env or {})})
    args = [RAY, "start", "--head", "--block", f"--num-cpus={num_cpus}",
            "--num-gpus=0", f"--object-store-memory={object_store_mb * 2**20}", "--include-dashboard=true",
            "--dashboard-host=127.0.0.1", f"--temp-dir={temp_dir}", "--disable-usage-stats",
            f"--min-worker-port={worker_ports[0]}", f"--max-worker-port={worker_ports[1]}",
            *[f"--{flag}={ports[flag]}" for flag in HEAD_PORT_FLAGS]]
    log_path = Path(temp_dir) / "ray-start.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    head = RayHead(process, temp_dir, ports, worker_ports, log_path, env)
    deadline = time.monotonic() + timeout
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"ray start exited with {process.returncode}:\n{head.log_tail()}")
            try:
                _get_json(f"{head.dashboard_url}/api/version")
                _get_json(f"{head.dashboard_url}/api/jobs/")
                return head
            except urllib.error.HTTPError as exc:
                if exc.code in (401, 403):  # up, but token auth is on: the `ray job` client will say so
                    return head
            except Exception:  # noqa: BLE001 - not up yet
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"Ray head did not come up in {timeout:.0f} s:\n{head.log_tail()}")
            time.sleep(0.5)
    except BaseException:
        head.stop()
        raise
