"""sam_prompt core: top cells -> (x, y) points in original pixels -> best SAM mask per class."""

from __future__ import annotations

import numpy as np
import pytest

from fmbseg.config import SamPromptConfig
from fmbseg.storage.records import decode_mask
from fmbseg.tasks.annotate.clip_dense import ClipDenseResult
from fmbseg.tasks.annotate.sam_prompt import prompt_job, prompt_points, top_cells
from tests.helpers.synthetic import predict_each


def test_top_cells_are_descending_with_row_major_ties():
    sim = np.array([[0.1, 0.9, 0.5], [0.9, 0.2, 0.5]])
    assert top_cells(sim, 4).tolist() == [[0, 1], [1, 0], [0, 2], [1, 2]]
    assert len(top_cells(sim, 50)) == 6  # more points than cells: all cells


def test_points_are_x_y_patch_centres_in_original_pixels():
    # 3 rows x 5 cols grid over a 30 x 100 image: cells are 10 px tall, 20 px wide.
    sim = np.zeros((3, 5), np.float32)
    sim[1, 4] = 1.0  # row 1, column 4
    sim[2, 0] = 0.5
    pts = prompt_points(sim, 2, cell_h=10.0, cell_w=20.0)
    assert pts.dtype == np.float32
    # (x, y): x runs along columns. A swap would give (15, 90).
    np.testing.assert_allclose(pts, [[90.0, 15.0], [10.0, 25.0]])


class RecordingSam:
    """Returns 3 masks: the rows of the first point's row (IoU 0.9) and two worse ones."""

    def __init__(self, height: int, width: int) -> None:
        self.shape = (height, width)
        self.calls: list[tuple[np.ndarray, np.ndarray, bool]] = []
        self.images = 0

    def set_image(self, image: np.ndarray) -> None:
        self.images += 1

    def predict(self, points, labels, multimask=True):
        self.calls.append((points, labels, multimask))
        h, w = self.shape
        good = np.zeros((h, w), bool)
        good[int(points[0, 1])] = True  # the row of the first point
        empty = np.zeros((h, w), bool)
        full = np.ones((h, w), bool)
        return np.stack([full, good, empty]), np.array([0.5, 0.9, 0.1], np.float32)

    def predict_batch(self, points, labels, multimask=True):
        return predict_each(self, points, labels, multimask)

    def generate(self, image):  # pragma: no cover - not used here
        raise AssertionError


def _clip(present: list[int], height: int = 30, width: int = 100) -> ClipDenseResult:
    sims = np.zeros((len(present), 3, 5), np.float32)
    for j in range(len(present)):
        sims[j, j % 3, (2 * j) % 5] = 1.0
    return ClipDenseResult(
        "img-1",
        "file:///img-1.png",
        height,
        width,
        4,
        np.array([2, 0, 2, 1], np.int32),
        np.array(present, np.int32),
        sims,
    )


def test_one_record_per_present_class_keeping_the_highest_iou_mask():
    sam = RecordingSam(30, 100)
    clip = _clip([0, 2])
    rows = prompt_job(
        sam,
        np.zeros((30, 100, 3), np.uint8),
        clip,
        ["a", "b", "c", "d"],
        SamPromptConfig(num_points=3),
        fingerprint="fp-p",
    )()
    assert sam.images == 1  # the image is embedded once for all classes
    assert [r["category_id"] for r in rows] == [0, 2]
    assert [r["category"] for r in rows] == ["a", "c"]
    assert all(r["source"] == "prompt" and r["fingerprint"] == "fp-p" for r in rows)
    assert [r["score"] for r in rows] == pytest.approx([0.9, 0.9])
    for (points, labels, multimask), row in zip(sam.calls, rows, strict=True):
        assert points.shape == (3, 2) and labels.tolist() == [1, 1, 1] and multimask
        mask = decode_mask(row["rle_counts"], 30, 100)
        assert mask[int(points[0, 1])].all() and mask.sum() == 100  # the "good" mask
    # class 2's top cell is (row 1, col 2): first point at x = 50, y = 15
    np.testing.assert_allclose(sam.calls[1][0][0], [50.0, 15.0])


def test_multimask_flag_and_point_count_come_from_config():
    sam = RecordingSam(30, 100)
    prompt_job(
        sam,
        np.zeros((30, 100, 3), np.uint8),
        _clip([1]),
        ["a", "b"],
        SamPromptConfig(num_points=1, multimask=False),
        fingerprint="f",
    )()
    ((points, _, multimask),) = sam.calls
    assert points.shape == (1, 2) and multimask is False


def test_no_present_class_means_no_sam_call_and_no_records():
    sam = RecordingSam(30, 100)
    rows = prompt_job(
        sam, np.zeros((30, 100, 3), np.uint8), _clip([]), ["a"], SamPromptConfig(), fingerprint="f"
    )()
    assert rows == [] and sam.images == 0 and sam.calls == []


def test_image_size_mismatch_is_an_error_naming_the_image():
    with pytest.raises(ValueError, match="img-1"):
        prompt_job(
            RecordingSam(30, 100),
            np.zeros((31, 100, 3), np.uint8),
            _clip([0]),
            ["a"],
            SamPromptConfig(),
            fingerprint="f",
        )()
