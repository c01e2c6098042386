"""Predictors: what the evaluation protocol runs on each sliding window.

A :class:`Predictor` turns a batch of normalised windows into per-class score maps of the
same size (windows are ``window`` squares, or smaller and not square where the image is
smaller than a window: mmseg feeds those crops unpadded), given the text side it built once
per vocabulary with ``encode_text``. The protocol (:mod:`fmbseg.tasks.evaluate.protocol`)
owns resizing, windowing, averaging, background handling and argmax; predictors only score
windows, as cosine similarities in [-1, 1]: the training-free baselines
(:class:`DenseClipPredictor`), the stage-2 model (:class:`AlignmentPredictor`) and any
object with ``similarities(image, classes)`` (:class:`SimilaritiesPredictor`, one window at
a time).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from fmbseg.models.base import DenseClip, PatchEncoder, Preprocess


@runtime_checkable
class Predictor(Protocol):
    """Scores windows for a vocabulary.

    ``preprocess`` says how the protocol normalises windows (mean/std on [0, 1] pixels);
    ``device`` is where windows are sent.
    """

    preprocess: Preprocess
    device: torch.device

    def encode_text(self, names: Sequence[str], templates: tuple[str, ...]) -> Any:
        """The text side for ``names`` (e.g. ``(K, D)`` normalised embeddings), built once."""
        ...

    def scores(self, windows: torch.Tensor, text: Any) -> torch.Tensor:
        """``(B, 3, h, w) float32`` normalised windows -> ``(B, K, h, w) float32`` scores.

        ``h == w == window`` except where the image is smaller than the window.
        """
        ...


def _fit_to_patches(windows: torch.Tensor, patch: int) -> torch.Tensor:
    """Resize windows whose sides are not multiples of ``patch`` to the nearest multiples.

    The paper's windows (448) are multiples of 14 and 16; tiny test configs, and the
    unpadded crops of images smaller than a window, may not be. (SCLIP's patch convolution
    drops the remainder instead; resizing keeps every pixel.)
    """
    h, w = windows.shape[-2:]
    fitted = tuple(max(patch, int(s / patch + 0.5) * patch) for s in (h, w))
    if fitted == (h, w):
        return windows
    return F.interpolate(windows, size=fitted, mode="bilinear", align_corners=False)


def cosine_maps(features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """``(B, D, h, w)`` features, ``(K, D)`` text -> ``(B, K, h, w)`` cosine similarities."""
    f = F.normalize(features.float(), dim=1)
    t = F.normalize(text.to(f.device, torch.float32), dim=-1)
    return torch.einsum("bdhw,kd->bkhw", f, t)


class DenseClipPredictor:
    """MaskCLIP / SCLIP baseline: cosine of dense CLIP features with the class embeddings.

    Args:
        clip: a :class:`DenseClip`; its ``mode`` (``"maskclip"`` or ``"sclip"``) was chosen
            when it was built (``build_model(name, weights, device, mode=...)``).
    """

    def __init__(self, clip: DenseClip) -> None:
        self.clip = clip
        self.preprocess = clip.preprocess
        self.device = clip.device

    def __repr__(self) -> str:
        return f"DenseClipPredictor({self.clip!r})"

    def encode_text(self, names: Sequence[str], templates: tuple[str, ...]) -> torch.Tensor:
        return self.clip.encode_text(list(names), tuple(templates))

    @torch.no_grad()
    def scores(self, windows: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        size = windows.shape[-2:]
        x = _fit_to_patches(windows, self.preprocess.patch_size)
        sims = cosine_maps(self.clip.dense_features(x), text)
        return F.interpolate(sims, size=size, mode="bilinear", align_corners=False)


class AlignmentPredictor:
    """The stage-2 segmenter: DINOv2 patches -> alignment module -> cosine with CLIP text.

    Args:
        encoder: the frozen :class:`PatchEncoder` the module was trained on (its
            ``preprocess`` normalises the windows).
        module: maps ``(B, N, C)`` patch features to ``(B, N, D)`` embeddings (the trained
            ``AlignmentModule``, in eval mode).
        text_encoder: the CLIP whose text embeddings the module was aligned to.
        input_size: if given, each window is resized so its long side is this size (a full
            window becomes the square encoder input the module was trained at, as
            ``OpenVocabSegmenter`` does; a crop cut short by a small image keeps its aspect
            ratio), sides rounded to multiples of the patch size; else a window is used at
            its own size, rounded to multiples of the patch size.
    """

    def __init__(
        self,
        encoder: PatchEncoder,
        module: Callable[[torch.Tensor], torch.Tensor],
        text_encoder: DenseClip,
        input_size: int | None = None,
    ) -> None:
        self.encoder = encoder
        self.module = module
        self.text_encoder = text_encoder
        self.input_size = input_size
        self.preprocess = encoder.preprocess
        self.device = torch.device(getattr(encoder, "device", "cpu"))
        if isinstance(module, torch.nn.Module):
            module.eval()

    @classmethod
    def from_segmenter(cls, segmenter: Any) -> AlignmentPredictor:
        """The batched equivalent of an ``OpenVocabSegmenter`` (``fmbseg.segment``):
        its encoder, module, text model and training input size."""
        return cls(
            segmenter.encoder,
            segmenter.module,
            segmenter.text_model,
            input_size=int(segmenter.input_size),
        )

    def __repr__(self) -> str:
        return f"AlignmentPredictor({self.encoder!r}, input_size={self.input_size})"

    def encode_text(self, names: Sequence[str], templates: tuple[str, ...]) -> torch.Tensor:
        return self.text_encoder.encode_text(list(names), tuple(templates))

    @torch.no_grad()
    def scores(self, windows: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        size = windows.shape[-2:]
        p = self.preprocess.patch_size
        x = windows
        if self.input_size is not None and max(size) != self.input_size:
            scale = self.input_size / max(size)
            target = [max(1, int(s * scale + 0.5)) for s in size]
            x = F.interpolate(x, size=target, mode="bilinear", align_corners=False)
        x = _fit_to_patches(x, p)
        gh, gw = x.shape[-2] // p, x.shape[-1] // p
        feats = self.encoder.patch_features(x)  # (B, N, C), row-major patches
        z = self.module(feats.to(self.device))  # (B, N, D)
        z = z.transpose(1, 2).reshape(z.shape[0], z.shape[2], gh, gw)
        sims = cosine_maps(z, text)
        return F.interpolate(sims, size=size, mode="bilinear", align_corners=False)


# Windows for SimilaritiesPredictor are "normalised" to plain 0..255 pixel values.
PIXELS = Preprocess(
    mean=(0.0, 0.0, 0.0), std=(1 / 255, 1 / 255, 1 / 255), input_size=0, patch_size=1
)


class SimilaritiesPredictor:
    """Adapter for an object with ``similarities(image HxWx3 uint8, classes) -> (K, H, W)``.

    Each window is handed over as an image (its ``preprocess`` keeps windows in 0..255
    pixel values, so they round back to uint8 exactly); the object does its own
    normalisation, text embedding and upsampling. ``templates`` are the object's concern.
    """

    def __init__(self, segmenter: Any, device: str | torch.device = "cpu") -> None:
        if not callable(getattr(segmenter, "similarities", None)):
            raise TypeError(
                f"SimilaritiesPredictor: {type(segmenter).__name__} has no "
                "similarities(image, classes) method"
            )
        self.segmenter = segmenter
        self.preprocess = PIXELS
        self.device = torch.device(device)

    def encode_text(self, names: Sequence[str], templates: tuple[str, ...]) -> list[str]:
        return list(names)

    @torch.no_grad()
    def scores(self, windows: torch.Tensor, text: list[str]) -> torch.Tensor:
        out = []
        for w in windows:
            image = w.clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
            sims = self.segmenter.similarities(np.ascontiguousarray(image), text)
            out.append(torch.as_tensor(sims, dtype=torch.float32).to(windows.device))
        return torch.stack(out)
