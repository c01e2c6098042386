"""Ours with SAM 2.1 vs ours with SAM: both SAM stages on the same images and CLIP output.

For each teacher (``--sam``, registry names), the real stages ``sam_prompt`` + ``sam_auto``
(the engine's SAM pass, :mod:`fmbseg.tasks.annotate.sam_pair`: one image embedding for prompts and
automatic masks, records built in the post thread, Parquet and commits included) with the
local executor on one temporary store, over the one ``clip_dense`` output both read (index
and CLIP run first, untimed): only ``models.sam`` differs, so the stages' fingerprints
differ and each teacher's outputs are made anew. Model builds are not timed; each teacher
first runs on ``--warmup`` other images. Prints per teacher: seconds per image, images/s,
prompt and automatic masks per image (what the stages committed), and the peak memory of
its run (GPU memory allocated on CUDA, else the process's peak resident set).

Weights are random unless ``--set models.sam_weights=...`` names a checkpoint (then give
one teacher): speed does not depend on them, mask counts do. ``--keep-all`` sets the IoU
and stability thresholds to 0, as random weights keep few masks at METHOD's.

    python bench/sam2_vs_sam.py                                       # sam_tiny vs sam2.1_tiny, CPU
    python bench/sam2_vs_sam.py --config default --device cuda --images 16 --size 480x640 \\
        --sam sam_vit_h sam2.1_hiera_l --keep-all
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

import torch
from harness import ModelBuilds, hw, memory_kind, parser, peak_memory, table, timed

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--config", default="tiny")
    ap.add_argument(
        "--sam",
        nargs="+",
        default=["sam_tiny", "sam2.1_tiny"],
        help="the teachers (models.sam registry names)",
    )
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument(
        "--warmup", type=int, default=1, help="images each teacher runs first, untimed (0: none)"
    )
    ap.add_argument("--size", type=hw, default="96x128", help="HxW of the generated images")
    ap.add_argument("--device", default=None, help="runtime.device (default: the config's)")
    ap.add_argument("--vocab", default="voc-20")
    ap.add_argument(
        "--keep-all",
        action="store_true",
        help="SAM's IoU and stability thresholds 0 (random weights keep few masks)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--set", action="append", default=[], help="section.key=value override")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from annotate import make_images  # bench/ is on sys.path when run as a script

    from fmbseg.config import load_config, replace
    from fmbseg.data.vocab import load_vocabulary
    from fmbseg.models import registry
    from fmbseg.storage import ArtifactStore
    from fmbseg.tasks.annotate.index import run_index
    from fmbseg.tasks.annotate.stages import SAM_PASS, run_declared

    sets = ["models.clip_weights=null", "models.sam_weights=null", *args.set]
    if args.keep_all:
        sets += ["sam_auto.pred_iou_thresh=0", "sam_auto.stability_score_thresh=0"]
    if args.device:
        sets.append(f"runtime.device={args.device}")
    base = replace(load_config(args.config, sets), runtime={"executor": "local"})
    vocab = load_vocabulary(args.vocab)
    device = registry.resolve_device(base.runtime.device)
    kind = memory_kind(device)
    builds = ModelBuilds()
    h, w = args.size
    n = args.images
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        warm, images = f"{tmp}/warm", f"{tmp}/images"
        make_images(Path(warm), args.warmup, (h, w))
        make_images(Path(images), n + args.warmup, (h, w))
        for p in sorted(Path(images).iterdir())[: args.warmup]:  # other pictures than warm's
            p.unlink()
        store = ArtifactStore(f"{tmp}/store")
        clips = {
            folder: run_declared(
                store,
                base,
                "clip_dense",
                {"index": run_index(store, folder, base)},
                vocabulary=vocab,
            )["clip_dense"]
            for folder in ([warm] if args.warmup else []) + [images]
        }
        for name in args.sam:
            cfg = replace(base, models={"sam": name})
            if args.warmup:
                run_declared(store, cfg, SAM_PASS, {"clip_dense": clips[warm]})
            builds.seconds = 0.0
            with peak_memory(kind) as peak:  # the last teacher's models freed first
                sam_pass = functools.partial(
                    run_declared, store, cfg, SAM_PASS, {"clip_dense": clips[images]}
                )
                run = timed(sam_pass)
            rows = {s: store.require_manifest(s, fp).rows for s, fp in run.result.items()}
            seconds = run.seconds - builds.seconds
            results.append((name, seconds, rows["sam_prompt"], rows["sam_auto"], peak.mib))

    print(
        f"config {args.config}, {n} images {h}x{w}, {len(vocab)} classes, device {device}, "
        f"torch threads {torch.get_num_threads()}, random weights"
        f"{', SAM thresholds 0' if args.keep_all else ''}; both SAM stages (one pass)"
    )
    what = "peak GPU MiB" if kind == "cuda" else "peak RSS MiB"
    table(
        [
            ("teacher", "<18"),
            ("s/image", "8.3f"),
            ("images/s", "9.2f"),
            ("prompt/img", "10.2f"),
            ("auto/img", "9.2f"),
            (what, "13.0f"),
        ],
        [
            (name, seconds / n, n / seconds, prompt / n, auto / n, peak)
            for name, seconds, prompt, auto, peak in results
        ],
    )
    if len(results) > 1:
        first = results[0]
        for name, seconds, *_ in results[1:]:
            print(f"throughput {name} / {first[0]}: {first[1] / seconds:.2f}x")


if __name__ == "__main__":
    main()
