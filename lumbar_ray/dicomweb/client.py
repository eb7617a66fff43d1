"""A small DICOMweb client: QIDO-RS (search), WADO-RS (retrieve), STOW-RS (store), over HTTP(S).

Only what scoring from a PACS and storing reports back need: list the studies, the series of a
study and the instances of a series; fetch a whole series in one ``multipart/related`` response
(or one instance); store Part 10 instances in ``multipart/related`` POSTs.

Failures are classified for :mod:`lumbar_ray.storage`'s retry layer, as s3fs classifies S3's:
connection errors and timeouts stay what they are (transient), HTTP 5xx and 429 become
:class:`DicomWebError` with a transient errno (``EREMOTEIO``, ``EAGAIN``), 404 is
:class:`FileNotFoundError`, 401/403 is :class:`DicomWebAuthError`, anything else a permanent
:class:`DicomWebError`. Each request also gets a couple of quick retries of its own for a dropped
keep-alive connection or a 502/503/504 (as botocore retries each S3 request), so that the slower
retries of :func:`lumbar_ray.storage.retry_transient` are left for real outages.

Credentials come from the environment only, never from the URL (URLs end up in logs and error
rows): ``LUMBAR_RAY_DICOMWEB_TOKEN`` (a bearer token), else ``LUMBAR_RAY_DICOMWEB_USER`` and
``LUMBAR_RAY_DICOMWEB_PASSWORD`` (basic auth). They are read at each request, never logged, and
never forwarded to Ray workers (:func:`lumbar_ray.storage.storage_env`): each node needs its own.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence
from urllib.parse import urlsplit

import pydicom
import requests
from pydicom.dataset import Dataset
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from lumbar_ray.errors import EXIT_DATA, UserError, one_line

log = logging.getLogger(__name__)

__all__ = [
    "TOKEN_ENV", "USER_ENV", "PASSWORD_ENV", "SCHEMES",
    "DicomWebError", "DicomWebAuthError", "DicomWebRefusedError",
    "DicomWebClient", "client_for", "http_base_url", "first_value", "parse_multipart", "encode_instance",
]

TOKEN_ENV = "LUMBAR_RAY_DICOMWEB_TOKEN"
USER_ENV = "LUMBAR_RAY_DICOMWEB_USER"
PASSWORD_ENV = "LUMBAR_RAY_DICOMWEB_PASSWORD"
# URL scheme of the project -> HTTP scheme.
SCHEMES = {"dicomweb": "http", "dicomwebs": "https", "http": "http", "https": "https"}

DICOM_JSON = "application/dicom+json"
# transfer-syntax=*: the instances as stored, no transcoding on the server (the reader decodes
# every syntax the project supports); a server that refuses it (406) is asked without.
WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
WADO_ACCEPT_DEFAULT = 'multipart/related; type="application/dicom"'
# (connect, read) seconds: a PACS that accepts no connection is given up on quickly; a big series
# may take a while to stream.
TIMEOUT_S = (10.0, 300.0)
QIDO_PAGE = 1000  # results per QIDO-RS request (servers cap pages; we ask for more until done)
# STOW-RS requests stay below these, so that one report export is never one giant request.
STOW_MAX_INSTANCES = 100
STOW_MAX_BYTES = 64 * 2**20

TAG_STUDY_UID = "0020000D"
TAG_SERIES_UID = "0020000E"
TAG_SOP_UID = "00080018"
TAG_MODALITY = "00080060"
TAG_MODALITIES_IN_STUDY = "00080061"
TAG_INSTANCE_NUMBER = "00200013"
TAG_FAILED_SOPS = "00081198"
TAG_REFERENCED_SOPS = "00081199"
TAG_REFERENCED_SOP_UID = "00081155"
TAG_FAILURE_REASON = "00081197"
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class DicomWebError(OSError):
    """A DICOMweb request that failed with an HTTP status; transient (5xx, 429) through its errno
    (:func:`lumbar_ray.storage.is_transient`), permanent otherwise."""

    def __init__(self, message: str, status: int | None = None):
        code = errno.EAGAIN if status == 429 else errno.EREMOTEIO if status is not None and status >= 500 else None
        super().__init__(code, message)
        self.status = status

    def __str__(self) -> str:
        return str(self.strerror)


class DicomWebAuthError(UserError, PermissionError):
    """The server refused our credentials (401/403): permanent, a user must fix the environment."""

    exit_code = EXIT_DATA


class DicomWebRefusedError(UserError):
    """A STOW-RS store in which the server refused instances; names each one and why."""

    exit_code = EXIT_DATA

    def __init__(self, message: str, failed: dict[str, str], stored: int):
        super().__init__(message)
        self.failed = failed  # SOPInstanceUID -> the server's reason
        self.stored = stored


def http_base_url(url: str) -> str:
    """``http(s)://host:port/path`` (no trailing slash) of a ``dicomweb://``/``dicomwebs://`` (or
    plain ``http(s)://``) URL of a DICOMweb service root; refuses credentials in the URL."""
    parts = urlsplit(url)
    scheme = SCHEMES.get(parts.scheme.lower())
    if scheme is None or not parts.hostname:
        raise ValueError(f"not a DICOMweb URL: {url!r} (expected dicomweb://HOST:PORT/PATH or dicomwebs://…)")
    if parts.username or parts.password:
        raise ValueError(f"credentials in a DICOMweb URL would be logged; set {TOKEN_ENV} or {USER_ENV} and "
                         f"{PASSWORD_ENV} instead")
    if parts.query or parts.fragment:
        raise ValueError(f"a DICOMweb URL takes no query or fragment: {url!r}")
    return f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def check_uid(uid: str, what: str) -> str:
    """``uid`` if it is a DICOM UID (digits and dots); it goes into a URL path."""
    if not (0 < len(uid) <= 64 and _UID.match(uid)):
        raise ValueError(f"not a DICOM {what} UID: {uid!r}")
    return uid


def first_value(item: dict, tag: str) -> Any:
    """The first value of ``tag`` in a DICOM JSON object, or None."""
    values = (item.get(tag) or {}).get("Value") or []
    return values[0] if values else None


def all_values(item: dict, tag: str) -> list[Any]:
    """Every value of ``tag`` in a DICOM JSON object (a multi-valued attribute), or []."""
    return list((item.get(tag) or {}).get("Value") or [])


class _EnvAuth(requests.auth.AuthBase):
    """Credentials from the environment, read at each request (so a rotated token is picked up)."""

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        token = os.environ.get(TOKEN_ENV, "").strip()
        user, password = os.environ.get(USER_ENV, ""), os.environ.get(PASSWORD_ENV, "")
        if token:
            request.headers["Authorization"] = f"Bearer {token}"
        elif user:
            return requests.auth.HTTPBasicAuth(user, password)(request)
        return request


def _new_session() -> requests.Session:
    session = requests.Session()
    # Quick retries of each request (the slower, bounded ones are storage.retry_transient's): a
    # keep-alive connection the server closed meanwhile (Orthanc keeps them 1 s), a refused
    # connect, a 502/503/504 from a restarting gateway. Only GETs, which are safe to repeat;
    # POST (STOW-RS) is retried at the higher level only.
    retry = Retry(total=3, connect=2, read=1, status=2, backoff_factor=0.2, status_forcelist=(502, 503, 504),
                  allowed_methods=frozenset({"GET", "HEAD"}), respect_retry_after_header=True,
                  raise_on_status=False)
    adapter = HTTPAdapter(max_retries=retry, pool_maxsize=8)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.auth = _EnvAuth()
    return session


def _raise_for_status(response: requests.Response, what: str) -> None:
    status = response.status_code
    if status < 400:
        return
    detail = one_line(Exception(response.text[:300])) if response.content else response.reason
    message = f"{what}: HTTP {status} from {response.url} ({detail})"
    if status == 404:
        raise FileNotFoundError(errno.ENOENT, message)
    if status in (401, 403):
        raise DicomWebAuthError(f"{message}; credentials come from {TOKEN_ENV} or {USER_ENV}/{PASSWORD_ENV}")
    raise DicomWebError(message, status)


def parse_multipart(body: bytes, content_type: str) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a ``multipart/related`` body: ``[(headers (lower-case names), content)]``."""
    match = re.search(r'boundary="?([^";]+)"?', content_type, re.IGNORECASE)
    if not content_type.lower().startswith("multipart/") or not match:
        raise DicomWebError(f"expected a multipart/related response, got Content-Type {content_type!r}")
    delimiter = b"--" + match.group(1).strip().encode("ascii")
    start = body.find(delimiter)
    if start < 0:
        raise DicomWebError("multipart response without its boundary")
    parts: list[tuple[dict[str, str], bytes]] = []
    pos = start + len(delimiter)
    while not body.startswith(b"--", pos):
        line_end = body.find(b"\r\n", pos)
        end = body.find(b"\r\n" + delimiter, line_end)
        if line_end < 0 or end < 0:
            raise DicomWebError(f"multipart response ends inside part {len(parts) + 1} ({len(body)} bytes)")
        part = body[line_end + 2:end]
        split = 0 if part.startswith(b"\r\n") else part.find(b"\r\n\r\n")
        if split < 0:
            raise DicomWebError(f"multipart part {len(parts) + 1} has no header end")
        headers = {}
        for line in part[:split].decode("latin-1").split("\r\n"):
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        parts.append((headers, part[split + (2 if split == 0 else 4):]))
        pos = end + 2 + len(delimiter)
    return parts


def sop_instance_uid(data: bytes) -> str | None:
    """The SOPInstanceUID of a Part 10 instance (file meta, else the dataset), or None."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True,
                             specific_tags=["SOPInstanceUID"])
        uid = ds.file_meta.get("MediaStorageSOPInstanceUID") if hasattr(ds, "file_meta") else None
        return str(uid or ds.get("SOPInstanceUID") or "") or None
    except Exception:  # noqa: BLE001 - an unreadable part is reported by the caller as missing
        return None


def encode_instance(instance: Dataset | bytes) -> tuple[str, bytes]:
    """``(SOPInstanceUID, Part 10 bytes)`` of a pydicom Dataset (written with its file meta) or of
    bytes that already are a Part 10 file."""
    if isinstance(instance, (bytes, bytearray)):
        data = bytes(instance)
        uid = sop_instance_uid(data)
        if uid is None:
            raise ValueError("bytes given to store are not a DICOM instance with a SOPInstanceUID")
        return uid, data
    buffer = io.BytesIO()
    instance.save_as(buffer, enforce_file_format=True)
    return str(instance.SOPInstanceUID), buffer.getvalue()


@dataclass
class DicomWebClient:
    """The DICOMweb service at ``base_url`` (``http(s)://host:port/path``)."""

    base_url: str
    timeout: tuple[float, float] = TIMEOUT_S
    session: requests.Session = field(default_factory=_new_session, repr=False, compare=False)

    # ----- QIDO-RS ------------------------------------------------------------------------------

    def search(self, path: str, params: dict[str, str] | None = None, *, what: str) -> list[dict]:
        """Every match of a QIDO-RS query (``path`` below the base, e.g. ``studies``), page by page."""
        results: list[dict] = []
        seen: set[str] = set()
        offset = 0
        while True:
            query = {**(params or {}), "limit": str(QIDO_PAGE), "offset": str(offset)}
            response = self._get(path, query, DICOM_JSON, what=what)
            page = json.loads(response.content) if response.status_code != 204 and response.content else []
            keys = [json.dumps(item, sort_keys=True) for item in page]
            new = [item for item, key in zip(page, keys) if key not in seen]
            results += new
            seen.update(keys)
            # More when the page was full or the server warns that it cut the results (PS3.18);
            # a server that ignores offset repeats its page: stop there.
            more = len(page) >= QIDO_PAGE or "additional results" in response.headers.get("Warning", "").lower()
            if not page or not new or not more:
                return results
            offset += len(page)

    def probe(self, what: str) -> None:
        """One QIDO-RS search for a single study: returns when the service answers; a wrong
        service path is FileNotFoundError (404), an unreachable one a transient error."""
        self._get("studies", {"limit": "1"}, DICOM_JSON, what=what)

    def studies(self, study_uid: str | None = None) -> list[dict]:
        """Studies with their ModalitiesInStudy (a server that does not compute it leaves it out)."""
        params = {"StudyInstanceUID": check_uid(study_uid, "study")} if study_uid else None
        return self.search("studies", {**(params or {}), "includefield": TAG_MODALITIES_IN_STUDY},
                           what="searching studies")

    def series(self, study_uid: str, series_uid: str | None = None) -> list[dict]:
        params = {"SeriesInstanceUID": check_uid(series_uid, "series")} if series_uid else None
        return self.search(f"studies/{check_uid(study_uid, 'study')}/series",
                           {**(params or {}), "includefield": TAG_MODALITY}, what=f"searching series of study {study_uid}")

    def instances(self, study_uid: str, series_uid: str, sop_uid: str | None = None) -> list[dict]:
        params = {"SOPInstanceUID": check_uid(sop_uid, "SOP instance")} if sop_uid else None
        path = f"studies/{check_uid(study_uid, 'study')}/series/{check_uid(series_uid, 'series')}/instances"
        return self.search(path, {**(params or {}), "includefield": TAG_INSTANCE_NUMBER},
                           what=f"searching instances of series {series_uid}")

    # ----- WADO-RS ------------------------------------------------------------------------------

    def retrieve(self, study_uid: str, series_uid: str, sop_uid: str | None = None) -> dict[str, bytes]:
        """``{SOPInstanceUID: Part 10 bytes}`` of a whole series (one request), or of one instance."""
        path = f"studies/{check_uid(study_uid, 'study')}/series/{check_uid(series_uid, 'series')}"
        if sop_uid:
            path += f"/instances/{check_uid(sop_uid, 'SOP instance')}"
        what = f"retrieving {'instance ' + sop_uid if sop_uid else 'series ' + series_uid}"
        response = self._get(path, None, WADO_ACCEPT, what=what, fallback_accept=WADO_ACCEPT_DEFAULT)
        out: dict[str, bytes] = {}
        for headers, content in parse_multipart(response.content, response.headers.get("Content-Type", "")):
            kind = headers.get("content-type", "application/dicom").split(";")[0].strip().lower()
            if kind != "application/dicom":
                raise DicomWebError(f"{what}: a part of type {kind!r}, expected application/dicom")
            uid = sop_instance_uid(content)
            if uid is None:
                raise DicomWebError(f"{what}: a part that is not a DICOM instance ({len(content)} bytes)")
            out[uid] = content
        return out

    # ----- STOW-RS ------------------------------------------------------------------------------

    def store(self, instances: Sequence[tuple[str, bytes]], study_uid: str | None = None) -> tuple[set[str], dict[str, str]]:
        """POST ``[(SOPInstanceUID, Part 10 bytes)]`` in one request: (stored UIDs, {failed UID: reason}).
        An instance the response names neither as stored nor as failed counts as failed."""
        boundary = uuid.uuid4().hex
        body = io.BytesIO()
        for _, data in instances:
            body.write(b"--%s\r\nContent-Type: application/dicom\r\n\r\n" % boundary.encode())
            body.write(data)
            body.write(b"\r\n")
        body.write(b"--%s--\r\n" % boundary.encode())
        path = f"studies/{check_uid(study_uid, 'study')}" if study_uid else "studies"
        what = f"storing {len(instances)} instances"
        response = self.session.post(
            f"{self.base_url}/{path}", data=body.getvalue(), timeout=self.timeout,
            headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                     "Accept": DICOM_JSON})
        # 409 (all failed) and 202 (some failed) carry the per-instance answers in the body.
        if response.status_code not in (200, 202, 409):
            _raise_for_status(response, what)
        try:
            answer = json.loads(response.content) if response.content else {}
        except ValueError:
            answer = {}
        answer = answer[0] if isinstance(answer, list) and answer else answer if isinstance(answer, dict) else {}
        stored = {str(first_value(item, TAG_REFERENCED_SOP_UID))
                  for item in (answer.get(TAG_REFERENCED_SOPS) or {}).get("Value") or []}
        failed = {str(first_value(item, TAG_REFERENCED_SOP_UID)): _failure_reason(item)
                  for item in (answer.get(TAG_FAILED_SOPS) or {}).get("Value") or []}
        sent = [uid for uid, _ in instances]
        for uid in sent:
            if uid not in stored and uid not in failed:
                failed[uid] = f"not acknowledged by the server (HTTP {response.status_code})"
        return stored & set(sent), {uid: why for uid, why in failed.items() if uid in sent}

    # ----- plumbing -----------------------------------------------------------------------------

    def _get(self, path: str, params: dict[str, str] | None, accept: str, *, what: str,
             fallback_accept: str | None = None) -> requests.Response:
        url = f"{self.base_url}/{path}"
        response = self.session.get(url, params=params, headers={"Accept": accept}, timeout=self.timeout)
        if response.status_code == 406 and fallback_accept:
            response = self.session.get(url, params=params, headers={"Accept": fallback_accept}, timeout=self.timeout)
        _raise_for_status(response, what)
        return response


def _failure_reason(item: dict) -> str:
    code = first_value(item, TAG_FAILURE_REASON)
    names = {0x0110: "processing failure", 0x0122: "SOP class not supported", 0xA700: "out of resources",
             0xA900: "data set does not match SOP class", 0xC000: "cannot understand", 0x0111: "duplicate SOP instance",
             0x0124: "not authorized"}
    if code is None:
        return "refused (no reason given)"
    return f"failure reason 0x{int(code):04X} ({names.get(int(code), 'see PS3.18')})"


def client_for(url: str) -> DicomWebClient:
    """A client of the DICOMweb service root ``url`` (see :func:`http_base_url`)."""
    return DicomWebClient(http_base_url(url))


def batches(instances: Iterable[tuple[str, bytes]]) -> Iterable[list[tuple[str, bytes]]]:
    """Consecutive groups of at most :data:`STOW_MAX_INSTANCES` instances and about
    :data:`STOW_MAX_BYTES` bytes (a bigger instance goes alone)."""
    batch: list[tuple[str, bytes]] = []
    size = 0
    for uid, data in instances:
        if batch and (len(batch) >= STOW_MAX_INSTANCES or size + len(data) > STOW_MAX_BYTES):
            yield batch
            batch, size = [], 0
        batch.append((uid, data))
        size += len(data)
    if batch:
        yield batch
