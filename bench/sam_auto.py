"""Automatic masks: our ``BinaryMaskGenerator`` vs. segment-anything's stock generator.

Both run on the same images with the same SAM (random weights: speed does not depend on
them; the image encoder at the pipeline's default precision, bf16 autocast on a GPU) and
the same filters; the reference is the stock ``SamAutomaticMaskGenerator`` with
``output_mode="binary_mask"`` and its default ``points_per_batch`` (64), ours the generator
stage ``sam_auto`` uses, at ``--points-per-batch`` (256: the config's default on a GPU) and
at 64 (its default on a CPU: a pass at 256 holds 3 GiB of mask logits); the
stock generator also runs at ``--points-per-batch``, to separate the two gains. Prints
seconds per image, peak memory (GPU on CUDA, else the process's resident set, reset
before each row on Linux), the ratios, and checks that both return the same masks.

    python bench/sam_auto.py                                   # sam_tiny, CPU
    python bench/sam_auto.py --model sam_vit_h --device cuda --points-per-side 32 --size 480x640
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from harness import MemoryKind, hw, memory_kind, parser, peak_memory, per_item, table


def photos(n: int, size: tuple[int, int]) -> list[np.ndarray]:
    """``n`` HxWx3 uint8 crops of skimage's sample photos, resized to ``size`` (H, W)."""
    import skimage.data
    from PIL import Image

    names = ("astronaut", "chelsea", "coffee", "rocket")
    out = []
    for i in range(n):
        im = Image.fromarray(np.asarray(getattr(skimage.data, names[i % len(names)])())[..., :3])
        out.append(np.asarray(im.resize(size[::-1], Image.Resampling.BILINEAR)))
    return out


def measured(generate: Any, images: list[Any], kind: MemoryKind) -> tuple[float, list[Any], float]:
    """(seconds per image, what ``generate`` returns for each, peak MiB during the run)."""
    with peak_memory(kind) as peak:
        run = per_item(generate, images)
    return run.seconds, run.result, peak.mib


def main() -> None:
    from segment_anything import SamAutomaticMaskGenerator

    from fmbseg.models import build_model
    from fmbseg.models.sam_amg import BinaryMaskGenerator

    ap = parser(__doc__)
    ap.add_argument("--model", default="sam_tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--size", type=hw, default="96x128", help="HxW of the images")
    ap.add_argument("--points-per-side", type=int, default=8)
    ap.add_argument("--points-per-batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    h, w = args.size
    sam = build_model(args.model, None, args.device).sam
    images = photos(args.images, (h, w))
    # the thresholds of the tiny config's random SAM would keep nothing at METHOD's values
    tiny = args.model == "sam_tiny"
    common = {
        "points_per_side": args.points_per_side,
        "pred_iou_thresh": 0.0 if tiny else 0.86,
        "stability_score_thresh": 0.0 if tiny else 0.92,
        "min_mask_region_area": 100,
    }
    stock = SamAutomaticMaskGenerator(sam, output_mode="binary_mask", **common)
    ours = BinaryMaskGenerator(sam, points_per_batch=args.points_per_batch, **common)
    kind = memory_kind(args.device)
    t_ours, r_ours, peak_ours = measured(ours.generate, images, kind)
    t_stock, r_stock, peak_stock = measured(stock.generate, images, kind)
    # the stock generator at our batch size: what the RLE round trip alone costs
    stock.points_per_batch = args.points_per_batch
    t_stock_b, _, peak_stock_b = measured(stock.generate, images, kind)
    # ours at segment-anything's batch size (the config's default on a CPU)
    ours.points_per_batch = 64
    t_ours_64, _, peak_ours_64 = measured(ours.generate, images, kind)

    masks = sum(len(r) for r in r_ours)
    same = all(
        len(a) == len(b)
        and all(
            np.array_equal(x["segmentation"], y["segmentation"]) for x, y in zip(a, b, strict=True)
        )
        for a, b in zip(r_ours, r_stock, strict=True)
    )
    print(
        f"{args.model} on {args.device}, {args.images} images {h}x{w}, "
        f"{args.points_per_side}^2 points, {masks} masks kept, torch threads {args.threads}"
    )
    peak = "peak GPU MiB" if kind == "cuda" else "peak RSS MiB"
    b = args.points_per_batch
    table(
        [("generator", "<34"), ("s/image", "9.4f"), ("images/s", "9.1f"), (peak, "13.0f")],
        [
            (name, t, 1 / t, mib)
            for name, t, mib in (
                ("stock (points_per_batch 64, RLE)", t_stock, peak_stock),
                (f"stock (points_per_batch {b}, RLE)", t_stock_b, peak_stock_b),
                (f"ours (points_per_batch {b})", t_ours, peak_ours),
                ("ours (points_per_batch 64)", t_ours_64, peak_ours_64),
            )
        ],
    )
    print(
        f"speed-up vs stock: {t_stock / t_ours:.2f}x; at the same batch size: "
        f"{t_stock_b / t_ours:.2f}x; same masks: {same}"
    )
    print(
        f"ours at points_per_batch {b} vs 64: {t_ours_64 / t_ours:.2f}x the throughput, "
        f"{peak_ours / peak_ours_64:.2f}x the peak memory"
    )


if __name__ == "__main__":
    main()
