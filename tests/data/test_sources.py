"""Listing image sources: folders, URI prefixes (loopback S3, memory), .txt lists, COCO JSON."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import fsspec
import pytest

from fmbseg.config import IndexConfig
from fmbseg.data.sources import (
    ImageRef,
    SourceError,
    allowed_protocols,
    check_source,
    list_images,
    listing_hash,
    read_bytes,
)

EXTS = (".jpg", ".png")
PHOTOS = [
    "astronaut.jpg",
    "chelsea.png",
    "coffee.jpg",
    "hubble_deep_field.jpg",
    "immunohistochemistry.png",
    "rocket.png",
]


def test_local_folder_recursive_sorted(image_dir: Path) -> None:
    (image_dir / "sub" / "deeper").mkdir(parents=True)
    (image_dir / "sub" / "deeper" / "UPPER.JPG").write_bytes(b"x")
    (image_dir / "sub" / "notes.txt").write_text("not listed")
    (image_dir / "sub" / "model.gif").write_bytes(b"GIF89a")  # extension not asked for
    refs = list_images(str(image_dir), EXTS)
    names = [os.path.relpath(r.uri, image_dir) for r in refs]
    assert names == sorted([*PHOTOS, "sub/deeper/UPPER.JPG"])
    assert all(os.path.isabs(r.uri) for r in refs)
    assert refs[0].size == (image_dir / "astronaut.jpg").stat().st_size
    assert refs[0].version == str((image_dir / "astronaut.jpg").stat().st_mtime_ns)
    assert list_images(str(image_dir), EXTS) == refs  # deterministic
    assert [Path(r.uri).name for r in list_images(str(image_dir), ["GIF"])] == ["model.gif"]


def test_single_file_source(image_dir: Path) -> None:
    refs = list_images(str(image_dir / "coffee.jpg"), EXTS)
    assert [r.uri for r in refs] == [str(image_dir / "coffee.jpg")]


def test_missing_and_empty_sources(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"image source '.*/nope' does not exist"):
        list_images(str(tmp_path / "nope"), EXTS)
    with pytest.raises(SourceError, match="does not exist"):
        check_source(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    check_source(str(tmp_path / "empty"))
    with pytest.raises(SourceError, match=r"holds no images \(extensions \['.jpg', '.png'\]\)"):
        list_images(str(tmp_path / "empty"), EXTS)
    with pytest.raises(SourceError, match="does not exist"):
        list_images(str(tmp_path / "list.txt"), EXTS)


def test_txt_list(image_dir: Path, tmp_path: Path) -> None:
    listing = image_dir / "list.txt"
    listing.write_text(
        "# my images\n"
        "\n"
        "  coffee.jpg  \n"  # relative to the list's folder
        f"{image_dir / 'rocket.png'}\n"  # absolute
        "s3://bucket/key.jpg\n"  # any URI, kept as is
        "coffee.jpg\n"  # listed twice: once in the result
        "missing.jpg\n"  # not checked here: becomes a read error when indexed
    )
    uris = [r.uri for r in list_images(str(listing), EXTS)]
    assert uris == sorted(
        [
            str(image_dir / "coffee.jpg"),
            str(image_dir / "rocket.png"),
            "s3://bucket/key.jpg",
            str(image_dir / "missing.jpg"),
        ]
    )
    (tmp_path / "blank.txt").write_text("# nothing\n\n")
    with pytest.raises(SourceError, match="holds no images"):
        list_images(str(tmp_path / "blank.txt"), EXTS)


def _coco(path: Path, images: list[dict[str, Any]]) -> str:
    path.write_text(json.dumps({"images": images, "annotations": [], "categories": []}))
    return str(path)


def test_coco_json(image_dir: Path, tmp_path: Path) -> None:
    src = _coco(
        image_dir / "instances.json",
        [
            {"id": 1, "file_name": "chelsea.png", "coco_url": "http://x/1.jpg"},
            {"id": 2, "file_name": "coffee.jpg"},
            {"id": 3, "uri": "s3://bucket/three.jpg", "file_name": "ignored.jpg"},
            {"id": 4, "coco_url": "http://images.cocodataset.org/val2017/4.jpg"},
        ],
    )
    uris = [r.uri for r in list_images(src, EXTS)]
    assert uris == [
        str(image_dir / "chelsea.png"),
        str(image_dir / "coffee.jpg"),
        "http://images.cocodataset.org/val2017/4.jpg",
        "s3://bucket/three.jpg",
    ]
    rooted = [r.uri for r in list_images(src, EXTS, image_root="s3://photos/val2017")]
    assert "s3://photos/val2017/chelsea.png" in rooted
    assert "s3://photos/val2017/coffee.jpg" in rooted


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not valid JSON"),
        ('{"annotations": []}', "has no 'images' list"),
        ('{"images": [3]}', r"images\[0\] is not an object"),
        ('{"images": [{"id": 1}]}', r"images\[0\] has none of 'uri', 'file_name', 'coco_url'"),
    ],
)
def test_coco_json_errors(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(SourceError, match=message):
        list_images(str(path), EXTS)


def test_memory_prefix() -> None:
    root = f"memory://src-{uuid.uuid4().hex[:8]}"
    fs = fsspec.filesystem("memory")
    for name in ("b/2.png", "a.JPG", "c.txt"):
        fs.pipe(f"{root}/{name}", name.encode())
    refs = list_images(root, EXTS)
    assert [r.uri.rsplit("/", 1)[-1] for r in refs] == ["a.JPG", "2.png"]
    assert [r.size for r in refs] == [5, 7]
    assert read_bytes(refs[1].uri) == b"b/2.png"


@pytest.mark.s3
def test_s3_prefix(s3_server: dict[str, Any], image_dir: Path) -> None:
    options = s3_server["storage_options"]
    bucket = s3_server["make_bucket"]("sources-test")
    prefix = f"s3://{bucket}/{uuid.uuid4().hex[:8]}/photos"
    fs = fsspec.filesystem("s3", **options)
    for name in PHOTOS[:3]:
        fs.put_file(str(image_dir / name), f"{prefix}/{name}")
    fs.pipe_file(f"{prefix}/nested/readme.md", b"not an image")
    check_source(prefix, options)
    refs = list_images(prefix, EXTS, options)
    assert [r.uri for r in refs] == [f"{prefix}/{n}" for n in PHOTOS[:3]]
    assert refs[0].size == (image_dir / PHOTOS[0]).stat().st_size
    assert refs[0].version and refs[0].version.strip('"')  # the ETag
    assert read_bytes(refs[0].uri, options) == (image_dir / PHOTOS[0]).read_bytes()
    with pytest.raises(SourceError, match="does not exist"):
        list_images(f"s3://{bucket}/no-such-prefix", EXTS, options)


def test_listing_hash_tracks_changes() -> None:
    a = [ImageRef("/x/1.jpg", 10, "t1"), ImageRef("/x/2.jpg", 20, "t2")]
    assert listing_hash(a) == listing_hash(list(reversed(a)))
    assert listing_hash(a) != listing_hash([a[0], ImageRef("/x/2.jpg", 21, "t2")])
    assert listing_hash(a) != listing_hash([a[0], ImageRef("/x/2.jpg", 20, "t3")])
    assert listing_hash(a) != listing_hash(a[:1])


def test_read_bytes_local(image_dir: Path) -> None:
    path = image_dir / "coffee.jpg"
    assert read_bytes(str(path)) == path.read_bytes()
    assert read_bytes(f"file://{path}") == path.read_bytes()
    with pytest.raises(FileNotFoundError):
        read_bytes(str(image_dir / "nope.jpg"))
    odd = image_dir / "a::b.jpg"  # fsspec would read "::" as URL chaining
    odd.write_bytes(b"odd")
    assert read_bytes(str(odd)) == b"odd"


def _crafted(tmp_path: Path, images: list[dict[str, Any]]) -> str:
    folder = tmp_path / "coco"
    folder.mkdir(exist_ok=True)
    return _coco(folder / "crafted.json", images)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"file_name": "../secret.jpg"},
            "images[1] file_name '../secret.jpg' climbs out of the image root",
        ),
        (
            {"file_name": "a/../../x.jpg"},
            "images[1] file_name 'a/../../x.jpg' climbs out of the image root",
        ),
        (
            {"uri": "../../etc/x.png"},
            "images[1] uri '../../etc/x.png' climbs out of the image root",
        ),
        (
            {"coco_url": "http://evil.example/x.jpg"},
            "images[1] coco_url 'http://evil.example/x.jpg': protocol 'http' is not allowed "
            "(index.allowed_protocols allows ['file', 'local'])",
        ),
        ({"uri": "https://evil.example/x.jpg"}, "protocol 'https' is not allowed"),
        ({"uri": "s3://other-bucket/x.jpg"}, "protocol 's3' is not allowed"),
    ],
)
def test_a_crafted_coco_json_cannot_leave_its_root(
    tmp_path: Path, entry: dict[str, Any], message: str
) -> None:
    src = _crafted(tmp_path, [{"id": 1, "file_name": "ok.jpg"}, {"id": 2, **entry}])
    allowed = allowed_protocols(IndexConfig().allowed_protocols, str(tmp_path / "store"))
    with pytest.raises(SourceError) as info:
        list_images(src, EXTS, allowed=allowed)
    assert str(info.value).startswith(f"COCO file {src!r}: ")
    assert message in str(info.value)


def test_confined_entries_that_stay_inside_are_listed(tmp_path: Path) -> None:
    src = _crafted(
        tmp_path,
        [
            {"id": 1, "file_name": "a/./b/../c.jpg"},  # stays under the root
            {"id": 2, "file_name": "/data/photos/x.jpg"},  # absolute local: "file" is allowed
        ],
    )
    root = tmp_path / "images"
    local = allowed_protocols(("file", "store"), str(tmp_path / "store"))
    uris = [r.uri for r in list_images(src, EXTS, image_root=str(root), allowed=local)]
    assert uris == ["/data/photos/x.jpg", str(root / "a" / "c.jpg")]
    with pytest.raises(
        SourceError,
        match=r"images\[0\] file_name '\.\./x\.jpg' climbs out of "
        r"the image root '.*/images'",
    ):
        list_images(
            _crafted(tmp_path, [{"id": 1, "file_name": "../x.jpg"}]),
            EXTS,
            image_root=str(root),
            allowed=local,
        )


def test_allowed_protocols_follow_the_config_and_the_store(tmp_path: Path) -> None:
    assert allowed_protocols(("file", "store"), "./fmbseg-store") == {"file", "local"}
    assert allowed_protocols(("file", "store"), "s3://bucket/x") == {"file", "local", "s3", "s3a"}
    assert allowed_protocols(("store",), "s3://bucket/x") == {"s3", "s3a"}
    src = _crafted(
        tmp_path,
        [
            {"id": 1, "uri": "s3://bucket/a.jpg"},
            {"id": 2, "coco_url": "https://images.example/b.jpg"},
        ],
    )
    on_s3 = allowed_protocols(("store", "https"), "s3://bucket/store")
    assert [r.uri for r in list_images(src, EXTS, allowed=on_s3)] == [
        "https://images.example/b.jpg",
        "s3://bucket/a.jpg",
    ]
    no_local = allowed_protocols(("store",), "s3://bucket/store")
    absolute = _crafted(tmp_path, [{"id": 1, "file_name": "/etc/passwd"}])
    with pytest.raises(
        SourceError,
        match=r"images\[0\] file_name '/etc/passwd': absolute local "
        r"paths are not allowed",
    ):
        list_images(absolute, EXTS, allowed=no_local)


def test_a_txt_list_is_confined_and_names_the_line(tmp_path: Path) -> None:
    listing = tmp_path / "list" / "images.txt"
    listing.parent.mkdir()
    listing.write_text("# mine\nok.jpg\n\n../../root/.ssh/id_rsa.png\n")
    allowed = allowed_protocols(("file", "store"), str(tmp_path / "store"))
    with pytest.raises(SourceError) as info:
        list_images(str(listing), EXTS, allowed=allowed)
    assert str(info.value) == (
        f"image list {str(listing)!r} line 4: '../../root/.ssh/id_rsa.png' climbs out of the "
        f"image root {str(listing.parent)!r}"
    )
    listing.write_text("ok.jpg\nhttp://example.com/a.jpg\n")
    with pytest.raises(SourceError, match="line 2: 'http://example.com/a.jpg': protocol 'http'"):
        list_images(str(listing), EXTS, allowed=allowed)
