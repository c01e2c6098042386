"""The export files that span every image, written by the driver shard by shard.

After :mod:`fmbseg.tasks.export`'s shard workers have committed one row per image (the
internal stage ``export``), these stream the whole-export files: ``annotations.json``
(images from those rows, annotations from merge's records), ``records.parquet``,
``errors.parquet``, ``gallery.html`` and, last, ``export.json``. Shards are read in order,
a few ahead (:meth:`ArtifactStore.shards`), so at most that many shards' records, and one
Parquet row group being gathered (:data:`fmbseg.storage.parquet.ROW_GROUP_BYTES`), are in
memory; what is kept across shards is counts, the gallery's cards (at most
``gallery_max_images``) and the first errors it lists.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fmbseg.config import ExportConfig
from fmbseg.storage import ArtifactStore, Manifest
from fmbseg.storage.parquet import RowGroupWriter
from fmbseg.storage.records import ERROR_SCHEMA, RECORD_SCHEMA, MaskRecords
from fmbseg.tasks.export_coco import CocoWriter, coco_annotations, coco_image, first_rows
from fmbseg.tasks.gallery import GalleryEntry, class_colours, gallery_html, has_thumb

ERRORS_LISTED = 200  # images without masks that gallery.html names


def write_export_files(
    store: ArtifactStore,
    ecfg: ExportConfig,
    stage: str,
    fp: str,
    merge: Manifest,
    vocabulary: Sequence[str],
) -> dict[str, Any]:
    """Write the whole-export files under ``exports/{fp}/`` from the committed ``stage/fp``
    rows and the ``merge`` output; returns what ``export.json`` records (written last)."""
    base = f"exports/{fp}"
    rows_manifest = store.require_manifest(stage, fp)
    entries: list[GalleryEntry] = []
    counts = {"images": 0, "prompt": 0, "auto": 0}
    per_class = np.zeros(len(vocabulary), dtype=np.int64)
    with (
        store.open_write(f"{base}/annotations.json") as coco_file,
        store.open_write(f"{base}/records.parquet") as records_file,
        RowGroupWriter(records_file, RECORD_SCHEMA) as records_out,
    ):
        coco = CocoWriter(coco_file, vocabulary)
        for table in store.shards(stage, fp, manifest=rows_manifest):
            rows = table.to_pylist()
            start = counts["images"] + 1
            coco.images(
                coco_image(start + i, r["image_id"], r["uri"], r["width"], r["height"],
                           f"labels/{r['name']}.png" if ecfg.png else None)
                for i, r in enumerate(rows)
            )  # fmt: skip
            entries += [_entry(r, ecfg.png) for r in rows if r["gallery"]]
            counts["images"] += len(rows)
            counts["prompt"] += sum(r["prompt_masks"] for r in rows)
            counts["auto"] += sum(r["auto_masks"] for r in rows)
        images_before, next_ann = 0, 1
        for part in store.shards("merge", merge.fingerprint, manifest=merge):
            if not part.num_rows:
                continue
            table = MaskRecords.derived(part).table
            first = first_rows(table)
            coco_ids = {image_id: images_before + i + 1 for i, image_id in enumerate(first)}
            coco.annotations(coco_annotations(table, coco_ids, next_ann))
            records_out.write_table(table)
            cats = table.column("category_id").to_numpy()
            per_class += np.bincount(cats, minlength=len(vocabulary))[: len(vocabulary)]
            images_before += len(first)
            next_ann += table.num_rows
        coco.close()
    listed = _write_errors(store, f"{base}/errors.parquet", merge)
    summary = {
        "images": counts["images"],
        "masks": merge.rows,
        "prompt masks": counts["prompt"],
        "auto masks": counts["auto"],
        "images without masks": merge.error_rows,
    }
    if ecfg.overlays:
        page = gallery_html(
            f"fmbseg pseudo-labels {fp}",
            entries,
            vocabulary,
            class_colours(len(vocabulary)),
            per_class.tolist(),
            summary,
            listed,
            num_errors=merge.error_rows,
        )
        store.write_bytes(f"{base}/gallery.html", page.encode())
    record = {
        "fingerprint": fp,
        "merge": merge.fingerprint,
        "vocabulary": list(vocabulary),
        **{k.replace(" ", "_"): v for k, v in summary.items()},
        "files": {
            "coco": "annotations.json",
            "records": "records.parquet",
            "labels": "labels/" if ecfg.png else None,
            "gallery": "gallery.html" if ecfg.overlays else None,
        },
    }
    store.write_json(f"{base}/export.json", record)
    return record


def _entry(row: dict[str, Any], png: bool) -> GalleryEntry:
    name = row["name"]
    full = f"overlays/{name}.jpg"
    return GalleryEntry(
        name=name,
        uri=row["uri"],
        thumb=f"thumbs/{name}.jpg" if has_thumb(row["height"], row["width"]) else full,
        full=full,
        label_file=f"labels/{name}.png" if png else None,
        prompt_masks=row["prompt_masks"],
        auto_masks=row["auto_masks"],
        classes=list(row["classes"]),
    )


def _write_errors(store: ArtifactStore, rel: str, merge: Manifest) -> list[tuple[str, str, str]]:
    """Stream merge's errors into ``rel`` (only when there are any); returns the first
    :data:`ERRORS_LISTED` as ``(uri, error_type, message)``."""
    listed: list[tuple[str, str, str]] = []
    if not merge.error_rows:
        return listed
    with store.open_write(rel) as f, RowGroupWriter(f, ERROR_SCHEMA) as writer:
        for t in store.shards("merge", merge.fingerprint, "errors", manifest=merge):
            if not t.num_rows:
                continue
            writer.write_table(t.cast(ERROR_SCHEMA))
            need = ERRORS_LISTED - len(listed)
            if need > 0:
                head = t.slice(0, need).select(["uri", "error_type", "message"]).to_pydict()
                listed += zip(head["uri"], head["error_type"], head["message"], strict=True)
    return listed
