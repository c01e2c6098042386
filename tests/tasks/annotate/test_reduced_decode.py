"""clip_dense decodes large images at reduced size (no less than it resizes to) and records
their original size; the read-ahead holds decoded images within a byte budget."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch

import fmbseg.tasks.annotate.clip_dense as cd
from fmbseg.config import ClipDenseConfig
from fmbseg.data.images import decode_image
from fmbseg.models.base import Preprocess

torch.set_num_threads(1)
PRE = Preprocess((0.48, 0.46, 0.41), (0.27, 0.26, 0.28), 224, 14)


def _photo(h: int, w: int) -> np.ndarray:
    """Smooth gradients, a few sharp-edged blocks and mild noise: photo-like content."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([x / w * 255, y / h * 255, (x + y) / (h + w) * 255], axis=2)
    for _ in range(12):
        y0, x0 = rng.integers(0, h - h // 5), rng.integers(0, w - w // 5)
        img[y0 : y0 + h // 6, x0 : x0 + w // 7] = rng.integers(0, 256, 3)
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _encoded(image: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_reduced_decode_keeps_the_short_side_and_resizes_to_nearly_the_same_input(fmt):
    h, w = 2600, 3900
    data = _encoded(_photo(h, w), fmt)
    cfg = ClipDenseConfig(short_side=448)
    min_side = cd.decode_min_side(cfg, PRE)
    full = decode_image(data)
    small = decode_image(data, min_side=min_side)
    assert full.shape == (h, w, 3)
    # reduced by a whole factor (JPEG: DCT scale 4; PNG: reduce(5)), never below the target
    assert min_side <= min(small.shape[:2]) < 2 * min_side
    assert small.shape[0] * small.shape[1] * 9 < h * w  # at most 1/9 of the pixels
    assert abs(small.shape[1] / small.shape[0] - w / h) < 0.01
    geo = cd.geometry(h, w, cfg, PRE)
    assert geo.resized_h <= small.shape[0] and geo.resized_w <= small.shape[1]
    a, b = cd.prepare_image(full, geo, PRE), cd.prepare_image(small, geo, PRE)
    assert a.shape == b.shape == (3, geo.resized_h, geo.resized_w)
    # the model's input, in [0, 1] pixel units: nearly the same either way
    diff = ((a - b) * torch.tensor(PRE.std).view(3, 1, 1)).abs()
    assert float(diff.mean()) < 0.01 and float(diff.max()) < 0.25, (diff.mean(), diff.max())


def test_a_small_image_is_decoded_whole():
    data = _encoded(_photo(300, 500), "PNG")
    assert decode_image(data, min_side=462).shape == (300, 500, 3)
    assert decode_image(data, min_side=100).shape == (100, 167, 3)  # reduce(3), rounded up


def test_clip_dense_decodes_a_large_image_reduced_and_records_its_original_size(
    tmp_path, monkeypatch
):
    """The records carry the index's size (what the SAM stages decode and check against);
    the presence and similarity maps match those of a full-size decode."""
    from PIL import Image

    import fmbseg.tasks.annotate.common as stage1
    from fmbseg.storage import ArtifactStore
    from fmbseg.tasks.annotate.index import run_index
    from fmbseg.tasks.annotate.stages import run_declared
    from tests.helpers.synthetic import VOCAB, synthetic_config, write_scenes

    cfg = synthetic_config()
    folder = tmp_path / "images"
    write_scenes(folder, 2)
    big = np.kron(_photo(60, 90), np.ones((10, 10, 1), np.uint8))  # 600 x 900, blocky
    Image.fromarray(big).save(folder / "big.png")
    store = ArtifactStore(str(tmp_path / "store"))
    index_fp = run_index(store, str(folder), cfg)
    shapes: dict[str, tuple[int, ...]] = {}
    load_image = stage1.load_image

    def recording(uri, *a):
        image = load_image(uri, *a)
        shapes[uri.rsplit("/", 1)[-1]] = image.shape
        return image

    monkeypatch.setattr(stage1, "load_image", recording)
    fp = run_declared(store, cfg, "clip_dense", {"index": index_fp}, vocabulary=VOCAB)["clip_dense"]
    table = store.read_table("clip_dense", fp).to_pylist()
    rows = {r["image_uri"].rsplit("/", 1)[-1]: r for r in table}
    assert (rows["big.png"]["height"], rows["big.png"]["width"]) == (600, 900)
    assert shapes["big.png"][0] < 600 and shapes["big.png"][1] < 900  # decoded reduced
    for name, row in rows.items():
        if name != "big.png":
            assert shapes[name][:2] == (row["height"], row["width"]) == (48, 96)
    # the same outputs as a full-size decode
    monkeypatch.setattr(cd, "decode_min_side", lambda *a: None)
    full_fp = "full"
    worker = cd.ClipDenseWorker(store, cfg, VOCAB, full_fp)
    out, errors = worker.process(0, {"index": index_fp})
    assert not errors.num_rows
    for r in out.to_pylist():
        ref = rows[r["image_uri"].rsplit("/", 1)[-1]]
        assert (r["height"], r["width"], r["grid_h"], r["grid_w"]) == (
            ref["height"],
            ref["width"],
            ref["grid_h"],
            ref["grid_w"],
        )
        assert r["present"] == ref["present"]
        a = np.frombuffer(r["sims"], np.float16).astype(np.float32)
        b = np.frombuffer(ref["sims"], np.float16).astype(np.float32)
        d = np.abs(a - b)  # cosine similarities (big.png: mean |sim| ~0.2, mean diff ~0.007)
        assert d.mean() < 0.02 and np.quantile(d, 0.99) < 0.1, (d.mean(), d.max())
        if r["height"] == 48:  # the small images are decoded whole: identical
            assert d.max() == 0
    # SAM decodes at full size and checks it against clip_dense's record: no error
    sam_fp = run_declared(store, cfg, "sam_prompt", {"clip_dense": fp})["sam_prompt"]
    assert store.read_table("sam_prompt", sam_fp, "errors").num_rows == 0
    assert store.read_table("sam_prompt", sam_fp).num_rows > 0


@pytest.mark.parametrize("budget", [None, 250])
def test_read_ahead_holds_decoded_images_within_its_budget_plus_one(budget):
    """Images of 100 bytes, 8 read ahead: without a budget up to 8 wait decoded beside the
    consumer's; with 250 bytes, at most two fit and the one the consumer waits for may go
    past: never more than 3 decoded and not yet taken, and every image still arrives."""
    import threading
    import time

    from fmbseg.tasks.annotate.common import ReadAhead

    lock = threading.Lock()
    held, peak = [0], [0]
    ra: ReadAhead

    def load(uri: str) -> np.ndarray:
        ra.admit(100)
        image = np.full(100, int(uri), np.uint8)
        with lock:
            held[0] += 1
            peak[0] = max(peak[0], held[0])
        return image

    ra = ReadAhead(load, None, ahead=8, budget=budget)
    seen = []
    for _item, image, exc in ra.each(list(range(20)), str):
        assert exc is None
        seen.append(int(image[0]))
        time.sleep(0.01)  # the model's time: the loaders run ahead meanwhile
        with lock:
            held[0] -= 1
    assert seen == list(range(20))
    if budget is None:
        assert peak[0] >= 6
    else:
        assert peak[0] <= 3, peak[0]
        assert ra.budget is not None and ra.budget.used == 0  # all given back


def test_read_ahead_budget_is_given_back_when_the_consumer_stops_early():
    from fmbseg.tasks.annotate.common import ReadAhead

    ra: ReadAhead

    def load(uri: str) -> np.ndarray:
        ra.admit(100)
        return np.zeros(100, np.uint8)

    ra = ReadAhead(load, None, ahead=3, budget=1000)
    gen = ra.each(list(range(10)), str)
    next(gen)
    gen.close()
    import time

    for _ in range(100):  # dropped reads still running give theirs back when done
        if ra.budget.used == 0:
            break
        time.sleep(0.01)
    assert ra.budget.used == 0


def test_an_image_too_large_for_sam_is_an_errors_row_with_the_reason(tmp_path, monkeypatch):
    """SAM decodes at full size: an image whose mask-decoder pass would not fit the device's
    memory is that image's errors row (naming the knobs), the others are segmented."""
    from PIL import Image

    import fmbseg.tasks.annotate.sam_pair as sam_pair
    from fmbseg.storage import ArtifactStore
    from fmbseg.tasks.annotate.index import run_index
    from fmbseg.tasks.annotate.stages import run_declared
    from tests.helpers.synthetic import VOCAB, synthetic_config, write_scenes

    cfg = synthetic_config()
    folder = tmp_path / "images"
    write_scenes(folder, 2)
    Image.fromarray(np.kron(_photo(60, 90), np.ones((10, 10, 1), np.uint8))).save(
        folder / "big.png"
    )
    store = ArtifactStore(str(tmp_path / "store"))
    index = {"index": run_index(store, str(folder), cfg)}
    clip_fp = run_declared(store, cfg, "clip_dense", index, vocabulary=VOCAB)["clip_dense"]
    # 100 MB: sam_auto's prompts per pass x 12 bytes x 540k pixels do not fit, 48x96 do
    monkeypatch.setattr(sam_pair, "device_memory", lambda device: 100_000_000)
    auto_fp = run_declared(store, cfg, "sam_auto", {"clip_dense": clip_fp})["sam_auto"]
    errors = store.read_table("sam_auto", auto_fp, "errors").to_pylist()
    too_large = [e for e in errors if e["error_type"] == "TooLargeForSam:too_large"]
    assert [e["uri"].rsplit("/", 1)[-1] for e in too_large] == ["big.png"], errors
    assert re.search(
        r"a 900x600 image needs ~\d+ MiB for sam_auto's mask decoder .* more than the cpu "
        r"device's 95 MiB",
        too_large[0]["message"],
    ), too_large[0]["message"]
    assert "lower index.max_pixels or sam_auto.points_per_batch" in too_large[0]["message"]
    records = store.read_table("sam_auto", auto_fp).to_pylist()
    assert records and all(r["image_uri"].rsplit("/", 1)[-1] != "big.png" for r in records)
    # one prompt per present class: the big image fits for sam_prompt
    prompt_fp = run_declared(store, cfg, "sam_prompt", {"clip_dense": clip_fp})["sam_prompt"]
    assert store.read_table("sam_prompt", prompt_fp, "errors").num_rows == 0
