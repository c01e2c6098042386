"""Stage `export`: the merged pseudo-labels in the formats people and tools read.

Written under ``{store}/exports/{fingerprint}/`` through the store (any fsspec URI)::

    annotations.json      COCO: images, categories, annotations (compressed RLE, bbox XYWH,
                          area, iscrowd 0, score, source); loads with pycocotools.coco.COCO
    records.parquet       the merged records (fmbseg.storage.records.RECORD_SCHEMA)
    errors.parquet        images without masks and why (merge's errors table)
    labels/{name}.png     palette PNG label maps, image-sized; value = category id, 255 = ignore
    overlays/{name}.jpg   image + label colours + outlines (first ``gallery_max_images``)
    thumbs/{name}.jpg     overlays shrunk to 320 px for the gallery's cards (an overlay
                          that already fits is its own card image: no thumb is written)
    gallery.html          one static page: summary, class legend, image cards
    export.json           what was written; written last, so its presence = complete

Category ids are the vocabulary indices everywhere (records, COCO, PNG values), so COCO ids
start at 0. ``{name}`` is the image file's stem, or ``stem-{image_id[:8]}`` when two images
share a stem.

The work fans out over merge's shards with :func:`fmbseg.tasks.runner.run_stage`: a worker
per slot composes one shard's label maps and writes its PNGs, overlays and thumbnails, and
commits one small row per image (:data:`EXPORT_SCHEMA`, no masks) as the internal stage
``stages/export/{fp}``, so a killed export resumes without redoing committed shards. The
driver then streams the files that span every image (annotations.json, records.parquet,
errors.parquet, gallery.html) shard by shard, a few read ahead. Images keep merge's order
(shard by shard, first appearance within a shard): COCO ids and the gallery's first images
follow it.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections import Counter
from collections.abc import Collection, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa

from fmbseg.config import Config
from fmbseg.storage import ArtifactStore, Manifest
from fmbseg.storage.records import IGNORE, LABEL_COLUMNS, compose_rows, rows_by_image
from fmbseg.tasks.export_coco import coco_dataset, first_rows
from fmbseg.tasks.export_files import write_export_files
from fmbseg.tasks.gallery import THUMB_SIDE, class_colours, has_thumb, jpeg, label_png, overlay
from fmbseg.tasks.merge import ORDER_KEY
from fmbseg.tasks.runner import Progress, run_stage
from fmbseg.tasks.stage1 import (
    CODE_VERSIONS,
    VOCABULARY_KEY,
    ImageShardWorker,
    InOrder,
    read_vocabulary,
    stage_fingerprint,
)

__all__ = ["EXPORT_SCHEMA", "ExportWorker", "coco_dataset", "image_names", "run_export"]

STAGE = "export"
CODE_VERSION = CODE_VERSIONS[STAGE]
WRITERS = 2  # threads composing, encoding and writing a worker's per-image files

EXPORT_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("name", pa.string()),  # file name of labels/{name}.png (and overlays, thumbs)
        ("uri", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("prompt_masks", pa.int32()),  # merged masks per source
        ("auto_masks", pa.int32()),
        ("classes", pa.list_(pa.int32())),  # category ids present in the label map, ascending
        ("gallery", pa.bool_()),  # has an overlay and thumbnail, and a card in gallery.html
    ]
)
"""One row per exported image, in merge's order; what the driver needs of a shard."""


def image_stem(uri: str) -> str:
    """The file stem of ``uri``, made file-system-safe (``"image"`` when nothing is left)."""
    stem = uri.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem) or "image"


def image_name(uri: str, image_id: str, repeated: Collection[str]) -> str:
    """The image's export name: its stem, or ``stem-{image_id[:8]}`` if the stem is in
    ``repeated`` (the stems two or more images of the whole export share)."""
    stem = image_stem(uri)
    return f"{stem}-{image_id[:8]}" if stem in repeated else stem


def image_names(uris: Sequence[str], image_ids: Sequence[str]) -> list[str]:
    """File-system-safe, unique names for images: the file stem, disambiguated by image id."""
    counts = Counter(image_stem(u) for u in uris)
    repeated = {s for s, n in counts.items() if n > 1}
    return [image_name(u, i, repeated) for u, i in zip(uris, image_ids, strict=True)]


# ---- shard worker ----------------------------------------------------------------------------


class ExportWorker(ImageShardWorker):
    """Shard worker of export: no model. A spec is ``{"merge": fp, "gallery": k}``: shard
    ``i`` of ``merge/fp`` is exported, and its first ``k`` images get an overlay and thumb.

    ``repeated`` holds the stems shared by several images of the whole export (usually
    few), so names agree across shards without a global view in the worker.
    """

    def __init__(
        self,
        store: ArtifactStore,
        cfg: Config,
        base: str,
        num_classes: int,
        repeated: frozenset[str],
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        ImageShardWorker.__init__(self, store, cfg, storage_options)
        self.base, self.repeated = base, repeated
        self.colours = class_colours(num_classes)
        # label maps, PNG/JPEG encoding and the file writes (object-store PUTs) run here
        self.writer = ThreadPoolExecutor(WRITERS, thread_name_prefix="fmbseg-export")

    def prefetch(self, shard: int, spec: dict[str, Any]) -> None:
        k = spec["gallery"]
        self.upstream.prefetch("merge", spec["merge"], shard,
                               then=lambda merged: self._start_gallery(merged, k))  # fmt: skip

    def _start_gallery(self, merged: pa.Table, k: int) -> None:
        """Start reading the gallery images of a merge shard (read ahead of its turn)."""
        if merged.num_rows:
            uris = merged.column("image_uri").to_pylist()
            self.images.start(_gallery_uris(uris, first_rows(merged), k))

    def process(self, shard: int, spec: dict[str, Any]) -> tuple[pa.Table, None]:
        table = self.upstream.read("merge", spec["merge"], shard)
        if not table.num_rows:
            return EXPORT_SCHEMA.empty_table(), None
        # the shard's columns as Python lists once, not a slice and conversions per image
        cols = {n: table.column(n).to_pylist() for n in (*LABEL_COLUMNS, "image_uri")}
        by_image = rows_by_image(table)
        order = self.upstream.manifest("merge", spec["merge"]).meta.get(ORDER_KEY, "area")
        uris = cols["image_uri"]
        shown = _gallery_uris(uris, {i: r[0] for i, r in by_image.items()}, spec["gallery"])
        rows: list[dict[str, Any]] = []

        def finish(row: dict[str, Any], job: Future[list[int]]) -> None:
            row["classes"] = job.result()
            rows.append(row)

        # rows come back in image order; at most 2 * WRITERS images are held for writing
        jobs: InOrder[dict[str, Any], list[int]] = InOrder(self.writer, finish, 2 * WRITERS)
        # the gallery's images are read and decoded in threads, ahead of the loop below
        images = self.images.each(shown, str)
        with contextlib.closing(images):
            for n, (image_id, r) in enumerate(by_image.items()):
                uri, h, w = uris[r[0]], cols["height"][r[0]], cols["width"][r[0]]
                name = image_name(uri, image_id, self.repeated)
                image = None
                if n < len(shown):
                    _, image, exc = next(images)
                    if exc is not None:
                        raise exc
                sources = Counter(cols["source"][i] for i in r)
                row = {
                    "image_id": image_id, "name": name, "uri": uri, "width": w, "height": h,
                    "prompt_masks": sources["prompt"], "auto_masks": sources["auto"],
                    "gallery": n < len(shown),
                }  # fmt: skip
                job = functools.partial(self._export_image, name, cols, r, h, w, image, order)
                jobs.submit(row, job)
        jobs.drain()  # every file of the shard is written before its receipt
        return pa.Table.from_pylist(rows, schema=EXPORT_SCHEMA), None

    def _export_image(
        self,
        name: str,
        cols: dict[str, list],
        r: list[int],
        h: int,
        w: int,
        image: np.ndarray | None,
        order: str = "area",
    ) -> list[int]:
        """Compose one image's label map (painted in the merge's ``order``), write its
        files; its class ids, ascending."""
        label = compose_rows(cols, r, h, w, order)
        if self.cfg.export.png:
            self._write_label(name, label)
        if image is not None:
            self._write_overlay(name, image, label, self.cfg.export.overlay_alpha)
        present = np.flatnonzero(np.bincount(label.ravel(), minlength=IGNORE + 1))
        return [int(k) for k in present if k != IGNORE]

    def _write_label(self, name: str, label: np.ndarray) -> None:
        self.store.write_bytes(
            f"{self.base}/labels/{name}.png",
            label_png(label, self.colours, self.cfg.export.png_compress_level),
        )

    def _write_overlay(self, name: str, image: np.ndarray, label: np.ndarray, alpha: float) -> None:
        over = overlay(image, label, self.colours, alpha)
        full = jpeg(over)
        self.store.write_bytes(f"{self.base}/overlays/{name}.jpg", full)
        if has_thumb(*over.shape[:2]):  # else the card shows the overlay itself
            self.store.write_bytes(f"{self.base}/thumbs/{name}.jpg", jpeg(over, THUMB_SIDE))


def _gallery_uris(uris: list[str], first: dict[str, int], k: int) -> list[str]:
    """The URIs of a merge shard's first ``k`` images (those that get an overlay), from its
    ``image_uri`` column and :func:`first_rows`."""
    return [uris[r] for r in list(first.values())[: max(0, k)]]


# ---- driver ----------------------------------------------------------------------------------


def plan_export(
    store: ArtifactStore, merge: Manifest, gallery_images: int
) -> tuple[list[dict[str, Any]], frozenset[str]]:
    """(one spec per merge shard, the stems several images share), streaming merge's shards.

    Names need a global view (is this stem unique in the whole export?). Trade-off: while
    this pass runs the driver counts one short stem per image (the only per-image state it
    keeps, less than the index's own rows; never masks) and it reads every merge shard
    once more (two columns, a few shards ahead); workers then get only the stems that repeat.
    """
    counts: Counter[str] = Counter()
    specs, shown = [], 0
    columns = ["image_id", "image_uri"]
    for t in store.shards("merge", merge.fingerprint, manifest=merge, columns=columns):
        first = first_rows(t) if t.num_rows else {}
        uris = t.column("image_uri").to_pylist() if first else []
        counts.update(image_stem(uris[r]) for r in first.values())
        k = min(len(first), max(0, gallery_images - shown))
        shown += k
        specs.append({"merge": merge.fingerprint, "gallery": k})
    return specs, frozenset(s for s, n in counts.items() if n > 1)


def run_export(
    store: ArtifactStore,
    cfg: Config,
    merge_fp: str,
    *,
    storage_options: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> str:
    """Export a committed merge output (or reuse a complete export); returns its fingerprint.

    ``progress(done, total)`` counts merge shards exported.
    """
    fp = stage_fingerprint(STAGE, cfg, {"merge": merge_fp})
    base = f"exports/{fp}"
    if store.exists(f"{base}/export.json"):
        return fp
    merge = store.require_manifest("merge", merge_fp)
    vocabulary = read_vocabulary(store, "merge", merge_fp)
    ecfg = cfg.export
    specs: list[dict[str, Any]]
    if store.is_committed(STAGE, fp):  # killed while writing the files: no shard to redo
        specs, repeated = [{}] * merge.num_shards, frozenset[str]()
    else:
        gallery = max(0, ecfg.gallery_max_images) if ecfg.overlays else 0
        specs, repeated = plan_export(store, merge, gallery)
    factory = functools.partial(
        ExportWorker, store, cfg, base, len(vocabulary), repeated, storage_options
    )
    meta = {VOCABULARY_KEY: list(vocabulary), "merge": merge_fp}
    run_stage(store, STAGE, fp, specs, factory, cfg.runtime, progress=progress, meta=meta)
    write_export_files(store, cfg.export, STAGE, fp, merge, vocabulary)
    return fp
