"""The Ray executor of :mod:`fmbseg.engine.runner` (``runtime.executor: ray``).

A pool of threaded Ray actors, each a :class:`RemoteSlot` (a worker built once, models
loaded once) holding up to ``SLOT_DEPTH`` shards; shards stream to whichever *placed* actor
has room. An actor that dies (OOM, segfault, its node lost) is replaced and its shards
resubmitted, up to ``runtime.max_retries`` times per shard; a worker that cannot be built
fails the stage with its original error.

Node loss: a replacement (or any actor) waits for a place on the cluster without holding
shards, so the remaining shards flow to the live actors meanwhile. One still unplaced after
``runtime.placement_timeout_s`` is dropped with a warning, and one more is tried every
``placement_timeout_s`` while the pool is short (the pending request is also what an
autoscaler reacts to), so the pool grows again when nodes come back. When no actor at all
has been placed for that long, the stage fails naming the resources it waits for.

Why our own replacement loop and not Ray's ``max_restarts``/``max_task_retries`` or
``ActorPool``: a restarted Ray actor keeps its queued calls until it is placed again, so
after a node loss its shards wait for that node (or for a place that never comes) instead
of flowing to the live actors, and Ray has no timeout on an actor's placement; ``ActorPool``
resubmits nothing when an actor dies and does not know whether an actor was placed. The
loop waits with ``ray.wait(..., timeout)`` on the shards' refs and on each actor's readiness
ref, so it never blocks on an actor that cannot be placed. ``tests/integration/
test_node_loss.py`` (a real two-node cluster losing a node mid-stage) and the dying-worker
test in ``tests/integration/test_reliability.py`` assert the behaviour this loop gives.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fmbseg.config import RuntimeConfig
from fmbseg.engine.ray_cluster import connect
from fmbseg.engine.slot import (
    SLOT_DEPTH,
    ShardSlot,
    ShardWorker,
    StageError,
    Target,
    target_label,
)
from fmbseg.storage.store import ArtifactStore, ShardReceipt

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

    def __init__(self, *args: Any) -> None:  # ShardSlot's
        self.build_error: Exception | None = None
        try:
            super().__init__(*args)
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
    # num_workers 0: one actor per GPU it can have, else one
    n = runtime.num_workers or (int(cluster_gpus // gpus) if gpus else 1)
    return max(1, min(n, n_todo)), gpus


TICK_S = 1.0  # how often placement deadlines are looked at while no result arrives


@dataclass(eq=False)
class _Member:
    """One actor of the pool: ``placed`` once the cluster gave it a worker process (or its
    ``ready`` ref resolved); ``free``: places for more shards.

    ``kind``: ``"first"`` (the pool as planned), ``"replacement"`` (for one that died) or
    ``"probe"`` (tried while the pool is short, to grow it back).
    """

    actor: Any
    ready: Any
    since: float
    kind: str
    placed: bool = False
    free: int = SLOT_DEPTH


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
    """Run shards ``todo`` on a pool of Ray actors (see the module docstring)."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    connect(runtime.ray_address)
    n_actors, gpus = pool_shape(runtime, use_gpu, len(todo))
    needs = {"CPU": runtime.cpus_per_worker, **({"GPU": gpus} if gpus else {})}
    actor_cls = ray.remote(RemoteSlot).options(  # type: ignore[attr-defined]
        num_cpus=runtime.cpus_per_worker,
        num_gpus=gpus,
        max_restarts=0,
        max_task_retries=0,
        max_concurrency=SLOT_DEPTH,
    )
    factory_ref = ray.put(worker_factory)
    label = target_label(targets)
    timeout = runtime.placement_timeout_s
    members: dict[Any, _Member] = {}  # actor handle -> member: the pool
    starting: dict[Any, _Member] = {}  # readiness ref -> member whose __init__ is running

    def add(kind: str) -> None:
        actor = actor_cls.remote(store, targets, factory_ref)
        ready = actor.__ray_ready__.remote()  # type: ignore[union-attr]  # Ray's built-in
        member = _Member(actor, ready, time.monotonic(), kind)
        members[actor] = starting[member.ready] = member

    def placed_now(member: _Member) -> None:
        if member.placed:
            return
        member.placed = True
        if member.kind != "first":
            n_placed = sum(m.placed for m in members.values())
            log.info("%s: a worker was placed; %d in the pool", label, n_placed)

    def not_built(
        text: str, shard: int | None = None, cause: BaseException | None = None
    ) -> StageError:
        at = "" if shard is None else f" (while starting shard {shard})"
        return StageError(f"{label}: the worker could not be built{at}: {text}", cause)

    def drop(member: _Member) -> None:
        members.pop(member.actor, None)
        starting.pop(member.ready, None)
        ray.kill(member.actor)

    log.info("%s: %d shards on %d Ray actors (%.2g GPU each)", label, len(todo), n_actors, gpus)
    queue = deque(todo)
    attempts = dict.fromkeys(todo, 0)
    pending: dict[Any, tuple[_Member, int]] = {}
    next_try = float("inf")  # when to try one more actor while the pool is short
    died_starting = 0  # actors in a row that died before their __init__ returned
    for _ in range(n_actors):
        add("first")
    try:
        while queue or pending:
            for member in list(members.values()):
                while member.placed and member.free and queue:
                    shard = queue.popleft()
                    attempts[shard] += 1
                    member.free -= 1
                    pending[member.actor.run.remote(shard, specs[shard])] = (member, shard)
            refs = [*pending, *starting]
            ready, _ = ray.wait(refs, num_returns=1, timeout=TICK_S) if refs else ([], [])
            for ref in ready:
                if ref in starting:
                    member = starting.pop(ref)
                    try:
                        ray.get(ref)
                    except RayActorError as exc:
                        if member.actor not in members:  # its shards reported it first
                            continue
                        if getattr(exc, "actor_init_failed", False):
                            raise not_built(last_line(exc)) from exc
                        died_starting += 1
                        if died_starting > runtime.max_retries:
                            raise StageError(
                                f"{label}: {died_starting} workers in a row died before "
                                f"taking a shard; last cause: {last_line(exc)}"
                            ) from exc
                        log.warning("%s: a worker died while starting; replacing it", label)
                        drop(member)
                        add(member.kind)
                        continue
                    died_starting = 0
                    placed_now(member)
                    continue
                member, shard = pending.pop(ref)
                try:
                    written = ray.get(ref)
                except RayActorError as exc:
                    if getattr(exc, "actor_init_failed", False):
                        raise not_built(last_line(exc), shard) from exc
                    if attempts[shard] > runtime.max_retries:
                        raise StageError(
                            f"{label}: shard {shard} failed: its worker died "
                            f"on each of {attempts[shard]} attempts; last cause: {exc}"
                        ) from exc
                    queue.appendleft(shard)
                    if member.actor not in members:  # its other shard already reported it
                        continue
                    log.warning(
                        "%s: worker died on shard %d (attempt %d); replacing it",
                        label,
                        shard,
                        attempts[shard],
                    )
                    drop(member)
                    add("replacement")
                    continue
                except RayTaskError as exc:
                    cause = exc.cause if exc.cause is not None else exc
                    if isinstance(cause, BuildFailed):
                        raise not_built(str(cause), shard, cause.cause) from cause.cause
                    raise StageError(
                        f"{label}: shard {shard} failed: {type(cause).__name__}: {cause}",
                        cause,
                    ) from exc
                member.free += 1
                on_done(written)
            now = time.monotonic()
            for member in list(members.values()):
                if not member.placed and _has_worker(member.actor):
                    placed_now(member)
            placed = sum(m.placed for m in members.values())
            for member in list(members.values()):
                if member.placed or now - member.since < timeout:
                    continue
                if not placed:
                    raise StageError(
                        f"{label}: no worker could be placed on the Ray cluster within "
                        f"{timeout:g} s (runtime.placement_timeout_s); each waits for "
                        f"{_resources(needs)}, the cluster has {_available()} free"
                    )
                drop(member)
                next_try = now + timeout
                if member.kind != "probe":  # a probe that finds no room is the normal case
                    log.warning(
                        "%s: a worker was not placed within %g s (waits for %s); dropped, "
                        "continuing with %d (one more is tried every %g s)",
                        label,
                        timeout,
                        _resources(needs),
                        placed,
                        timeout,
                    )
            if (len(members) < n_actors and queue and now >= next_try) or not members:
                add("probe")  # the pool grows again once the cluster can place it
                next_try = float("inf")
    finally:
        for member in members.values():
            ray.kill(member.actor)


def _has_worker(actor: Any) -> bool:
    """Whether the cluster has given ``actor`` a worker process (placed it on a node), even
    if its ``__init__`` (model loading) is still running.

    From the GCS's actor table: ``ray.util.state`` would say the same but needs the
    dashboard, and the readiness ref only resolves once ``__init__`` has returned. A Ray
    Client driver (``ray://``) has no GCS connection of its own: there an actor counts as
    placed once its readiness ref resolves.
    """
    import ray._private.state

    try:
        info = ray._private.state.actors(actor._actor_id.hex())
    except Exception:  # not connected to the GCS (Ray Client)
        return False
    return bool(info and (info.get("Pid") or info.get("Address", {}).get("Port")))


def _resources(needs: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in needs.items())


def _available() -> str:
    import ray

    free = ray.available_resources()
    return ", ".join(f"{free.get(k, 0.0):g} {k}" for k in ("CPU", "GPU")) or "nothing"
