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
"""

from __future__ import annotations

import builtins
import os
import re
import uuid
from typing import IO, Any

import fsspec
from fsspec import AbstractFileSystem

__all__ = [
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
    return fs.exists(path)


def isdir(path_or_url: str | os.PathLike) -> bool:
    fs, path = filesystem_for(path_or_url)
    return fs.isdir(path)


def open(path_or_url: str | os.PathLike, mode: str = "rb", **kwargs: Any) -> IO:  # noqa: A001 - mirrors fsspec
    """Open a file for reading or writing (a context manager, as :func:`fsspec.open`)."""
    fs, path = filesystem_for(path_or_url)
    if "w" in mode and _is_local(fs):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    return fs.open(path, mode, **kwargs)


def read_bytes(path_or_url: str | os.PathLike) -> bytes:
    fs, path = filesystem_for(path_or_url)
    return fs.cat_file(path)


def write_bytes(path_or_url: str | os.PathLike, data: bytes) -> str:
    """Write ``data``; local files atomically (temporary file + :func:`os.replace`).

    Object stores make a single PUT visible all at once, so remote writes are atomic too.
    Returns the path as given.
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
        fs.pipe_file(path, data)
    return text


def create_exclusive(path_or_url: str | os.PathLike, data: bytes) -> bool:
    """Create a file holding ``data`` only if none exists: True if this call created it, False if
    the file was already there. Exclusive on every backend we use: ``O_EXCL`` locally,
    ``If-None-Match: *`` on S3 (one of several concurrent creators wins)."""
    fs, path = filesystem_for(path_or_url)
    if _is_local(fs):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
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
        fs.rm_file(path)
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
    entries = fs.ls(path, detail=True)
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
    matches = sorted(fs.glob(path))
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
    with open(text, "rb") as f:
        return pd.read_csv(f, compression=compression, **kwargs)


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
