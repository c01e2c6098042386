"""The Ray executor of :mod:`fmbseg.tasks.runner` (``runtime.executor: ray``).

A pool of threaded Ray actors, each a :class:`RemoteSlot` (a worker built once, models
loaded once) holding up to ``SLOT_DEPTH`` shards; shards stream to whichever actor has room.
An actor that dies is replaced and its shards resubmitted, up to ``runtime.max_retries``
times per shard; a worker that cannot be built fails the stage with its original error.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from fmbseg.config import RuntimeConfig
from fmbseg.storage.store import ArtifactStore, ShardReceipt
from fmbseg.tasks.ray_cluster import connect
from fmbseg.tasks.runner import SLOT_DEPTH, ShardSlot, ShardWorker, StageError, Target, target_label

log = logging.getLogger(__name__)


class BuildFailed(Exception):
    """Raised by a Ray slot whose worker could not be built: carries the original error."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.cause = cause

    def __reduce__(self) -> tuple[Any, ...]:
        return (BuildFailed, (self.cause,))


class RemoteSlot(ShardSlot):
    """The Ray actor's body: a failed build is kept and raised by ``run``, so the driver
    receives the original exception (an actor's failed ``__init__`` only reaches it as text)."""

    def __init__(
        self,
        store: ArtifactStore,
        targets: Sequence[Target],
        worker_factory: Callable[[], ShardWorker],
    ) -> None:
        self.build_error: Exception | None = None
        try:
            super().__init__(store, targets, worker_factory)
        except Exception as exc:  # everything but the worker is set before the build
            self.build_error = exc

    def run(self, shard: int, spec: Any) -> list[ShardReceipt]:
        if self.build_error is not None:
            raise BuildFailed(self.build_error)
        return super().run(shard, spec)


def last_line(exc: BaseException) -> str:
    """The final line of a Ray error (the original ``Type: message``), without the traceback."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def pool_shape(runtime: RuntimeConfig, use_gpu: bool, n_todo: int) -> tuple[int, float]:
    """(number of actors, GPUs per actor) for the connected Ray cluster."""
    import ray

    cluster_gpus = float(ray.cluster_resources().get("GPU", 0.0))
    gpus = runtime.gpus_per_worker if use_gpu and cluster_gpus > 0 else 0.0
    if runtime.num_workers > 0:
        n = runtime.num_workers
    elif gpus > 0:
        n = max(1, int(cluster_gpus // gpus))
    else:
        n = 1
    return max(1, min(n, n_todo)), gpus


def run_ray(
    store: ArtifactStore,
    targets: Sequence[Target],
    specs: Sequence[Any],
    todo: list[int],
    worker_factory: Callable[[], ShardWorker],
    runtime: RuntimeConfig,
    use_gpu: bool,
    on_done: Callable[[list[ShardReceipt]], None],
) -> None:
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    connect(runtime.ray_address)
    n_actors, gpus = pool_shape(runtime, use_gpu, len(todo))
    actor_cls = ray.remote(RemoteSlot).options(  # type: ignore[attr-defined]
        num_cpus=runtime.cpus_per_worker,
        num_gpus=gpus,
        max_restarts=0,
        max_task_retries=0,
        max_concurrency=SLOT_DEPTH,
    )
    factory_ref = ray.put(worker_factory)

    def new_actor() -> Any:
        return actor_cls.remote(store, targets, factory_ref)

    label = target_label(targets)
    log.info("%s: %d shards on %d Ray actors (%.2g GPU each)", label, len(todo), n_actors,
             gpus)  # fmt: skip
    queue = deque(todo)
    attempts = dict.fromkeys(todo, 0)
    live = [new_actor() for _ in range(n_actors)]
    idle = [a for _ in range(SLOT_DEPTH) for a in live]  # one entry per free place
    pending: dict[Any, tuple[Any, int]] = {}
    try:
        while queue or pending:
            while idle and queue:
                actor, shard = idle.pop(), queue.popleft()
                attempts[shard] += 1
                pending[actor.run.remote(shard, specs[shard])] = (actor, shard)
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                actor, shard = pending.pop(ref)
                try:
                    written = ray.get(ref)
                except RayActorError as exc:
                    if getattr(exc, "actor_init_failed", False):
                        raise StageError(
                            f"{label}: the worker could not be built "
                            f"(while starting shard {shard}): {last_line(exc)}"
                        ) from exc
                    if attempts[shard] > runtime.max_retries:
                        raise StageError(
                            f"{label}: shard {shard} failed: its worker died "
                            f"on each of {attempts[shard]} attempts; last cause: {exc}"
                        ) from exc
                    queue.appendleft(shard)
                    if actor not in live:  # its other shard already reported the death
                        continue
                    log.warning("%s: worker died on shard %d (attempt %d); replacing it",
                                label, shard, attempts[shard])  # fmt: skip
                    ray.kill(actor)
                    live.remove(actor)
                    idle = [a for a in idle if a is not actor]
                    replacement = new_actor()
                    live.append(replacement)
                    idle += [replacement] * SLOT_DEPTH
                    continue
                except RayTaskError as exc:
                    cause = exc.cause if exc.cause is not None else exc
                    if isinstance(cause, BuildFailed):
                        raise StageError(
                            f"{label}: the worker could not be built "
                            f"(while starting shard {shard}): {cause}",
                            cause.cause,
                        ) from cause.cause
                    raise StageError(
                        f"{label}: shard {shard} failed: {type(cause).__name__}: {cause}",
                        cause,
                    ) from exc
                idle.append(actor)
                on_done(written)
    finally:
        for actor in live:
            ray.kill(actor)
