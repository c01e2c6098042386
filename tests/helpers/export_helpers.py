"""Committed index and merge outputs written by hand, and checks every export must pass."""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from fmbseg.storage import ArtifactStore
from fmbseg.storage.records import IGNORE, errors_table
from fmbseg.tasks.annotate.index import RECORD_SCHEMA as INDEX_SCHEMA


def commit_index(
    store: ArtifactStore,
    fp: str,
    shards: Sequence[Sequence[tuple[str, str, int, int]]],
    root: str,
    errors: Sequence[Sequence[dict[str, Any]]] = (),
) -> None:
    """Commit ``index/fp``: shard ``i`` holds ``shards[i]`` = (image_id, uri, width,
    height) rows and ``errors[i]`` (error_row dicts)."""
    for i, rows in enumerate(shards):
        table = pa.Table.from_pylist(
            [{"image_id": a, "uri": u, "width": w, "height": h} for a, u, w, h in rows],
            schema=INDEX_SCHEMA,
        )
        store.write_shard("index", fp, i, table, errors_table(errors[i] if errors else []))
    store.commit("index", fp, len(shards), meta={"source": root, "root": root})


def read_png(store: ArtifactStore, rel: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(store.read_bytes(rel))))


def check_semantic_coco(store: ArtifactStore, base: str, tmp_path) -> COCO:
    """annotations.json loads in pycocotools, and per image its segments do not overlap
    and their union is exactly the label PNG's labelled pixels, each segment being its
    class's pixels (COCO id = label value + 1)."""
    path = tmp_path / "annotations.json"
    path.write_bytes(store.read_bytes(f"{base}/annotations.json"))
    coco = COCO(str(path))
    label_of = {c["id"]: c["label_value"] for c in coco.dataset["categories"]}
    assert all(cid == value + 1 for cid, value in label_of.items())
    for image_id, img in coco.imgs.items():
        label = read_png(store, f"{base}/{img['label_file']}")
        assert label.shape == (img["height"], img["width"])
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        cover = np.zeros(label.shape, dtype=np.int32)
        for ann in anns:
            with warnings.catch_warnings():  # pycocotools' numpy-2 deprecation, not ours
                warnings.simplefilter("ignore", DeprecationWarning)
                mask = coco.annToMask(ann).astype(bool)
            cover += mask
            np.testing.assert_array_equal(mask, label == label_of[ann["category_id"]])
            rle = ann["segmentation"]
            assert ann["iscrowd"] == 0
            assert ann["area"] == int(mask_utils.area(rle)) == mask.sum()
            assert ann["bbox"] == [round(float(v), 2) for v in mask_utils.toBbox(rle)]
        assert cover.max(initial=0) <= 1  # no pixel in two segments
        np.testing.assert_array_equal(cover.astype(bool), label != IGNORE)
        assert len({a["category_id"] for a in anns}) == len(anns)  # one segment per class
        assert (len(anns) > 0) == (img["status"] == "labelled")
    json.loads(store.read_bytes(f"{base}/candidates.json"))  # valid JSON too
    return coco
