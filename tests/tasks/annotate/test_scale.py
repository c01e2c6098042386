"""Shard planning at scale, simulated: 1,000,000 synthetic image records (issue 6, item 5).

Nothing is read or run: the test checks that the index plan over a million listed images
splits into balanced, complete, deterministic shards, and that planning stays fast.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from fmbseg.config import load_config
from fmbseg.data.sources import ImageRef
from fmbseg.engine.runner import plan_shards
from fmbseg.tasks.annotate.index import IndexPlan, index_fingerprint

N = 1_000_000
SHARD_SIZE = 256  # RuntimeConfig.shard_size default
BOUND_S = 10.0  # generous: plan_shards takes ~1 ms; the whole index plan ~3 s (shared 2 cores)


def _refs(n: int, start: int = 0) -> list[ImageRef]:
    """Sorted, unique S3-like URIs, as a bucket listing returns them."""
    return [
        ImageRef(f"s3://photos/{i // 10_000:03d}/img-{i:07d}.jpg", 50_000 + i % 997, f"etag-{i}")
        for i in range(start, start + n)
    ]


@pytest.fixture(scope="module")
def million() -> list[ImageRef]:
    return _refs(N)


def _bounds(shards: list[range]) -> tuple[np.ndarray, np.ndarray]:
    starts = np.fromiter((r.start for r in shards), np.int64, len(shards))
    stops = np.fromiter((r.stop for r in shards), np.int64, len(shards))
    return starts, stops


def test_plan_shards_of_a_million_is_balanced_complete_and_fast() -> None:
    t0 = time.perf_counter()
    shards = plan_shards(N, SHARD_SIZE)
    elapsed = time.perf_counter() - t0
    assert elapsed < BOUND_S
    assert len(shards) == -(-N // SHARD_SIZE) == 3907
    starts, stops = _bounds(shards)
    sizes = stops - starts
    # every record in exactly one shard: contiguous, in order, covering [0, N)
    assert starts[0] == 0 and stops[-1] == N and np.array_equal(starts[1:], stops[:-1])
    assert sizes.max() - sizes.min() <= 1 and sizes.max() <= SHARD_SIZE
    assert int(sizes.sum()) == N
    assert plan_shards(N, SHARD_SIZE) == shards  # depends only on (N, shard_size)


def test_index_plan_of_a_million_images(million: list[ImageRef]) -> None:
    cfg = load_config("default")
    t0 = time.perf_counter()
    fp = index_fingerprint(cfg, million)
    plan = IndexPlan("s3://photos/", fp, tuple(million), cfg.runtime.shard_size)
    specs = plan.specs()
    elapsed = time.perf_counter() - t0
    print(f"planned {N} images into {len(specs)} shards in {elapsed:.2f} s")
    assert elapsed < 3 * BOUND_S  # hashing a million listing entries dominates
    assert len(specs) == 3907
    sizes = np.array([len(s.uris) for s in specs])
    assert sizes.max() - sizes.min() <= 1 and sizes.max() <= SHARD_SIZE
    flat = [u for s in specs for u in s.uris]
    assert flat == [r.uri for r in million]  # each image once, in listing order
    # Deterministic names: shard i holds the same URIs in a rerun (resume relies on it).
    again = IndexPlan("s3://photos/", fp, tuple(million), cfg.runtime.shard_size)
    assert again.specs()[1234] == specs[1234]


def test_index_fingerprint_changes_with_any_one_image() -> None:
    cfg = load_config("default")
    refs = _refs(10_000)
    fp = index_fingerprint(cfg, refs)
    assert index_fingerprint(cfg, refs[::-1]) == fp  # listing order does not matter
    changed = list(refs)
    changed[5_000] = ImageRef(changed[5_000].uri, changed[5_000].size, "etag-new")
    assert index_fingerprint(cfg, changed) != fp
    assert index_fingerprint(cfg, refs + _refs(1, start=10_000)) != fp
    assert index_fingerprint(cfg, refs[:-1]) != fp
