"""``open_dataset("folder", root)``: a labelled set in the simplest layout, for users' own data.

A held-out set people make themselves (to evaluate retrained models on their own images)::

    root/classes.txt        one class name per line: the i-th name is label value i (blank
                            lines and lines starting with # are skipped)
    root/images/<id>.<ext>  images (.jpg .jpeg .png .bmp .tif .tiff .webp), any sub-folders
    root/labels/<id>.png    single-channel PNG label maps (mode L or P): value = class index,
                            255 = ignore; same size as the image, same relative path stem

``split`` is ignored (the folder is one split). An image without a label (or a label without
an image) is an error naming the file, so a half-copied set never evaluates silently.
"""

from __future__ import annotations

from typing import Any

from fmbseg.data.segdata import DatasetError, Layout, Sample, SegDataset
from fmbseg.data.vocab import read_names, validate_vocabulary

NAME = "folder"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _stem(rel: str, top: str) -> str:
    """``images/a/b.jpg`` -> ``a/b`` (the sample id)."""
    return rel[len(top) + 1 :].rsplit(".", 1)[0]


def open_folder_dataset(
    root: str, storage_options: dict[str, Any] | None = None, split: str = "val"
) -> SegDataset:
    """Open ``root`` (a local path or fsspec URI) in the folder layout above.

    Raises:
        DatasetError: a missing ``classes.txt`` / ``images/`` / ``labels/``, no images, an
            image without its label or the reverse; the message names the file.
    """
    layout = Layout(NAME, root, storage_options)
    lines = read_names(layout.read_text("classes.txt"))
    try:
        classes = validate_vocabulary(lines, f"{root}/classes.txt")
    except ValueError as exc:
        raise DatasetError(str(exc)) from exc
    layout.require_dir("images", "labels")
    images = [p for p in layout.glob("images/**") if p.lower().endswith(IMAGE_EXTENSIONS)]
    if not images:
        raise DatasetError(
            f"{NAME} root {root}: no images in images/ ({', '.join(IMAGE_EXTENSIONS)})"
        )
    labels = {_stem(p, "labels"): p for p in layout.glob("labels/**") if p.endswith(".png")}
    samples = []
    for rel in images:
        sid = _stem(rel, "images")
        if sid not in labels:
            raise DatasetError(f"{NAME} root {root}: no label labels/{sid}.png for {rel}")
        samples.append(Sample(sid, rel, labels.pop(sid)))
    if labels:
        extra = sorted(labels.values())
        raise DatasetError(
            f"{NAME} root {root}: {extra[0]} has no image in images/ "
            f"({len(extra)} labels without an image)"
        )
    return layout.dataset(classes, samples)
