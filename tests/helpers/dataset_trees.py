"""Tiny benchmark trees written in the exact on-disk formats the datasets ship in.

Each ``write_*`` function writes a few small images and label PNGs under ``root`` (any
fsspec URI) in mmsegmentation's layout -- file names, directory nesting, split lists,
palette vs. grayscale PNGs, the extra files real downloads contain -- and returns the
stored (raw) label of every sample, by sample id, in listing order, so tests can check
the readers' label handling against hand-written mappings.
"""

from __future__ import annotations

import io
from typing import Any

import fsspec
import numpy as np
from PIL import Image

H, W = 20, 28  # small, non-square, not a multiple of any patch size

VOC_PALETTE = [
    0,
    0,
    0,
    128,
    0,
    0,
    0,
    128,
    0,
    128,
    128,
    0,
    0,
    0,
    128,
    128,
    0,
    128,
    0,
    128,
    128,
    128,
    128,
    128,
    64,
    0,
    0,
    192,
    0,
    0,
    64,
    128,
    0,
    192,
    128,
    0,
    64,
    0,
    128,
    192,
    0,
    128,
    64,
    128,
    128,
    192,
    128,
    128,
    0,
    64,
    0,
    128,
    64,
    0,
    0,
    192,
    0,
    128,
    192,
    0,
    0,
    64,
    128,
] + [224, 224, 192] * 235


def _png(arr: np.ndarray, palette: list[int] | None = None) -> bytes:
    img = Image.fromarray(arr)  # uint8: HxW -> mode L, HxWx3 -> RGB
    if palette is not None:
        img.putpalette(palette)  # an L image becomes mode P with the same indices
        assert img.mode == "P"
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _jpg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def image(seed: int, h: int = H, w: int = W) -> np.ndarray:
    """A smooth RGB test image (JPEG-friendly)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(1, 1, 3))
    ramp = np.linspace(0, 60, w)[None, :, None] + np.linspace(0, 40, h)[:, None, None]
    return np.clip(base + ramp, 0, 255).astype(np.uint8)


def label(seed: int, values: list[int], h: int = H, w: int = W) -> np.ndarray:
    """Blocks of the given values (each value appears), in a fixed random arrangement."""
    rng = np.random.default_rng(seed)
    out = np.empty((h, w), dtype=np.uint8)
    blocks = [(r, c) for r in range(0, h, 5) for c in range(0, w, 7)]
    for i, (r, c) in enumerate(blocks):
        out[r : r + 5, c : c + 7] = values[i % len(values)]
    return out[:, rng.permutation(w)] if seed % 2 else out


def _fs(root: str, options: dict[str, Any] | None) -> tuple[Any, str]:
    fs, base = fsspec.core.url_to_fs(root, **(options or {}))
    return fs, base.rstrip("/")


def _put(fs: Any, path: str, data: bytes) -> None:
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    fs.pipe_file(path, data)


def write_voc(root: str, options: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """``VOCdevkit/VOC2012``: palette PNG labels 0..20 with 255 object borders."""
    fs, base = _fs(root, options)
    d = f"{base}/VOCdevkit/VOC2012"
    ids = ["2007_000033", "2007_000042", "2008_000002"]
    out = {}
    for i, sid in enumerate(ids):
        lab = label(i, [0, 1, 15, 20, 255, 11])
        _put(fs, f"{d}/JPEGImages/{sid}.jpg", _jpg(image(i)))
        _put(fs, f"{d}/SegmentationClass/{sid}.png", _png(lab, VOC_PALETTE))
        _put(fs, f"{d}/SegmentationObject/{sid}.png", _png(lab, VOC_PALETTE))
        out[sid] = lab
    _put(fs, f"{d}/JPEGImages/2009_999999.jpg", _jpg(image(9)))  # not in the val split
    _put(fs, f"{d}/ImageSets/Segmentation/val.txt", ("\n".join(ids) + "\n").encode())
    _put(fs, f"{d}/ImageSets/Segmentation/train.txt", b"2009_999999\n")
    return out


def write_context(root: str, options: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """``VOCdevkit/VOC2010`` with mmseg's converted ``SegmentationClassContext`` (L, 0..59)."""
    fs, base = _fs(root, options)
    d = f"{base}/VOCdevkit/VOC2010"
    ids = ["2008_000002", "2008_000008"]
    out = {}
    for i, sid in enumerate(ids):
        lab = label(i, [0, 1, 30, 59, 47])
        _put(fs, f"{d}/JPEGImages/{sid}.jpg", _jpg(image(i)))
        _put(fs, f"{d}/SegmentationClassContext/{sid}.png", _png(lab))
        out[sid] = lab
    _put(fs, f"{d}/ImageSets/SegmentationContext/val.txt", "\n".join(ids).encode())
    return out


def write_coco(
    root: str,
    options: dict[str, Any] | None = None,
    *,
    train_ids: bool = True,
    raw: bool = False,
    instance_ids: bool = False,
) -> dict[str, np.ndarray]:
    """``coco_stuff164k``: images/val2017 + annotations/val2017 ``*_labelTrainIds.png``
    (train ids 0..170, 255) and optionally the raw stuffthingmaps ``*.png`` (raw ids
    0..181) and TCL's ``*_instanceTrainIds.png``. Returns the *train-id* labels."""
    fs, base = _fs(root, options)
    d = f"{base}/coco_stuff164k"
    ids = ["000000000139", "000000000285"]
    # raw ids with their train ids: 0->0 person, 12->11 stop sign, 90 is unused,
    # 91->80 banner, 181->170 wood, 255 unlabelled
    raw_vals = [0, 12, 91, 181, 255, 89]
    raw_to_train = {0: 0, 12: 11, 91: 80, 181: 170, 255: 255, 89: 79}
    out = {}
    for i, sid in enumerate(ids):
        raw_lab = label(i, raw_vals)
        train_lab = np.vectorize(raw_to_train.get)(raw_lab).astype(np.uint8)
        _put(fs, f"{d}/images/val2017/{sid}.jpg", _jpg(image(i)))
        if train_ids:
            _put(fs, f"{d}/annotations/val2017/{sid}_labelTrainIds.png", _png(train_lab))
        if raw:
            _put(fs, f"{d}/annotations/val2017/{sid}.png", _png(raw_lab))
        if instance_ids:
            obj = np.where(train_lab < 80, train_lab + 1, 0).astype(np.uint8)
            _put(fs, f"{d}/annotations/val2017/{sid}_instanceTrainIds.png", _png(obj))
        out[sid] = train_lab
    return out


def write_cityscapes(
    root: str, options: dict[str, Any] | None = None, *, train_ids: bool = True
) -> dict[str, np.ndarray]:
    """``cityscapes``: leftImg8bit/val/{city}/*_leftImg8bit.png, gtFine with labelIds,
    labelTrainIds (if ``train_ids``), instanceIds, color and polygons files. Returns the
    *labelIds* labels (raw Cityscapes ids)."""
    fs, base = _fs(root, options)
    d = f"{base}/cityscapes"
    stems = [
        ("frankfurt", "frankfurt_000000_000294"),
        ("lindau", "lindau_000000_000019"),
        ("munster", "munster_000000_000019"),
    ]
    lut = {7: 0, 8: 1, 26: 13, 33: 18, 0: 255, 4: 255, 24: 11}
    out = {}
    for i, (city, stem) in enumerate(stems):
        ids = label(i, [7, 8, 26, 33, 0, 4, 24])
        trains = np.vectorize(lut.get)(ids).astype(np.uint8)
        _put(fs, f"{d}/leftImg8bit/val/{city}/{stem}_leftImg8bit.png", _png(image(i)))
        g = f"{d}/gtFine/val/{city}/{stem}_gtFine"
        _put(fs, f"{g}_labelIds.png", _png(ids))
        if train_ids:
            _put(fs, f"{g}_labelTrainIds.png", _png(trains))
        _put(fs, f"{g}_instanceIds.png", _png(ids))
        _put(fs, f"{g}_color.png", _png(np.dstack([ids, ids, ids])))
        _put(fs, f"{g}_polygons.json", b"{}")
        out[f"{city}/{stem}"] = ids
    return out


def write_ade(root: str, options: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """``ADEChallengeData2016``: images/validation/*.jpg, annotations/validation/*.png (0..150)."""
    fs, base = _fs(root, options)
    d = f"{base}/ADEChallengeData2016"
    ids = ["ADE_val_00000001", "ADE_val_00000002"]
    out = {}
    for i, sid in enumerate(ids):
        lab = label(i, [0, 1, 150, 13, 77])
        _put(fs, f"{d}/images/validation/{sid}.jpg", _jpg(image(i)))
        _put(fs, f"{d}/annotations/validation/{sid}.png", _png(lab))
        out[sid] = lab
    _put(fs, f"{d}/images/training/ADE_train_00000001.jpg", _jpg(image(5)))
    _put(fs, f"{d}/annotations/training/ADE_train_00000001.png", _png(label(5, [3])))
    return out
