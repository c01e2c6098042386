"""What every bench shares: its clock, device synchronisation, peak memory and tables.

A bench compares our path with the straightforward reference on the same inputs in one
run; this module only measures and prints, so each bench reads as its two paths.

- :func:`timed` runs a call (warm-ups untimed, ``repeat`` runs of ``number`` calls each,
  CUDA synchronised around each run) and returns a :class:`Timing` (seconds per call of
  each run, best, median, the last result); :func:`per_item` times one call per input.
- :class:`ModelBuilds` leaves model builds out of a path's time.
- :func:`peak_memory` measures the peak of GPU memory (CUDA's allocator), the process's
  resident set (RSS) or the Python heap (``tracemalloc``) over a ``with`` block.
- :func:`table` and :func:`ratio_table` print aligned figures and their ratios.

Importing this module imports neither torch nor numpy: benches without them stay light.
"""

from __future__ import annotations

import argparse
import gc
import re
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

MemoryKind = Literal["cuda", "rss", "heap"]


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser described by the first line of a bench's docstring."""
    return argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)


def hw(text: str) -> tuple[int, int]:
    """``"480x640"`` -> ``(480, 640)``: an image size as HxW (an argparse ``type``)."""
    found = re.fullmatch(r"(\d+)x(\d+)", text)
    if not found:
        raise argparse.ArgumentTypeError(f"size {text!r} is not HxW in pixels, e.g. 480x640")
    return int(found.group(1)), int(found.group(2))


def device_sync(device: Any = None) -> None:
    """Wait for the work queued on CUDA (on ``device``'s type only, when given), so a clock
    read next covers it; nothing when torch is not loaded or has no CUDA."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return
    if device is None or torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@dataclass(frozen=True)
class Timing:
    """Seconds per call of each timed run, and what the last call returned."""

    runs: tuple[float, ...]
    result: Any = None

    @property
    def best(self) -> float:
        return min(self.runs)

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def seconds(self) -> float:
        """The figure of a single run."""
        if len(self.runs) != 1:
            raise ValueError(f"{len(self.runs)} runs: take their best or median")
        return self.runs[0]


def timed(
    fn: Callable[[], Any], *, repeat: int = 1, number: int = 1, warmup: int = 0, sync: bool = True
) -> Timing:
    """``fn()`` ``warmup`` times untimed, then ``repeat`` runs of ``number`` calls each; a run's
    figure is its seconds per call. With ``sync`` the device is synchronised before and after
    each run (:func:`device_sync`), so queued GPU work is inside the run that queued it."""
    for _ in range(warmup):
        fn()
    runs, result = [], None
    for _ in range(repeat):
        if sync:
            device_sync()
        start = time.perf_counter()
        for _ in range(number):
            result = fn()
        if sync:
            device_sync()
        runs.append((time.perf_counter() - start) / number)
    return Timing(tuple(runs), result)


def per_item(fn: Callable[[Any], Any], items: Sequence[Any], *, warmup: int = 1) -> Timing:
    """``fn`` on every item in one timed run, after ``fn`` on the first ``warmup`` items
    (allocator, kernels): seconds per item, and the list of what ``fn`` returned."""
    for item in items[:warmup]:
        fn(item)
    run = timed(lambda: [fn(item) for item in items])
    return Timing((run.seconds / len(items),), run.result)


class ModelBuilds:
    """The seconds spent building models, to leave them out of a path's time.

    Wraps ``fmbseg.models.registry.build_from_config``, where the stages look it up, for
    the rest of the process; ``wrap`` (if given) wraps each model built.
    """

    def __init__(self, wrap: Callable[[Any], Any] | None = None) -> None:
        from fmbseg.models import registry

        self.seconds = 0.0
        build = registry.build_from_config

        def timed_build(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                model = build(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
            return model if wrap is None else wrap(model)

        registry.build_from_config = timed_build  # type: ignore[assignment]


def memory_kind(device: Any) -> MemoryKind:
    """What a path's peak memory means on ``device``: GPU memory on CUDA, else the RSS."""
    import torch

    return "cuda" if torch.device(device).type == "cuda" else "rss"


def reset_peak(kind: MemoryKind) -> int:
    """Free what earlier work left (garbage, CUDA's cache), start a new peak of ``kind`` and
    return the bytes in use now. RSS: Linux restarts its peak (VmHWM); elsewhere the peak
    stays the process's lifetime peak."""
    gc.collect()
    if kind == "cuda":
        import torch

        device_sync("cuda")
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    elif kind == "heap":
        if not tracemalloc.is_tracing():
            tracemalloc.start()
        tracemalloc.reset_peak()
    else:
        try:  # "5" resets VmHWM, the peak resident set, to the resident set now
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
    return peak_bytes(kind)


def peak_bytes(kind: MemoryKind) -> int:
    """The peak since :func:`reset_peak`: of memory CUDA's allocator handed out, the
    process's resident set (VmHWM; else ``ru_maxrss``) or ``tracemalloc``'s traced heap."""
    if kind == "cuda":
        import torch

        device_sync("cuda")
        return int(torch.cuda.max_memory_allocated())
    if kind == "heap":
        return tracemalloc.get_traced_memory()[1]
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource

        unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, else KiB
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit


@dataclass
class Peak:
    """Memory of a ``with peak_memory(...)`` block, in bytes (set when the block ends)."""

    start: int = 0  # in use when the block began
    bytes: int = 0  # the peak during the block

    @property
    def mib(self) -> float:
        return self.bytes / 2**20

    @property
    def growth(self) -> int:
        """Bytes the block added on top of what was in use when it began."""
        return self.bytes - self.start


@contextmanager
def peak_memory(kind: MemoryKind) -> Iterator[Peak]:
    """The peak memory of ``kind`` during the block (see :func:`reset_peak`)."""
    peak = Peak(start=reset_peak(kind))
    try:
        yield peak
    finally:
        peak.bytes = peak_bytes(kind)


def _header(name: str, spec: str) -> str:
    """``name`` aligned as values of ``spec`` are: left if it starts with '<', else right."""
    found = re.match(r"([<>^]?)(\d*)", spec)
    align, width = found.group(1) if found else "", found.group(2) if found else ""
    return f"{name:{align or '>'}{width}}"


def table(columns: Sequence[tuple[str, str]], rows: Sequence[Sequence[Any]]) -> None:
    """Print a header and one line per row: ``columns`` are (header, format spec) pairs
    (e.g. ``("path", "<34")``, ``("s/image", "9.4f")``), one per value of a row."""
    print(" ".join(_header(name, spec) for name, spec in columns))
    for row in rows:
        print(" ".join(format(v, spec) for v, (_, spec) in zip(row, columns, strict=True)))


def ratio_table(
    columns: Sequence[tuple[str, str]],
    rows: Sequence[tuple[str, Sequence[float]]],
    base: str,
    ratio: str = "vs ours",
) -> None:
    """Print paths measured in the same run: each row a path's name and figures, each
    figure followed by its ratio to the same figure of row ``base`` (e.g. our path).
    ``columns``: the name column first, then one (header, format spec) per figure."""
    head, *figure_columns = columns
    with_ratios = [head]
    for column in figure_columns:
        with_ratios += [column, (ratio, ">8")]
    base_figures = dict(rows)[base]
    lines = []
    for name, figures in rows:
        line: list[Any] = [name]
        for value, of_base in zip(figures, base_figures, strict=True):
            line += [value, f"{value / of_base:.2f}x"]
        lines.append(line)
    table(with_ratios, lines)
