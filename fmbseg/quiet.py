"""Silencing a known third-party warning around one call, safely from several threads.

``warnings.catch_warnings`` swaps the process-wide filter list in and out (before Python
3.14), so two threads inside it at once can leave each other's filter behind for good, or
drop a filter set meanwhile. fmbseg silences warnings from its loader and writer threads
(PIL's decompression-bomb warning, pycocotools' NumPy 2 deprecation warning), so every such
block goes through :func:`ignoring`, one thread at a time. Keep what runs inside short: a
long call there (an image's pixel decode) would serialise the threads.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator

__all__ = ["ignoring"]

_LOCK = threading.RLock()


@contextlib.contextmanager
def ignoring(*categories: type[Warning]) -> Iterator[None]:
    """Ignore warnings of ``categories`` inside the block; thread-safe (see module doc)."""
    with _LOCK, warnings.catch_warnings():
        for category in categories:
            warnings.simplefilter("ignore", category)
        yield
