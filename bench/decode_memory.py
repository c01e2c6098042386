"""Peak memory of decoding one very large image: the index's check, an overlay, clip_dense.

A 13000 x 13000 PNG (highly compressible, so the file is small; the decoder still makes
every pixel) and the same size as a JPEG. Each path runs in a fresh Python process that
first reads the file's bytes; the figure is the growth of that process's peak RSS over a
process that only read the bytes, i.e. what the decode itself needs:

    index check, before      decode_image: the RGB array (PIL's buffer + numpy's copy);
                             also what a full-size overlay decode needs
    index check, now         check_image: PIL's buffer in the file's mode (a JPEG's at
                             1/8 scale, its whole stream still decoded), nothing kept
    overlay decode, reduced  decode_image(max_side=2048): JPEG DCT scaling, else reduce
    clip_dense input, before the full decode, then prepare_image (float32 resize to short
                             side 1008, the model's input); over a process that imported torch
    clip_dense input, now    decode_image(min_side=short_side + patch), then prepare_image

One run on the 2-core dev box (MiB over a process that only read the file): PNG 1614 ->
645 (check), 663 (reduced overlay); JPEG 1615 -> 11 (check), 101 (reduced: decoded at 1/4).
clip_dense's input: PNG 3075 -> 649 (PIL's full-size buffer, reduced by 12 before the RGB
copy), JPEG 3076 -> 88 (decoded at 1/8: 1625 x 1625). The peak is the child's own
(VmHWM): ``ru_maxrss`` of a forked child starts at its parent's peak.

Run: ``python bench/decode_memory.py [--side 13000]``. The index also bounds how much its
reader threads decode at once (``fmbseg.data.images.WORKER_DECODE_BUDGET``): a worker's peak is
about ``max(budget, the largest image)``, not ``READERS`` times the largest image.
"""

from __future__ import annotations

import argparse
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Any

from harness import parser, peak_bytes


def child(path: str, what: str) -> None:
    """In a fresh process: read the file, decode it as ``what`` says; print the process's
    peak RSS (KiB) and what the decode made."""
    from fmbseg.data.images import check_image, decode_image, image_size

    if what.startswith("clip"):  # clip_dense's model input: decode, then prepare_image
        from fmbseg.config import ClipDenseConfig
        from fmbseg.models.base import Preprocess
        from fmbseg.tasks.annotate.windows import decode_min_side, geometry, prepare_image

        cfg = ClipDenseConfig()  # short_side 1008
        pre = Preprocess((0.48, 0.46, 0.41), (0.27, 0.26, 0.28), 224, 16)  # ViT-B/16's
    data = Path(path).read_bytes()
    shape: Any
    if what in ("read", "clipread"):
        shape = None
    elif what == "check":
        shape = check_image(data, max_pixels=None)
    elif what == "decode":
        shape = decode_image(data).shape
    elif what.startswith("clip"):
        w, h = image_size(data)
        min_side = decode_min_side(cfg, pre) if what == "clipreduced" else None
        image = decode_image(data, min_side=min_side)
        shape = (image.shape, tuple(prepare_image(image, geometry(h, w, cfg, pre), pre).shape))
    else:
        shape = decode_image(data, max_side=int(what)).shape
    print(peak_bytes("rss") // 1024, shape)


def png_rgb(side: int) -> bytes:
    """A valid ``side x side`` RGB PNG of one colour, compressed as it is written."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    row = b"\0" + bytes([90, 140, 200]) * side
    z = zlib.compressobj(9)
    body = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def jpeg_rgb(side: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (side, side), (90, 140, 200)).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def peak_kib(path: Path, what: str) -> tuple[int, str]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", what, str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    kib, shape = out.stdout.split(" ", 1)
    return int(kib), shape.strip()


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--side", type=int, default=13000)
    ap.add_argument("--child", nargs=2, metavar=("WHAT", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[1], args.child[0])
        return
    side = args.side
    print(f"decoding one {side}x{side} image ({side * side * 3 / 2**20:.0f} MiB as RGB)")
    print(f"{'file':6} {'path':26} {'peak MiB':>9} {'shape':>22}")
    with tempfile.TemporaryDirectory() as tmp:
        for fmt, make in (("PNG", png_rgb), ("JPEG", jpeg_rgb)):
            path = Path(tmp) / f"big.{fmt.lower()}"
            path.write_bytes(make(side))
            base, _ = peak_kib(path, "read")
            clip_base, _ = peak_kib(path, "clipread")  # with torch imported
            rows = [
                ("index check, before", "decode", base),
                ("index check, now", "check", base),
                ("overlay decode, reduced", "2048", base),
                ("clip_dense input, before", "clipfull", clip_base),
                ("clip_dense input, now", "clipreduced", clip_base),
            ]
            for label, what, zero in rows:
                kib, shape = peak_kib(path, what)
                print(f"{fmt:6} {label:26} {(kib - zero) / 1024:9.0f} {shape:>22}")
            print(f"{'':6} (file: {path.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
