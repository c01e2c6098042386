"""Stage `sam_auto` (METHOD 1.2): SAM's automatic masks, labelled from CLIP similarity maps.

:func:`filter_masks` applies the quality and size thresholds whether or not the SAM adapter
already did.

Mean similarity under a mask, exactly and on the feature grid: every original pixel belongs
to the grid cell containing its centre (nearest-cell upsampling: the pixel centre
``(x + 0.5, y + 0.5)`` lies in cell ``(floor((y + 0.5) / cell_h), floor((x + 0.5) / cell_w))``).
The mean over the mask's pixels of the upsampled map therefore equals the cell similarities
weighted by how many mask pixels each cell holds, which is what is computed (one
``bincount`` per mask, then one matrix product for all classes). By METHOD 1.2.2 the argmax
over classes of these means is the mask's label.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from fmbseg.config import SamAutoConfig
from fmbseg.models.base import Segmenter
from fmbseg.storage.records import mask_row
from fmbseg.tasks.annotate.clip_dense import ClipDenseResult
from fmbseg.tasks.annotate.common import Rows

STAGE = "sam_auto"


def filter_masks(
    masks: list[dict[str, Any]], height: int, width: int, cfg: SamAutoConfig
) -> list[dict[str, Any]]:
    """Keep segment-anything mask records passing the quality and size thresholds of ``cfg``.

    Drops: ``predicted_iou < pred_iou_thresh``, ``stability_score < stability_score_thresh``,
    area below ``min_mask_region_area`` or above ``max_area_fraction`` of the image, empty.
    """
    limit = cfg.max_area_fraction * height * width
    kept = []
    for m in masks:
        area = int(np.count_nonzero(m["segmentation"]))
        if (
            area == 0
            or area < cfg.min_mask_region_area
            or area > limit
            or m.get("predicted_iou", 1.0) < cfg.pred_iou_thresh
            or m.get("stability_score", 1.0) < cfg.stability_score_thresh
        ):
            continue
        kept.append(m)
    return kept


def cell_index_map(height: int, width: int, grid_h: int, grid_w: int) -> np.ndarray:
    """``(H, W) int64``: the flat index ``row * grid_w + col`` of the cell holding each pixel centre."""
    rows = np.minimum(((np.arange(height) + 0.5) * grid_h / height).astype(np.int64), grid_h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * grid_w / width).astype(np.int64), grid_w - 1)
    return rows[:, None] * grid_w + cols[None, :]


def mask_class_scores(masks: Sequence[np.ndarray], clip: ClipDenseResult) -> np.ndarray:
    """``M`` masks ``HxW bool`` -> ``(M, P) float32`` mean similarity of each present class.

    Exact mean of the nearest-cell upsampled similarity maps over each mask's pixels (see
    the module docstring). Empty masks get zeros.
    """
    n_cells = clip.grid_h * clip.grid_w
    cells = cell_index_map(clip.height, clip.width, clip.grid_h, clip.grid_w)
    weights = np.zeros((len(masks), n_cells), dtype=np.float64)
    for i, mask in enumerate(masks):
        weights[i] = np.bincount(cells[mask], minlength=n_cells)
    totals = np.maximum(weights.sum(axis=1, keepdims=True), 1.0)
    sims = clip.sims.reshape(len(clip.present), n_cells).astype(np.float64)
    return ((weights / totals) @ sims.T).astype(np.float32)


def auto_rows(
    generated: list[dict[str, Any]],
    clip: ClipDenseResult,
    vocabulary: Sequence[str],
    cfg: SamAutoConfig,
    fingerprint: str,
) -> list[dict[str, Any]]:
    """The CPU part of :func:`auto_job`: SAM's mask records (``segmenter.generate``)
    filtered, labelled and turned into record rows."""
    kept = filter_masks(generated, clip.height, clip.width, cfg)
    if not kept:
        return []
    segs = [np.asarray(m["segmentation"], dtype=bool) for m in kept]
    labels = clip.present[mask_class_scores(segs, clip).argmax(axis=1)]
    return [
        mask_row(
            seg,
            image_id=clip.image_id,
            image_uri=clip.image_uri,
            category_id=int(label),
            category=vocabulary[label],
            source="auto",
            score=float(m.get("predicted_iou", 1.0)),
            fingerprint=fingerprint,
        )
        for m, seg, label in zip(kept, segs, labels, strict=True)
    ]


def segment_auto(
    segmenter: Segmenter, image: np.ndarray, clip: ClipDenseResult
) -> list[dict[str, Any]]:
    """SAM's part of :func:`auto_job`: its automatic mask records (none, SAM not run,
    when no class is present)."""
    clip.check_image(image)
    return segmenter.generate(image) if len(clip.present) else []


def auto_job(
    segmenter: Segmenter,
    image: np.ndarray,
    clip: ClipDenseResult,
    vocabulary: Sequence[str],
    cfg: SamAutoConfig,
    fingerprint: str,
) -> Rows:
    """SAM's automatic masks of one ``HxWx3 uint8`` image now (:func:`segment_auto`); the
    returned callable builds their record rows (:func:`auto_rows`, ``source="auto"``), for
    a worker's post thread.

    Each kept mask gets the present class with the highest mean similarity under it;
    ``score`` is SAM's predicted IoU. No present class -> no masks (SAM is not run; the
    caller records why).
    """
    generated = segment_auto(segmenter, image, clip)
    return functools.partial(auto_rows, generated, clip, vocabulary, cfg, fingerprint)
