"""Store errors, and retries with exponential backoff for transient storage failures.

Why a retry of our own on top of the backends' (s3fs/botocore keep theirs): it wraps each
store operation (read, exists, write, list) the same way whatever the fsspec backend (they
differ in what they retry; a local or NFS path: nothing), drops the file system's listing
cache between tries (:meth:`fmbseg.storage.files.FileStore.retry`), and turns an operation that
still fails into one :class:`StoreError` naming it and the store.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger("fmbseg.storage.store")
T = TypeVar("T")


class StoreError(RuntimeError):
    """A storage operation failed for good (after retries), or the store is inconsistent."""


class NotCommittedError(StoreError):
    """A stage output was asked for that no committed manifest lists."""


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff for transient storage errors."""

    attempts: int = 5  # total tries, including the first
    initial_delay: float = 0.2  # seconds before the first retry
    max_delay: float = 5.0
    multiplier: float = 2.0


# Errors that retrying cannot fix.
_PERMANENT = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    ValueError,
    TypeError,
    KeyError,
)
# s3fs maps client-side S3 errors (bad argument, name too long, ...) to OSError with these;
# a read-only file system, a full disk or quota stay so however often a write is retried.
_PERMANENT_ERRNOS = {
    errno.EINVAL,
    errno.EMSGSIZE,
    errno.ENAMETOOLONG,
    errno.ENOTEMPTY,
    errno.EPERM,
    errno.EROFS,
    errno.ENOSPC,
    errno.EDQUOT,
}
_TRANSIENT_NAMES = (
    "Connection",
    "Timeout",
    "Throttl",
    "ServiceUnavailable",
    "SlowDown",
    "ClientPayload",
    "ServerDisconnected",
    "EndpointConnection",
    "ReadTimeout",
)


def is_transient(exc: BaseException) -> bool:
    """Whether retrying ``exc`` may help (network, throttling, 5xx), as opposed to a bug/absence."""
    if isinstance(exc, _PERMANENT):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError):
        return exc.errno not in _PERMANENT_ERRNOS
    # botocore / aiohttp errors, without importing them here
    return any(k in type(exc).__name__ for k in _TRANSIENT_NAMES)


def retry_call(what: str, fn: Callable[[], T], policy: RetryPolicy, where: str = "") -> T:
    """Run ``fn``, retrying transient errors with exponential backoff.

    Permanent errors propagate unchanged; a transient error that outlives ``policy.attempts``
    becomes a :class:`StoreError` naming ``what`` (the operation) and ``where``.
    """
    delay = policy.initial_delay
    for attempt in range(1, policy.attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if attempt == policy.attempts:
                on = f" on {where}" if where else ""
                raise StoreError(
                    f"{what} failed after {attempt} attempts{on}: {type(exc).__name__}: {exc}"
                ) from exc
            log.warning(
                "%s: transient %s (%s), retry %d/%d in %.2fs",
                what,
                type(exc).__name__,
                exc,
                attempt,
                policy.attempts - 1,
                delay,
            )
            time.sleep(delay)
            delay = min(delay * policy.multiplier, policy.max_delay)
    raise AssertionError("unreachable")  # pragma: no cover
