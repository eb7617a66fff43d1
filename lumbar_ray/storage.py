"""One way to reach storage: local paths and fsspec URLs (``s3://bucket/prefix``) alike.

Every function here takes a local path (``str`` or ``os.PathLike``, relative or absolute,
``file://`` allowed) or any fsspec URL, and returns paths in the same spelling the caller used:
local paths stay plain paths, URLs keep their protocol.

S3 settings come from the environment, never from code:

- credentials and region: the standard ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
  ``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION`` (or a profile, a shared credentials file, an
  instance role, as botocore finds them). Ray workers take credentials from their own node: the
  driver forwards storage settings to them, never credentials (:func:`storage_env`);
- endpoint of a non-AWS server (SeaweedFS, MinIO, Ceph, ...): ``LUMBAR_RAY_S3_ENDPOINT``, else
  ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL`` (e.g. ``http://127.0.0.1:8333``).

With s3fs the region must come from ``AWS_DEFAULT_REGION`` (not ``client_kwargs``).

Transient failures (timeouts, connection resets or refusals, HTTP 5xx, throttling) are retried
with exponential backoff and a bound (:class:`RetryPolicy`, :func:`retry_transient`); what still
fails after the last try raises :class:`~lumbar_ray.errors.StorageUnavailableError`. Permanent
failures (a missing file, no permission, bad data) are never retried.
"""

from __future__ import annotations

import builtins
import errno
import io
import logging
import os
import random
import re
import time
import uuid
from dataclasses import dataclass
from typing import IO, Any, Callable, Sequence, TypeVar

import fsspec
from fsspec import AbstractFileSystem

from lumbar_ray.errors import StorageUnavailableError, one_line

log = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = [
    "RetryPolicy",
    "READ_RETRY",
    "WRITE_RETRY",
    "is_transient",
    "retry_transient",
    "cat_files",
    "S3_ENDPOINT_ENV_VARS",
    "STORAGE_ENV_VARS",
    "STORAGE_ENV_PREFIXES",
    "SECRET_ENV_NAME",
    "is_forwarded_env_var",
    "storage_env",
    "ray_remote_args_with_storage_env",
    "is_url",
    "s3_endpoint",
    "storage_options_for",
    "filesystem_for",
    "to_url",
    "join",
    "exists",
    "isdir",
    "open",
    "read_bytes",
    "write_bytes",
    "create_exclusive",
    "remove",
    "makedirs",
    "listdir",
    "glob",
    "read_csv",
    "ray_storage",
]

# Looked up in this order; the first one set wins.
S3_ENDPOINT_ENV_VARS: tuple[str, ...] = ("LUMBAR_RAY_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
_S3_PROTOCOLS = ("s3", "s3a")


# --------------------------------------------------------------------------------------------
# Transient failures: classified, retried with backoff, bounded


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry a storage call that failed transiently: ``attempts``
    tries in all, waiting ``min(max_s, base_s * 2**i)`` times a random factor in [0.5, 1]
    (jitter, so that many workers hit by one outage do not come back in step) before try i+2."""

    attempts: int
    base_s: float
    max_s: float

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.base_s < 0 or self.max_s < 0:
            raise ValueError(f"a retry policy needs attempts >= 1 and delays >= 0, not {self}")

    def delay(self, retry: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (0 = the first retry)."""
        return min(self.max_s, self.base_s * 2.0**retry) * (rng or random).uniform(0.5, 1.0)

    def from_env(self, prefix: str) -> "RetryPolicy":
        """This policy with ``{prefix}ATTEMPTS``, ``{prefix}BASE_S`` and ``{prefix}MAX_S`` from the
        environment where set (the ``LUMBAR_RAY_S3_`` names travel to Ray workers: storage_env)."""
        values: dict[str, Any] = {}
        for name, kind in (("attempts", int), ("base_s", float), ("max_s", float)):
            var = f"{prefix}{name.upper()}"
            text = os.environ.get(var, "").strip()
            if text:
                try:
                    values[name] = kind(text)
                except ValueError:
                    raise ValueError(f"{var}={text!r} is not a{'n integer' if kind is int else ' number'}") from None
        return RetryPolicy(**{"attempts": self.attempts, "base_s": self.base_s, "max_s": self.max_s, **values})


# Reads: five tries over ~8-15 s of waits (on top of botocore's own retries of each request)
# ride out a gateway restart or a burst of throttling, while a dead endpoint still fails a study
# within about half a minute instead of holding its read task; such a study is recorded as
# retryable and the next run scores it. Env: LUMBAR_RAY_S3_RETRY_{ATTEMPTS,BASE_S,MAX_S}.
READ_RETRY = RetryPolicy(attempts=5, base_s=1.0, max_s=8.0)
# Writes wait longer (~1.5 min): a part file that cannot be written stops the run and throws away
# the work of the studies it holds, which a read failure (one study) does not.
# Env: LUMBAR_RAY_S3_WRITE_RETRY_{ATTEMPTS,BASE_S,MAX_S}.
WRITE_RETRY = RetryPolicy(attempts=8, base_s=1.0, max_s=16.0)
READ_RETRY_ENV = "LUMBAR_RAY_S3_RETRY_"
WRITE_RETRY_ENV = "LUMBAR_RAY_S3_WRITE_RETRY_"

# By class name (anywhere in the class's MRO), so that this base layer needs neither botocore nor
# aiohttp: connection and read failures of botocore, aiohttp, urllib3 and fsspec.
_TRANSIENT_TYPES = frozenset({
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "ResponseStreamingError", "IncompleteReadError", "ProxyConnectionError", "HTTPClientError",
    "ClientConnectionError", "ClientPayloadError", "ServerDisconnectedError", "ServerTimeoutError",
    "IncompleteRead", "ProtocolError", "FSTimeoutError",
})
# S3 error codes that say "later", whatever the HTTP status.
_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeoutException",
    "InternalError", "ServiceUnavailable", "TooManyRequests", "TooManyRequestsException",
    "RequestLimitExceeded", "BandwidthLimitExceeded", "RequestThrottled",
})
# What s3fs turns 5xx and SlowDown into (OSError with these errno values), and socket failures.
_TRANSIENT_ERRNOS = frozenset({
    errno.EBUSY, errno.EREMOTEIO, errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED,
    errno.ETIMEDOUT, errno.EPIPE, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EAGAIN,
})
_PERMANENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)


def _transient_response(exc: BaseException) -> bool:
    """A botocore ClientError (or anything carrying its ``response``) for HTTP 5xx, 429 or a
    throttling code."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return False
    code = str((response.get("Error") or {}).get("Code") or "")
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    return code in _TRANSIENT_CODES or (isinstance(status, int) and (status >= 500 or status == 429))


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` (or what caused it) says storage may answer if asked again: a timeout,
    a reset or refused connection, HTTP 5xx, throttling. False for permanent failures (missing
    file, no permission, bad data) and anything unknown: retrying those would only hide them."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, StorageUnavailableError):
            return True
        if isinstance(current, _PERMANENT):
            return False
        if isinstance(current, (ConnectionError, TimeoutError)):
            return True
        if any(k.__name__ in _TRANSIENT_TYPES for k in type(current).__mro__) or _transient_response(current):
            return True
        if isinstance(current, OSError) and current.errno in _TRANSIENT_ERRNOS:
            return True
        current = current.__cause__ or current.__context__
    return False


def _give_up(what: str, tries: int, started: float, last: BaseException) -> StorageUnavailableError:
    return StorageUnavailableError(
        f"{what}: storage kept failing with transient errors ({tries} tries over {time.monotonic() - started:.1f} s; "
        f"last: {type(last).__name__}: {one_line(last)[:300]}); rerun the same command when storage is healthy")


def retry_transient(fn: Callable[..., T], *args: Any, what: str, policy: RetryPolicy | None = None,
                    sleep: Callable[[float], None] = time.sleep, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``, retried while it fails transiently (:func:`is_transient`) up to
    ``policy.attempts`` tries (default :data:`READ_RETRY`, environment overrides applied).
    A permanent error is raised at once, as it is; transient failures past the last try raise
    :class:`StorageUnavailableError` (naming ``what`` and the last error)."""
    policy = policy or READ_RETRY.from_env(READ_RETRY_ENV)
    started = time.monotonic()
    for attempt in range(policy.attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if not is_transient(exc) or isinstance(exc, StorageUnavailableError):
                raise
            if attempt + 1 >= policy.attempts:
                raise _give_up(what, policy.attempts, started, exc) from exc
            wait = policy.delay(attempt)
            log.warning("%s: transient %s (%s); try %d of %d in %.1f s", what, type(exc).__name__,
                        one_line(exc)[:200], attempt + 2, policy.attempts, wait)
            sleep(wait)
    raise AssertionError("unreachable: the loop returns or raises")  # pragma: no cover


def cat_files(fs: AbstractFileSystem, paths: Sequence[str], *, what: str, policy: RetryPolicy | None = None,
              sleep: Callable[[float], None] = time.sleep) -> dict[str, bytes | BaseException]:
    """The contents of ``paths`` of ``fs`` (fetched concurrently where the file system can),
    as ``{path: bytes}``, or ``{path: exception}`` for a file that failed permanently (e.g.
    FileNotFoundError). Files that failed transiently are fetched again, with backoff, up to
    ``policy.attempts`` rounds; if any still fails transiently, :class:`StorageUnavailableError`:
    a caller never gets a partial set of files because storage had a bad moment."""
    policy = policy or READ_RETRY.from_env(READ_RETRY_ENV)
    started = time.monotonic()
    results: dict[str, bytes | BaseException] = {}
    pending = list(paths)
    for attempt in range(policy.attempts):
        failed: list[tuple[str, BaseException]] = []
        for path, value in _cat_round(fs, pending).items():
            if isinstance(value, BaseException) and is_transient(value):
                failed.append((path, value))
            else:
                results[path] = value
        if not failed:
            return results
        if attempt + 1 >= policy.attempts:
            raise _give_up(f"{what} ({len(failed)} of {len(paths)} files, e.g. {to_url(fs, failed[0][0])})",
                           policy.attempts, started, failed[0][1]) from failed[0][1]
        pending = [path for path, _ in failed]
        wait = policy.delay(attempt)
        log.warning("%s: %d files failed transiently (%s); try %d of %d in %.1f s", what, len(failed),
                    type(failed[0][1]).__name__, attempt + 2, policy.attempts, wait)
        sleep(wait)
    raise AssertionError("unreachable: the loop returns or raises")  # pragma: no cover


def _cat_round(fs: AbstractFileSystem, paths: list[str]) -> dict[str, bytes | BaseException]:
    """One ``fs.cat`` over ``paths`` with each file's error returned, keyed by the given paths.
    An error of the call as a whole (e.g. while expanding the paths) counts for every file."""
    if not paths:
        return {}
    try:
        contents = fs.cat(paths, on_error="return")
    except Exception as exc:
        if not is_transient(exc):
            raise
        return {path: exc for path in paths}
    if not isinstance(contents, dict):
        contents = {paths[0]: contents}
    out: dict[str, bytes | BaseException] = {}
    for path in paths:
        value = contents.get(path)
        if value is None:
            value = contents.get(fs._strip_protocol(path), FileNotFoundError(path))
        out[path] = value
    return out


def _as_str(path_or_url: str | os.PathLike) -> str:
    return os.fspath(path_or_url)


def _protocol(path_or_url: str) -> str | None:
    if "://" not in path_or_url:
        return None
    return path_or_url.split("://", 1)[0].lower()


def is_url(path_or_url: str | os.PathLike) -> bool:
    """True for ``proto://...`` other than ``file://`` (which is a local path)."""
    proto = _protocol(_as_str(path_or_url))
    return proto is not None and proto not in ("file", "local")


def s3_endpoint() -> str | None:
    """The S3 endpoint URL from the environment (see module doc), or None for AWS itself."""
    for var in S3_ENDPOINT_ENV_VARS:
        value = os.environ.get(var, "").strip()
        if value:
            return value
    return None


def storage_options_for(path_or_url: str | os.PathLike) -> dict[str, Any]:
    """fsspec options for this path taken from the environment (only S3 needs any)."""
    proto = _protocol(_as_str(path_or_url))
    if proto in _S3_PROTOCOLS:
        endpoint = s3_endpoint()
        return {"endpoint_url": endpoint} if endpoint else {}
    return {}


def filesystem_for(path_or_url: str | os.PathLike, **storage_options: Any) -> tuple[AbstractFileSystem, str]:
    """``(filesystem, path without protocol)`` for a local path or an fsspec URL.

    ``storage_options`` override what the environment gives (e.g. ``endpoint_url=``, ``key=``).
    Local paths come back absolute.
    """
    text = _as_str(path_or_url)
    options = {**storage_options_for(text), **storage_options}
    fs, path = fsspec.core.url_to_fs(text, **options)
    return fs, path


def _is_local(fs: AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def to_url(fs: AbstractFileSystem, path: str) -> str:
    """Put the protocol back on a path of ``fs`` (local paths stay plain paths)."""
    if _is_local(fs):
        return path
    return fs.unstrip_protocol(path)


def join(base: str | os.PathLike, *parts: str | os.PathLike) -> str:
    """Join path parts below ``base``; URLs with ``/``, local paths with :func:`os.path.join`."""
    text = _as_str(base)
    names = [_as_str(p) for p in parts]
    if is_url(text):
        out = text.rstrip("/")
        for name in names:
            name = name.strip("/")
            if name:
                out = f"{out}/{name}"
        return out
    return os.path.join(text, *names)


def exists(path_or_url: str | os.PathLike) -> bool:
    fs, path = filesystem_for(path_or_url)
    return retry_transient(fs.exists, path, what=f"checking {_as_str(path_or_url)}")


def isdir(path_or_url: str | os.PathLike) -> bool:
    fs, path = filesystem_for(path_or_url)
    return retry_transient(fs.isdir, path, what=f"checking {_as_str(path_or_url)}")


def open(path_or_url: str | os.PathLike, mode: str = "rb", **kwargs: Any) -> IO:  # noqa: A001 - mirrors fsspec
    """Open a file for reading or writing (a context manager, as :func:`fsspec.open`)."""
    fs, path = filesystem_for(path_or_url)
    if "w" in mode and _is_local(fs):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    return fs.open(path, mode, **kwargs)


def read_bytes(path_or_url: str | os.PathLike) -> bytes:
    fs, path = filesystem_for(path_or_url)
    return retry_transient(fs.cat_file, path, what=f"reading {_as_str(path_or_url)}")


def write_bytes(path_or_url: str | os.PathLike, data: bytes) -> str:
    """Write ``data``; local files atomically (temporary file + :func:`os.replace`).

    Object stores make a single PUT visible all at once, so remote writes are atomic too, and
    one that failed transiently is sent again (:data:`WRITE_RETRY`: a PUT of the same bytes is
    idempotent). Returns the path as given.
    """
    text = _as_str(path_or_url)
    fs, path = filesystem_for(text)
    if _is_local(fs):
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            with builtins.open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    else:
        retry_transient(fs.pipe_file, path, data, what=f"writing {text}", policy=WRITE_RETRY.from_env(WRITE_RETRY_ENV))
    return text


def create_exclusive(path_or_url: str | os.PathLike, data: bytes) -> bool:
    """Create a file holding ``data`` only if none exists: True if this call created it, False if
    the file was already there. Exclusive on every backend we use: ``O_EXCL`` locally,
    ``If-None-Match: *`` on S3 (one of several concurrent creators wins).

    A try that failed transiently is made again; if the file then exists, a lost answer may have
    hidden that the earlier try created it, so it counts as ours when it holds exactly ``data``
    (callers put something unique in it: a run id, a time)."""
    fs, path = filesystem_for(path_or_url)
    if _is_local(fs):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    uncertain = False

    def attempt() -> bool:
        nonlocal uncertain
        try:
            created = _create_once(fs, path, data)
        except Exception as exc:
            uncertain = uncertain or is_transient(exc)
            raise
        if created or not uncertain:
            return created
        try:
            return fs.cat_file(path) == data
        except FileNotFoundError:  # created by an earlier try, then removed by its next holder
            return False

    return retry_transient(attempt, what=f"creating {_as_str(path_or_url)}", policy=WRITE_RETRY.from_env(WRITE_RETRY_ENV))


def _create_once(fs: AbstractFileSystem, path: str, data: bytes) -> bool:
    try:
        with fs.open(path, "xb") as handle:
            handle.write(data)
    except FileExistsError:
        return False
    except OSError as exc:
        # s3fs reports a failed If-None-Match (HTTP 412) as OSError "pre-conditions ... did not
        # hold"; any other OSError is a real failure.
        if "pre-condition" in str(exc).lower():
            return False
        raise
    return True


def remove(path_or_url: str | os.PathLike) -> None:
    """Delete one file; one that is not there is not an error."""
    fs, path = filesystem_for(path_or_url)
    try:
        retry_transient(fs.rm_file, path, what=f"removing {_as_str(path_or_url)}", policy=WRITE_RETRY.from_env(WRITE_RETRY_ENV))
    except FileNotFoundError:
        pass


def makedirs(path_or_url: str | os.PathLike) -> None:
    """Create a folder (no-op on object stores, where folders are only key prefixes)."""
    fs, path = filesystem_for(path_or_url)
    if _is_local(fs):
        os.makedirs(path, exist_ok=True)


def listdir(path_or_url: str | os.PathLike, *, dirs: bool | None = None) -> list[str]:
    """Sorted entry names (not paths) directly inside a folder.

    ``dirs=True``: folders only; ``dirs=False``: files only; ``None``: both.
    Raises FileNotFoundError when the folder does not exist.
    """
    fs, path = filesystem_for(path_or_url)
    path = path.rstrip("/") or "/"
    entries = retry_transient(fs.ls, path, detail=True, what=f"listing {_as_str(path_or_url)}")
    names = []
    for entry in entries:
        is_dir = entry.get("type") == "directory"
        if dirs is not None and is_dir != dirs:
            continue
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if name and entry["name"].rstrip("/") != path:
            names.append(name)
    return sorted(set(names))


def glob(pattern: str | os.PathLike) -> list[str]:
    """Sorted matches of a glob pattern, spelled like the pattern (URLs keep their protocol)."""
    text = _as_str(pattern)
    fs, path = filesystem_for(text)
    matches = sorted(retry_transient(fs.glob, path, what=f"listing {text}"))
    if is_url(text):
        return [fs.unstrip_protocol(m) for m in matches]
    return matches


def read_csv(path_or_url: str | os.PathLike, **kwargs: Any):
    """:func:`pandas.read_csv` through the file system (compression inferred from the name)."""
    import pandas as pd  # heavy (~0.3 s): the base layer stays cheap for what needs no frames

    text = _as_str(path_or_url)
    compression = kwargs.pop("compression", "infer")
    if compression == "infer":
        lowered = text.lower()
        compression = next(
            (c for ext, c in ((".gz", "gzip"), (".bz2", "bz2"), (".zip", "zip"), (".xz", "xz"), (".zst", "zstd")) if lowered.endswith(ext)),
            None,
        )
    return pd.read_csv(io.BytesIO(read_bytes(text)), compression=compression, **kwargs)


# What the driver forwards to its Ray tasks and actors, so that workers started before these were
# set (a long-running cluster, a test's runtime) reach the same storage: settings only, never
# credentials. An allow-list of names that say where storage is and where a node finds its
# credentials (endpoint, region, profile name, the path of a shared credentials/config file), and
# on top of it a deny-list by name pattern, so that a secret never travels even if it is added to
# the allow-list by mistake or hides under the ``LUMBAR_RAY_S3_`` prefix. Whatever travels in a
# runtime env is written in plain text into the session's logs (runtime env agent, Ray Data) and
# shown by the state API and the dashboard. Workers get credentials as botocore finds them on their
# node: its environment, a mounted credentials file, an instance role.
STORAGE_ENV_VARS: tuple[str, ...] = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_CA_BUNDLE",
    "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE",
)
STORAGE_ENV_PREFIXES: tuple[str, ...] = ("LUMBAR_RAY_S3_",)
# Names that hold (or point at) a secret: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
# AWS_SESSION_TOKEN, AWS_SECURITY_TOKEN, AWS_WEB_IDENTITY_TOKEN_FILE, ... Never forwarded.
SECRET_ENV_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|KEY", re.IGNORECASE)


def is_forwarded_env_var(name: str) -> bool:
    """True for a storage setting that may travel in a runtime env (see :data:`STORAGE_ENV_VARS`)."""
    allowed = name in STORAGE_ENV_VARS or name.startswith(STORAGE_ENV_PREFIXES)
    return allowed and not SECRET_ENV_NAME.search(name)


def storage_env() -> dict[str, str]:
    """The storage settings of this process's environment that may travel to Ray workers: no
    credentials (see :data:`STORAGE_ENV_VARS` and :data:`SECRET_ENV_NAME`)."""
    return {k: v for k, v in os.environ.items() if is_forwarded_env_var(k)}


def ray_remote_args_with_storage_env(**remote_args: Any) -> dict[str, Any]:
    """``ray_remote_args`` that carry :func:`storage_env` in the runtime env (nothing if empty)."""
    env = storage_env()
    if env:
        runtime_env = dict(remote_args.pop("runtime_env", None) or {})
        runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **env}
        remote_args["runtime_env"] = runtime_env
    return remote_args


def ray_storage(path_or_url: str | os.PathLike) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` for Ray Train/Tune's ``RunConfig``.

    Local paths pass through (filesystem None: Ray picks its local one). For a URL, Ray would
    build its own pyarrow filesystem from the URL alone and miss this module's settings (the
    S3 endpoint of a non-AWS server), so it gets the same fsspec filesystem as everything else,
    wrapped for pyarrow, and the path without the protocol.
    """
    text = _as_str(path_or_url)
    if not is_url(text):
        return text, None
    import pyarrow.fs as pafs  # heavy: only Ray Train's remote storage needs it

    fs, path = filesystem_for(text)
    return path, pafs.PyFileSystem(pafs.FSSpecHandler(fs))
