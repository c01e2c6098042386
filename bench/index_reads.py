"""Stage ``index`` on an object store: images read and checked in threads vs one at a time.

``index_images`` with the worker's thread pool (``fmbseg.tasks.annotate.index.READERS`` threads)
against the same call without a pool (the straightforward loop), on the same generated
JPEGs, each read delayed by ``--latency-ms`` as an object-store GET is (the bytes come from
local disk; 0 = the local-disk case). Checks both give the same tables and prints images/s
and the ratio.

    python bench/index_reads.py [--images 64] [--latency-ms 30] [--size 480x640]
"""

from __future__ import annotations

import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from annotate import make_images  # bench/ is on sys.path when run as a script
from harness import hw, parser, table, timed


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--latency-ms", type=float, default=30.0)
    ap.add_argument("--size", type=hw, default="480x640", help="HxW of the generated images")
    args = ap.parse_args()

    from fmbseg.config import IndexConfig
    from fmbseg.data.sources import read_bytes
    from fmbseg.tasks.annotate.index import READERS, index_images

    def get(uri: str) -> bytes:
        time.sleep(args.latency_ms / 1000)
        return read_bytes(uri)

    h, w = args.size
    with tempfile.TemporaryDirectory() as tmp:
        make_images(Path(tmp), args.images, (h, w))
        uris = sorted(str(p) for p in Path(tmp).glob("*.jpg"))
        alone = timed(lambda: index_images(uris, IndexConfig(), read=get))
        with ThreadPoolExecutor(READERS) as pool:
            threaded = timed(lambda: index_images(uris, IndexConfig(), read=get, pool=pool))
    assert threaded.result[0].equals(alone.result[0]) and threaded.result[1].equals(alone.result[1])
    serial, ours = alone.seconds, threaded.seconds
    print(f"{args.images} JPEGs of {h}x{w}, {args.latency_ms:g} ms per read, full decode check")
    table(
        [("path", "<28"), ("images/s", "9.1f")],
        [
            ("one at a time", args.images / serial),
            (f"{READERS} threads (ours)", args.images / ours),
        ],
    )
    print(f"speed-up {serial / ours:.2f}x")


if __name__ == "__main__":
    main()
