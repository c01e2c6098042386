"""Benchmark dataset readers for the on-disk layouts people download (mmsegmentation's).

``open_dataset(name, root)`` returns a :class:`SegDataset`: a list of samples whose
iteration yields ``(sample_id, image HxWx3 uint8 RGB, label HxW uint8)``. Labels hold class
indices into ``dataset.classes`` and ``ignore_index`` (255) for pixels that are not
evaluated. ``root`` is the directory mmseg calls ``data_root`` (a local path or any fsspec
URI); one level above it also works (``data/`` for ``data/VOCdevkit/VOC2012``).

=================  ==========================================  =============================
name               root (mmseg ``data_root``) and files         label handling
=================  ==========================================  =============================
voc21              VOCdevkit/VOC2012: JPEGImages/*.jpg,         0 = background, 1..20
                   SegmentationClass/*.png (palette),
                   ImageSets/Segmentation/{split}.txt
voc20              same                                         reduce zero label: background
                                                                -> ignore, 1..20 -> 0..19
context60          VOCdevkit/VOC2010: JPEGImages/*.jpg,         0 = background, 1..59
                   SegmentationClassContext/*.png (mmseg's
                   converter), ImageSets/SegmentationContext/
                   {split}.txt
context59          same                                         reduce zero label
coco-stuff-171     coco_stuff164k: images/{split}2017/*.jpg,    train ids 0..170, 255 ignore
                   annotations/{split}2017/*_labelTrainIds.png
                   (or the raw stuffthingmaps *.png)
coco-object        same images; annotations/{split}2017/        0 = background, 1..80 things
                   *_instanceTrainIds.png, else derived from
                   *_labelTrainIds.png / raw *.png
cityscapes         cityscapes: leftImg8bit/{split}/*/           train ids 0..18, 255 ignore
                   *_leftImg8bit.png, gtFine/{split}/*/
                   *_gtFine_labelTrainIds.png (or labelIds)
ade20k             ADEChallengeData2016: images/validation/     reduce zero label: 0 (other)
                   *.jpg, annotations/validation/*.png          -> ignore, 1..150 -> 0..149
=================  ==========================================  =============================

COCO-Object follows TCL / SCLIP, which take GroupViT's ``convert_coco_object.py``: from
COCO-Stuff, thing classes keep their order as 1..80, stuff classes become background 0, and
-- a quirk of that script kept here so numbers compare -- COCO-Stuff's *unlabelled* 255
becomes background too (its mapping sends every raw id > 90, 255 included, to 0).

Images are decoded with PIL without EXIF rotation: labels are drawn on the stored pixels.
An image whose size differs from its label's is an error naming both files.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import fsspec
import numpy as np
from PIL import Image

from fmbseg.data.folder_dataset import open_folder_dataset
from fmbseg.data.vocab import load_vocabulary

IGNORE_INDEX = 255

# Cityscapes labelIds -> trainIds (cityscapesScripts helpers/labels.py); others -> 255.
# fmt: off
_CITYSCAPES_LABEL_TO_TRAIN = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
                              23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
# fmt: on
# Raw COCO-Stuff ids (0..181; 11 thing ids unused) -> the 171 train ids (mmseg's converter).
_COCO_UNUSED_RAW = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)


def _lut(pairs: dict[int, int], default: int = IGNORE_INDEX) -> np.ndarray:
    lut = np.full(256, default, dtype=np.uint8)
    for src, dst in pairs.items():
        lut[src] = dst
    return lut


def _coco_raw_to_train() -> np.ndarray:
    used = [r for r in range(182) if r not in _COCO_UNUSED_RAW]
    assert len(used) == 171
    return _lut({raw: i for i, raw in enumerate(used)})


CITYSCAPES_LABELID_LUT = _lut(_CITYSCAPES_LABEL_TO_TRAIN)
COCO_RAW_LUT = _coco_raw_to_train()
# reduce_zero_label (mmseg): 0 -> 255, v -> v - 1, 255 stays 255.
REDUCE_ZERO_LUT = (np.arange(256) - 1).astype(np.uint8)
REDUCE_ZERO_LUT[[0, 255]] = IGNORE_INDEX
# COCO-Stuff train ids -> COCO-Object: things t < 80 -> t + 1, stuff and 255 -> 0.
COCO_OBJECT_LUT = np.zeros(256, dtype=np.uint8)
COCO_OBJECT_LUT[:80] = np.arange(1, 81)


@dataclass(frozen=True)
class Sample:
    """One image and its label file, relative to the dataset root; ``lut`` maps raw values."""

    sample_id: str
    image: str
    label: str
    lut: str | None = None  # key of _LUTS applied to the decoded label, None = as stored


_LUTS = {
    "reduce_zero": REDUCE_ZERO_LUT,
    "cityscapes_labelids": CITYSCAPES_LABELID_LUT,
    "coco_raw": COCO_RAW_LUT,
    "coco_object_from_train": COCO_OBJECT_LUT,
    "coco_object_from_raw": COCO_OBJECT_LUT[COCO_RAW_LUT],
}


class DatasetError(ValueError):
    """A dataset root is wrong or incomplete, or a file cannot be read; says which."""


@dataclass
class SegDataset:
    """A benchmark split: samples, class names and label conventions.

    Iterating yields ``(sample_id, image HxWx3 uint8 RGB, label HxW uint8)``; ``label``
    values index :attr:`classes`, ``ignore_index`` marks unevaluated pixels. Pickles (for
    Ray workers) without its filesystem, which is rebuilt on first use.
    """

    name: str
    root: str  # URI as given by the user
    classes: tuple[str, ...]
    samples: tuple[Sample, ...]
    background: int | None = None  # index of the "background" class in ``classes``, if any
    ignore_index: int = IGNORE_INDEX
    storage_options: dict[str, Any] = field(default_factory=dict)
    _base: str = ""  # resolved root path inside the filesystem
    _fs: Any = field(default=None, repr=False, compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def sample_ids(self) -> list[str]:
        return [s.sample_id for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fs"] = None
        return state

    @property
    def fs(self) -> Any:
        if self._fs is None:
            self._fs, _ = fsspec.core.url_to_fs(self.root, **self.storage_options)
        return self._fs

    def subset(self, indices: Sequence[int]) -> SegDataset:
        """The same dataset restricted to ``indices`` (shards, ``limit``)."""
        return SegDataset(
            self.name,
            self.root,
            self.classes,
            tuple(self.samples[i] for i in indices),
            self.background,
            self.ignore_index,
            self.storage_options,
            self._base,
            self._fs,
        )

    def __getitem__(self, index: int) -> tuple[str, np.ndarray, np.ndarray]:
        return self.load(self.samples[index])

    def __iter__(self) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        for sample in self.samples:
            yield self.load(sample)

    def iter_labels(self) -> Iterator[tuple[str, np.ndarray]]:
        """``(sample_id, label HxW uint8)`` without decoding images (pseudo-label scoring)."""
        for sample in self.samples:
            yield sample.sample_id, self.load_label(sample)

    def load_label(self, sample: Sample) -> np.ndarray:
        label = decode_label(self._read(sample.label), sample.label)
        return label if sample.lut is None else _LUTS[sample.lut][label]

    def _read(self, rel: str) -> bytes:
        path = f"{self._base}/{rel}"
        try:
            return self.fs.cat_file(path)
        except FileNotFoundError as exc:
            raise DatasetError(f"{self.name} root {self.root}: {rel} not found") from exc

    def load(self, sample: Sample) -> tuple[str, np.ndarray, np.ndarray]:
        image = decode_rgb(self._read(sample.image), sample.image)
        label = self.load_label(sample)
        if label.shape != image.shape[:2]:
            raise DatasetError(
                f"{self.name} root {self.root}: label {sample.label} is "
                f"{label.shape[0]}x{label.shape[1]} but image {sample.image} is "
                f"{image.shape[0]}x{image.shape[1]}"
            )
        return sample.sample_id, image, label


def decode_rgb(data: bytes, uri: str) -> np.ndarray:
    """Encoded image bytes -> ``HxWx3 uint8 RGB`` (no EXIF rotation: labels match storage)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.array(img.convert("RGB"))  # writable, owns its memory
    except Exception as exc:  # noqa: BLE001 - PIL raises many types
        raise DatasetError(f"cannot decode image {uri}: {type(exc).__name__}: {exc}") from exc


def decode_label(data: bytes, uri: str) -> np.ndarray:
    """A label PNG (palette ``P`` or grayscale ``L``) -> ``HxW uint8`` of stored indices."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            mode = img.mode
            arr = np.array(img)
    except Exception as exc:  # noqa: BLE001
        raise DatasetError(f"cannot decode label {uri}: {type(exc).__name__}: {exc}") from exc
    if mode not in ("P", "L") or arr.ndim != 2:
        raise DatasetError(
            f"label {uri} has PIL mode {mode} (shape {arr.shape}); expected a single-channel "
            "index PNG (mode P or L), as the datasets ship it -- not a colour rendering"
        )
    return arr.astype(np.uint8, copy=False)


# ---- layouts ----------------------------------------------------------------------------------


class _Layout:
    """Resolves a root and lists the samples of one split for one dataset family."""

    def __init__(self, name: str, root: str, fs: Any, base: str) -> None:
        self.name, self.root, self.fs, self.base = name, root, fs, base

    def missing(self, rel: str) -> DatasetError:
        return DatasetError(f"{self.name} root {self.root}: {rel} not found")

    def read_text(self, rel: str) -> str:
        try:
            return self.fs.cat_file(f"{self.base}/{rel}").decode()
        except FileNotFoundError as exc:
            raise self.missing(rel) from exc

    def isdir(self, rel: str) -> bool:
        return self.fs.isdir(f"{self.base}/{rel}")

    def isfile(self, rel: str) -> bool:
        return self.fs.isfile(f"{self.base}/{rel}")

    def glob(self, pattern: str) -> list[str]:
        """Relative paths matching ``pattern`` under the root, sorted."""
        prefix = self.base.rstrip("/") + "/"
        found = [self.fs._strip_protocol(p) for p in self.fs.glob(prefix + pattern)]
        return sorted(p[len(prefix) :] for p in found if p.startswith(prefix))

    def require_dir(self, rel: str) -> None:
        if not self.isdir(rel):
            raise self.missing(f"{rel}/")


def _split_ids(layout: _Layout, rel: str) -> list[str]:
    ids = layout.read_text(rel).split()
    if not ids:
        raise DatasetError(f"{layout.name} root {layout.root}: {rel} lists no images")
    return ids


def _voc_like(
    layout: _Layout, split: str, dirs: tuple[str, str], lut: str | None = None
) -> list[Sample]:
    sets, labels = dirs
    ids = _split_ids(layout, f"ImageSets/{sets}/{split}.txt")
    layout.require_dir("JPEGImages")
    layout.require_dir(labels)
    return [Sample(i, f"JPEGImages/{i}.jpg", f"{labels}/{i}.png", lut) for i in ids]


def _coco(layout: _Layout, split: str, objects: bool) -> list[Sample]:
    img_dir, ann_dir = f"images/{split}2017", f"annotations/{split}2017"
    layout.require_dir(img_dir)
    layout.require_dir(ann_dir)
    images = [p for p in layout.glob(f"{img_dir}/*.jpg")]
    if not images:
        raise DatasetError(f"{layout.name} root {layout.root}: no .jpg images in {img_dir}/")
    anns = set(layout.glob(f"{ann_dir}/*.png"))
    out = []
    for rel in images:
        sid = rel.rsplit("/", 1)[-1][: -len(".jpg")]
        choices = (
            [
                (f"{ann_dir}/{sid}_instanceTrainIds.png", None),
                (f"{ann_dir}/{sid}_labelTrainIds.png", "coco_object_from_train"),
                (f"{ann_dir}/{sid}.png", "coco_object_from_raw"),
            ]
            if objects
            else [
                (f"{ann_dir}/{sid}_labelTrainIds.png", None),
                (f"{ann_dir}/{sid}.png", "coco_raw"),
            ]
        )
        found = next(((p, lut) for p, lut in choices if p in anns), None)
        if found is None:
            raise DatasetError(
                f"{layout.name} root {layout.root}: no annotation for {rel} "
                f"(looked for {', '.join(p for p, _ in choices)})"
            )
        out.append(Sample(sid, rel, found[0], found[1]))
    return out


def _cityscapes(layout: _Layout, split: str) -> list[Sample]:
    img_dir, gt_dir = f"leftImg8bit/{split}", f"gtFine/{split}"
    layout.require_dir(img_dir)
    layout.require_dir(gt_dir)
    images = layout.glob(f"{img_dir}/*/*_leftImg8bit.png")
    if not images:
        raise DatasetError(
            f"{layout.name} root {layout.root}: no *_leftImg8bit.png in {img_dir}/*/"
        )
    gts = set(layout.glob(f"{gt_dir}/*/*_gtFine_*.png"))
    out = []
    for rel in images:
        city, fname = rel.split("/")[-2:]
        stem = fname[: -len("_leftImg8bit.png")]
        train_ids = f"{gt_dir}/{city}/{stem}_gtFine_labelTrainIds.png"
        label_ids = f"{gt_dir}/{city}/{stem}_gtFine_labelIds.png"
        if train_ids in gts:
            out.append(Sample(f"{city}/{stem}", rel, train_ids))
        elif label_ids in gts:
            out.append(Sample(f"{city}/{stem}", rel, label_ids, "cityscapes_labelids"))
        else:
            raise DatasetError(f"{layout.name} root {layout.root}: {train_ids} not found")
    return out


def _ade(layout: _Layout, split: str) -> list[Sample]:
    sub = {"val": "validation", "train": "training"}.get(split, split)
    img_dir, ann_dir = f"images/{sub}", f"annotations/{sub}"
    layout.require_dir(img_dir)
    layout.require_dir(ann_dir)
    images = layout.glob(f"{img_dir}/*.jpg")
    if not images:
        raise DatasetError(f"{layout.name} root {layout.root}: no .jpg images in {img_dir}/")
    anns = set(layout.glob(f"{ann_dir}/*.png"))
    out = []
    for rel in images:
        sid = rel.rsplit("/", 1)[-1][: -len(".jpg")]
        ann = f"{ann_dir}/{sid}.png"
        if ann not in anns:
            raise DatasetError(f"{layout.name} root {layout.root}: {ann} not found")
        out.append(Sample(sid, rel, ann, "reduce_zero"))
    return out


@dataclass(frozen=True)
class _Spec:
    vocabulary: str  # built-in vocabulary holding ``classes`` in label order
    background: int | None
    subdirs: tuple[str, ...]  # where the data_root may sit below a parent directory
    marker: str  # a path that exists in a valid root, to find it
    lister: Any


_VOC, _CTX = ("VOCdevkit/VOC2012", "VOC2012"), ("VOCdevkit/VOC2010", "VOC2010")
_SEG, _CTXSETS = (
    ("Segmentation", "SegmentationClass"),
    ("SegmentationContext", "SegmentationClassContext"),
)
# fmt: off
DATASETS: dict[str, _Spec] = {
    "voc21": _Spec("voc-21", 0, _VOC, "ImageSets/Segmentation", partial(_voc_like, dirs=_SEG)),
    "voc20": _Spec("voc-20", None, _VOC, "ImageSets/Segmentation",
                   partial(_voc_like, dirs=_SEG, lut="reduce_zero")),
    "context60": _Spec("context-60", 0, _CTX, "ImageSets/SegmentationContext",
                       partial(_voc_like, dirs=_CTXSETS)),
    "context59": _Spec("context-59", None, _CTX, "ImageSets/SegmentationContext",
                       partial(_voc_like, dirs=_CTXSETS, lut="reduce_zero")),
    "coco-stuff-171": _Spec("coco-stuff-171", None, ("coco_stuff164k",), "annotations",
                            partial(_coco, objects=False)),
    "coco-object": _Spec("coco-object-81", 0, ("coco_stuff164k",), "annotations",
                         partial(_coco, objects=True)),
    "cityscapes": _Spec("cityscapes-19", None, ("cityscapes",), "gtFine", _cityscapes),
    "ade20k": _Spec("ade-150", None, ("ADEChallengeData2016",), "annotations", _ade),
}
_NAME_ALIASES = {
    "voc": "voc21", "voc-21": "voc21", "voc-20": "voc20", "pascal-voc": "voc21",
    "context": "context59", "context-59": "context59", "context-60": "context60",
    "pascal-context": "context59", "coco-stuff": "coco-stuff-171", "cocostuff": "coco-stuff-171",
    "cs-171": "coco-stuff-171", "coco-object-81": "coco-object", "coco-object-80": "coco-object",
    "co-80": "coco-object", "ade": "ade20k", "ade-150": "ade20k", "cityscapes-19": "cityscapes",
}
# fmt: on


def dataset_names() -> list[str]:
    """Names :func:`open_dataset` accepts (aliases aside)."""
    return sorted([*DATASETS, "folder"])


def open_dataset(
    name: str, root: str, storage_options: dict[str, Any] | None = None, split: str = "val"
) -> SegDataset:
    """Open a benchmark split stored in mmsegmentation's layout (see the module table).

    Args:
        name: ``voc21``, ``voc20``, ``context59``, ``context60``, ``coco-stuff-171``,
            ``coco-object``, ``cityscapes`` or ``ade20k`` (aliases like ``voc``, ``ade``).
        root: mmseg's ``data_root`` for it (or its parent), a local path or fsspec URI.
        storage_options: passed to fsspec (credentials, ``endpoint_url``...).
        split: ``val`` (default) or ``train``.

    Raises:
        DatasetError: unknown name, or a root that lacks a required file/directory (the
            message names the first one missing, e.g. ``VOC2012 root /x:
            ImageSets/Segmentation/val.txt not found``).
    """
    key = _NAME_ALIASES.get(name.lower(), name.lower())
    if key == "folder":  # users' own images/ + labels/ + classes.txt
        return open_folder_dataset(root, storage_options, split)
    spec = DATASETS.get(key)
    if spec is None:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(dataset_names())}")
    options = dict(storage_options or {})
    fs, base = fsspec.core.url_to_fs(root, **options)
    base = base.rstrip("/") or "/"
    if not fs.isdir(base):
        raise DatasetError(f"{key} root {root}: directory not found")
    # Accept the parent of mmseg's data_root too (data/ for data/VOCdevkit/VOC2012).
    if not fs.exists(f"{base}/{spec.marker}"):
        for sub in spec.subdirs:
            if fs.exists(f"{base}/{sub}/{spec.marker}"):
                base = f"{base}/{sub}"
                break
    layout = _Layout(key, root, fs, base)
    samples = spec.lister(layout, split)
    return SegDataset(
        name=key,
        root=root,
        classes=load_vocabulary(spec.vocabulary),
        samples=tuple(samples),
        background=spec.background,
        storage_options=options,
        _base=base,
        _fs=fs,
    )
