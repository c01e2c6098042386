"""What the stage-1 workers share: upstream reads, image reads ahead, errors-table rows.

Shards keep the index's numbering through every stage: shard ``i`` of ``sam_auto`` holds
the masks of the images of shard ``i`` of ``index``.
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Generator, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa

from fmbseg.config import Config
from fmbseg.data.images import WORKER_DECODE_BUDGET
from fmbseg.storage import ArtifactStore, Manifest
from fmbseg.storage.records import error_row

log = logging.getLogger(__name__)

INDEX_STAGE = "index"
PREFETCH = 4  # images read and decoded ahead of the model, in threads
# Images whose model output waits for (or is in) the post thread while the model runs on:
# one is enough to overlap them, and each holds full-size masks (100 SAM masks of a 12 MP
# photo are 1.2 GB of bool), so no more.
POST_AHEAD = 1
T = TypeVar("T")
VOCABULARY_KEY = "vocabulary"  # manifest meta key holding the run's class names
TEACHER_KEY = "models"  # SAM stages' manifest meta: the teacher (models.sam*) that made them
ABSENT = {  # the no_class_present reason where the teacher's presence found no class
    "clip_dense": "CLIP found no vocabulary class in enough crops",
    "sam3": "SAM 3 found no vocabulary class present",
}

Rows = Callable[[], list[dict[str, Any]]]
"""What builds one image's record rows from a model's output (run in a worker's post thread)."""


def teacher(cfg: Config) -> dict[str, Any]:
    """The SAM stages' teacher: ``models.sam``, ``sam_weights``, ``sam_precision`` (in
    their fingerprints, and in their manifests' meta under :data:`TEACHER_KEY`)."""
    m = cfg.models
    return {"sam": m.sam, "sam_weights": m.sam_weights, "sam_precision": m.sam_precision}


def read_vocabulary(manifest: Manifest) -> tuple[str, ...]:
    """The class names recorded in a stage-1 manifest (clip_dense and everything after it)."""
    if VOCABULARY_KEY not in manifest.meta:
        raise ValueError(
            f"{manifest.stage}/{manifest.fingerprint} has no vocabulary in its manifest meta"
        )
    return tuple(manifest.meta[VOCABULARY_KEY])


Columns = tuple[str, ...] | None
"""Columns to read of a shard (hashable: part of a read-ahead's key); None = all."""


class Upstream:
    """A worker's reader of committed upstream shards; each manifest is fetched once (a
    committed manifest never changes). :meth:`prefetch` starts a read in ``pool``'s
    threads; the next :meth:`read` of that shard takes its result.
    """

    def __init__(self, store: ArtifactStore, pool: ThreadPoolExecutor | None = None) -> None:
        self.store = store
        self.pool = pool
        self._manifests: dict[tuple[str, str], Manifest] = {}
        self._ahead: dict[tuple[str, str, int, str, Columns], Future[pa.Table]] = {}

    def manifest(self, stage: str, fp: str) -> Manifest:
        key = (stage, fp)
        if key not in self._manifests:
            self._manifests[key] = self.store.require_manifest(stage, fp)
        return self._manifests[key]

    def read(
        self, stage: str, fp: str, shard: int, kind: str = "part", columns: Columns = None
    ) -> pa.Table:
        """Shard ``shard`` of ``stage/fp`` (an empty, column-less table when it has none);
        only ``columns`` when given (a prefetch must have named the same ones)."""
        key = (stage, fp, shard, kind, columns)
        ahead = self._ahead.pop(key, None)
        return ahead.result() if ahead is not None else self._read(*key)

    def prefetch(
        self,
        stage: str,
        fp: str,
        shard: int,
        kind: str = "part",
        then: Callable[[pa.Table], None] | None = None,
        columns: Columns = None,
    ) -> None:
        """Start reading what :meth:`read` will be asked for (no-op without a pool).

        ``then(table)`` runs in the loader thread once the read succeeds (e.g. to start
        reading the shard's first images); a failed read is raised by :meth:`read`, not here.
        """
        if self.pool is None:
            return
        key = (stage, fp, shard, kind, columns)
        if key not in self._ahead:
            self._ahead[key] = self.pool.submit(self._read, *key)
        if then is not None:
            self._ahead[key].add_done_callback(functools.partial(_then, then, key))

    def _read(self, stage: str, fp: str, shard: int, kind: str, columns: Columns) -> pa.Table:
        m = self.manifest(stage, fp)
        cols = None if columns is None else list(columns)
        return self.store.read_shard(stage, fp, shard, kind, manifest=m, columns=cols)

    def part(
        self, stage: str, fp: str, shard: int, kind: str = "part", columns: Columns = None
    ) -> pa.Table | None:
        """Like :meth:`read`, but None when that shard wrote no records (or errors)."""
        table = self.read(stage, fp, shard, kind, columns)
        return table if table.num_columns else None


def _then(fn: Callable[[pa.Table], None], key: tuple, future: Future[pa.Table]) -> None:
    if future.cancelled() or future.exception() is not None:
        return
    try:
        fn(future.result())
    except Exception:  # noqa: BLE001 - only a hint; the shard's own reads will fail loudly
        log.debug("read-ahead after %s failed", key, exc_info=True)


def load_image(
    uri: str,
    storage_options: dict[str, Any] | None,
    max_pixels: int | None,
    min_side: int | None = None,
    admit: Callable[[int], None] | None = None,
) -> np.ndarray:
    """``HxWx3 uint8 RGB`` pixels of ``uri``; ``min_side``: maybe at reduced size, the short
    side at least this (``decode_image``). ``admit(nbytes)`` is called with the decode's
    peak bytes before it starts (:meth:`ReadAhead.admit`)."""
    from fmbseg.data.images import decode_cost, decode_image
    from fmbseg.data.sources import read_bytes

    data = read_bytes(uri, storage_options)
    if admit is not None:
        admit(decode_cost(data, uri, max_pixels, min_side))
    return decode_image(data, uri, max_pixels, min_side=min_side)


def loader_pool(ahead: int = PREFETCH) -> ThreadPoolExecutor:
    """Threads for :class:`ReadAhead` and :class:`Upstream`. A worker keeps one for all its
    shards: starting and joining threads for every shard costs more than decoding a small
    shard's images."""
    return ThreadPoolExecutor(max_workers=ahead, thread_name_prefix="fmbseg-load")


class _Slot:
    """One read's share of a :class:`ReadAhead`'s budget."""

    __slots__ = ("taken", "urgent")

    def __init__(self) -> None:
        self.taken = 0  # bytes held
        self.urgent = False  # read in the consumer's thread: it goes past the budget


class Deferred(RuntimeError):
    """A read ahead whose decode did not fit the budget: the consumer reads it when it
    needs it (a loader thread never waits for the budget, so it cannot deadlock with the
    images it waits on)."""


class ReadAhead:
    """A worker's image reads, in its loader threads, up to ``ahead`` in flight.

    :meth:`each` yields a shard's images in order while the next ones decode. :meth:`start`
    begins reads before any shard asks for them (a worker's prefetch hint), so a shard does
    not open by waiting for its first decode. At most ``2 * ahead`` started reads are held;
    beyond that the oldest is dropped (a hint, never a result).

    Memory: with ``budget`` (bytes), a load that calls :meth:`admit` before decoding goes
    on only when its decode's bytes fit beside those of the images decoded and not yet
    taken; otherwise it stops (:class:`Deferred`) and the consumer reads that image itself.
    A run of huge images so holds at most ``budget`` plus one image (plus the one the
    consumer is working on), not ``2 * ahead`` images.
    """

    def __init__(
        self,
        load: Callable[[str], np.ndarray],
        pool: ThreadPoolExecutor | None,
        ahead: int = PREFETCH,
        budget: int | None = None,
    ) -> None:
        from fmbseg.data.images import MemoryBudget

        self.load, self.pool, self.ahead = load, pool, ahead
        self.budget = MemoryBudget(budget) if budget else None
        self._lock = threading.Lock()
        self._local = threading.local()
        self._started: OrderedDict[str, tuple[Future[np.ndarray], _Slot]] = OrderedDict()

    def admit(self, nbytes: int) -> None:
        """Called by ``load`` before it decodes ``nbytes``: takes them from the budget, or
        raises :class:`Deferred` when they do not fit (no-op without a budget, or outside
        a read of this object)."""
        slot: _Slot | None = getattr(self._local, "slot", None)
        if self.budget is None or slot is None:
            return
        taken = self.budget.try_acquire(nbytes, force=slot.urgent)
        if taken is None:
            raise Deferred(f"{nbytes} bytes do not fit the read-ahead budget now")
        with self._lock:
            slot.taken += taken

    def _run(self, uri: str, slot: _Slot) -> np.ndarray:
        self._local.slot = slot
        try:
            image = self.load(uri)
        except BaseException:
            self._free(slot)
            raise
        finally:
            self._local.slot = None
        if self.budget is not None:  # from the decode's peak to what the array holds
            with self._lock:
                extra = max(0, slot.taken - image.nbytes)
                slot.taken -= extra
            if extra:
                self.budget.release(extra)
        return image

    def _free(self, slot: _Slot) -> None:
        with self._lock:
            taken, slot.taken = slot.taken, 0
        if taken and self.budget is not None:
            self.budget.release(taken)

    def _drop(self, future: Future[np.ndarray], slot: _Slot) -> None:
        if not future.cancel():
            future.add_done_callback(lambda _: self._free(slot))

    def _start(self, uri: str, pool: ThreadPoolExecutor) -> tuple[Future[np.ndarray], _Slot]:
        slot = _Slot()
        return pool.submit(self._run, uri, slot), slot

    def start(self, uris: Iterable[str]) -> None:
        """Begin reading the first ``ahead`` of ``uris`` (no-op without a pool)."""
        if self.pool is None:
            return
        with self._lock:
            for uri in itertools.islice(uris, self.ahead):
                if uri not in self._started:
                    self._started[uri] = self._start(uri, self.pool)
            dropped = []
            while len(self._started) > 2 * self.ahead:
                dropped.append(self._started.popitem(last=False)[1])
        for future, slot in dropped:
            self._drop(future, slot)

    def _submit(self, uri: str, pool: ThreadPoolExecutor) -> tuple[Future[np.ndarray], _Slot]:
        with self._lock:
            started = self._started.pop(uri, None)
        return started if started is not None else self._start(uri, pool)

    def each(
        self, items: Sequence[T], uri: Callable[[T], str]
    ) -> Generator[tuple[T, np.ndarray | None, Exception | None], None, None]:
        """``(item, image, None)`` or ``(item, None, exception)`` for each item, in order."""
        if self.pool is None:
            with loader_pool(self.ahead) as own:
                yield from self._each(items, uri, own)
        else:
            yield from self._each(items, uri, self.pool)

    def _each(
        self, items: Sequence[T], uri: Callable[[T], str], pool: ThreadPoolExecutor
    ) -> Generator[tuple[T, np.ndarray | None, Exception | None], None, None]:
        window: deque[tuple[T, tuple[Future[np.ndarray], _Slot]]] = deque()
        it = iter(items)
        for item in itertools.islice(it, self.ahead):
            window.append((item, self._submit(uri(item), pool)))
        try:
            while window:
                item, (future, slot) = window.popleft()
                for nxt in itertools.islice(it, 1):
                    window.append((nxt, self._submit(uri(nxt), pool)))
                try:
                    try:
                        image = future.result()
                    except Deferred:  # did not fit beside the others: read it here
                        slot.urgent = True
                        image = self._run(uri(item), slot)
                except Exception as exc:  # handed to the caller: one image's failure
                    yield item, None, exc
                else:
                    try:
                        yield item, image, None
                    finally:
                        self._free(slot)  # the consumer asks for the next one (or stops)
        finally:  # the consumer stopped early: nobody takes the rest
            for _, (future, slot) in window:
                self._drop(future, slot)


def post_pool() -> ThreadPoolExecutor:
    """A worker's post thread for :class:`~fmbseg.engine.inorder.InOrder` (one: results
    come back in order anyway, and the model's own thread is the other busy one)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="fmbseg-post")


def error_from(exc: BaseException, image_id: str | None, uri: str, stage: str) -> dict[str, Any]:
    """An errors-table row for an exception raised while processing one image."""
    kind = getattr(exc, "kind", None)  # ImageDecodeError carries a category
    error_type = f"{type(exc).__name__}:{kind}" if kind else type(exc).__name__
    return error_row(image_id, uri, stage, error_type, str(exc)[:2000])


class ImageShardWorker:
    """Base of the shard workers that read images: one pool of loader threads for the
    worker's life, shared by its upstream shard reads (:attr:`upstream`) and its image reads
    ahead (:attr:`images`); images decode with :attr:`min_side` (see :func:`load_image`).

    Subclasses call ``ImageShardWorker.__init__(self, ...)`` by name: a zero-argument
    ``super()`` in a class that cloudpickle ships by value to a Ray actor (a subclass made at
    run time, as the reliability tests make) can find a different copy of its own class.
    """

    min_side: int | None = None

    def __init__(
        self, store: ArtifactStore, cfg: Config, storage_options: dict[str, Any] | None = None
    ) -> None:
        self.store, self.cfg, self.storage_options = store, cfg, storage_options
        self.loader = loader_pool()
        self.upstream = Upstream(store, self.loader)
        # beyond the image the model waits for: a run of huge images does not hold
        # 2 * PREFETCH of them
        self.images = ReadAhead(self._load, self.loader, budget=WORKER_DECODE_BUDGET)

    def _start_index(self, index: pa.Table) -> None:
        """Start reading an index shard's images (a prefetch's ``then``)."""
        self.images.start(index.column("uri").to_pylist())

    def _load(self, uri: str) -> np.ndarray:
        max_pixels = self.cfg.index.max_pixels
        return load_image(uri, self.storage_options, max_pixels, self.min_side, self.images.admit)
