"""SAM 3 adapter: Meta's sam3 package behind the ConceptSegmenter interface.

Tests that build a model need the optional ``sam3`` package (``pip install -e '.[sam3]'``)
and are skipped without it; the registry and install-hint tests run everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from fmbseg.config import load_config
from fmbseg.engine.runner import StageError
from fmbseg.flows.common import is_user_error
from fmbseg.models import ConceptSegmenter, build_from_config, build_model, list_models
from fmbseg.models import sam3 as sam3_module
from fmbseg.models.locate import _hf_source
from fmbseg.models.registry import MissingExtraError, UnknownModelError
from fmbseg.models.weights import CheckpointMismatchError, WeightsNotFoundError

torch.set_num_threads(1)

NAMES = ["cat", "dog", "a red car", "sky"]


@pytest.fixture(scope="module")
def seg() -> sam3_module.Sam3ConceptSegmenter:
    pytest.importorskip("sam3")
    return build_model("sam3_tiny", None, "cpu")


def test_registry_names_kind_and_hub_source() -> None:
    # (test stand-ins registered by other test modules may follow)
    assert list_models("sam3")[:2] == ["sam3", "sam3_tiny"]
    assert not set(list_models("sam3")) & set(list_models("sam"))
    # an unknown sam3_* name lists the sam3 models, not the SAM ones
    with pytest.raises(UnknownModelError, match=r"known sam3 models: sam3, sam3_tiny\b"):
        build_model("sam3_huge", None)
    assert _hf_source("sam3", "sam3", "hub") == ("facebook/sam3", ("sam3.pt",))
    assert _hf_source("sam3", "sam3", "/models/sam3.pt") is None


def test_config_names_the_models_and_thresholds() -> None:
    default, tiny = load_config("default"), load_config("tiny")
    assert (default.models.sam3, default.models.sam3_weights) == ("sam3", "hub")
    assert (tiny.models.sam3, tiny.models.sam3_weights) == ("sam3_tiny", None)
    assert (default.sam3.presence_threshold, default.sam3.score_threshold) == (0.5, 0.5)
    assert default.sam3.max_masks_per_class is None and tiny.sam3.max_masks_per_class == 2


def test_without_the_sam3_package_the_error_says_how_to_install(
    hide_package: Callable[[str], None],
) -> None:
    hide_package("sam3")
    with pytest.raises(MissingExtraError, match=r"SAM 3 models need the sam3 package") as info:
        build_model("sam3_tiny", None)
    assert "pip install -e '.[sam3]'" in str(info.value)
    assert is_user_error(StageError("stage 'sam3': worker could not be built", info.value))


def test_tiny_model_is_sam3s_image_model(seg: sam3_module.Sam3ConceptSegmenter) -> None:
    from sam3.model.sam3_image import Sam3Image
    from sam3.model.vitdet import ViT

    assert isinstance(seg, ConceptSegmenter) and isinstance(seg.model, Sam3Image)
    assert isinstance(seg.model.backbone.vision_backbone.trunk, ViT)
    assert seg.image_size == 112 and seg.model.transformer.decoder.num_queries == 8
    assert repr(seg) == (
        "Sam3ConceptSegmenter('sam3_tiny', device=cpu, input=112, dtype=torch.float32)"
    )
    cfg_built = build_from_config(load_config("tiny").models, "sam3")
    for p, q in zip(cfg_built.model.parameters(), seg.model.parameters(), strict=True):
        assert torch.equal(p, q)  # seeded: every build of a random model is the same model


def test_segment_concepts_returns_one_result_per_name_at_original_size(
    seg: sam3_module.Sam3ConceptSegmenter, image: np.ndarray
) -> None:
    seg.set_image(image)
    out = seg.segment_concepts(NAMES)
    assert len(out) == len(NAMES)
    for c in out:
        assert 0 < c.presence < 1
        assert c.masks.shape == (8, 64, 96) and c.masks.dtype == bool  # every query
        assert c.scores.shape == (8,) and c.scores.dtype == np.float32
        assert np.all(np.diff(c.scores) <= 0)  # descending
        assert np.all(c.scores <= c.presence + 1e-6)  # instance probability x presence
        assert c.masks.any() and not c.masks.all()
    assert len({round(c.presence, 6) for c in out}) == len(NAMES)  # the names matter


def test_batched_names_equal_sam3s_own_processor_per_prompt(
    seg: sam3_module.Sam3ConceptSegmenter, image: np.ndarray
) -> None:
    from sam3.model.sam3_image_processor import Sam3Processor

    seg.set_image(image)
    ours = seg.segment_concepts(NAMES)
    proc = Sam3Processor(seg.model, resolution=112, device="cpu", confidence_threshold=0.0)
    state = proc.set_image(torch.from_numpy(image).permute(2, 0, 1))
    with sam3_module.text_only_on_cpu(seg.model):
        for name, c in zip(NAMES, ours, strict=True):
            state = proc.set_text_prompt(name, state)
            order = torch.argsort(state["scores"], descending=True, stable=True)
            np.testing.assert_allclose(c.scores, state["scores"][order].numpy(), atol=1e-6)
            np.testing.assert_array_equal(c.masks, state["masks"][order, 0].numpy())
    assert seg.model.geometry_encoder.boxes_pool_project is not None  # put back


def test_image_is_encoded_once_for_all_names_and_batches_agree(
    seg: sam3_module.Sam3ConceptSegmenter, image: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int, ...]] = []
    backbone = seg.model.backbone
    encode = backbone.forward_image
    monkeypatch.setattr(backbone, "forward_image", lambda x: calls.append(x.shape) or encode(x))
    seg.set_image(image)
    whole = seg.segment_concepts(NAMES)
    one_by_one = sam3_module.Sam3ConceptSegmenter(
        seg.model, "sam3_tiny", seg.image_size, prompts_per_batch=1
    )
    one_by_one.set_image(image)
    single = one_by_one.segment_concepts(NAMES)
    assert calls == [(1, 3, 112, 112)] * 2  # one ViT pass per set_image, not per name
    for a, b in zip(whole, single, strict=True):
        assert a.presence == pytest.approx(b.presence, abs=1e-6)
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-6)
        assert (a.masks != b.masks).mean() < 1e-3


def test_min_score_and_max_masks_drop_instances_before_upsampling(
    seg: sam3_module.Sam3ConceptSegmenter, image: np.ndarray
) -> None:
    seg.set_image(image)
    everything = seg.segment_concepts(NAMES)
    cut = float(np.median(everything[0].scores))
    some = seg.segment_concepts(NAMES, min_score=cut, max_masks=3)
    for full, part in zip(everything, some, strict=True):
        keep = full.scores >= cut
        n = min(3, int(keep.sum()))
        assert part.presence == full.presence
        np.testing.assert_array_equal(part.scores, full.scores[keep][:n])
        np.testing.assert_array_equal(part.masks, full.masks[keep][:n])
    none = seg.segment_concepts(["cat"], min_score=1.0)[0]
    assert none.masks.shape == (0, 64, 96) and none.scores.shape == (0,)


def test_inputs_are_validated(seg: sam3_module.Sam3ConceptSegmenter, image: np.ndarray) -> None:
    fresh = sam3_module.Sam3ConceptSegmenter(seg.model, "sam3_tiny", seg.image_size)
    with pytest.raises(RuntimeError, match=r"sam3_tiny.segment_concepts: call set_image"):
        fresh.segment_concepts(["cat"])
    with pytest.raises(ValueError, match=r"sam3_tiny.set_image: expected an HxWx3 uint8"):
        seg.set_image(image.astype(np.float32))
    seg.set_image(image)
    with pytest.raises(ValueError, match=r"empty or non-string names \['', 3\]"):
        seg.segment_concepts(["cat", "", 3])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"prompts_per_batch must be a positive integer, got 0"):
        sam3_module.Sam3ConceptSegmenter(seg.model, "sam3_tiny", 112, prompts_per_batch=0)
    with pytest.raises(ValueError, match=r"sam3_tiny: precision 'fp8' is not one of"):
        sam3_module.Sam3ConceptSegmenter(seg.model, "sam3_tiny", 112, precision="fp8")  # type: ignore[arg-type]


def test_checkpoint_detector_weights_load_and_mismatch_is_named(
    tmp_path: Path, seg: sam3_module.Sam3ConceptSegmenter, image: np.ndarray
) -> None:
    # facebook/sam3's sam3.pt layout: {"model": {"detector.*": ..., "tracker.*": ...}}
    state = {f"detector.{k}": v for k, v in seg.model.state_dict().items()}
    state["tracker.maskmem_tpos_enc"] = torch.zeros(7, 1, 1, 64)
    path = tmp_path / "sam3.pt"
    torch.save({"model": state}, path)
    loaded = build_model("sam3_tiny", str(path), seed=7)
    for p, q in zip(loaded.model.parameters(), seg.model.parameters(), strict=True):
        assert torch.equal(p, q)
    other = build_model("sam3_tiny", None, seed=7)
    assert any(
        not torch.equal(p, q)
        for p, q in zip(other.model.parameters(), seg.model.parameters(), strict=True)
    )
    for s in (loaded, seg):
        s.set_image(image)
    a, b = loaded.segment_concepts(["cat"])[0], seg.segment_concepts(["cat"])[0]
    np.testing.assert_array_equal(a.scores, b.scores)

    del state["detector.transformer.decoder.query_embed.weight"]
    state["detector.extra.weight"] = torch.zeros(1)
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointMismatchError) as info:
        build_model("sam3_tiny", str(path))
    msg = str(info.value)
    assert f"SAM 3 checkpoint {path} for sam3_tiny does not fit" in msg
    assert "missing keys: transformer.decoder.query_embed.weight" in msg
    assert "unexpected keys: extra.weight" in msg

    torch.save({"model": {"tracker.x": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointMismatchError, match=r"holds no 'detector\.\*' tensors"):
        build_model("sam3_tiny", str(path))


def test_missing_checkpoints_say_how_to_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("sam3")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WeightsNotFoundError) as info:  # before building an 850M model
        build_model("sam3", "sam3.pt", cache_dir=str(tmp_path / "c"))
    msg = str(info.value)
    assert str(tmp_path / "sam3.pt") in msg and str(tmp_path / "c" / "sam3.pt") in msg
    assert "--set models.sam3_weights=s3://bucket/sam3.pt" in msg
    assert "or 'hub' for facebook/sam3's sam3.pt" in msg

    def offline(**kwargs: str) -> str:
        raise OSError(f"offline: {kwargs['repo_id']}/{kwargs['filename']}")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(WeightsNotFoundError) as info:
        build_model("sam3", "hub")
    msg = str(info.value)
    assert "sam3 weights 'hub' (models.sam3_weights)" in msg
    assert "OSError: offline: facebook/sam3/sam3.pt" in msg


def test_cpu_workaround_drops_the_box_pooling_only_inside_the_context(
    seg: sam3_module.Sam3ConceptSegmenter,
) -> None:
    encoder = seg.model.geometry_encoder
    pool = encoder.boxes_pool_project
    with sam3_module.text_only_on_cpu(seg.model):
        assert encoder.boxes_pool_project is None
    assert encoder.boxes_pool_project is pool


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_bf16_matches_fp32_and_sam3s_builder(image: np.ndarray) -> None:
    pytest.importorskip("sam3")
    bf16 = build_model("sam3_tiny", None, "cuda")
    fp32 = build_model("sam3_tiny", None, "cuda", precision="fp32")
    assert bf16.dtype == torch.bfloat16 and fp32.dtype == torch.float32
    for s in (bf16, fp32):
        s.set_image(image)
    with sam3_module.text_only_on_cpu(fp32.model):  # a CUDA model: nothing is left out
        assert fp32.model.geometry_encoder.boxes_pool_project is not None
    a, b = (s.segment_concepts(NAMES) for s in (bf16, fp32))
    for x, y in zip(a, b, strict=True):
        assert x.masks.shape == y.masks.shape == (8, 64, 96)
        assert x.presence == pytest.approx(y.presence, abs=0.05)
        np.testing.assert_allclose(x.scores, y.scores, atol=0.05)
    # the real composition is sam3's own builder's: same tensors, names and shapes
    from sam3.model_builder import build_sam3_image_model

    theirs = build_sam3_image_model(
        bpe_path=sam3_module._bpe_path(), device="cuda", load_from_HF=False
    ).state_dict()
    ours = sam3_module.compose_sam3_image_model(sam3_module.SAM3).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {
        k: tuple(v.shape) for k, v in theirs.items()
    }


def test_locate_weights_checks_the_sam3_checkpoint(tmp_path: Path) -> None:
    from fmbseg.models.locate import locate_weights

    models = load_config("default", [f"models.sam3_weights={tmp_path}/sam3.pt"]).models
    with pytest.raises(WeightsNotFoundError) as info:
        locate_weights(models, ("sam3",))
    assert f"models.sam3_weights='{tmp_path}/sam3.pt' (sam3) cannot be loaded: no such file" in str(
        info.value
    )
    (tmp_path / "sam3.pt").write_bytes(b"")
    locate_weights(models, ("sam3",))  # found: no error
