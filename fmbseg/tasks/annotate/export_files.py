"""The export files that span every image, written by the driver shard by shard.

From the rows :mod:`fmbseg.tasks.annotate.export`'s shard workers committed (one per indexed
image) and merge's records: ``annotations.json``, ``candidates.json``, ``records.parquet``,
``errors.parquet``, ``gallery.html`` and, last, ``export.json``. Shards are read in order, a
few ahead (:meth:`ArtifactStore.shards`), so at most that many shards' records and one
Parquet row group being gathered are in memory; what is kept across shards is counts, the
gallery's cards (at most ``gallery_max_images``) and the first errors it lists.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fmbseg.config import ExportConfig
from fmbseg.storage import ArtifactStore, Manifest
from fmbseg.storage.parquet import RowGroupWriter
from fmbseg.storage.records import ERROR_SCHEMA, RECORD_SCHEMA, MaskRecords
from fmbseg.tasks.annotate.export_coco import (
    NO_LABEL,
    CocoWriter,
    candidate_annotations,
    coco_image,
    semantic_annotations,
)
from fmbseg.tasks.annotate.gallery import GalleryEntry, class_colours, gallery_html, has_thumb

ERRORS_LISTED = 200  # failed inputs that gallery.html names (export.json: the first 20)
ROW_COLUMNS = [
    "image_id",
    "name",
    "file_name",
    "uri",
    "width",
    "height",
    "status",
    "prompt_masks",
    "auto_masks",
    "classes",
    "gallery",
]
SEGMENT_COLUMNS = [
    "image_id",
    "classes",
    "segment_rle",
    "segment_area",
    "segment_bbox",
    "height",
    "width",
]


def _tables(tables: Iterator[pa.Table]) -> Iterator[pa.Table | None]:
    """Shards as read; an empty shard (no file) as None."""
    for t in tables:
        yield t if t.num_columns and t.num_rows else None


def write_export_files(
    store: ArtifactStore,
    ecfg: ExportConfig,
    stage: str,
    fp: str,
    index: Manifest,
    merge: Manifest,
    vocabulary: Sequence[str],
) -> dict[str, Any]:
    """Write the whole-export files under ``exports/{fp}/`` from the committed ``stage/fp``
    rows, the ``index`` and the ``merge`` output; returns what ``export.json`` records
    (written last)."""
    base = f"exports/{fp}"
    rows_manifest = store.require_manifest(stage, fp)
    entries: list[GalleryEntry] = []
    counts = {"images": 0, "labelled": 0, "no_label": 0, "failed": 0, "prompt": 0, "auto": 0}
    per_class = np.zeros(len(vocabulary), dtype=np.int64)
    with contextlib.ExitStack() as files:
        coco = CocoWriter(
            files.enter_context(store.open_write(f"{base}/annotations.json")),
            vocabulary,
            "semantic",
        )
        cands = None
        if ecfg.candidates:
            f = files.enter_context(store.open_write(f"{base}/candidates.json"))
            cands = CocoWriter(f, vocabulary, "candidates")
        records_file = files.enter_context(store.open_write(f"{base}/records.parquet"))
        records_out = files.enter_context(RowGroupWriter(records_file, RECORD_SCHEMA))
        starts = []  # COCO id of each shard's first image
        for table in _tables(store.shards(stage, fp, manifest=rows_manifest, columns=ROW_COLUMNS)):
            starts.append(counts["images"] + 1)
            if table is None:
                continue
            rows = table.to_pylist()
            images = [
                coco_image(starts[-1] + i, r, f"labels/{r['name']}.png" if ecfg.png else None)
                for i, r in enumerate(rows)
            ]
            coco.images(images)
            if cands is not None:
                cands.images(images)
            entries += [_entry(r, ecfg.png) for r in rows if r["gallery"]]
            counts["images"] += len(rows)
            for r in rows:
                counts[r["status"]] += 1
            counts["prompt"] += sum(r["prompt_masks"] for r in rows)
            counts["auto"] += sum(r["auto_masks"] for r in rows)
        next_ann, next_cand = 1, 1
        segments = store.shards(stage, fp, manifest=rows_manifest, columns=SEGMENT_COLUMNS)
        parts = store.shards("merge", merge.fingerprint, manifest=merge)
        for start, seg, part in zip(starts, _tables(segments), _tables(parts), strict=True):
            if seg is not None:
                anns = semantic_annotations(seg, range(start, start + seg.num_rows), next_ann)
                coco.annotations(anns)
                next_ann += len(anns)
            if part is None or seg is None:  # (merge has no masks of images not indexed)
                continue
            table = MaskRecords.derived(part).table
            if cands is not None:
                ids = seg.column("image_id").to_pylist()
                coco_ids = {image_id: start + i for i, image_id in enumerate(ids)}
                cands.annotations(candidate_annotations(table, coco_ids, next_cand))
                next_cand += table.num_rows
            records_out.write_table(table)
            cats = table.column("category_id").to_numpy()
            per_class += np.bincount(cats, minlength=len(vocabulary))[: len(vocabulary)]
        coco.close()
        if cands is not None:
            cands.close()
    listed, num_errors = _write_errors(store, f"{base}/errors.parquet", index, merge, rows_manifest)
    summary = {
        "images": counts["images"],
        "labelled images": counts["labelled"],
        "no confident label": counts["no_label"],
        "failed images": counts["failed"],
        "errors": num_errors,
        "masks": merge.rows,
        "prompt masks": counts["prompt"],
        "auto masks": counts["auto"],
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
            num_errors=num_errors,
        )
        store.write_bytes(f"{base}/gallery.html", page.encode())
    record = {
        "fingerprint": fp,
        "merge": merge.fingerprint,
        "index": index.fingerprint,
        "vocabulary": list(vocabulary),
        "category_ids": "COCO id = label value + 1 = vocabulary index + 1; 255 = ignore",
        **{k.replace(" ", "_"): v for k, v in summary.items()},
        "first_errors": [{"uri": u, "error_type": t, "message": m} for u, t, m in listed[:20]],
        "files": {
            "coco": "annotations.json",
            "candidates": "candidates.json" if ecfg.candidates else None,
            "records": "records.parquet",
            "errors": "errors.parquet",
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
        name=row["file_name"],
        uri=row["uri"],
        thumb=f"thumbs/{name}.jpg" if has_thumb(row["height"], row["width"]) else full,
        full=full,
        label_file=f"labels/{name}.png" if png else None,
        prompt_masks=row["prompt_masks"],
        auto_masks=row["auto_masks"],
        classes=list(row["classes"]),
    )


MODEL_STAGES = ("clip_dense", "sam_prompt", "sam_auto")


def _failures(
    store: ArtifactStore, index: Manifest, merge: Manifest, rows: Manifest
) -> Iterator[pa.Table]:
    """Every failed input, shard by shard, stage by stage: index's errors, then each model
    stage's (an image whose automatic masks failed but whose prompt masks did not is
    labelled, and still listed), then export's own, without the no-label rows, which are
    results. A merge made without its upstream fingerprints in its manifest gives its own
    (carried) rows."""
    stages = [index]
    if all(s in merge.meta for s in MODEL_STAGES):
        stages += [store.require_manifest(s, merge.meta[s]) for s in MODEL_STAGES]
    else:
        stages.append(merge)
    stages.append(rows)  # export's own: a gallery image that could not be read again
    for m in stages:
        if not m.error_rows:
            continue
        for t in store.shards(m.stage, m.fingerprint, "errors", manifest=m):
            if not t.num_columns or not t.num_rows:
                continue
            t = t.select(ERROR_SCHEMA.names).cast(ERROR_SCHEMA)
            t = t.filter(pc.invert(pc.is_in(t.column("error_type"), pa.array(NO_LABEL))))
            if t.num_rows:
                yield t


def _write_errors(
    store: ArtifactStore, rel: str, index: Manifest, merge: Manifest, rows: Manifest
) -> tuple[list[tuple[str, str, str]], int]:
    """Stream every failure into ``rel`` (written even when there are none); returns the
    first :data:`ERRORS_LISTED` as ``(uri, error_type, message)`` and how many there are."""
    listed: list[tuple[str, str, str]] = []
    total = 0
    with store.open_write(rel) as f, RowGroupWriter(f, ERROR_SCHEMA) as writer:
        for t in _failures(store, index, merge, rows):
            writer.write_table(t)
            total += t.num_rows
            need = ERRORS_LISTED - len(listed)
            if need > 0:
                head = t.slice(0, need).select(["uri", "error_type", "message"]).to_pydict()
                listed += zip(head["uri"], head["error_type"], head["message"], strict=True)
    return listed, total
