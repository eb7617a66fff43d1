"""Model registry: versioned model cards with checksummed weights, and a champion pointer.

Layout under a registry root (a local folder or any fsspec URL such as ``s3://bucket/models``)::

    versions/{version}/manifest.json     model card: version, time, git commit, config, targets
                                          table, input spec, data fingerprint, metrics, priors,
                                          and {file: sha256} of every weight file
    versions/{version}/{files...}        weights (*.pt), folds, out-of-fold predictions, metrics
    champion.json                        {"version": ..., "updated_at": ..., "reason": ...}

Loading refuses a weight file whose sha256 differs from its manifest. Pointers and manifests are
written whole: locally through a temporary file and ``os.replace``; on object storage a PUT is
atomic per object, so readers never see half a pointer.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec

from lumbar_ray import storage
from lumbar_ray.errors import EXIT_REGISTRY, UserError

MANIFEST = "manifest.json"
CHAMPION = "champion.json"
FORMAT_VERSION = 1


class RegistryError(UserError, RuntimeError):
    """A registry is missing, malformed, or asked for something it does not hold."""

    exit_code = EXIT_REGISTRY


class ChecksumMismatchError(RegistryError):
    """A weight file's sha256 differs from the one its manifest records."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(fs: fsspec.AbstractFileSystem, path: str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def git_commit(cwd: str | os.PathLike | None = None) -> str | None:
    """The commit the code runs from, or None outside a git checkout (e.g. a shipped image)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd or Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=5, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def new_version_id(now: _dt.datetime | None = None) -> str:
    """Sortable and unique: UTC time to the second plus 4 random hex digits."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return now.strftime("v%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def parse_model_spec(spec: str) -> tuple[str, str | None]:
    """'REGISTRY@version' -> (registry, version); 'REGISTRY' -> (registry, None) = champion.

    '@' inside an s3 URL's bucket is not allowed by S3, so the last '@' separates the version.
    """
    if "@" in spec:
        root, _, version = spec.rpartition("@")
        if not root or not version:
            raise RegistryError(f"model spec {spec!r}: expected REGISTRY or REGISTRY@VERSION")
        return root, version
    return spec, None


@dataclass
class ModelRegistry:
    root: str

    def __post_init__(self) -> None:
        self.fs, self._root = storage.filesystem_for(str(self.root))
        self._root = self._root.rstrip("/")

    # --- paths -------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """A path under the registry root, as the registry's filesystem spells it (see :meth:`url`)."""
        return "/".join([self._root, *parts])

    def version_path(self, version: str, *parts: str) -> str:
        return self.path("versions", version, *parts)

    def url(self, *parts: str) -> str:
        """A path users can pass back to fsspec (keeps the protocol)."""
        return storage.to_url(self.fs, self.path(*parts))

    # --- writing -----------------------------------------------------------------------------
    def _write_atomic(self, path: str, data: bytes) -> None:
        storage.write_bytes(storage.to_url(self.fs, path), data)

    def write_json(self, path: str, payload: dict[str, Any]) -> None:
        self._write_atomic(path, json.dumps(payload, indent=2, sort_keys=True, default=str).encode())

    def read_json(self, path: str) -> dict[str, Any]:
        try:
            with self.fs.open(path, "rb") as handle:
                return json.loads(handle.read())
        except FileNotFoundError as exc:
            raise RegistryError(f"{path}: not found in registry {self.root}") from exc

    def publish(self, version: str, files: dict[str, str | os.PathLike], card: dict[str, Any],
                weight_suffixes: tuple[str, ...] = (".pt",)) -> dict[str, Any]:
        """Copy local ``files`` ({name in version dir: local path}) and write the manifest last.

        The manifest is written only after every file is in place, so a version without a
        manifest is an unfinished upload and is never listed.
        """
        checksums: dict[str, str] = {}
        for name, local_path in sorted(files.items()):
            data = Path(local_path).read_bytes()
            target = self.version_path(version, name)
            self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            with self.fs.open(target, "wb") as handle:
                handle.write(data)
            if name.endswith(weight_suffixes):
                checksums[name] = sha256_bytes(data)
        manifest = {
            **card,
            "format_version": FORMAT_VERSION,
            "version": version,
            "files": sorted(files),
            "sha256": checksums,
        }
        self.write_json(self.version_path(version, MANIFEST), manifest)
        return manifest

    # --- reading -----------------------------------------------------------------------------
    def versions(self) -> list[str]:
        base = self.path("versions")
        if not self.fs.exists(base):
            return []
        found = []
        for entry in self.fs.ls(base, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if self.fs.exists(self.version_path(name, MANIFEST)):
                found.append(name)
        return sorted(found)

    def manifest(self, version: str) -> dict[str, Any]:
        return self.read_json(self.version_path(version, MANIFEST))

    def resolve(self, version: str | None) -> str:
        """None or 'champion' -> the champion; 'latest' -> the newest; else the version itself."""
        if version in (None, "champion"):
            pointer = self.champion()
            if pointer is None:
                raise RegistryError(f"registry {self.root} has no champion; name a version (REGISTRY@VERSION)")
            return pointer["version"]
        if version == "latest":
            known = self.versions()
            if not known:
                raise RegistryError(f"registry {self.root} holds no versions")
            return known[-1]
        if not self.fs.exists(self.version_path(version, MANIFEST)):
            raise RegistryError(f"registry {self.root} has no version {version!r}")
        return version

    def fetch(self, version: str, name: str, dest_dir: str | os.PathLike) -> Path:
        """Copy one file of a version to ``dest_dir`` and verify its sha256 against the manifest."""
        manifest = self.manifest(version)
        expected = manifest.get("sha256", {}).get(name)
        if name not in manifest.get("files", []):
            raise RegistryError(f"version {version} has no file {name!r}")
        with self.fs.open(self.version_path(version, name), "rb") as handle:
            data = handle.read()
        if expected is not None and sha256_bytes(data) != expected:
            raise ChecksumMismatchError(
                f"{self.version_path(version, name)}: sha256 {sha256_bytes(data)} does not match the "
                f"manifest's {expected}; refusing to load a changed or corrupt weight file"
            )
        dest = Path(dest_dir) / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        return dest

    def verify(self, version: str) -> None:
        """Raise ChecksumMismatchError unless every weight file matches its manifest."""
        manifest = self.manifest(version)
        for name, expected in manifest.get("sha256", {}).items():
            actual = sha256_file(self.fs, self.version_path(version, name))
            if actual != expected:
                raise ChecksumMismatchError(
                    f"{self.version_path(version, name)}: sha256 {actual} != manifest {expected}"
                )

    # --- champion pointer --------------------------------------------------------------------
    def champion(self) -> dict[str, Any] | None:
        path = self.path(CHAMPION)
        if not self.fs.exists(path):
            return None
        return self.read_json(path)

    def set_champion(self, version: str, reason: str) -> dict[str, Any]:
        self.resolve(version)  # refuses unknown versions
        pointer = {
            "version": version,
            "updated_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
            "reason": reason,
        }
        self.write_json(self.path(CHAMPION), pointer)
        return pointer
