"""Stage `export`: the merged pseudo-labels in the formats people and tools read.

Written under ``{store}/exports/{fingerprint}/`` through the store (any fsspec URI)::

    annotations.json      COCO: images, categories, annotations (compressed RLE, bbox XYWH,
                          area, iscrowd 0, score, source); loads with pycocotools.coco.COCO
    records.parquet       the merged records (fmbseg.storage.records.RECORD_SCHEMA)
    errors.parquet        images without masks and why (merge's errors table)
    labels/{name}.png     palette PNG label maps, image-sized; value = category id, 255 = ignore
    overlays/{name}.jpg   image + label colours + outlines (first ``gallery_max_images``)
    thumbs/{name}.jpg     small overlays for the gallery
    gallery.html          one static page: summary, class legend, image cards
    export.json           what was written; written last, so its presence = complete

Category ids are the vocabulary indices everywhere (records, COCO, PNG values), so COCO ids
start at 0. ``{name}`` is the image file's stem, or ``stem-{image_id[:8]}`` when two images
share a stem.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from fmbseg.config import Config
from fmbseg.storage import ArtifactStore
from fmbseg.storage.records import MaskRecords, compose_label_map
from fmbseg.storage.store import table_to_parquet_bytes
from fmbseg.tasks.gallery import (
    GalleryEntry,
    class_colours,
    gallery_html,
    jpeg,
    label_png,
    overlay,
)
from fmbseg.tasks.runner import Progress
from fmbseg.tasks.stage1 import (
    CODE_VERSIONS,
    load_image,
    prefetch,
    read_vocabulary,
    stage_fingerprint,
)

STAGE = "export"
CODE_VERSION = CODE_VERSIONS[STAGE]
THUMB_SIDE = 320


def image_names(uris: Sequence[str], image_ids: Sequence[str]) -> list[str]:
    """File-system-safe, unique names for images: the file stem, disambiguated by image id."""
    stems = [
        re.sub(r"[^A-Za-z0-9._-]+", "_", u.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0])
        or "image"
        for u in uris
    ]
    counts = Counter(stems)
    return [s if counts[s] == 1 else f"{s}-{i[:8]}" for s, i in zip(stems, image_ids, strict=True)]


def coco_dataset(
    records: MaskRecords, vocabulary: Sequence[str], names: dict[str, str] | None = None
) -> dict[str, Any]:
    """Merged records -> a COCO instance-segmentation dict (one annotation per mask).

    Images are numbered from 1 in order of first appearance and keep ``uri``,
    ``fmbseg_image_id`` and (when ``names`` maps image ids to names) ``label_file``.
    """
    t = records.table
    cols = {n: t.column(n).to_pylist() for n in t.column_names}
    image_ids = records.image_ids()
    coco_id = {image_id: i + 1 for i, image_id in enumerate(image_ids)}
    first: dict[str, int] = {}
    for row, image_id in enumerate(cols["image_id"]):
        first.setdefault(image_id, row)
    images = []
    for image_id in image_ids:
        r = first[image_id]
        entry = {
            "id": coco_id[image_id],
            "file_name": cols["image_uri"][r].rsplit("/", 1)[-1],
            "width": cols["width"][r],
            "height": cols["height"][r],
            "uri": cols["image_uri"][r],
            "fmbseg_image_id": image_id,
        }
        if names is not None:
            entry["label_file"] = f"labels/{names[image_id]}.png"
        images.append(entry)
    annotations = [
        {
            "id": j + 1,
            "image_id": coco_id[cols["image_id"][j]],
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
        for j in range(t.num_rows)
    ]
    categories = [{"id": k, "name": name, "supercategory": ""} for k, name in enumerate(vocabulary)]
    return {
        "info": {"description": "fmbseg pseudo-labels"},
        "images": images,
        "categories": categories,
        "annotations": annotations,
    }


def run_export(
    store: ArtifactStore,
    cfg: Config,
    merge_fp: str,
    *,
    storage_options: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> str:
    """Export a committed merge output (or reuse a complete export); returns its fingerprint."""
    fp = stage_fingerprint(STAGE, cfg, {"merge": merge_fp})
    base = f"exports/{fp}"
    if store.exists(f"{base}/export.json"):
        return fp
    vocabulary = read_vocabulary(store, "merge", merge_fp)
    colours = class_colours(len(vocabulary))
    records = (
        MaskRecords(store.read_table("merge", merge_fp))
        if store.require_manifest("merge", merge_fp).rows
        else MaskRecords.empty()
    )
    errors = store.read_table("merge", merge_fp, "errors")
    ids = records.image_ids()
    by_image = _row_ranges(records.table)
    uris = [records.table.column("image_uri")[by_image[i][0]].as_py() for i in ids]
    names = dict(zip(ids, image_names(uris, ids), strict=True))
    ecfg = cfg.export
    entries: list[GalleryEntry] = []
    shown = uris[: max(0, ecfg.gallery_max_images)] if ecfg.overlays else []
    # the gallery's images are read and decoded in threads, ahead of the loop below
    images = prefetch(shown, lambda uri: load_image(uri, storage_options, cfg.index.max_pixels))
    with contextlib.closing(images):
        for n, image_id in enumerate(ids):
            rows = _rows_of(records.table, by_image[image_id])
            h, w = rows.column("height")[0].as_py(), rows.column("width")[0].as_py()
            label = compose_label_map(rows, h, w)
            name = names[image_id]
            if ecfg.png:
                store.write_bytes(f"{base}/labels/{name}.png", label_png(label, colours))
            if n < len(shown):
                _, image, exc = next(images)
                if exc is not None:
                    raise exc
                assert image is not None
                over = overlay(image, label, colours, ecfg.overlay_alpha)
                full = jpeg(over)
                store.write_bytes(f"{base}/overlays/{name}.jpg", full)
                # an image that already fits the thumbnail is not resized: same bytes
                thumb = full if max(over.shape[:2]) <= THUMB_SIDE else jpeg(over, THUMB_SIDE)
                store.write_bytes(f"{base}/thumbs/{name}.jpg", thumb)
                sources = rows.column("source").to_pylist()
                entries.append(
                    GalleryEntry(
                        name=name,
                        uri=uris[n],
                        thumb=f"thumbs/{name}.jpg",
                        full=f"overlays/{name}.jpg",
                        label_file=f"labels/{name}.png" if ecfg.png else None,
                        prompt_masks=sources.count("prompt"),
                        auto_masks=sources.count("auto"),
                        classes=sorted(int(k) for k in np.unique(label) if k != 255),
                    )
                )
            if progress:
                progress(n + 1, len(ids))
    coco = coco_dataset(records, vocabulary, names if ecfg.png else None)
    store.write_bytes(f"{base}/annotations.json", json.dumps(coco).encode())
    store.write_bytes(f"{base}/records.parquet", table_to_parquet_bytes(records.table))
    if errors.num_columns:
        store.write_bytes(f"{base}/errors.parquet", table_to_parquet_bytes(errors))
    sources = Counter(records.table.column("source").to_pylist())
    summary = {
        "images": len(ids),
        "masks": len(records),
        "prompt masks": sources["prompt"],
        "auto masks": sources["auto"],
        "images without masks": errors.num_rows,
    }
    if ecfg.overlays:
        per_class = np.bincount(
            records.table.column("category_id").to_numpy(), minlength=len(vocabulary)
        )
        err_list = [(r["uri"], r["error_type"], r["message"]) for r in errors.to_pylist()]
        page = gallery_html(
            f"fmbseg pseudo-labels {fp}",
            entries,
            vocabulary,
            colours,
            per_class.tolist(),
            summary,
            err_list,
        )
        store.write_bytes(f"{base}/gallery.html", page.encode())
    store.write_json(
        f"{base}/export.json",
        {
            "fingerprint": fp,
            "merge": merge_fp,
            "vocabulary": list(vocabulary),
            **{k.replace(" ", "_"): v for k, v in summary.items()},
            "files": {
                "coco": "annotations.json",
                "records": "records.parquet",
                "labels": "labels/" if ecfg.png else None,
                "gallery": "gallery.html" if ecfg.overlays else None,
            },
        },
    )
    return fp


def _rows_of(table: pa.Table, rows: list[int]) -> pa.Table:
    """``table``'s rows ``rows``: a zero-copy slice when they are consecutive (as merge
    writes them), else a take."""
    if rows[-1] - rows[0] + 1 == len(rows):
        return table.slice(rows[0], len(rows))
    return table.take(pa.array(rows))


def _row_ranges(table: pa.Table) -> dict[str, list[int]]:
    rows: dict[str, list[int]] = {}
    for i, image_id in enumerate(table.column("image_id").to_pylist()):
        rows.setdefault(image_id, []).append(i)
    return rows
