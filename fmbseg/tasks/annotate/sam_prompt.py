"""Stage `sam_prompt` (METHOD 1.1.3): the top CLIP cells of each present class prompt SAM.

Per present class, SAM's mask with the highest predicted IoU becomes one record. It reads
only the stored similarity maps of stage `clip_dense`, never CLIP itself.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from fmbseg.config import SamPromptConfig
from fmbseg.models.base import Segmenter
from fmbseg.storage.records import mask_row
from fmbseg.tasks.annotate.clip_dense import ClipDenseResult
from fmbseg.tasks.annotate.common import Rows

STAGE = "sam_prompt"


def top_cells(sim: np.ndarray, k: int) -> np.ndarray:
    """``(h, w)`` similarity map -> ``(min(k, h*w), 2) int64`` ``(row, col)`` of the top cells.

    Descending similarity; equal values keep row-major order (deterministic).
    """
    flat = sim.reshape(-1)
    order = np.argsort(-flat, kind="stable")[: min(k, flat.size)]
    return np.stack(np.unravel_index(order, sim.shape), axis=1)


def prompt_points(sim: np.ndarray, k: int, cell_h: float, cell_w: float) -> np.ndarray:
    """``(h, w)`` similarity map -> ``(k', 2) float32`` points ``(x, y)`` in original pixels.

    A cell ``(row, col)`` becomes its centre ``x = (col + 0.5) * cell_w``,
    ``y = (row + 0.5) * cell_h`` (x = column; origin at the top-left pixel's corner).
    """
    cells = top_cells(sim, k)
    xs = (cells[:, 1] + 0.5) * cell_w
    ys = (cells[:, 0] + 0.5) * cell_h
    return np.stack([xs, ys], axis=1).astype(np.float32)


def segment_prompts(
    segmenter: Segmenter, image: np.ndarray, clip: ClipDenseResult, cfg: SamPromptConfig
) -> tuple[np.ndarray, np.ndarray]:
    """SAM's part of :func:`prompt_job`: ``(P, M, H, W) bool`` masks and ``(P, M)
    float32`` predicted IoUs, ``M`` candidates for each of the ``P`` present classes (none
    when no class is present)."""
    clip.check_image(image)
    if not len(clip.present):
        return np.zeros((0, 0, *image.shape[:2]), dtype=bool), np.zeros((0, 0), np.float32)
    segmenter.set_image(image)
    # every present class's points share one decoder pass (same count: the grid's top k)
    points = np.stack(
        [prompt_points(sim, cfg.num_points, clip.cell_h, clip.cell_w) for sim in clip.sims]
    )
    labels = np.ones(points.shape[:2], dtype=np.int64)
    return segmenter.predict_batch(points, labels, multimask=cfg.multimask)


def prompt_rows(
    masks: np.ndarray,
    scores: np.ndarray,
    clip: ClipDenseResult,
    vocabulary: Sequence[str],
    fingerprint: str,
) -> list[dict[str, Any]]:
    """The CPU part of :func:`prompt_job`: of each present class's candidates (from
    :func:`segment_prompts`), the record of the one with the highest predicted IoU, unless
    it is empty."""
    rows = []
    for j, class_id in enumerate(clip.present):
        best = int(np.argmax(scores[j]))
        mask = np.asarray(masks[j, best], dtype=bool)
        if not mask.any():
            continue
        rows.append(
            mask_row(
                mask,
                image_id=clip.image_id,
                image_uri=clip.image_uri,
                category_id=int(class_id),
                category=vocabulary[class_id],
                source="prompt",
                score=float(scores[j, best]),
                fingerprint=fingerprint,
            )
        )
    return rows


def prompt_job(
    segmenter: Segmenter,
    image: np.ndarray,
    clip: ClipDenseResult,
    vocabulary: Sequence[str],
    cfg: SamPromptConfig,
    fingerprint: str,
) -> Rows:
    """SAM on the present classes of one ``HxWx3 uint8`` image now (:func:`segment_prompts`);
    the returned callable builds their record rows (:func:`prompt_rows`, ``source="prompt"``),
    for a worker's post thread.

    One row per present class whose best mask is not empty; none when no class is present
    (the caller records why). ``score`` is SAM's predicted IoU of the kept mask.
    """
    masks, scores = segment_prompts(segmenter, image, clip, cfg)
    return functools.partial(prompt_rows, masks, scores, clip, vocabulary, fingerprint)
