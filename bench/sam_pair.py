"""Both SAM stages per image: one shared image embedding vs. one embedding per stage.

What a shard of ``sam_prompt`` then a shard of ``sam_auto`` do to each image (the
reference: SAM's image encoder runs twice), against the one pass of
``fmbseg.tasks.annotate.sam_pair`` (prompts, then automatic masks from the same embedding): both
on the same images with the same SAM (random weights: speed does not depend on them; the
image encoder at the pipeline's default precision, bf16 autocast on a GPU) and the same
settings. Prompts: ``--classes`` present classes of 5 points each, in one decoder
pass, as stage ``sam_prompt`` sends them. Prints seconds per image, the ratio, peak GPU
memory on CUDA, and checks both give the same masks.

    python bench/sam_pair.py                                         # sam_tiny, CPU
    python bench/sam_pair.py --model sam_vit_b --images 2 --points-per-side 16
    python bench/sam_pair.py --model sam_vit_h --device cuda --points-per-side 32 --size 480x640
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from harness import hw, memory_kind, parser, peak_memory, per_item
from sam_auto import photos  # bench/ is on sys.path when run as a script


def both(seg: Any, image: np.ndarray, points: np.ndarray, share: bool) -> tuple[Any, ...]:
    """Prompt masks then automatic masks of one image; ``share=False`` embeds it twice."""
    seg.set_image(image)
    masks, scores = seg.predict_batch(points, np.ones(points.shape[:2], dtype=np.int64))
    # another array with the same pixels is embedded again, as a separate stage does
    auto = seg.generate(image if share else image.copy())
    return masks, scores, [r["segmentation"] for r in auto]


def main() -> None:
    from fmbseg.config import SamAutoConfig
    from fmbseg.models import build_model

    ap = parser(__doc__)
    ap.add_argument("--model", default="sam_tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--size", type=hw, default="96x128", help="HxW of the images")
    ap.add_argument("--classes", type=int, default=3, help="present classes prompted per image")
    ap.add_argument("--points-per-side", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    h, w = args.size
    tiny = args.model == "sam_tiny"  # its random weights would keep nothing at METHOD's values
    auto = SamAutoConfig(
        points_per_side=args.points_per_side,
        pred_iou_thresh=0.0 if tiny else 0.86,
        stability_score_thresh=0.0 if tiny else 0.92,
        crop_n_layers=0,  # the whole image: what the pair shares
    )
    seg = build_model(args.model, None, args.device, auto_config=auto)
    images = photos(args.images, (h, w))
    rng = np.random.default_rng(0)
    points = [rng.uniform((0, 0), (w, h), size=(args.classes, 5, 2)) for _ in images]
    items = list(zip(images, points, strict=True))
    kind = memory_kind(args.device)
    with peak_memory(kind) as peak:
        one_pass = per_item(lambda item: both(seg, *item, share=True), items)
    two_stages = per_item(lambda item: both(seg, *item, share=False), items)
    t_ours, ours = one_pass.seconds, one_pass.result
    t_ref, ref = two_stages.seconds, two_stages.result
    for (m1, s1, a1), (m2, s2, a2) in zip(ours, ref, strict=True):
        assert np.array_equal(m1, m2) and np.allclose(s1, s2), "prompt masks differ"
        assert len(a1) == len(a2) and all(np.array_equal(x, y) for x, y in zip(a1, a2, strict=True))
    n_auto = sum(len(a) for _, _, a in ours)
    print(
        f"{args.model} on {args.device}, {len(images)} images {h}x{w}, {args.classes} prompted "
        f"classes, {args.points_per_side}^2 grid points, {n_auto} automatic masks (same masks)"
    )
    print(f"two stages (embedding per stage): {t_ref:8.3f} s/image")
    print(f"one pass (shared embedding):      {t_ours:8.3f} s/image   {t_ref / t_ours:.2f}x")
    if kind == "cuda":
        print(f"peak GPU memory, one pass: {peak.bytes / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
