"""Dataset readers against tiny trees in each benchmark's exact on-disk format."""

from __future__ import annotations

import io
import pickle
import uuid

import numpy as np
import pytest
from PIL import Image

import tests.helpers.dataset_trees as trees
from fmbseg.data.datasets import DatasetError, dataset_description, dataset_names, open_dataset
from fmbseg.data.vocab import load_vocabulary


def _reduce_zero(lab: np.ndarray) -> np.ndarray:
    out = lab.astype(np.int64) - 1
    out[(lab == 0) | (lab == 255)] = 255
    return out.astype(np.uint8)


def _check_samples(ds, expected: dict[str, np.ndarray]) -> None:
    got = list(ds)
    assert [sid for sid, _, _ in got] == list(expected)
    for (sid, img, lab), want in zip(got, expected.values(), strict=True):
        assert img.dtype == np.uint8 and img.shape == (trees.H, trees.W, 3), sid
        assert lab.dtype == np.uint8 and lab.shape == (trees.H, trees.W), sid
        np.testing.assert_array_equal(lab, want, err_msg=sid)


def test_voc21_keeps_background_and_borders(tmp_path):
    raw = trees.write_voc(str(tmp_path))
    ds = open_dataset("voc21", str(tmp_path / "VOCdevkit" / "VOC2012"))
    assert ds.classes == load_vocabulary("voc-21") and len(ds.classes) == 21
    assert ds.background == 0 and ds.ignore_index == 255
    assert len(ds) == 3  # val.txt only; the extra JPEG is not listed
    _check_samples(ds, raw)  # palette indices read as class ids, 255 borders kept


def test_voc20_reduces_zero_label(tmp_path):
    raw = trees.write_voc(str(tmp_path))
    ds = open_dataset("voc20", str(tmp_path))  # the parent of VOCdevkit also works
    assert ds.background is None and len(ds.classes) == 20
    _check_samples(ds, {k: _reduce_zero(v) for k, v in raw.items()})
    sid, _, lab = ds[0]
    assert 255 in lab and lab.max() == 255 and 19 in lab and 0 in lab  # 20 -> 19, 1 -> 0


def test_voc_train_split(tmp_path):
    trees.write_voc(str(tmp_path))
    # listed, but no label file in SegmentationClass/: an error when the split is opened
    with pytest.raises(DatasetError) as info:
        open_dataset("voc", str(tmp_path), split="train")
    assert str(info.value) == (
        f"voc21 root {tmp_path}: SegmentationClass/2009_999999.png not found (the label of a "
        "sample ImageSets/Segmentation/train.txt lists; 1 of 1 samples lack theirs)"
    )
    voc = tmp_path / "VOCdevkit/VOC2012"
    (voc / "SegmentationClass/2009_999999.png").write_bytes(b"")
    assert open_dataset("voc", str(tmp_path), split="train").sample_ids == ["2009_999999"]


@pytest.mark.parametrize(
    ("name", "missing", "kind"),
    [
        ("voc21", "VOCdevkit/VOC2012/SegmentationClass/2007_000042.png", "label"),
        ("voc20", "VOCdevkit/VOC2012/JPEGImages/2008_000002.jpg", "image"),
        ("context59", "VOCdevkit/VOC2010/SegmentationClassContext/2008_000002.png", "label"),
    ],
)
def test_a_listed_sample_missing_a_file_is_named_when_opened(tmp_path, name, missing, kind):
    trees.write_voc(str(tmp_path))
    trees.write_context(str(tmp_path))
    (tmp_path / missing).unlink()
    with pytest.raises(DatasetError) as info:
        open_dataset(name, str(tmp_path))
    rel = missing.split("/", 2)[2]
    assert f": {rel} not found (the {kind} of a sample ImageSets/" in str(info.value)


def test_context60_and_59(tmp_path):
    raw = trees.write_context(str(tmp_path))
    c60 = open_dataset("context60", str(tmp_path / "VOCdevkit" / "VOC2010"))
    assert len(c60.classes) == 60 and c60.classes[0] == "background" and c60.background == 0
    _check_samples(c60, raw)
    c59 = open_dataset("context59", str(tmp_path))
    assert len(c59.classes) == 59 and c59.background is None
    assert c59.classes[58] == "wood" and c59.classes[0] == "aeroplane"
    _check_samples(c59, {k: _reduce_zero(v) for k, v in raw.items()})


def test_coco_stuff_from_train_ids_and_from_raw_maps(tmp_path):
    train = trees.write_coco(str(tmp_path / "a"))
    ds = open_dataset("coco-stuff-171", str(tmp_path / "a" / "coco_stuff164k"))
    assert len(ds.classes) == 171 and ds.classes[80] == "banner" and ds.classes[170] == "wood"
    _check_samples(ds, train)
    # Only the raw stuffthingmaps: raw ids 0..181 mapped with mmseg's converter table.
    trees.write_coco(str(tmp_path / "b"), train_ids=False, raw=True)
    _check_samples(open_dataset("coco-stuff", str(tmp_path / "b")), train)


@pytest.mark.parametrize("variant", ["train_ids", "raw", "instance_ids"])
def test_coco_object_matches_groupvit_conversion(tmp_path, variant):
    train = trees.write_coco(
        str(tmp_path),
        train_ids=variant != "raw",
        raw=variant == "raw",
        instance_ids=variant == "instance_ids",
    )
    ds = open_dataset("coco-object", str(tmp_path))
    assert len(ds.classes) == 81 and ds.classes[0] == "background" and ds.background == 0
    assert ds.classes[1] == "person" and ds.classes[80] == "toothbrush"
    # things t -> t + 1; stuff -> 0; unlabelled 255 -> 0 too (GroupViT's script maps every
    # raw id > 90, 255 included, to background)
    expected = {}
    for sid, t in train.items():
        e = np.zeros_like(t)
        e[t < 80] = t[t < 80] + 1
        expected[sid] = e
    _check_samples(ds, expected)
    assert all(255 not in lab for _, _, lab in ds)


@pytest.mark.parametrize("variant", ["train_ids", "raw", "instance_ids"])
def test_coco_object_80_is_things_only_with_background_ignored(tmp_path, variant):
    train = trees.write_coco(
        str(tmp_path),
        train_ids=variant != "raw",
        raw=variant == "raw",
        instance_ids=variant == "instance_ids",
    )
    ds = open_dataset("coco-object-80", str(tmp_path))
    assert ds.name == "coco-object-80" and len(ds.classes) == 80 and ds.background is None
    assert ds.classes[0] == "person" and ds.classes[79] == "toothbrush"
    # things keep their train id; stuff (banner, wood) and unlabelled are not evaluated
    expected = {sid: np.where(t < 80, t, 255).astype(np.uint8) for sid, t in train.items()}
    _check_samples(ds, expected)
    assert all({0, 11, 79} <= set(np.unique(lab)) for _, _, lab in ds)


def test_coco_object_names_say_which_variant(tmp_path):
    trees.write_coco(str(tmp_path))
    for name, key, k in [
        ("coco-object", "coco-object-81", 81),
        ("coco-object-81", "coco-object-81", 81),
        ("co-81", "coco-object-81", 81),
        ("coco-object-80", "coco-object-80", 80),
        ("co-80", "coco-object-80", 80),
    ]:
        ds = open_dataset(name, str(tmp_path))
        assert (ds.name, len(ds.classes)) == (key, k), name
    assert {"coco-object-80", "coco-object-81"} <= set(dataset_names())
    assert dataset_description("coco-object-80") == (
        "COCO-Object val, 80 things only, background pixels ignored"
    )
    assert dataset_description("coco-object") == (
        "COCO-Object val, 80 things + background (81 classes)"
    )
    assert dataset_description("folder") == ""


def test_cityscapes_train_ids_and_label_ids_fallback(tmp_path):
    ids = trees.write_cityscapes(str(tmp_path / "a"))
    lut = {7: 0, 8: 1, 26: 13, 33: 18, 0: 255, 4: 255, 24: 11}
    expected = {k: np.vectorize(lut.get)(v).astype(np.uint8) for k, v in ids.items()}
    ds = open_dataset("cityscapes", str(tmp_path / "a" / "cityscapes"))
    assert len(ds.classes) == 19 and ds.classes[18] == "bicycle"
    assert ds.sample_ids == [
        "frankfurt/frankfurt_000000_000294",
        "lindau/lindau_000000_000019",
        "munster/munster_000000_000019",
    ]
    _check_samples(ds, expected)
    trees.write_cityscapes(str(tmp_path / "b"), train_ids=False)
    _check_samples(open_dataset("cityscapes", str(tmp_path / "b")), expected)


def test_ade20k_reduces_zero_label(tmp_path):
    raw = trees.write_ade(str(tmp_path))
    ds = open_dataset("ade20k", str(tmp_path / "ADEChallengeData2016"))
    assert len(ds.classes) == 150 and ds.classes[7] == "bed"  # mmseg's 'bed ' stripped
    _check_samples(ds, {k: _reduce_zero(v) for k, v in raw.items()})
    assert open_dataset("ade", str(tmp_path), split="train").sample_ids == ["ADE_train_00000001"]


# ---- errors -------------------------------------------------------------------------------------


def test_missing_split_file_is_named(tmp_path):
    (tmp_path / "VOC2012").mkdir()
    with pytest.raises(
        DatasetError, match=r"root .*VOC2012: ImageSets/Segmentation/val.txt not found"
    ):
        open_dataset("voc21", str(tmp_path / "VOC2012"))


def test_missing_directories_are_named(tmp_path):
    trees.write_coco(str(tmp_path))
    with pytest.raises(DatasetError, match="images/train2017/ not found"):
        open_dataset("coco-stuff-171", str(tmp_path), split="train")
    with pytest.raises(DatasetError, match="directory not found"):
        open_dataset("ade20k", str(tmp_path / "nope"))
    with pytest.raises(DatasetError, match="unknown dataset 'kitti'; known: ade20k"):
        open_dataset("kitti", str(tmp_path))


def test_missing_annotation_is_named(tmp_path):
    trees.write_ade(str(tmp_path))
    (tmp_path / "ADEChallengeData2016/annotations/validation/ADE_val_00000002.png").unlink()
    with pytest.raises(DatasetError, match="annotations/validation/ADE_val_00000002.png not found"):
        open_dataset("ade20k", str(tmp_path))


def test_colour_label_and_size_mismatch_are_errors(tmp_path):
    trees.write_context(str(tmp_path))
    d = tmp_path / "VOCdevkit/VOC2010/SegmentationClassContext"
    Image.fromarray(np.zeros((trees.H, trees.W, 3), np.uint8)).save(d / "2008_000002.png")
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(d / "2008_000008.png")
    ds = open_dataset("context59", str(tmp_path))
    with pytest.raises(DatasetError, match="mode RGB .* not a colour rendering"):
        ds[0]
    with pytest.raises(DatasetError, match=r"label .*2008_000008.png is 5x5 but image .* is 20x28"):
        ds[1]


# ---- storage ------------------------------------------------------------------------------------


def test_fsspec_uri_root_subset_and_pickle(tmp_path):
    root = f"memory://bench-{uuid.uuid4().hex[:8]}"
    raw = trees.write_voc(root)
    ds = open_dataset("voc21", root)
    part = ds.subset([2, 0])
    assert part.sample_ids == ["2008_000002", "2007_000033"] and len(ds) == 3
    clone = pickle.loads(pickle.dumps(part))  # shipped to a Ray worker: fs rebuilt lazily
    assert clone._fs is None
    sid, img, lab = clone[0]
    np.testing.assert_array_equal(lab, raw["2008_000002"])
    assert [s for s, _ in ds.iter_labels()] == list(raw)


@pytest.mark.s3
def test_dataset_on_s3(s3_server):
    root = f"s3://{s3_server['bucket']}/datasets-{uuid.uuid4().hex[:8]}"
    opts = s3_server["storage_options"]
    raw = trees.write_ade(root, opts)
    ds = open_dataset("ade20k", root, storage_options=opts)
    _check_samples(ds, {k: _reduce_zero(v) for k, v in raw.items()})


def test_jpeg_pixels_survive_roughly(tmp_path):
    trees.write_voc(str(tmp_path))
    _, img, _ = open_dataset("voc21", str(tmp_path))[1]
    assert np.abs(img.astype(int) - trees.image(1).astype(int)).mean() < 3
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")  # a plain RGB array, not a PIL view
