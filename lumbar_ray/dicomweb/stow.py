"""STOW-RS: store DICOM instances (e.g. the structured reports of ``export-sr``) in a PACS."""

from __future__ import annotations

import logging
from typing import Iterable

from pydicom.dataset import Dataset

from lumbar_ray.dicomweb.client import DicomWebRefusedError, batches, client_for, encode_instance
from lumbar_ray.storage import WRITE_RETRY, WRITE_RETRY_ENV, retry_transient

log = logging.getLogger(__name__)

__all__ = ["store_instances"]


def store_instances(url: str, datasets: Iterable[Dataset | bytes]) -> int:
    """Store ``datasets`` (pydicom Datasets, or bytes of Part 10 files) in the DICOMweb service
    at ``url`` (``dicomweb://HOST:PORT/PATH`` or ``dicomwebs://…``, the same root ``score
    --input`` takes) with STOW-RS; returns how many instances the server stored.

    Requests of at most 100 instances / ~64 MB each. A request that failed transiently
    (connection error, timeout, 5xx, 429) is sent again with the write retry policy
    (:data:`lumbar_ray.storage.WRITE_RETRY`; storing an instance again is harmless: same
    SOPInstanceUID). Instances the server refused raise :class:`DicomWebRefusedError` after
    every request was made, naming each SOPInstanceUID and the server's reason; what was stored
    stays stored."""
    client = client_for(url)
    policy = WRITE_RETRY.from_env(WRITE_RETRY_ENV)
    stored = 0
    failed: dict[str, str] = {}
    sent = 0
    for batch in batches(encode_instance(ds) for ds in datasets):
        ok, refused = retry_transient(client.store, batch, what=f"storing {len(batch)} instances in {url}",
                                      policy=policy)
        stored += len(ok)
        failed.update(refused)
        sent += len(batch)
    log.info("stored %d of %d instances in %s", stored, sent, url)
    if failed:
        shown = "; ".join(f"{uid}: {why}" for uid, why in list(failed.items())[:20])
        more = f" (+{len(failed) - 20} more)" if len(failed) > 20 else ""
        raise DicomWebRefusedError(f"{url} refused {len(failed)} of {sent} instances ({stored} stored): {shown}{more}",
                                   failed, stored)
    return stored
