"""Image-level tags: COCO JSON / Parquet / CSV, matching by URI or relative path, names
checked against the vocabulary, the content hash in the clip_dense fingerprint."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fmbseg.config import load_config
from fmbseg.data.image_labels import ImageLabelsError, load_image_labels
from fmbseg.data.sources import source_root
from fmbseg.tasks.annotate.stages import stage1_fingerprints

VOCAB = ("cat", "dog", "potted plant")


def _coco(path: Path, categories=None) -> Path:
    data = {
        "images": [
            {"id": 1, "file_name": "a/one.jpg"},
            {"id": 2, "file_name": "two.jpg"},
            {"id": 3, "uri": "s3://bucket/three.jpg"},
        ],
        "categories": categories or [{"id": 7, "name": "dog"}, {"id": 9, "name": "Potted Plant"}],
        "annotations": [
            {"image_id": 1, "category_id": 7},
            {"image_id": 1, "category_id": 9},
            {"image_id": 1, "category_id": 7},
            {"image_id": 3, "category_id": 9},
        ],
    }
    path.write_text(json.dumps(data))
    return path


def test_coco_json_tags_are_each_images_annotation_categories(tmp_path):
    labels = load_image_labels(str(_coco(tmp_path / "l.json")), VOCAB)
    assert dict(labels.tags) == {"a/one.jpg": (1, 2), "two.jpg": (), "s3://bucket/three.jpg": (2,)}
    bound = labels.bound_to(str(tmp_path / "imgs"))
    assert bound.for_uri(str(tmp_path / "imgs" / "a" / "one.jpg")) == (1, 2)
    assert bound.for_uri(str(tmp_path / "imgs" / "two.jpg")) == ()  # tagged: no class
    assert bound.for_uri("s3://bucket/three.jpg") == (2,)
    assert bound.for_uri(str(tmp_path / "imgs" / "four.jpg")) is None
    assert bound.for_uri(str(tmp_path / "one.jpg")) is None  # relative to the root only


def test_parquet_and_csv_give_the_same_tags_and_hash(tmp_path):
    table = pa.table({"file_name": ["a/one.jpg", "two.jpg"], "tags": [["dog", "cat"], []]})
    pq.write_table(table, tmp_path / "l.parquet")
    # one row per (image, name), names in any case, a list in a cell
    (tmp_path / "l.csv").write_text("image,name\n./a/one.jpg,DOG\na/one.jpg,cat\ntwo.jpg,\n")
    (tmp_path / "m.csv").write_text('uri,labels\na/one.jpg,"cat;dog"\ntwo.jpg,\n')
    parsed = [load_image_labels(str(tmp_path / f), VOCAB) for f in ("l.parquet", "l.csv", "m.csv")]
    assert all(dict(p.tags) == {"a/one.jpg": (0, 1), "two.jpg": ()} for p in parsed)
    assert len({p.content_hash for p in parsed}) == 1


def test_unknown_names_are_listed_before_any_work(tmp_path):
    (tmp_path / "l.csv").write_text("image,labels\none.jpg,dog|zebra\ntwo.jpg,unicorn\n")
    with pytest.raises(ImageLabelsError) as info:
        load_image_labels(str(tmp_path / "l.csv"), VOCAB)
    assert str(info.value) == (
        f"image labels {tmp_path / 'l.csv'}: 2 names are not in the vocabulary: "
        "'unicorn' (two.jpg), 'zebra' (one.jpg)"
    )
    coco = _coco(tmp_path / "l.json", [{"id": 7, "name": "dog"}, {"id": 9, "name": "fern"}])
    with pytest.raises(ImageLabelsError, match="'fern' \\(a/one.jpg\\)"):
        load_image_labels(str(coco), VOCAB)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("l.csv", "picture,labels\none.jpg,dog\n", "needs an image column"),
        ("l.txt", "one.jpg dog\n", "expected a COCO .json, a .parquet or a .csv"),
        ("l.json", "{", "cannot be read"),
        ("l.json", '{"images": [{"id": 1}]}', "images\\[0\\] has none of"),
        ("missing.csv", None, "file not found"),
    ],
)
def test_malformed_files_are_named(tmp_path, name, text, message):
    if text is not None:
        (tmp_path / name).write_text(text)
    with pytest.raises(ImageLabelsError, match=message):
        load_image_labels(str(tmp_path / name), VOCAB)


def test_source_root_of_each_kind_of_source(tmp_path):
    (tmp_path / "list.txt").write_text("x.jpg\n")
    assert source_root(str(tmp_path)) == str(tmp_path)
    assert source_root(str(tmp_path / "list.txt")) == str(tmp_path)
    assert source_root(str(tmp_path / "c.json"), image_root="/data/images") == "/data/images"
    assert source_root("s3://bucket/photos/") == "s3://bucket/photos"
    assert source_root("s3://bucket/list.txt") == "s3://bucket"


def test_tags_are_in_the_clip_dense_fingerprint_only_by_content_and_root(tmp_path):
    cfg = load_config("tiny")
    (tmp_path / "a.csv").write_text("image,labels\none.jpg,dog\n")
    (tmp_path / "b.csv").write_text("image,labels\none.jpg,cat\n")
    pq.write_table(pa.table({"image": ["one.jpg"], "labels": [["dog"]]}), tmp_path / "a.parquet")
    a, b, a2 = (
        load_image_labels(str(tmp_path / f), VOCAB).bound_to("/imgs")
        for f in ("a.csv", "b.csv", "a.parquet")
    )
    fps = {
        k: stage1_fingerprints(cfg, "idx", VOCAB, v)
        for k, v in {"none": None, "a": a, "b": b, "a2": a2, "root": a.bound_to("/other")}.items()
    }
    clip = {k: v["clip_dense"] for k, v in fps.items()}
    assert clip["a"] == clip["a2"]  # same tags in another file format
    assert len({clip["none"], clip["a"], clip["b"], clip["root"]}) == 4
    assert fps["a"]["merge"] != fps["none"]["merge"]  # everything downstream follows
