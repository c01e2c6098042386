"""clip_dense core: geometry, batching across images, stitching, presence, stored rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fmbseg.tasks.annotate.clip_dense as cd
import fmbseg.tasks.annotate.windows as wd
from fmbseg.config import ClipDenseConfig
from tests.helpers.synthetic import VOCAB, ColourClip, make_scene

torch.set_num_threads(1)
CFG = ClipDenseConfig(short_side=64, min_crops=1, batch_size=5, precision="fp32")


@pytest.mark.parametrize(
    ("h", "w", "short", "mult", "expected"),
    [
        (48, 80, 64, 8, (64, 104)),  # 106.7 -> 104
        (80, 48, 64, 8, (104, 64)),
        (480, 640, 1008, 14, (1008, 1344)),
        (3, 500, 16, 8, (16, 2664)),
    ],
)
def test_resize_short_side_rounds_both_sides_to_the_multiple(h, w, short, mult, expected):
    assert wd.resize_short_side(h, w, short, mult) == expected


def test_resize_short_side_rejects_empty_images():
    with pytest.raises(ValueError, match="0x5"):
        wd.resize_short_side(0, 5, 64, 8)


@pytest.mark.parametrize(
    ("h", "w", "crop", "stride"),
    [
        (64, 104, 32, 24),
        (32, 32, 32, 24),
        (20, 100, 32, 8),
        (1008, 1344, 336, 224),
        (97, 45, 10, 10),
    ],
)
def test_plan_windows_cover_everything_and_end_flush(h, w, crop, stride):
    windows = wd.plan_windows(h, w, crop, stride)
    assert windows == wd.plan_windows(h, w, crop, stride)  # deterministic
    covered = np.zeros((max(h, crop), max(w, crop)), dtype=int)
    for y, x in windows:
        covered[y : y + crop, x : x + crop] += 1
    assert covered[:h, :w].min() >= 1
    assert len(set(windows)) == len(windows)
    assert max(y for y, _ in windows) == max(0, h - crop)  # last window flush with the edge
    assert max(x for _, x in windows) == max(0, w - crop)
    assert all(y >= 0 and x >= 0 for y, x in windows)


def test_plan_windows_rejects_gapping_stride():
    with pytest.raises(ValueError, match="stride must be in"):
        wd.plan_windows(100, 100, 32, 40)


def test_window_offsets_land_on_the_patch_grid():
    pre = ColourClip().preprocess
    for h, w in [(48, 80), (37, 91), (200, 33)]:
        geo = cd.geometry(h, w, CFG, pre)
        assert geo.resized_h % 8 == 0 and geo.resized_w % 8 == 0
        assert all(y % 8 == 0 and x % 8 == 0 for y, x in geo.windows)
        assert geo.cell_h * geo.grid_h == pytest.approx(h)
        assert geo.cell_w * geo.grid_w == pytest.approx(w)


def _full_map(clip: ColourClip, image: np.ndarray) -> torch.Tensor:
    geo = cd.geometry(image.shape[0], image.shape[1], CFG, clip.preprocess)
    canvas = cd.prepare_image(image, geo, clip.preprocess)
    return clip.dense_features(canvas[None])[0][:, : geo.grid_h, : geo.grid_w]


def test_stitched_map_of_a_translation_equivariant_model_equals_its_full_image_map():
    clip = ColourClip()
    scenes = [make_scene(s, 48, 80 + 8 * s) for s in range(3)]
    out = list(cd.run_dense(clip, [(s.image_id, s.image) for s in scenes], CFG))
    assert [d.key for d in out] == [s.image_id for s in scenes]
    for dense, scene in zip(out, scenes, strict=True):
        full = _full_map(clip, scene.image)
        assert dense.features.shape == full.shape
        torch.testing.assert_close(dense.features, full, atol=1e-5, rtol=1e-5)
        assert dense.crop_cls.shape == (len(dense.geometry.windows), clip.embed_dim)


def test_crops_of_several_images_share_forward_passes_and_batch_size_does_not_matter():
    scenes = [make_scene(s) for s in range(3)]  # 12 crops each
    results = {}
    for bs in (5, 12, 64):
        clip = ColourClip()
        cfg = ClipDenseConfig(short_side=64, min_crops=1, batch_size=bs)
        results[bs] = list(cd.run_dense(clip, [(s.image_id, s.image) for s in scenes], cfg))
        assert clip.crops_seen == 36
        assert clip.dense_calls == -(-36 // bs)  # batches span images
    for bs in (12, 64):
        for a, b in zip(results[5], results[bs], strict=True):
            torch.testing.assert_close(a.features, b.features)
            torch.testing.assert_close(a.crop_cls, b.crop_cls)


def test_images_smaller_than_a_crop_are_padded_and_still_work():
    clip = ColourClip()
    tiny = make_scene(1, 9, 14).image
    cfg = ClipDenseConfig(short_side=16, min_crops=1, batch_size=4)
    (dense,) = cd.run_dense(clip, [("t", tiny)], cfg)
    assert dense.geometry.windows == ((0, 0),)
    assert dense.features.shape == (clip.embed_dim, 2, 3)  # 16x24 px -> 2x3 cells of 8 px
    assert torch.isfinite(dense.features).all()
    text = clip.encode_text(list(VOCAB))
    res = cd.summarise(dense, text, 1, "t", "mem://t")
    assert res.sims.shape == (len(res.present), 2, 3) and len(res.present) == 1


def _dense_with_winners(winners: list[int], dim: int, k: int) -> tuple[cd.DenseImage, torch.Tensor]:
    text = torch.eye(k, dim)
    cls = torch.stack([text[w] * 0.9 + 0.01 for w in winners])
    cls = torch.nn.functional.normalize(cls, dim=1)
    geo = cd.Geometry(8, 8, 8, 8, 8, 4, tuple((0, 0) for _ in winners))
    return cd.DenseImage("img", geo, torch.randn(dim, 2, 2), cls), text


def test_presence_votes_and_min_crops():
    dense, text = _dense_with_winners([0, 0, 2, 1, 0, 2], dim=8, k=4)
    one = cd.summarise(dense, text, 1, "img", "u")
    two = cd.summarise(dense, text, 2, "img", "u")
    three = cd.summarise(dense, text, 3, "img", "u")
    assert one.votes.tolist() == [3, 1, 2, 0]
    assert one.present.tolist() == [0, 1, 2]
    assert two.present.tolist() == [0, 2]  # class 1 won a single crop: not present at 2
    assert three.present.tolist() == [0]
    assert two.sims.shape == (2, 2, 2)
    # the maps are cosine similarities with the present classes' embeddings, in id order
    feats = torch.nn.functional.normalize(dense.features, dim=0)
    np.testing.assert_allclose(two.sims[1], feats[2].numpy(), atol=1e-6)


def test_no_class_present_gives_empty_maps():
    dense, text = _dense_with_winners([1], dim=8, k=3)
    res = cd.summarise(dense, text, 2, "img", "u")
    assert res.present.size == 0 and res.sims.shape == (0, 2, 2)
    back = cd.result_from_row(cd.result_row(res, "fp"))
    assert back.present.size == 0 and back.grid_w == 2


def test_rows_round_trip_through_arrow_as_float16():
    clip = ColourClip()
    scene = make_scene(3)
    (dense,) = cd.run_dense(clip, [(scene.image_id, scene.image)], CFG)
    res = cd.summarise(dense, clip.encode_text(list(VOCAB)), 1, scene.image_id, "file:///x.png")
    table = cd.results_table([cd.result_row(res, "abc")])
    assert table.schema.equals(cd.CLIP_DENSE_SCHEMA)
    back = cd.result_from_row(table.to_pylist()[0])
    np.testing.assert_allclose(back.sims, res.sims, atol=2e-3)  # float16 storage
    assert back.present.tolist() == res.present.tolist()
    assert back.votes.tolist() == res.votes.tolist()
    assert (back.height, back.width, back.cell_w) == (48, 80, res.cell_w)


def test_corrupt_row_names_the_image():
    res = cd.ClipDenseResult(
        "im7",
        "u",
        8,
        8,
        1,
        np.zeros(2, np.int32),
        np.array([0], np.int32),
        np.zeros((1, 2, 2), np.float32),
    )
    row = cd.result_row(res, "fp")
    row["sims"] = row["sims"][:-2]
    with pytest.raises(ValueError, match="im7"):
        cd.result_from_row(row)


def test_read_ahead_keeps_order_and_hands_back_failures():
    import time

    from fmbseg.tasks.annotate.common import ReadAhead

    def load(uri: str) -> np.ndarray:
        i = int(uri)
        time.sleep(0.002 * (7 - i))  # later items finish first
        if i == 3:
            raise FileNotFoundError(f"image {i}")
        return np.full((1, 1, 3), i, np.uint8)

    out = list(ReadAhead(load, None, ahead=3).each(list(range(7)), str))
    assert [item for item, _, _ in out] == list(range(7))
    assert [int(img[0, 0, 0]) for i, img, _ in out if i != 3] == [0, 1, 2, 4, 5, 6]
    assert isinstance(out[3][2], FileNotFoundError) and out[3][1] is None
