"""The SAM stages' record building: after SAM in the same thread vs. in the post thread.

Per image, a SAM stage worker runs SAM (prompts, then automatic masks from the same
embedding) and then CPU work on SAM's output: filtering, labelling each mask from the CLIP
similarity maps, COCO RLE encoding, the record rows. The reference does them one after the
other, as the worker did before; ours hands the CPU work to the worker's post thread
(``fmbseg.engine.inorder.InOrder``) while SAM takes the next image. Same images, same SAM
(random weights), same similarity maps (random, ``--classes`` present classes) and the real
stage functions (``segment_prompts``/``prompt_rows``, ``segment_auto``/``auto_rows``).
Prints seconds per image of each path, the time the CPU work alone takes, the ratio, and
checks both give the same rows.

On a CPU, SAM itself holds the cores, and random weights keep few masks (the work per image
grows with the masks kept: about 0.4 ms per 480x640 mask), so the gain is small there. The
gain is on a GPU, where SAM's thread mostly waits for the device. ``--stand-in MS`` shows it
on a CPU: a stand-in SAM that waits ``MS`` ms per image (as a thread waits on a CUDA
synchronise: the GIL released) and returns ``--masks`` disc masks per image, the kind of
count real weights keep.

    python bench/sam_post.py                                           # sam_tiny, CPU
    python bench/sam_post.py --stand-in 100 --masks 100                # device-bound SAM
    python bench/sam_post.py --model sam_vit_h --device cuda --points-per-side 32 --keep-all
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np
import torch
from harness import hw, parser, table, timed
from sam_auto import photos  # bench/ is on sys.path when run as a script

Rows = list[dict[str, Any]]


class StandIn:
    """A SAM that waits ``seconds`` per image, as for a device, and returns disc masks:
    ``masks`` automatic ones, 3 per prompt; made once per image (the same for both paths)
    and before the timing, so the stand-in itself costs no CPU."""

    def __init__(self, seconds: float, masks: int) -> None:
        self.seconds, self.masks = seconds, masks
        self.image: np.ndarray | None = None
        self._made: dict[tuple[int, int], np.ndarray] = {}

    def set_image(self, image: np.ndarray) -> None:
        self.image = image
        time.sleep(self.seconds / 2)

    def predict_batch(
        self, points: np.ndarray, labels: np.ndarray, multimask: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        assert self.image is not None
        h, w = self.image.shape[:2]
        discs = self.discs(self.image, points.shape[0] * 3).reshape(points.shape[0], 3, h, w)
        scores = np.linspace(0.5, 0.9, discs.shape[0] * 3, dtype=np.float32)
        return discs, scores.reshape(-1, 3)

    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        time.sleep(self.seconds / 2)
        return [
            {"segmentation": m, "predicted_iou": 0.9, "stability_score": 0.95}
            for m in self.discs(image, self.masks)
        ]

    def discs(self, image: np.ndarray, n: int) -> np.ndarray:
        key = (zlib.crc32(image.tobytes()), n)
        if key not in self._made:
            rng = np.random.default_rng(key)
            h, w = image.shape[:2]
            yy, xx = np.ogrid[:h, :w]
            cy, cx = rng.integers(0, h, n), rng.integers(0, w, n)
            r = rng.integers(10, max(11, min(h, w) // 3), n)
            self._made[key] = np.stack(
                [(yy - a) ** 2 + (xx - b) ** 2 < c * c for a, b, c in zip(cy, cx, r, strict=True)]
            )
        return self._made[key]


def main() -> None:
    from fmbseg.config import SamAutoConfig, SamPromptConfig
    from fmbseg.engine.inorder import InOrder
    from fmbseg.models import build_model
    from fmbseg.tasks.annotate.clip_dense import ClipDenseResult
    from fmbseg.tasks.annotate.common import POST_AHEAD, post_pool
    from fmbseg.tasks.annotate.sam_auto import auto_rows, segment_auto
    from fmbseg.tasks.annotate.sam_prompt import prompt_rows, segment_prompts

    ap = parser(__doc__)
    ap.add_argument("--model", default="sam_tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--size", type=hw, default="480x640", help="HxW of the images")
    ap.add_argument("--classes", type=int, default=5, help="present classes per image")
    ap.add_argument("--points-per-side", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument(
        "--stand-in",
        type=float,
        metavar="MS",
        help="instead of SAM: a stand-in taking MS ms of device time per image",
    )
    ap.add_argument("--masks", type=int, default=100, help="automatic masks of --stand-in")
    ap.add_argument(
        "--keep-all",
        action="store_true",
        help="SAM's IoU and stability thresholds 0 (random weights keep few masks; "
        "always so for sam_tiny)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    h, w = args.size
    # random weights keep almost no mask at METHOD's thresholds; the work per mask is the point
    keep_all = args.keep_all or args.model == "sam_tiny"
    auto_cfg = SamAutoConfig(
        points_per_side=args.points_per_side,
        pred_iou_thresh=0.0 if keep_all else 0.86,
        stability_score_thresh=0.0 if keep_all else 0.92,
        crop_n_layers=0,  # one whole-image pass: the post-processing per mask is the point
    )
    if args.stand_in is None:
        seg: Any = build_model(args.model, None, args.device, auto_config=auto_cfg)
    else:
        seg, args.model = StandIn(args.stand_in / 1000, args.masks), f"stand-in {args.stand_in} ms"
    prompt_cfg = SamPromptConfig()
    vocabulary = [f"class {k}" for k in range(args.classes)]
    rng = np.random.default_rng(0)
    gh, gw = max(1, h // 14), max(1, w // 14)
    images = photos(args.images + 1, (h, w))  # the first warms up each path
    clips = [
        ClipDenseResult(
            f"img-{i}",
            f"mem://{i}",
            h,
            w,
            12,
            np.zeros(args.classes, np.int32),
            np.arange(args.classes, dtype=np.int32),
            rng.random((args.classes, gh, gw), dtype=np.float32),
        )
        for i in range(len(images))
    ]

    if isinstance(seg, StandIn):
        for image in images:
            seg.discs(image, seg.masks)
            seg.discs(image, args.classes * 3)

    def segment(i: int) -> list[Callable[[], Rows]]:
        """SAM on image ``i``; what builds its rows (prompt, then auto)."""
        masks, scores = segment_prompts(seg, images[i], clips[i], prompt_cfg)
        generated = segment_auto(seg, images[i], clips[i])
        return [
            lambda: prompt_rows(masks, scores, clips[i], vocabulary, "fp"),
            lambda: auto_rows(generated, clips[i], vocabulary, auto_cfg, "fp"),
        ]

    def per_image(fn: Callable[[list[int]], Rows]) -> tuple[float, Rows]:
        """``fn`` on images 1.. after image 0 (untimed): seconds per image, the rows."""
        fn([0])
        run = timed(lambda: fn(list(range(1, len(images)))))
        return run.seconds / args.images, run.result

    def inline(ids: list[int]) -> Rows:
        return [row for i in ids for build in segment(i) for row in build()]

    pool = post_pool()

    def behind(ids: list[int]) -> Rows:
        out: Rows = []

        def done(_: int, job: Future[Rows]) -> None:
            out.extend(job.result())

        post: InOrder[int, Rows] = InOrder(pool, done, 2 * POST_AHEAD)  # as a SAM pair worker
        for i in ids:
            for build in segment(i):
                post.submit(i, build)
        post.drain()
        return out

    builds = [build for i in range(1, len(images)) for build in segment(i)]
    t_cpu = timed(lambda: [build() for build in builds]).seconds / args.images
    t_ref, ref = per_image(inline)
    t_ours, ours = per_image(behind)
    same = len(ref) == len(ours) and all(
        a["rle_counts"] == b["rle_counts"] and a["category_id"] == b["category_id"]
        for a, b in zip(ref, ours, strict=True)
    )
    print(
        f"{args.model} on {args.device}, {args.images} images {h}x{w}, {args.classes} classes, "
        f"{args.points_per_side}^2 points, {len(ref)} rows, torch threads {args.threads}"
    )
    table(
        [("path", "<44"), ("s/image", "9.4f"), ("images/s", "9.1f")],
        [
            (name, t, 1 / t)
            for name, t in (
                ("reference (records built after SAM, inline)", t_ref),
                ("ours (records built in the post thread)", t_ours),
                ("the record building alone", t_cpu),
            )
        ],
    )
    print(f"throughput ours / reference: {t_ref / t_ours:.2f}x; same rows: {same}")


if __name__ == "__main__":
    main()
