"""Stage-1 annotation throughput (images/s) end to end, and the share of time outside models.

Runs index -> clip_dense -> sam_prompt -> sam_auto -> merge -> export with the local
executor on ``--images`` generated photos (random crops of skimage's sample photos) and the
models a config names (``tiny`` = random-weight tiny CLIP and SAM, CPU). Every model call
(CLIP ``crops_and_dense``/``encode_text``, SAM ``set_image``/``predict``/``generate``) is
timed, so the report separates model time from everything else (decoding, resizing,
stitching, RLE, Parquet, PNG, store I/O), per stage and overall, measured in this one run.

    python bench/annotate.py [--config tiny] [--images 64] [--threads 1] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import collections
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

TIMED = {"crops_and_dense", "encode_text", "set_image", "predict", "generate"}
MODEL_TIME: collections.Counter[str] = collections.Counter()
BUILD_TIME: collections.Counter[str] = collections.Counter()


class Timed:
    """Proxy of a model that adds the wall time of its model calls to MODEL_TIME."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name not in TIMED or not callable(attr):
            return attr

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                MODEL_TIME[name] += time.perf_counter() - start

        return timed


def make_images(folder: Path, n: int, size: tuple[int, int] = (96, 128)) -> None:
    import skimage.data
    from PIL import Image

    photos = [np.asarray(getattr(skimage.data, p)())[..., :3]
              for p in ("astronaut", "chelsea", "coffee", "rocket")]  # fmt: skip
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        photo = photos[i % len(photos)]
        scale = rng.uniform(1.5, 3.0)
        h, w = int(size[0] * scale), int(size[1] * scale)
        h, w = min(h, photo.shape[0]), min(w, photo.shape[1])
        y, x = rng.integers(0, photo.shape[0] - h + 1), rng.integers(0, photo.shape[1] - w + 1)
        im = Image.fromarray(photo[y : y + h, x : x + w]).resize(
            size[::-1], Image.Resampling.BILINEAR
        )
        im.save(folder / f"img-{i:04d}.jpg", quality=92)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], help="section.key=value override")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from fmbseg.config import load_config, replace
    from fmbseg.data.vocab import load_vocabulary
    from fmbseg.models import registry
    from fmbseg.storage import ArtifactStore
    from fmbseg.tasks.clip_dense import run_clip_dense
    from fmbseg.tasks.export import run_export
    from fmbseg.tasks.index import run_index
    from fmbseg.tasks.merge import run_merge
    from fmbseg.tasks.sam_auto import run_sam_auto
    from fmbseg.tasks.sam_prompt import run_sam_prompt

    build = registry.build_from_config

    def timed_build(*a: Any, **k: Any) -> Timed:
        start = time.perf_counter()
        model = build(*a, **k)
        BUILD_TIME["build"] += time.perf_counter() - start
        return Timed(model)

    registry.build_from_config = timed_build  # type: ignore[assignment]
    registry.list_models()  # import the model libraries now, not inside the first stage
    cfg = replace(load_config(args.config, args.set), runtime={"executor": "local"})
    vocab = load_vocabulary("voc-20")
    with tempfile.TemporaryDirectory() as tmp:
        make_images(Path(tmp) / "images", args.images)
        store = ArtifactStore(str(Path(tmp) / "store"))
        rows, fps = [], {}

        def stage(name: str, fn: Any, *a: Any, **k: Any) -> None:
            MODEL_TIME.clear()
            BUILD_TIME.clear()
            start = time.perf_counter()
            fps[name] = fn(store, cfg, *a, **k)
            wall = time.perf_counter() - start
            rows.append((name, wall, sum(MODEL_TIME.values()), BUILD_TIME["build"]))

        stage("index", lambda s, c: run_index(s, str(Path(tmp) / "images"), c))
        stage("clip_dense", run_clip_dense, fps["index"], vocab)
        stage("sam_prompt", run_sam_prompt, fps["clip_dense"])
        stage("sam_auto", run_sam_auto, fps["clip_dense"])
        stage("merge", run_merge, fps["index"], fps["clip_dense"], fps["sam_prompt"],
              fps["sam_auto"])  # fmt: skip
        stage("export", run_export, fps["merge"])
        masks = store.require_manifest("merge", fps["merge"]).rows

    print(f"config {args.config}: {args.images} images, {len(vocab)} classes, {masks} merged "
          f"masks, torch threads {args.threads}")  # fmt: skip
    print("outside = wall - model calls - model builds (decode, resize, stitch, RLE, I/O, ...)")
    print(f"{'stage':<11} {'wall s':>8} {'build s':>8} {'model s':>8} {'outside':>8} "
          f"{'images/s':>9}")  # fmt: skip
    for name, wall, m, b in [*rows, ("total", *np.sum([r[1:] for r in rows], axis=0))]:
        share = (wall - m - b) / (wall - b) if wall > b else 0.0
        print(f"{name:<11} {wall:8.2f} {b:8.2f} {m:8.2f} {share:8.0%} "
              f"{args.images / (wall - b):9.1f}")  # fmt: skip
    print("images/s and the outside share exclude model builds (paid once per worker).")


if __name__ == "__main__":
    main()
