"""Image-level tags: which vocabulary classes each image holds (the paper's semi-supervised
variant), given by the user instead of CLIP's crop vote (METHOD 1.1.2).

``fmbseg annotate --image-labels FILE`` reads one of:

- a COCO JSON (``.json``): every ``images`` entry, keyed by its ``uri`` if present, else its
  ``file_name``, else its ``coco_url`` (as :mod:`fmbseg.data.sources` lists a COCO source),
  tagged with the names of the ``categories`` its ``annotations`` refer to (an image
  without annotations holds no class);
- a Parquet (``.parquet``) or CSV (``.csv``) table with an image column (``image``,
  ``file_name``, ``uri`` or ``path``) and a names column (``labels``, ``names``, ``tags``,
  ``classes``, ``label``, ``name`` or ``category``): one row per image with a list of names
  or a string of names separated by ``|``, ``;`` or ``,``, or one row per (image, name);
  rows of one image are united.

An image of the run matches an entry by its URI (an absolute path for local files) or by
its path relative to the source root (the folder of ``--images``, or of the ``.txt`` / COCO
list, or ``--image-root``). Every name must be a vocabulary class (compared ignoring case
and spaces, as everywhere): :func:`load_image_labels` raises, naming the unknown names and an
image holding each, before any work. The tags' content hash (of the parsed entries, so the
file's layout does not matter) and the source root are part of the clip_dense fingerprint.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from fmbseg.data.sources import read_bytes
from fmbseg.data.vocab import name_key
from fmbseg.storage.fingerprint import content_hash

IMAGE_COLUMNS = ("image", "file_name", "uri", "path")
NAME_COLUMNS = ("labels", "names", "tags", "classes", "label", "name", "category")
_SEPARATORS = re.compile(r"[|;,]")


class ImageLabelsError(ValueError):
    """An image-labels file is missing, malformed or names classes outside the vocabulary."""


def _norm_key(key: str) -> str:
    """An entry's image as compared: ``/`` separators, no leading ``./``."""
    key = key.strip().replace("\\", "/")
    while key.startswith("./"):
        key = key[2:]
    return key


@dataclass(frozen=True)
class ImageLabels:
    """Tags per image: ``tags[key]`` = vocabulary class ids (ascending) of the image ``key``
    (a URI, an absolute path or a path relative to the source root).

    ``source``: the file they came from, for messages. ``root``: the source root relative
    keys are resolved against (set with :meth:`bound_to`).
    """

    tags: Mapping[str, tuple[int, ...]]
    source: str
    root: str = ""
    _by_path: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_path = {}
        for key, ids in self.tags.items():
            if "://" in key or os.path.isabs(key):
                by_path[key] = ids
            elif self.root:
                by_path[_join(self.root, key)] = ids
        object.__setattr__(self, "_by_path", by_path)

    def bound_to(self, root: str) -> ImageLabels:
        """The same tags, relative keys resolved against the source root ``root``."""
        return ImageLabels(self.tags, self.source, root)

    @property
    def content_hash(self) -> str:
        """sha256 of the parsed entries (sorted), independent of the file's layout."""
        blob = json.dumps(sorted((k, list(v)) for k, v in self.tags.items()))
        return content_hash(blob.encode())

    def fingerprint_part(self) -> dict[str, str]:
        return {"sha256": self.content_hash, "root": self.root}

    def for_uri(self, uri: str) -> tuple[int, ...] | None:
        """The class ids of the indexed image ``uri``; None when no entry names it."""
        return self._by_path.get(_norm_uri(uri))


def _norm_uri(uri: str) -> str:
    uri = uri.removeprefix("file://")
    if "://" in uri:
        return uri
    return os.path.normpath(os.path.abspath(uri))


def _join(root: str, key: str) -> str:
    if "://" in root:
        return f"{root.rstrip('/')}/{key.lstrip('/')}"
    return os.path.normpath(os.path.join(os.path.abspath(root), key))


# ---- readers ----------------------------------------------------------------------------------


def _coco_entries(data: Any, source: str) -> Iterable[tuple[str, list[str]]]:
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ImageLabelsError(f"image labels {source}: a COCO JSON needs an 'images' list")
    cats = {}
    for c in data.get("categories") or []:
        if isinstance(c, dict) and "id" in c and "name" in c:
            cats[c["id"]] = str(c["name"])
    names: dict[Any, list[str]] = {}
    for i, a in enumerate(data.get("annotations") or []):
        if not isinstance(a, dict) or a.get("category_id") not in cats:
            raise ImageLabelsError(
                f"image labels {source}: annotations[{i}] has no category_id of 'categories'"
            )
        names.setdefault(a.get("image_id"), []).append(cats[a["category_id"]])
    for i, entry in enumerate(data["images"]):
        key = isinstance(entry, dict) and (
            entry.get("uri") or entry.get("file_name") or entry.get("coco_url")
        )
        if not key:
            raise ImageLabelsError(
                f"image labels {source}: images[{i}] has none of 'uri', 'file_name', 'coco_url'"
            )
        yield str(key), names.get(entry.get("id"), [])


def _split(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value if v is not None]
    return [s for s in _SEPARATORS.split(str(value)) if s.strip()]


def _table_entries(table: pa.Table, source: str) -> Iterable[tuple[str, list[str]]]:
    columns = {c.lower(): c for c in table.column_names}
    image = next((columns[c] for c in IMAGE_COLUMNS if c in columns), None)
    names = next((columns[c] for c in NAME_COLUMNS if c in columns), None)
    if image is None or names is None:
        raise ImageLabelsError(
            f"image labels {source}: needs an image column ({', '.join(IMAGE_COLUMNS)}) and a "
            f"names column ({', '.join(NAME_COLUMNS)}); it has {table.column_names}"
        )
    for i, (key, value) in enumerate(
        zip(table.column(image).to_pylist(), table.column(names).to_pylist(), strict=True)
    ):
        if key is None or not str(key).strip():
            raise ImageLabelsError(f"image labels {source}: row {i} has no image")
        yield str(key), _split(value)


def load_image_labels(
    path: str, vocabulary: Sequence[str], storage_options: dict[str, Any] | None = None
) -> ImageLabels:
    """Read and check an image-labels file (see the module docstring) against ``vocabulary``.

    Raises:
        ImageLabelsError: the file is missing, of an unknown kind or malformed, or names a
            class that is not in ``vocabulary`` (every such name is listed, each with an
            image that holds it).
    """
    lower = str(path).lower()
    try:
        raw = read_bytes(str(path), storage_options)
    except FileNotFoundError:
        raise ImageLabelsError(f"image labels {path}: file not found") from None
    try:
        if lower.endswith(".json"):
            entries = list(_coco_entries(json.loads(raw.decode("utf-8-sig")), path))
        elif lower.endswith(".parquet"):
            entries = list(_table_entries(pq.read_table(io.BytesIO(raw)), path))
        elif lower.endswith(".csv"):
            entries = list(_table_entries(pacsv.read_csv(io.BytesIO(raw)), path))
        else:
            raise ImageLabelsError(
                f"image labels {path}: expected a COCO .json, a .parquet or a .csv file"
            )
    except (json.JSONDecodeError, UnicodeDecodeError, pa.ArrowInvalid) as exc:
        raise ImageLabelsError(f"image labels {path}: cannot be read: {exc}") from None
    ids = {name_key(n): k for k, n in enumerate(vocabulary)}
    tags: dict[str, set[int]] = {}
    unknown: dict[str, str] = {}
    for key, names in entries:
        key = _norm_key(key)
        found = tags.setdefault(key, set())
        for name in names:
            k = ids.get(name_key(name))
            if k is None:
                unknown.setdefault(name.strip(), key)
            else:
                found.add(k)
    if unknown:
        listed = ", ".join(f"{n!r} ({key})" for n, key in sorted(unknown.items()))
        raise ImageLabelsError(
            f"image labels {path}: {len(unknown)} names are not in the vocabulary: {listed}"
        )
    if not tags:
        raise ImageLabelsError(f"image labels {path}: no images listed")
    return ImageLabels({k: tuple(sorted(v)) for k, v in sorted(tags.items())}, str(path))
