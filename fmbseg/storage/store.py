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

import hashlib
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from fmbseg.storage.files import FileStore, in_order_ahead
from fmbseg.storage.manifest import Manifest, ShardReceipt, now
from fmbseg.storage.parquet import table_to_parquet_bytes
from fmbseg.storage.retry import (
    NotCommittedError,
    RetryPolicy,
    StoreError,
    is_transient,
    retry_call,
)

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
# Re-exported: the storage API callers import from here.
__all__ = [
    "ArtifactStore",
    "Manifest",
    "NotCommittedError",
    "RetryPolicy",
    "ShardReceipt",
    "StoreError",
    "is_transient",
    "retry_call",
    "table_to_parquet_bytes",
]


class ArtifactStore(FileStore):
    """Versioned, shard-committed stage outputs on any fsspec filesystem; built like its base
    :class:`~fmbseg.storage.files.FileStore`, which does the whole-file I/O."""

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

        def put(kind: str, table: pa.Table) -> tuple[str, str]:  # (file name, sha256)
            blob = table_to_parquet_bytes(table)
            sha = hashlib.sha256(blob).hexdigest()
            name = f"{kind}-{shard:05d}-{sha[:16]}.parquet"
            self.write_bytes(f"{base}/{name}", blob)
            return name, sha

        part, sha = put("part", records)
        err_part = err_sha = None
        err_rows = 0
        if errors is not None and errors.num_rows:
            err_part, err_sha = put("errors", errors)
            err_rows = errors.num_rows
        receipt = ShardReceipt(
            shard=shard,
            rows=records.num_rows,
            error_rows=err_rows,
            sha256=sha,
            errors_sha256=err_sha,
            written_at=now(),
            part=part,
            errors_part=err_part,
        )
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
            stage=stage,
            fingerprint=fp,
            num_shards=num_shards,
            rows=sum(r.rows for r in shards),
            error_rows=sum(r.error_rows for r in shards),
            shards=shards,
            committed_at=now(),
            meta=dict(meta or {}),
        )
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
        # ParquetFile on an Arrow buffer: faster than read_table's dataset machinery or a
        # Python file object (bench/io_paths.py)
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

    def shards(
        self,
        stage: str,
        fp: str,
        kind: str = "part",
        manifest: Manifest | None = None,
        columns: list[str] | None = None,
        ahead: int = 4,
    ) -> Iterator[pa.Table]:
        """Every shard of a committed stage, in order (:meth:`read_shard` of each, empty
        ones included), read ``ahead`` at a time in threads: on an object store the GETs
        overlap, and at most ``ahead`` shards are held."""
        m = manifest or self.require_manifest(stage, fp)
        return in_order_ahead(
            lambda i: self.read_shard(stage, fp, i, kind, manifest=m, columns=columns),
            m.num_shards,
            ahead,
        )

    def iter_shards(self, stage: str, fp: str, kind: str = "part") -> Iterator[pa.Table]:
        """The committed shards that have rows of ``kind``, in order, read a few ahead."""
        for t in self.shards(stage, fp, kind):
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
        self.write_json(rel, {"run_id": run_id, "written_at": now(), **record})
        return self.url(rel)

    def read_run(self, run_id: str) -> dict[str, Any]:
        return self.read_json(f"runs/{run_id}.json")
