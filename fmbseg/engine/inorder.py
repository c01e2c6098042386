"""The engine's one bounded in-order queue (a worker's post thread, export's file writers,
the local executor's shard writes)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

K = TypeVar("K")
T = TypeVar("T")


class InOrder(Generic[K, T]):
    """Jobs run in a pool while the caller goes on (e.g. the CPU work after a model call
    while the model takes the next image), handed back in submission order.

    ``done(key, future)`` runs in the caller's thread, for the oldest job, once more than
    ``ahead`` are pending and for all of them at :meth:`drain`: what a shard keeps is in
    input order and the same whatever the timing. A model call that failed goes in the
    queue as :meth:`failed`, so its error keeps its place too.
    """

    def __init__(
        self,
        pool: ThreadPoolExecutor,
        done: Callable[[K, Future[T]], None],
        ahead: int = 1,
    ) -> None:
        self.pool, self.done, self.ahead = pool, done, ahead
        self._queue: deque[tuple[K, Future[T]]] = deque()

    def submit(self, key: K, fn: Callable[[], T]) -> None:
        self._push(key, self.pool.submit(fn))

    def failed(self, key: K, exc: BaseException) -> None:
        future: Future[T] = Future()
        future.set_exception(exc)
        self._push(key, future)

    def _push(self, key: K, future: Future[T]) -> None:
        self._queue.append((key, future))
        while len(self._queue) > self.ahead:
            self.done(*self._queue.popleft())

    def drain(self) -> None:
        """Hand back every pending job (waiting for each)."""
        while self._queue:
            self.done(*self._queue.popleft())
