"""Encodings stage 1 chose for its small files, against the straightforward ones, in one run.

- Shard reads: ``ArtifactStore`` parses a shard's Parquet bytes with ``pq.ParquetFile`` on an
  Arrow ``BufferReader`` (zero-copy), against ``pq.ParquetFile`` on ``io.BytesIO`` and
  ``pq.read_table`` (the dataset API). The shard is a real one: the mask records of
  ``--masks`` random-blob masks of ``--size`` images, written the way the store writes them.
- Overlays: ``gallery.overlay`` (Pillow's blend, darkening and composite) against the same
  formula in float32 numpy (the implementation it replaced), on those label maps over
  random pixels; checks both give the same pixels.
- RLE encoding: ``records.encode_mask`` (OpenCV's transpose lays the mask out column-major)
  against the straightforward ``np.asfortranarray`` copy before pycocotools, on those
  masks; checks both give the same counts, boxes and areas.
- Streamed Parquet (``records.parquet``): ``--pieces`` pieces of ``--piece-rows`` records of
  as many more such masks (merge shards, a few images each) through ``storage.parquet.RowGroupWriter`` (row
  groups of ~64 MB) against ``pq.ParquetWriter.write_table`` per piece (a row group each):
  time and file bytes; checks both read back the same table.
- Label PNGs: ``export.png_compress_level`` 6 (the default, PIL's) against 1 and 9, on label
  maps composed from those masks: encode time and bytes, the trade the option makes.

Prints microseconds per call and the ratios to our path (to the default level).

    python bench/io_paths.py [--masks 48] [--size 480x640] [--repeat 200] [--pieces 64]
                             [--piece-rows 10]
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from harness import hw, parser, ratio_table, timed


def per_call(fn: Callable[[], Any], repeat: int) -> float:
    """Median microseconds of ``fn()`` over 5 rounds of ``repeat`` calls."""
    return timed(fn, repeat=5, number=repeat, warmup=1).median * 1e6


def blobs(n: int, h: int, w: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``n`` smooth random masks (thresholded low-frequency noise), like SAM's regions."""
    from PIL import Image

    out = []
    for _ in range(n):
        small = rng.random((max(2, h // 40), max(2, w // 40)))
        field = np.asarray(Image.fromarray((small * 255).astype(np.uint8)).resize((w, h)))
        out.append(field > rng.uniform(140, 220))
    return out


def float_overlay(image: np.ndarray, label: np.ndarray, colours: np.ndarray, alpha: float) -> Any:
    """The overlay in float32 numpy: blend, darken the unlabelled, white outlines."""
    from fmbseg.tasks.annotate.gallery import inner_boundaries

    out = image.astype(np.float32)
    lut = np.zeros((256, 3), dtype=np.float32)
    lut[: len(colours)] = colours
    out = np.where((label != 255)[..., None], (1 - alpha) * out + (alpha * lut)[label], out * 0.6)
    out[inner_boundaries(label)] = 255.0
    return np.clip(out, 0, 255).astype(np.uint8)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--masks", type=int, default=48)
    ap.add_argument("--size", type=hw, default="480x640", help="HxW of the images")
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--pieces", type=int, default=64, help="pieces of the streamed Parquet")
    ap.add_argument("--piece-rows", type=int, default=10, help="records per piece")
    args = ap.parse_args()
    h, w = args.size

    from pycocotools import mask as mask_utils

    from fmbseg.storage.parquet import RowGroupWriter, table_to_parquet_bytes
    from fmbseg.storage.records import MaskRecords, compose_label_map, encode_mask, mask_row
    from fmbseg.tasks.annotate.gallery import class_colours, label_png, overlay

    rng = np.random.default_rng(0)
    masks = blobs(args.masks, h, w, rng)
    rows = [
        mask_row(
            m,
            image_id=f"img-{i // 8}",
            image_uri=f"s3://b/img-{i // 8}.jpg",
            category_id=int(rng.integers(0, 20)),
            category="c",
            source="auto",
            score=0.9,
            fingerprint="f",
        )
        for i, m in enumerate(masks)
    ]
    table = MaskRecords.from_rows(rows).table
    blob = table_to_parquet_bytes(table)
    print(f"shard: {table.num_rows} mask records of {h}x{w} images, {len(blob)} bytes of Parquet")
    reads = {
        "ParquetFile(BufferReader) (ours)": lambda: pq.ParquetFile(pa.BufferReader(blob)).read(),
        "ParquetFile(BytesIO)": lambda: pq.ParquetFile(io.BytesIO(blob)).read(),
        "pq.read_table(BytesIO)": lambda: pq.read_table(io.BytesIO(blob)),
    }
    assert all(fn().equals(table) for fn in reads.values())
    ratio_table(
        [("shard read", "<34"), ("us/call", "9.0f")],
        [(name, [per_call(fn, args.repeat)]) for name, fn in reads.items()],
        base="ParquetFile(BufferReader) (ours)",
    )

    def per_mask_fortran() -> list[Any]:
        out = []
        for m in masks:
            rle = mask_utils.encode(np.asfortranarray(m, dtype=np.uint8))
            box = tuple(float(v) for v in mask_utils.toBbox(rle))
            out.append((rle["counts"], box, int(mask_utils.area(rle))))
        return out

    assert per_mask_fortran() == [encode_mask(m) for m in masks]
    n = max(1, args.repeat // 20)
    ours = per_call(lambda: [encode_mask(m) for m in masks], n)
    ref = per_call(per_mask_fortran, n)
    print()
    print(f"RLE encoding of {len(masks)} {h}x{w} masks: same counts, boxes, areas")
    ratio_table(
        [("encode", "<34"), ("us/mask", "9.0f")],
        [
            ("encode_mask, OpenCV transpose (ours)", [ours / len(masks)]),
            ("np.asfortranarray", [ref / len(masks)]),
        ],
        base="encode_mask, OpenCV transpose (ours)",
    )

    more = blobs(args.pieces * args.piece_rows, h, w, rng)  # distinct masks: no repeats
    whole = MaskRecords.from_rows(
        [
            mask_row(
                m,
                image_id=f"img-{i // 3}",
                image_uri=f"s3://b/img-{i // 3}.jpg",
                category_id=int(rng.integers(0, 20)),
                category="c",
                source="auto",
                score=float(rng.random()),
                fingerprint="f",
            )
            for i, m in enumerate(more)
        ]
    ).table
    pieces = [whole.slice(k * args.piece_rows, args.piece_rows) for k in range(args.pieces)]

    def streamed(writer_type: Any) -> bytes:
        buf = io.BytesIO()
        with writer_type(buf, table.schema) as writer:
            for piece in pieces:
                writer.write_table(piece)
        return buf.getvalue()

    def per_piece(sink: Any, schema: pa.Schema) -> pq.ParquetWriter:
        return pq.ParquetWriter(sink, schema, compression="zstd")

    files = {"RowGroupWriter (ours)": RowGroupWriter, "a row group per piece": per_piece}
    blobs_out = {name: streamed(w) for name, w in files.items()}
    assert all(
        pq.read_table(io.BytesIO(b)).equals(pa.concat_tables(pieces)) for b in blobs_out.values()
    )
    n = max(1, args.repeat // 20)
    stream_times = {name: per_call(lambda w=w: streamed(w), n) for name, w in files.items()}
    print()
    print(f"streamed Parquet: {args.pieces} pieces of {args.piece_rows} records: same table")
    ratio_table(
        [("writer", "<34"), ("us/file", "9.0f"), ("bytes", "10d")],
        [(name, [t, len(blobs_out[name])]) for name, t in stream_times.items()],
        base="RowGroupWriter (ours)",
    )

    colours = class_colours(20)
    labels = [compose_label_map(rows[k : k + 8], h, w) for k in range(0, len(rows), 8)]
    pixels = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in labels]
    pairs = list(zip(pixels, labels, strict=True))
    assert all(
        (overlay(p, lab, colours, 0.5) == float_overlay(p, lab, colours, 0.5)).all()
        for p, lab in pairs
    )
    n = max(1, args.repeat // 20)
    ours = per_call(lambda: [overlay(p, lab, colours, 0.5) for p, lab in pairs], n)
    ref = per_call(lambda: [float_overlay(p, lab, colours, 0.5) for p, lab in pairs], n)
    print()
    print(f"overlays of {h}x{w}: same pixels")
    ratio_table(
        [("overlay", "<34"), ("us/image", "9.0f")],
        [
            ("Pillow blend + composite (ours)", [ours / len(pairs)]),
            ("float32 numpy", [ref / len(pairs)]),
        ],
        base="Pillow blend + composite (ours)",
    )

    print()
    print(f"label PNGs: {len(labels)} maps of {h}x{w} composed from those masks")
    results = []
    for level in (1, 6, 9):
        t = per_call(
            lambda lv=level: [label_png(lab, colours, lv) for lab in labels],
            max(1, args.repeat // 20),
        ) / len(labels)
        size = float(np.mean([len(label_png(lab, colours, level)) for lab in labels]))
        results.append((f"{level}{' (default)' if level == 6 else ''}", [t, size]))
    ratio_table(
        [("zlib level", "<34"), ("us/map", "9.0f"), ("bytes/map", "10.0f")],
        results,
        base="6 (default)",
        ratio="vs 6",
    )


if __name__ == "__main__":
    main()
