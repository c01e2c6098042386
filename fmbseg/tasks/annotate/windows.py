"""Sliding-window geometry of clip_dense (METHOD 1.1.1): resize, windows, grid -> pixels.

Geometry, and why it is exact. Let ``p`` be CLIP's patch size and ``c`` the crop size (a
multiple of ``p``). The image is resized so its short side is ``cfg.short_side`` and both
sides are rounded to multiples of ``p`` (at most ``p/2`` px of aspect change, accounted for
in the grid->pixel mapping). The stride is ``cfg.stride_ratio * c`` rounded to a multiple of
``p``. Windows therefore start on the patch grid, so every crop's ``(c/p, c/p)`` patch map
lands on whole cells of the full ``(H'/p, W'/p)`` feature grid and overlapping crops are
averaged cell by cell, with no resampling of features. A side shorter than a crop gets one
window whose overhang is zero padding (the normalised mean colour); the padded cells are cut
off after stitching.

Grid -> original pixels: cell ``(r, c)`` covers original pixels
``[r*cell_h, (r+1)*cell_h) x [c*cell_w, (c+1)*cell_w)`` with ``cell_h = H / grid_h`` (x =
column, y = row, origin at the top-left pixel's corner); its centre is
``((c + 0.5) * cell_w, (r + 0.5) * cell_h)`` in (x, y).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fmbseg.config import ClipDenseConfig
from fmbseg.models.base import Preprocess


def resize_short_side(
    height: int, width: int, short_side: int, multiple: int = 1
) -> tuple[int, int]:
    """Size ``(H', W')`` with the short side ~``short_side``, both sides multiples of ``multiple``.

    Each side is rounded to the nearest multiple (at least one ``multiple``), so the aspect
    ratio changes by at most ``multiple / 2`` pixels per side.
    """
    if height < 1 or width < 1:
        raise ValueError(f"resize_short_side: image size must be positive, got {height}x{width}")
    scale = short_side / min(height, width)

    def _round(v: float) -> int:
        return max(multiple, int(round(v / multiple)) * multiple)

    return _round(height * scale), _round(width * scale)


def axis_offsets(length: int, crop: int, stride: int) -> list[int]:
    """Window starts along one axis: ``0, stride, 2*stride, ...`` and a last one flush with the end."""
    if length <= crop:
        return [0]
    return [*range(0, length - crop, stride), length - crop]


def plan_windows(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int]]:
    """Top-left corners ``(y0, x0)`` of ``crop x crop`` windows covering an ``height x width`` image.

    Row-major, deterministic; the last window of each axis is flush with the edge; a side not
    longer than ``crop`` gets a single window at 0 (the caller pads). Requires
    ``0 < stride <= crop`` so consecutive windows leave no gap.
    """
    if not 0 < stride <= crop:
        raise ValueError(f"plan_windows: stride must be in (0, crop={crop}], got {stride}")
    return [
        (y, x)
        for y in axis_offsets(height, crop, stride)
        for x in axis_offsets(width, crop, stride)
    ]


@dataclass(frozen=True)
class Geometry:
    """How one image is resized, cut into windows and mapped back (see the module docstring)."""

    height: int  # original
    width: int
    resized_h: int  # multiples of patch
    resized_w: int
    crop: int
    patch: int
    windows: tuple[tuple[int, int], ...]  # (y0, x0) in resized pixels, multiples of patch

    @property
    def grid_h(self) -> int:
        return self.resized_h // self.patch

    @property
    def grid_w(self) -> int:
        return self.resized_w // self.patch

    @property
    def cell_h(self) -> float:
        """Original pixels per grid cell, vertically."""
        return self.height / self.grid_h

    @property
    def cell_w(self) -> float:
        return self.width / self.grid_w


def crop_and_stride(cfg: ClipDenseConfig, pre: Preprocess) -> tuple[int, int]:
    """The crop side (``cfg.crop_size`` or CLIP's input size) and the patch-aligned stride."""
    p = pre.patch_size
    crop = cfg.crop_size or pre.input_size
    if crop % p:
        raise ValueError(f"clip_dense.crop_size={crop} must be a multiple of the patch size {p}")
    stride = max(p, int(round(crop * cfg.stride_ratio / p)) * p)
    if stride > crop:
        raise ValueError(
            f"clip_dense.stride_ratio={cfg.stride_ratio} gives stride {stride} > crop {crop}"
        )
    return crop, stride


def geometry(height: int, width: int, cfg: ClipDenseConfig, pre: Preprocess) -> Geometry:
    crop, stride = crop_and_stride(cfg, pre)
    rh, rw = resize_short_side(height, width, cfg.short_side, pre.patch_size)
    return Geometry(
        height, width, rh, rw, crop, pre.patch_size, tuple(plan_windows(rh, rw, crop, stride))
    )


def prepare_image(
    image: np.ndarray, geo: Geometry, pre: Preprocess, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``HxWx3 uint8`` -> ``(3, max(H', crop), max(W', crop)) float32`` resized, normalised, padded.

    ``image`` is the original (``geo.height x geo.width``) or that image decoded at reduced
    size (:func:`decode_min_side`): it is resized to ``geo``'s size either way.

    Bicubic without antialiasing when enlarging (the paper's setting); antialiased when
    shrinking, which would otherwise alias.
    """
    image = np.ascontiguousarray(image)
    if not image.flags.writeable:  # decoded images may be read-only views; torch wants writable
        image = image.copy()
    t = torch.from_numpy(image).to(device)
    t = t.permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
    size = (geo.resized_h, geo.resized_w)
    h, w = image.shape[:2]  # the original size, or less when decoded at reduced size
    if size != (h, w):
        shrink = geo.resized_h * geo.resized_w < h * w
        t = F.interpolate(t, size=size, mode="bicubic", align_corners=False, antialias=shrink)
        t = t.clamp_(0.0, 1.0)
    t = pre.normalize(t)
    pad_h, pad_w = max(0, geo.crop - geo.resized_h), max(0, geo.crop - geo.resized_w)
    if pad_h or pad_w:
        t = F.pad(t, (0, pad_w, 0, pad_h))  # zeros = the mean colour after normalisation
    return t[0]


def decode_min_side(cfg: ClipDenseConfig, pre: Preprocess) -> int:
    """The short side an image may be decoded at (``decode_image(min_side=)``) and still
    be resized to :func:`geometry`'s size by shrinking: ``short_side`` plus one patch, since
    each resized side is rounded by at most half a patch."""
    return cfg.short_side + pre.patch_size
