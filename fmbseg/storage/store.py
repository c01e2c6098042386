"""The artifact store: versioned stage outputs, run lineage, over any fsspec URI.

Layout under ``root`` (a local path, ``s3://bucket/prefix``, ``memory://...``)::

    stages/{stage}/{fingerprint}/part-{shard:05d}-{sha}.parquet    records of one shard
    stages/{stage}/{fingerprint}/errors-{shard:05d}-{sha}.parquet  failed inputs of that shard
    stages/{stage}/{fingerprint}/receipt-{shard:05d}.json          written after the two above
    stages/{stage}/{fingerprint}/_manifest.json                    written last, exclusive create
    runs/{flow_run_id}.json                                         fingerprints a run used

Commit protocol: a shard is *done* when its receipt exists; the receipt names the shard's
files and carries their row counts and sha256 checksums, so a torn or tampered part is
detected on read. Part files are named by their content hash ({sha} = first 16 hex chars):
two writers racing on the same shard never overwrite each other's bytes, so whichever
receipt lands last still describes a complete, matching file. A stage is *committed* when
``_manifest.json`` exists; it is created exclusively (a hard link of a finished temp file
locally, ``If-None-Match: *`` on S3), so of two racing writers exactly one wins and the
loser reads the winner's manifest, never a half-written one. Readers trust only what a
committed manifest lists.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict
from typing import IO, Any, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from fmbseg.storage.manifest import (
    Manifest,
    ShardReceipt,
    _now,
    table_to_parquet_bytes,
)
from fmbseg.storage.retry import (
    NotCommittedError,
    RetryPolicy,
    StoreError,
    is_transient,
    retry_call,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

MANIFEST = "_manifest.json"
# Re-exported: the storage API callers import from here.
__all__ = [
    "ArtifactStore", "Manifest", "NotCommittedError", "RetryPolicy", "ShardReceipt",
    "StoreError", "is_transient", "retry_call", "table_to_parquet_bytes",
]  # fmt: skip


class ArtifactStore:
    """Versioned, shard-committed stage outputs on any fsspec filesystem.

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
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self._local = "file" in protocols
        self._made: set[str] = set()  # local directories this store has created or seen

    # ---- plumbing -------------------------------------------------------------------------

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
        return f"ArtifactStore({self.uri!r})"

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

    # ---- stages ---------------------------------------------------------------------------

    @staticmethod
    def stage_rel(stage: str, fp: str) -> str:
        return f"stages/{stage}/{fp}"

    def stage_url(self, stage: str, fp: str) -> str:
        """Full URI of a stage output's folder (what to show users)."""
        return self.url(self.stage_rel(stage, fp))

    def write_shard(
        self,
        stage: str,
        fp: str,
        shard: int,
        records: pa.Table,
        errors: pa.Table | None = None,
    ) -> ShardReceipt:
        """Write one shard's records (and errors, if any rows), then its receipt.

        Safe to repeat and to race: files are named by content, the receipt is replaced whole.
        """
        base = self.stage_rel(stage, fp)
        blob = table_to_parquet_bytes(records)
        sha = hashlib.sha256(blob).hexdigest()
        part = f"part-{shard:05d}-{sha[:16]}.parquet"
        self.write_bytes(f"{base}/{part}", blob)
        err_sha = err_part = None
        err_rows = 0
        if errors is not None and errors.num_rows:
            err_blob = table_to_parquet_bytes(errors)
            err_sha = hashlib.sha256(err_blob).hexdigest()
            err_part = f"errors-{shard:05d}-{err_sha[:16]}.parquet"
            self.write_bytes(f"{base}/{err_part}", err_blob)
            err_rows = errors.num_rows
        receipt = ShardReceipt(
            shard=shard, rows=records.num_rows, error_rows=err_rows, sha256=sha,
            errors_sha256=err_sha, written_at=_now(), part=part, errors_part=err_part,
        )  # fmt: skip
        self.write_json(f"{base}/receipt-{shard:05d}.json", asdict(receipt))
        return receipt

    def shard_receipts(self, stage: str, fp: str) -> dict[int, ShardReceipt]:
        """Receipts of the shards fully written for ``stage/fp`` (committed or not).

        A receipt whose files are gone (deleted by hand, swept) does not count.
        """
        base = self.stage_rel(stage, fp)
        names = set(self.ls(base))
        out = {}
        for name in sorted(names):
            if name.startswith("receipt-") and name.endswith(".json"):
                try:
                    r = ShardReceipt.from_dict(self.read_json(f"{base}/{name}"))
                except FileNotFoundError:
                    continue
                if all(f in names for f in r.files()):
                    out[r.shard] = r
        return out

    def manifest(self, stage: str, fp: str) -> Manifest | None:
        rel = f"{self.stage_rel(stage, fp)}/{MANIFEST}"
        try:
            return Manifest.from_json(self.read_bytes(rel).decode())
        except FileNotFoundError:
            return None

    def is_committed(self, stage: str, fp: str) -> bool:
        return self.exists(f"{self.stage_rel(stage, fp)}/{MANIFEST}")

    def commit(
        self,
        stage: str,
        fp: str,
        num_shards: int,
        meta: dict[str, Any] | None = None,
        receipts: Mapping[int, ShardReceipt] | None = None,
    ) -> tuple[Manifest, bool]:
        """Write the manifest for shards ``0..num_shards-1``; all must have receipts.

        ``receipts``: the shards' receipts when the caller holds them (the runner: those
        listed when it started plus those its writes returned), so they are not listed and
        read back one file each; by default they are.

        Returns (manifest, won): ``won`` is False when another writer committed first, in
        which case the returned manifest is theirs.
        """
        if receipts is None:
            receipts = self.shard_receipts(stage, fp)
        missing = [i for i in range(num_shards) if i not in receipts]
        if missing:
            raise StoreError(
                f"cannot commit {stage}/{fp}: shards {missing[:10]} have no receipt "
                f"({len(missing)} of {num_shards} missing)"
            )
        shards = [receipts[i] for i in range(num_shards)]
        manifest = Manifest(
            stage=stage, fingerprint=fp, num_shards=num_shards,
            rows=sum(r.rows for r in shards), error_rows=sum(r.error_rows for r in shards),
            shards=shards, committed_at=_now(), meta=dict(meta or {}),
        )  # fmt: skip
        rel = f"{self.stage_rel(stage, fp)}/{MANIFEST}"
        if self.create_exclusive(rel, manifest.to_json().encode()):
            return manifest, True
        existing = self.manifest(stage, fp)
        if existing is None:
            raise StoreError(f"{self.url(rel)} exists but cannot be read back")
        return existing, False

    def sweep(self, stage: str, fp: str) -> list[str]:
        """Delete part files of a committed stage that its manifest does not list.

        They are left by rewritten or raced shards; readers never see them. Returns the names.
        """
        m = self.require_manifest(stage, fp)
        keep = {f for r in m.shards for f in r.files()}
        base = self.stage_rel(stage, fp)
        stale = [
            n
            for n in self.ls(base)
            if n.endswith(".parquet") and n.startswith(("part-", "errors-")) and n not in keep
        ]
        for name in stale:
            self.delete(f"{base}/{name}")
        return stale

    def require_manifest(self, stage: str, fp: str) -> Manifest:
        m = self.manifest(stage, fp)
        if m is None:
            known = self.committed_fingerprints(stage)
            raise NotCommittedError(
                f"stage {stage!r} has no committed output with fingerprint {fp!r} in "
                f"{self.uri}; committed fingerprints: {known or 'none'}"
            )
        return m

    def _read_verified(self, rel: str, sha: str, columns: list[str] | None = None) -> pa.Table:
        blob = self.read_bytes(rel)
        if hashlib.sha256(blob).hexdigest() != sha:
            raise StoreError(f"{self.url(rel)} does not match its manifest checksum (tampered?)")
        # ParquetFile on an Arrow buffer: read_table's dataset machinery costs ~2x, and on
        # small shards a Python file object ~1.3x (bench/io_paths.py)
        return pq.ParquetFile(pa.BufferReader(blob)).read(columns=columns)

    def read_shard(
        self,
        stage: str,
        fp: str,
        shard: int,
        kind: str = "part",
        manifest: Manifest | None = None,
        columns: list[str] | None = None,
    ) -> pa.Table:
        """One committed shard's records (``kind="part"``) or errors (``kind="errors"``).

        A shard without errors gives an empty table with no columns. ``columns``: only
        these are decoded (the whole file is still read and its checksum verified).
        """
        if kind not in ("part", "errors"):
            raise ValueError(f"kind must be 'part' or 'errors', got {kind!r}")
        m = manifest or self.require_manifest(stage, fp)
        if not 0 <= shard < len(m.shards):
            raise StoreError(f"{stage}/{fp} has shards 0..{len(m.shards) - 1}, not {shard}")
        return self.read_receipted(stage, fp, m.shards[shard], kind, columns)

    def read_receipted(
        self,
        stage: str,
        fp: str,
        receipt: ShardReceipt,
        kind: str = "part",
        columns: list[str] | None = None,
    ) -> pa.Table:
        """The file a receipt describes, checksum-verified, committed or not.

        For ``finalize`` hooks that inspect written shards before the commit; everything
        else should read committed shards (:meth:`read_shard`, :meth:`read_table`).
        """
        r = receipt
        name, sha = (r.part, r.sha256) if kind == "part" else (r.errors_part, r.errors_sha256)
        if name is None or sha is None:
            return pa.table({})
        return self._read_verified(f"{self.stage_rel(stage, fp)}/{name}", sha, columns)

    def iter_shards(self, stage: str, fp: str, kind: str = "part") -> Iterator[pa.Table]:
        m = self.require_manifest(stage, fp)
        for i in range(m.num_shards):
            t = self.read_shard(stage, fp, i, kind, manifest=m)
            if t.num_columns:
                yield t

    def read_table(
        self, stage: str, fp: str, kind: str = "part", columns: Iterable[str] | None = None
    ) -> pa.Table:
        """All committed shards of a stage concatenated (``kind`` "part" or "errors")."""
        tables = list(self.iter_shards(stage, fp, kind))
        if columns is not None:
            tables = [t.select(list(columns)) for t in tables]
        if not tables:
            return pa.table({})
        return pa.concat_tables(tables, promote_options="default")

    def committed_fingerprints(self, stage: str) -> list[str]:
        """Fingerprints of ``stage`` with a committed manifest, oldest commit first."""
        found = []
        for fp in self.ls(f"stages/{stage}"):
            m = self.manifest(stage, fp)
            if m is not None:
                found.append((m.committed_at, fp))
        return [fp for _, fp in sorted(found)]

    def latest(self, stage: str) -> str | None:
        """The most recently committed fingerprint of ``stage``, or None."""
        fps = self.committed_fingerprints(stage)
        return fps[-1] if fps else None

    # ---- lineage --------------------------------------------------------------------------

    def write_run(self, run_id: str, record: dict[str, Any]) -> str:
        """Record which stage fingerprints (and config) a flow run used; returns its URI."""
        rel = f"runs/{run_id}.json"
        self.write_json(rel, {"run_id": run_id, "written_at": _now(), **record})
        return self.url(rel)

    def read_run(self, run_id: str) -> dict[str, Any]:
        return self.read_json(f"runs/{run_id}.json")
