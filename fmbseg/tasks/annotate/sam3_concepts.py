"""Stage `sam3` (ours), the pure core: SAM 3's text concepts as mask records.

An alternative to stage 1.1 (CLIP presence vote + SAM point prompts): each vocabulary name
is a text prompt of a :class:`~fmbseg.models.base.ConceptSegmenter`; its presence
probability says whether the class is in the image at all, and its instance masks become
records with ``source="sam3"`` and SAM 3's score. The image is embedded once for the whole
vocabulary.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from fmbseg.config import Sam3Config
from fmbseg.models.base import ConceptMasks, ConceptSegmenter
from fmbseg.storage.records import mask_row
from fmbseg.tasks.annotate.common import Rows

SOURCE = "sam3"


def segment_concepts(
    segmenter: ConceptSegmenter, image: np.ndarray, vocabulary: Sequence[str], cfg: Sam3Config
) -> list[ConceptMasks]:
    """SAM 3 on one ``HxWx3 uint8 RGB`` image: one :class:`ConceptMasks` per vocabulary
    name, in order. Instances below ``cfg.score_threshold`` and beyond
    ``cfg.max_masks_per_class`` are dropped by the model before their masks are upsampled
    (:func:`concept_rows` applies the same rules again, so either may be skipped)."""
    segmenter.set_image(image)
    return segmenter.segment_concepts(
        vocabulary, min_score=cfg.score_threshold, max_masks=cfg.max_masks_per_class
    )


def present_classes(concepts: Sequence[ConceptMasks], cfg: Sam3Config) -> list[int]:
    """Vocabulary ids whose presence probability reaches ``cfg.presence_threshold``."""
    return [j for j, c in enumerate(concepts) if c.presence >= cfg.presence_threshold]


def concept_rows(
    concepts: Sequence[ConceptMasks],
    image_id: str,
    uri: str,
    vocabulary: Sequence[str],
    cfg: Sam3Config,
    fingerprint: str,
) -> list[dict[str, Any]]:
    """Mask records (``source="sam3"``, ``score`` = SAM 3's instance score) of one image.

    ``concepts[j]`` is what the model found of ``vocabulary[j]``. A class is kept when its
    presence reaches ``cfg.presence_threshold``; of its instances those scoring at least
    ``cfg.score_threshold``, highest first, at most ``cfg.max_masks_per_class``, and none
    that is empty. Rows come in vocabulary order, then descending score.

    Raises:
        ValueError: ``concepts`` and ``vocabulary`` differ in length, or a class's masks and
            scores do not match (``(M, H, W)`` and ``(M,)``); the message names the image.
    """
    if len(concepts) != len(vocabulary):
        raise ValueError(
            f"concept_rows({image_id!r}): {len(concepts)} concept results for a vocabulary "
            f"of {len(vocabulary)} names"
        )
    rows = []
    for class_id in present_classes(concepts, cfg):
        c = concepts[class_id]
        masks, scores = np.asarray(c.masks), np.asarray(c.scores, dtype=np.float32)
        if masks.ndim != 3 or scores.shape != (len(masks),):
            raise ValueError(
                f"concept_rows({image_id!r}): class {vocabulary[class_id]!r} has masks "
                f"{masks.shape} and scores {scores.shape}; expected (M, H, W) and (M,)"
            )
        order = np.argsort(-scores, kind="stable")
        order = order[scores[order] >= cfg.score_threshold]
        kept = 0
        for i in order:
            if cfg.max_masks_per_class is not None and kept == cfg.max_masks_per_class:
                break
            mask = np.asarray(masks[i], dtype=bool)
            if not mask.any():
                continue
            rows.append(
                mask_row(
                    mask,
                    image_id=image_id,
                    image_uri=uri,
                    category_id=class_id,
                    category=vocabulary[class_id],
                    source=SOURCE,
                    score=float(scores[i]),
                    fingerprint=fingerprint,
                )
            )
            kept += 1
    return rows


def concept_job(
    segmenter: ConceptSegmenter,
    image: np.ndarray,
    image_id: str,
    uri: str,
    vocabulary: Sequence[str],
    cfg: Sam3Config,
    fingerprint: str,
) -> Rows:
    """SAM 3's part now (:func:`segment_concepts`, in the caller's thread); the returned
    callable builds the records (:func:`concept_rows`), for a worker's post thread."""
    concepts = segment_concepts(segmenter, image, vocabulary, cfg)
    return functools.partial(concept_rows, concepts, image_id, uri, vocabulary, cfg, fingerprint)
