"""A real PACS for tests: Orthanc (Debian ``orthanc``) with its DICOMweb plugin (``orthanc-dicomweb``)
on free ports, its storage and index in a temporary folder.

Orthanc 1.10 binds its HTTP port on every interface (it has no bind-address option), so the
ports are chosen free on loopback and on all interfaces, and ``RemoteAccessAllowed: false`` makes
it answer loopback clients only. Its DICOM (DIMSE) server is switched off: the tests speak
DICOMweb only, and one port fewer can collide. HTTP basic auth is on, with a user made up for
the run, so the client's credentials path is exercised too.

The server runs in its own process group; :meth:`Orthanc.stop` sends SIGTERM to the group, then
SIGKILL after a grace period (also registered with :mod:`atexit`); on Linux the server also gets
SIGTERM if the test process itself is killed (``PR_SET_PDEATHSIG``). :func:`running_orthanc`
stops it whatever happens inside its ``with`` block.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import requests

from lumbar_ray.bench.localcluster import is_port_free

ORTHANC_ENV = "LUMBAR_RAY_TEST_ORTHANC"  # the Orthanc binary, if not /usr/sbin/Orthanc or on PATH
PLUGIN_ENV = "LUMBAR_RAY_TEST_ORTHANC_DICOMWEB"  # the plugin's .so, if not the Debian one
DEBIAN_BINARY = "/usr/sbin/Orthanc"
DEBIAN_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
APT_PACKAGES = "orthanc orthanc-dicomweb"


def orthanc_binary() -> str | None:
    configured = os.environ.get(ORTHANC_ENV)
    if configured:
        return configured if os.path.exists(configured) else None
    return DEBIAN_BINARY if os.path.exists(DEBIAN_BINARY) else shutil.which("Orthanc")


def dicomweb_plugin() -> str | None:
    path = os.environ.get(PLUGIN_ENV, DEBIAN_PLUGIN)
    return path if os.path.exists(path) else None


def missing() -> str | None:
    """Why Orthanc cannot run here (a skip message), or None."""
    if orthanc_binary() is None:
        return f"Orthanc is not installed (apt-get install {APT_PACKAGES}; or set {ORTHANC_ENV})"
    if dicomweb_plugin() is None:
        return f"the Orthanc DICOMweb plugin is not installed (apt-get install orthanc-dicomweb; or set {PLUGIN_ENV})"
    return None


@dataclass
class Orthanc:
    http_port: int
    dicom_port: int
    user: str
    password: str
    process: subprocess.Popen
    workdir: Path

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def root(self) -> str:
        """The data root (DICOMweb service root) the project reads: ``dicomweb://…/dicom-web``."""
        return f"dicomweb://127.0.0.1:{self.http_port}/dicom-web"

    @property
    def credentials_env(self) -> dict[str, str]:
        from lumbar_ray.dicomweb.client import PASSWORD_ENV, USER_ENV

        return {USER_ENV: self.user, PASSWORD_ENV: self.password}

    def get(self, path: str, **kwargs) -> requests.Response:
        """A request to Orthanc's own REST API (e.g. ``/statistics``), authenticated."""
        return requests.get(f"{self.http_url}{path}", auth=(self.user, self.password), timeout=10, **kwargs)

    def delete_study(self, study_uid: str) -> None:
        """Remove a study (by StudyInstanceUID) through Orthanc's REST API."""
        auth = (self.user, self.password)
        found = requests.post(f"{self.http_url}/tools/lookup", data=study_uid, auth=auth, timeout=10)
        found.raise_for_status()
        for item in found.json():
            if item.get("Type") == "Study":
                requests.delete(f"{self.http_url}/studies/{item['ID']}", auth=auth, timeout=10).raise_for_status()

    def log_tail(self, n: int = 40) -> str:
        path = self.workdir / "orthanc.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""

    def stop(self, grace: float = 10.0) -> None:
        stop_group(self.process, grace)


def stop_group(process: subprocess.Popen | None, grace: float = 10.0) -> None:
    """SIGTERM to the process's group, SIGKILL after ``grace`` seconds."""
    if process is None or process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=5)
    except ProcessLookupError:
        pass


def die_with_parent() -> None:  # runs in the child before exec (Linux): SIGTERM when pytest dies
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: atexit and the context manager still stop it
        pass


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on loopback and on all interfaces right now."""
    import random

    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    chosen: list[int] = []
    for _ in range(5000):
        port = rng.randrange(20000, 60000)
        if port not in chosen and is_port_free(port):
            chosen.append(port)
            if len(chosen) == n:
                return chosen
    raise RuntimeError("could not find free ports")


def _config(workdir: Path, http_port: int, dicom_port: int, user: str, password: str) -> dict:
    return {
        "Name": "lumbar-ray-test",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomServerEnabled": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {user: password},
        "HttpCompressionEnabled": False,  # CPU spent for nothing on loopback
        "OrthancExplorerEnabled": False,
        "SaveJobs": False,
        "ConcurrentJobs": 1,
        "HttpThreadsCount": 16,
        "Plugins": [dicomweb_plugin()],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
    }


def _wait_ready(server: Orthanc, timeout: float) -> bool:
    """True once the DICOMweb plugin answers a QIDO-RS search."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            return False
        try:
            if server.get("/dicom-web/studies", headers={"Accept": "application/dicom+json"}).status_code == 200:
                return True
        except requests.RequestException:
            pass
        time.sleep(0.2)
    return False


def start_orthanc(workdir: str | os.PathLike, timeout: float = 60.0) -> Orthanc:
    """Start Orthanc (three tries, on new ports each: a port taken between the probe and the
    bind); the caller must :meth:`Orthanc.stop` it (or use :func:`running_orthanc`)."""
    reason = missing()
    if reason:
        raise FileNotFoundError(reason)
    errors = []
    for attempt in range(3):
        tries = Path(workdir) / f"orthanc-{attempt}"
        tries.mkdir(parents=True, exist_ok=True)
        http_port, dicom_port = free_ports(2)
        user, password = "lumbar-test", f"pw-{secrets.token_hex(12)}"
        (tries / "config.json").write_text(json.dumps(_config(tries, http_port, dicom_port, user, password), indent=1))
        with open(tries / "orthanc.log", "wb") as log:
            process = subprocess.Popen([orthanc_binary(), str(tries / "config.json")], stdout=log,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=tries,
                                       start_new_session=True, preexec_fn=die_with_parent)
        atexit.register(stop_group, process)
        server = Orthanc(http_port, dicom_port, user, password, process, tries)
        if _wait_ready(server, timeout):
            return server
        errors.append(f"try {attempt + 1} (ports {http_port}, {dicom_port}):\n{server.log_tail()}")
        server.stop()
    raise RuntimeError("Orthanc did not come up:\n" + "\n".join(errors))


@contextmanager
def running_orthanc(workdir: str | os.PathLike, timeout: float = 60.0) -> Iterator[Orthanc]:
    """A running Orthanc for the ``with`` block, stopped after it whatever happens."""
    server = start_orthanc(workdir, timeout)
    try:
        yield server
    finally:
        server.stop()
