"""Per-patch labels from label maps: majority vote, ignore rules, nearest resizing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fmbseg.tasks.train.patch_labels import patch_labels, resize_nearest


def _fill(patch: np.ndarray, counts: dict[int, int]) -> None:
    flat = np.concatenate([np.full(n, v, np.uint8) for v, n in counts.items()])
    assert flat.size == patch.size
    patch[...] = flat.reshape(patch.shape)


def test_majority_and_ignore_rules_on_a_hand_made_map() -> None:
    m = np.full((28, 28), 255, np.uint8)
    m[:14, :14] = 3  # whole patch
    _fill(m[:14, 14:], {1: 100, 255: 96})  # 51% labelled: kept
    _fill(m[14:, :14], {6: 78, 255: 118})  # mostly unlabelled: ignored
    _fill(m[14:, 14:], {2: 79, 4: 69, 5: 48})  # majority 40%: below 0.5
    assert patch_labels(m, 28, 14, 0.5).tolist() == [3, 1, -1, -1]
    assert patch_labels(m, 28, 14, 0.3).tolist() == [3, 1, 6, 2]  # 40% and 39.8%
    # one threshold: below it a mostly unlabelled patch with a clear label counts too
    assert patch_labels(m, 28, 14, 0.39)[2] == 6  # 78 / 196 px
    assert patch_labels(m, 28, 14, 0.4)[2] == -1


def test_ties_go_to_the_smaller_label_and_the_threshold_counts_ignored_pixels() -> None:
    m = np.zeros((14, 14), np.uint8)
    _fill(m, {7: 98, 3: 98})
    assert patch_labels(m, 14, 14, 0.5).tolist() == [3]
    _fill(m, {9: 98, 255: 98})
    assert patch_labels(m, 14, 14, 0.5).tolist() == [9]
    _fill(m, {9: 97, 255: 99})
    assert patch_labels(m, 14, 14, 0.5).tolist() == [-1]
    assert patch_labels(m, 14, 14, 0.0).tolist() == [9]
    m[:] = 255
    assert patch_labels(m, 14, 14, 0.0).tolist() == [-1]  # nothing labelled: always ignored


def test_resized_quadrants_and_row_major_order() -> None:
    m = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 255, 255], [2, 2, 255, 255]], np.uint8)
    assert patch_labels(m, 28, 14, 0.5).tolist() == [0, 1, 2, -1]
    # a non-square map is squashed to the square input, as the image is
    wide = np.repeat(m, 3, axis=1)  # 4 x 12
    want = [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, -1, -1], [2, 2, -1, -1]]
    assert patch_labels(wide, 56, 14, 0.5).reshape(4, 4).tolist() == want


def test_resize_nearest_matches_torch_nearest_exact() -> None:
    rng = np.random.default_rng(0)
    for h, w, s in ((6, 9, 28), (50, 31, 14), (100, 100, 42), (13, 200, 56)):
        m = rng.integers(0, 256, (h, w), dtype=np.uint8)
        want = (
            F.interpolate(
                torch.from_numpy(m)[None, None].float(), size=(s, s), mode="nearest-exact"
            )[0, 0]
            .numpy()
            .astype(np.uint8)
        )
        np.testing.assert_array_equal(resize_nearest(m, s), want)


def test_patch_labels_agree_with_a_per_patch_loop() -> None:
    rng = np.random.default_rng(1)
    m = rng.choice(np.array([0, 1, 2, 255], np.uint8), size=(37, 53), p=[0.4, 0.2, 0.1, 0.3])
    got = patch_labels(m, 42, 14, 0.4)
    r = resize_nearest(m, 42)
    for i in range(3):
        for j in range(3):
            px = r[i * 14 : (i + 1) * 14, j * 14 : (j + 1) * 14].ravel()
            counts = np.bincount(px, minlength=256)
            best = int(counts[:255].argmax())
            ok = counts[255] * 2 <= 196 and counts[best] >= 0.4 * 196
            assert got[i * 3 + j] == (best if ok else -1)


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="uint8"):
        patch_labels(np.zeros((4, 4), np.int32), 28, 14, 0.5)
    with pytest.raises(ValueError, match="not a multiple of the patch size 14"):
        patch_labels(np.zeros((4, 4), np.uint8), 30, 14, 0.5)
