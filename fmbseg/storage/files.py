"""Whole-file I/O on any fsspec filesystem, retried: the plumbing under the artifact store.

Local writes go to a temp name beside the target and are renamed (or hard-linked, for an
exclusive create) into place, so a file appears whole or not at all; on object stores one
PUT is atomic. Transient errors (network, throttling) are retried with backoff and then
raised as a :class:`~fmbseg.storage.retry.StoreError` naming the operation and the store.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO, Any, TypeVar

import fsspec

from fmbseg.storage.retry import RetryPolicy, is_transient, retry_call

T = TypeVar("T")
TEMP_NAME = re.compile(r"\.tmp-[0-9a-f]{12}$")  # what _open_temp adds to a target's name


class FileStore:
    """Files under a root on any fsspec filesystem, by path relative to the root.

    Args:
        uri: root of the store: ``./fmbseg-store``, ``s3://bucket/prefix``, ``memory://x``.
            A local path is made absolute, so a pickled store means the same folder in a
            Ray worker with another working directory.
        storage_options: passed to fsspec (e.g. ``{"client_kwargs": {"endpoint_url": ...}}``).
        retry: backoff policy for transient errors.
    """

    def __init__(
        self,
        uri: str,
        storage_options: dict[str, Any] | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        uri = str(uri)
        self.uri = uri.rstrip("/") if "://" in uri else os.path.abspath(os.path.expanduser(uri))
        self.storage_options = dict(storage_options or {})
        self.retry_policy = retry or RetryPolicy()
        self.fs, root = fsspec.core.url_to_fs(self.uri, **self.storage_options)
        self.root = root.rstrip("/")
        protocol = self.fs.protocol
        self.protocols: tuple[str, ...] = protocol if isinstance(protocol, tuple) else (protocol,)
        self._local = "file" in self.protocols
        self._made: set[str] = set()  # local directories this store has made

    def __getstate__(self) -> dict[str, Any]:
        # fsspec filesystems pickle, but rebuilding them keeps Ray workers' sessions fresh.
        return {
            "uri": self.uri,
            "storage_options": self.storage_options,
            "retry": self.retry_policy,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["uri"], state["storage_options"], state["retry"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *[p.strip("/") for p in parts if p]])

    def url(self, *parts: str) -> str:
        """A full URI (with protocol) for a path inside the store, for users and lineage."""
        return self.fs.unstrip_protocol(self.path(*parts))

    def retry(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` retrying transient errors with backoff; then a StoreError naming ``what``."""

        def attempt() -> T:
            try:
                return fn()
            except Exception as exc:
                if is_transient(exc) and hasattr(self.fs, "invalidate_cache"):
                    self.fs.invalidate_cache()
                raise

        return retry_call(what, attempt, self.retry_policy, where=self.uri)

    def exists(self, rel: str) -> bool:
        target = self.path(rel)

        def _exists() -> bool:
            if not self._local:  # another process may have written it since we listed
                self.fs.invalidate_cache(target)
            return bool(self.fs.exists(target))

        return self.retry(f"exists {rel}", _exists)

    def read_bytes(self, rel: str) -> bytes:
        return self.retry(f"read {rel}", lambda: self.fs.cat_file(self.path(rel)))

    def _open_temp(self, target: str) -> tuple[str, IO[bytes]]:
        """A new local temp file beside ``target`` (its directory made, once per store):
        ``(temp path, open binary handle)``."""
        parent = target.rsplit("/", 1)[0]
        tmp = f"{target}.tmp-{uuid.uuid4().hex[:12]}"
        if parent not in self._made:
            os.makedirs(parent, exist_ok=True)
            self._made.add(parent)
        try:
            return tmp, open(tmp, "wb")  # noqa: SIM115 - the callers close it
        except FileNotFoundError:  # the directory was removed since it was made
            self._made.discard(parent)
            os.makedirs(parent, exist_ok=True)
            return tmp, open(tmp, "wb")  # noqa: SIM115

    def sweep_temp(self, rel: str) -> list[str]:
        """Delete the temp files (``*.tmp-{12 hex}``) under folder ``rel`` that interrupted
        writes left (a killed process cannot remove them itself); returns their paths
        relative to ``rel``. Object stores have none: their writes are single PUTs or
        aborted uploads. Call it only while no other writer works under ``rel``."""
        if not self._local:
            return []
        top = self.path(rel)
        gone = []
        for folder, _, names in os.walk(top):
            for name in names:
                if TEMP_NAME.search(name):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(folder, name))
                    gone.append(os.path.relpath(os.path.join(folder, name), top))
        return sorted(gone)

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a whole file. Local writes go to a temp name and are renamed into place."""
        target = self.path(rel)

        def _write() -> None:
            if self._local:
                tmp, f = self._open_temp(target)
                with f:
                    f.write(data)
                os.replace(tmp, target)
            else:  # object stores: a single PUT is atomic
                self.fs.pipe_file(target, data)

        self.retry(f"write {rel}", _write)

    @contextlib.contextmanager
    def open_write(self, rel: str) -> Iterator[IO[bytes]]:
        """A handle to write ``rel`` in pieces; the file appears whole when the block exits
        cleanly, else not at all (locally a temp file renamed into place; on object stores
        the upload is aborted). Not retried: the caller's writes cannot be replayed."""
        target = self.path(rel)
        if self._local:
            tmp, handle = self._open_temp(target)
            try:
                with handle as f:
                    yield f
                os.replace(tmp, target)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            return
        handle = self.fs.open(target, "wb")
        try:
            yield handle
        except BaseException:  # fsspec's close() would publish the partial file
            if isinstance(handle, fsspec.spec.AbstractBufferedFile):
                handle.discard()  # s3fs, gcsfs: abort the upload
                handle.closed = True  # and leave nothing for __del__ to flush
            raise
        handle.close()

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Create ``rel`` only if absent. True if this call created it, False if it existed.

        The file appears complete or not at all: locally a finished temp file is hard-linked
        into place (``link`` fails if the name exists); on S3 the PUT carries
        ``If-None-Match: *``.
        """
        target = self.path(rel)

        def _create() -> bool:
            if not self._local:
                try:
                    with self.fs.open(target, "xb") as f:
                        f.write(data)
                except FileExistsError:
                    return False
                return True
            tmp, f = self._open_temp(target)
            with f:
                f.write(data)
            try:
                os.link(tmp, target)
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
            return True

        return self.retry(f"create {rel}", _create)

    def delete(self, rel: str) -> None:
        target = self.path(rel)

        def _rm() -> None:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(target)

        self.retry(f"delete {rel}", _rm)

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())

    def ls(self, rel: str) -> list[str]:
        """Names (not paths) directly under ``rel``; empty if it does not exist."""
        target = self.path(rel)

        def _ls() -> list[str]:
            try:
                entries = self.fs.ls(target, detail=False, refresh=True)
            except FileNotFoundError:
                return []
            return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

        return self.retry(f"list {rel}", _ls)


def in_order_ahead(fn: Callable[[int], T], n: int, ahead: int = 4) -> Iterator[T]:
    """``fn(0), ..., fn(n - 1)`` in order, computed in ``ahead`` threads, at most ``ahead``
    results held: reads of many small files overlap their request latency (object stores)
    while memory stays bounded. Stopping early cancels what has not started."""
    pool = ThreadPoolExecutor(max(1, ahead), thread_name_prefix="fmbseg-ahead")
    window: deque[Future[T]] = deque()
    try:
        for i in range(n):
            window.append(pool.submit(fn, i))
            if len(window) >= ahead:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
