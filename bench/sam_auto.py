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


def reset_peak(cuda: bool) -> None:
    """Start a new peak: of GPU memory on CUDA, else of the process's resident memory."""
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        return
    try:  # Linux: "5" resets VmHWM, the peak resident set size
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_mib(cuda: bool) -> float:
    """MiB: peak GPU memory allocated on CUDA, else peak resident set (VmHWM; 0 if unknown)."""
    if cuda:
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) / 1024 for ln in f if ln.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return 0.0


def measured(generate: Any, images: list[Any], cuda: bool) -> tuple[float, list[Any], float]:
    """:func:`run` plus the peak memory (:func:`peak_mib`) during it."""
    reset_peak(cuda)
    seconds, out = run(generate, images)
    return seconds, out, peak_mib(cuda)


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
    cuda = torch.device(args.device).type == "cuda"
    t_ours, r_ours, peak_ours = measured(ours.generate, images, cuda)
    t_stock, r_stock, peak_stock = measured(stock.generate, images, cuda)
    # the stock generator at our batch size: what the RLE round trip alone costs
    stock.points_per_batch = args.points_per_batch
    t_stock_b, _, peak_stock_b = measured(stock.generate, images, cuda)
    # ours at segment-anything's batch size (the config's default on a CPU)
    ours.points_per_batch = 64
    t_ours_64, _, peak_ours_64 = measured(ours.generate, images, cuda)

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
    peak = "peak GPU MiB" if cuda else "peak RSS MiB"
    print(f"{'generator':<34} {'s/image':>9} {'images/s':>9} {peak:>13}")
    b = args.points_per_batch
    for name, t, mib in (
        ("stock (points_per_batch 64, RLE)", t_stock, peak_stock),
        (f"stock (points_per_batch {b}, RLE)", t_stock_b, peak_stock_b),
        (f"ours (points_per_batch {b})", t_ours, peak_ours),
        ("ours (points_per_batch 64)", t_ours_64, peak_ours_64),
    ):
        print(f"{name:<34} {t:9.4f} {1 / t:9.1f} {mib:13.0f}")
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
