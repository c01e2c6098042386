"""ConfusionMatrix against hand-computed matrices and an mmseg-style reference."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fmbseg.tasks.evaluate.metrics import ConfusionMatrix


def _mmseg_reference(preds, labels, k, ignore=255):
    """mmseg's intersect_and_union + total_area_to_metrics, written out with numpy."""
    inter = np.zeros(k)
    area_p = np.zeros(k)
    area_l = np.zeros(k)
    for pred, label in zip(preds, labels, strict=True):
        mask = label != ignore
        p, t = pred[mask].astype(np.int64), label[mask].astype(np.int64)
        hit = p[p == t]
        inter += np.bincount(hit[(hit >= 0) & (hit < k)], minlength=k)[:k]
        area_p += np.bincount(p[(p >= 0) & (p < k)], minlength=k)[:k]
        area_l += np.bincount(t, minlength=k)[:k]
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / (area_p + area_l - inter)
        acc = inter / area_l
    return {
        "IoU": iou,
        "Acc": acc,
        "aAcc": inter.sum() / area_l.sum(),
        "mIoU": np.nanmean(iou),
        "mAcc": np.nanmean(acc),
    }


def test_hand_computed_matrix_with_ignore():
    target = np.array([[0, 0, 1], [1, 2, 255]], dtype=np.uint8)
    pred = np.array([[0, 1, 1], [2, 2, 0]], dtype=np.uint8)
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    np.testing.assert_array_equal(cm.matrix, [[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0]])
    m = cm.compute()
    np.testing.assert_allclose(m["IoU"], [1 / 2, 1 / 3, 1 / 2])
    np.testing.assert_allclose(m["Acc"], [1 / 2, 1 / 2, 1.0])
    assert m["mIoU"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 2) / 3)
    assert m["mAcc"] == pytest.approx(2 / 3)
    assert m["aAcc"] == pytest.approx(3 / 5)
    assert m["pixels"] == 5 and m["coverage"] == 1.0


def test_absent_classes_are_nan_and_false_positives_count():
    cm = ConfusionMatrix(4)
    # class 3: never in truth nor prediction -> NaN, excluded; class 2: predicted only -> 0
    cm.update(np.array([0, 0, 1, 2]), np.array([0, 0, 1, 1]))
    m = cm.compute()
    assert m["IoU"][0] == 1.0 and m["IoU"][1] == 0.5 and m["IoU"][2] == 0.0
    assert math.isnan(m["IoU"][3])
    assert math.isnan(m["Acc"][2]) and math.isnan(m["Acc"][3])
    assert m["mIoU"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert m["mAcc"] == pytest.approx((1 + 0.5) / 2)


def test_unlabelled_prediction_is_a_miss_not_a_class():
    cm = ConfusionMatrix(2)
    cm.update(np.array([0, 255, 1, 1], np.uint8), np.array([0, 0, 1, 255], np.uint8))
    m = cm.compute()
    assert m["IoU"] == [0.5, 1.0]  # truth 0 has 2 pixels, one predicted, one unlabelled
    assert m["coverage"] == pytest.approx(2 / 3) and m["aAcc"] == pytest.approx(2 / 3)
    np.testing.assert_array_equal(cm.matrix, [[1, 0, 1], [0, 1, 0]])


def test_empty_accumulator_is_nan():
    m = ConfusionMatrix(3).compute()
    assert math.isnan(m["mIoU"]) and math.isnan(m["aAcc"]) and m["pixels"] == 0


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.int64])
def test_matches_mmseg_reference_on_random_maps(dtype):
    rng = np.random.default_rng(0)
    k = 7
    preds, labels = [], []
    cm = ConfusionMatrix(k)
    for _ in range(4):
        t = rng.integers(0, k, (33, 41))
        t[rng.random(t.shape) < 0.1] = 255
        t[t == 5] = 6  # class 5 absent from the truth
        p = rng.integers(0, k + 2, t.shape)  # some predictions out of range (no prediction)
        p[p == 4] = 3  # class 4 never predicted
        preds.append(p.astype(dtype))
        labels.append(t.astype(dtype))
        cm.update(preds[-1], labels[-1])
    ref = _mmseg_reference(preds, labels, k)
    m = cm.compute()
    np.testing.assert_allclose(m["IoU"], ref["IoU"])
    np.testing.assert_allclose(m["Acc"], ref["Acc"])
    for key in ("mIoU", "mAcc", "aAcc"):
        assert m[key] == pytest.approx(ref[key])


def test_merged_shards_equal_one_accumulator_and_serialise():
    rng = np.random.default_rng(1)
    maps = [
        (
            rng.integers(0, 5, (9, 11), dtype=np.uint8),
            rng.choice([0, 1, 2, 3, 4, 255], (9, 11)).astype(np.uint8),
        )
        for _ in range(6)
    ]
    whole = ConfusionMatrix(5)
    for p, t in maps:
        whole.update(p, t)
    shards = [ConfusionMatrix(5) for _ in range(3)]
    for i, (p, t) in enumerate(maps):
        shards[i % 3].update(p, t)
    # shipped from "workers" as JSON, then merged
    shipped = [ConfusionMatrix.from_dict(json.loads(json.dumps(s.to_dict()))) for s in shards]
    merged = shipped[0].merge(shipped[1]).merge(shipped[2])
    assert merged == whole
    assert merged.compute() == whole.compute()  # identical counts -> identical floats
    # a batch update equals per-image updates
    batch = ConfusionMatrix(5)
    batch.update(np.stack([p for p, _ in maps]), np.stack([t for _, t in maps]))
    assert batch == whole


def test_accepts_torch_tensors():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([[0, 1], [2, 2]]), torch.tensor([[0, 1], [2, 255]]))
    assert cm.compute()["IoU"] == [1.0, 1.0, 1.0]


def test_errors_name_the_problem():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=r"prediction shape \(2, 2\) != target shape \(2, 3\)"):
        cm.update(np.zeros((2, 2), np.uint8), np.zeros((2, 3), np.uint8))
    with pytest.raises(
        ValueError, match=r"target has values \[3, 7\] that are neither class ids 0..2"
    ):
        cm.update(np.zeros(4, np.uint8), np.array([0, 3, 7, 255], np.uint8))
    with pytest.raises(ValueError, match=r"target has values \[-1\]"):
        cm.update(np.zeros(2, np.int64), np.array([-1, 0]))
    with pytest.raises(ValueError, match="integer label array, got dtype float"):
        cm.update(np.zeros(2), np.zeros(2, np.uint8))
    with pytest.raises(ValueError, match="cannot merge K=4"):
        cm.merge(ConfusionMatrix(4))
    with pytest.raises(ValueError, match="ignore_index 2 collides"):
        ConfusionMatrix(3, ignore_index=2)
    with pytest.raises(ValueError, match=r"matrix shape \(2, 2\), expected \(3, 4\)"):
        ConfusionMatrix.from_dict(
            {"num_classes": 3, "ignore_index": 255, "matrix": [[0, 0], [0, 0]]}
        )
    with pytest.raises(ValueError, match="malformed"):
        ConfusionMatrix.from_dict({"matrix": []})
    assert cm.num_pixels == 0  # failed updates added nothing
