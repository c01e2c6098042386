"""A labelled segmentation split and what every on-disk layout shares.

:class:`SegDataset`, :class:`Sample`, the label look-up tables, :class:`DatasetError` and
:class:`Layout`; the layouts themselves are in :mod:`fmbseg.data.datasets` (mmsegmentation's
benchmark trees) and :mod:`fmbseg.data.folder_dataset` (users' own ``images/`` + ``labels/``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
from PIL import Image

from fmbseg.data.sources import file_version

__all__ = [
    "IGNORE_INDEX",
    "LUTS",
    "DatasetError",
    "Layout",
    "Sample",
    "SegDataset",
    "decode_label",
    "decode_rgb",
]

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
# COCO-Object things only (coco-object-80): the 81-class map with background 0 ignored.
COCO_OBJECT80_LUT = REDUCE_ZERO_LUT[COCO_OBJECT_LUT]


@dataclass(frozen=True)
class Sample:
    """One image and its label file, relative to the dataset root; ``lut`` maps raw values."""

    sample_id: str
    image: str
    label: str
    lut: str | None = None  # key of LUTS applied to the decoded label, None = as stored


LUTS = {
    "reduce_zero": REDUCE_ZERO_LUT,
    "cityscapes_labelids": CITYSCAPES_LABELID_LUT,
    "coco_raw": COCO_RAW_LUT,
    "coco_object_from_train": COCO_OBJECT_LUT,
    "coco_object_from_raw": COCO_OBJECT_LUT[COCO_RAW_LUT],
    "coco_object80": REDUCE_ZERO_LUT,  # from *_instanceTrainIds.png (0 = background)
    "coco_object80_from_train": COCO_OBJECT80_LUT,
    "coco_object80_from_raw": COCO_OBJECT80_LUT[COCO_RAW_LUT],
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

    def files_digest(self, images: bool = True) -> str:
        """A digest of the samples' ids and the size and version of each one's label (and
        image) file, so that a file edited in place changes it (what a cached evaluation is
        keyed on). The version is the object store's ETag, else the modification time.

        One listing per folder holding sample files, no file read. A file the listing lacks
        counts as missing (reading that sample fails, as an error of its own).
        """
        fs = self.fs
        listed: dict[str, dict[str, dict[str, Any]]] = {}
        digest = hashlib.sha256()
        for sample in self.samples:
            digest.update(f"{sample.sample_id}\n".encode())
            for rel in (sample.image, sample.label) if images else (sample.label,):
                path = fs._strip_protocol(f"{self._base}/{rel}")
                folder = path.rsplit("/", 1)[0]
                if folder not in listed:
                    listed[folder] = _listing(fs, folder)
                info = listed[folder].get(path)
                version = f"{info.get('size')}:{file_version(info) or ''}" if info else "missing"
                digest.update(f"{rel}\0{version}\n".encode())
        return digest.hexdigest()[:16]

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
        return dataclasses.replace(self, samples=tuple(self.samples[i] for i in indices))

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
        return label if sample.lut is None else LUTS[sample.lut][label]

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


def _listing(fs: Any, folder: str) -> dict[str, dict[str, Any]]:
    """``{path: info}`` of ``folder``'s entries, listed afresh (not from fsspec's cache)."""
    if hasattr(fs, "invalidate_cache"):
        fs.invalidate_cache(folder)
    try:
        entries = fs.ls(folder, detail=True)
    except FileNotFoundError:
        return {}
    return {fs._strip_protocol(e["name"]).rstrip("/"): e for e in entries}


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


class Layout:
    """A dataset root resolved on its filesystem, to list one split's samples from."""

    def __init__(self, name: str, root: str, storage_options: dict[str, Any] | None) -> None:
        """Raises :class:`DatasetError` when ``root`` is not a directory."""
        self.name, self.root, self.options = name, root, dict(storage_options or {})
        self.fs, base = fsspec.core.url_to_fs(root, **self.options)
        self.base = base.rstrip("/") or "/"
        if not self.fs.isdir(self.base):
            raise DatasetError(f"{name} root {root}: directory not found")

    def missing(self, rel: str) -> DatasetError:
        return DatasetError(f"{self.name} root {self.root}: {rel} not found")

    def read_text(self, rel: str) -> str:
        try:
            return self.fs.cat_file(f"{self.base}/{rel}").decode()
        except FileNotFoundError as exc:
            raise self.missing(rel) from exc

    def glob(self, pattern: str) -> list[str]:
        """Relative paths matching ``pattern`` under the root, sorted."""
        prefix = self.base.rstrip("/") + "/"
        found = [self.fs._strip_protocol(p) for p in self.fs.glob(prefix + pattern)]
        return sorted(p[len(prefix) :] for p in found if p.startswith(prefix))

    def require_dir(self, *rels: str) -> None:
        for rel in rels:
            if not self.fs.isdir(f"{self.base}/{rel}"):
                raise self.missing(f"{rel}/")

    def dataset(
        self, classes: tuple[str, ...], samples: Sequence[Sample], background: int | None = None
    ) -> SegDataset:
        return SegDataset(
            self.name,
            self.root,
            classes,
            tuple(samples),
            background,
            storage_options=self.options,
            _base=self.base,
            _fs=self.fs,
        )
