"""Driver memory of stage 1 as the image count grows: it should stay flat.

For each ``--images`` count, a fresh process (the driver) runs index -> clip_dense ->
sam_prompt -> sam_auto -> merge -> export on generated photos with the Ray executor, so the
shard workers are Ray actors in their own processes and only the driver is measured: its
Python heap peak per stage (``tracemalloc``, which numpy reports to) and its peak RSS.
Images, masks and label maps never pass through the driver; what does grow with the count is
the source listing and the index's duplicate check (one URI and one id per image) and
export's one short name per image, so the heap peak should grow by well under a kilobyte
per image while the images themselves are ~37 KB each in memory. The last line prints that
growth per image, measured in this run.

The peak RSS also holds what the heap peak does not see: export writes ``records.parquet``
from the driver and gathers each row group there (Arrow memory, up to 64 MiB, then written;
``--row-group-mib`` changes it; the ``records`` column is what these runs gathered), and
Arrow's default allocator (mimalloc) keeps pages it freed for reuse. At small counts both
make RSS grow with the images until they reach their bounds; ``--arrow-pool system`` shows
RSS without the allocator's cache.

    python bench/driver_memory.py [--config tiny] [--images 64 512] [--shard-size 16]
                                  [--row-group-mib MIB] [--arrow-pool system]
    python bench/driver_memory.py [--config tiny] [--images 64 512] [--shard-size 16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness import parser, peak_bytes, peak_memory, reset_peak, timed

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
STAGES = ("index", "clip_dense", "sam_prompt", "sam_auto", "merge", "export")


def child(config: str, n: int, shard_size: int, row_group_mib: float | None) -> dict:
    """Run stage 1 on ``n`` images in this process as the driver; its memory per stage."""
    import functools

    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    from annotate import make_images  # bench/annotate.py

    from fmbseg.config import load_config, replace
    from fmbseg.data.vocab import load_vocabulary
    from fmbseg.storage import ArtifactStore
    from fmbseg.tasks.annotate.index import run_index
    from fmbseg.tasks.annotate.stages import run_declared

    if row_group_mib is not None:  # export's records.parquet writer, in this driver
        import fmbseg.tasks.annotate.export_files as export_files
        from fmbseg.storage.parquet import RowGroupWriter

        export_files.RowGroupWriter = functools.partial(  # type: ignore[misc]
            RowGroupWriter, row_group_bytes=int(row_group_mib * 2**20)
        )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    cfg = replace(
        load_config(config),
        runtime={"executor": "ray", "num_workers": 1, "shard_size": shard_size},
    )
    vocab = load_vocabulary("voc-20")
    out: dict = {"images": n, "stages": {}}
    with tempfile.TemporaryDirectory() as tmp:
        make_images(Path(tmp) / "images", n)
        store = ArtifactStore(f"{tmp}/store")
        fps: dict[str, str] = {}
        calls: dict[str, Callable[[], Any]] = {
            "index": lambda: run_index(store, f"{tmp}/images", cfg),
            **{  # each stage alone, on the fingerprints of the ones before it
                s: functools.partial(
                    lambda s: run_declared(store, cfg, s, fps, vocabulary=vocab)[s], s
                )
                for s in ("clip_dense", "sam_prompt", "sam_auto", "merge", "export")
            },
        }
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        reset_peak("rss")  # the peak resident set from here: not the images' making
        for stage in STAGES:
            with peak_memory("heap") as heap:
                run = timed(calls[stage])
            fps[stage] = run.result
            out["stages"][stage] = {
                "heap_peak_mib": (heap.bytes - base) / 2**20,
                "maxrss_mib": peak_bytes("rss") / 2**20,
                "seconds": run.seconds,
            }
        out["masks"] = store.require_manifest("merge", fps["merge"]).rows
        out["arrow_pool"] = pa.default_memory_pool().backend_name
        meta = pq.read_metadata(f"{tmp}/store/exports/{fps['export']}/records.parquet")
        groups = [meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)]
        out["records_kib"], out["row_groups"] = sum(groups) / 2**10, len(groups)
    ray.shutdown()
    return out


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--images", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--shard-size", type=int, default=16)
    ap.add_argument(
        "--row-group-mib",
        type=float,
        help="records.parquet row groups of this size (default: the export's, 64)",
    )
    ap.add_argument(
        "--arrow-pool",
        choices=["mimalloc", "jemalloc", "system"],
        help="Arrow's memory pool in the driver (ARROW_DEFAULT_MEMORY_POOL; default: "
        "Arrow's own choice, which keeps freed pages for reuse and so adds to RSS)",
    )
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.config, args.child, args.shard_size, args.row_group_mib)))
        return
    results = []
    for n in sorted(args.images):
        env = {**os.environ}
        if args.arrow_pool:
            env["ARROW_DEFAULT_MEMORY_POOL"] = args.arrow_pool
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--config",
                args.config,
                "--child",
                str(n),
                "--shard-size",
                str(args.shard_size),
                *(["--row-group-mib", str(args.row_group_mib)] if args.row_group_mib else []),
            ],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        )
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(
        f"config {args.config}, Ray executor, shard size {args.shard_size}, Arrow memory pool "
        f"{results[0]['arrow_pool']}; driver process only"
    )
    print(
        f"{'images':>7} {'masks':>6} "
        + " ".join(f"{s:>10}" for s in STAGES)
        + f" {'maxrss':>8} {'records':>8} {'groups':>6}"
    )
    for r in results:
        peaks = [r["stages"][s]["heap_peak_mib"] for s in STAGES]
        rss = r["stages"]["export"]["maxrss_mib"]
        print(
            f"{r['images']:>7} {r['masks']:>6} "
            + " ".join(f"{p:10.2f}" for p in peaks)
            + f" {rss:8.0f} {r['records_kib']:8.0f} {r['row_groups']:6}"
        )
    print(
        "(MiB: Python heap peak above the start, per stage, and the driver's peak RSS from "
        "the first stage to the end; records: KiB of Arrow data in records.parquet, in row "
        "groups that export gathers in the driver, up to --row-group-mib each, 64 by default)"
    )
    lo, hi = results[0], results[-1]
    if hi["images"] > lo["images"]:
        extra = hi["images"] - lo["images"]
        worst = max(
            (hi["stages"][s]["heap_peak_mib"] - lo["stages"][s]["heap_peak_mib"]) * 2**20 / extra
            for s in STAGES
        )
        rss = (hi["stages"]["export"]["maxrss_mib"] - lo["stages"]["export"]["maxrss_mib"]) * 2**20
        print(
            f"growth per extra image: heap peak {worst:.0f} bytes (worst stage), "
            f"RSS {rss / extra:.0f} bytes; one decoded image is "
            f"{96 * 128 * 3} bytes"
        )


if __name__ == "__main__":
    main()
