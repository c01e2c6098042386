"""Pre-flight check of a store location, so a store that cannot work fails in one line
before any work instead of in a traceback after minutes of retries.

What is checked: a local store is a folder (or can be made as one) that this process may
write to; an object-store location is not a file, its bucket exists, and its endpoint
answers within ``timeout`` seconds (for the check only: botocore's connect/read timeouts
and a single attempt by botocore and by s3fs, on a filesystem instance of its own, so the
store's own retries are left as they are for the run).
"""

from __future__ import annotations

import copy
import os
from typing import Any

import fsspec

from fmbseg.storage.retry import StoreError

CHECK_TIMEOUT = 5.0  # seconds an endpoint has to answer the pre-flight check


class StoreUnusableError(StoreError):
    """The store location is a file, read-only, missing its bucket or unreachable."""


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def check_store(
    uri: str,
    storage_options: dict[str, Any] | None = None,
    *,
    write: bool = True,
    timeout: float = CHECK_TIMEOUT,
) -> None:
    """Raise :class:`StoreUnusableError` naming ``uri`` and the reason if it cannot serve as a
    store (``write``: one that stages and lineage are written to; False for read-only use)."""
    if _is_local(uri):
        _check_local(uri, write)
    else:
        _check_remote(uri, storage_options or {}, timeout)


def _check_local(uri: str, write: bool) -> None:
    path = os.path.abspath(os.path.expanduser(uri.removeprefix("file://")))
    existing = path
    while not os.path.exists(existing):  # the store is made on first write: check its parent
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        what = "is a file" if existing == path else f"is under {existing!r}, which is a file"
        raise StoreUnusableError(f"store {uri!r} {what}, not a folder")
    if not write or os.access(existing, os.W_OK | os.X_OK):
        return
    # os.access answers for root too on a read-only mount (EROFS), unlike permission bits
    readonly = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
    reason = "a read-only file system" if readonly else "permission denied"
    where = "" if existing == path else f" ({existing!r}, where it would be made)"
    raise StoreUnusableError(f"store {uri!r} is not writable{where}: {reason}")


def _check_remote(uri: str, storage_options: dict[str, Any], timeout: float) -> None:
    options = copy.deepcopy(storage_options)
    protocol = uri.split("://", 1)[0]
    if protocol in ("s3", "s3a"):
        config = options.setdefault("config_kwargs", {})
        retries = {"total_max_attempts": 1, "mode": "standard"}  # no retry
        config.update(connect_timeout=timeout, read_timeout=timeout, retries=retries)
    options["skip_instance_cache"] = True  # the run's own instance keeps its retries
    try:
        fs, root = fsspec.core.url_to_fs(uri, **options)
        root = root.rstrip("/")
        if protocol in ("s3", "s3a"):
            fs.retries = 1  # s3fs retries timeouts itself, 5 times with backoff
            bucket = root.split("/", 1)[0]
            try:
                fs.call_s3("head_bucket", Bucket=bucket)
            except FileNotFoundError:
                raise StoreUnusableError(
                    f"store {uri!r}: bucket {bucket!r} does not exist (create it first)"
                ) from None
            except PermissionError as exc:
                raise StoreUnusableError(
                    f"store {uri!r}: no access to bucket {bucket!r}: {exc}"
                ) from None
        is_file = "/" in root and fs.isfile(root)
    except StoreUnusableError:
        raise
    except Exception as exc:
        endpoint = (storage_options.get("client_kwargs") or {}).get("endpoint_url")
        at = f" at {endpoint}" if endpoint else ""
        raise StoreUnusableError(
            f"store {uri!r} cannot be reached{at} within {timeout:g} s: {type(exc).__name__}: {exc}"
        ) from None
    if is_file:
        raise StoreUnusableError(f"store {uri!r} is a file, not a folder")
