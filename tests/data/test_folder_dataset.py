"""``open_dataset("folder", root)``: users' own images/ + labels/ + classes.txt."""

from __future__ import annotations

import io
import pickle
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from fmbseg.data.datasets import DatasetError, open_dataset

H, W = 6, 8


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG")
    return buf.getvalue()


def write_folder(fs, root: str) -> dict[str, np.ndarray]:
    """A 3-class set of two images (one in a sub-folder); returns sample id -> label."""
    fs.makedirs(f"{root}/images/sub", exist_ok=True)
    fs.makedirs(f"{root}/labels/sub", exist_ok=True)
    fs.pipe(f"{root}/classes.txt", b"# my classes\nsky\n\ncar\nroad\n")
    rng = np.random.default_rng(0)
    labels = {}
    for sid in ("a", "sub/b"):
        lab = rng.integers(0, 3, size=(H, W)).astype(np.uint8)
        lab[0] = 255  # an ignored border
        labels[sid] = lab
        fs.pipe(f"{root}/images/{sid}.png", _png(rng.integers(0, 255, (H, W, 3), np.uint8)))
        fs.pipe(f"{root}/labels/{sid}.png", _png(lab, "L"))
    return labels


def test_folder_dataset_reads_classes_images_and_labels(tmp_path: Path) -> None:
    labels = write_folder(fsspec.filesystem("file"), str(tmp_path))
    ds = open_dataset("folder", str(tmp_path))
    assert ds.name == "folder" and ds.classes == ("sky", "car", "road")
    assert ds.background is None and ds.ignore_index == 255
    assert ds.sample_ids == ["a", "sub/b"]
    for sid, image, label in ds:
        assert image.shape == (H, W, 3) and image.dtype == np.uint8
        np.testing.assert_array_equal(label, labels[sid])
    again = pickle.loads(pickle.dumps(ds.subset([1])))
    np.testing.assert_array_equal(next(iter(again))[2], labels["sub/b"])


def test_folder_dataset_on_an_fsspec_uri() -> None:
    root = f"memory://folder-{uuid.uuid4().hex}"
    labels = write_folder(fsspec.filesystem("memory"), root)
    ds = open_dataset("folder", root)
    assert [sid for sid, _, _ in ds] == list(labels)


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda r: (r / "labels" / "a.png").unlink(), r"no label labels/a\.png for images/a\.png"),
        (lambda r: (r / "images" / "a.png").unlink(), r"labels/a\.png has no image in images/"),
        (lambda r: (r / "classes.txt").unlink(), r"classes\.txt not found"),
        (lambda r: (r / "classes.txt").write_text("sky\nSky\n"), "duplicate"),
    ],
)
def test_folder_dataset_errors_name_the_file(tmp_path: Path, breakage, message) -> None:
    write_folder(fsspec.filesystem("file"), str(tmp_path))
    breakage(tmp_path)
    with pytest.raises(DatasetError, match=message):
        open_dataset("folder", str(tmp_path))


def test_unknown_dataset_lists_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="folder"):
        open_dataset("no-such-set", str(tmp_path))


def _edit_in_place(fs, path: str, data: bytes) -> None:
    fs.pipe(path, data)
    if fs.protocol in ("file", ("file", "local")):  # mtime resolution: make the edit visible
        import os

        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_files_digest_changes_when_a_file_is_edited_in_place(where, tmp_path, request) -> None:
    if where == "s3":
        s3 = request.getfixturevalue("s3_server")
        options = s3["storage_options"]
        root = f"s3://{s3['bucket']}/folder-{uuid.uuid4().hex[:8]}"
        fs = fsspec.filesystem("s3", **options)
    else:
        options, root, fs = {}, str(tmp_path), fsspec.filesystem("file")
    labels = write_folder(fs, root)
    digest = open_dataset("folder", root, options).files_digest()
    assert open_dataset("folder", root, options).files_digest() == digest  # stable
    labels_only = open_dataset("folder", root, options).files_digest(images=False)

    edited = labels["sub/b"].copy()
    edited[1:] = (edited[1:] + 1) % 3  # same size, other content
    _edit_in_place(fs, f"{root}/labels/sub/b.png", _png(edited, "L"))
    after_label = open_dataset("folder", root, options)
    assert after_label.files_digest() != digest
    assert after_label.files_digest(images=False) != labels_only
    np.testing.assert_array_equal(after_label.load_label(after_label.samples[1]), edited)

    before_image = after_label.files_digest()
    before_labels = after_label.files_digest(images=False)
    _edit_in_place(fs, f"{root}/images/a.png", _png(np.zeros((H, W, 3), np.uint8)))
    after_image = open_dataset("folder", root, options)
    assert after_image.files_digest() != before_image
    assert after_image.files_digest(images=False) == before_labels  # labels untouched

    # a subset covers only its own samples' files
    assert after_image.subset([1]).files_digest() != after_image.files_digest()
