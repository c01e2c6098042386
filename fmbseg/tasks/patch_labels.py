"""Per-patch pseudo labels from a composed label map (METHOD.md stage 2, "ours").

A label map (``HxW uint8``, 255 = ignore) is resized with nearest-neighbour sampling to the
encoder's square input (``input_size x input_size``, the same squash the image gets), cut into
the encoder's ``patch_size`` grid, and each patch takes the majority label of its pixels.
A patch is ignored (-1) when it is *mostly unlabelled* (more than half of its pixels are 255)
or when its majority label covers less than ``min_fraction`` of the patch.
"""

from __future__ import annotations

import numpy as np

IGNORE = 255  # label-map value of unlabelled pixels (fmbseg.storage.records.IGNORE)


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
        input_size: side of the square encoder input, a multiple of ``patch_size``.
        patch_size: encoder patch side in pixels (14 for DINOv2).
        min_fraction: a patch's majority label must cover at least this fraction of its pixels
            (ignored pixels count in the total), else the patch is ignored.

    Returns:
        ``(g*g,) int64`` with ``g = input_size // patch_size``, row-major like the encoder's
        patch tokens; the label value, or -1 for an ignored patch. Ties between labels go to
        the smaller label value.
    """
    if label_map.ndim != 2 or label_map.dtype != np.uint8:
        raise ValueError(
            f"patch_labels: expected an HxW uint8 label map, got "
            f"{label_map.dtype} of shape {label_map.shape}"
        )
    if input_size % patch_size:
        raise ValueError(
            f"patch_labels: input_size {input_size} is not a multiple of the "
            f"patch size {patch_size}"
        )
    g = input_size // patch_size
    resized = resize_nearest(label_map, input_size)
    # (g, p, g, p) -> (g*g, p*p): the pixels of each patch, patches row-major.
    pixels = resized.reshape(g, patch_size, g, patch_size).transpose(0, 2, 1, 3).reshape(g * g, -1)
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
