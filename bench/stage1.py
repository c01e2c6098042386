"""Stage 1 end to end: our stages vs. the straightforward per-image loop, on the same images.

Ours: the real stages ``clip_dense`` -> ``sam_prompt`` + ``sam_auto`` (one pass) -> ``merge``
with the local executor on a temporary store (image reads, Parquet, RLE and commits
included; ``index`` runs before the clock starts): crops of several images share CLIP
passes, one trunk pass gives CLS and dense features, CLIP and SAM's image encoder at the
config's precisions (``auto``: bf16 autocast on a GPU; ``--set models.sam_precision=fp32``
keeps SAM in fp32), all present classes' prompts in one decoder pass, the
automatic masks from the same image embedding in our binary-mask generator at the config's
``points_per_batch``.

Reference, as issue 3 words it: one image at a time, fp32; CLIP on that image's crops only,
CLS and dense features in two passes; SAM prompted one class at a time; segment-anything's
stock ``SamAutomaticMaskGenerator`` (``binary_mask``, its default ``points_per_batch`` 64,
embedding the image again); the same presence, labelling, sampling and merge rules (our
pure functions) and COCO RLE, kept in memory (no store).

Both use the same models' architectures and weights (random unless the config names real
ones: speed does not depend on them) and the config's settings. Model builds are not timed;
each path first runs on ``--warmup`` images (kernels, allocator). Prints images/s of each,
their ratio, masks made, on CUDA the peak GPU memory of each (one worker: what a Ray
actor holds), and where each path's time goes: CLIP, SAM (with the labelling and RLE of
its masks) and the rest.

Random SAM weights keep few masks at METHOD's thresholds (0.86 IoU, 0.92 stability), which
under-counts the per-mask work; ``--keep-all`` sets both to 0, as trained weights keep
tens of masks per image. The ``masks`` column says what each run made.

    python bench/stage1.py                                     # tiny models, CPU
    python bench/stage1.py --config default --device cuda --images 32 --size 480x640
    python bench/stage1.py --config default --device cuda --images 32 --size 480x640 --keep-all
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from harness import ModelBuilds, device_sync, hw, memory_kind, parser, peak_memory, table, timed

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def ours(
    cfg: Any, folder: str, store_root: str, vocab: tuple[str, ...], builds: ModelBuilds
) -> tuple[float, int, dict[str, float]]:
    """(seconds of clip_dense + SAM + merge, model builds excluded; merged masks; seconds
    per part: ``clip`` = stage clip_dense, ``sam`` = the SAM pair, ``rest`` = merge)."""
    from fmbseg.storage import ArtifactStore
    from fmbseg.tasks.annotate.index import run_index
    from fmbseg.tasks.annotate.stages import SAM_PASS, run_declared

    store = ArtifactStore(store_root)
    index = run_index(store, folder, cfg)
    parts: dict[str, float] = {}

    def part(name: str, run: Any) -> Any:
        builds.seconds = 0.0
        timing = timed(run)
        parts[name] = timing.seconds - builds.seconds
        return timing.result

    fps = {"index": index}
    fps |= part("clip", lambda: run_declared(store, cfg, "clip_dense", fps, vocabulary=vocab))
    fps |= part("sam", lambda: run_declared(store, cfg, SAM_PASS, fps))
    fps |= part("rest", lambda: run_declared(store, cfg, "merge", fps))
    return sum(parts.values()), store.require_manifest("merge", fps["merge"]).rows, parts


class Reference:
    """The straightforward per-image loop (see the module docstring)."""

    def __init__(self, cfg: Any, vocab: tuple[str, ...]) -> None:
        from segment_anything import SamAutomaticMaskGenerator

        from fmbseg.models.registry import build_from_config

        self.cfg, self.vocab = cfg, vocab
        self.parts: Counter[str] = Counter()  # seconds: clip, sam, rest (reading, merging)
        device = cfg.runtime.device
        self.clip = build_from_config(
            cfg.models, "clip", device, mode=cfg.clip_dense.mode, precision="fp32"
        )
        self.text = self.clip.encode_text(list(vocab), cfg.clip_dense.templates)
        self.sam = build_from_config(
            cfg.models, "sam", device, auto_config=cfg.sam_auto, precision="fp32"
        )
        a = cfg.sam_auto
        self.stock = SamAutomaticMaskGenerator(
            self.sam.sam,
            points_per_side=a.points_per_side,
            pred_iou_thresh=a.pred_iou_thresh,
            stability_score_thresh=a.stability_score_thresh,
            box_nms_thresh=a.box_nms_thresh,
            min_mask_region_area=a.min_mask_region_area,
            crop_n_layers=a.crop_n_layers,
            crop_n_points_downscale_factor=a.crop_n_points_downscale_factor,
            output_mode="binary_mask",
        )  # points_per_batch: the stock default (64)

    def dense(self, image: np.ndarray) -> Any:
        """One image's crops through CLIP (CLS and dense in two passes), stitched."""
        from fmbseg.tasks.annotate.clip_dense import _Pending
        from fmbseg.tasks.annotate.windows import geometry, prepare_image

        model, ccfg = self.clip, self.cfg.clip_dense
        geo = geometry(image.shape[0], image.shape[1], ccfg, model.preprocess)
        canvas = prepare_image(image, geo, model.preprocess, model.device)
        crops = torch.stack([canvas[:, y : y + geo.crop, x : x + geo.crop] for y, x in geo.windows])
        with torch.inference_mode():
            cls = model.crop_embeddings(crops)
            dense = model.dense_features(crops)
        stitched = _Pending(None, geo, dense.shape[1], dense.device)  # the stage's averaging
        for k in range(len(geo.windows)):
            stitched.add(k, cls[k], dense[k])
        return stitched.finish()

    def label(self, image_id: str, uri: str) -> int:
        """Merged masks of one image, from its file."""
        from fmbseg.storage.records import MaskRecords, mask_row
        from fmbseg.tasks.annotate.clip_dense import summarise
        from fmbseg.tasks.annotate.common import load_image
        from fmbseg.tasks.annotate.merge import merge_shard
        from fmbseg.tasks.annotate.sam_auto import filter_masks, mask_class_scores
        from fmbseg.tasks.annotate.sam_prompt import prompt_points

        cfg = self.cfg
        mark = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal mark
            device_sync()
            now = time.perf_counter()
            self.parts[name] += now - mark
            mark = now

        image = load_image(uri, None, cfg.index.max_pixels)
        lap("rest")
        clip = summarise(self.dense(image), self.text, cfg.clip_dense.min_crops, image_id, uri)
        lap("clip")
        common = {"image_id": image_id, "image_uri": uri, "fingerprint": "reference"}
        prompt: list[dict[str, Any]] = []
        auto: list[dict[str, Any]] = []
        if len(clip.present):
            predictor = self.sam.predictor
            predictor.set_image(image)
            for sim, k in zip(clip.sims, clip.present, strict=True):  # one class at a time
                points = prompt_points(sim, cfg.sam_prompt.num_points, clip.cell_h, clip.cell_w)
                masks, scores, _ = predictor.predict(
                    point_coords=points - 0.5,  # SAM's coordinates: pixel centres
                    point_labels=np.ones(len(points), dtype=np.int64),
                    multimask_output=cfg.sam_prompt.multimask,
                )
                best = int(np.argmax(scores))
                if masks[best].any():
                    prompt.append(
                        mask_row(
                            masks[best],
                            category_id=int(k),
                            category=self.vocab[k],
                            source="prompt",
                            score=float(scores[best]),
                            **common,
                        )
                    )
            limit = cfg.sam_auto.max_area_fraction * image.shape[0] * image.shape[1]
            records = [r for r in self.stock.generate(image) if r["area"] <= limit]
            kept = filter_masks(records, clip.height, clip.width, cfg.sam_auto)
            if kept:
                segs = [np.asarray(m["segmentation"], dtype=bool) for m in kept]
                labels = clip.present[mask_class_scores(segs, clip).argmax(axis=1)]
                auto = [
                    mask_row(
                        seg,
                        category_id=int(k),
                        category=self.vocab[k],
                        source="auto",
                        score=float(m.get("predicted_iou", 1.0)),
                        **common,
                    )
                    for m, seg, k in zip(kept, segs, labels, strict=True)
                ]
        lap("sam")
        row = {"image_id": image_id, "image_uri": uri, "present": clip.present.tolist()}
        merged, _ = merge_shard(
            [row], MaskRecords.from_rows(prompt), MaskRecords.from_rows(auto), cfg.merge
        )
        lap("rest")
        return merged.table.num_rows


def reference(ref: Reference, images: list[tuple[str, str]]) -> tuple[float, int]:
    """(seconds for every image, merged masks); ``ref.parts`` holds this run's parts."""
    ref.parts.clear()
    run = timed(lambda: sum(ref.label(image_id, uri) for image_id, uri in images))
    return run.seconds, run.result


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument(
        "--warmup", type=int, default=2, help="images each path runs first, untimed (0: none)"
    )
    ap.add_argument("--size", type=hw, default="96x128", help="HxW of the generated images")
    ap.add_argument("--device", default=None, help="runtime.device (default: the config's)")
    ap.add_argument("--vocab", default="voc-20")
    ap.add_argument(
        "--keep-all",
        action="store_true",
        help="SAM's IoU and stability thresholds 0 (random weights keep few masks)",
    )
    ap.add_argument(
        "--random-weights",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the config's architectures with random weights (default)",
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

    sets = list(args.set)
    if args.random_weights:
        sets += ["models.clip_weights=null", "models.sam_weights=null"]
    if args.keep_all:
        sets += ["sam_auto.pred_iou_thresh=0", "sam_auto.stability_score_thresh=0"]
    if args.device:
        sets.append(f"runtime.device={args.device}")
    cfg = replace(load_config(args.config, sets), runtime={"executor": "local"})
    vocab = load_vocabulary(args.vocab)
    builds = ModelBuilds()
    h, w = args.size
    device = registry.resolve_device(cfg.runtime.device)
    kind = memory_kind(device)  # on CUDA, GPU memory is what a worker's peak means
    with tempfile.TemporaryDirectory() as tmp:
        warm, images = f"{tmp}/warm", f"{tmp}/images"
        make_images(Path(warm), args.warmup, (h, w))
        make_images(Path(images), args.images + args.warmup, (h, w))
        for p in sorted(Path(images).iterdir())[: args.warmup]:  # other pictures than warm's
            p.unlink()

        if args.warmup:
            ours(cfg, warm, f"{tmp}/store-warm", vocab, builds)
        with peak_memory(kind) as peak_ours:  # the warm-up's models freed first
            t_ours, m_ours, parts_ours = ours(cfg, images, f"{tmp}/store", vocab, builds)

        listed = ArtifactStore(f"{tmp}/store-reference")  # the same image ids as ours

        def listing(folder: str) -> list[tuple[str, str]]:
            rows = listed.read_table("index", run_index(listed, folder, cfg)).to_pylist()
            return [(r["image_id"], r["uri"]) for r in rows]

        with peak_memory(kind) as peak_ref:
            ref = Reference(cfg, vocab)
            if args.warmup:
                reference(ref, listing(warm))
            t_ref, m_ref = reference(ref, listing(images))

    n = args.images
    print(
        f"config {args.config} ({cfg.models.clip}, {cfg.models.sam}), {n} images {h}x{w}, "
        f"{len(vocab)} classes, device {device}, torch threads {torch.get_num_threads()}, "
        f"{'random' if args.random_weights else 'configured'} weights"
        f"{', SAM thresholds 0' if args.keep_all else ''}"
    )
    cuda = kind == "cuda"  # the peak column: GPU memory only
    columns = [("path", "<44"), ("s/image", "8.3f"), ("images/s", "9.2f"), ("masks", "6d")]
    rows = [
        [name, t / n, n / t, m, *([peak.mib] if cuda else [])]
        for name, t, m, peak in (
            ("reference (per image, fp32, stock generator)", t_ref, m_ref, peak_ref),
            ("ours (clip_dense, sam pair, merge stages)", t_ours, m_ours, peak_ours),
        )
    ]
    table(columns + ([("peak MiB", "9.0f")] if cuda else []), rows)
    print(f"throughput ours / reference: {t_ref / t_ours:.2f}x")
    print(
        f"where the time goes, s/image {'clip':>8} {'sam':>8} {'rest':>8}  (rest: reading "
        "images, merging; ours also commits each stage)"
    )
    for name, parts in (("reference", ref.parts), ("ours", parts_ours)):
        print(f"  {name:<26} " + " ".join(f"{parts[k] / n:8.3f}" for k in ("clip", "sam", "rest")))


if __name__ == "__main__":
    main()
