"""COCO JSON for the export stage, streamed shard by shard.

``annotations.json`` holds the merged semantic labels (one non-overlapping segment per class
per image, COCO-Stuff style) and ``candidates.json`` the raw overlapping masks behind them,
with the same images and categories (ids: :mod:`fmbseg.tasks.annotate.export`).

:class:`CocoWriter` writes ``json.dumps(coco_dataset(...))``'s bytes: the same keys in the
same order, with ``json.dumps``'s default separators (``", "`` and ``": "``), so readers
cannot tell the two apart and the driver never holds more than one shard's annotations.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import IO, Any

import pyarrow as pa

from fmbseg.storage.records import IGNORE

NO_LABEL = frozenset({"no_class_present", "no_masks"})
"""Merge's reasons for an image without masks that are a result, not a failure: it is
exported with an all-IGNORE label map and no annotations ("no confident label")."""


def coco_info(kind: str) -> dict[str, Any]:
    """The ``info`` block: what the file holds and how its ids map to the label maps."""
    what = {
        "semantic": "merged semantic pseudo-labels: per image one non-overlapping segment "
        "per class of its label map",
        "candidates": "raw pseudo-label masks (SAM prompt and automatic), overlapping, with "
        "source and score; annotations.json holds the merged semantic labels",
    }[kind]
    return {
        "description": f"fmbseg {what}",
        "category_ids": "COCO category id = label-map value + 1 (= vocabulary index + 1); "
        f"label maps (labels/*.png) hold 0..K-1, {IGNORE} = ignore / no confident label",
        "file_name": "path relative to the source root; image_uri is the full URI",
    }


def coco_categories(vocabulary: Sequence[str]) -> list[dict[str, Any]]:
    """One COCO category per vocabulary entry: id = index + 1, ``label_value`` = index."""
    return [
        {"id": k + 1, "name": name, "supercategory": "", "label_value": k}
        for k, name in enumerate(vocabulary)
    ]


def coco_image(coco_id: int, row: Mapping[str, Any], label_file: str | None) -> dict[str, Any]:
    """A COCO ``images`` entry for an export row (``image_id``, ``file_name``, ``uri``,
    ``width``, ``height``, ``status``: ``labelled``, ``no_label`` or ``failed``);
    ``label_file`` (relative to the export) is left out when None."""
    entry: dict[str, Any] = {
        "id": coco_id,
        "file_name": row["file_name"],
        "width": row["width"],
        "height": row["height"],
        "image_uri": row["uri"],
        "fmbseg_image_id": row["image_id"],
        "status": row["status"],
    }
    if label_file is not None:
        entry["label_file"] = label_file
    return entry


def first_rows(table: pa.Table) -> dict[str, int]:
    """image id -> its first row, in order of first appearance (merge writes an image's
    rows together, and the images of a shard in the index's order)."""
    first: dict[str, int] = {}
    for row, image_id in enumerate(table.column("image_id").to_pylist()):
        first.setdefault(image_id, row)
    return first


def _annotation(
    ann_id: int, coco_id: int, size: list[int], k: int, rle: bytes, area: int, bbox: list[float]
) -> dict[str, Any]:
    """A COCO annotation of vocabulary class ``k``: compressed RLE, bbox XYWH in pixels."""
    return {
        "id": ann_id,
        "image_id": coco_id,
        "category_id": k + 1,
        "segmentation": {"size": size, "counts": rle.decode("ascii")},
        "area": area,
        "bbox": [round(v, 2) for v in bbox],
        "iscrowd": 0,
    }


def semantic_annotations(
    rows: pa.Table, coco_ids: Sequence[int], first_id: int
) -> list[dict[str, Any]]:
    """One COCO annotation per (image, class) segment of export rows (``segment_*`` and
    ``classes`` columns, row ``i`` being COCO image ``coco_ids[i]``), numbered from
    ``first_id``."""
    segment = ("classes", "segment_rle", "segment_area", "segment_bbox")
    cols = {n: rows.column(n).to_pylist() for n in (*segment, "height", "width")}
    anns: list[dict[str, Any]] = []
    for i, coco_id in enumerate(coco_ids):
        size = [cols["height"][i], cols["width"][i]]
        for seg in zip(*(cols[n][i] for n in segment), strict=True):
            anns.append(_annotation(first_id + len(anns), coco_id, size, *seg))
    return anns


def candidate_annotations(
    table: pa.Table, coco_ids: Mapping[str, int], first_id: int
) -> list[dict[str, Any]]:
    """One COCO annotation per record row (with its source and score), numbered from
    ``first_id`` in row order; ``coco_ids`` maps image ids to COCO image ids."""
    names = ("image_id", "height", "width", "category_id", "rle_counts", "area", "bbox", "score")
    cols = {n: table.column(n).to_pylist() for n in names}
    sources = [str(s) for s in table.column("source").to_pylist()]
    return [
        {
            **_annotation(first_id + j, coco_ids[image_id], [h, w], k, rle, area, bbox),
            "score": round(score, 6),
            "source": source,
        }
        for j, (image_id, h, w, k, rle, area, bbox, score, source) in enumerate(
            zip(*cols.values(), sources, strict=True)
        )
    ]


def coco_dataset(
    kind: str,
    images: Sequence[dict[str, Any]],
    annotations: Sequence[dict[str, Any]],
    vocabulary: Sequence[str],
) -> dict[str, Any]:
    """The whole COCO dict that :class:`CocoWriter` streams (``kind``: ``semantic`` or
    ``candidates``)."""
    return {
        "info": coco_info(kind),
        "images": list(images),
        "categories": coco_categories(vocabulary),
        "annotations": list(annotations),
    }


class CocoWriter:
    """Writes ``json.dumps(coco_dataset(kind, ...))``'s bytes to ``f`` in pieces.

    Call :meth:`images` with every image entry (in COCO id order, possibly over several
    calls), then :meth:`annotations` likewise, then :meth:`close`.
    """

    def __init__(self, f: IO[bytes], vocabulary: Sequence[str], kind: str) -> None:
        self.f, self.vocabulary = f, vocabulary
        self.section = "images"
        self.count = 0
        f.write(f'{{"info": {json.dumps(coco_info(kind))}, "images": ['.encode())

    def _items(self, items: Iterable[dict[str, Any]]) -> None:
        parts = [json.dumps(item) for item in items]
        if parts:
            self.f.write(((", " if self.count else "") + ", ".join(parts)).encode())
            self.count += len(parts)

    def images(self, entries: Iterable[dict[str, Any]]) -> None:
        if self.section != "images":
            raise RuntimeError("CocoWriter: images must all come before the annotations")
        self._items(entries)

    def annotations(self, anns: Iterable[dict[str, Any]]) -> None:
        if self.section == "images":
            categories = json.dumps(coco_categories(self.vocabulary))
            self.f.write(f'], "categories": {categories}, "annotations": ['.encode())
            self.section, self.count = "annotations", 0
        self._items(anns)

    def close(self) -> None:
        self.annotations(())  # no annotations at all: still the categories and "[]"
        self.f.write(b"]}")
