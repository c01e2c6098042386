"""Mask records (one row per mask), their errors table, COCO RLE and label-map composition.

The record schema is DESIGN.md's "Records". Masks are stored as COCO *compressed* RLE bytes
(``pycocotools.mask.encode``), which run down columns: pycocotools needs the mask in Fortran
order, and :func:`encode_mask` takes care of it so callers pass ordinary ``HxW bool`` arrays.

Conventions: ``bbox`` is ``XYWH`` in pixels of the original image (``x`` = column); ``area``
is the number of mask pixels; ``height``/``width`` are the original image's size.

:class:`MaskRecords` validates a table once (STYLE 8); code that receives a ``MaskRecords``
trusts its columns. Stage outputs are stored as its ``.table``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pycocotools import mask as mask_utils

from fmbseg.quiet import ignoring

# "prompt" = stage 1.1 (CLIP points), "auto" = stage 1.2, "sam3" = SAM 3 text concepts
SOURCES = ("prompt", "auto", "sam3")
IGNORE = 255  # label-map value of unlabelled pixels; category ids must be below it

SOURCE_TYPE = pa.dictionary(pa.int8(), pa.string())
BBOX_TYPE = pa.list_(pa.float32(), 4)

RECORD_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("image_uri", pa.string(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("category_id", pa.int32(), nullable=False),  # index into the vocabulary
        pa.field("category", pa.string(), nullable=False),
        pa.field("source", SOURCE_TYPE, nullable=False),  # one of SOURCES
        pa.field("score", pa.float32(), nullable=False),  # SAM's predicted IoU; sam3: its score
        pa.field("rle_counts", pa.binary(), nullable=False),  # COCO compressed RLE
        pa.field("bbox", BBOX_TYPE, nullable=False),  # XYWH, pixels
        pa.field("area", pa.int64(), nullable=False),  # pixels
        pa.field("fingerprint", pa.string(), nullable=False),  # stage that made the mask
    ]
)

# Every stage's errors table (fmbseg.engine.runner.ERRORS_SCHEMA), so they concatenate.
ERROR_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string()),
        pa.field("image_id", pa.string(), nullable=True),
        pa.field("stage", pa.string()),
        pa.field("error_type", pa.string()),  # e.g. "no_class_present", "DecodeError"
        pa.field("message", pa.string()),
    ]
)


class RecordError(ValueError):
    """A records table or value does not match the record schema; the message says how."""


# ---- RLE -----------------------------------------------------------------------------------


def encode_mask(mask: np.ndarray) -> tuple[bytes, tuple[float, float, float, float], int]:
    """``HxW`` mask (nonzero = in) -> (COCO compressed RLE counts, bbox XYWH, area in pixels)."""
    if mask.ndim != 2:
        raise RecordError(f"encode_mask: expected an HxW mask, got shape {mask.shape}")
    rle = mask_utils.encode(_fortran_uint8(mask))
    x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
    return rle["counts"], (x, y, w, h), int(mask_utils.area(rle))


def _fortran_uint8(mask: np.ndarray) -> np.ndarray:
    """``mask != 0`` as uint8 in Fortran (column-major) order, which COCO RLE runs along:
    the C-contiguous transpose OpenCV's blocked transpose writes, viewed transposed (faster
    than numpy's ``asfortranarray`` copy; ``bench/io_paths.py``)."""
    src = mask.view(np.uint8) if mask.dtype == np.bool_ else (mask != 0).view(np.uint8)
    if 0 in src.shape:  # OpenCV has no empty matrices
        return np.asfortranarray(src)
    return cv2.transpose(np.ascontiguousarray(src)).T


def decode_mask(counts: bytes, height: int, width: int) -> np.ndarray:
    """COCO compressed RLE counts of an ``height x width`` mask -> ``HxW bool`` (C order)."""
    rle = {"size": [int(height), int(width)], "counts": counts}
    return np.ascontiguousarray(_coco_decode(rle).astype(bool))


def _coco_decode(rles: dict[str, Any] | list[dict[str, Any]]) -> np.ndarray:
    """``pycocotools.mask.decode``: ``HxW`` uint8 for one RLE, ``HxWxN`` (Fortran order) for a
    list, without pycocotools' own numpy-2 "copy keyword" deprecation warning."""
    with ignoring(DeprecationWarning):  # pycocotools holds the GIL: the lock costs nothing
        return mask_utils.decode(rles)


# ---- record rows and the validated container ------------------------------------------------


def mask_row(
    mask: np.ndarray,
    *,
    image_id: str,
    image_uri: str,
    category_id: int,
    category: str,
    source: str,
    score: float,
    fingerprint: str,
) -> dict[str, Any]:
    """One record (a dict with the schema's fields) for an ``HxW bool`` mask."""
    counts, bbox, area = encode_mask(mask)
    return {
        "image_id": image_id,
        "image_uri": image_uri,
        "height": int(mask.shape[0]),
        "width": int(mask.shape[1]),
        "category_id": int(category_id),
        "category": category,
        "source": source,
        "score": float(score),
        "rle_counts": counts,
        "bbox": list(bbox),
        "area": area,
        "fingerprint": fingerprint,
    }


def _check_columns(table: pa.Table, schema: pa.Schema, what: str) -> None:
    names, expected = table.schema.names, schema.names
    if sorted(names) != sorted(expected):
        missing = [n for n in expected if n not in names]
        extra = [n for n in names if n not in expected]
        raise RecordError(
            f"{what}: columns do not match the schema; missing {missing}, unexpected {extra}"
        )


class MaskRecords:
    """A validated table of mask records (``RECORD_SCHEMA``), possibly of several images.

    Construction checks, once: the column set; that each column casts safely to its schema
    type; no nulls; ``source`` in ``SOURCES``; positive image sizes; non-negative ids and
    areas. Everything downstream trusts ``.table``.
    """

    def __init__(self, table: pa.Table) -> None:
        _check_columns(table, RECORD_SCHEMA, "mask records")
        table = table.select(RECORD_SCHEMA.names)
        if not table.schema.equals(RECORD_SCHEMA):
            for name in RECORD_SCHEMA.names:
                want, got = RECORD_SCHEMA.field(name).type, table.schema.field(name).type
                if want != got:
                    try:
                        pc.cast(table.column(name), want, safe=True)
                    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                        raise RecordError(
                            f"mask records: column {name!r} has type {got}, expected {want} ({exc})"
                        ) from exc
            table = table.cast(RECORD_SCHEMA, safe=True)
        for name in RECORD_SCHEMA.names:
            if table.column(name).null_count:
                raise RecordError(f"mask records: column {name!r} has null values")
        if table.num_rows:
            sources = set(pc.unique(table.column("source").cast(pa.string())).to_pylist())
            if not sources <= set(SOURCES):
                raise RecordError(
                    f"mask records: source must be one of {SOURCES}, got {sorted(sources - set(SOURCES))}"
                )
            for name, low in (("height", 1), ("width", 1), ("category_id", 0), ("area", 0)):
                smallest = pc.min(table.column(name)).as_py()
                if smallest < low:
                    raise RecordError(f"mask records: {name} must be >= {low}, found {smallest}")
        self.table = table

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping[str, Any]]) -> MaskRecords:
        rows = list(rows)
        if not rows:
            return cls.empty()
        cols = {name: [r[name] for r in rows] for name in RECORD_SCHEMA.names}
        try:
            arrays = [
                pa.array(cols[f.name], type=pa.string()).dictionary_encode().cast(f.type)
                if f.name == "source"
                else pa.array(cols[f.name], type=f.type)
                for f in RECORD_SCHEMA
            ]
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise RecordError(f"mask records: a row does not fit the schema: {exc}") from exc
        return cls(pa.Table.from_arrays(arrays, schema=RECORD_SCHEMA))

    @classmethod
    def derived(cls, table: pa.Table) -> MaskRecords:
        """Records made from validated ones without new values: rows taken, filtered or
        concatenated, or a committed shard of a stage that writes validated records read
        back (the store checks its bytes against the receipt's checksum). Only the schema
        is compared, in microseconds; a table of another schema is validated in full."""
        if not table.schema.equals(RECORD_SCHEMA):
            return cls(table)
        out = cls.__new__(cls)
        out.table = table
        return out

    @classmethod
    def empty(cls) -> MaskRecords:
        return cls(RECORD_SCHEMA.empty_table())

    @classmethod
    def concat(cls, parts: Sequence[MaskRecords]) -> MaskRecords:
        if not parts:
            return cls.empty()
        # Each part may carry its own source dictionary; unify them into one.
        table = pa.concat_tables([p.table for p in parts]).unify_dictionaries()
        return cls.derived(table.combine_chunks())

    def __len__(self) -> int:
        return self.table.num_rows

    def __repr__(self) -> str:
        return f"MaskRecords({len(self)} masks, {len(self.image_ids())} images)"

    def image_ids(self) -> list[str]:
        """Distinct image ids, in order of first appearance."""
        return list(dict.fromkeys(self.table.column("image_id").to_pylist()))

    def for_image(self, image_id: str) -> MaskRecords:
        return MaskRecords.derived(
            self.table.filter(pc.equal(self.table.column("image_id"), image_id))
        )

    def rows(self) -> list[dict[str, Any]]:
        return self.table.to_pylist()


def rows_by_image(table: pa.Table) -> dict[str, list[int]]:
    """image id -> its row numbers in ``table``, images in order of first appearance."""
    rows: dict[str, list[int]] = {}
    for i, image_id in enumerate(table.column("image_id").to_pylist()):
        rows.setdefault(image_id, []).append(i)
    return rows


# ---- errors ----------------------------------------------------------------------------------


def error_row(
    image_id: str | None, uri: str, stage: str, error_type: str, message: str
) -> dict[str, Any]:
    """One row of a stage's errors table: why ``image_id`` produced no output."""
    return {
        "image_id": image_id,
        "uri": uri,
        "stage": stage,
        "error_type": error_type,
        "message": message,
    }


def errors_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Rows from :func:`error_row` -> a table with ``ERROR_SCHEMA`` (possibly empty).

    Raises:
        ValueError: a row lacks one of the schema's keys (the message names them).
    """
    names, rows = ERROR_SCHEMA.names, list(rows)
    for i, row in enumerate(rows):
        if missing := [n for n in names if n not in row]:
            raise ValueError(f"error row {i} lacks {missing}; expected keys {names}")
    return pa.Table.from_pylist([{n: r[n] for n in names} for r in rows], schema=ERROR_SCHEMA)


# ---- label maps ------------------------------------------------------------------------------


PAINT_ORDERS = ("area", "prompt_first", "fill_unlabelled")
"""How merged masks are painted into a label map (``merge.order``; see :func:`paint_order`)."""


def paint_order(
    areas: np.ndarray,
    sources: Sequence[str],
    scores: np.ndarray,
    category_ids: np.ndarray,
    order: str = "area",
) -> np.ndarray:
    """Indices of masks in painting order: the mask painted last wins a contested pixel.

    ``order`` (``merge.order``) says which mask a pixel covered by several gets:

    - ``"area"`` (ours, METHOD "Merge"): larger masks are painted first so small masks stay
      visible, whatever their stage. Among equal areas: "auto" before "prompt" (stage 1.1
      wins), then lower score first (higher score wins), then higher category id first
      (lower id wins), then later rows first (the earlier row wins).
    - ``"prompt_first"``: stage-1.1 (prompt) masks are painted over every stage-1.2 (auto)
      mask, so an auto mask, labelled only by mean CLIP similarity, never overwrites a
      prompt mask's pixel; within each stage the ``"area"`` order.
    - ``"fill_unlabelled"``: the prompt masks are composed first (``"area"`` order among
      them); auto masks then only fill pixels still unlabelled, overwriting no label at all,
      prompt or auto: they claim pixels in descending SAM predicted IoU (score), so where
      auto masks overlap the most confident one wins, not the smallest. It labels the same
      pixels as ``"prompt_first"`` and differs only where auto masks overlap each other.

    Every order is a total order, so the result never depends on row order except for
    exact duplicates.
    """
    n = len(areas)
    rows = np.arange(n)
    areas = np.asarray(areas, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    cats = np.asarray(category_ids, dtype=np.int64)
    prompt = np.array([s == "prompt" for s in sources], dtype=bool)
    # np.lexsort sorts by the last key first.
    if order == "area":
        return np.lexsort((-rows, -cats, scores, prompt.astype(np.int64), -areas))
    if order not in PAINT_ORDERS:
        raise ValueError(f"paint_order: order must be one of {list(PAINT_ORDERS)}, got {order!r}")
    by_area = rows[np.lexsort((-rows, -cats, scores, -areas))]
    if order == "prompt_first":
        return np.concatenate([by_area[~prompt[by_area]], by_area[prompt[by_area]]])
    # fill_unlabelled: claiming in descending score without overwriting = painting in
    # ascending score with overwriting (ties: the larger mask claims first)
    by_score = rows[np.lexsort((-rows, -cats, areas, scores))]
    return np.concatenate([by_score[~prompt[by_score]], by_area[prompt[by_area]]])


def compose_label_map(
    records: pa.Table | MaskRecords | Sequence[Mapping[str, Any]],
    height: int,
    width: int,
    order: str = "area",
) -> np.ndarray:
    """Masks of ONE image -> ``HxW uint8`` label map of category ids, ``IGNORE`` (255) elsewhere.

    Painting follows :func:`paint_order` with ``order`` (the merge output's ``merge.order``,
    :func:`fmbseg.tasks.annotate.merge.merge_order`). Raises :class:`RecordError` for a category id
    outside ``[0, 254]`` or a mask whose size is not ``height x width``.
    """
    if isinstance(records, MaskRecords):
        records = records.table
    if isinstance(records, pa.Table):
        cols = {n: records.column(n).to_pylist() for n in LABEL_COLUMNS}
        if records.num_rows and len(set(records.column("image_id").to_pylist())) > 1:
            raise RecordError("compose_label_map: records of more than one image given")
    else:
        recs = list(records)
        cols = {n: [r[n] for r in recs] for n in LABEL_COLUMNS}
    return compose_rows(cols, range(len(cols["rle_counts"])), height, width, order)


LABEL_COLUMNS = ("rle_counts", "category_id", "area", "source", "score", "height", "width")
"""The record columns a label map is painted from."""


def compose_rows(
    cols: Mapping[str, Sequence[Any]],
    rows: Sequence[int],
    height: int,
    width: int,
    order: str = "area",
) -> np.ndarray:
    """:func:`compose_label_map` of rows ``rows`` (all of ONE image) of a records table
    given as Python lists, ``cols[name]`` for each of :data:`LABEL_COLUMNS`.

    For a worker that composes every image of a shard: the columns are converted once per
    shard, not once per image.
    """
    label = np.full((height, width), IGNORE, dtype=np.uint8)
    ids = np.asarray([cols["category_id"][i] for i in rows], dtype=np.int64)
    if len(ids) and (ids.min() < 0 or ids.max() >= IGNORE):
        raise RecordError(
            f"compose_label_map: category ids must be in [0, {IGNORE - 1}] for a uint8 map "
            f"({IGNORE} = ignore); got {int(ids.min())}..{int(ids.max())}"
        )
    heights, widths = cols["height"], cols["width"]
    for i in rows:
        if (heights[i], widths[i]) != (height, width):
            raise RecordError(
                f"compose_label_map: a mask is {heights[i]}x{widths[i]}, the image {height}x{width}"
            )
    sequence = paint_order(
        np.asarray([cols["area"][i] for i in rows]),
        [cols["source"][i] for i in rows],
        np.asarray([cols["score"][i] for i in rows]),
        ids,
        order,
    )
    if not len(sequence):
        return label
    counts = cols["rle_counts"]
    rles = [{"size": [height, width], "counts": counts[rows[j]]} for j in sequence]
    masks = _coco_decode(rles)  # H x W x n uint8 in Fortran order, one call
    # paint the transposed view: each mask's transpose is C-contiguous, no copy per mask
    painted = label.T
    for k, j in enumerate(sequence):
        painted[masks[:, :, k].T.view(bool)] = ids[j]
    return label
