"""Stage ``index``: list an image source, identify every image by content, record its size.

Core: :func:`index_images` (URIs in, records + errors out). Shell: :func:`plan_index` lists
the source; :data:`INDEX` is the stage's declaration, which the engine runs over the
listing (:func:`index_job`); :func:`run_index` does both.

Records (one row per distinct image, Parquet): ``image_id`` [string] = content hash of the
file's bytes, ``uri`` [string], ``width``/``height`` [int32] in pixels as displayed (EXIF
orientation applied). Every other listed file is a row of the errors table
(:data:`fmbseg.engine.runner.ERRORS_SCHEMA`) with ``error_type`` one of ``read_error``,
``empty``, ``not_an_image``, ``truncated``, ``corrupt``, ``too_large``, ``duplicate``, or
one the listing found without reading (:attr:`ImageRef.problem`: ``broken_link``,
``link_loop``, ``bad_name``, ``read_error``).

Duplicates: of several files with identical bytes, the one with the smallest URI is
indexed; each other copy is a ``duplicate`` error whose message names the kept URI. Shards
are contiguous runs of the sorted listing, so within a shard "first seen" is that rule, and
across shards :func:`dedup_across_shards` (before the manifest is written) removes later
copies.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from fmbseg.config import Config, IndexConfig
from fmbseg.data.images import (
    WORKER_DECODE_BUDGET,
    ImageDecodeError,
    MemoryBudget,
    check_image,
    image_size,
)
from fmbseg.data.sources import (
    ImageRef,
    allowed_protocols,
    list_images,
    listing_hash,
    read_bytes,
    source_root,
)
from fmbseg.engine.runner import ERRORS_SCHEMA, Progress, errors_table, plan_shards
from fmbseg.engine.stage import Prepared, Stage, StageRun, plan, run
from fmbseg.storage.files import in_order_ahead
from fmbseg.storage.fingerprint import content_hash
from fmbseg.storage.records import error_row
from fmbseg.storage.store import ArtifactStore, ShardReceipt

log = logging.getLogger(__name__)

STAGE = "index"
CODE_VERSION = "1"
READERS = 4  # images a worker reads and checks at once
RECORD_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string()),
        pa.field("uri", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
    ]
)


def index_images(
    uris: Iterable[str | ImageRef],
    cfg: IndexConfig,
    read: Callable[[str], bytes] = read_bytes,
    pool: Executor | None = None,
    problems: dict[str, tuple[str, str]] | None = None,
    budget: MemoryBudget | None = None,
) -> tuple[pa.Table, pa.Table]:
    """Read, identify and measure images; the pure core of the stage.

    Args:
        uris: image URIs (or :class:`ImageRef`), in listing order.
        problems: ``uri -> (error_type, message)`` of listed entries that are not read
            (and those of ImageRefs given with a ``problem``): error rows as they are.
        budget: bounds the pixels the pool's threads decode at once.
        cfg: ``max_pixels`` and ``verify_decode`` (full decode vs. header only).
        read: ``read(uri) -> bytes``; raises for unreadable inputs.
        pool: threads that read and check the images side by side (object-store reads
            wait on the network; decoding releases the GIL); in turn without one. The
            outcome is the same either way.

    Returns:
        (records of RECORD_SCHEMA, errors of ERRORS_SCHEMA). Of identical contents only the
        first occurrence is a record; later ones are ``duplicate`` errors.
    """
    items = list(uris)
    listed = [item.uri if isinstance(item, ImageRef) else str(item) for item in items]
    known = dict(problems or {})
    known.update({r.uri: r.problem for r in items if isinstance(r, ImageRef) and r.problem})
    inspect = functools.partial(_inspect, cfg=cfg, read=read, problems=known, budget=budget)
    records: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    kept: dict[str, str] = {}
    for uri, (image_id, size, error) in zip(
        listed, pool.map(inspect, listed) if pool else map(inspect, listed), strict=True
    ):
        if image_id is None:  # unreadable
            assert error is not None
            errors.append(error_row(None, uri, STAGE, *error))
        elif image_id in kept:  # same bytes as a kept image: whatever its own check said
            same = f"same bytes as {kept[image_id]}"
            errors.append(error_row(image_id, uri, STAGE, "duplicate", same))
        elif error is not None:
            errors.append(error_row(image_id, uri, STAGE, *error))
        else:
            assert size is not None
            kept[image_id] = uri
            records.append({"image_id": image_id, "uri": uri, "width": size[0], "height": size[1]})
    return pa.Table.from_pylist(records, schema=RECORD_SCHEMA), errors_table(errors)


def _inspect(
    uri: str,
    cfg: IndexConfig,
    read: Callable[[str], bytes],
    problems: dict[str, tuple[str, str]],
    budget: MemoryBudget | None = None,
) -> tuple[str | None, tuple[int, int] | None, tuple[str, str] | None]:
    """``(image_id, (width, height), None)`` for a good image, else ``(image_id or None if
    unreadable, None, (error_type, message))``; only these, not the bytes, are kept."""
    if uri in problems:
        return None, None, problems[uri]
    try:
        data = read(uri)
    except FileNotFoundError:
        return None, None, ("read_error", "file not found")
    except Exception as exc:
        return None, None, ("read_error", f"{type(exc).__name__}: {exc}")
    image_id = content_hash(data)
    try:
        if cfg.verify_decode:
            width, height = check_image(data, uri, cfg.max_pixels, budget)
        else:
            width, height = image_size(data, uri)
            if width * height > cfg.max_pixels:
                raise ImageDecodeError(
                    uri, f"image too large: {width}x{height} > {cfg.max_pixels}", "too_large"
                )
    except ImageDecodeError as exc:
        return image_id, None, (exc.kind, exc.reason)
    return image_id, (width, height), None


@dataclass(frozen=True)
class IndexShardSpec:
    """Shard input: the URIs of a contiguous run of the sorted listing, and the listing's
    ``problems`` among them (uri -> (error_type, message)), which are not read."""

    uris: tuple[str, ...]
    problems: tuple[tuple[str, str, str], ...] = ()


class IndexWorker:
    """ShardWorker for ``index``: reads images with fsspec, no models."""

    def __init__(self, cfg: IndexConfig, storage_options: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.read = functools.partial(read_bytes, storage_options=storage_options)
        self.pool = ThreadPoolExecutor(READERS, thread_name_prefix="fmbseg-index")
        self.budget = MemoryBudget(WORKER_DECODE_BUDGET)

    def process(self, shard: int, spec: IndexShardSpec) -> tuple[pa.Table, pa.Table]:
        problems = {uri: (kind, message) for uri, kind, message in spec.problems}
        return index_images(spec.uris, self.cfg, self.read, self.pool, problems, self.budget)


@dataclass(frozen=True)
class IndexPlan:
    """A listed source and the fingerprint its index will have; ``root`` is the folder or
    URI prefix its URIs are relative to (:func:`fmbseg.data.sources.source_root`)."""

    source: str
    fingerprint: str
    refs: tuple[ImageRef, ...]
    shard_size: int
    root: str | None = None
    skipped: tuple[tuple[str, int], ...] = ()  # (extension, files) the walk left out
    # listing_hash(refs), kept so the run does not hash a large listing again ("": not yet)
    digest: str = ""

    def specs(self) -> list[IndexShardSpec]:
        specs = []
        for r in plan_shards(len(self.refs), self.shard_size):
            refs = self.refs[r.start : r.stop]
            problems = tuple((x.uri, *x.problem) for x in refs if x.problem)
            specs.append(IndexShardSpec(tuple(x.uri for x in refs), problems))
        return specs


def plan_index(
    source: str,
    cfg: Config,
    storage_options: dict[str, Any] | None = None,
    image_root: str | None = None,
    store_uri: str | None = None,
) -> IndexPlan:
    """List ``source`` and compute the stage fingerprint (no image is read).

    A list's entries may use the protocols ``cfg.index.allowed_protocols`` names, ``store``
    standing for ``store_uri``'s.
    """
    allowed = allowed_protocols(cfg.index.allowed_protocols, store_uri)
    skipped: Counter[str] = Counter()
    refs = list_images(
        source, cfg.index.extensions, storage_options, image_root, allowed=allowed, skipped=skipped
    )
    root = source_root(source, image_root, storage_options)
    return listed_plan(str(source), refs, cfg, root, tuple(sorted(skipped.items())))


def listed_plan(
    source: str,
    refs: Sequence[ImageRef],
    cfg: Config,
    root: str | None = None,
    skipped: tuple[tuple[str, int], ...] = (),
) -> IndexPlan:
    """The plan of an index of ``refs``: the listing hashed once, for its digest and the
    fingerprint."""
    digest = listing_hash(refs)
    fp = _fingerprint(cfg, digest)
    return IndexPlan(source, fp, tuple(refs), cfg.runtime.shard_size, root, skipped, digest)


def dedup_across_shards(
    store: ArtifactStore, stage: str, fp: str, receipts: dict[int, ShardReceipt]
) -> dict:
    """Finalize hook: keep each image_id in its first shard; later copies become errors.

    Reads the shards in order, a few ahead in threads (object-store GETs overlap; at most
    :data:`READERS` shards are held). Rewrites only shards that hold a later copy and puts
    their new receipts in ``receipts``. Idempotent, so a resumed run may repeat it.
    Returns manifest meta: ``images``, ``duplicates`` and ``errors_by_type`` counts.
    """
    kept: dict[str, str] = {}
    images = 0
    by_type: Counter[str] = Counter()

    def read(shard: int) -> tuple[pa.Table, pa.Table]:
        r = receipts[shard]
        return store.read_receipted(stage, fp, r), store.read_receipted(stage, fp, r, "errors")

    for shard, (records, errors) in enumerate(in_order_ahead(read, len(receipts), READERS)):
        ids, uris = records.column("image_id").to_pylist(), records.column("uri").to_pylist()
        later = [i for i, image_id in enumerate(ids) if image_id in kept]
        if later:
            dup_rows = [
                error_row(ids[i], uris[i], stage, "duplicate", f"same bytes as {kept[ids[i]]}")
                for i in later
            ]
            mask = pa.array([image_id not in kept for image_id in ids])
            records = records.filter(mask)
            parts = [t for t in (errors, errors_table(dup_rows)) if t.num_columns]
            errors = pa.concat_tables([t.cast(ERRORS_SCHEMA) for t in parts])
            receipts[shard] = store.write_shard(stage, fp, shard, records, errors)
            log.info("%s/%s shard %d: %d cross-shard duplicates", stage, fp, shard, len(later))
        for image_id, uri in zip(
            records.column("image_id").to_pylist(), records.column("uri").to_pylist(), strict=True
        ):
            kept[image_id] = uri
        images += records.num_rows
        if errors.num_rows:
            by_type.update(errors.column("error_type").to_pylist())
    return {
        "images": images,
        "duplicates": by_type.get("duplicate", 0),
        "errors_by_type": dict(sorted(by_type.items())),
    }


def prepare(job: StageRun) -> Prepared:
    """The shards of the listing ``job.given`` (an :class:`IndexPlan`)."""
    listing: IndexPlan = job.given
    meta = {
        "source": listing.source,
        "root": listing.root,
        "listed": len(listing.refs),
        "skipped_extensions": dict(listing.skipped),
    }
    worker = functools.partial(IndexWorker, job.cfg.index, job.storage_options)
    return Prepared(listing.specs(), worker, meta, finalize=dedup_across_shards)


INDEX = Stage(
    STAGE,
    CODE_VERSION,
    inputs=("source",),  # the listing's hash (:func:`fmbseg.data.sources.listing_hash`)
    # the shard size too: shard ``i`` must mean the same URIs to a resumed run as to the
    # run that wrote its receipt
    parts=lambda job: {"index": job.cfg.index, "shard_size": job.cfg.runtime.shard_size},
    prepare=prepare,
)


def index_fingerprint(cfg: Config, refs: Sequence[ImageRef]) -> str:
    """The fingerprint :data:`INDEX` has on the listing ``refs``."""
    return _fingerprint(cfg, listing_hash(refs))


def _fingerprint(cfg: Config, digest: str) -> str:
    return INDEX.fingerprint(StageRun(None, cfg, {"source": digest}))  # type: ignore[arg-type]


def index_job(
    store: ArtifactStore,
    listing: IndexPlan,
    cfg: Config,
    storage_options: dict[str, Any] | None = None,
) -> StageRun:
    """The run of :data:`INDEX` over ``listing``, its fingerprint planned."""
    fps = {"source": listing.digest or listing_hash(listing.refs)}
    job = StageRun(store, cfg, fps, storage_options=storage_options, given=listing)
    return dataclasses.replace(job, fps=plan((INDEX,), job))


def run_index(
    store: ArtifactStore,
    source: str,
    cfg: Config,
    *,
    storage_options: dict[str, Any] | None = None,
    image_root: str | None = None,
    progress: Progress | None = None,
) -> str:
    """List, index and commit ``source`` (or reuse its index); returns the fingerprint."""
    listing = plan_index(source, cfg, storage_options, image_root, store.uri)
    job = index_job(store, listing, cfg, storage_options)
    run((INDEX,), job, {STAGE: progress} if progress else None)
    return job.fp(STAGE)


def read_index(store: ArtifactStore, fp: str) -> pa.Table:
    """The committed index ``fp`` as one table of RECORD_SCHEMA, in listing order."""
    table = store.read_table(STAGE, fp)
    if not table.num_columns:
        return RECORD_SCHEMA.empty_table()
    return table.cast(RECORD_SCHEMA)


def count_errors(store: ArtifactStore, stage: str, fp: str) -> dict[str, int]:
    """``error_type -> count`` over a committed stage's errors table."""
    errors = store.read_table(stage, fp, "errors", columns=["error_type"])
    if not errors.num_rows:
        return {}
    counts = pc.value_counts(errors.column("error_type")).to_pylist()
    return {c["values"]: c["counts"] for c in sorted(counts, key=lambda c: c["values"])}
