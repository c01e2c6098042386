"""One executor slot, the piece both executors share (:mod:`fmbseg.engine.runner` runs it in
this process, :mod:`fmbseg.engine.ray_executor` inside a Ray actor), the worker protocol, and
the stage error both raise."""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import pyarrow as pa

from fmbseg.storage.store import ArtifactStore, ShardReceipt

SLOT_DEPTH = 2  # shards in one slot at once: one being processed, one read ahead or written

Target = tuple[str, str]
"""``(stage, fingerprint)``: where one stage's shards are written and committed."""


class ShardWorker(Protocol):
    """Processes shards of one stage; one instance per executor slot (Ray actor).

    Build models once in ``__init__``; read the shard's inputs from the store in ``process``.
    An optional ``prefetch(shard, spec)`` starts reading a shard's inputs in the worker's own
    threads and returns at once (the slot calls it for the shard it will process next).
    """

    def process(self, shard: int, spec: Any) -> Any:
        """Shard ``shard`` described by ``spec`` -> (records, errors or None); for
        :func:`run_stages` of several stages, a list of those pairs, one per stage."""
        ...


class StageError(RuntimeError):
    """A stage could not complete; the message names the stage, the shard and the cause.

    ``cause`` is the worker's original exception when there is one (also across Ray), so
    callers can tell an input error (missing weights, ...) from a crash.
    """

    def __init__(self, message: str, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.cause = cause


class _InTurn:
    """A lock granted in the order it was asked for (``threading.Lock`` may let a newer
    waiter in first, again and again, and starve an older shard)."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._waiting: deque[object] = deque()

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        me = object()
        with self._cv:
            self._waiting.append(me)
            self._cv.wait_for(lambda: self._waiting[0] is me)
        try:
            yield
        finally:
            with self._cv:
                self._waiting.popleft()
                self._cv.notify_all()


def target_label(targets: Sequence[Target]) -> str:
    """``stage 'x' (fp)`` for one target, ``stages 'x' (fp), 'y' (fp)`` for several."""
    names = ", ".join(f"{stage!r} ({fp})" for stage, fp in targets)
    return f"stage{'s' if len(targets) > 1 else ''} {names}"


def _is_pair(out: Any) -> bool:
    return isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], pa.Table)


class ShardSlot:
    """One executor slot: a worker plus the store it writes to (one target per stage).

    :meth:`run` may be called from ``SLOT_DEPTH`` threads at once (a threaded Ray actor):
    each call hints the worker to prefetch, processes under the slot's lock (one shard at a
    time, in the order the calls came), then writes outside it, so one shard's reading or
    writing overlaps another's processing. The local executor drives :meth:`process` and
    :meth:`write` itself, in order.
    """

    def __init__(
        self,
        store: ArtifactStore,
        targets: Sequence[Target],
        worker_factory: Callable[[], ShardWorker],
    ) -> None:
        self.store, self.targets = store, list(targets)
        self._busy = _InTurn()
        self.worker = worker_factory()

    def prefetch(self, shard: int, spec: Any) -> None:
        """Ask the worker to start reading a shard it will process next (if it can)."""
        hint = getattr(self.worker, "prefetch", None)
        if hint is not None:
            hint(shard, spec)

    def process(self, shard: int, spec: Any) -> list[tuple[pa.Table, pa.Table | None]]:
        """The worker's output for ``shard``, one ``(records, errors)`` pair per target."""
        out = self.worker.process(shard, spec)
        n = len(self.targets)
        if n == 1 and _is_pair(out):
            out = [out]  # else a pass worker's list, writing one of its stages
        if isinstance(out, list | tuple) and len(out) == n and all(_is_pair(o) for o in out):
            return list(out)
        pair = "(pa.Table, pa.Table | None)"
        want = pair if n == 1 else f"a list of {n} {pair} pairs, one per stage"
        stages = "" if n == 1 else f" {[s for s, _ in self.targets]}"
        raise TypeError(
            f"{type(self.worker).__name__}.process must return {want}{stages},"
            f" got {type(out).__name__}"
        )

    def write(self, shard: int, outs: list[tuple[pa.Table, pa.Table | None]]) -> list[ShardReceipt]:
        return [
            self.store.write_shard(stage, fp, shard, *out)
            for (stage, fp), out in zip(self.targets, outs, strict=True)
        ]

    def run(self, shard: int, spec: Any) -> list[ShardReceipt]:
        self.prefetch(shard, spec)
        with self._busy():
            out = self.process(shard, spec)
        return self.write(shard, out)
