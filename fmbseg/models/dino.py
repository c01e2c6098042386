"""Frozen DINOv2 (timm ``vit_*_patch14_dinov2``) behind :class:`~fmbseg.models.base.PatchEncoder`.

Weights: ``"hub"`` = timm ``pretrained=True`` (Hugging Face hub / its cache); a local path or
URI holding either timm's or the original DINOv2 state dict (converted with timm's own
``checkpoint_filter_fn``, which also resamples the positional embedding to ``img_size``);
``None`` = deterministic random init. ``dynamic_img_size=True``, so any input whose sides
are multiples of 14 works; ``img_size`` (``train.input_size``) sets the native grid and the
preprocessing's ``input_size``.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn

from fmbseg.models.base import Precision, Preprocess, autocast, compute_dtype
from fmbseg.models.registry import register_builders
from fmbseg.models.weights import build_seeded, tag_not_found

# Registry name -> (timm architecture, extra timm kwargs).
DINO_ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "dinov2_vits14": ("vit_small_patch14_dinov2", {}),
    "dinov2_vitb14": ("vit_base_patch14_dinov2", {}),
    "dinov2_vitl14": ("vit_large_patch14_dinov2", {}),
    "dinov2_vitg14": ("vit_giant_patch14_dinov2", {}),
    "dinov2_tiny": ("vit_small_patch14_dinov2", {"embed_dim": 32, "depth": 2, "num_heads": 2}),
}
TINY_IMG_SIZE = 56


class DinoPatchEncoder:
    """Frozen timm ViT returning patch tokens (CLS and register tokens dropped).

    Args:
        model: a timm ``VisionTransformer`` (DINOv2 family), on its device.
        name: registry name, recorded in alignment-module checkpoints.
        precision: ``"auto"`` = bf16 autocast on CUDA; fp32 on CPU. Outputs are float32.
    """

    def __init__(self, model: nn.Module, name: str, precision: Precision = "auto") -> None:
        self.model = model.eval().requires_grad_(False)
        self.name = name
        self.device = next(model.parameters()).device
        cfg = timm.data.resolve_model_data_config(model)
        self.preprocess = Preprocess(
            mean=tuple(float(m) for m in cfg["mean"]),  # type: ignore[arg-type]
            std=tuple(float(s) for s in cfg["std"]),  # type: ignore[arg-type]
            input_size=int(cfg["input_size"][-1]),
            patch_size=int(model.patch_embed.patch_size[0]),  # type: ignore[union-attr, index]
        )
        self.embed_dim = int(model.embed_dim)  # type: ignore[arg-type]
        self.num_prefix_tokens = int(model.num_prefix_tokens)  # type: ignore[arg-type]
        self.dtype = compute_dtype(precision, self.device, name)

    def __repr__(self) -> str:
        return (
            f"DinoPatchEncoder({self.name!r}, device={self.device}, "
            f"embed_dim={self.embed_dim}, input={self.preprocess.input_size})"
        )

    @torch.no_grad()
    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` normalised, H and W multiples of 14 -> ``(B, N, C) float32``,
        N = (H/14)*(W/14) in row-major patch order."""
        self.preprocess.grid(images, f"{self.name}.patch_features")
        with autocast(self.device, self.dtype):
            tokens = self.model.forward_features(images.to(self.device))  # type: ignore[operator]
        return tokens[:, self.num_prefix_tokens :].float()


def build_dino(
    name: str,
    weights: str | None,
    device: torch.device,
    *,
    store_options: dict[str, Any] | None = None,
    img_size: int | None = None,
    precision: Precision = "auto",
    cache_dir: str | None = None,
    seed: int = 0,
) -> DinoPatchEncoder:
    """DINOv2 ``name`` at ``img_size`` (default: timm's, 518; tiny: 56)."""
    arch, extra = DINO_ARCHS[name]
    example = f"{name}_pretrain.pth"
    size = img_size or (TINY_IMG_SIZE if name == "dinov2_tiny" else 518)
    if size % 14:
        raise ValueError(f"{name}: img_size {size} is not a multiple of the patch size 14")
    kwargs: dict[str, Any] = dict(
        extra,
        img_size=size,
        dynamic_img_size=True,
        num_classes=0,
        pretrained_cfg_overlay={"input_size": (3, size, size)},
    )
    if weights == "hub":
        try:
            model = timm.create_model(arch, pretrained=True, **kwargs)
        except Exception as exc:  # noqa: BLE001 - offline hub failures come in many types
            hub = timm.models.get_pretrained_cfg(arch)
            hub_id, url = getattr(hub, "hf_hub_id", None), getattr(hub, "url", None)
            looked = f"timm hub weights of {arch} (hf hub {hub_id}, url {url})"
            raise tag_not_found(name, "hub", "dino_weights", example, looked, exc) from exc
        return DinoPatchEncoder(model.to(device), name, precision)
    model = build_seeded(
        lambda: timm.create_model(arch, pretrained=False, **kwargs),
        weights,
        "DINOv2",
        name,
        seed=seed,
        adapt=lambda state, model, _: checkpoint_filter_fn(state, model),  # type: ignore[arg-type]
        field="dino_weights",
        example=example,
        cache_dir=cache_dir,
        storage_options=store_options,
        extra_fix="or 'hub' for timm's pretrained download",
    )
    return DinoPatchEncoder(model.to(device), name, precision)


register_builders(
    "dino",
    build_dino,
    {
        "dinov2_vits14": "timm vit_small_patch14_dinov2 (DINOv2 ViT-S/14)",
        "dinov2_vitb14": "timm vit_base_patch14_dinov2 (DINOv2 ViT-B/14)",
        "dinov2_vitl14": "timm vit_large_patch14_dinov2 (DINOv2 ViT-L/14); the paper's",
        "dinov2_vitg14": "timm vit_giant_patch14_dinov2 (DINOv2 ViT-g/14)",
        "dinov2_tiny": "random tiny timm DINOv2 ViT (width 32, depth 2, patch 14, 56 px)",
    },
)
