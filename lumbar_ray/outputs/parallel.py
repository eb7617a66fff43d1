"""Per-study output work (SRs, report pages) on a few threads, in study order.

Each study's SR or page starts by reading the study from storage (a bucket, a PACS over
DICOMweb), which is mostly waiting on the network; threads overlap that wait. Results come back
in input order and at most ``workers`` studies are in flight, so memory stays that of a few
studies however many there are. What ``fn`` itself writes (the report's pages) may run up to
``workers - 1`` studies ahead of the results consumed.

The threads share the process: what they call must be thread-safe. The DICOM reader serialises
its warning capture (:mod:`lumbar_ray.dicom.files`), the overlays draw one figure at a time, and
fsspec gives each thread its own instance of a non-async file system (a DICOMweb client each).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

__all__ = ["DEFAULT_STUDY_WORKERS", "map_in_order"]

T = TypeVar("T")
R = TypeVar("R")

# Studies read at once by export-sr and report: enough to hide a PACS's or a bucket's latency
# on a laptop, few enough that a handful of studies' images fit in memory.
DEFAULT_STUDY_WORKERS = 4


def map_in_order(fn: Callable[[T], R], items: Iterable[T], workers: int = DEFAULT_STUDY_WORKERS) -> Iterator[R]:
    """``fn(item)`` for each item, in the order of ``items``, on up to ``workers`` threads.

    Items are taken from ``items`` only as results are consumed (at most ``workers`` ahead). An
    exception raised by ``fn`` is raised when its item's turn comes; the items after it that
    were already started finish, and nothing more is started. ``workers`` 1 runs everything
    in the caller's thread."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, not {workers}")
    if workers == 1:
        yield from map(fn, items)
        return
    source = iter(items)
    pending: deque[Future[R]] = deque()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="study-output")
    finished = False
    try:
        for item in source:
            pending.append(pool.submit(fn, item))
            if len(pending) >= workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
        finished = True
    finally:
        # A consumer that stops early, an error or Ctrl-C: what has not started never starts, and
        # the caller does not wait for the studies in flight (they finish in the background).
        pool.shutdown(wait=finished, cancel_futures=True)
