"""sam_auto core: thresholds, exact mean similarity under masks, labels of automatic masks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy import ndimage

from fmbseg.config import SamAutoConfig
from fmbseg.models import build_model
from fmbseg.models.sam import SamSegmenter
from fmbseg.storage.records import decode_mask
from fmbseg.tasks.annotate.clip_dense import ClipDenseResult
from fmbseg.tasks.annotate.sam_auto import (
    auto_job,
    cell_index_map,
    filter_masks,
    mask_class_scores,
)

CFG = SamAutoConfig(
    pred_iou_thresh=0.8, stability_score_thresh=0.9, min_mask_region_area=4, max_area_fraction=0.5
)


def _m(seg, iou=0.9, stab=0.95):
    return {
        "segmentation": seg,
        "area": int(seg.sum()),
        "predicted_iou": iou,
        "stability_score": stab,
    }


def test_filter_masks_applies_every_threshold():
    h, w = 10, 10

    def box(n):
        s = np.zeros((h, w), bool)
        s.flat[:n] = True
        return s

    masks = [
        _m(box(20)),
        _m(box(20), iou=0.7),
        _m(box(20), stab=0.85),
        _m(box(3)),
        _m(box(51)),
        _m(box(50)),
        _m(box(0)),
    ]
    kept = filter_masks(masks, h, w, CFG)
    assert [int(m["segmentation"].sum()) for m in kept] == [20, 50]


def test_cell_index_map_assigns_pixel_centres_to_cells():
    # 7 px over 3 cells of 7/3 px: centres 0.5, 1.5, 2.5, ... -> cells 0,0,1,1,1,2,2
    idx = cell_index_map(7, 4, 3, 2)
    assert idx[:, 0].tolist() == [0, 0, 2, 2, 2, 4, 4]  # flat index row * grid_w
    assert idx[0].tolist() == [0, 0, 1, 1]


def _clip(sims: np.ndarray, present: list[int], h: int, w: int) -> ClipDenseResult:
    return ClipDenseResult(
        "img",
        "u",
        h,
        w,
        1,
        np.zeros(5, np.int32),
        np.array(present, np.int32),
        sims.astype(np.float32),
    )


def test_mask_class_scores_equal_the_mean_of_the_upsampled_maps():
    rng = np.random.default_rng(0)
    h, w, gh, gw = 23, 37, 4, 6  # cells are not whole pixels
    sims = rng.normal(size=(3, gh, gw))
    clip = _clip(sims, [0, 1, 4], h, w)
    masks = [rng.random((h, w)) < f for f in (0.05, 0.3, 0.9)]
    # brute force: the value of each pixel is that of the cell under its centre
    up = np.empty((3, h, w))
    for y in range(h):
        for x in range(w):
            up[:, y, x] = sims[:, int((y + 0.5) * gh / h), int((x + 0.5) * gw / w)]
    expected = np.stack([up[:, m].mean(axis=1) for m in masks])
    np.testing.assert_allclose(mask_class_scores(masks, clip), expected, rtol=1e-5, atol=1e-6)


class FixedSam:
    def __init__(self, masks):
        self.masks, self.generated = masks, 0

    def set_image(self, image):  # pragma: no cover
        pass

    def predict(self, points, labels, multimask=True):  # pragma: no cover
        raise AssertionError

    def generate(self, image):
        self.generated += 1
        return self.masks


def test_auto_masks_are_labelled_by_the_class_most_similar_under_them():
    h, w = 20, 40
    sims = np.zeros((2, 2, 4))
    sims[0, :, :2] = 1.0  # present class 1 (maps follow present ids) on the left half
    sims[1, :, 2:] = 1.0  # present class 3 on the right half
    clip = _clip(sims, [1, 3], h, w)
    left, right, mostly_left = (np.zeros((h, w), bool) for _ in range(3))
    left[2:18, 1:15] = True
    right[5:10, 25:39] = True
    mostly_left[:, 10:22] = True  # 10 columns left of x=20, 2 right
    sam = FixedSam([_m(left, 0.91), _m(right, 0.97), _m(mostly_left, 0.88)])
    rows = auto_job(
        sam,
        np.zeros((h, w, 3), np.uint8),
        clip,
        ["a", "b", "c", "d"],
        dataclasses.replace(CFG, max_area_fraction=0.95),
        fingerprint="fa",
    )()
    assert [(r["category_id"], r["category"]) for r in rows] == [(1, "b"), (3, "d"), (1, "b")]
    assert [r["score"] for r in rows] == pytest.approx([0.91, 0.97, 0.88])
    assert all(r["source"] == "auto" and r["fingerprint"] == "fa" for r in rows)
    assert (decode_mask(rows[1]["rle_counts"], h, w) == right).all()


def test_no_present_class_means_sam_is_not_run():
    sam = FixedSam([_m(np.ones((4, 4), bool))])
    rows = auto_job(
        sam,
        np.zeros((4, 4, 3), np.uint8),
        _clip(np.zeros((0, 1, 1)), [], 4, 4),
        ["a"],
        CFG,
        fingerprint="f",
    )()
    assert rows == [] and sam.generated == 0


# ---- crop layers (SAM's labelling setting) ---------------------------------------------------


class ZoomLimitedPredictor:
    """A stand-in for segment-anything's ``SamPredictor`` whose answers are known: a point
    on a bright pixel gets the bright connected blob under it as its mask (logits +-10),
    with predicted IoU 1.0 if the blob covers at least 1% of the embedded image and 0.2
    otherwise; any other point gets an empty mask with IoU 0. A small object is thus found
    only in a zoomed crop, as SAM misses objects too small at its input resolution."""

    device = torch.device("cpu")
    model = type("Model", (), {"mask_threshold": 0.0})()
    transform = type("Identity", (), {"apply_coords": staticmethod(lambda c, size: c)})()

    def __init__(self) -> None:
        self.embedded: list[tuple[int, int]] = []
        self.image: np.ndarray | None = None

    @property
    def is_image_set(self) -> bool:
        return self.image is not None

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        self.image = image
        self.embedded.append(image.shape[:2])

    def reset_image(self) -> None:
        self.image = None

    def predict_torch(self, points, labels, multimask_output=True, return_logits=True):
        assert self.image is not None
        bright = self.image[..., 0] > 128
        blobs, _ = ndimage.label(bright)
        masks, ious = [], []
        for x, y in points[:, 0].tolist():
            blob = blobs[int(y), int(x)]
            mask = (blobs == blob) if blob else np.zeros_like(bright)
            ious.append(0.0 if not blob else 1.0 if mask.mean() >= 0.01 else 0.2)
            masks.append(np.where(mask, 10.0, -10.0))
        m = torch.as_tensor(np.stack(masks), dtype=torch.float32)[:, None].repeat(1, 3, 1, 1)
        iou = torch.tensor(ious)[:, None].repeat(1, 3)
        return m, iou, None


CROPS = SamAutoConfig(
    points_per_side=8,
    points_per_batch=64,
    pred_iou_thresh=0.5,
    stability_score_thresh=0.9,
    min_mask_region_area=0,
    crop_n_layers=1,
    crop_n_points_downscale_factor=2,
)


def _standin_sam(cfg: SamAutoConfig) -> tuple[SamSegmenter, ZoomLimitedPredictor]:
    tiny = build_model("sam_tiny", None, "cpu", auto_config=cfg)
    standin = ZoomLimitedPredictor()
    tiny._generator.predictor = standin
    return tiny, standin


def _small_object_image() -> tuple[np.ndarray, np.ndarray]:
    # 12x12 square in 128x192 (0.59% of the image): under the full image's 1% but 1.4% of
    # the first layer-1 crop, [0, 0, 118, 86] (generate_crop_boxes, overlap 512/1500).
    # It holds the full grid's point (36, 24) and that crop's 4x4 grid point (44.25, 32.25).
    img = np.full((128, 192, 3), 30, np.uint8)
    square = np.zeros((128, 192), bool)
    square[22:34, 34:46] = True
    img[square] = 220
    return img, square


def test_a_crop_layer_finds_a_small_mask_the_full_image_does_not():
    img, square = _small_object_image()
    clip = _clip(np.ones((1, 4, 6)), [2], 128, 192)
    vocab = ["a", "b", "c"]
    whole, _ = _standin_sam(dataclasses.replace(CROPS, crop_n_layers=0))
    assert auto_job(whole, img, clip, vocab, CROPS, fingerprint="f")() == []
    cropped, standin = _standin_sam(CROPS)
    assert standin.embedded == []
    rows = auto_job(cropped, img, clip, vocab, CROPS, fingerprint="f")()
    # the whole image and its four 2x2-layer crops, each embedded once
    assert standin.embedded == [(128, 192), (86, 118), (85, 118), (86, 117), (85, 117)]
    assert len(rows) == 1 and rows[0]["category"] == "c"
    assert (decode_mask(rows[0]["rle_counts"], 128, 192) == square).all()
    records = cropped.generate(img)
    assert [r["crop_box"] for r in records] == [[0, 0, 118, 86]]  # XYWH of the crop
    # layer i has points_per_side / factor**i points per side
    grids = cropped._generator.point_grids
    assert [len(g) for g in grids] == [64, 16]


def test_crop_layers_with_no_surviving_mask_return_none():
    # Every mask of every crop fails pred_iou_thresh: the stock generator's cross-crop NMS
    # raises IndexError on the empty 1-D crop boxes; ours returns no masks.
    from segment_anything import SamAutomaticMaskGenerator

    img, _ = _small_object_image()
    strict = dataclasses.replace(CROPS, pred_iou_thresh=0.99, stability_score_thresh=0.0)
    tiny = build_model("sam_tiny", None, "cpu", auto_config=strict)
    stock = SamAutomaticMaskGenerator(
        tiny.sam,
        points_per_side=8,
        pred_iou_thresh=0.99,
        crop_n_layers=1,
        output_mode="binary_mask",
    )
    with pytest.raises(IndexError):
        stock.generate(img)
    assert tiny.generate(img) == []
    clip = _clip(np.ones((1, 4, 6)), [0], 128, 192)
    assert auto_job(tiny, img, clip, ["a"], strict, fingerprint="f")() == []


def test_crop_settings_are_checked_and_in_the_configs():
    from fmbseg.config import ConfigError, load_config

    assert load_config("default").sam_auto.crop_n_layers == 1
    assert load_config("default").sam_auto.crop_n_points_downscale_factor == 2
    for name in ("quickstart", "tiny"):
        auto = load_config(name).sam_auto
        assert (auto.crop_n_layers, auto.crop_n_points_downscale_factor) == (0, 1)
    with pytest.raises(ConfigError, match="sam_auto.crop_n_layers: must be >= 0, got -1"):
        load_config("tiny", ["sam_auto.crop_n_layers=-1"])
    with pytest.raises(ConfigError, match="crop_n_points_downscale_factor: must be >= 1, got 0"):
        load_config("tiny", ["sam_auto.crop_n_points_downscale_factor=0"])
