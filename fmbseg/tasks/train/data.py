"""Training data for stage 2: per-patch labels from merged records, datasets and batch order.

:func:`labelled_images` turns the merge stage's records (one row per mask) into one
``(N,)`` patch-label vector per training crop of each image (:mod:`fmbseg.tasks.train.crops`:
short side resized to the input size, square crops; :mod:`fmbseg.tasks.train.patch_labels`),
checking that the records' categories are the training vocabulary's. :class:`PatchDataset`
yields ``(input, labels)`` pairs for ``(image, crop slot)`` keys whose input is either cached
DINOv2 features ``(N, C) float32`` of that crop or the crop itself, ``(3, S, S) float32``;
:class:`EpochOrder` fixes the visiting order and each image's crop slot of each epoch from
``(seed, epoch)`` alone, so a resumed run replays exactly the same batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from fmbseg.models.base import Preprocess
from fmbseg.storage.records import compose_label_map
from fmbseg.tasks.train.crops import CropBox, crop_boxes, crop_inputs
from fmbseg.tasks.train.features import FeatureCache, load_image
from fmbseg.tasks.train.patch_labels import crop_patch_labels


class NoLabelledPatchesError(ValueError):
    """The pseudo-label set gives no image a single labelled patch: nothing to train on."""


def vocabulary_names(vocab: Any) -> list[str]:
    """A list of class names from a list/tuple of strings or an object with ``.names``."""
    names = getattr(vocab, "names", vocab)
    if isinstance(names, str) or not isinstance(names, Sequence) or not names:
        raise ValueError(f"vocabulary must be a non-empty list of class names, got {vocab!r}")
    names = list(names)
    bad = [n for n in names if not isinstance(n, str) or not n.strip()]
    if bad:
        raise ValueError(f"vocabulary: class names must be non-empty strings, got {bad[:5]}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"vocabulary: duplicate class names {dupes[:10]}")
    return names


def check_categories(records: pa.Table, names: Sequence[str], what: str) -> None:
    """Every (category_id, category) of ``records`` must be ``names[category_id]``."""
    pairs = (
        records.select(["category_id", "category"])
        .group_by(["category_id", "category"])
        .aggregate([])
        .to_pylist()
    )
    wrong = [
        (p["category_id"], p["category"])
        for p in pairs
        if not (0 <= p["category_id"] < len(names) and names[p["category_id"]] == p["category"])
    ]
    if wrong:
        cid, cat = wrong[0]
        have = (
            f"{names[cid]!r} at that id"
            if 0 <= cid < len(names)
            else f"nothing at that id (it has {len(names)} classes)"
        )
        raise ValueError(
            f"{what}: records label category {cat!r} with id {cid}, but the training vocabulary "
            f"has {have} ({len(wrong)} mismatched categories); train with the vocabulary the "
            "pseudo-labels were made with"
        )


@dataclass(frozen=True)
class LabelledImages:
    """Images with at least one labelled patch in one of their crops, and how many had none.

    Crop slots an image does not have (a near-square image has fewer distinct crops) have
    box ``(-1, -1, -1, -1)`` and all labels -1, like a crop with no labelled patch.
    """

    image_ids: list[str]
    uris: list[str]
    labels: np.ndarray  # (n, crops, N) int16: class index per patch of each crop, -1 = ignored
    boxes: np.ndarray  # (n, crops, 4) int32: CropBox (resized_h, resized_w, y0, x0) per crop
    without_labels: int  # images of the label set with no labelled patch (left out)

    def box(self, i: int, crop: int) -> CropBox:
        return CropBox(*(int(v) for v in self.boxes[i, crop]))

    def slots(self, i: int) -> list[int]:
        """Crop slots of image ``i`` that have a labelled patch (what training shows)."""
        return [int(j) for j in np.flatnonzero((self.labels[i] >= 0).any(axis=1))]


class _ComposeJob(Dataset):
    """Item i: ``(labels (crops, N) int16, boxes (crops, 4) int32)`` of the crops of the i-th
    image of ``records`` (sorted by image_id)."""

    def __init__(
        self,
        records: pa.Table,
        bounds: np.ndarray,
        input_size: int,
        patch_size: int,
        min_fraction: float,
        crops: int,
        order: str = "area",
    ) -> None:
        self.records, self.bounds, self.order = records, bounds, order
        self.size, self.patch = input_size, patch_size
        self.min_fraction, self.crops = min_fraction, crops

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        start, stop = int(self.bounds[i]), int(self.bounds[i + 1])
        part = self.records.slice(start, stop - start)
        h, w = part.column("height")[0].as_py(), part.column("width")[0].as_py()
        image_id = part.column("image_id")[0].as_py()
        label_map = compose_label_map(part, h, w, self.order)
        grid = (self.size // self.patch) ** 2
        labels = np.full((self.crops, grid), -1, np.int16)
        boxes = np.full((self.crops, 4), -1, np.int32)
        for j, box in enumerate(crop_boxes(image_id, h, w, self.size, self.crops)):
            labels[j] = crop_patch_labels(label_map, box, self.size, self.patch, self.min_fraction)
            boxes[j] = box.as_tuple()
        return labels, boxes


def labelled_images(
    records: pa.Table,
    names: Sequence[str],
    input_size: int,
    patch_size: int,
    min_fraction: float,
    crops_per_image: int = 1,
    num_workers: int = 0,
    all_image_ids: Sequence[str] | None = None,
    order: str = "area",
) -> LabelledImages:
    """Patch labels of the training crops of every image in ``records`` (merge-stage rows,
    several per image); up to ``crops_per_image`` crops each.

    ``all_image_ids``: the images the label set covers (the index), to count those that got
    no mask at all among the images without labels. Label maps are composed in
    ``num_workers`` DataLoader processes (0 = in this process), painted in ``order`` (the
    merge output's ``merge.order``).
    """
    check_categories(records, names, "pseudo-labels")
    records = records.sort_by([("image_id", "ascending")])
    ids = records.column("image_id").to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if len(ids) else np.zeros(0, int)
    bounds = np.r_[starts, len(ids)].astype(np.int64)
    job = _ComposeJob(records, bounds, input_size, patch_size, min_fraction, crops_per_image, order)
    loader = DataLoader(job, batch_size=None, num_workers=num_workers)
    per_image = [(np.asarray(y), np.asarray(b)) for y, b in loader]
    grid = (input_size // patch_size) ** 2
    if per_image:
        labels = np.stack([y for y, _ in per_image])
        boxes = np.stack([b for _, b in per_image])
    else:
        labels = np.zeros((0, crops_per_image, grid), np.int16)
        boxes = np.zeros((0, crops_per_image, 4), np.int32)
    has = [bool(row.any()) for row in (labels >= 0).reshape(len(labels), -1)]
    image_ids = [str(ids[s]) for s in starts.tolist()]
    uris = records.column("image_uri").take(pa.array(starts, pa.int64())).to_pylist()
    missing = len(set(all_image_ids) - set(image_ids)) if all_image_ids is not None else 0
    return restrict_to(LabelledImages(image_ids, uris, labels, boxes, missing), has)


def restrict_to(data: LabelledImages, keep: Sequence[bool] | np.ndarray) -> LabelledImages:
    """Only the images where ``keep`` is true; the others count as without labels."""
    idx = np.flatnonzero(np.asarray(keep, dtype=bool))
    if len(idx) == len(data.image_ids):
        return data
    return LabelledImages(
        image_ids=[data.image_ids[i] for i in idx],
        uris=[data.uris[i] for i in idx],
        labels=data.labels[idx],
        boxes=data.boxes[idx],
        without_labels=data.without_labels + len(data.image_ids) - len(idx),
    )


def require_labelled(data: LabelledImages, labels_fp: str) -> None:
    if not data.image_ids:
        raise NoLabelledPatchesError(
            f"pseudo-label set {labels_fp!r} has no labelled patch to train on: all "
            f"{data.without_labels} images had no mask, or masks too small to label any patch "
            "(check the merge stage's errors table, or lower train.min_labelled_fraction)"
        )


class PatchDataset(Dataset):
    """``(input, labels (N,) int64)`` per ``(image index, crop slot)`` key.

    ``input`` is ``(N, C) float32`` cached features of that crop when ``cache`` is given, else
    the ``(3, S, S) float32`` normalised crop of the decoded image. Either way the crop's box
    must be the one its labels were cut with (an error naming the image otherwise: the image
    changed size since it was labelled). A plain index ``i`` means the image's first crop
    with a labelled patch.
    """

    def __init__(
        self,
        data: LabelledImages,
        *,
        cache: FeatureCache | None,
        preprocess: Preprocess,
        input_size: int,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.data = data
        self.cache = cache
        self.preprocess = preprocess
        self.input_size = input_size
        self.storage_options = storage_options

    def __len__(self) -> int:
        return len(self.data.image_ids)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        i, j = key if isinstance(key, tuple) else (key, self.data.slots(key)[0])
        image_id = self.data.image_ids[i]
        want = self.data.box(i, j)
        y = torch.from_numpy(self.data.labels[i, j].astype(np.int64))
        got: CropBox | None
        if self.cache is not None:
            got = self.cache.box(image_id, j)
            x = torch.from_numpy(self.cache.get(image_id, j).astype(np.float32))
        else:
            image = load_image(self.data.uris[i], self.storage_options)
            h, w = image.shape[:2]
            boxes = crop_boxes(image_id, h, w, self.input_size, self.data.labels.shape[1])
            got = boxes[j] if j < len(boxes) else None
            x = crop_inputs(image, [want], self.preprocess, self.input_size)[0]
        if got != want:
            raise ValueError(
                f"image {image_id!r}: its crop {j} is {got} in the features but {want} in the "
                "labels; the image's size differs from the size its pseudo-labels record"
            )
        return x, y

    def slots(self) -> list[list[int]]:
        """Per image, the crop slots with a labelled patch (:meth:`LabelledImages.slots`)."""
        return [self.data.slots(i) for i in range(len(self))]

    def groups(self) -> list[list[int]]:
        """Dataset indices grouped by feature-cache shard (one group without a cache)."""
        if self.cache is None:
            return [list(range(len(self)))]
        by_shard: dict[int, list[int]] = {}
        for i, image_id in enumerate(self.data.image_ids):
            by_shard.setdefault(self.cache.shard_of(image_id), []).append(i)
        return [by_shard[s] for s in sorted(by_shard)]


class EpochOrder(Sampler[tuple[int, int]]):
    """Shuffled ``(image index, crop slot)`` keys that depend only on ``(seed, epoch)``.

    Order: groups shuffled, then members. Keeping a feature-cache shard's images together
    means each pass reads a shard once (per loader worker) instead of once per image.
    Crops: image ``i`` shows ``slots[i][(phase_i + epoch) % len(slots[i])]``, with
    ``phase_i`` drawn once from ``seed``: over the epochs each image cycles through all its
    crops, in an order that differs between seeds. ``slots=None``: crop 0 of every image.
    """

    def __init__(
        self, groups: list[list[int]], seed: int, slots: Sequence[Sequence[int]] | None = None
    ) -> None:
        self.groups = groups
        self.seed = seed
        self.epoch = 0
        n = sum(len(g) for g in groups)
        self.slots = [list(s) for s in slots] if slots is not None else [[0]] * n
        if len(self.slots) != n or not all(self.slots):
            raise ValueError("EpochOrder: every image needs at least one crop slot")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + 999_983)
        draws = torch.randint(0, 2**62, (len(self.slots),), generator=g).tolist()
        self.phase = [d % len(s) for d, s in zip(draws, self.slots, strict=True)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(len(g) for g in self.groups)

    def __iter__(self):  # type: ignore[no-untyped-def]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = []
        for gi in torch.randperm(len(self.groups), generator=g).tolist():
            members = self.groups[gi]
            order.extend(members[j] for j in torch.randperm(len(members), generator=g).tolist())
        return iter([(i, self.crop(i)) for i in order])

    def crop(self, i: int) -> int:
        """The crop slot image ``i`` shows in the current epoch."""
        s = self.slots[i]
        return s[(self.phase[i] + self.epoch) % len(s)]
