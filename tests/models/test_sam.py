"""SAM adapter: (x, y) prompts at original size, and automatic masks filtered by the config."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor
from skimage.measure import label

from fmbseg.config import SamAutoConfig
from fmbseg.models import build_model
from fmbseg.models.base import Segmenter
from fmbseg.models.sam import SamSegmenter
from fmbseg.models.weights import CheckpointMismatchError, WeightsNotFoundError

torch.set_num_threads(1)

# Everything off, so that each test turns on only the filter it checks. NMS at 1.0 keeps
# every mask, so a filtered run returns exactly a subset of the unfiltered one.
NO_FILTERS = SamAutoConfig(
    points_per_side=6,
    points_per_batch=36,
    pred_iou_thresh=0.0,
    stability_score_thresh=0.0,
    box_nms_thresh=1.0,
    min_mask_region_area=0,
    max_area_fraction=1.0,
    crop_n_layers=0,
)


@pytest.fixture(scope="module")
def sam() -> SamSegmenter:
    return build_model("sam_tiny", None, "cpu", auto_config=NO_FILTERS)


def _key(record: dict) -> tuple:
    return (
        record["area"],
        tuple(record["bbox"]),
        round(record["predicted_iou"], 6),
        record["segmentation"].tobytes(),
    )


def _generate(sam: SamSegmenter, image: np.ndarray, **changes: object) -> list[dict]:
    return SamSegmenter(sam.sam, "sam_tiny", dataclasses.replace(NO_FILTERS, **changes)).generate(
        image
    )


def test_predict_returns_masks_at_original_size(sam: SamSegmenter, image: np.ndarray) -> None:
    assert isinstance(sam, Segmenter)
    sam.set_image(image)
    masks, scores = sam.predict(np.array([[70.5, 20.5]]), np.array([1]))
    assert masks.shape == (3, 64, 96) and masks.dtype == bool
    assert scores.shape == (3,) and scores.dtype == np.float32
    masks, scores = sam.predict(
        np.array([[70.5, 20.5], [60.0, 30.0]]), np.array([1, 1]), multimask=False
    )
    assert masks.shape == (1, 64, 96) and scores.shape == (1,)


def test_predict_points_are_xy_like_sam_predictor(sam: SamSegmenter, image: np.ndarray) -> None:
    sam.set_image(image)
    points = np.array([[70.5, 20.5], [30.5, 50.5]], dtype=np.float32)  # (x, y), corner origin
    labels = np.array([1, 0])
    masks, scores = sam.predict(points, labels)
    direct = SamPredictor(sam.sam)
    direct.set_image(image)
    # SAM takes pixel indices (it adds 0.5 itself): the centre of pixel (70, 20) is (70, 20).
    ref_masks, ref_scores, _ = direct.predict(point_coords=points - 0.5, point_labels=labels)
    np.testing.assert_array_equal(masks, ref_masks)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-6)
    swapped, swapped_scores, _ = direct.predict(
        point_coords=points[:, ::-1] - 0.5, point_labels=labels
    )
    assert not np.array_equal(masks, swapped) or not np.allclose(scores, swapped_scores)


@pytest.mark.parametrize("multimask", [True, False])
def test_predict_batch_equals_predict_per_prompt(
    sam: SamSegmenter, image: np.ndarray, multimask: bool
) -> None:
    sam.set_image(image)
    rng = np.random.default_rng(4)
    points = rng.uniform([0, 0], [96, 64], size=(4, 5, 2)).astype(np.float32)  # (x, y)
    labels = np.ones((4, 5), dtype=np.int64)
    labels[1, 2] = 0
    masks, scores = sam.predict_batch(points, labels, multimask=multimask)
    m = 3 if multimask else 1
    assert masks.shape == (4, m, 64, 96) and masks.dtype == bool
    assert scores.shape == (4, m) and scores.dtype == np.float32
    for b in range(4):
        one, one_scores = sam.predict(points[b], labels[b], multimask=multimask)
        np.testing.assert_allclose(scores[b], one_scores, atol=1e-5)
        # batched matmuls may round differently: a pixel on the 0-logit edge may flip
        assert (masks[b] != one).mean() < 1e-3
    with pytest.raises(ValueError, match=r"points must be \(B, P, 2\) with B, P >= 1"):
        sam.predict_batch(points[0], labels[0])
    with pytest.raises(ValueError, match=r"labels must be \(4, 5\), got \(4, 4\)"):
        sam.predict_batch(points, labels[:, :4])


def test_predict_validates_inputs(image: np.ndarray) -> None:
    fresh = build_model("sam_tiny", None)
    with pytest.raises(RuntimeError, match="set_image"):
        fresh.predict(np.array([[1.0, 1.0]]), np.array([1]))
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        fresh.set_image(image.astype(np.float32))
    fresh.set_image(image)
    with pytest.raises(ValueError, match=r"points must be \(P, 2\)"):
        fresh.predict(np.array([1.0, 2.0]), np.array([1]))
    with pytest.raises(ValueError, match=r"labels must be \(2,\)"):
        fresh.predict(np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([1]))


def test_generate_records(sam: SamSegmenter, image: np.ndarray) -> None:
    records = sam.generate(image)
    assert len(records) > 5
    for r in records:
        assert r["segmentation"].shape == (64, 96) and r["segmentation"].dtype == bool
        assert r["area"] == int(r["segmentation"].sum())
        x, y, w, h = r["bbox"]
        ys, xs = np.nonzero(r["segmentation"])
        assert (x, y, w, h) == (xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min())


def test_generate_after_set_image_of_the_same_array_embeds_it_once(image: np.ndarray) -> None:
    """Prompts then automatic masks of one image: one image-encoder pass, same records."""
    seg = build_model("sam_tiny", None, "cpu", auto_config=NO_FILTERS)
    alone = [_key(r) for r in seg.generate(image)]
    encodes: list[tuple] = []
    hook = seg.sam.image_encoder.register_forward_hook(lambda m, a, o: encodes.append(o.shape))
    try:
        seg.set_image(image)
        seg.predict(np.array([[60.0, 20.0]]), np.array([1]))
        shared = [_key(r) for r in seg.generate(image)]
        assert len(encodes) == 1 and shared == alone
        with pytest.raises(RuntimeError, match="call set_image"):  # generate leaves none set
            seg.predict(np.array([[60.0, 20.0]]), np.array([1]))
        seg.set_image(image)
        copy = image.copy()  # equal pixels, another array: embedded again
        assert [_key(r) for r in seg.generate(copy)] == alone and len(encodes) == 3
        assert [_key(r) for r in seg.generate(image)] == alone and len(encodes) == 4
    finally:
        hook.remove()


def test_generate_drops_masks_above_max_area_fraction(sam: SamSegmenter, image: np.ndarray) -> None:
    everything = sam.generate(image)
    fraction = float(np.median([r["area"] for r in everything])) / image[..., 0].size
    kept = _generate(sam, image, max_area_fraction=fraction)
    expected = [r for r in everything if r["area"] <= fraction * image[..., 0].size]
    assert 0 < len(kept) < len(everything)
    assert sorted(map(_key, kept)) == sorted(map(_key, expected))


@pytest.mark.parametrize(
    "field,record_key",
    [("stability_score_thresh", "stability_score"), ("pred_iou_thresh", "predicted_iou")],
)
def test_generate_applies_score_thresholds(
    field: str, record_key: str, sam: SamSegmenter, image: np.ndarray
) -> None:
    everything = sam.generate(image)
    values = sorted(r[record_key] for r in everything)
    positive = [v for v in values if v > 0]  # SAM disables a threshold of 0
    assert len(positive) > 4, f"tiny SAM produced too few positive {record_key}: {values}"
    thresh = (positive[len(positive) // 2] + positive[len(positive) // 2 - 1]) / 2
    kept = _generate(sam, image, **{field: thresh})
    assert 0 < len(kept) < len(everything)
    assert all(r[record_key] > thresh for r in kept)
    expected = [r for r in everything if r[record_key] > thresh]
    assert sorted(map(_key, kept)) == sorted(map(_key, expected))


def test_generate_removes_small_regions_with_cv2(sam: SamSegmenter, image: np.ndarray) -> None:
    def regions(mask: np.ndarray) -> list[int]:  # 8-connected component sizes, as SAM's cv2
        return [int(n) for n in np.bincount(label(mask, connectivity=2).ravel())[1:]]

    raw = sam.generate(image)
    assert min(min(regions(r["segmentation"]) + regions(~r["segmentation"])) for r in raw) < 12
    cleaned = _generate(sam, image, min_mask_region_area=12)
    assert cleaned
    for r in cleaned:
        m = r["segmentation"]
        assert min(regions(~m), default=12) >= 12  # small holes filled
        islands = regions(m)
        assert len(islands) == 1 or min(islands) >= 12  # small islands removed (largest kept)


def test_checkpoint_loads_and_mismatch_is_named(
    tmp_path: Path, sam: SamSegmenter, image: np.ndarray
) -> None:
    path = tmp_path / "sam_tiny.pth"
    torch.save(sam.sam.state_dict(), path)
    loaded = build_model("sam_tiny", str(path), seed=7, auto_config=NO_FILTERS)
    random_other = build_model("sam_tiny", None, seed=7)
    for p, q in zip(loaded.sam.parameters(), sam.sam.parameters(), strict=True):
        assert torch.equal(p, q)
    assert any(
        not torch.equal(p, q)
        for p, q in zip(random_other.sam.parameters(), sam.sam.parameters(), strict=True)
    )
    sd = sam.sam.state_dict()
    sd["mask_decoder.extra.weight"] = torch.zeros(1)
    sd["image_encoder.neck.0.weight"] = torch.zeros(3, 3)
    torch.save(sd, path)
    with pytest.raises(CheckpointMismatchError) as info:
        build_model("sam_tiny", str(path))
    msg = str(info.value)
    assert "unexpected keys: mask_decoder.extra.weight" in msg
    assert "image_encoder.neck.0.weight (3, 3) vs model (32, 32, 1, 1)" in msg


def test_missing_real_checkpoint_says_how_to_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WeightsNotFoundError) as info:
        build_model("sam_vit_h", "sam_vit_h_4b8939.pth", cache_dir=str(tmp_path / "cache"))
    msg = str(info.value)
    assert str(tmp_path / "sam_vit_h_4b8939.pth") in msg
    assert str(tmp_path / "cache" / "sam_vit_h_4b8939.pth") in msg
    assert (
        "set models.sam_weights to a local path or a store URI "
        "(e.g. --set models.sam_weights=s3://bucket/sam_vit_h_4b8939.pth)"
    ) in msg


@pytest.mark.parametrize(
    "changes",
    [
        # 2 point batches, small-region removal (holes and islands change masks, then NMS)
        {"points_per_batch": 8, "min_mask_region_area": 20},
        # every filter of METHOD 1.2 at work: IoU, stability, NMS, small regions; the flipped
        # image's last point batch keeps no mask
        {
            "points_per_batch": 5,
            "pred_iou_thresh": 0.34,
            "stability_score_thresh": 0.1,
            "box_nms_thresh": 0.99,
            "min_mask_region_area": 30,
        },
        # SAM's labelling crop layers: 1 + 4 crops, a 3x3 grid in each crop, cross-crop NMS
        {"points_per_batch": 16, "crop_n_layers": 1, "crop_n_points_downscale_factor": 2},
    ],
)
def test_binary_mask_generator_equals_the_stock_generator(
    sam: SamSegmenter, image: np.ndarray, changes: dict
) -> None:
    from segment_anything import SamAutomaticMaskGenerator

    cfg = dataclasses.replace(NO_FILTERS, **changes)
    ours = SamSegmenter(sam.sam, "sam_tiny", cfg)._generator
    stock = SamAutomaticMaskGenerator(
        sam.sam,
        points_per_side=cfg.points_per_side,
        points_per_batch=cfg.points_per_batch,
        pred_iou_thresh=cfg.pred_iou_thresh,
        stability_score_thresh=cfg.stability_score_thresh,
        box_nms_thresh=cfg.box_nms_thresh,
        min_mask_region_area=cfg.min_mask_region_area,
        crop_n_layers=cfg.crop_n_layers,
        crop_n_points_downscale_factor=cfg.crop_n_points_downscale_factor,
        output_mode="binary_mask",
    )
    counts = []
    for img in (image, np.ascontiguousarray(image[::-1, ::2])):
        fast, slow = ours.generate(img), stock.generate(img)
        assert len(fast) == len(slow) >= 1
        counts.append(len(fast))
        for a, b in zip(fast, slow, strict=True):
            assert a.keys() == b.keys()
            assert a["segmentation"].dtype == bool and a["segmentation"].shape == img.shape[:2]
            assert np.array_equal(a["segmentation"], b["segmentation"])
            assert {k: v for k, v in a.items() if k != "segmentation"} == {
                k: v for k, v in b.items() if k != "segmentation"
            }
    assert sum(counts) > 2


def test_points_per_batch_defaults_by_device_and_rejects_nonsense(sam: SamSegmenter) -> None:
    from fmbseg.config import load_config
    from fmbseg.models.sam import points_per_batch

    assert SamAutoConfig().points_per_batch is None  # the device decides
    assert load_config("default").sam_auto.points_per_batch is None
    assert points_per_batch(None, torch.device("cuda")) == 256
    assert points_per_batch(None, torch.device("cpu")) == 64
    assert points_per_batch(12, torch.device("cuda")) == 12
    built = SamSegmenter(
        sam.sam, "sam_tiny", dataclasses.replace(NO_FILTERS, points_per_batch=None)
    )
    assert built._generator.points_per_batch == 64  # the tiny SAM is on the CPU
    for bad in (0, -3, True, 2.5):
        with pytest.raises(
            ValueError,
            match=rf"sam_auto.points_per_batch must be a positive "
            rf"integer or null .*got {bad!r}",
        ):
            points_per_batch(bad, torch.device("cpu"))  # type: ignore[arg-type]


def test_precision_is_float32_on_a_cpu_and_checked_by_name() -> None:
    for precision in ("auto", "bf16", "fp32"):
        seg = build_model("sam_tiny", None, "cpu", precision=precision)
        assert seg.dtype == torch.float32
        assert "forward" not in vars(seg.sam.image_encoder)  # the plain encoder
    with pytest.raises(ValueError, match=r"sam_tiny: precision 'fp8' is not one of"):
        build_model("sam_tiny", None, "cpu", precision="fp8")


def test_the_bf16_image_encoder_path_keeps_the_decoder_in_float32(image: np.ndarray) -> None:
    # What precision="auto" does on CUDA, under CPU autocast: the same code path, no GPU.
    from fmbseg.models.sam import _set_encoder_dtype

    fp32 = build_model("sam_tiny", None, "cpu", auto_config=NO_FILTERS)
    bf16 = build_model("sam_tiny", None, "cpu", auto_config=NO_FILTERS)
    keys = list(bf16.sam.state_dict())
    for _ in range(2):  # idempotent: a second segmenter on the same Sam wraps nothing twice
        _set_encoder_dtype(bf16.sam.image_encoder, torch.bfloat16)
    assert list(bf16.sam.state_dict()) == keys  # weights and their names unchanged
    assert all(p.dtype == torch.float32 for p in bf16.sam.parameters())
    for seg in (fp32, bf16):
        seg.set_image(image)
    emb32, emb16 = fp32.predictor.features, bf16.predictor.features
    assert emb16.dtype == torch.float32 and not torch.equal(emb16, emb32)  # bf16 did run
    assert torch.nn.functional.cosine_similarity(emb16.flatten(), emb32.flatten(), dim=0) > 0.99
    point = np.array([[70.0, 25.0]])
    (m32, s32), (m16, s16) = (seg.predict(point, np.array([1])) for seg in (fp32, bf16))
    assert s16.dtype == np.float32 and np.abs(s16 - s32).max() < 0.05
    inter, union = (m16 & m32).sum(axis=(1, 2)), (m16 | m32).sum(axis=(1, 2))
    assert (inter / np.maximum(union, 1)).min() > 0.9
    # the generator's own embedding (crops, or an image not set before) takes the same path
    records = bf16.generate(image.copy())
    assert records and len(records) == len(fp32.generate(image.copy()))
    _set_encoder_dtype(bf16.sam.image_encoder, torch.float32)  # back to the plain encoder
    bf16.set_image(image)
    assert torch.equal(bf16.predictor.features, emb32)
