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
coco-object-81     same images; annotations/{split}2017/        0 = background, 1..80 things
                   *_instanceTrainIds.png, else derived from
                   *_labelTrainIds.png / raw *.png
coco-object-80     same                                         things only: background ->
                                                                ignore, 1..80 -> 0..79
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
"CO-80" means either in the literature (METHOD "Evaluation"): ``coco-object-81`` is the
peers' (TCL, SCLIP) 81 classes with background; ``coco-object-80`` the 80 things with
background pixels ignored (the paper's 57.63 suggests this one). ``coco-object`` is
``coco-object-81``; ``co-80`` is ``coco-object-80``. Reports name the variant.

Images are decoded with PIL without EXIF rotation: labels are drawn on the stored pixels.
An image whose size differs from its label's is an error naming both files.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

from fmbseg.data.folder_dataset import open_folder_dataset
from fmbseg.data.segdata import IGNORE_INDEX, DatasetError, Layout, Sample, SegDataset
from fmbseg.data.vocab import load_vocabulary

__all__ = [
    "DATASETS",
    "IGNORE_INDEX",
    "DatasetError",
    "Sample",
    "SegDataset",
    "dataset_description",
    "dataset_names",
    "open_dataset",
]


# ---- layouts ----------------------------------------------------------------------------------


def _split_ids(layout: Layout, rel: str) -> list[str]:
    ids = layout.read_text(rel).split()
    if not ids:
        raise DatasetError(f"{layout.name} root {layout.root}: {rel} lists no images")
    return ids


def _voc_like(
    layout: Layout, split: str, dirs: tuple[str, str], lut: str | None = None
) -> list[Sample]:
    sets, labels = dirs
    listed = f"ImageSets/{sets}/{split}.txt"
    ids = _split_ids(layout, listed)
    layout.require_dir("JPEGImages", labels)
    samples = [Sample(i, f"JPEGImages/{i}.jpg", f"{labels}/{i}.png", lut) for i in ids]
    # Every listed file must exist: one listing per folder, so a missing one is named here
    # rather than becoming a skipped sample of an evaluation that exits 0.
    present = set(layout.glob("JPEGImages/*.jpg")) | set(layout.glob(f"{labels}/*.png"))
    for kind in ("image", "label"):
        missing = [getattr(s, kind) for s in samples if getattr(s, kind) not in present]
        if missing:
            raise DatasetError(
                f"{layout.name} root {layout.root}: {missing[0]} not found (the {kind} of a "
                f"sample {listed} lists; {len(missing)} of {len(ids)} samples lack theirs)"
            )
    return samples


def _images(layout: Layout, dirs: tuple[str, str], pattern: str, what: str) -> list[str]:
    """The images matching ``pattern`` in ``dirs[0]`` (both dirs required); none is an error."""
    layout.require_dir(*dirs)
    images = layout.glob(f"{dirs[0]}/{pattern}")
    if not images:
        folder = f"{dirs[0]}/{pattern}".rpartition("/")[0]
        raise DatasetError(f"{layout.name} root {layout.root}: no {what} in {folder}/")
    return images


def _jpg_id(rel: str) -> str:
    return rel.rsplit("/", 1)[-1][: -len(".jpg")]


def _coco(layout: Layout, split: str, objects: bool, things_only: bool = False) -> list[Sample]:
    img_dir, ann_dir = f"images/{split}2017", f"annotations/{split}2017"
    images = _images(layout, (img_dir, ann_dir), "*.jpg", ".jpg images")
    anns = set(layout.glob(f"{ann_dir}/*.png"))
    out = []
    for rel in images:
        sid = _jpg_id(rel)
        choices = (
            [
                (f"{ann_dir}/{sid}_instanceTrainIds.png", "coco_object80"),
                (f"{ann_dir}/{sid}_labelTrainIds.png", "coco_object80_from_train"),
                (f"{ann_dir}/{sid}.png", "coco_object80_from_raw"),
            ]
            if things_only
            else [
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


def _cityscapes(layout: Layout, split: str) -> list[Sample]:
    img_dir, gt_dir = f"leftImg8bit/{split}", f"gtFine/{split}"
    images = _images(layout, (img_dir, gt_dir), "*/*_leftImg8bit.png", "*_leftImg8bit.png")
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


def _ade(layout: Layout, split: str) -> list[Sample]:
    sub = {"val": "validation", "train": "training"}.get(split, split)
    img_dir, ann_dir = f"images/{sub}", f"annotations/{sub}"
    images = _images(layout, (img_dir, ann_dir), "*.jpg", ".jpg images")
    anns = set(layout.glob(f"{ann_dir}/*.png"))
    out = []
    for rel in images:
        ann = f"{ann_dir}/{_jpg_id(rel)}.png"
        if ann not in anns:
            raise DatasetError(f"{layout.name} root {layout.root}: {ann} not found")
        out.append(Sample(_jpg_id(rel), rel, ann, "reduce_zero"))
    return out


@dataclass(frozen=True)
class _Spec:
    vocabulary: str  # built-in vocabulary holding ``classes`` in label order
    background: int | None
    subdirs: tuple[str, ...]  # where the data_root may sit below a parent directory
    marker: str  # a path that exists in a valid root, to find it
    lister: Any
    description: str = ""  # what a report says the dataset is


_VOC, _CTX = ("VOCdevkit/VOC2012", "VOC2012"), ("VOCdevkit/VOC2010", "VOC2010")
_SEG, _CTXSETS = (
    ("Segmentation", "SegmentationClass"),
    ("SegmentationContext", "SegmentationClassContext"),
)
# fmt: off
DATASETS: dict[str, _Spec] = {
    "voc21": _Spec("voc-21", 0, _VOC, "ImageSets/Segmentation", partial(_voc_like, dirs=_SEG),
                   "PASCAL VOC 2012 val, 20 classes + background"),
    "voc20": _Spec("voc-20", None, _VOC, "ImageSets/Segmentation",
                   partial(_voc_like, dirs=_SEG, lut="reduce_zero"),
                   "PASCAL VOC 2012 val, 20 classes, background ignored"),
    "context60": _Spec("context-60", 0, _CTX, "ImageSets/SegmentationContext",
                       partial(_voc_like, dirs=_CTXSETS),
                       "PASCAL Context val, 59 classes + background"),
    "context59": _Spec("context-59", None, _CTX, "ImageSets/SegmentationContext",
                       partial(_voc_like, dirs=_CTXSETS, lut="reduce_zero"),
                       "PASCAL Context val, 59 classes, background ignored"),
    "coco-stuff-171": _Spec("coco-stuff-171", None, ("coco_stuff164k",), "annotations",
                            partial(_coco, objects=False),
                            "COCO-Stuff 164k val, 171 classes"),
    "coco-object-81": _Spec("coco-object-81", 0, ("coco_stuff164k",), "annotations",
                            partial(_coco, objects=True),
                            "COCO-Object val, 80 things + background (81 classes)"),
    "coco-object-80": _Spec("coco-object-80", None, ("coco_stuff164k",), "annotations",
                            partial(_coco, objects=True, things_only=True),
                            "COCO-Object val, 80 things only, background pixels ignored"),
    "cityscapes": _Spec("cityscapes-19", None, ("cityscapes",), "gtFine", _cityscapes,
                        "Cityscapes val, 19 classes"),
    "ade20k": _Spec("ade-150", None, ("ADEChallengeData2016",), "annotations", _ade,
                    "ADE20K val, 150 classes"),
}
_NAME_ALIASES = {
    "voc": "voc21", "voc-21": "voc21", "voc-20": "voc20", "pascal-voc": "voc21",
    "context": "context59", "context-59": "context59", "context-60": "context60",
    "pascal-context": "context59", "coco-stuff": "coco-stuff-171", "cocostuff": "coco-stuff-171",
    "cs-171": "coco-stuff-171", "coco-object": "coco-object-81", "co-81": "coco-object-81",
    "co-80": "coco-object-80", "ade": "ade20k", "ade-150": "ade20k", "cityscapes-19": "cityscapes",
}
# fmt: on


def dataset_names() -> list[str]:
    """Names :func:`open_dataset` accepts (aliases aside)."""
    return sorted([*DATASETS, "folder"])


def dataset_description(name: str) -> str:
    """What a report says dataset ``name`` is (``""`` for unknown names and ``folder``)."""
    spec = DATASETS.get(_NAME_ALIASES.get(name.lower(), name.lower()))
    return spec.description if spec is not None else ""


def open_dataset(
    name: str, root: str, storage_options: dict[str, Any] | None = None, split: str = "val"
) -> SegDataset:
    """Open a benchmark split stored in mmsegmentation's layout (see the module table).

    Args:
        name: ``voc21``, ``voc20``, ``context59``, ``context60``, ``coco-stuff-171``,
            ``coco-object-81``, ``coco-object-80``, ``cityscapes`` or ``ade20k`` (aliases
            like ``voc``, ``ade``, ``coco-object`` = ``coco-object-81``).
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
    layout = Layout(key, root, storage_options)
    # Accept the parent of mmseg's data_root too (data/ for data/VOCdevkit/VOC2012).
    fs, base = layout.fs, layout.base
    if not fs.exists(f"{base}/{spec.marker}"):
        for sub in spec.subdirs:
            if fs.exists(f"{base}/{sub}/{spec.marker}"):
                layout.base = f"{base}/{sub}"
                break
    samples = spec.lister(layout, split)
    return layout.dataset(load_vocabulary(spec.vocabulary), samples, spec.background)
