"""A PACS seen through DICOMweb as a read-only fsspec file system in the project's Kaggle layout.

``dicomweb://HOST:PORT/PATH`` (``dicomwebs://`` for HTTPS; PATH is the DICOMweb service root,
e.g. ``/dicom-web``) is a data root like a local folder or ``s3://bucket/prefix``::

    {root}/{split}_images/                        the studies (QIDO-RS), named by StudyInstanceUID
    {root}/{split}_images/{study}/                its image series (QIDO-RS), by SeriesInstanceUID
    {root}/{split}_images/{study}/{series}/       its instances (QIDO-RS), as {SOPInstanceUID}.dcm

A PACS has no splits: every ``{split}_images`` shows all its studies. There is no
``{split}_series_descriptions.csv``, so the reader types each series from its headers
(SeriesDescription, then geometry), as for any folder without that file. Files are named by
SOPInstanceUID, not InstanceNumber, because that is what WADO-RS fetches by and it is unique;
the reader takes the instance number from the header (:mod:`lumbar_ray.dicom.files`). Series
of non-image modalities (structured reports, presentation states, key-object selections:
:data:`NON_IMAGE_MODALITIES`; the reports ``export-sr`` stores back among them) are left out of a
study's listing: they are not part of the images layout, and reading them would only add
"not an image" notes to every study scored again. Likewise a study whose ModalitiesInStudy
holds no MR (a CT, a radiograph; :data:`SCORED_MODALITIES`) is left out of a split's listing,
with a warning that counts them by modality: scoring it would fetch every image only to find no
lumbar MRI series. A study the server gives no ModalitiesInStudy for is listed.

Reading: :meth:`DicomWebFileSystem.cat` groups the paths by series and fetches each series in one
WADO-RS request (one request per instance when only a few of a series' instances are asked for).
Sizes are unknown before a fetch (``size`` None). Errors are those of
:mod:`lumbar_ray.dicomweb.client`: transient ones propagate for the caller's bounded retries
(:func:`lumbar_ray.storage.retry_transient`, :func:`lumbar_ray.storage.cat_files`), a missing
study, series or instance is FileNotFoundError. Writing is not supported here (STOW-RS:
:func:`lumbar_ray.dicomweb.store_instances`).

Registered through the ``fsspec.specs`` entry points of ``pyproject.toml``, so that
``fsspec.url_to_fs("dicomweb://…")`` finds it in every process, Ray workers included, without an
import for its side effect.
"""

from __future__ import annotations

import io
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from fsspec import AbstractFileSystem
from fsspec.utils import stringify_path

from lumbar_ray.dicomweb.client import (
    TAG_MODALITIES_IN_STUDY,
    TAG_MODALITY,
    TAG_SERIES_UID,
    TAG_SOP_UID,
    TAG_STUDY_UID,
    DicomWebClient,
    all_values,
    first_value,
    http_base_url,
)

log = logging.getLogger(__name__)

__all__ = ["DicomWebFileSystem", "DicomWebsFileSystem", "Location", "NON_IMAGE_MODALITIES", "SCORED_MODALITIES",
           "IMAGES_SUFFIX", "scored_study_uids"]

IMAGES_SUFFIX = "_images"
DEFAULT_SPLIT = "test"  # what the root lists: the split `lumbar-ray score` reads by default
# Modalities of series that hold no images (PS3.3 C.7.3.1.1.1).
NON_IMAGE_MODALITIES = frozenset({"SR", "PR", "KO", "DOC", "REG", "RTSTRUCT", "RTPLAN", "RTRECORD", "AU", "ECG"})
# A study is listed when its ModalitiesInStudy names one of these (the models read MR series only).
SCORED_MODALITIES = frozenset({"MR"})
INSTANCE_SUFFIX = ".dcm"
_FETCH_THREADS = 4  # series fetched at once by one cat() over several series
# Names of files a data root may hold (the descriptions CSV, labels): such a name under a service
# root is a file of that root, not a root itself.
_FILE_EXTENSIONS = (".csv", ".csv.gz", ".parquet", ".json", ".txt", ".dcm")


@dataclass(frozen=True)
class Location:
    """What a path of the file system names. ``base`` is ``host:port/service-path``; the rest is
    set as deep as the path goes. ``other``: a name under the root that is not ``{split}_images``
    (e.g. a descriptions CSV), which a PACS never holds."""

    base: str
    split: str | None = None
    study: str | None = None
    series: str | None = None
    instance: str | None = None
    other: str | None = None

    @property
    def level(self) -> str:
        if self.other is not None:
            return "other"
        for name in ("instance", "series", "study", "split"):
            if getattr(self, name) is not None:
                return name
        return "root"

    def images(self) -> str:
        return f"{self.base}/{self.split}{IMAGES_SUFFIX}"

    def path(self) -> str:
        """The file-system path of this location."""
        if self.other is not None:
            return f"{self.base}/{self.other}"
        out = self.base if self.split is None else self.images()
        for part in (self.study, self.series):
            if part is not None:
                out = f"{out}/{part}"
        return out if self.instance is None else f"{out}/{self.instance}{INSTANCE_SUFFIX}"


def parse_path(path: str) -> Location:
    """The :class:`Location` of a path without protocol (``host:port/service/...``). The layout
    starts at the last ``{split}_images`` component within the last four (study, series and
    instance below it); a last component with a file extension and no such folder above it is a
    file directly under the root; anything else is a service root."""
    parts = [p for p in path.strip("/").split("/") if p]
    if not parts:
        raise FileNotFoundError(f"a DICOMweb path needs a host: {path!r}")
    for i in range(len(parts) - 1, max(0, len(parts) - 5), -1):
        if parts[i].endswith(IMAGES_SUFFIX) and len(parts[i]) > len(IMAGES_SUFFIX):
            rest = parts[i + 1:]
            instance = None
            if len(rest) == 3:
                if not rest[2].endswith(INSTANCE_SUFFIX):
                    raise FileNotFoundError(f"{path}: instances are named SOPINSTANCEUID{INSTANCE_SUFFIX}")
                instance = rest[2][: -len(INSTANCE_SUFFIX)]
            return Location("/".join(parts[:i]), parts[i][: -len(IMAGES_SUFFIX)], *(rest[:2] + [None] * (2 - len(rest[:2]))),
                            instance=instance)
    if len(parts) > 1 and parts[-1].lower().endswith(_FILE_EXTENSIONS):
        return Location("/".join(parts[:-1]), other=parts[-1])
    return Location("/".join(parts))


def scored_study_uids(studies: list[dict]) -> tuple[set[str], dict[str, str]]:
    """(StudyInstanceUIDs to list, {StudyInstanceUID: its modalities} of those left out) of a
    QIDO-RS study search: a study is left out when its ModalitiesInStudy is given and names none
    of :data:`SCORED_MODALITIES`."""
    listed: set[str] = set()
    left_out: dict[str, str] = {}
    for item in studies:
        uid = first_value(item, TAG_STUDY_UID)
        if not uid:
            continue
        modalities = {str(m).upper() for m in all_values(item, TAG_MODALITIES_IN_STUDY) if m}
        if modalities and not modalities & SCORED_MODALITIES:
            left_out[uid] = "/".join(sorted(modalities))
        else:
            listed.add(uid)
    return listed, left_out


def _dir(name: str) -> dict[str, Any]:
    return {"name": name, "type": "directory", "size": 0}


def _file(name: str) -> dict[str, Any]:
    return {"name": name, "type": "file", "size": None}


class DicomWebFileSystem(AbstractFileSystem):
    """``dicomweb://`` (plain HTTP); :class:`DicomWebsFileSystem` is the HTTPS twin."""

    protocol = "dicomweb"
    http_scheme = "http"
    root_marker = ""
    # Sent as one request: a group of a series' instances at least this share of the series.
    series_share = 0.5

    def __init__(self, *args: Any, **storage_options: Any):
        super().__init__(*args, **storage_options)
        self._clients: dict[str, DicomWebClient] = {}
        self._series_sizes: dict[tuple[str, str, str], int] = {}  # instances seen by the last ls

    # ----- paths and clients --------------------------------------------------------------------

    def _location(self, path: str) -> Location:
        return parse_path(self._strip_protocol(stringify_path(path)))

    def client(self, base: str) -> DicomWebClient:
        """The client of the service at ``base`` (``host:port/path``), one per service."""
        if base not in self._clients:
            self._clients[base] = DicomWebClient(http_base_url(f"{self.http_scheme}://{base}"))
        return self._clients[base]

    # ----- listing ------------------------------------------------------------------------------

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list:
        loc = self._location(path)
        entries = self._entries(loc)
        return entries if detail else [e["name"] for e in entries]

    def _entries(self, loc: Location) -> list[dict[str, Any]]:
        client = self.client(loc.base)
        if loc.level == "root":
            self.info(loc.path())  # the service answers, or the error says why not
            return [_dir(f"{loc.base}/{DEFAULT_SPLIT}{IMAGES_SUFFIX}")]
        if loc.level == "split":
            uids, left_out = scored_study_uids(client.studies())
            if left_out:
                counts = Counter(left_out.values())
                log.warning("%s: %d studies left out, none of them holds an MR series (ModalitiesInStudy: %s)",
                            loc.path(), len(left_out), ", ".join(f"{m} {n}" for m, n in sorted(counts.items())))
                log.debug("%s: studies left out: %s", loc.path(), sorted(left_out))
            return [_dir(f"{loc.images()}/{uid}") for uid in sorted(uids)]
        if loc.level == "study":
            found = client.series(loc.study)
            if not found and not client.studies(loc.study):
                raise FileNotFoundError(f"{loc.path()}: no such study")
            names = set()
            for item in found:
                modality = str(first_value(item, TAG_MODALITY) or "").upper()
                uid = first_value(item, TAG_SERIES_UID)
                if uid and modality in NON_IMAGE_MODALITIES:
                    log.debug("%s: series %s left out (modality %s holds no images)", loc.path(), uid, modality)
                elif uid:
                    names.add(uid)
            return [_dir(f"{loc.path()}/{uid}") for uid in sorted(names)]
        if loc.level == "series":
            found = client.instances(loc.study, loc.series)
            if not found and not client.series(loc.study, loc.series):
                raise FileNotFoundError(f"{loc.path()}: no such series")
            uids = sorted({u for u in (first_value(item, TAG_SOP_UID) for item in found) if u})
            self._series_sizes[(loc.base, loc.study, loc.series)] = len(uids)
            return [_file(f"{loc.path()}/{uid}{INSTANCE_SUFFIX}") for uid in uids]
        return [self.info(loc.path())]

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        loc = self._location(path)
        client = self.client(loc.base)
        level = loc.level
        if level == "other":
            raise FileNotFoundError(f"{loc.path()}: a PACS holds only {{split}}{IMAGES_SUFFIX}/")
        if level in ("root", "split"):
            client.probe(what=f"reaching {loc.path()}")
            return _dir(loc.path())
        if level == "study":
            found = client.studies(loc.study)
        elif level == "series":
            found = client.series(loc.study, loc.series)
        else:
            found = client.instances(loc.study, loc.series, loc.instance)
        if not found:
            raise FileNotFoundError(f"{loc.path()}: no such {level}")
        return _file(loc.path()) if level == "instance" else _dir(loc.path())

    def exists(self, path: str, **kwargs: Any) -> bool:
        """Whether ``path`` is there. Unlike fsspec's default, only "not there" is False: a
        server that does not answer raises (for the caller's retries), a refusal too."""
        try:
            self.info(path)
            return True
        except (FileNotFoundError, ValueError):
            return False

    def isdir(self, path: str) -> bool:
        try:
            return self.info(path)["type"] == "directory"
        except (FileNotFoundError, ValueError):
            return False

    def isfile(self, path: str) -> bool:
        try:
            return self.info(path)["type"] == "file"
        except (FileNotFoundError, ValueError):
            return False

    # ----- reading ------------------------------------------------------------------------------

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        loc = self._location(path)
        if loc.level != "instance":
            raise IsADirectoryError(path) if loc.level in ("root", "split", "study", "series") else FileNotFoundError(path)
        found = self.client(loc.base).retrieve(loc.study, loc.series, loc.instance)
        if loc.instance not in found:
            raise FileNotFoundError(f"{loc.path()}: the server sent no such instance")
        return found[loc.instance][start:end]

    def cat(self, path, recursive: bool = False, on_error: str = "raise", **kwargs: Any):
        """The contents of one path (bytes) or of several (``{path: bytes}``, or with
        ``on_error="return"`` an exception as the value of each path that failed): each series
        in one WADO-RS request, several series at once."""
        if recursive or any(self._has_magic(p) for p in ([path] if isinstance(path, str) else path)):
            return super().cat(path, recursive=recursive, on_error=on_error, **kwargs)
        if isinstance(path, str):
            return self.cat_file(path)
        names = [self._strip_protocol(stringify_path(p)) for p in path]
        groups: dict[tuple[str, str, str], list[tuple[str, Location]]] = {}
        out: dict[str, bytes | BaseException] = {}
        for name in names:
            try:
                loc = parse_path(name)
            except FileNotFoundError as exc:
                out[name] = exc
                continue
            if loc.level != "instance":
                out[name] = FileNotFoundError(f"{name}: not an instance of a series")
                continue
            groups.setdefault((loc.base, loc.study, loc.series), []).append((name, loc))
        if len(groups) > 1:
            with ThreadPoolExecutor(min(_FETCH_THREADS, len(groups))) as pool:
                for part in pool.map(lambda item: self._fetch_group(*item), groups.items()):
                    out.update(part)
        else:
            for key, members in groups.items():
                out.update(self._fetch_group(key, members))
        failed = [(n, v) for n, v in out.items() if isinstance(v, BaseException)]
        if failed and on_error == "raise":
            raise failed[0][1]
        if on_error == "omit":
            return {n: v for n, v in out.items() if not isinstance(v, BaseException)}
        return {name: out[name] for name in names}

    def _fetch_group(self, key: tuple[str, str, str], members: list[tuple[str, Location]]) -> dict[str, bytes | BaseException]:
        """The requested instances of one series: one request for the series when they are a fair
        share of it (or its size is unknown), else one request each; an error of a request is
        the value of each path it was for."""
        base, study, series = key
        client = self.client(base)
        known = self._series_sizes.get(key)
        if len(members) > 1 and (known is None or len(members) >= self.series_share * known):
            try:
                found = client.retrieve(study, series)
            except Exception as exc:  # noqa: BLE001 - returned per path; the caller decides
                return {name: exc for name, _ in members}
            return {name: found[loc.instance] if loc.instance in found
                    else FileNotFoundError(f"{name}: not in the series the server sent") for name, loc in members}
        out: dict[str, bytes | BaseException] = {}
        for name, _ in members:
            try:
                out[name] = self.cat_file(name)
            except Exception as exc:  # noqa: BLE001
                out[name] = exc
        return out

    def _has_magic(self, path: str) -> bool:
        return any(c in str(path) for c in "*?[")

    def _open(self, path: str, mode: str = "rb", **kwargs: Any):
        if mode != "rb":
            raise NotImplementedError("a dicomweb:// root is read-only here; store instances with "
                                      "lumbar_ray.dicomweb.store_instances (STOW-RS)")
        return io.BytesIO(self.cat_file(path))


class DicomWebsFileSystem(DicomWebFileSystem):
    """``dicomwebs://``: DICOMweb over HTTPS."""

    protocol = "dicomwebs"
    http_scheme = "https"
