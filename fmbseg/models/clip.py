"""Dense CLIP on open_clip ViTs: CLS embeddings and MaskCLIP / SCLIP patch features.

One trunk pass per batch of crops runs every block but the last; the pre-last-block tokens
then feed (a) the unchanged last block -> ``ln_post`` on CLS -> ``proj`` (the standard image
embedding) and (b) the modified last block of :mod:`fmbseg.models.clip_layers` on every
token -> ``ln_post`` -> ``proj`` (dense features in the joint image-text space, METHOD
1.1.1). Builders from open_clip tags, local paths or store URIs, and the tiny random one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, cast

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import nn

from fmbseg.models.base import Precision, Preprocess, autocast, compute_dtype
from fmbseg.models.clip_layers import (
    MODES,
    Mode,
    check_supported,
    dense_last_block,
    interpolate_pos_embed,
)
from fmbseg.models.registry import register_builders
from fmbseg.models.weights import build_seeded, tag_not_found

TEXT_BATCH = 256  # prompts per text-encoder forward

# A random CLIP of the real classes and tokenizer: ViT-B/16-like (patch 16), 64 px input.
TINY_CLIP_CFG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": dict(
        image_size=64, patch_size=16, width=64, layers=2, head_width=32, mlp_ratio=2
    ),
    "text_cfg": dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2, mlp_ratio=2),
}
TINY_TOKENIZER_ARCH = "ViT-B-16"  # its tokenizer: open_clip's SimpleTokenizer, context 77


class OpenClipDense:
    """:class:`~fmbseg.models.base.DenseClip` over an open_clip ``CLIP`` model.

    Args:
        model: an open_clip ``CLIP`` with a ViT image tower (see :func:`check_supported`).
        tokenizer: the model's open_clip tokenizer (``list[str] -> (N, context) int64``).
        name: registry name, for messages.
        mode: dense last-block path, ``"maskclip"`` or ``"sclip"``.
        precision: ``"auto"`` = bf16 autocast on CUDA; ``"bf16"``/``"fp16"`` autocast on
            CUDA; always fp32 on CPU. Outputs are float32.
        device: where the model runs; inputs are moved there.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        name: str,
        mode: Mode = "maskclip",
        precision: Precision = "auto",
        device: torch.device | str = "cpu",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"{name}: mode {mode!r} is not one of {list(MODES)}")
        self.dtype = compute_dtype(precision, torch.device(device), name)  # fails fast
        check_supported(model.visual, name)
        visual = cast(VisionTransformer, model.visual)
        self.name = name
        self.mode: Mode = mode
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.visual: VisionTransformer = visual
        self.tokenizer = tokenizer
        self.batch_first = bool(getattr(visual.transformer, "batch_first", True))
        self.native_grid: tuple[int, int] = (int(visual.grid_size[0]), int(visual.grid_size[1]))
        pp = open_clip.get_model_preprocess_cfg(model)
        size = visual.image_size
        self.preprocess = Preprocess(
            mean=tuple(float(m) for m in pp["mean"]),  # type: ignore[arg-type]
            std=tuple(float(s) for s in pp["std"]),  # type: ignore[arg-type]
            input_size=int(size[0] if isinstance(size, (tuple, list)) else size),
            patch_size=int(visual.patch_size[0]),
        )
        self.embed_dim = int(visual.proj.shape[1])
        self._pos_cache: dict[tuple[int, int], torch.Tensor] = {}

    def __repr__(self) -> str:
        return (
            f"OpenClipDense({self.name!r}, mode={self.mode!r}, device={self.device}, "
            f"dtype={self.dtype}, embed_dim={self.embed_dim})"
        )

    # ---- text -------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_text(self, names: list[str], templates: tuple[str, ...]) -> torch.Tensor:
        """Class names -> ``(K, D) float32``: each template filled with the name, embedded,
        L2-normalised, averaged over templates, L2-normalised again."""
        if isinstance(names, str) or not names or not all(isinstance(n, str) for n in names):
            raise ValueError(f"encode_text: names must be a non-empty list of str, got {names!r}")
        if isinstance(templates, str) or not templates or any("{}" not in t for t in templates):
            raise ValueError(
                f"encode_text: templates must be a non-empty sequence of strings with a '{{}}' "
                f"placeholder, got {templates!r}"
            )
        prompts = [t.format(n) for n in names for t in templates]
        feats = []
        for i in range(0, len(prompts), TEXT_BATCH):
            tokens = self.tokenizer(prompts[i : i + TEXT_BATCH]).to(self.device)
            with autocast(self.device, self.dtype):
                feats.append(self.model.encode_text(tokens, normalize=True).float())  # type: ignore[operator]
        per_template = torch.cat(feats).reshape(len(names), len(templates), -1)
        return F.normalize(per_template.mean(dim=1), dim=-1)

    # ---- image ------------------------------------------------------------------------------

    def pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        """``(1 + gh*gw, C)`` positional embedding for a crop grid (cached per grid)."""
        if grid == self.native_grid:
            return self.visual.positional_embedding
        if grid not in self._pos_cache:
            self._pos_cache[grid] = interpolate_pos_embed(
                self.visual.positional_embedding, self.native_grid, grid
            )
        return self._pos_cache[grid]

    def _trunk(self, crops: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Normalised crops -> batch-first tokens ``(B, 1 + gh*gw, C)`` before the last block,
        and the patch grid ``(gh, gw)``."""
        v = self.visual
        grid = self.preprocess.grid(crops, f"{self.name} crops")
        x = v.conv1(crops.to(self.device))
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + self.pos_embed(grid).to(x.dtype)
        x = v.ln_pre(v.patch_dropout(x))
        if not self.batch_first:
            x = x.transpose(0, 1)
        for blk in v.transformer.resblocks[:-1]:
            x = blk(x)
        return (x if self.batch_first else x.transpose(0, 1)), grid

    def _cls(self, x: torch.Tensor) -> torch.Tensor:
        blk = self.visual.transformer.resblocks[-1]
        y = blk(x) if self.batch_first else blk(x.transpose(0, 1)).transpose(0, 1)
        pooled = self.visual.ln_post(y[:, 0]) @ self.visual.proj
        return F.normalize(pooled.float(), dim=-1)

    def _dense(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        y = dense_last_block(self.visual.transformer.resblocks[-1], x, self.mode)
        feats = self.visual.ln_post(y[:, 1:]) @ self.visual.proj
        return feats.float().reshape(x.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2)

    @torch.no_grad()
    def crops_and_dense(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised crops ``(B, 3, S, S)`` -> CLS ``(B, D)`` L2-normalised and dense
        ``(B, D, S/p, S/p)`` (not normalised), both float32, from one trunk pass."""
        with autocast(self.device, self.dtype):
            x, grid = self._trunk(crops)
            return self._cls(x), self._dense(x, grid).contiguous()

    @torch.no_grad()
    def crop_embeddings(self, crops: torch.Tensor) -> torch.Tensor:
        """Normalised crops ``(B, 3, S, S)`` -> ``(B, D)`` float32, L2-normalised."""
        with autocast(self.device, self.dtype):
            return self._cls(self._trunk(crops)[0])

    @torch.no_grad()
    def dense_features(self, crops: torch.Tensor) -> torch.Tensor:
        """Normalised crops ``(B, 3, S, S)`` -> ``(B, D, S/p, S/p)`` float32, not normalised."""
        with autocast(self.device, self.dtype):
            return self._dense(*self._trunk(crops)).contiguous()


# ---- builders ---------------------------------------------------------------------------------


CLIP_ARCHS = {  # registry name -> open_clip architecture (clip_tiny: TINY_CLIP_CFG)
    "clip_vit_b16": "ViT-B-16",
    "clip_vit_l14": "ViT-L-14",
    "clip_vit_l14_336": "ViT-L-14-336",
}


def _adapt(sd: dict[str, torch.Tensor], model: nn.Module, _: Path) -> dict[str, torch.Tensor]:
    for key in ("input_resolution", "context_length", "vocab_size"):  # OpenAI JIT extras
        sd.pop(key, None)
    open_clip.model.resize_pos_embed(sd, model)
    open_clip.model.resize_text_pos_embed(sd, model)
    return sd


def _quiet_random_init(record: logging.LogRecord) -> bool:
    """Drops open_clip's "initialized randomly" warning when a checkpoint is loaded next."""
    return "initialized randomly" not in record.getMessage()


def _random_model(arch: str | None, quick_gelu: bool, quiet: bool) -> nn.Module:
    """A random open_clip model of ``arch``, or the tiny one (``None``)."""
    if arch is None:
        model = open_clip.CLIP(**TINY_CLIP_CFG, quick_gelu=quick_gelu)
        size = TINY_CLIP_CFG["vision_cfg"]["image_size"]
        mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
        open_clip.set_model_preprocess_cfg(model, {"size": size, "mean": mean, "std": std})
        return model
    root = logging.getLogger()
    if quiet:
        root.addFilter(_quiet_random_init)
    try:
        return open_clip.create_model(arch, pretrained=None, force_quick_gelu=quick_gelu)
    finally:
        root.removeFilter(_quiet_random_init)


def build_open_clip(
    name: str,
    weights: str | None,
    device: torch.device,
    *,
    store_options: dict[str, Any] | None = None,
    mode: Mode = "maskclip",
    precision: Precision = "auto",
    quick_gelu: bool | None = None,
    cache_dir: str | None = None,
    seed: int = 0,
) -> OpenClipDense:
    """CLIP ``name`` with weights from an open_clip pretrained tag, a file/URI, or random.

    ``quick_gelu``: ``None`` = what the pretrained tag was trained with; for files and
    random init, ``True`` (the registered architectures are OpenAI CLIP's).
    """
    arch = CLIP_ARCHS.get(name)
    tags = open_clip.list_pretrained_tags_by_model(arch) if arch else []
    tokenizer = open_clip.get_tokenizer(arch or TINY_TOKENIZER_ARCH)
    extra_fix = f"or an open_clip pretrained tag for {arch} ({', '.join(tags) or 'none'})"
    example = f"{name}.safetensors"
    if arch is not None and weights is not None and weights in tags:
        tag_cfg = open_clip.get_pretrained_cfg(arch, weights)
        qg = bool(tag_cfg.get("quick_gelu", False)) if quick_gelu is None else quick_gelu
        try:
            model = open_clip.create_model(
                arch, pretrained=weights, force_quick_gelu=qg, cache_dir=cache_dir
            )
        except RuntimeError as exc:
            if "Failed to download" not in str(exc):
                raise
            source = tag_cfg.get("hf_hub") or tag_cfg.get("url")
            looked = f"open_clip tag {weights!r} ({source})"
            raise tag_not_found(
                name, weights, "clip_weights", example, looked, exc, extra_fix
            ) from exc
        return OpenClipDense(model, tokenizer, name, mode, precision, device)
    qg = True if quick_gelu is None else quick_gelu
    model = build_seeded(
        lambda: _random_model(arch, qg, quiet=weights is not None),
        weights,
        "CLIP",
        name,
        seed=seed,
        adapt=_adapt,
        field="clip_weights",
        example=example,
        cache_dir=cache_dir,
        storage_options=store_options,
        extra_fix=extra_fix if arch else "",
    )
    return OpenClipDense(model, tokenizer, name, mode, precision, device)


register_builders(
    "clip",
    build_open_clip,
    {
        "clip_vit_b16": "open_clip ViT-B-16 (OpenAI: weights='openai'), 224 px",
        "clip_vit_l14": "open_clip ViT-L-14 (OpenAI: weights='openai'), 224 px",
        "clip_vit_l14_336": (
            "open_clip ViT-L-14-336 (OpenAI: weights='openai'), 336 px; the paper's CLIP"
        ),
        "clip_tiny": "random tiny open_clip ViT (patch 16, 64 px, D=32) with the real tokenizer",
    },
)
