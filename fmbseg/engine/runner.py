"""The shard executor every stage uses: fan a stage out over shards, resume, commit.

A stage is a list of shard *specs* (small picklable descriptions of each shard's input) and
a *worker factory*. Each executor slot builds one worker (models load once) and calls
``worker.process(shard, spec)``; the slot itself writes the returned tables with
:meth:`ArtifactStore.write_shard`, so record data never flows through the driver, which
keeps only the receipts. Shards that already have receipts are skipped (resume after a
crash), and the manifest is committed last.

Executors (``RuntimeConfig.executor``): ``"local"`` runs one worker in this process, shards
in order; ``"ray"`` a pool of Ray actors (:mod:`fmbseg.engine.ray_executor`), except that a
single shard with no ``ray_address`` runs locally while this process has no Ray yet.

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
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from fmbseg.config import RuntimeConfig
from fmbseg.engine.inorder import InOrder
from fmbseg.engine.slot import ShardSlot, ShardWorker, StageError, Target, target_label
from fmbseg.storage.records import ERROR_SCHEMA as ERRORS_SCHEMA  # noqa: F401 - for the stages
from fmbseg.storage.records import errors_table as errors_table
from fmbseg.storage.store import ArtifactStore, Manifest, ShardReceipt

log = logging.getLogger(__name__)

TIMING_KEY = "timing"  # manifest meta key of a timed run (run_stages(timed=True))

Progress = Callable[[int, int], None]
"""``progress(done, total)``: shards done (including ones done by an earlier run) of total."""

Finalize = Callable[[ArtifactStore, str, str, "dict[int, ShardReceipt]"], "dict[str, Any] | None"]
"""``finalize(store, stage, fp, receipts) -> extra manifest meta``: ``receipts`` holds every
shard's (``0..n-1``); a shard it rewrites must get its new receipt there."""


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
    base, extra = divmod(n_items, n)  # the first `extra` shards get one more item
    starts = [i * base + min(i, extra) for i in range(n + 1)]
    return [range(a, b) for a, b in zip(starts, starts[1:], strict=False)]


def run_stage(
    store: ArtifactStore,
    stage: str,
    fp: str,
    specs: Sequence[Any],
    worker_factory: Callable[[], ShardWorker],
    runtime: RuntimeConfig,
    **options: Any,
) -> Manifest:
    """:func:`run_stages` (with the same keyword ``options``) for one stage: its committed
    manifest."""
    (manifest,) = run_stages(store, [(stage, fp)], specs, worker_factory, runtime, **options)
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
    """Run every shard that has no receipt yet of each ``(stage, fp)`` target, then commit.

    Several stages may share one pass (the two SAM stages share the image embedding): the
    worker returns one ``(records, errors)`` pair per target for each shard, and each stage
    gets its own shard files, receipts and manifest, exactly as if it had run alone. A shard
    is done when every target has its receipt; the others are redone for all targets.

    Args:
        specs: ``specs[i]`` describes shard ``i``'s input; small and picklable.
        worker_factory: picklable zero-argument callable building a :class:`ShardWorker`.
        use_gpu: reserve GPUs for the Ray actors (when the cluster has any).
        progress: called as ``progress(done, total)`` after every shard.
        meta: stored in each manifest (e.g. counts, source description).
        finalize: for a single target: run after all shards are written and before the
            commit (e.g. a cross-shard dedup that rewrites shards, replacing their receipts
            in the dict it is given); its returned dict extends ``meta``.
        timed: record the run's wall time in ``meta`` (:data:`TIMING_KEY`; not in any
            fingerprint): ``{"wall_s", "shards_run", "shards", "outputs"}``, ``outputs``
            (stage -> fingerprint) being the targets that shared that time.

    Returns:
        The committed manifests, one per target. Targets already committed are returned
        without running anything; if another writer commits first, its manifest.

    Raises:
        ValueError: some targets are committed and others not (run the others alone).
        StageError: a shard failed (its message names the shard).
    """
    if not targets:
        raise ValueError("run_stages: no target stages")
    if finalize is not None and len(targets) > 1:
        raise ValueError("run_stages: finalize is for a single target stage")
    total = len(specs)
    existing = [m for stage, fp in targets if (m := store.manifest(stage, fp)) is not None]
    if len(existing) == len(targets):
        for m in existing:
            report(cached_message(store, m))
        if progress:
            progress(total, total)
        return existing
    if existing:
        committed = [(m.stage, m.fingerprint) for m in existing]
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
    count = len(done)

    def on_done(written: list[ShardReceipt]) -> None:  # one receipt per target
        nonlocal count
        for known, receipt in zip(receipts, written, strict=True):
            known[receipt.shard] = receipt
        count += 1
        if progress:
            progress(count, total)

    if todo:
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
    """``4 shards, 20 images, 37 records, 0 errors`` (images when the stage names its index);
    a stage with no shards that made a model (train): ``model fmbseg-align:v0001``."""
    model = f"model {manifest.meta.get('model')}:{manifest.meta.get('version')}"
    if manifest.num_shards == 0 and "model" in manifest.meta:
        return model
    images = stage_images(store, manifest)
    parts = [f"{manifest.num_shards} shards"]
    parts += [f"{images} images"] if images is not None else []
    parts += [f"{manifest.rows} records", f"{manifest.error_rows} errors"]
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
                slot.prefetch(todo[k + 1], specs[todo[k + 1]])
            try:
                out = slot.process(shard, specs[shard])
            except Exception as exc:
                raise failed(shard, exc) from exc
            writes.drain()  # the previous shard's write, before this one's (a failed one stops here)
            writes.submit(shard, functools.partial(slot.write, shard, out))
        writes.drain()
