"""No single input sinks a run: the awkward files of real folders, indexed and exported.

Real files on disk: symbolic links that dangle, loop or lead back up the tree, a file name
that is not UTF-8, a name at the 255-byte limit, GIF/WebP/multi-page TIFF, a PNG whose
header claims 100000 x 100000 pixels, and two images with the same name in two folders.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fmbseg.cli.index import skipped_files
from fmbseg.data.images import ImageDecodeError, MemoryBudget, check_image, decode_image
from fmbseg.data.sources import list_images, relative_path, source_root
from fmbseg.storage import ArtifactStore
from fmbseg.tasks.annotate.export import NAME_BYTES
from fmbseg.tasks.annotate.index import read_index
from tests.helpers.export_helpers import check_semantic_coco
from tests.helpers.synthetic import make_scene, run_pipeline, synthetic_config, write_scenes

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

LONG = "l" * 251 + ".png"  # 255 bytes: the longest name ext4 allows
BAD_NAME = b"caf\xe9.png"  # Latin-1, not UTF-8


def png_claiming(width: int, height: int, idat: bytes = b"") -> bytes:
    """A PNG whose header claims ``width x height`` 8-bit grey pixels (a bomb's header)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", idat or zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _awkward_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    write_scenes(folder, 2)
    scene = make_scene(7, 40, 60)
    (folder / "a").mkdir()
    (folder / "b").mkdir()
    Image.fromarray(scene.image).save(folder / "a" / "x.png")
    Image.fromarray(make_scene(8, 40, 60).image).save(folder / "b" / "x.png")
    Image.fromarray(make_scene(9, 30, 50).image).save(folder / LONG)
    frames = [Image.fromarray(make_scene(s, 32, 48).image).convert("P") for s in (10, 11)]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    Image.fromarray(make_scene(12, 36, 44).image).save(folder / "photo.webp", lossless=True)
    pages = [Image.fromarray(make_scene(s, 20, 28).image) for s in (13, 14)]
    pages[0].save(folder / "pages.tiff", save_all=True, append_images=pages[1:])
    (folder / "bomb.png").write_bytes(png_claiming(100_000, 100_000))
    os.symlink(folder / "gone.png", folder / "dangling.png")
    os.symlink(folder / "loop.png", folder / "loop.png")
    os.symlink("..", folder / "a" / "up")  # a folder loop: walked once
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    Image.fromarray(make_scene(15, 24, 24).image).save(elsewhere / "far.png")
    os.symlink(elsewhere, folder / "linked")  # a linked folder is walked
    with open(os.path.join(os.fsencode(folder), BAD_NAME), "wb") as f:
        Image.fromarray(make_scene(16, 24, 24).image).save(f, format="PNG")
    (folder / "notes.txt").write_text("not an image, not listed")
    return folder


def test_listing_reports_what_it_cannot_index_and_walks_links_once(tmp_path):
    folder = _awkward_folder(tmp_path)
    skipped: Counter[str] = Counter()
    refs = list_images(str(folder), skipped=skipped)
    assert skipped == {".txt": 1}  # said, not silently dropped
    problems = {relative_path(r.uri, str(folder)): r.problem[0] for r in refs if r.problem}
    assert problems == {
        "dangling.png": "broken_link",
        "loop.png": "link_loop",
        "caf\\xe9.png": "bad_name",  # the bytes shown, valid UTF-8 text
    }
    good = sorted(relative_path(r.uri, str(folder)) for r in refs if not r.problem)
    assert good == sorted(
        [
            "scene-0000.png",
            "scene-0001.png",
            "a/x.png",
            "b/x.png",
            LONG,
            "anim.gif",
            "photo.webp",
            "pages.tiff",
            "bomb.png",
            "linked/far.png",
        ]
    )
    for r in refs:
        r.uri.encode("utf-8")  # every URI is storable text


def test_source_root_and_relative_paths(tmp_path):
    folder = _awkward_folder(tmp_path)
    assert source_root(str(folder)) == str(folder)
    assert source_root(str(folder / "a" / "x.png")) == str(folder / "a")
    assert source_root(str(tmp_path / "list.txt")) == str(tmp_path)
    assert source_root(str(tmp_path / "c.json"), image_root="s3://b/imgs/") == "s3://b/imgs"
    assert relative_path("s3://b/imgs/a/x.jpg", "s3://b/imgs") == "a/x.jpg"
    assert relative_path("/elsewhere/y.jpg", "/photos") == "elsewhere/y.jpg"  # outside
    # a URI prefix, however it is spelled, against the URIs its listing gives
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/bucket16/photos/a/x.jpg", b"1")
    fs.pipe("/bucket16/photos/b/x.jpg", b"2")
    for prefix in ("memory://bucket16/photos", "memory:///bucket16/photos/"):
        root = source_root(prefix)
        assert [relative_path(r.uri, root) for r in list_images(prefix)] == ["a/x.jpg", "b/x.jpg"]


def test_check_image_rejects_a_bomb_from_its_header_and_keeps_no_pixels():
    with pytest.raises(ImageDecodeError, match="10000000000 pixels") as exc:
        check_image(png_claiming(100_000, 100_000), "bomb.png", max_pixels=178_956_970)
    assert exc.value.kind == "too_large"
    # a real, highly compressible 3000 x 3000 PNG (9 MB of pixels in a 9 kB file)
    rows = zlib.compress(b"\0" * (3001 * 3000), 9)
    data = png_claiming(3000, 3000, rows)
    assert len(data) < 20_000
    assert check_image(data, "big.png", max_pixels=10_000_000) == (3000, 3000)
    with pytest.raises(ImageDecodeError, match="max_pixels=1000000"):
        check_image(data, "big.png", max_pixels=1_000_000)


def test_decode_at_reduced_size_keeps_the_aspect_and_at_least_max_side():
    image = np.zeros((900, 1500, 3), np.uint8)
    image[:, 750:] = 255
    for fmt in ("JPEG", "PNG"):
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format=fmt)
        small = decode_image(buf.getvalue(), max_side=300)
        assert 300 <= max(small.shape[:2]) < 600
        h, w = small.shape[:2]
        assert abs(w / h - 1500 / 900) < 0.02
        assert decode_image(buf.getvalue()).shape == (900, 1500, 3)  # default: full size


def test_memory_budget_bounds_what_threads_hold_at_once():
    import threading
    import time

    budget = MemoryBudget(100)
    peak, lock = [0], threading.Lock()

    def work(n):
        with budget.hold(n):
            with lock:
                peak[0] = max(peak[0], budget.used)
            time.sleep(0.01)

    threads = [threading.Thread(target=work, args=(n,)) for n in (60, 60, 30, 500, 10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] <= 100 and budget.used == 0  # 500 > the budget: it ran alone


def test_awkward_inputs_become_error_rows_and_the_run_completes(tmp_path):
    folder = _awkward_folder(tmp_path)
    store = ArtifactStore(str(tmp_path / "store"))
    fps = run_pipeline(store, synthetic_config(), folder)
    index = read_index(store, fps["index"]).to_pylist()
    sizes = {relative_path(r["uri"], str(folder)): (r["width"], r["height"]) for r in index}
    # formats the decoder reads are indexed: GIF's first frame, WebP, TIFF's first page
    assert (sizes["anim.gif"], sizes["photo.webp"], sizes["pages.tiff"]) == (
        (48, 32),
        (44, 36),
        (28, 20),
    )
    base = f"exports/{fps['export']}"
    errors = pq.read_table(io.BytesIO(store.read_bytes(f"{base}/errors.parquet"))).to_pylist()
    by_name = {relative_path(e["uri"], str(folder)): e for e in errors}
    assert {n: e["error_type"] for n, e in by_name.items()} == {
        "dangling.png": "broken_link",
        "loop.png": "link_loop",
        "caf\\xe9.png": "bad_name",
        "bomb.png": "too_large",
    }
    assert all(e["stage"] == "index" and e["message"] for e in errors)
    assert "missing" in by_name["dangling.png"]["message"]

    coco = check_semantic_coco(store, base, tmp_path)  # every indexed image, exported
    images = {i["file_name"]: i for i in coco.dataset["images"]}
    assert set(images) == set(sizes)
    assert images["a/x.png"]["label_file"] == "labels/a/x.png"
    assert images["b/x.png"]["label_file"] == "labels/b/x.png"
    long_label = images[LONG]["label_file"]
    assert long_label != f"labels/{LONG}" and store.exists(f"{base}/{long_label}")
    assert len(long_label.removeprefix("labels/").encode()) <= NAME_BYTES + len(".png")
    for path in (tmp_path / "store" / base).rglob("*"):
        assert len(path.name.encode()) <= 255
    summary = store.read_json(f"{base}/export.json")
    assert summary["images"] == len(sizes) and summary["errors"] == 4
    skipped = store.require_manifest("index", fps["index"]).meta["skipped_extensions"]
    assert skipped_files(skipped) == "not listed (extension not in index.extensions): 1 .txt"


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.99])
def test_check_image_at_jpeg_scale_still_catches_a_truncated_file(keep):
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (600, 800, 3), dtype=np.uint8)).save(buf, "JPEG")
    data = buf.getvalue()
    assert check_image(data, "whole.jpg") == (800, 600)
    with pytest.raises(ImageDecodeError) as exc:
        check_image(data[: int(len(data) * keep)], "cut.jpg")
    assert exc.value.kind == "truncated"
