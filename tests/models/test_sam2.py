"""SAM 2.1 adapter: the official sam2 package's predictor and generator behind our interface."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from fmbseg.config import SamAutoConfig
from fmbseg.engine.runner import StageError
from fmbseg.flows.common import is_user_error
from fmbseg.models import build_model, get_model_spec, list_models
from fmbseg.models.base import Segmenter
from fmbseg.models.registry import MissingExtraError
from fmbseg.models.sam import _set_encoder_dtype
from fmbseg.models.sam21 import Sam2Segmenter
from fmbseg.models.weights import CheckpointMismatchError, WeightsNotFoundError

torch.set_num_threads(1)

NO_FILTERS = SamAutoConfig(
    points_per_side=4,
    points_per_batch=16,
    pred_iou_thresh=0.0,
    stability_score_thresh=0.0,
    box_nms_thresh=1.0,
    min_mask_region_area=0,
    max_area_fraction=1.0,
)


@pytest.fixture(scope="module")
def sam() -> Sam2Segmenter:
    return build_model("sam2.1_tiny", None, "cpu", auto_config=NO_FILTERS)


def _key(record: dict) -> tuple:
    return (record["area"], tuple(record["bbox"]), record["segmentation"].tobytes())


def test_registry_names_and_tiny_architecture(sam: Sam2Segmenter) -> None:
    names = [n for n in list_models("sam") if n.startswith("sam2")]
    assert names == [
        "sam2.1_hiera_b+",
        "sam2.1_hiera_l",
        "sam2.1_hiera_s",
        "sam2.1_hiera_t",
        "sam2.1_tiny",
    ]
    assert get_model_spec("sam2.1_hiera_l").description.startswith("SAM 2.1 Hiera-L")
    from sam2.modeling.backbones.hieradet import Hiera
    from sam2.modeling.sam2_base import SAM2Base

    assert isinstance(sam, Segmenter) and isinstance(sam.model, SAM2Base)
    assert isinstance(sam.model.image_encoder.trunk, Hiera)
    assert sam.image_size == 128 and sam.model.sam_prompt_embed_dim == 32
    assert repr(sam).startswith("Sam2Segmenter('sam2.1_tiny', device=cpu, input=128")


def test_predict_returns_masks_at_original_size(sam: Sam2Segmenter, image: np.ndarray) -> None:
    sam.set_image(image)
    masks, scores = sam.predict(np.array([[70.5, 20.5]]), np.array([1]))
    assert masks.shape == (3, 64, 96) and masks.dtype == bool
    assert scores.shape == (3,) and scores.dtype == np.float32
    assert np.all((scores > 0) & (scores < 1))  # SAM 2.1's IoU head ends in a sigmoid
    assert masks.any(axis=(1, 2)).all() and not masks.all(axis=(1, 2)).any()
    masks, scores = sam.predict(
        np.array([[70.5, 20.5], [60.0, 30.0]]), np.array([1, 1]), multimask=False
    )
    assert masks.shape == (1, 64, 96) and scores.shape == (1,)


def test_predict_points_are_xy_like_sam2_image_predictor(
    sam: Sam2Segmenter, image: np.ndarray
) -> None:
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    sam.set_image(image)
    points = np.array([[70.5, 20.5], [30.5, 50.5]], dtype=np.float32)  # (x, y), corner origin
    labels = np.array([1, 0])
    masks, scores = sam.predict(points, labels)
    direct = SAM2ImagePredictor(sam.model)
    direct._bb_feat_sizes = [(32, 32), (16, 16), (8, 8)]  # the package assumes 1024 px
    direct.set_image(image)
    # SAM 2 takes pixel indices (its prompt encoder adds 0.5): pixel (70, 20)'s centre is 70, 20
    ref_masks, ref_scores, _ = direct.predict(point_coords=points - 0.5, point_labels=labels)
    np.testing.assert_array_equal(masks, ref_masks)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5)
    swapped, swapped_scores, _ = direct.predict(
        point_coords=points[:, ::-1] - 0.5, point_labels=labels
    )
    assert not np.array_equal(masks, swapped) or not np.allclose(scores, swapped_scores)


def test_predict_batch_equals_predict_per_prompt(sam: Sam2Segmenter, image: np.ndarray) -> None:
    sam.set_image(image)
    rng = np.random.default_rng(4)
    points = rng.uniform([0, 0], [96, 64], size=(3, 4, 2)).astype(np.float32)
    labels = np.ones((3, 4), dtype=np.int64)
    labels[1, 2] = 0
    masks, scores = sam.predict_batch(points, labels)
    assert masks.shape == (3, 3, 64, 96) and scores.shape == (3, 3)
    for b in range(3):
        one, one_scores = sam.predict(points[b], labels[b])
        np.testing.assert_allclose(scores[b], one_scores, atol=1e-5)
        assert (masks[b] != one).mean() < 1e-3  # batched matmuls may round differently
    with pytest.raises(ValueError, match=r"points must be \(B, P, 2\) with B, P >= 1"):
        sam.predict_batch(points[0], labels[0])
    with pytest.raises(ValueError, match=r"labels must be \(3, 4\), got \(3, 3\)"):
        sam.predict_batch(points, labels[:, :3])


def test_inputs_are_validated(sam: Sam2Segmenter, image: np.ndarray) -> None:
    sam.generate(image)  # leaves no image set
    with pytest.raises(RuntimeError, match=r"sam2.1_tiny.predict: call set_image"):
        sam.predict(np.array([[1.0, 1.0]]), np.array([1]))
    with pytest.raises(ValueError, match=r"sam2.1_tiny.set_image: expected an HxWx3 uint8"):
        sam.set_image(image.astype(np.float32))
    with pytest.raises(ValueError, match=r"sam2.1_tiny.generate: expected an HxWx3 uint8"):
        sam.generate(image[..., 0])


def test_generate_returns_filtered_records_on_cpu(sam: Sam2Segmenter, image: np.ndarray) -> None:
    records = sam.generate(image)
    assert len(records) >= 4  # 16 grid points x 3 masks, NMS off
    for r in records:
        seg = r["segmentation"]
        assert seg.shape == (64, 96) and seg.dtype == bool
        assert r["area"] == int(seg.sum()) > 0
        x, y, w, h = r["bbox"]
        ys, xs = np.nonzero(seg)
        assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max(), ys.max())
        assert 0 < r["predicted_iou"] < 1 and 0 <= r["stability_score"] <= 1
    # every threshold of sam_auto reaches the generator: each filtered run is a subset
    everything = {_key(r) for r in records}
    iou = float(np.median([r["predicted_iou"] for r in records]))
    stab = float(np.median([r["stability_score"] for r in records]))
    area = float(np.median([r["area"] for r in records])) / (64 * 96)
    for change, kept in [
        ({"pred_iou_thresh": iou}, lambda r: r["predicted_iou"] > iou),
        ({"stability_score_thresh": stab}, lambda r: r["stability_score"] >= stab),
        ({"max_area_fraction": area}, lambda r: r["area"] <= area * 64 * 96),
    ]:
        cfg = dataclasses.replace(NO_FILTERS, **change)
        got = Sam2Segmenter(sam.model, "sam2.1_tiny", cfg).generate(image)
        assert {_key(r) for r in got} == {_key(r) for r in records if kept(r)} < everything
    nms = Sam2Segmenter(
        sam.model, "sam2.1_tiny", dataclasses.replace(NO_FILTERS, box_nms_thresh=0.5)
    )
    assert 0 < len(nms.generate(image)) < len(records)


def test_generate_after_set_image_reuses_the_embedding(
    sam: Sam2Segmenter, image: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    fresh = sam.generate(image)
    calls = []
    encode = sam.model.forward_image
    monkeypatch.setattr(sam.model, "forward_image", lambda x: calls.append(x.shape) or encode(x))
    sam.set_image(image)
    shared = sam.generate(image)
    assert calls == [(1, 3, 128, 128)]  # one encoder pass for prompts and automatic masks
    assert [_key(r) for r in shared] == [_key(r) for r in fresh]
    sam.set_image(image)
    sam.generate(image.copy())  # other pixels (a copy): embedded anew
    assert len(calls) == 3


def test_checkpoint_loads_and_mismatch_is_named(tmp_path: Path, sam: Sam2Segmenter) -> None:
    path = tmp_path / "sam2.1_tiny.pt"
    torch.save({"model": sam.model.state_dict()}, path)  # the official checkpoints' layout
    loaded = build_model("sam2.1_tiny", str(path), seed=7, auto_config=NO_FILTERS)
    random_other = build_model("sam2.1_tiny", None, seed=7)
    for p, q in zip(loaded.model.parameters(), sam.model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert any(
        not torch.equal(p, q)
        for p, q in zip(random_other.model.parameters(), sam.model.parameters(), strict=True)
    )
    sd = sam.model.state_dict()
    sd["sam_mask_decoder.extra.weight"] = torch.zeros(1)
    del sd["no_mem_embed"]
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointMismatchError) as info:
        build_model("sam2.1_tiny", str(path))
    msg = str(info.value)
    assert f"SAM 2.1 checkpoint {path} for sam2.1_tiny does not fit" in msg
    assert "missing keys: no_mem_embed" in msg
    assert "unexpected keys: sam_mask_decoder.extra.weight" in msg


def test_missing_real_checkpoint_says_how_to_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WeightsNotFoundError) as info:  # before building a 224M model
        build_model("sam2.1_hiera_l", "sam2.1_hiera_large.pt", cache_dir=str(tmp_path / "c"))
    msg = str(info.value)
    assert str(tmp_path / "sam2.1_hiera_large.pt") in msg
    assert str(tmp_path / "c" / "sam2.1_hiera_large.pt") in msg
    assert "--set models.sam_weights=s3://bucket/sam2.1_hiera_large.pt" in msg


def test_without_the_sam2_package_the_error_says_how_to_install(
    hide_package: Callable[[str], None],
) -> None:
    hide_package("sam2")
    with pytest.raises(MissingExtraError, match=r"SAM 2.1 models need the sam2 package") as info:
        build_model("sam2.1_hiera_t", None)
    assert "SAM2_BUILD_CUDA=0 pip install --no-build-isolation -e '.[sam2]'" in str(info.value)
    # raised while a stage builds its worker: the CLI's one-line input error, not a traceback
    assert is_user_error(StageError("stage 'sam_auto': worker could not be built", info.value))


def test_precision_is_checked_and_autocast_wraps_only_the_image_encoder(
    sam: Sam2Segmenter, image: np.ndarray
) -> None:
    with pytest.raises(ValueError, match=r"sam2.1_tiny: precision 'fp8' is not one of"):
        Sam2Segmenter(sam.model, "sam2.1_tiny", NO_FILTERS, precision="fp8")
    assert sam.dtype == torch.float32  # a CPU: always float32
    encoder = sam.model.image_encoder
    assert "forward" not in vars(encoder)
    sam.set_image(image)
    before = sam.predict(np.array([[70.5, 20.5]]), np.array([1]))
    # what a GPU's bf16 does to the wiring, exercised on the CPU's autocast
    _set_encoder_dtype(encoder, torch.bfloat16)
    try:
        out = encoder(torch.zeros(1, 3, 128, 128))
        assert out["vision_features"].dtype == torch.float32  # handed on as float32
        assert all(t.dtype == torch.float32 for t in out["backbone_fpn"] + out["vision_pos_enc"])
    finally:
        _set_encoder_dtype(encoder, torch.float32)
    assert "forward" not in vars(encoder)  # the plain forward again: the same numbers
    sam.set_image(image)
    after = sam.predict(np.array([[70.5, 20.5]]), np.array([1]))
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_bf16_encoder_gives_masks_and_automatic_records(image: np.ndarray) -> None:
    seg = build_model("sam2.1_tiny", None, "cuda", auto_config=NO_FILTERS)
    assert seg.dtype == torch.bfloat16 and seg.device.type == "cuda"
    fp32 = build_model("sam2.1_tiny", None, "cuda", auto_config=NO_FILTERS, precision="fp32")
    for s in (seg, fp32):
        s.set_image(image)
    points = np.array([[[70.5, 20.5]], [[30.5, 50.5]]], dtype=np.float32)
    (m16, s16), (m32, s32) = (
        s.predict_batch(points, np.ones((2, 1), dtype=np.int64)) for s in (seg, fp32)
    )
    assert m16.shape == (2, 3, 64, 96) and s16.dtype == np.float32
    np.testing.assert_allclose(s16, s32, atol=0.05)
    assert (m16 != m32).mean() < 0.05
    records = seg.generate(image)
    assert records and all(r["segmentation"].shape == (64, 96) for r in records)
