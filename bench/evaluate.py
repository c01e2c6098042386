"""Benchmark: metric accumulation and end-to-end evaluation throughput (CPU, tiny models).

1. Confusion-matrix accumulation over COCO-Stuff-sized label maps (171 classes, 10% ignore,
   some unlabelled predictions): ``ConfusionMatrix.update`` (one bincount through lookup
   tables) against the straightforward numpy a person writes first, ``np.add.at`` on the
   masked (truth, prediction) pairs, and against mmseg's four-histogram
   ``intersect_and_union`` written in numpy. All three must agree exactly; the ratios are
   measured in this run.
2. End-to-end ``evaluate_dataset`` images/s on a generated VOC2012 tree (JPEG + palette PNG,
   read through ``open_dataset``) with tiny random-weight models: the MaskCLIP and SCLIP
   baselines (``clip_tiny``) and the alignment model (``dinov2_tiny`` + module), under the
   tiny config's geometry and under the paper's (short side 448, window 448, stride 224).
3. The same through the ``evaluate`` stage (``fmbseg.tasks.evaluate.stage``: shards on the
   local executor, committed, merged exactly) and its cached rerun, against one call.

Run: ``.venv/bin/python bench/evaluate.py [--quick]``.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from harness import parser, timed
from PIL import Image

from fmbseg.config import EvaluateConfig, load_config
from fmbseg.data.datasets import open_dataset
from fmbseg.tasks.evaluate.metrics import ConfusionMatrix
from fmbseg.tasks.evaluate.predictors import AlignmentPredictor, DenseClipPredictor
from fmbseg.tasks.evaluate.protocol import evaluate_dataset

K = 171


def label_maps(n: int, h: int, w: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Blocky truth maps with ignore pixels, and predictions that are right ~60% of the time."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        blocks = rng.integers(0, K, (h // 16 + 1, w // 16 + 1))
        truth = np.kron(blocks, np.ones((16, 16), np.int64))[:h, :w].astype(np.uint8)
        truth[rng.random((h, w)) < 0.1] = 255
        pred = np.where(rng.random((h, w)) < 0.6, truth, rng.integers(0, K, (h, w))).astype(
            np.uint8
        )
        pred[rng.random((h, w)) < 0.02] = 255  # unlabelled predictions
        out.append((pred, truth))
    return out


def add_at_reference(maps: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    conf = np.zeros((K, K + 1), np.int64)
    for pred, truth in maps:
        valid = truth != 255
        p = pred[valid].astype(np.int64)
        p[p >= K] = K
        np.add.at(conf, (truth[valid].astype(np.int64), p), 1)
    return conf


def mmseg_reference(maps: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """mmseg intersect_and_union: areas of intersection, prediction and label per class."""
    inter, area_p, area_l = np.zeros(K), np.zeros(K), np.zeros(K)
    for pred, truth in maps:
        valid = truth != 255
        p, t = pred[valid], truth[valid]
        hit = p[p == t]
        inter += np.histogram(hit, bins=K, range=(0, K))[0]
        area_p += np.histogram(p, bins=K, range=(0, K))[0]
        area_l += np.histogram(t, bins=K, range=(0, K))[0]
    return np.stack([inter, area_p, area_l])


def bench_metrics(quick: bool) -> None:
    n, h, w = (4, 480, 640) if quick else (16, 480, 640)
    maps = label_maps(n, h, w)
    pixels = n * h * w

    def ours() -> np.ndarray:
        cm = ConfusionMatrix(K)
        for pred, truth in maps:
            cm.update(pred, truth)
        return cm.matrix

    run_ours = timed(ours, repeat=3)
    run_add = timed(lambda: add_at_reference(maps), repeat=1 if quick else 2)
    run_mm = timed(lambda: mmseg_reference(maps), repeat=3)
    t_ours, t_add, t_mm = run_ours.best, run_add.best, run_mm.best
    m_ours, areas = run_ours.result, run_mm.result
    assert np.array_equal(m_ours, run_add.result), "ConfusionMatrix disagrees with np.add.at"
    tp = np.diag(m_ours[:, :K])
    assert np.array_equal(areas, np.stack([tp, m_ours[:, :K].sum(0), m_ours.sum(1)])), (
        "ConfusionMatrix disagrees with mmseg's areas"
    )
    print(f"metric accumulation, {n} maps of {h}x{w}, K={K} ({pixels / 1e6:.1f} Mpx):")
    print(f"  ConfusionMatrix.update (bincount)  {pixels / t_ours / 1e6:8.1f} Mpx/s")
    print(
        f"  np.add.at reference                {pixels / t_add / 1e6:8.1f} Mpx/s   "
        f"ratio {t_add / t_ours:6.1f}x"
    )
    print(
        f"  mmseg 3-histogram reference        {pixels / t_mm / 1e6:8.1f} Mpx/s   "
        f"ratio {t_mm / t_ours:6.1f}x  (areas only, no confusion matrix)"
    )


def write_voc_tree(root: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    d = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    ids = [f"2007_{i:06d}" for i in range(n)]
    palette = list(rng.integers(0, 256, 768).astype(int))
    for sid in ids:
        h, w = (375, 500) if rng.random() < 0.7 else (500, 375)  # VOC's common sizes
        img = rng.integers(0, 256, (h // 25 + 1, w // 25 + 1, 3)).astype(np.uint8)
        img = np.kron(img, np.ones((25, 25, 1), np.uint8))[:h, :w]
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=90)
        (d / "JPEGImages" / f"{sid}.jpg").write_bytes(buf.getvalue())
        lab = np.kron(rng.integers(0, 21, (h // 50 + 1, w // 50 + 1)), np.ones((50, 50), int))
        lab = lab[:h, :w].astype(np.uint8)
        lab[::50] = 255
        pimg = Image.fromarray(lab)
        pimg.putpalette(palette)
        pimg.save(d / "SegmentationClass" / f"{sid}.png")
    (d / "ImageSets/Segmentation/val.txt").write_text("\n".join(ids))


def bench_end_to_end(quick: bool) -> None:
    from fmbseg.models import build_model
    from fmbseg.models.align import AlignmentConfig, AlignmentModule

    n = 4 if quick else 8
    tiny = load_config("tiny").evaluate
    paper = EvaluateConfig()  # 448 / 448 / 224, the TCL protocol
    with tempfile.TemporaryDirectory() as tmp:
        write_voc_tree(Path(tmp), n)
        ds = open_dataset("voc21", tmp)
        predictors = {}
        for mode in ("maskclip", "sclip"):
            predictors[f"{mode} (clip_tiny)"] = DenseClipPredictor(
                build_model("clip_tiny", None, "cpu", mode=mode)
            )
        clip = build_model("clip_tiny", None, "cpu")
        dino = build_model("dinov2_tiny", None, "cpu")
        module = AlignmentModule(
            AlignmentConfig(in_dim=dino.embed_dim, out_dim=clip.embed_dim, heads=2)
        )
        predictors["alignment (dinov2_tiny)"] = AlignmentPredictor(dino, module, clip)
        print(
            f"\nend-to-end evaluate_dataset, {n} VOC-sized images (voc21, 20 classes + 91 "
            "stuff background names), CPU, 1 thread:"
        )
        for geometry, cfg in (("tiny 64/64/32", tiny), ("paper 448/448/224", paper)):
            for name, pred in predictors.items():
                evaluate_dataset(pred, ds, cfg, limit=1)  # warm-up (text, caches)
                report = evaluate_dataset(pred, ds, cfg)
                print(f"  {geometry:<18} {name:<24} {report['images_per_second']:7.2f} images/s")
        bench_stage(Path(tmp), n, tiny)


def bench_stage(root: Path, n: int, ev: EvaluateConfig) -> None:
    """The same images through the ``evaluate`` stage (plan, shards, commit, exact merge) on
    the local executor, against ``evaluate_dataset`` in one call: the stage's overhead."""
    from fmbseg.config import replace
    from fmbseg.engine.stage import run
    from fmbseg.models import build_model
    from fmbseg.storage import ArtifactStore
    from fmbseg.tasks.evaluate.stage import build_report
    from fmbseg.tasks.evaluate.stages import EVALUATE, plan_evaluation

    cfg = replace(load_config("tiny"), runtime={"executor": "local", "shard_size": 2})
    ds = open_dataset("voc21", str(root))
    direct = DenseClipPredictor(build_model("clip_tiny", None, "cpu", mode="maskclip"))
    evaluate_dataset(direct, ds, ev, limit=1)  # warm-up
    direct_run = timed(lambda: evaluate_dataset(direct, ds, ev))
    store = ArtifactStore(str(root / "store"))

    def staged() -> tuple[Any, dict[str, Any]]:
        job = plan_evaluation(store, "voc21", str(root), "maskclip", cfg)
        run((EVALUATE,), job)
        return job, build_report(job)

    stage_run = timed(staged)
    expected, report = direct_run.result, stage_run.result[1]
    assert report["confusion"] == expected["confusion"], "stage merge differs from one pass"
    cached_run = timed(staged)  # every shard committed: the merge alone
    t_direct, t_stage, t_cached = direct_run.seconds, stage_run.seconds, cached_run.seconds
    shards = store.require_manifest("evaluate", cached_run.result[0].fp("evaluate")).num_shards
    print(
        f"\nevaluate stage, maskclip (clip_tiny), tiny geometry, {n} images in {shards} shards, "
        "local executor (includes building the model once):"
    )
    print(f"  evaluate_dataset, one call         {n / t_direct:7.2f} images/s")
    print(
        f"  evaluate stage (shards + merge)    {n / t_stage:7.2f} images/s   "
        f"ratio {t_stage / t_direct:5.2f}x the time; merged matrix identical"
    )
    print(
        f"  rerun (cache hit, merge only)      {n / t_cached:7.2f} images/s   "
        f"ratio {t_direct / t_cached:5.1f}x faster than evaluating"
    )


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer maps and images")
    args = ap.parse_args()
    torch.set_num_threads(1)
    bench_metrics(args.quick)
    bench_end_to_end(args.quick)


if __name__ == "__main__":
    main()
