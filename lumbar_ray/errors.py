"""Expected errors: what a user can fix (a name, a path, a resource another process holds).

Entry points (``runtime.run_job`` for the jobs, the CLI's own commands) print such an error as
one line on stderr and exit with its code, without a traceback; any other exception is a bug and
keeps its traceback. Exit codes of every command:

    0  done
    1  unexpected error (traceback printed)
    2  bad arguments (argparse / Typer usage)
    3  busy: another process holds the output (``scoring.lock``) or the promotion lock
    4  registry: no champion, unknown version, or a registry that cannot be read as one
    5  data: the data folder or URL is missing or not in the Kaggle layout
    6  incomplete: studies lack their 25 rows (``export-kaggle`` without ``--fill-prior``)
    7  transient: storage did not answer after the bounded retries (timeouts, resets, refused
       connections, 5xx, throttling); nothing is wrong with the data: rerun the same command
"""

from __future__ import annotations

EXIT_USAGE = 2
EXIT_BUSY = 3
EXIT_REGISTRY = 4
EXIT_DATA = 5
EXIT_INCOMPLETE = 6
EXIT_TRANSIENT = 7


class UserError(Exception):
    """Base of the expected errors; ``exit_code`` is what the command exits with."""

    exit_code = 1


class BusyError(UserError):
    """Another process holds what this one needs (its message says who, and how it expires)."""

    exit_code = EXIT_BUSY


class DataLayoutError(UserError):
    """A data root (local folder or URL) is missing or lacks the Kaggle layout's files."""

    exit_code = EXIT_DATA


class StorageUnavailableError(UserError):
    """Storage kept failing with transient errors (timeouts, connection resets or refusals, 5xx,
    throttling) through every bounded retry (``storage.retry_transient``). Nothing is known to be
    wrong with the data, so a study that meets it is recorded as retryable, never scored from
    what did arrive, and the same command run again later does the work."""

    exit_code = EXIT_TRANSIENT


def exit_code_of(exc: BaseException) -> int | None:
    """The exit code for an expected error (a :class:`UserError`), else None: an unexpected error."""
    return exc.exit_code if isinstance(exc, UserError) else None


def one_line(exc: BaseException) -> str:
    """The error's message on one line."""
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
