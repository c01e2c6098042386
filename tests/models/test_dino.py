"""DINOv2 adapter: frozen timm ViT, patch tokens only, checkpoints from paths and URIs."""

from __future__ import annotations

import uuid
from pathlib import Path

import fsspec
import pytest
import timm
import torch
from safetensors.torch import save_file

from fmbseg.models import build_model
from fmbseg.models.base import PatchEncoder
from fmbseg.models.dino import DinoPatchEncoder
from fmbseg.models.weights import CheckpointMismatchError, WeightsNotFoundError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def dino() -> DinoPatchEncoder:
    return build_model("dinov2_tiny", None, "cpu")


def _images(n: int = 2, h: int = 56, w: int = 56, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_patch_features_shape_and_prefix_dropped(dino: DinoPatchEncoder) -> None:
    assert isinstance(dino, PatchEncoder) and dino.name == "dinov2_tiny"
    images = _images()
    feats = dino.patch_features(images)
    assert feats.shape == (2, 16, 32) and feats.dtype == torch.float32
    tokens = dino.model.forward_features(images)
    assert tokens.shape[1] == 17 and dino.num_prefix_tokens == 1
    torch.testing.assert_close(feats, tokens[:, 1:])
    # row-major patches at any size that is a multiple of 14 (dynamic_img_size)
    assert dino.patch_features(_images(1, 42, 70)).shape == (1, 15, 32)


def test_registers_are_dropped_too() -> None:
    model = timm.create_model(
        "vit_small_patch14_reg4_dinov2",
        pretrained=False,
        embed_dim=32,
        depth=1,
        num_heads=2,
        img_size=28,
        dynamic_img_size=True,
    )
    enc = DinoPatchEncoder(model, "reg4")
    assert enc.num_prefix_tokens == 5
    assert enc.patch_features(_images(1, 28, 28)).shape == (1, 4, 32)


def test_frozen(dino: DinoPatchEncoder) -> None:
    assert not dino.model.training
    assert all(not p.requires_grad for p in dino.model.parameters())
    out = dino.patch_features(_images(1))
    assert not out.requires_grad


def test_preprocessing_follows_timm_and_img_size() -> None:
    enc = build_model("dinov2_tiny", None, img_size=70)
    pp = enc.preprocess
    assert pp.mean == pytest.approx((0.485, 0.456, 0.406))
    assert pp.std == pytest.approx((0.229, 0.224, 0.225))
    assert (pp.input_size, pp.patch_size) == (70, 14)
    assert timm.data.resolve_model_data_config(enc.model)["input_size"] == (3, 70, 70)
    with pytest.raises(ValueError, match="img_size 60 is not a multiple of the patch size 14"):
        build_model("dinov2_tiny", None, img_size=60)


def test_input_validation(dino: DinoPatchEncoder) -> None:
    with pytest.raises(ValueError, match="56x50 is not a multiple of the patch size 14"):
        dino.patch_features(_images(1, 56, 50))
    with pytest.raises(ValueError, match=r"expected \(B, 3, H, W\) float"):
        dino.patch_features(torch.zeros(1, 56, 56))


def test_checkpoint_reloads_from_path_and_memory_uri(
    tmp_path: Path, dino: DinoPatchEncoder
) -> None:
    images = _images(seed=3)
    expected = dino.patch_features(images)
    assert not torch.allclose(
        build_model("dinov2_tiny", None, seed=1).patch_features(images), expected
    )
    state = dino.model.state_dict()
    pth, st = tmp_path / "tiny.pth", tmp_path / "tiny.safetensors"
    torch.save(state, pth)
    save_file({k: v.contiguous() for k, v in state.items()}, str(st))
    uri = f"memory://fmbseg-test-{uuid.uuid4().hex[:8]}/dinov2_tiny.pth"
    with fsspec.open(uri, "wb") as f:
        f.write(pth.read_bytes())
    cache = tmp_path / "cache"
    for ref in (str(pth), str(st), f"file://{pth}", uri):
        enc = build_model("dinov2_tiny", ref, seed=1, cache_dir=str(cache))
        torch.testing.assert_close(enc.patch_features(images), expected, atol=0, rtol=0)
    # the URI was downloaded into the cache once; it is used from there afterwards
    fsspec.filesystem("memory").rm(uri)
    enc = build_model("dinov2_tiny", uri, seed=1, cache_dir=str(cache))
    torch.testing.assert_close(enc.patch_features(images), expected, atol=0, rtol=0)


def test_original_dinov2_format_and_other_img_size(tmp_path: Path, dino: DinoPatchEncoder) -> None:
    # Meta's checkpoints carry a mask_token; timm's filter drops it and resamples pos_embed.
    state = dict(dino.model.state_dict())
    state["mask_token"] = torch.zeros(1, 32)
    path = tmp_path / "dinov2_tiny_pretrain.pth"
    torch.save(state, path)
    same = build_model("dinov2_tiny", str(path), seed=1)
    torch.testing.assert_close(same.patch_features(_images()), dino.patch_features(_images()))
    bigger = build_model("dinov2_tiny", str(path), img_size=84, seed=1)
    assert bigger.model.pos_embed.shape == (1, 1 + 36, 32)
    assert bigger.patch_features(_images(1, 84, 84)).shape == (1, 36, 32)


def test_mismatched_checkpoint_names_keys(tmp_path: Path, dino: DinoPatchEncoder) -> None:
    state = dict(dino.model.state_dict())
    del state["blocks.1.mlp.fc2.bias"]
    state["head.weight"] = torch.zeros(10, 32)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointMismatchError) as info:
        build_model("dinov2_tiny", str(path))
    msg = str(info.value)
    assert "missing keys: blocks.1.mlp.fc2.bias" in msg and "unexpected keys: head.weight" in msg
    assert str(path) in msg


def test_hub_failure_offline_says_how_to_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(timm.models._builder, "load_pretrained", offline)
    with pytest.raises(WeightsNotFoundError) as info:
        build_model("dinov2_tiny", "hub")
    msg = str(info.value)
    assert "timm/vit_small_patch14_dinov2.lvd142m" in msg and "ConnectionError" in msg
    assert "--set models.dino_weights=s3://bucket/" in msg
