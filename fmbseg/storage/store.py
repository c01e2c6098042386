"""The artifact store: versioned stage outputs, run lineage, over any fsspec URI.

Layout under ``root`` (a local path, ``s3://bucket/prefix``, ``memory://...``)::

    stages/{stage}/{fingerprint}/part-{shard:05d}.parquet       records of one shard
    stages/{stage}/{fingerprint}/errors-{shard:05d}.parquet     failed inputs of that shard
    stages/{stage}/{fingerprint}/receipt-{shard:05d}.json       written after the two above
    stages/{stage}/{fingerprint}/_manifest.json                 written last, exclusive create
    runs/{flow_run_id}.json                                      fingerprints a run used

Commit protocol: a shard is *done* when its receipt exists (the receipt carries row counts
and sha256 checksums of its files, so a torn or foreign part is detected). A stage is
*committed* when ``_manifest.json`` exists; it is created with exclusive create (``xb``:
O_EXCL locally, ``If-None-Match: *`` on S3), so of two racing writers exactly one wins and
the loser reads the winner's manifest. Readers trust only what a committed manifest lists.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)
T = TypeVar("T")

MANIFEST = "_manifest.json"


class StoreError(RuntimeError):
    """A storage operation failed for good (after retries), or the store is inconsistent."""


class NotCommittedError(StoreError):
    """A stage output was asked for that no committed manifest lists."""


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff for transient storage errors."""

    attempts: int = 5
    initial_delay: float = 0.2  # seconds
    max_delay: float = 5.0
    multiplier: float = 2.0


# Errors that retrying cannot fix.
_PERMANENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
              NotADirectoryError, ValueError, TypeError, KeyError)


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, _PERMANENT):
        return False
    if isinstance(exc, (OSError, ConnectionError, TimeoutError)):
        return True
    # botocore / aiohttp errors, without importing them here
    name = type(exc).__name__
    return any(k in name for k in ("Connection", "Timeout", "Throttl", "ServiceUnavailable",
                                   "SlowDown", "ClientPayload", "ServerDisconnected",
                                   "EndpointConnection", "ReadTimeout"))


@dataclass(frozen=True)
class ShardReceipt:
    """Proof that one shard's files are fully written."""

    shard: int
    rows: int
    error_rows: int
    sha256: str
    errors_sha256: str | None
    written_at: str

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShardReceipt:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Manifest:
    """A committed stage output: every shard with its row count and checksum."""

    stage: str
    fingerprint: str
    num_shards: int
    rows: int
    error_rows: int
    shards: list[ShardReceipt]
    committed_at: str
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        d = json.loads(text)
        d["shards"] = [ShardReceipt.from_dict(s) for s in d["shards"]]
        return cls(**d)


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="microseconds")


def table_to_parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


class ArtifactStore:
    """Versioned, shard-committed stage outputs on any fsspec filesystem.

    Args:
        uri: root of the store: ``./fmbseg-store``, ``s3://bucket/prefix``, ``memory://x``.
        storage_options: passed to fsspec (e.g. ``{"client_kwargs": {"endpoint_url": ...}}``).
        retry: backoff policy for transient errors.
    """

    def __init__(
        self,
        uri: str,
        storage_options: dict[str, Any] | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.uri = uri.rstrip("/") if "://" in uri else uri
        self.storage_options = dict(storage_options or {})
        self.retry_policy = retry or RetryPolicy()
        self.fs, self.root = fsspec.core.url_to_fs(self.uri, **self.storage_options)
        self.root = self.root.rstrip("/")
        self._local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple)
                                 else (self.fs.protocol,))

    # ---- plumbing -------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        # fsspec filesystems pickle, but rebuilding them keeps Ray workers' sessions fresh.
        return {"uri": self.uri, "storage_options": self.storage_options,
                "retry": self.retry_policy}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["uri"], state["storage_options"], state["retry"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"ArtifactStore({self.uri!r})"

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *[p.strip("/") for p in parts]])

    def url(self, *parts: str) -> str:
        """A full URI (with protocol) for a path inside the store, for users and lineage."""
        return self.fs.unstrip_protocol(self.path(*parts))

    def retry(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` retrying transient errors with backoff; then a StoreError naming ``what``."""
        policy = self.retry_policy
        delay = policy.initial_delay
        for attempt in range(1, policy.attempts + 1):
            try:
                return fn()
            except BaseException as exc:  # noqa: BLE001 - classified below
                if not _is_transient(exc):
                    raise
                if attempt == policy.attempts:
                    raise StoreError(
                        f"{what} failed after {attempt} attempts on {self.uri}: "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
                log.warning("%s: transient %s (%s), retry %d/%d in %.1fs", what,
                            type(exc).__name__, exc, attempt, policy.attempts - 1, delay)
                time.sleep(delay)
                delay = min(delay * policy.multiplier, policy.max_delay)
                if hasattr(self.fs, "invalidate_cache"):
                    self.fs.invalidate_cache()
        raise AssertionError("unreachable")  # pragma: no cover

    def exists(self, rel: str) -> bool:
        return self.retry(f"exists {rel}", lambda: self.fs.exists(self.path(rel)))

    def read_bytes(self, rel: str) -> bytes:
        return self.retry(f"read {rel}", lambda: self.fs.cat_file(self.path(rel)))

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a whole file. Local writes go to a temp name and are renamed into place."""
        target = self.path(rel)

        def _write() -> None:
            parent = target.rsplit("/", 1)[0]
            if self._local:
                self.fs.makedirs(parent, exist_ok=True)
                tmp = f"{target}.tmp-{hashlib.sha1(data[:64] + _now().encode()).hexdigest()[:8]}"
                with self.fs.open(tmp, "wb") as f:
                    f.write(data)
                self.fs.mv(tmp, target)
            else:  # object stores: a single PUT is atomic
                self.fs.pipe_file(target, data)

        self.retry(f"write {rel}", _write)

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Create ``rel`` only if absent. True if this call created it, False if it existed."""
        target = self.path(rel)

        def _create() -> bool:
            if self._local:
                self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            try:
                with self.fs.open(target, "xb") as f:
                    f.write(data)
            except FileExistsError:
                return False
            return True

        return self.retry(f"create {rel}", _create)

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

    @staticmethod
    def part_name(shard: int, kind: str = "part") -> str:
        return f"{kind}-{shard:05d}.parquet"

    def write_shard(
        self,
        stage: str,
        fp: str,
        shard: int,
        records: pa.Table,
        errors: pa.Table | None = None,
    ) -> ShardReceipt:
        """Write one shard's records (and errors), then its receipt. Idempotent by name."""
        base = self.stage_rel(stage, fp)
        blob = table_to_parquet_bytes(records)
        self.write_bytes(f"{base}/{self.part_name(shard)}", blob)
        err_sha = None
        err_rows = 0
        if errors is not None and errors.num_rows:
            err_blob = table_to_parquet_bytes(errors)
            self.write_bytes(f"{base}/{self.part_name(shard, 'errors')}", err_blob)
            err_sha = hashlib.sha256(err_blob).hexdigest()
            err_rows = errors.num_rows
        receipt = ShardReceipt(shard=shard, rows=records.num_rows, error_rows=err_rows,
                               sha256=hashlib.sha256(blob).hexdigest(),
                               errors_sha256=err_sha, written_at=_now())
        self.write_json(f"{base}/receipt-{shard:05d}.json", asdict(receipt))
        return receipt

    def shard_receipts(self, stage: str, fp: str) -> dict[int, ShardReceipt]:
        """Receipts of the shards already written for ``stage/fp`` (committed or not)."""
        base = self.stage_rel(stage, fp)
        out = {}
        for name in self.ls(base):
            if name.startswith("receipt-") and name.endswith(".json"):
                r = ShardReceipt.from_dict(self.read_json(f"{base}/{name}"))
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
        self, stage: str, fp: str, num_shards: int, meta: dict[str, Any] | None = None
    ) -> tuple[Manifest, bool]:
        """Write the manifest for shards ``0..num_shards-1``; all must have receipts.

        Returns (manifest, won): ``won`` is False when another writer committed first, in
        which case the returned manifest is theirs.
        """
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
        )
        rel = f"{self.stage_rel(stage, fp)}/{MANIFEST}"
        if self.create_exclusive(rel, manifest.to_json().encode()):
            return manifest, True
        existing = self.manifest(stage, fp)
        assert existing is not None
        return existing, False

    def require_manifest(self, stage: str, fp: str) -> Manifest:
        m = self.manifest(stage, fp)
        if m is None:
            known = self.committed_fingerprints(stage)
            raise NotCommittedError(
                f"stage {stage!r} has no committed output with fingerprint {fp!r} in "
                f"{self.uri}; committed fingerprints: {known or 'none'}"
            )
        return m

    def _read_verified(self, rel: str, sha: str) -> pa.Table:
        blob = self.read_bytes(rel)
        if hashlib.sha256(blob).hexdigest() != sha:
            raise StoreError(f"{self.url(rel)} does not match its manifest checksum")
        return pq.read_table(io.BytesIO(blob))

    def read_shard(self, stage: str, fp: str, shard: int, kind: str = "part",
                   manifest: Manifest | None = None) -> pa.Table:
        """One committed shard's records (``kind="part"``) or errors (``kind="errors"``)."""
        m = manifest or self.require_manifest(stage, fp)
        r = m.shards[shard]
        sha = r.sha256 if kind == "part" else r.errors_sha256
        if sha is None:
            return pa.table({})
        return self._read_verified(f"{self.stage_rel(stage, fp)}/{self.part_name(shard, kind)}",
                                   sha)

    def iter_shards(self, stage: str, fp: str, kind: str = "part") -> Iterator[pa.Table]:
        m = self.require_manifest(stage, fp)
        for i in range(m.num_shards):
            t = self.read_shard(stage, fp, i, kind, manifest=m)
            if t.num_columns:
                yield t

    def read_table(self, stage: str, fp: str, kind: str = "part",
                   columns: Iterable[str] | None = None) -> pa.Table:
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
