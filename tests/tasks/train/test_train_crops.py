"""Training geometry: short side resized to the input size, square crops, labels cut alike."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import fmbseg.tasks.train.features as feat
from fmbseg.config import replace
from fmbseg.models.align import AlignmentConfig, AlignmentModule
from fmbseg.segment import OpenVocabSegmenter
from fmbseg.storage.fingerprint import fingerprint
from fmbseg.storage.records import MaskRecords
from fmbseg.tasks.train.crops import CropBox, crop_boxes, crop_inputs, resized_short_side
from fmbseg.tasks.train.data import EpochOrder, PatchDataset, labelled_images
from fmbseg.tasks.train.patch_labels import crop_patch_labels, majority_labels
from fmbseg.tasks.train.stages import feature_runs, train_run
from tests.helpers.synthetic import PALETTE, VOCAB, ColourClip, Scene, decode_classes
from tests.helpers.world import ColourDino, records_for
from tests.tasks.train.conftest import tiny_config

S, P = 56, 14  # tiny input size, DINOv2 patch


def square_scene(height: int, width: int, top: int, left: int, side: int, name: str) -> Scene:
    """Plain grass with one ``side x side`` square of class ``name`` (no texture)."""
    truth = np.full((height, width), VOCAB.index("grass"), np.uint8)
    truth[top : top + side, left : left + side] = VOCAB.index(name)
    colours = np.array(list(PALETTE.values()), np.uint8)
    return Scene(colours[truth], truth, f"square-{height}x{width}")


def pixels(x: torch.Tensor, pre) -> np.ndarray:
    """``(3, h, w)`` normalised input -> ``h x w x 3`` RGB in [0, 255]."""
    mean = torch.tensor(pre.mean).view(3, 1, 1)
    std = torch.tensor(pre.std).view(3, 1, 1)
    return ((x * std + mean) * 255).permute(1, 2, 0).numpy()


def extent(classes: np.ndarray, k: int) -> tuple[int, int, bool]:
    """(height, width) of class ``k``'s bounding box and whether it touches the border."""
    rows, cols = np.nonzero(classes == k)
    h, w = classes.shape
    inner = rows.min() > 0 and cols.min() > 0 and rows.max() < h - 1 and cols.max() < w - 1
    return int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1), bool(inner)


def dataset_for(scene: Scene, tmp_path: Path, crops: int = 2) -> tuple[PatchDataset, ColourDino]:
    path = tmp_path / f"{scene.image_id}.png"
    Image.fromarray(scene.image).save(path)
    table = MaskRecords.from_rows(records_for(scene, str(path))).table
    data = labelled_images(table, list(VOCAB), S, P, 0.5, crops_per_image=crops)
    enc = ColourDino(input_size=S)
    return PatchDataset(data, cache=None, preprocess=enc.preprocess, input_size=S), enc


def test_crop_boxes_resize_the_short_side_and_spread_over_the_long_one() -> None:
    assert resized_short_side(480, 640, 448) == (448, 597)  # COCO landscape
    assert resized_short_side(640, 480, 448) == (597, 448)
    assert resized_short_side(48, 80, 56) == (56, 93)
    assert resized_short_side(100, 100, 56) == (56, 56)
    boxes = crop_boxes("img", 480, 640, 448, 2)
    assert [(b.resized_h, b.resized_w, b.y0) for b in boxes] == [(448, 597, 0)] * 2
    # slot j's offset lies in the j-th half of the 0..149 free columns
    assert 0 <= boxes[0].x0 < 75 <= boxes[1].x0 <= 149
    assert crop_boxes("img", 480, 640, 448, 2) == boxes  # a function of the image alone
    tall = crop_boxes("img", 640, 480, 448, 3)
    assert [b.x0 for b in tall] == [0, 0, 0] and tall[0].y0 < 50 <= tall[1].y0 < 100 <= tall[2].y0
    assert len(crop_boxes("img", 100, 100, 56, 4)) == 1  # square: one distinct crop
    others = {crop_boxes(f"img{i}", 480, 640, 448, 1)[0].x0 for i in range(20)}
    assert len(others) > 10 and max(others) <= 149  # random per image, within the image
    with pytest.raises(ValueError, match="crops_per_image must be >= 1"):
        crop_boxes("img", 10, 10, 56, 0)


def test_a_square_object_stays_square_in_training_and_in_segment(tmp_path: Path) -> None:
    # A 60x120 image (1:2) with a 12x12 square. Squashing it to 56x56 (the old training
    # input) made the square 10 px tall and 4 px wide; resizing the short side keeps it square.
    scene = square_scene(60, 120, top=24, left=54, side=12, name="car")
    car = VOCAB.index("car")
    dataset, enc = dataset_for(scene, tmp_path)
    seen = []
    for j in dataset.slots()[0]:
        x, y = dataset[(0, j)]
        assert x.shape == (3, S, S) and y.shape == ((S // P) ** 2,)
        classes = decode_classes(pixels(x, enc.preprocess))
        h, w, inner = extent(classes, car)
        if inner:
            seen.append((h, w))
        # the labels are the majority classes of the very pixels of this crop
        want = majority_labels(np.where(classes < 0, 255, classes).astype(np.uint8), P, 0.5)
        assert y.tolist() == want.tolist()
    assert seen and all(abs(h - w) <= 1 and 10 <= h <= 13 for h, w in seen), seen

    # segment's input: record the windows the encoder sees
    windows = []
    real = enc.patch_features

    def record(images: torch.Tensor) -> torch.Tensor:
        windows.extend(images)
        return real(images)

    enc.patch_features = record  # type: ignore[method-assign]
    torch.manual_seed(0)
    module = AlignmentModule(AlignmentConfig(in_dim=enc.embed_dim, out_dim=24, heads=2))
    card = {"encoder": {"input_size": S}, "text": {"templates": ["a photo of a {}."]}}
    seg = OpenVocabSegmenter(module, enc, ColourClip(embed_dim=24), card, torch.device("cpu"))
    assert seg.similarities(scene.image, list(VOCAB)).shape == (len(VOCAB), 60, 120)
    assert len(windows) == 3 and all(w.shape == (3, S, S) for w in windows)  # 56x112, stride 28
    in_segment = [extent(decode_classes(pixels(w, enc.preprocess)), car) for w in windows]
    in_segment = [(h, w) for h, w, inner in in_segment if inner]
    assert in_segment and all(
        (h, w) in seen or (h - 1, w - 1) in seen or (h + 1, w + 1) in seen for h, w in in_segment
    ), (in_segment, seen)


def test_crop_labels_are_the_resized_map_cut_like_the_image() -> None:
    rng = np.random.default_rng(0)
    m = rng.choice(np.array([0, 1, 2, 255], np.uint8), size=(37, 90), p=[0.4, 0.3, 0.1, 0.2])
    for box in crop_boxes("m", 37, 90, S, 3):
        resized = F.interpolate(
            torch.from_numpy(m)[None, None].float(),
            size=(box.resized_h, box.resized_w),
            mode="nearest-exact",
        )[0, 0].numpy()
        crop = resized[box.y0 : box.y0 + S, box.x0 : box.x0 + S].astype(np.uint8)
        got = crop_patch_labels(m, box, S, P, 0.4)
        np.testing.assert_array_equal(got, majority_labels(crop, P, 0.4))


def test_crops_cover_different_regions_across_epochs_and_seeds(tmp_path: Path) -> None:
    scene = square_scene(48, 80, top=10, left=20, side=30, name="dog")
    dataset, enc = dataset_for(scene, tmp_path)
    boxes = [dataset.data.box(0, j) for j in dataset.slots()[0]]
    assert len(boxes) == 2 and boxes[0].x0 < boxes[1].x0  # two different regions

    def shown(seed: int, epochs: int = 6) -> list[int]:
        order = EpochOrder([[0, 1, 2, 3, 4, 5]], seed, [dataset.slots()[0]] * 6)
        out = []
        for e in range(epochs):
            order.set_epoch(e)
            out.append([slot for _, slot in sorted(order)])
        return out

    a = shown(0)
    for e in range(5):  # each image alternates between its crops from epoch to epoch
        assert all(s != t for s, t in zip(a[e], a[e + 1], strict=True))
    assert any(shown(seed) != a for seed in (1, 2, 3))  # another seed, another schedule
    # and the inputs differ with the crop: the same image shows another region
    x0, _ = dataset[(0, 0)]
    x1, _ = dataset[(0, 1)]
    shift = boxes[1].x0 - boxes[0].x0
    torch.testing.assert_close(x0[:, :, shift:], x1[:, :, : S - shift])
    assert not torch.equal(x0, x1)


def test_fingerprints_change_with_the_training_geometry() -> None:
    def features_fp(cfg):
        (job,) = feature_runs(train_run(None, cfg, [("labels", "idx")], VOCAB))
        return job.fp(feat.STAGE)

    cfg = tiny_config()
    one = replace(cfg, train={"crops_per_image": 1})
    new = features_fp(cfg)
    parts = {"encoder": "dinov2_tiny", "weights": None, "input_size": 56}
    old = fingerprint(feat.STAGE, "1", parts, {"index": "idx"})  # the squashing stage's (v1)
    assert new == fingerprint(feat.STAGE, "2", {**parts, "crops_per_image": 2}, {"index": "idx"})
    assert new != old and new != features_fp(one)
    two = train_run(None, cfg, [("labels", "idx")], VOCAB).fp("train")
    assert train_run(None, one, [("labels", "idx")], VOCAB).fp("train") != two


def test_an_image_that_changed_size_since_labelling_is_an_error(tmp_path: Path) -> None:
    scene = square_scene(48, 80, top=10, left=20, side=30, name="dog")
    dataset, _ = dataset_for(scene, tmp_path)
    Image.fromarray(np.zeros((48, 120, 3), np.uint8)).save(tmp_path / f"{scene.image_id}.png")
    with pytest.raises(ValueError, match="differs from the size its pseudo-labels record"):
        dataset[(0, 1)]


def test_cache_check_names_a_mismatched_box(tmp_path: Path) -> None:
    scene = square_scene(48, 80, top=10, left=20, side=30, name="dog")
    dataset, enc = dataset_for(scene, tmp_path)

    class Cache:
        def box(self, image_id: str, crop: int) -> CropBox:
            return CropBox(56, 93, 0, 0 if crop else 5)

        def get(self, image_id: str, crop: int) -> np.ndarray:
            return np.zeros((16, enc.embed_dim), np.float16)

    dataset.cache = Cache()  # type: ignore[assignment]
    with pytest.raises(ValueError, match=r"image 'square-48x80': its crop 0 is CropBox"):
        dataset[(0, 0)]


def test_crop_inputs_are_the_resized_image_cut() -> None:
    scene = square_scene(30, 50, top=5, left=5, side=10, name="boat")
    enc = ColourDino(input_size=S)
    boxes = crop_boxes(scene.image_id, 30, 50, S, 2)
    x = crop_inputs(scene.image, boxes, enc.preprocess, S)
    t = torch.from_numpy(scene.image).permute(2, 0, 1)[None].float()
    full = F.interpolate(t, size=(56, 93), mode="bilinear", align_corners=False)[0] / 255.0
    mean = torch.tensor(enc.preprocess.mean).view(3, 1, 1)
    std = torch.tensor(enc.preprocess.std).view(3, 1, 1)
    for j, b in enumerate(boxes):
        want = ((full - mean) / std)[:, :, b.x0 : b.x0 + S]
        torch.testing.assert_close(x[j], want)
