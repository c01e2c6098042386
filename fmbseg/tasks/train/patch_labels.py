"""Per-patch pseudo labels from a composed label map (METHOD.md stage 2, "ours").

A label map (``HxW uint8``, 255 = ignore) is resized with nearest-neighbour sampling to the
geometry of the encoder input, cut into the encoder's ``patch_size`` grid, and each patch
takes the majority label of its pixels. Training uses :func:`crop_patch_labels`: the same
short-side resize and crop the image gets (:mod:`fmbseg.tasks.train.crops`);
:func:`patch_labels` squashes the whole map to a square (a plain reference labelling).
A patch is ignored (-1) when it is *mostly unlabelled* (more than half of its pixels are 255)
or when its majority label covers less than ``min_fraction`` of the patch.
"""

from __future__ import annotations

import numpy as np

from fmbseg.storage.records import IGNORE
from fmbseg.tasks.train.crops import CropBox


def resize_nearest(label_map: np.ndarray, size: int) -> np.ndarray:
    """``HxW`` -> ``size x size`` by nearest-neighbour sampling at pixel centres.

    Output pixel ``(r, c)`` takes input pixel ``(floor((r + 0.5) * H / size),
    floor((c + 0.5) * W / size))`` (torch's ``nearest-exact``), so no label value is invented.
    """
    h, w = label_map.shape
    rows = np.minimum(((np.arange(size) + 0.5) * h / size).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(size) + 0.5) * w / size).astype(np.int64), w - 1)
    return label_map[rows[:, None], cols[None, :]]


def patch_labels(
    label_map: np.ndarray, input_size: int, patch_size: int, min_fraction: float
) -> np.ndarray:
    """Majority label of each encoder patch.

    Args:
        label_map: ``HxW uint8`` label values (category ids), ``255`` = ignore.
        input_size: side of the square the whole map is squashed to, a multiple of
            ``patch_size``.
        patch_size: encoder patch side in pixels (14 for DINOv2).
        min_fraction: a patch's majority label must cover at least this fraction of its pixels
            (ignored pixels count in the total), else the patch is ignored.

    Returns:
        ``(g*g,) int64`` with ``g = input_size // patch_size``, row-major like the encoder's
        patch tokens; the label value, or -1 for an ignored patch. Ties between labels go to
        the smaller label value.
    """
    _check(label_map, input_size, patch_size)
    return majority_labels(resize_nearest(label_map, input_size), patch_size, min_fraction)


def crop_patch_labels(
    label_map: np.ndarray, box: CropBox, size: int, patch_size: int, min_fraction: float
) -> np.ndarray:
    """Majority label of each patch of a training crop (:func:`patch_labels`' rules).

    The map is resized to ``(box.resized_h, box.resized_w)`` by nearest sampling at pixel
    centres (output ``r`` takes input ``floor((r + 0.5) * H / resized_h)``, the centres the
    image's bilinear resize uses) and the ``size x size`` crop at ``(box.y0, box.x0)`` is
    labelled; only the crop's pixels are sampled. Returns ``(g*g,) int64``, ``g = size //
    patch_size``, row-major like the encoder's patch tokens of that crop.
    """
    _check(label_map, size, patch_size)
    h, w = label_map.shape
    r = np.arange(box.y0, box.y0 + size)
    c = np.arange(box.x0, box.x0 + size)
    rows = np.minimum(((r + 0.5) * h / box.resized_h).astype(np.int64), h - 1)
    cols = np.minimum(((c + 0.5) * w / box.resized_w).astype(np.int64), w - 1)
    return majority_labels(label_map[rows[:, None], cols[None, :]], patch_size, min_fraction)


def _check(label_map: np.ndarray, size: int, patch_size: int) -> None:
    if label_map.ndim != 2 or label_map.dtype != np.uint8:
        raise ValueError(
            f"patch_labels: expected an HxW uint8 label map, got "
            f"{label_map.dtype} of shape {label_map.shape}"
        )
    if size % patch_size:
        raise ValueError(
            f"patch_labels: input_size {size} is not a multiple of the patch size {patch_size}"
        )


def majority_labels(square: np.ndarray, patch_size: int, min_fraction: float) -> np.ndarray:
    """``S x S uint8`` map at encoder resolution -> ``(g*g,) int64`` patch labels, -1 ignored."""
    g = square.shape[0] // patch_size
    # (g, p, g, p) -> (g*g, p*p): the pixels of each patch, patches row-major.
    pixels = square.reshape(g, patch_size, g, patch_size).transpose(0, 2, 1, 3).reshape(g * g, -1)
    keys = np.arange(g * g, dtype=np.int64)[:, None] * 256 + pixels
    counts = np.bincount(keys.ravel(), minlength=g * g * 256).reshape(g * g, 256)
    labelled = counts[:, :IGNORE]
    majority = labelled.argmax(axis=1)
    top = labelled[np.arange(g * g), majority]
    area = patch_size * patch_size
    # One knob: at the default 0.5 a kept patch is also at least half labelled, so mostly
    # unlabelled patches are ignored; a lower threshold (noisy or sparse labels) keeps more.
    keep = (top >= min_fraction * area) & (top > 0)
    return np.where(keep, majority, -1).astype(np.int64)
