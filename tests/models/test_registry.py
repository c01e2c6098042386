"""The model registry: names by kind, one builder signature, helpful errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from fmbseg.config import load_config
from fmbseg.models import (
    DenseClip,
    PatchEncoder,
    Segmenter,
    UnknownModelError,
    build_from_config,
    build_model,
    get_model_spec,
    list_models,
    register_model,
)
from fmbseg.models import registry as registry_module

torch.set_num_threads(1)


@pytest.fixture
def scratch_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations made by a test disappear after it."""
    list_models()  # load the built-ins into the real registry first
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))


def test_builtin_names_by_kind() -> None:
    # Test helpers (tests/helpers/synthetic.py) may register stand-ins too: look only at the built-ins.
    def builtin(kind: str) -> list[str]:
        return [
            n
            for n in list_models(kind)
            if get_model_spec(n).builder.__module__.startswith("fmbseg.")
        ]

    assert builtin("clip") == ["clip_tiny", "clip_vit_b16", "clip_vit_l14", "clip_vit_l14_336"]
    assert builtin("sam") == [
        "sam2.1_hiera_b+",
        "sam2.1_hiera_l",
        "sam2.1_hiera_s",
        "sam2.1_hiera_t",
        "sam2.1_tiny",
        "sam_tiny",
        "sam_vit_b",
        "sam_vit_h",
        "sam_vit_l",
    ]
    assert builtin("dino") == [
        "dinov2_tiny",
        "dinov2_vitb14",
        "dinov2_vitg14",
        "dinov2_vitl14",
        "dinov2_vits14",
    ]
    assert not set(list_models("clip")) & set(list_models("sam"))
    assert get_model_spec("sam_vit_h").description.startswith("segment-anything ViT-H")


def test_unknown_name_lists_known_names_of_its_kind() -> None:
    with pytest.raises(UnknownModelError) as info:
        build_model("clip_vit_h14", None)
    msg = str(info.value)
    assert msg.startswith("unknown model name 'clip_vit_h14'; known clip models: clip_tiny,")
    assert "sam_vit_h" not in msg
    with pytest.raises(
        UnknownModelError, match="known sam models: sam2.1_hiera_b\\+, .*sam_tiny, sam_vit_b"
    ):
        build_model("vit_h", None, kind="sam")
    with pytest.raises(UnknownModelError, match="clip: clip_tiny.*dino: dinov2_tiny"):
        build_model("mystery", None)


def test_kind_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="'sam_tiny' is a sam model, but a clip model"):
        build_model("sam_tiny", None, kind="clip")


def test_tiny_models_implement_their_protocols() -> None:
    assert isinstance(build_model("clip_tiny", None), DenseClip)
    assert isinstance(build_model("sam_tiny", None, "cpu"), Segmenter)
    dino = build_model("dinov2_tiny", None, torch.device("cpu"))
    assert isinstance(dino, PatchEncoder) and dino.device.type == "cpu"


def test_build_from_tiny_config() -> None:
    cfg = load_config("tiny")
    clip = build_from_config(cfg.models, "clip", "auto", mode=cfg.clip_dense.mode)
    sam = build_from_config(cfg.models, "sam", auto_config=cfg.sam_auto)
    dino = build_from_config(cfg.models, "dino", img_size=cfg.train.input_size)
    assert clip.name == "clip_tiny" and clip.device.type == (
        "cuda" if torch.cuda.is_available() else "cpu"
    )
    assert sam.auto_config == cfg.sam_auto
    assert dino.preprocess.input_size == cfg.train.input_size == 56
    assert load_config("tiny", ["models.clip_quick_gelu=false"]).models.clip_quick_gelu is False


def test_register_custom_model(scratch_registry: None) -> None:
    calls: list[tuple[Any, ...]] = []

    @register_model("dinov2_custom", "dino", description="a test double")
    def build(weights: str | None, device: torch.device, **kwargs: Any) -> Any:
        calls.append((weights, device, kwargs))
        return build_model("dinov2_tiny", None, device)

    enc = build_model("dinov2_custom", "w.pth", "cpu", store_options={"anon": True}, img_size=28)
    assert isinstance(enc, PatchEncoder)
    assert calls == [
        ("w.pth", torch.device("cpu"), {"store_options": {"anon": True}, "img_size": 28})
    ]
    assert "dinov2_custom" in list_models("dino")
    assert get_model_spec("dinov2_custom").description == "a test double"


def test_registration_errors(scratch_registry: None) -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model("clip_tiny", "clip", lambda w, d, **k: None)
    with pytest.raises(ValueError, match="kind 'vlm' is not one of"):
        register_model("x", "vlm", lambda w, d, **k: None)  # type: ignore[arg-type]
    register_model("sam_broken", "sam", lambda w, d, **k: object(), "returns the wrong thing")
    with pytest.raises(TypeError, match="does not implement Segmenter"):
        build_model("sam_broken", None)
