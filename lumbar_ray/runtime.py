"""The one place that starts or joins a Ray runtime (jobs and CLI commands go through here)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Iterator

from lumbar_ray.errors import exit_code_of, one_line

log = logging.getLogger(__name__)


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None) -> Iterator[None]:
    """Join the cluster at ``address`` (or $RAY_ADDRESS: what `ray job submit` sets), else start a
    local runtime sized by ``num_cpus``/``num_gpus``. Shuts down only a runtime it started."""
    import ray  # heavy; run_job, and so every job's --help, does without it

    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs = {"log_to_driver": True, "include_dashboard": False} if address is None else {}
    if address is None:
        if num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
        if num_gpus is not None:
            kwargs["num_gpus"] = num_gpus
    # "local" always starts a fresh runtime: a bare ray.init() would join whatever cluster
    # /tmp/ray/ray_current_cluster names (anyone's `ray start --head` on this machine).
    ray.init(address=address if address is not None else "local", **kwargs)
    log.info("ray resources: %s", ray.cluster_resources())
    try:
        yield
    finally:
        ray.shutdown()


def report_expected(exc: BaseException) -> int | None:
    """For an expected error (see :mod:`lumbar_ray.errors`): write it as one line on stderr and
    return its exit code. None for any other error, which the caller re-raises (traceback kept)."""
    code = exit_code_of(exc)
    if code is not None:
        print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
    return code


def run_job(get_args_parser, main, argv: list[str] | None = None) -> int:
    """Entry point shared by jobs/*.py and the CLI: logging, parse, main. A user error
    (:class:`lumbar_ray.errors.UserError`) ends the job with one line on stderr and its exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = get_args_parser().parse_args(argv)
    try:
        return main(args)
    except Exception as exc:
        code = report_expected(exc)
        if code is None:
            raise
        return code
