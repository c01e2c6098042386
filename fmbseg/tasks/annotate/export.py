"""Stage `export`: the pseudo-labels in the formats people and tools read.

Written under ``{store}/exports/{fingerprint}/`` through the store (any fsspec URI)::

    annotations.json      COCO, semantic: every indexed image; per image one non-overlapping
                          RLE segment per class of its label map (iscrowd 0, area and bbox
                          from pycocotools); loads with pycocotools.coco.COCO
    candidates.json       COCO, the raw overlapping masks behind them (prompt and automatic,
                          with source and score); same images and categories
    records.parquet       those raw masks as records (fmbseg.storage.records.RECORD_SCHEMA)
    errors.parquet        every input that failed, at any stage from index on, and why
    labels/{name}.png     palette PNG label maps, image-sized; value = vocabulary index
                          (0..K-1), 255 = ignore (all 255: no confident label)
    overlays/{name}.jpg   image + label colours + outlines (first ``gallery_max_images``
                          labelled images; a photo over 2 x OVERLAY_SIDE px is drawn
                          at a reduced size)
    thumbs/{name}.jpg     overlays shrunk to 320 px for the gallery's cards (an overlay
                          that already fits is its own card image: no thumb is written)
    gallery.html          one static page: summary, class legend, image cards, failures
    export.json           what was written; written last, so its presence = complete

Ids: label-map values and the records' ``category_id`` are vocabulary indices (0..K-1, the
vocabulary recorded in merge's manifest, so a re-export never renumbers); COCO category
ids are those plus one (0 is background to torchvision and detectron2), and each COCO
category says its ``label_value``.

Names: COCO ``file_name`` is the image's path relative to the source root (the indexed
folder or URI prefix; the folder of a ``.txt`` list or a COCO file's image root), so
``a/x.jpg`` and ``b/x.jpg`` stay apart; ``image_uri`` holds the full URI. ``{name}`` is that
path without its extension (folders kept), ``-{image_id[:8]}`` added when two images would
share it (``x.jpg`` and ``x.png``), and each path part longer than
:data:`NAME_BYTES` bytes shortened with a hash suffix, so every derived file (and the
store's temp file beside it) stays within the file system's 255-byte name limit.

A worker per shard composes its label maps, writes its PNGs, overlays and thumbnails,
RLE-encodes the semantic segments, and commits one small row per image
(:data:`EXPORT_SCHEMA`) as the internal stage ``stages/export/{fp}``, so a killed export
resumes without redoing committed shards. The driver then streams the files that span
every image (:mod:`fmbseg.tasks.annotate.export_files`). Images keep the index's order
(shard by shard, listing order within a shard): COCO ids and the gallery's first images
follow it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import re
from collections import Counter
from collections.abc import Collection, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from fmbseg.config import Config
from fmbseg.data.images import decode_image
from fmbseg.data.sources import read_bytes, relative_path, source_root
from fmbseg.engine.inorder import InOrder
from fmbseg.engine.stage import Prepared, StageRun
from fmbseg.storage import ArtifactStore, Manifest
from fmbseg.storage.records import (
    BBOX_TYPE,
    IGNORE,
    LABEL_COLUMNS,
    RECORD_SCHEMA,
    compose_rows,
    encode_mask,
    error_row,
    errors_table,
    rows_by_image,
)
from fmbseg.tasks.annotate.common import (
    INDEX_STAGE,
    VOCABULARY_KEY,
    ImageShardWorker,
    read_vocabulary,
)
from fmbseg.tasks.annotate.export_coco import NO_LABEL, first_rows
from fmbseg.tasks.annotate.export_files import write_export_files
from fmbseg.tasks.annotate.gallery import (
    THUMB_SIDE,
    class_colours,
    has_thumb,
    jpeg,
    label_png,
    overlay,
)
from fmbseg.tasks.annotate.merge import ORDER_KEY

__all__ = [
    "EXPORT_SCHEMA",
    "ExportWorker",
    "export_name",
    "image_names",
    "complete",
    "finish",
    "prepare",
]

STAGE = "export"
WRITERS = 2  # threads composing, encoding and writing a worker's per-image files
# Longest path part (UTF-8 bytes) of a derived name: with ".png"/".jpg" and the store's
# ".tmp-" + 12 hex temp suffix it stays under the usual 255-byte NAME_MAX.
NAME_BYTES = 200
INDEX_COLUMNS = ("image_id", "uri", "width", "height")
ERROR_COLUMNS = ("image_id", "error_type")  # of merge's errors: which images failed
# long side an overlay is drawn at, at most (larger images are decoded at a reduced size:
# a 13000 px photo's overlay needs no more, and its full decode would need ~0.5 GB)
OVERLAY_SIDE = 2048

EXPORT_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("name", pa.string()),  # labels/{name}.png (and overlays, thumbs); may hold "/"
        ("file_name", pa.string()),  # path relative to the source root (COCO file_name)
        ("uri", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        # "labelled"; "no_label" (no class found or no usable mask: an all-255 label map);
        # "failed" (a stage recorded an error for it: see errors.parquet)
        ("status", pa.string()),
        ("prompt_masks", pa.int32()),  # merged masks per source
        ("auto_masks", pa.int32()),
        ("classes", pa.list_(pa.int32())),  # vocabulary indices in the label map, ascending
        # the label map's segment of each of those classes: COCO compressed RLE, area, bbox
        ("segment_rle", pa.list_(pa.binary())),
        ("segment_area", pa.list_(pa.int64())),
        ("segment_bbox", pa.list_(BBOX_TYPE)),
        ("gallery", pa.bool_()),  # has an overlay and thumbnail, and a card in gallery.html
    ]
)
"""One row per indexed image, in the index's order; what the driver needs of a shard."""


def _short(part: str, limit: int = NAME_BYTES) -> str:
    """``part`` if its UTF-8 form fits ``limit`` bytes, else its head and a hash of it all."""
    raw = part.encode()
    if len(raw) <= limit:
        return part
    digest = hashlib.sha256(raw).hexdigest()[:12]
    head = raw[: limit - len(digest) - 1].decode("utf-8", "ignore")  # whole characters
    return f"{head}-{digest}"


def _stem_path(file_name: str) -> str:
    """``file_name`` without its extension, each part file-system-safe (no empty, ``.`` or
    ``..`` parts, no control characters or backslashes)."""
    parts = [p for p in file_name.split("/") if p not in ("", ".")]
    parts = [re.sub(r"[\x00-\x1f\x7f\\]", "_", "__" if p == ".." else p) for p in parts]
    if not parts:
        return "image"
    last = parts[-1]
    stem = last.rsplit(".", 1)[0] if "." in last[1:] else last
    parts[-1] = stem or "image"
    return "/".join(parts)


def _stem_key(file_name: str) -> str:
    """What two images must not share: their stem paths, compared case-insensitively (a
    case-insensitive file system would merge ``X.png`` and ``x.png``)."""
    return _stem_path(file_name).casefold()


def export_name(file_name: str, image_id: str, repeated: Collection[str]) -> str:
    """The image's export name: its stem path, ``-{image_id[:8]}`` added if its key is in
    ``repeated`` (the keys two or more images of the whole export share), each part at
    most :data:`NAME_BYTES` bytes."""
    stem = _stem_path(file_name)
    if _stem_key(file_name) in repeated:
        stem = f"{stem}-{image_id[:8]}"
    return "/".join(_short(p) for p in stem.split("/"))


def image_names(file_names: Sequence[str], image_ids: Sequence[str]) -> list[str]:
    """Unique, file-system-safe export names for images (:func:`export_name` with the
    repeated keys of these images)."""
    counts = Counter(_stem_key(f) for f in file_names)
    repeated = {s for s, n in counts.items() if n > 1}
    return [export_name(f, i, repeated) for f, i in zip(file_names, image_ids, strict=True)]


def semantic_segments(label: np.ndarray) -> tuple[list[int], list[bytes], list[int], list]:
    """``HxW uint8`` label map -> (classes present ascending, RLE counts, areas, bboxes XYWH)
    of each class's pixels (one segment per class; they cannot overlap)."""
    present = np.flatnonzero(np.bincount(label.ravel(), minlength=IGNORE + 1)[:IGNORE])
    rles, areas, bboxes = [], [], []
    for k in present:
        counts, bbox, area = encode_mask(label == k)
        rles.append(counts)
        areas.append(area)
        bboxes.append(list(bbox))
    return [int(k) for k in present], rles, areas, bboxes


# ---- shard worker ----------------------------------------------------------------------------


class ExportWorker(ImageShardWorker):
    """Shard worker of export: no model. A spec is ``{"index": fp, "merge": fp, "gallery":
    k}``: shard ``i`` of ``index/fp`` is exported with the masks of shard ``i`` of
    ``merge/fp``, and its first ``k`` labelled images get an overlay and thumb.

    ``repeated`` holds the name keys shared by several images of the whole export, so names
    agree across shards without a global view in the worker; ``root`` is the source root
    ``file_name`` is relative to.
    """

    def __init__(
        self,
        store: ArtifactStore,
        cfg: Config,
        base: str,
        num_classes: int,
        repeated: frozenset[str],
        root: str,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        ImageShardWorker.__init__(self, store, cfg, storage_options)
        self.base, self.repeated, self.root = base, repeated, root
        self.colours = class_colours(num_classes)
        # label maps, PNG/JPEG encoding and the file writes (object-store PUTs) run here
        self.writer = ThreadPoolExecutor(WRITERS, thread_name_prefix="fmbseg-export")

    def _load(self, uri: str) -> np.ndarray:
        data = read_bytes(uri, self.storage_options)
        return decode_image(data, uri, self.cfg.index.max_pixels, max_side=OVERLAY_SIDE)

    def prefetch(self, shard: int, spec: dict[str, Any]) -> None:
        k = spec["gallery"]
        up = self.upstream
        up.prefetch(INDEX_STAGE, spec["index"], shard, columns=INDEX_COLUMNS)
        up.prefetch("merge", spec["merge"], shard, kind="errors", columns=ERROR_COLUMNS)
        up.prefetch(
            "merge", spec["merge"], shard, then=lambda merged: self._start_gallery(merged, k)
        )

    def _start_gallery(self, merged: pa.Table, k: int) -> None:
        """Start reading the gallery images of a merge shard ahead of its turn."""
        if merged.num_rows:
            uris = merged.column("image_uri").to_pylist()
            self.images.start(_gallery_uris(uris, first_rows(merged), k))

    def process(self, shard: int, spec: dict[str, Any]) -> tuple[pa.Table, pa.Table | None]:
        up = self.upstream
        index = up.read(INDEX_STAGE, spec["index"], shard, columns=INDEX_COLUMNS)
        if not index.num_rows:
            return EXPORT_SCHEMA.empty_table(), None
        table = up.read("merge", spec["merge"], shard)
        if not table.num_columns:  # a shard without a part file: no masks at all
            table = RECORD_SCHEMA.empty_table()
        errors = up.part("merge", spec["merge"], shard, kind="errors", columns=ERROR_COLUMNS)
        errors_rows = [] if errors is None else errors.to_pylist()
        failed = {e["image_id"] for e in errors_rows if e["error_type"] not in NO_LABEL}
        # the shard's columns as Python lists once, not a slice and conversions per image
        cols = {n: table.column(n).to_pylist() for n in (*LABEL_COLUMNS, "image_uri")}
        by_image = rows_by_image(table)
        order = self.upstream.manifest("merge", spec["merge"]).meta.get(ORDER_KEY, "area")
        shown = _gallery_uris(
            cols["image_uri"], {i: r[0] for i, r in by_image.items()}, spec["gallery"]
        )
        rows: list[dict[str, Any]] = []
        lost: list[dict[str, Any]] = []  # gallery images that could not be read again

        def finish(row: dict[str, Any], job: Future[tuple]) -> None:
            keys = ("classes", "segment_rle", "segment_area", "segment_bbox")
            row.update(zip(keys, job.result(), strict=True))
            rows.append(row)

        # rows come back in image order; at most 2 * WRITERS images are held for writing
        jobs: InOrder[dict[str, Any], tuple] = InOrder(self.writer, finish, 2 * WRITERS)
        # the gallery's images are read and decoded in threads, ahead of the loop below
        images = self.images.each(shown, str)
        n = 0
        with contextlib.closing(images):
            for image in index.to_pylist():
                image_id, uri = image["image_id"], image["uri"]
                h, w = image["height"], image["width"]
                r = by_image.get(image_id, [])
                file_name = relative_path(uri, self.root)
                name = export_name(file_name, image_id, self.repeated)
                pixels = None
                if r and n < len(shown):
                    _, pixels, exc = next(images)
                    if exc is not None:  # changed or gone since the model stages read it
                        pixels = None
                        reason = f"no overlay: {type(exc).__name__}: {exc}"
                        lost.append(error_row(image_id, uri, STAGE, "overlay", reason))
                    n += 1
                if r:
                    h, w = cols["height"][r[0]], cols["width"][r[0]]
                sources = Counter(cols["source"][i] for i in r)
                status = "labelled" if r else "failed" if image_id in failed else "no_label"
                row = {
                    "image_id": image_id,
                    "name": name,
                    "file_name": file_name,
                    "uri": uri,
                    "width": w,
                    "height": h,
                    "status": status,
                    "prompt_masks": sources["prompt"],
                    "auto_masks": sources["auto"],
                    "gallery": pixels is not None,
                }
                job = functools.partial(self._export_image, name, cols, r, h, w, pixels, order)
                jobs.submit(row, job)
        jobs.drain()  # every file of the shard is written before its receipt
        return pa.Table.from_pylist(rows, schema=EXPORT_SCHEMA), errors_table(lost)

    def _export_image(
        self,
        name: str,
        cols: dict[str, list],
        r: list[int],
        h: int,
        w: int,
        image: np.ndarray | None,
        order: str = "area",
    ) -> tuple[list[int], list[bytes], list[int], list]:
        """Compose one image's label map (all IGNORE without masks; painted in the merge's
        ``order``), write its files; its :func:`semantic_segments`."""
        label = compose_rows(cols, r, h, w, order)
        if self.cfg.export.png:
            png = label_png(label, self.colours, self.cfg.export.png_compress_level)
            self.store.write_bytes(f"{self.base}/labels/{name}.png", png)
        if image is not None:
            self._write_overlay(name, image, label, self.cfg.export.overlay_alpha)
        return semantic_segments(label)

    def _write_overlay(self, name: str, image: np.ndarray, label: np.ndarray, alpha: float) -> None:
        if image.shape[:2] != label.shape:  # decoded at a reduced size (OVERLAY_SIDE)
            small = Image.fromarray(label).resize(image.shape[1::-1], Image.Resampling.NEAREST)
            label = np.asarray(small)
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


def index_root(index: Manifest) -> str:
    """The source root of a committed index (older indexes: from their source string)."""
    root = index.meta.get("root")
    return str(root) if root else source_root(str(index.meta.get("source", "")))


def plan_export(
    store: ArtifactStore, index: Manifest, merge: Manifest, gallery_images: int
) -> tuple[list[dict[str, Any]], frozenset[str]]:
    """(one spec per shard, the name keys several images share), streaming the shards.

    Names need a global view (is this name unique in the whole export?): the driver counts
    one short key per image (never masks), reading one or two columns of every index and
    merge shard; workers then get only the keys that repeat.
    """
    counts: Counter[str] = Counter()
    specs, shown = [], 0
    root = index_root(index)
    for t in store.shards(INDEX_STAGE, index.fingerprint, manifest=index, columns=["uri"]):
        uris = t.column("uri").to_pylist() if t.num_rows else []
        counts.update(_stem_key(relative_path(u, root)) for u in uris)
    columns = ["image_id"]
    for t in store.shards("merge", merge.fingerprint, manifest=merge, columns=columns):
        labelled = len(first_rows(t)) if t.num_rows else 0
        k = min(labelled, max(0, gallery_images - shown))
        shown += k
        specs.append({"index": index.fingerprint, "merge": merge.fingerprint, "gallery": k})
    return specs, frozenset(s for s, n in counts.items() if n > 1)


def complete(job: StageRun) -> bool:
    """The export is whole: ``export.json``, written last, is there."""
    return job.store.exists(f"exports/{job.fp(STAGE)}/export.json")


def sweep(job: StageRun) -> None:
    """Before an incomplete export (re)runs: an earlier run killed mid-write left temp
    files; this run rewrites what they were for."""
    job.store.sweep_temp(f"exports/{job.fp(STAGE)}")


def _inputs(job: StageRun) -> tuple[Manifest, Manifest, tuple[str, ...]]:
    """The merge manifest, that of the index merge was made from, and the vocabulary."""
    merge = job.store.require_manifest("merge", job.fp("merge"))
    index = job.store.require_manifest(INDEX_STAGE, merge.meta["index"])
    return merge, index, read_vocabulary(merge)


def prepare(job: StageRun) -> Prepared:
    """One spec per merge shard (with its gallery share); every image of the index merge
    was made from is exported."""
    store, fp = job.store, job.fp(STAGE)
    merge, index, vocabulary = _inputs(job)
    ecfg = job.cfg.export
    gallery = max(0, ecfg.gallery_max_images) if ecfg.overlays else 0
    specs, repeated = plan_export(store, index, merge, gallery)
    factory = functools.partial(
        ExportWorker,
        store,
        job.cfg,
        f"exports/{fp}",
        len(vocabulary),
        repeated,
        index_root(index),
        job.storage_options,
    )
    meta = {
        VOCABULARY_KEY: list(vocabulary),
        "merge": merge.fingerprint,
        "index": index.fingerprint,
    }
    return Prepared(specs, factory, meta)


def finish(job: StageRun) -> None:
    """The files that span every image (COCO, Parquet, gallery), streamed from the
    committed shards; ``export.json`` last."""
    merge, index, vocabulary = _inputs(job)
    write_export_files(job.store, job.cfg.export, STAGE, job.fp(STAGE), index, merge, vocabulary)
