"""Automatic masks: our ``BinaryMaskGenerator`` vs. segment-anything's stock generator.

Both run on the same images with the same SAM (random weights: speed does not depend on
them) and the same filters; the reference is the stock ``SamAutomaticMaskGenerator`` with
``output_mode="binary_mask"`` and its default ``points_per_batch`` (64), ours the generator
stage ``sam_auto`` uses, at ``--points-per-batch`` (256: the config's default on a GPU) and
at 64 (its default on a CPU, for memory: a pass at 256 holds 3 GiB of mask logits); the
stock generator also runs at ``--points-per-batch``, to separate the two gains. Prints
seconds per image (and peak GPU memory), the ratios, and checks that both return the same
masks.

    python bench/sam_auto.py                                   # sam_tiny, CPU
    python bench/sam_auto.py --model sam_vit_h --device cuda --points-per-side 32 --size 480x640
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch


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


def run(generate: Any, images: list[Any]) -> tuple[float, list[Any]]:
    """(seconds per image, what ``generate`` returns for each; an item may bundle an image
    with its prompts)."""
    generate(images[0])  # warm-up (allocator, kernels)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = [generate(im) for im in images]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / len(images), out


def main() -> None:
    from segment_anything import SamAutomaticMaskGenerator

    from fmbseg.models import build_model
    from fmbseg.models.sam_amg import BinaryMaskGenerator

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="sam_tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--size", default="96x128", help="HxW of the images")
    ap.add_argument("--points-per-side", type=int, default=8)
    ap.add_argument("--points-per-batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    h, w = (int(v) for v in args.size.split("x"))
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
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t_ours, r_ours = run(ours.generate, images)
    peak_ours = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t_stock, r_stock = run(stock.generate, images)
    peak_stock = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
    # the stock generator at our batch size: what the RLE round trip alone costs
    stock.points_per_batch = args.points_per_batch
    t_stock_b, _ = run(stock.generate, images)
    # ours at segment-anything's batch size (the config's default on a CPU)
    ours.points_per_batch = 64
    t_ours_64, _ = run(ours.generate, images)

    masks = sum(len(r) for r in r_ours)
    same = all(
        len(a) == len(b)
        and all(
            np.array_equal(x["segmentation"], y["segmentation"]) for x, y in zip(a, b, strict=True)
        )
        for a, b in zip(r_ours, r_stock, strict=True)
    )
    print(f"{args.model} on {args.device}, {args.images} images {h}x{w}, "
          f"{args.points_per_side}^2 points, {masks} masks kept, torch threads {args.threads}")  # fmt: skip
    print(f"{'generator':<34} {'s/image':>9} {'images/s':>9} {'peak MiB':>9}")
    print(f"{'stock (points_per_batch 64, RLE)':<34} {t_stock:9.4f} {1 / t_stock:9.1f} "
          f"{peak_stock:9.0f}")  # fmt: skip
    print(f"{f'stock (points_per_batch {args.points_per_batch}, RLE)':<34} {t_stock_b:9.4f} "
          f"{1 / t_stock_b:9.1f} {'':>9}")  # fmt: skip
    print(f"{f'ours (points_per_batch {args.points_per_batch})':<34} {t_ours:9.4f} "
          f"{1 / t_ours:9.1f} {peak_ours:9.0f}")  # fmt: skip
    print(f"{'ours (points_per_batch 64)':<34} {t_ours_64:9.4f} {1 / t_ours_64:9.1f} {'':>9}")
    print(f"speed-up vs stock: {t_stock / t_ours:.2f}x; at the same batch size: "
          f"{t_stock_b / t_ours:.2f}x; same masks: {same}")  # fmt: skip
    print(f"ours at points_per_batch {args.points_per_batch} vs 64: "
          f"{t_ours_64 / t_ours:.2f}x the throughput")  # fmt: skip


if __name__ == "__main__":
    main()
