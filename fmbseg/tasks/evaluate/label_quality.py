"""Pseudo-label quality: stage-1 label maps scored against a benchmark's ground truth.

For each image of a dataset with ground truth, the stage-1 mask records are composed into
label maps three ways -- prompt-only (stage 1.1), auto-only (stage 1.2) and merged (all
records) -- with ``fmbseg.storage.records.compose_label_map`` (the same painting as the
merge stage), and each way feeds its own :class:`ConfusionMatrix`.

Records name their class by ``category`` (a name of the annotation vocabulary, with
``category_id`` its index there); names are matched to the dataset's classes ignoring case
and spaces. A record whose class is not a dataset class counts as the dataset's background
when it has one (e.g. COCO-Stuff's ``sky`` on VOC21, as in the paper's background handling),
else as "no prediction". Unlabelled pixels (255) are "no prediction": they count as misses
of the true class, and ``coverage`` reports the fraction of evaluated pixels that got a label.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias

import numpy as np
import pyarrow as pa

from fmbseg.data.vocab import name_key
from fmbseg.storage.records import IGNORE, MaskRecords, compose_label_map
from fmbseg.tasks.evaluate.metrics import ConfusionMatrix
from fmbseg.tasks.evaluate.protocol import metrics_report

VARIANTS = ("prompt", "auto", "merged")
RecordsLike: TypeAlias = MaskRecords | pa.Table | Sequence[Mapping[str, Any]]


def _rows(records: RecordsLike) -> list[dict[str, Any]]:
    if isinstance(records, MaskRecords):
        return records.rows()
    if isinstance(records, pa.Table):
        return records.to_pylist()
    return [dict(r) for r in records]


def _class_lut(
    rows: list[dict[str, Any]], classes: Sequence[str], background: int | None, unmatched: set[str]
) -> np.ndarray:
    """Annotation-vocabulary id -> dataset class id (``IGNORE`` stays ``IGNORE``)."""
    index = {name_key(c): i for i, c in enumerate(classes)}
    fallback = IGNORE if background is None else background
    lut = np.full(256, IGNORE, dtype=np.uint8)
    for r in rows:
        cid, name = int(r["category_id"]), str(r["category"])
        target = index.get(name_key(name))
        if target is None:
            unmatched.add(name)
            target = fallback
        lut[cid] = target
    return lut


def label_maps(
    records: RecordsLike,
    height: int,
    width: int,
    classes: Sequence[str],
    background: int | None = None,
    unmatched: set[str] | None = None,
    order: str = "area",
) -> dict[str, np.ndarray]:
    """One image's records -> ``{"prompt", "auto", "merged"}`` ``HxW uint8`` maps of dataset
    class ids (``IGNORE`` = unlabelled), painted in ``order`` (``merge.order``)."""
    rows = _rows(records)
    lut = _class_lut(rows, classes, background, unmatched if unmatched is not None else set())
    subsets = {
        "prompt": [r for r in rows if r["source"] == "prompt"],
        "auto": [r for r in rows if r["source"] == "auto"],
        "merged": rows,
    }
    return {k: lut[compose_label_map(v, height, width, order)] for k, v in subsets.items()}


def pseudo_label_quality(
    dataset: Any,
    records: Mapping[str, RecordsLike] | Callable[[str], RecordsLike | None],
    limit: int | None = None,
    order: str = "area",
) -> dict[str, Any]:
    """Score stage-1 pseudo-labels of ``dataset``'s images against its ground truth.

    Args:
        dataset: a ``SegDataset`` (iterates ``(sample_id, image, label)``; uses
            ``classes``, ``background``, ``ignore_index``).
        records: the mask records of each image, by sample id (a mapping, or a function
            returning ``None`` for an image without records). An image without records
            counts as entirely unlabelled.
        limit: score only the first ``limit`` images.
        order: how masks are painted (``merge.order`` of the merge output scored).

    Returns:
        ``{"dataset", "num_images", "images_without_records", "unmatched_categories",
        "prompt": report, "auto": report, "merged": report}`` where each report has
        ``mIoU``, ``mAcc``, ``aAcc``, ``coverage`` (fraction of evaluated pixels labelled),
        ``precision`` (fraction of labelled evaluated pixels labelled correctly),
        ``per_class`` and ``confusion``.
    """
    get = records.get if isinstance(records, Mapping) else records
    k = len(dataset.classes)
    cms = {v: ConfusionMatrix(k, dataset.ignore_index) for v in VARIANTS}
    unmatched: set[str] = set()
    missing = 0
    n = len(dataset) if limit is None else min(limit, len(dataset))
    subset = dataset if n == len(dataset) else dataset.subset(range(n))
    for sample_id, label in subset.iter_labels():
        recs: RecordsLike | None = get(sample_id)
        if recs is None:
            missing += 1
            recs = []
        maps = label_maps(
            recs,
            label.shape[0],
            label.shape[1],
            dataset.classes,
            dataset.background,
            unmatched,
            order,
        )
        for v in VARIANTS:
            cms[v].update(maps[v], label)
    return {
        "dataset": getattr(dataset, "name", type(dataset).__name__),
        "num_images": n,
        "images_without_records": missing,
        "unmatched_categories": sorted(unmatched),
        **{v: quality_report(cms[v], dataset.classes) for v in VARIANTS},
    }


def quality_report(cm: ConfusionMatrix, classes: Sequence[str]) -> dict[str, Any]:
    """:func:`~fmbseg.tasks.evaluate.protocol.metrics_report` plus ``precision``: the fraction of
    labelled evaluated pixels labelled correctly (``None`` when nothing was labelled)."""
    report = metrics_report(cm, classes)
    k = cm.num_classes
    labelled = int(cm.matrix[:, :k].sum())
    report["precision"] = float(np.trace(cm.matrix[:, :k]) / labelled) if labelled else None
    return report
