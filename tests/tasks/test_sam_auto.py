"""sam_auto core: thresholds, exact mean similarity under masks, labels of automatic masks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fmbseg.config import SamAutoConfig
from fmbseg.storage.records import decode_mask
from fmbseg.tasks.clip_dense import ClipDenseResult
from fmbseg.tasks.sam_auto import auto_masks, cell_index_map, filter_masks, mask_class_scores

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
    rows = auto_masks(
        sam,
        np.zeros((h, w, 3), np.uint8),
        clip,
        ["a", "b", "c", "d"],
        dataclasses.replace(CFG, max_area_fraction=0.95),
        fingerprint="fa",
    )
    assert [(r["category_id"], r["category"]) for r in rows] == [(1, "b"), (3, "d"), (1, "b")]
    assert [r["score"] for r in rows] == pytest.approx([0.91, 0.97, 0.88])
    assert all(r["source"] == "auto" and r["fingerprint"] == "fa" for r in rows)
    assert (decode_mask(rows[1]["rle_counts"], h, w) == right).all()


def test_no_present_class_means_sam_is_not_run():
    sam = FixedSam([_m(np.ones((4, 4), bool))])
    rows = auto_masks(
        sam,
        np.zeros((4, 4, 3), np.uint8),
        _clip(np.zeros((0, 1, 1)), [], 4, 4),
        ["a"],
        CFG,
        fingerprint="f",
    )
    assert rows == [] and sam.generated == 0
