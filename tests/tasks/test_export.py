"""COCO RLE round trips (Fortran order), COCO JSON, PNG label maps, overlays and the gallery."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from fmbseg.storage import ArtifactStore
from fmbseg.storage.records import (
    MaskRecords,
    RecordError,
    compose_label_map,
    decode_mask,
    encode_mask,
    error_row,
    errors_table,
    mask_row,
)
from fmbseg.tasks.export import ExportWorker, coco_dataset, image_names, run_export
from fmbseg.tasks.gallery import class_colours, has_thumb, inner_boundaries, label_png, overlay
from tests.synthetic import make_scene, synthetic_config

# pycocotools' own decode trips a numpy-2 deprecation; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# ---- RLE ------------------------------------------------------------------------------------


def test_rle_runs_down_columns_as_coco_requires():
    mask = np.array([[1, 1, 1], [0, 0, 0]], bool)  # one row set: column-major runs alternate
    counts, bbox, area = encode_mask(mask)
    expected = mask_utils.frPyObjects({"size": [2, 3], "counts": [0, 1, 1, 1, 1, 1, 1]}, 2, 3)
    assert counts == expected["counts"]  # a row-major encoder would give [0, 3, 3]
    assert bbox == (0.0, 0.0, 3.0, 1.0) and area == 3


@pytest.mark.parametrize("layout", ["C", "F", "transposed", "strided"])
def test_rle_round_trips_whatever_the_memory_layout(layout):
    rng = np.random.default_rng(0)
    base = rng.random((40, 34)) < 0.3
    mask = {
        "C": np.ascontiguousarray(base),
        "F": np.asfortranarray(base),
        "transposed": np.ascontiguousarray(base.T).T,
        "strided": np.repeat(base, 2, 1)[:, ::2],
    }[layout]
    np.testing.assert_array_equal(mask, base)
    counts, bbox, area = encode_mask(mask)
    assert counts == encode_mask(np.ascontiguousarray(base))[0]
    back = decode_mask(counts, 40, 34)
    assert back.dtype == bool and back.flags.c_contiguous
    np.testing.assert_array_equal(back, base)
    ys, xs = np.nonzero(base)
    assert area == base.sum()
    assert bbox == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)


def test_rle_of_empty_and_full_masks():
    for fill in (False, True):
        m = np.full((5, 7), fill)
        counts, _, area = encode_mask(m)
        assert area == m.sum()
        np.testing.assert_array_equal(decode_mask(counts, 5, 7), m)


def _fortran_encode(mask: np.ndarray) -> tuple[bytes, tuple[float, ...], int]:
    """The straightforward encoding encode_mask must equal: numpy's Fortran copy."""
    rle = mask_utils.encode(np.asfortranarray(mask != 0, dtype=np.uint8))
    return rle["counts"], tuple(float(v) for v in mask_utils.toBbox(rle)), int(mask_utils.area(rle))


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (9, 1), (33, 17), (64, 48), (0, 5)])
def test_encode_mask_equals_numpys_fortran_copy(shape):
    rng = np.random.default_rng(1)
    masks = [rng.random(shape) < rng.uniform(0, 1) for _ in range(20)]
    masks += [np.zeros(shape, bool), np.ones(shape, bool)]
    assert [encode_mask(m) for m in masks] == [_fortran_encode(m) for m in masks]


def test_encode_mask_takes_views_and_nonzero_values_as_in():
    rng = np.random.default_rng(2)
    base = rng.random((30, 40)) < 0.4
    views = [base[::2, 1::3], base.T, (base * 255).astype(np.uint8), base.astype(np.float32)]
    got = [encode_mask(v) for v in views]
    assert got == [_fortran_encode(np.ascontiguousarray(v != 0)) for v in views]
    assert got[2] == got[3] == _fortran_encode(base)  # 255 and 1.0 are "in", as True is
    with pytest.raises(RecordError, match=r"expected an HxW mask, got shape \(2, 4, 5\)"):
        encode_mask(np.zeros((2, 4, 5), bool))


# ---- COCO ----------------------------------------------------------------------------------


def _records():
    rng = np.random.default_rng(1)
    masks = {
        ("a", 0): rng.random((12, 20)) < 0.4,
        ("a", 2): rng.random((12, 20)) < 0.2,
        ("b", 1): rng.random((9, 7)) < 0.5,
    }
    rows = [
        mask_row(
            m,
            image_id=i,
            image_uri=f"file:///data/{i}.jpg",
            category_id=c,
            category="xyz"[c],
            source="prompt" if c == 0 else "auto",
            score=0.5 + c / 10,
            fingerprint="fp",
        )
        for (i, c), m in masks.items()
    ]
    return MaskRecords.from_rows(rows), masks


def test_coco_json_loads_with_pycocotools_and_round_trips_masks(tmp_path):
    records, masks = _records()
    data = coco_dataset(records, ["x", "y", "z"], {"a": "a", "b": "b"})
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(data))
    coco = COCO(str(path))
    assert sorted(c["name"] for c in coco.loadCats(coco.getCatIds())) == ["x", "y", "z"]
    assert [coco.imgs[i]["file_name"] for i in sorted(coco.imgs)] == ["a.jpg", "b.jpg"]
    assert coco.imgs[1]["label_file"] == "labels/a.png"
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) == 3
    for ann in anns:
        img = coco.imgs[ann["image_id"]]
        mask = masks[(img["fmbseg_image_id"], ann["category_id"])]
        np.testing.assert_array_equal(coco.annToMask(ann).astype(bool), mask)
        assert ann["iscrowd"] == 0 and ann["area"] == mask.sum()
        assert ann["source"] == ("prompt" if ann["category_id"] == 0 else "auto")
        assert ann["score"] == pytest.approx(0.5 + ann["category_id"] / 10, abs=1e-6)
        assert (img["height"], img["width"]) == mask.shape


def test_image_names_are_stems_unless_they_collide():
    names = image_names(
        ["s3://b/x/cat.jpg", "s3://b/y/cat.png", "/d/dog.PNG", "/d/a b.jpg"],
        ["1111111111", "2222222222", "3", "4"],
    )
    assert names == ["cat-11111111", "cat-22222222", "dog", "a_b"]


# ---- pictures ------------------------------------------------------------------------------


def test_class_colours_are_distinct_and_never_the_ignore_black():
    c = class_colours(200)
    assert c.shape == (200, 3) and c.dtype == np.uint8
    assert len({tuple(x) for x in c.tolist()}) == 200
    assert not (c == 0).all(axis=1).any()


def test_label_png_keeps_ids_and_has_a_palette():
    label = np.array([[0, 1, 255], [2, 255, 0]], np.uint8)
    im = Image.open(io.BytesIO(label_png(label, class_colours(3))))
    assert im.mode == "P" and im.size == (3, 2)
    np.testing.assert_array_equal(np.asarray(im), label)
    pal = np.array(im.getpalette()).reshape(-1, 3)
    assert pal[255].tolist() == [0, 0, 0] and pal[1].tolist() == class_colours(3)[1].tolist()


def test_label_png_is_lossless_at_every_compression_level():
    label = make_scene(3, 60, 80).truth.astype(np.uint8)
    sizes = []
    for level in (0, 1, 6, 9):
        data = label_png(label, class_colours(6), level)
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), label)
        sizes.append(len(data))
    assert sizes[0] > sizes[1] >= sizes[3]  # level 0 stores, the others deflate


def test_only_an_overlay_larger_than_a_card_gets_a_thumbnail(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    worker = ExportWorker(store, synthetic_config(), "exports/e", 3, frozenset())
    for name, (h, w) in {"big": (400, 640), "small": (240, 320)}.items():
        image = np.full((h, w, 3), 90, np.uint8)
        worker._write_overlay(name, image, np.zeros((h, w), np.uint8), 0.5)
        over = Image.open(io.BytesIO(store.read_bytes(f"exports/e/overlays/{name}.jpg")))
        assert over.size == (w, h)
    thumb = Image.open(io.BytesIO(store.read_bytes("exports/e/thumbs/big.jpg")))
    assert thumb.size == (320, 200) and has_thumb(400, 640)
    assert not store.exists("exports/e/thumbs/small.jpg") and not has_thumb(240, 320)


def _float_overlay(image, label, colours, alpha):
    """The overlay's formula in float numpy (the reference)."""
    lut = np.zeros((256, 3), np.float64)
    lut[: len(colours)] = colours
    out = np.where((label != 255)[..., None], (1 - alpha) * image + alpha * lut[label], image * 0.6)
    return out


@pytest.mark.parametrize("alpha", [0.3, 0.5, 0.8])
def test_overlay_is_the_float_blend_truncated_and_white_on_outlines(alpha):
    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    label = np.kron(rng.integers(0, 4, (10, 14)), np.ones((5, 5), int)).astype(np.uint8)
    label[label == 3] = 255
    colours = class_colours(3)
    out = overlay(image, label, colours, alpha)
    edges = inner_boundaries(label)
    assert (out[edges] == 255).all() and edges.any()
    expected = _float_overlay(image.astype(np.float64), label, colours, alpha)
    assert np.abs(out[~edges].astype(int) - np.floor(expected[~edges] + 1e-9)).max() == 0
    with pytest.raises(ValueError, match="HxW uint8 label map"):
        overlay(image, label.astype(np.int64), colours, alpha)


def test_overlay_colours_labelled_pixels_and_darkens_the_rest():
    image = np.full((6, 6, 3), 200, np.uint8)
    label = np.full((6, 6), 255, np.uint8)
    label[1:5, 1:5] = 0
    out = overlay(image, label, np.array([[0, 0, 255]], np.uint8), alpha=0.5)
    assert out.shape == image.shape
    assert (out[0, 0] == 120).all()  # unlabelled: 200 * 0.6
    assert out[2, 2].tolist() == [100, 100, 227]  # inside: blended with blue
    assert out[1, 1].tolist() == [255, 255, 255]  # region outline


# ---- the stage -----------------------------------------------------------------------------


def _committed_merge(store: ArtifactStore, tmp_path) -> tuple[str, dict]:
    """A merge output written by hand: two images on disk with their masks, one failure."""
    rows, images = [], {}
    for seed, name in enumerate(["first", "second"]):
        scene = make_scene(seed, 24, 40)
        path = tmp_path / f"{name}.png"
        Image.fromarray(scene.image).save(path)
        images[name] = scene
        for k in np.unique(scene.truth):
            rows.append(
                mask_row(
                    scene.truth == k,
                    image_id=f"id-{name}",
                    image_uri=str(path),
                    category_id=int(k),
                    category=f"class{k}",
                    source="prompt" if k % 2 else "auto",
                    score=0.9,
                    fingerprint="fp",
                )
            )
    errors = errors_table([error_row("id-x", "/nowhere.png", "merge", "no_class_present", "-")])
    store.write_shard("merge", "m1", 0, MaskRecords.from_rows(rows).table, errors)
    store.commit("merge", "m1", 1, meta={"vocabulary": [f"class{k}" for k in range(6)]})
    return "m1", images


def test_run_export_writes_every_format_and_is_skipped_once_complete(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    merge_fp, scenes = _committed_merge(store, tmp_path)
    cfg = synthetic_config()
    fp = run_export(store, cfg, merge_fp)
    base = f"exports/{fp}"
    for name, scene in scenes.items():
        label = np.asarray(Image.open(io.BytesIO(store.read_bytes(f"{base}/labels/{name}.png"))))
        np.testing.assert_array_equal(label, scene.truth)  # one exact mask per class
        over = Image.open(io.BytesIO(store.read_bytes(f"{base}/overlays/{name}.jpg")))
        assert over.size == (40, 24)
        assert not store.exists(f"{base}/thumbs/{name}.jpg")  # it fits: no second copy
    coco = json.loads(store.read_bytes(f"{base}/annotations.json"))
    assert len(coco["categories"]) == 6 and len(coco["images"]) == 2
    table = pq.read_table(io.BytesIO(store.read_bytes(f"{base}/records.parquet")))
    assert table.num_rows == len(coco["annotations"])
    first_rows = MaskRecords(table).for_image("id-first")
    np.testing.assert_array_equal(compose_label_map(first_rows, 24, 40), scenes["first"].truth)
    page = store.read_bytes(f"{base}/gallery.html").decode()
    assert '<img loading="lazy" src="overlays/first.jpg"' in page
    assert "class0" in page and "no_class_present" in page
    summary = store.read_json(f"{base}/export.json")
    assert summary["images"] == 2 and summary["images_without_masks"] == 1
    before = store.read_bytes(f"{base}/export.json")
    assert run_export(store, cfg, merge_fp) == fp
    assert store.read_bytes(f"{base}/export.json") == before  # complete: not redone


@pytest.mark.parametrize("order", [None, "area", "prompt_first", "fill_unlabelled"])
def test_export_paints_in_the_order_the_merge_was_made_with(tmp_path, order):
    # A prompt mask with a small automatic mask inside it: only "area" lets the auto win.
    path = tmp_path / "one.png"
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(path)
    big, small = np.zeros((10, 12), bool), np.zeros((10, 12), bool)
    big[0:8, 0:8], small[2:4, 2:4] = True, True
    rows = [
        mask_row(
            m,
            image_id="id",
            image_uri=str(path),
            category_id=c,
            category=f"class{c}",
            source=s,
            score=0.9,
            fingerprint="fp",
        )
        for m, c, s in ((big, 1, "prompt"), (small, 2, "auto"))
    ]
    store = ArtifactStore(str(tmp_path / "store"))
    store.write_shard("merge", "m", 0, MaskRecords.from_rows(rows).table, None)
    meta = {"vocabulary": ["class0", "class1", "class2"]}
    store.commit("merge", "m", 1, meta=meta if order is None else {**meta, "order": order})
    fp = run_export(store, synthetic_config(), "m")
    label = np.asarray(Image.open(io.BytesIO(store.read_bytes(f"exports/{fp}/labels/one.png"))))
    assert (label[2:4, 2:4] == (2 if order in (None, "area") else 1)).all()
    assert (label[big & ~small] == 1).all() and (label[~big] == 255).all()
