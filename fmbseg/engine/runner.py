"""The shard executor every stage uses: fan a stage out over shards, resume, commit.

A stage is a list of shard *specs* (small picklable descriptions of each shard's input,
e.g. upstream fingerprints + shard id) and a *worker factory*. Each executor slot builds
one worker (models load once, in the worker's ``__init__``) and calls
``worker.process(shard, spec)`` for the shards it is handed; the slot itself writes the
returned tables with :meth:`ArtifactStore.write_shard`, so record data never flows through
the driver, which keeps only the receipts. Shards that already have receipts are skipped
(resume after a crash), and the manifest is committed last.

A slot keeps the worker busy: while one shard is processed, the next one's inputs are
read (a worker may define ``prefetch(shard, spec)``, a hint that starts reading them in
its own threads and returns at once) and the previous one's tables are written, in threads.
The worker still processes one shard at a time (its models are not shared between threads).

Executors (``RuntimeConfig.executor``):
- ``"local"``: one worker in this process, shards processed in order; writes of shard
  ``i`` overlap shard ``i + 1``. For unit tests, debugging and single-process runs.
- ``"ray"`` (:mod:`fmbseg.engine.ray_executor`), except for a single shard to run with no
  ``ray_address`` while this process has no Ray yet (that runs locally): a pool of Ray actors, each reserving ``cpus_per_worker`` CPUs and, for GPU
  stages on a cluster with GPUs, ``gpus_per_worker`` GPUs. Shards are streamed to whichever
  actor has room; an actor holds up to ``SLOT_DEPTH`` shards (a threaded actor: one
  processed, the other read ahead or written). An actor that dies (OOM, node loss,
  segfault) is replaced and its shards resubmitted, up to ``max_retries`` times per shard;
  one the cluster cannot place within ``placement_timeout_s`` is dropped (none placed:
  the stage fails).

Several stages may share one pass (:func:`run_stages`): the worker returns one output per
stage for each shard, and each stage keeps its own shards, receipts and manifest, exactly as
if it had run alone. (The two SAM stages share the SAM image embedding this way.)

Errors: bad *inputs* (an undecodable image) are the worker's business and become rows of
the shard's errors table (:func:`errors_table`); an exception escaping ``process`` is a bug
and fails the stage with a :class:`StageError` naming the shard.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pyarrow as pa

from fmbseg.config import RuntimeConfig
from fmbseg.engine.inorder import InOrder
from fmbseg.engine.slot import (  # re-exported: callers import them from here
    ShardSlot,
    ShardWorker,
    StageError,
    Target,
    _hint_prefetch,
    target_label,
)
from fmbseg.storage.records import ERROR_SCHEMA
from fmbseg.storage.store import ArtifactStore, Manifest, ShardReceipt

log = logging.getLogger(__name__)

TIMING_KEY = "timing"  # manifest meta key of a timed run (run_stages(timed=True))

Progress = Callable[[int, int], None]
"""``progress(done, total)``: shards done (including ones done by an earlier run) of total."""

Finalize = Callable[[ArtifactStore, str, str, "dict[int, ShardReceipt]"], "dict[str, Any] | None"]
"""``finalize(store, stage, fp, receipts) -> extra manifest meta``: ``receipts`` holds every
shard's (``0..n-1``); a shard it rewrites must get its new receipt there."""

ERRORS_SCHEMA = (
    ERROR_SCHEMA  # every stage's errors table: uri, image_id, stage, error_type, message
)


def errors_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Rows ``{uri, image_id, stage, error_type, message}`` -> a table of ERRORS_SCHEMA.

    Every stage's errors table has these columns, so they concatenate across stages.
    """
    names = ERRORS_SCHEMA.names
    for i, row in enumerate(rows):
        missing = [n for n in names if n not in row]
        if missing:
            raise ValueError(f"error row {i} lacks {missing}; expected keys {names}")
    return pa.Table.from_pylist([{n: r[n] for n in names} for r in rows], schema=ERRORS_SCHEMA)


def plan_shards(n_items: int, shard_size: int) -> list[range]:
    """Split ``range(n_items)`` into ``ceil(n_items / shard_size)`` contiguous ranges.

    Sizes differ by at most one (balanced) and depend only on the two arguments.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if n_items < 0:
        raise ValueError(f"n_items must be >= 0, got {n_items}")
    if n_items == 0:
        return []
    n = -(-n_items // shard_size)
    base, extra = divmod(n_items, n)
    out, start = [], 0
    for i in range(n):
        stop = start + base + (1 if i < extra else 0)
        out.append(range(start, stop))
        start = stop
    return out


def run_stage(
    store: ArtifactStore,
    stage: str,
    fp: str,
    specs: Sequence[Any],
    worker_factory: Callable[[], ShardWorker],
    runtime: RuntimeConfig,
    *,
    use_gpu: bool = False,
    progress: Progress | None = None,
    meta: dict[str, Any] | None = None,
    finalize: Finalize | None = None,
    timed: bool = False,
) -> Manifest:
    """Run every shard of ``stage/fp`` that has no receipt yet, then commit the manifest.

    Args:
        specs: ``specs[i]`` describes shard ``i``'s input; small and picklable.
        worker_factory: picklable zero-argument callable building a :class:`ShardWorker`.
        use_gpu: reserve GPUs for the Ray actors (when the cluster has any).
        progress: called as ``progress(done, total)`` after every shard.
        meta: stored in the manifest (e.g. counts, source description).
        finalize: run after all shards are written and before the commit (e.g. a
            cross-shard dedup that rewrites shards, replacing their receipts in the dict it
            is given); its returned dict extends ``meta``.
        timed: record the run's wall time in ``meta`` (:data:`TIMING_KEY`; not in any
            fingerprint): ``{"wall_s", "shards_run", "shards", "outputs"}``, ``outputs``
            (stage -> fingerprint) being the targets that shared that time (one pass).

    Returns:
        The committed manifest. If ``stage/fp`` was already committed, that manifest,
        without running anything; if another writer commits first, theirs.
    """
    (manifest,) = run_stages(
        store,
        [(stage, fp)],
        specs,
        worker_factory,
        runtime,
        use_gpu=use_gpu,
        progress=progress,
        meta=meta,
        finalize=finalize,
        timed=timed,
    )
    return manifest


def run_stages(
    store: ArtifactStore,
    targets: Sequence[Target],
    specs: Sequence[Any],
    worker_factory: Callable[[], ShardWorker],
    runtime: RuntimeConfig,
    *,
    use_gpu: bool = False,
    progress: Progress | None = None,
    meta: dict[str, Any] | None = None,
    finalize: Finalize | None = None,
    timed: bool = False,
) -> list[Manifest]:
    """:func:`run_stage` for stages that share one pass over the same shards.

    The worker returns one ``(records, errors)`` pair per target for each shard; each
    stage gets its own shard files, receipts and manifest (``meta`` in each). A shard is
    done when every target has its receipt; the others are redone for all targets. Either
    all targets are committed already (their manifests are returned, nothing runs) or none
    is; ``finalize`` is for a single target.
    """
    if not targets:
        raise ValueError("run_stages: no target stages")
    if finalize is not None and len(targets) > 1:
        raise ValueError("run_stages: finalize is for a single target stage")
    total = len(specs)
    existing = [store.manifest(stage, fp) for stage, fp in targets]
    if all(m is not None for m in existing):
        reused = [m for m in existing if m is not None]
        for m in reused:
            report(cached_message(store, m))
        if progress:
            progress(total, total)
        return reused
    if any(m is not None for m in existing):
        committed = [t for t, m in zip(targets, existing, strict=True) if m is not None]
        raise ValueError(
            f"run_stages: {target_label(committed)} already committed, the others not;"
            " run the others on their own"
        )
    # receipts per target: listed now, then each write's; the commit needs them all
    receipts = [store.shard_receipts(stage, fp) for stage, fp in targets]
    done = set.intersection(*(set(r) for r in receipts)) & set(range(total))
    todo = [i for i in range(total) if i not in done]
    if done:
        for stage, _ in targets:
            report(f"{stage}: resumed, {len(done)} of {total} shards already committed")
    if progress:
        progress(len(done), total)
    started = time.perf_counter()
    if todo:
        on_done = _counter(receipts, len(done), total, progress)
        if _runs_locally(runtime, len(todo)):
            _run_local(store, targets, specs, todo, worker_factory, on_done)
        else:
            from fmbseg.engine.ray_executor import run_ray

            run_ray(store, targets, specs, todo, worker_factory, runtime, use_gpu, on_done)
    manifests = []
    timing = {
        "wall_s": round(time.perf_counter() - started, 3),
        "shards_run": len(todo),
        "shards": total,
        "outputs": dict(targets),
    }
    for (stage, fp), known in zip(targets, receipts, strict=True):
        all_meta = dict(meta or {})
        if timed:
            all_meta[TIMING_KEY] = timing
        shards = {i: known[i] for i in range(total) if i in known}  # commit names any missing
        if finalize is not None:  # it may rewrite shards, and replaces their receipts
            all_meta.update(finalize(store, stage, fp, shards) or {})
        manifest, won = store.commit(stage, fp, total, meta=all_meta, receipts=shards)
        if won:
            store.sweep(stage, fp)
            report(f"{stage}: done (fingerprint {fp}), {counts(store, manifest)}")
        else:
            report(cached_message(store, manifest) + " (another writer committed it first)")
        manifests.append(manifest)
    return manifests


# ---- what a run reports: reused, resumed, done --------------------------------------------------


Reporter = Callable[[str], None]
_reporters: list[Reporter] = []
_reporters_lock = threading.Lock()


def add_reporter(reporter: Reporter) -> Callable[[], None]:
    """Call ``reporter(message)`` for every stage report in this process ("clip_dense:
    cached (fingerprint ...)", "sam_auto: resumed, 5 of 20 shards already committed", "merge:
    done (fingerprint ...), 4 shards, ..."); returns the function that removes it."""
    with _reporters_lock:
        _reporters.append(reporter)

    def remove() -> None:
        with _reporters_lock:
            _reporters.remove(reporter)

    return remove


def report(message: str) -> None:
    """Log ``message`` and hand it to every reporter (a failing reporter never fails a stage)."""
    log.info("%s", message)
    with _reporters_lock:
        reporters = list(_reporters)
    for reporter in reporters:
        try:
            reporter(message)
        except Exception as exc:
            log.warning("stage report not delivered: %s", exc)


# manifest meta keys naming an upstream stage's fingerprint, nearest the index first
_UPSTREAM = ("index", "clip_dense", "merge")


def stage_images(store: ArtifactStore, manifest: Manifest, depth: int = 4) -> int | None:
    """Images a stage's output covers: the index's rows, found through the manifest meta's
    upstream fingerprints (``index``, ``clip_dense``, ``merge``); None for a stage that
    names none (training features, evaluation)."""
    if manifest.stage == "index":
        return manifest.rows
    for key in _UPSTREAM:
        up = manifest.meta.get(key)
        if depth and isinstance(up, str) and (m := store.manifest(key, up)) is not None:
            return stage_images(store, m, depth - 1)
    return None


def counts(store: ArtifactStore, manifest: Manifest) -> str:
    """``4 shards, 20 images, 37 records, 0 errors`` (images when the stage names its index)."""
    images = stage_images(store, manifest)
    parts = [f"{manifest.num_shards} shards"]
    parts += [f"{images} images"] if images is not None else []
    parts += [f"{manifest.rows} records", f"{manifest.error_rows} errors"]
    if "model" in manifest.meta and "version" in manifest.meta:  # train: the model it made
        parts.append(f"model {manifest.meta['model']}:{manifest.meta['version']}")
    return ", ".join(parts)


def cached_message(store: ArtifactStore, manifest: Manifest) -> str:
    """``stage: cached (fingerprint fp), <counts>``: a committed stage that is reused."""
    return (
        f"{manifest.stage}: cached (fingerprint {manifest.fingerprint}), {counts(store, manifest)}"
    )


def _runs_locally(runtime: RuntimeConfig, n_todo: int) -> bool:
    """The local executor: asked for, or one shard to run on a Ray nobody asked for yet.

    Starting a local Ray and an actor costs more than a small job's whole work, so a single
    shard with no ``ray_address`` runs here unless this process has started Ray already.
    """
    if runtime.executor == "local":  # else "ray": RuntimeConfig admits no other value
        return True
    ray = sys.modules.get("ray")  # not imported: certainly not initialised (and stays so)
    started = ray is not None and ray.is_initialized()
    return n_todo == 1 and runtime.ray_address is None and not started


def _counter(
    receipts: list[dict[int, ShardReceipt]], start: int, total: int, progress: Progress | None
) -> Callable[[list[ShardReceipt]], None]:
    """``on_done(receipts of a shard, one per target)``: keeps them, reports progress."""
    count = [start]

    def tick(written: list[ShardReceipt]) -> None:
        for known, receipt in zip(receipts, written, strict=True):
            known[receipt.shard] = receipt
        count[0] += 1
        if progress:
            progress(count[0], total)

    return tick


def _run_local(
    store: ArtifactStore,
    targets: Sequence[Target],
    specs: Sequence[Any],
    todo: list[int],
    worker_factory: Callable[[], ShardWorker],
    on_done: Callable[[list[ShardReceipt]], None],
) -> None:
    slot = ShardSlot(store, targets, worker_factory)
    label = target_label(targets)

    def failed(shard: int, exc: Exception) -> StageError:
        return StageError(f"{label}: shard {shard} failed: {type(exc).__name__}: {exc}", exc)

    def finish(shard: int, write: Future[list[ShardReceipt]]) -> None:
        try:
            written = write.result()
        except Exception as exc:
            raise failed(shard, exc) from exc
        on_done(written)

    # shard i+1 is prefetched while shard i is processed, and shard i is written while
    # shard i+1 is processed; at most one write in flight
    with ThreadPoolExecutor(1, thread_name_prefix=f"fmbseg-write-{targets[0][0]}") as writer:
        writes: InOrder[int, list[ShardReceipt]] = InOrder(writer, finish)
        for k, shard in enumerate(todo):
            if k + 1 < len(todo):
                _hint_prefetch(slot.worker, todo[k + 1], specs[todo[k + 1]])
            try:
                out = slot.process(shard, specs[shard])
            except Exception as exc:
                raise failed(shard, exc) from exc
            writes.drain()  # the previous shard's write, before this one's (a failed one stops here)
            writes.submit(shard, functools.partial(slot.write, shard, out))
        writes.drain()
