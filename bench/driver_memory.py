"""Driver memory of stage 1 as the image count grows: it should stay flat.

For each ``--images`` count, a fresh process (the driver) runs index -> clip_dense ->
sam_prompt -> sam_auto -> merge -> export on generated photos with the Ray executor, so the
shard workers are Ray actors in their own processes and only the driver is measured: its
Python heap peak per stage (``tracemalloc``, which numpy reports to) and its peak RSS.
Images, masks and label maps never pass through the driver; what does grow with the count is
the source listing (one URI per image) and export's one short name per image, so the heap
peak should grow by well under a kilobyte per image while the images themselves are
~37 KB each in memory. The last line prints that growth per image, measured in this run.

    python bench/driver_memory.py [--config tiny] [--images 64 512] [--shard-size 16]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
STAGES = ("index", "clip_dense", "sam_prompt", "sam_auto", "merge", "export")


def child(config: str, n: int, shard_size: int) -> dict:
    """Run stage 1 on ``n`` images in this process as the driver; its memory per stage."""
    import ray
    from annotate import make_images  # bench/annotate.py

    from fmbseg.config import load_config, replace
    from fmbseg.data.vocab import load_vocabulary
    from fmbseg.storage import ArtifactStore
    from fmbseg.tasks.clip_dense import run_clip_dense
    from fmbseg.tasks.export import run_export
    from fmbseg.tasks.index import run_index
    from fmbseg.tasks.merge import run_merge
    from fmbseg.tasks.sam_auto import run_sam_auto
    from fmbseg.tasks.sam_prompt import run_sam_prompt

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
        calls = {
            "index": lambda: run_index(store, f"{tmp}/images", cfg),
            "clip_dense": lambda: run_clip_dense(store, cfg, fps["index"], vocab),
            "sam_prompt": lambda: run_sam_prompt(store, cfg, fps["clip_dense"]),
            "sam_auto": lambda: run_sam_auto(store, cfg, fps["clip_dense"]),
            "merge": lambda: run_merge(
                store, cfg, fps["index"], fps["clip_dense"], fps["sam_prompt"], fps["sam_auto"]
            ),  # fmt: skip
            "export": lambda: run_export(store, cfg, fps["merge"]),
        }
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        for stage in STAGES:
            tracemalloc.reset_peak()
            start = time.perf_counter()
            fps[stage] = calls[stage]()
            peak = tracemalloc.get_traced_memory()[1]
            out["stages"][stage] = {
                "heap_peak_mib": (peak - base) / 2**20,
                "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "seconds": time.perf_counter() - start,
            }
        out["masks"] = store.require_manifest("merge", fps["merge"]).rows
    ray.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--images", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--shard-size", type=int, default=16)
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.config, args.child, args.shard_size)))
        return
    results = []
    for n in sorted(args.images):
        proc = subprocess.run(
            [sys.executable, __file__, "--config", args.config, "--child", str(n),
             "--shard-size", str(args.shard_size)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"config {args.config}, Ray executor, shard size {args.shard_size}; driver process only")
    print(f"{'images':>7} {'masks':>6} " + " ".join(f"{s:>10}" for s in STAGES)
          + f" {'maxrss':>8}")  # fmt: skip
    for r in results:
        peaks = [r["stages"][s]["heap_peak_mib"] for s in STAGES]
        print(f"{r['images']:>7} {r['masks']:>6} " + " ".join(f"{p:10.2f}" for p in peaks)
              + f" {r['stages']['export']['maxrss_mib']:8.0f}")  # fmt: skip
    print("(MiB: Python heap peak above the start, per stage; peak RSS of the driver at the end)")
    lo, hi = results[0], results[-1]
    if hi["images"] > lo["images"]:
        extra = hi["images"] - lo["images"]
        worst = max(
            (hi["stages"][s]["heap_peak_mib"] - lo["stages"][s]["heap_peak_mib"]) * 2**20 / extra
            for s in STAGES
        )
        rss = (hi["stages"]["export"]["maxrss_mib"] - lo["stages"]["export"]["maxrss_mib"]) * 2**20
        print(f"growth per extra image: heap peak {worst:.0f} bytes (worst stage), "
              f"RSS {rss / extra:.0f} bytes; one decoded image is "
              f"{96 * 128 * 3} bytes")  # fmt: skip


if __name__ == "__main__":
    main()
