"""Stage-2 training geometry (METHOD.md stage 2, "Training geometry"): short side, then crops.

Inference (:mod:`fmbseg.segment`) and the evaluation protocol resize an image so its
short side is the window and slide square windows over it, so objects keep their aspect
ratio. Training does the same instead of squashing the whole image to a square: the image is
resized so its short side is ``size`` (``train.input_size``; the long side ``L`` becomes
``round(L * size / short)``, bilinear as in inference), and the encoder sees ``size x size``
crops of it. The patch labels come from the same crop of the label map, resized the same way
(nearest, at the same pixel centres), so labels and features stay aligned.

Crops. An image has up to ``n`` crop slots (``train.crops_per_image``). Slot ``j``'s offset
along the long side is drawn uniformly from the ``j``-th of ``n`` equal strata of
``[0, L' - size]`` (so the slots spread over the image), by a hash of ``(image_id, j)``; equal
offsets (a near-square image) are kept once. The crops are therefore a function of the image
alone, which is what keeps the DINOv2 feature cache correct: it stores the features of
exactly the crops training reads, not a crop of the whole resized image's features (those
differ, since every token attends to the whole encoder input), and every seed reuses it.
The seed picks, per epoch, which slot each image shows (:class:`~fmbseg.tasks.train.data.
EpochOrder`): slots cycle from a seeded random phase, so over the epochs every image is seen
through each of its crops, in a different order for each seed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fmbseg.models.base import Preprocess


@dataclass(frozen=True)
class CropBox:
    """One training crop: the short-side-resized size and the crop's top-left corner.

    ``(resized_h, resized_w)`` in pixels of the resized image (its short side = the crop
    side); the crop covers rows ``[y0, y0 + size)`` and columns ``[x0, x0 + size)`` of it.
    """

    resized_h: int
    resized_w: int
    y0: int
    x0: int

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.resized_h, self.resized_w, self.y0, self.x0)


def resized_short_side(height: int, width: int, size: int) -> tuple[int, int]:
    """``(H', W')`` with the short side exactly ``size`` and the long side rounded half up."""
    if height <= width:
        return size, max(size, (2 * width * size + height) // (2 * height))
    return max(size, (2 * height * size + width) // (2 * width)), size


def _unit_hash(image_id: str, slot: int) -> float:
    digest = hashlib.blake2b(f"{image_id}\0{slot}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64  # in [0, 1)


def crop_boxes(image_id: str, height: int, width: int, size: int, n: int) -> list[CropBox]:
    """The (at most ``n``, distinct) training crops of an image ``height x width``."""
    if n < 1:
        raise ValueError(f"train.crops_per_image must be >= 1, got {n}")
    rh, rw = resized_short_side(height, width, size)
    free = max(rh, rw) - size  # offsets 0..free along the long side
    boxes: list[CropBox] = []
    for j in range(n):
        offset = int((j + _unit_hash(image_id, j)) * (free + 1) / n)
        offset = min(offset, free)  # float rounding at the stratum's upper end
        box = CropBox(rh, rw, offset, 0) if rh > rw else CropBox(rh, rw, 0, offset)
        if box not in boxes:
            boxes.append(box)
    return boxes


def crop_inputs(
    image: np.ndarray, boxes: list[CropBox], preprocess: Preprocess, size: int
) -> torch.Tensor:
    """``HxWx3 uint8 RGB`` -> ``(len(boxes), 3, size, size) float32`` normalised crops.

    The image is resized once to the boxes' ``(resized_h, resized_w)`` (bilinear,
    ``align_corners=False``, no antialiasing: what the evaluation protocol and ``segment``
    do), scaled to [0, 1], normalised with the encoder's mean/std and cropped.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got {image.dtype} {image.shape}")
    if not boxes:
        raise ValueError("crop_inputs: no crop box given")
    shape = (boxes[0].resized_h, boxes[0].resized_w)
    if any((b.resized_h, b.resized_w) != shape for b in boxes):
        raise ValueError(f"crop_inputs: boxes of one image must share its resized size {shape}")
    t = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float()  # copy: may be read-only
    if tuple(t.shape[-2:]) != shape:
        t = F.interpolate(t, size=shape, mode="bilinear", align_corners=False)
    t = preprocess.normalize(t.div_(255.0))[0]
    return torch.stack([t[:, b.y0 : b.y0 + size, b.x0 : b.x0 + size] for b in boxes])
