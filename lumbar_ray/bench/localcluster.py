"""Private Ray clusters on one shared machine: free ports and a private ``RAY_TMPDIR``.

Used by ``make bench-nodes`` (:func:`lumbar_ray.bench.phases.phase_nodes`) and the tests
(``tests/raycluster.py``), which start real multi-node clusters (``ray.cluster_utils.Cluster``) or
a ``ray start --head`` on machines that other developers, helpers and CI share. Two rules keep such a cluster to itself:

- **Every port it opens is chosen free**, below the kernel's ephemeral range (so no outgoing
  connection takes one meanwhile), picked at random so that parallel runs stay apart.
- **Its own ``RAY_TMPDIR``** (:func:`private_ray_tmpdir`): ``Cluster`` writes its GCS address to
  ``$RAY_TMPDIR/ray/ray_current_cluster`` (default ``/tmp/ray/...``), and a plain ``ray.init()``
  anywhere on the machine connects to the address in that file — so without a private one every
  other developer's ``ray.init()`` would join (or, once it is gone, fail on) this cluster. The
  dir is a short path under ``/tmp`` on purpose: Ray puts unix sockets under
  ``{temp_dir}/session_<timestamp>_<pid>/sockets/`` and a socket path must fit in 107 bytes.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import tempfile
import time
from pathlib import Path
from typing import Iterator

# Metrics ports that Ray reads only from the environment (no flag or argument sets them).
ENV_PORTS = ("DASHBOARD_METRIC_PORT", "AUTOSCALER_METRIC_PORT")


def port_window() -> tuple[int, int]:
    """Ports below the kernel's ephemeral range, so no outgoing connection takes ours meanwhile."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return 15000, max(16000, low - 1)


def is_port_free(port: int) -> bool:
    """Free on loopback and on all interfaces (Ray binds some ports to 0.0.0.0)."""
    for host in ("127.0.0.1", "0.0.0.0"):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def free_ports(n: int, span: int = 0) -> tuple[list[int], tuple[int, int]]:
    """``n`` distinct free ports plus (when ``span``) a free contiguous range of ``span`` ports,
    none overlapping. Random picks (seeded by pid and clock) keep parallel runs apart."""
    lo, hi = port_window()
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    taken: set[int] = set()
    window = (0, -1)
    if span:
        for _ in range(500):
            start = rng.randrange(lo, hi - span)
            if all(is_port_free(p) for p in range(start, start + span)):
                window = (start, start + span - 1)
                taken |= set(range(start, start + span))
                break
        else:
            raise RuntimeError(f"no {span} contiguous free ports in {lo}-{hi}")
    chosen: list[int] = []
    for _ in range(20000):
        p = rng.randrange(lo, hi)
        if p in taken or not is_port_free(p):
            continue
        chosen.append(p)
        taken.add(p)
        if len(chosen) == n:
            return chosen, window
    raise RuntimeError("could not find free ports")


@contextlib.contextmanager
def private_ray_tmpdir(prefix: str = "lr-mn-") -> Iterator[str]:
    """A fresh short temp dir set as ``RAY_TMPDIR`` (see module doc), plus free ports for the
    dashboard's and autoscaler's metrics, for the block; the environment is restored on exit
    (the dir itself is left to the caller, who may still need its logs)."""
    temp_dir = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    saved = {k: os.environ.get(k) for k in ("RAY_TMPDIR", "RAY_ADDRESS", *ENV_PORTS)}
    ports, _ = free_ports(len(ENV_PORTS))
    os.environ["RAY_TMPDIR"] = temp_dir
    # RAY_AUTH_MODE is left as this process has it: the nodes inherit it, so they and this driver
    # agree. A driver that already ran a local ray.init() keeps the auth mode chosen then ("token"
    # when ~/.ray/auth_token exists); nodes with another mode send it no token, its gRPC server
    # refuses their calls and it looks dead to them (OwnerDiedError, actors "cancelled before they
    # started").
    os.environ.pop("RAY_ADDRESS", None)
    for name, port in zip(ENV_PORTS, ports):
        os.environ[name] = str(port)
    try:
        yield temp_dir
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def node_args(temp_dir: str, num_cpus: float, head: bool, resources: dict[str, float] | None = None,
              object_store_mb: int = 200) -> dict:
    """``Cluster(head_node_args=...)`` / ``Cluster.add_node(**...)`` arguments: every port free,
    the private temp dir, no dashboard, no GPUs."""
    names = ["object_manager_port", "node_manager_port", "dashboard_agent_listen_port", "metrics_agent_port",
             "metrics_export_port", "runtime_env_agent_port"] + (["gcs_server_port", "ray_client_server_port"] if head else [])
    ports, _ = free_ports(len(names))
    args = dict(zip(names, ports))
    args.update(num_cpus=num_cpus, num_gpus=0, temp_dir=os.path.join(temp_dir, "ray"), include_dashboard=False,
                object_store_memory=int(object_store_mb) * 2**20, resources=resources or {})
    return args
