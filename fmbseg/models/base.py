"""The small interfaces that tasks depend on. Real and tiny models both implement them.

Conventions used throughout:
- images are ``HxWx3 uint8 RGB`` numpy arrays, or ``(B, 3, H, W) float32`` tensors already
  normalised with the model's own :class:`Preprocess` when a method says "tensor";
- coordinates are pixels, ``(x, y)`` = (column, row), origin at the top-left pixel's corner;
- boxes are ``XYWH`` in pixels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch

Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def compute_dtype(precision: str, device: torch.device, name: str) -> torch.dtype:
    """The autocast dtype of a model on ``device``: ``auto`` = bf16 on CUDA; ``bf16``/``fp16``
    on CUDA; always float32 on a CPU. An unknown ``precision`` is an error naming ``name``."""
    if precision not in ("auto", *PRECISIONS):
        raise ValueError(f"{name}: precision {precision!r} is not one of {['auto', *PRECISIONS]}")
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if precision == "auto" else PRECISIONS[precision]


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` to ``dtype`` on ``device``, or no context for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def check_image(image: np.ndarray, what: str) -> None:
    """Raise a ValueError naming ``what`` unless ``image`` is an ``HxWx3 uint8`` array."""
    if not (
        isinstance(image, np.ndarray)
        and image.ndim == 3
        and image.shape[2] == 3
        and image.dtype == np.uint8
    ):
        desc = f"{type(image).__name__} {getattr(image, 'shape', '')} {getattr(image, 'dtype', '')}"
        raise ValueError(f"{what}: expected an HxWx3 uint8 RGB array, got {desc}")


@dataclass(frozen=True)
class Preprocess:
    """What a model expects of its input; travels with the model (STYLE 5)."""

    mean: tuple[float, float, float]  # per channel, on [0, 1] pixel values
    std: tuple[float, float, float]
    input_size: int  # square side the model was trained at (CLIP crop, DINOv2 input)
    patch_size: int  # ViT patch side in pixels

    def normalize(self, images: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """``(B, 3, H, W)`` float pixels on ``[0, scale]`` -> normalised with this model's
        mean/std (each scaled by ``scale``: ``255.0`` normalises 0..255 pixels directly)."""
        mean = torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1) * scale
        std = torch.tensor(self.std, device=images.device).view(1, 3, 1, 1) * scale
        return (images - mean) / std

    def grid(self, images: torch.Tensor, what: str) -> tuple[int, int]:
        """The patch grid ``(H/p, W/p)`` of ``(B, 3, H, W)`` float images; a ValueError
        naming ``what`` for any other shape or dtype, or sides not multiples of ``p``."""
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(
                f"{what}: expected (B, 3, H, W) float, got {tuple(images.shape)} {images.dtype}"
            )
        (h, w), p = images.shape[-2:], self.patch_size
        if h % p or w % p:
            raise ValueError(f"{what}: image size {h}x{w} is not a multiple of the patch size {p}")
        return h // p, w // p


@runtime_checkable
class DenseClip(Protocol):
    """CLIP with crop-level and dense (patch-level) embeddings in the joint space."""

    preprocess: Preprocess
    embed_dim: int  # D, the joint image-text width
    device: torch.device

    def encode_text(self, names: list[str], templates: tuple[str, ...]) -> torch.Tensor:
        """``(K, D) float32``, L2-normalised, averaged over templates (``"a photo of a {}."``)."""
        ...

    def crop_embeddings(self, crops: torch.Tensor) -> torch.Tensor:
        """CLS embeddings of normalised crops ``(B, 3, S, S)`` -> ``(B, D)`` L2-normalised."""
        ...

    def dense_features(self, crops: torch.Tensor) -> torch.Tensor:
        """Patch features of normalised crops ``(B, 3, S, S)`` -> ``(B, D, S/p, S/p)``.

        In the joint space (MaskCLIP or SCLIP last block, then ln_post and proj), not
        normalised. Any ``S`` divisible by the patch size works (positional embeddings are
        interpolated).
        """
        ...

    def crops_and_dense(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both of the above from one trunk pass: ``((B, D), (B, D, S/p, S/p))``."""
        ...


@runtime_checkable
class Segmenter(Protocol):
    """SAM: point-prompted and automatic masks on one image at a time."""

    def set_image(self, image: np.ndarray) -> None:
        """Embed ``HxWx3 uint8 RGB``; later calls refer to this image."""
        ...

    def predict(
        self, points: np.ndarray, labels: np.ndarray, multimask: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Points ``(P, 2)`` float ``(x, y)`` in original pixels, labels ``(P,)`` 1=positive.

        Returns masks ``(M, H, W) bool`` and predicted IoU scores ``(M,) float32``
        (M = 3 with multimask, else 1).
        """
        ...

    def predict_batch(
        self, points: np.ndarray, labels: np.ndarray, multimask: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """``B`` prompts on the current image at once: points ``(B, P, 2)``, labels
        ``(B, P)`` -> masks ``(B, M, H, W) bool``, scores ``(B, M) float32``; prompt ``b``
        gets what :meth:`predict` gives for ``points[b]``, ``labels[b]``."""
        ...

    def generate(self, image: np.ndarray) -> list[dict]:
        """Automatic masks of ``image`` in segment-anything's record format
        (``segmentation`` HxW bool, ``area``, ``bbox`` XYWH, ``predicted_iou``,
        ``stability_score``), already filtered by the configured thresholds."""
        ...


@runtime_checkable
class PatchEncoder(Protocol):
    """Frozen DINOv2: patch features of a batch of normalised images."""

    preprocess: Preprocess
    embed_dim: int  # C
    name: str  # registry name, recorded in checkpoints

    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` normalised, H and W multiples of the patch size ->
        ``(B, N, C) float32`` with N = (H/p)*(W/p), row-major, CLS and registers dropped."""
        ...


@dataclass(frozen=True)
class ConceptMasks:
    """What a :class:`ConceptSegmenter` finds of one class name in one image."""

    presence: float  # probability that the concept is in the image at all, in [0, 1]
    masks: np.ndarray  # (M, H, W) bool, one instance each, at the image's original size
    scores: np.ndarray  # (M,) float32 in [0, 1], descending: instance probability x presence


@runtime_checkable
class ConceptSegmenter(Protocol):
    """SAM 3: instance masks of text concepts (class names) on one image at a time."""

    def set_image(self, image: np.ndarray) -> None:
        """Embed ``HxWx3 uint8 RGB`` once; later calls refer to this image."""
        ...

    def segment_concepts(
        self, names: Sequence[str], *, min_score: float = 0.0, max_masks: int | None = None
    ) -> list[ConceptMasks]:
        """One :class:`ConceptMasks` per name, in order, for the set image (encoded once for
        all names). Instances scoring below ``min_score`` are dropped and at most
        ``max_masks`` kept per name (``None`` = all), before masks are made full size."""
        ...
