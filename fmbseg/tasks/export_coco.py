"""COCO JSON for the export stage, whole (:func:`coco_dataset`) or streamed shard by shard.

The streamed file is byte-for-byte ``json.dumps(coco_dataset(...))``: the same keys in the
same order, with ``json.dumps``'s default separators (``", "`` and ``": "``), so readers
cannot tell the two apart and the driver never holds more than one shard's annotations.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import IO, Any

import pyarrow as pa

from fmbseg.storage.records import MaskRecords

INFO = {"description": "fmbseg pseudo-labels"}


def coco_categories(vocabulary: Sequence[str]) -> list[dict[str, Any]]:
    """One COCO category per vocabulary entry; ids are the vocabulary indices (from 0)."""
    return [{"id": k, "name": name, "supercategory": ""} for k, name in enumerate(vocabulary)]


def coco_image(
    coco_id: int, image_id: str, uri: str, width: int, height: int, label_file: str | None
) -> dict[str, Any]:
    """A COCO ``images`` entry; ``label_file`` (relative to the export) is left out when None."""
    entry: dict[str, Any] = {
        "id": coco_id,
        "file_name": uri.rsplit("/", 1)[-1],
        "width": width,
        "height": height,
        "uri": uri,
        "fmbseg_image_id": image_id,
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


def coco_annotations(
    table: pa.Table, coco_ids: Mapping[str, int], first_id: int
) -> list[dict[str, Any]]:
    """One COCO annotation per record row (compressed RLE, bbox XYWH in pixels), numbered
    from ``first_id`` in row order; ``coco_ids`` maps image ids to COCO image ids."""
    cols = {
        n: table.column(n).to_pylist()
        for n in ("image_id", "category_id", "height", "width", "rle_counts", "area", "bbox")
    }
    cols["score"] = table.column("score").to_pylist()
    cols["source"] = [str(s) for s in table.column("source").to_pylist()]
    return [
        {
            "id": first_id + j,
            "image_id": coco_ids[cols["image_id"][j]],
            "category_id": cols["category_id"][j],
            "segmentation": {
                "size": [cols["height"][j], cols["width"][j]],
                "counts": cols["rle_counts"][j].decode("ascii"),
            },
            "area": cols["area"][j],
            "bbox": [round(v, 2) for v in cols["bbox"][j]],
            "iscrowd": 0,
            "score": round(cols["score"][j], 6),
            "source": cols["source"][j],
        }
        for j in range(table.num_rows)
    ]


def coco_dataset(
    records: MaskRecords, vocabulary: Sequence[str], names: dict[str, str] | None = None
) -> dict[str, Any]:
    """Merged records -> a COCO instance-segmentation dict (one annotation per mask).

    Images are numbered from 1 in order of first appearance and keep ``uri``,
    ``fmbseg_image_id`` and (when ``names`` maps image ids to names) ``label_file``.
    """
    t = records.table
    first = first_rows(t)
    uris, widths, heights = (t.column(n).to_pylist() for n in ("image_uri", "width", "height"))
    coco_id = {image_id: i + 1 for i, image_id in enumerate(first)}
    images = [
        coco_image(
            coco_id[image_id],
            image_id,
            uris[r],
            widths[r],
            heights[r],
            None if names is None else f"labels/{names[image_id]}.png",
        )
        for image_id, r in first.items()
    ]
    return {
        "info": dict(INFO),
        "images": images,
        "categories": coco_categories(vocabulary),
        "annotations": coco_annotations(t, coco_id, 1),
    }


class CocoWriter:
    """Writes ``json.dumps(coco_dataset(...))``'s bytes to ``f`` in pieces.

    Call :meth:`images` with every image entry (in COCO id order, possibly over several
    calls), then :meth:`annotations` likewise, then :meth:`close`.
    """

    def __init__(self, f: IO[bytes], vocabulary: Sequence[str]) -> None:
        self.f, self.vocabulary = f, vocabulary
        self.section = "images"
        self.count = 0
        f.write(f'{{"info": {json.dumps(INFO)}, "images": ['.encode())

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
