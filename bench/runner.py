"""Benchmark of the shard runner: Ray pool vs. the in-process executor, measured in one run.

A synthetic CPU-bound worker (a fixed number of hash rounds, about ``--work-ms`` per shard) stands in for a model, so the
ratio shows the runner's own overhead and its parallel speed-up, not a model's. Prints
shards/s for both executors and the ratio.

    python bench/runner.py --shards 32 --work-ms 200 --workers 2
"""

from __future__ import annotations

import functools
import hashlib
import tempfile

import pyarrow as pa
from harness import parser, timed

from fmbseg.config import RuntimeConfig
from fmbseg.engine.runner import run_stage
from fmbseg.storage import ArtifactStore


class BusyWorker:
    """Hashes ``iterations`` times per shard (deterministic), one small record per item."""

    def __init__(self, iterations: int) -> None:
        self.iterations = iterations

    def process(self, shard: int, spec: list[int]) -> tuple[pa.Table, None]:
        digest = b"%d" % shard
        for _ in range(self.iterations):
            digest = hashlib.sha256(digest).digest()
        return pa.table({"item": spec, "digest": [digest.hex()] * len(spec)}), None


def _iterations_for(work_ms: float) -> int:
    """How many sha256 rounds take ``work_ms`` on this machine."""
    n = 20_000
    seconds = timed(lambda: BusyWorker(n).process(0, [])).seconds
    return max(1, int(n * work_ms / 1000.0 / seconds))


def _timed(store: ArtifactStore, fp: str, specs: list, runtime: RuntimeConfig, iters: int):
    worker = functools.partial(BusyWorker, iters)
    return timed(lambda: run_stage(store, "bench", fp, specs, worker, runtime)).seconds


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--shards", type=int, default=32)
    ap.add_argument("--items-per-shard", type=int, default=64)
    ap.add_argument("--work-ms", type=float, default=200.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--ray-address", default=None)
    args = ap.parse_args()

    import ray

    if args.ray_address:
        ray.init(address=args.ray_address)
    else:
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    specs = [
        list(range(i * args.items_per_shard, (i + 1) * args.items_per_shard))
        for i in range(args.shards)
    ]
    with tempfile.TemporaryDirectory() as root:
        store = ArtifactStore(root)
        iters = _iterations_for(args.work_ms)
        local = _timed(store, "local", specs, RuntimeConfig(executor="local"), iters)
        pool = RuntimeConfig(executor="ray", num_workers=args.workers, cpus_per_worker=1.0)
        remote = _timed(store, "ray", specs, pool, iters)
        same = [r.sha256 for r in store.require_manifest("bench", "local").shards] == [
            r.sha256 for r in store.require_manifest("bench", "ray").shards
        ]
    print(f"shards={args.shards} work={args.work_ms:.0f} ms/shard workers={args.workers}")
    print(f"local: {args.shards / local:7.2f} shards/s ({local:.2f} s)")
    print(f"ray:   {args.shards / remote:7.2f} shards/s ({remote:.2f} s, incl. actor start)")
    print(f"ray/local throughput ratio: {local / remote:.2f}  identical outputs: {same}")
    ray.shutdown()


if __name__ == "__main__":
    main()
