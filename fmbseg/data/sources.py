"""Image sources: where a run's images come from, listed deterministically.

A *source* string is one of:
- a local folder (searched recursively) or a single local image file;
- any fsspec URI prefix (``s3://bucket/photos/``, ``gs://...``, ``memory://...``),
  searched recursively;
- a ``.txt`` file (local or URI) of image paths/URIs, one per line; blank lines and lines
  starting with ``#`` are skipped; relative paths are relative to ``image_root`` (default:
  the file's folder);
- a COCO JSON file (local or URI) whose ``images`` list names the images: an entry's
  ``uri`` field if present, else its ``file_name`` under ``image_root`` (default: the JSON's
  folder), else its ``coco_url``.

Lists are confined, as the people who write them may not be the ones who run the workers:
a relative entry resolves under the root and may not climb out of it (``../``), and an
absolute path or URI is accepted only when its protocol is allowed (``file`` = local paths;
``index.allowed_protocols``, see :func:`allowed_protocols`). A breach is a SourceError naming
the entry.

Folders and prefixes are filtered by extension (case-insensitive); explicit lists (.txt,
COCO) are taken as given, so a wrong entry becomes an error row downstream rather than
silently disappearing. Listings are sorted by URI and de-duplicated.

Local folders follow symbolic links to files and folders (a folder reached twice, as in a
link loop, is walked once). What a walk finds but cannot index is listed anyway, as an
:class:`ImageRef` whose ``problem`` says why, and becomes a row of the index's errors
table: a dangling link or a link loop with an image extension, a folder that cannot be
read, a file name that is not valid UTF-8 (its URI shows the bad bytes as ``\\xNN``).

:func:`source_root` is the folder (or URI prefix) a listing's paths are relative to, and
:func:`relative_path` an image's path under it: the export's COCO ``file_name``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import posixpath
import stat
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import fsspec

from fmbseg.config import IMAGE_EXTENSIONS
from fmbseg.storage.store import RetryPolicy, retry_call

_LOCAL_PROTOCOLS = ("file", "local")


class SourceError(ValueError):
    """An image source is missing, empty or malformed; the message names it."""


@dataclass(frozen=True, order=True)
class ImageRef:
    """One listed image.

    uri: a local absolute path or a full fsspec URI (``s3://bucket/key.jpg``).
    size: bytes, when the listing knows it (folders and prefixes), else None.
    version: a change marker when known (S3 ETag, local mtime in ns), else None.
    """

    uri: str
    size: int | None = None
    version: str | None = None
    problem: tuple[str, str] | None = None  # (error_type, message): listed, not indexable


def _is_uri(text: str) -> bool:
    return "://" in text and not text.startswith("file://")


def _options_for(uri: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    # Options meant for the remote store (keys, endpoints) are irrelevant to local paths.
    return dict(storage_options or {}) if _is_uri(uri) else {}


def _normalise_exts(extensions: Iterable[str]) -> tuple[str, ...]:
    return tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)


def allowed_protocols(configured: Iterable[str], store_uri: str | None = None) -> frozenset[str]:
    """``index.allowed_protocols`` as a set: ``store`` becomes the store's protocol (with its
    fsspec aliases: ``s3`` and ``s3a``), ``file`` also covers fsspec's ``local``."""
    out: set[str] = set()
    for name in configured:
        name = name.lower()
        if name == "store":
            if store_uri is None:
                continue
            name = store_uri.split("://", 1)[0].lower() if _is_uri(store_uri) else "file"
            try:
                aliases = fsspec.get_filesystem_class(name).protocol
            except (ValueError, ImportError):  # unknown to fsspec: opening it fails anyway
                aliases = (name,)
            out.update((aliases,) if isinstance(aliases, str) else aliases)
        out.add(name)
    if "file" in out:
        out.add("local")
    return frozenset(out)


def _resolve_entry(root: str, name: str, allowed: frozenset[str] | None, what: str) -> str:
    """A list entry as a URI or absolute path: relative ``name`` under ``root`` (never above
    it); an absolute path or URI only if ``allowed`` (None: any) has its protocol."""
    rule = f"index.allowed_protocols allows {sorted(allowed or ())}"
    if "://" in name:
        protocol = name.split("://", 1)[0].lower()
        if allowed is not None and protocol not in allowed:
            raise SourceError(f"{what} {name!r}: protocol {protocol!r} is not allowed ({rule})")
        return name
    if os.path.isabs(name):
        if allowed is not None and "file" not in allowed:
            raise SourceError(f"{what} {name!r}: absolute local paths are not allowed ({rule})")
        return os.path.normpath(name)
    if "://" in root:
        protocol, base = root.split("://", 1)
        base = base.rstrip("/")
        joined = posixpath.normpath(posixpath.join(base, name))
        inside = joined.startswith(f"{base}/")
        resolved = f"{protocol}://{joined}"
    else:
        base = os.path.abspath(root.removeprefix("file://"))
        joined = os.path.normpath(os.path.join(base, name))
        inside = joined.startswith(base.rstrip(os.sep) + os.sep)
        resolved = joined
    if not inside:
        raise SourceError(f"{what} {name!r} climbs out of the image root {root!r}")
    return resolved


def _parent(uri: str) -> str:
    if "://" in uri:
        return uri.rstrip("/").rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(uri))


def file_version(info: dict[str, Any]) -> str | None:
    """A change marker from an fsspec listing's entry: the ETag, else a modification time."""
    for key in ("ETag", "etag", "mtime", "LastModified", "last_modified", "created"):
        if info.get(key) is not None:
            return str(info[key])
    return None


def _read_text(uri: str, storage_options: dict[str, Any] | None) -> str:
    try:
        return read_bytes(uri, storage_options).decode("utf-8-sig")
    except FileNotFoundError:
        raise SourceError(f"image source {uri!r} does not exist") from None
    except UnicodeDecodeError as exc:
        raise SourceError(f"image list {uri!r} is not UTF-8 text: {exc}") from None


def _list_txt(
    source: str, options: dict[str, Any] | None, root: str, allowed: frozenset[str] | None
) -> list[ImageRef]:
    refs = []
    for n, line in enumerate(_read_text(source, options).splitlines(), 1):
        entry = line.strip()
        if entry and not entry.startswith("#"):
            what = f"image list {source!r} line {n}:"
            refs.append(ImageRef(_resolve_entry(root, entry, allowed, what)))
    return refs


def _list_coco(
    source: str, options: dict[str, Any] | None, root: str, allowed: frozenset[str] | None
) -> list[ImageRef]:
    try:
        data = json.loads(_read_text(source, options))
    except json.JSONDecodeError as exc:
        raise SourceError(f"COCO file {source!r} is not valid JSON: {exc}") from None
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise SourceError(f"COCO file {source!r} has no 'images' list")
    refs = []
    for i, entry in enumerate(images):
        if not isinstance(entry, dict):
            raise SourceError(f"COCO file {source!r}: images[{i}] is not an object")
        field = next((k for k in ("uri", "file_name", "coco_url") if entry.get(k)), None)
        if field is None:
            raise SourceError(
                f"COCO file {source!r}: images[{i}] has none of 'uri', 'file_name', 'coco_url'"
            )
        what = f"COCO file {source!r}: images[{i}] {field}"
        refs.append(ImageRef(_resolve_entry(root, str(entry[field]), allowed, what)))
    return refs


def _display(path: str) -> str:
    """``path`` as valid UTF-8 text: bytes that are not UTF-8 (kept by Python as surrogate
    escapes) become ``\\xNN``. Arrow, JSON and the store need valid UTF-8 strings."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _list_local_tree(
    root: str, exts: tuple[str, ...], skipped: Counter[str] | None = None
) -> list[ImageRef]:
    refs = []
    root = os.path.abspath(root)
    st = os.stat(root)
    seen = {(st.st_dev, st.st_ino)}  # folders walked: a link back to one is not walked again
    stack = [root]

    def problem(path: str, kind: str, message: str) -> None:
        refs.append(ImageRef(_display(path), problem=(kind, message)))

    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as exc:
            problem(folder, "read_error", f"cannot list folder: {exc.strerror or exc}")
            continue
        for e in entries:
            image_ext = os.path.splitext(e.name)[1].lower() in exts
            try:
                st = os.stat(e.path)  # follows links
            except FileNotFoundError:
                # a dangling link (a file that vanished since it was listed is just gone)
                if image_ext and e.is_symlink():
                    target = _display(os.readlink(e.path))
                    problem(e.path, "broken_link", f"symbolic link to missing {target}")
                continue
            except OSError as exc:
                if image_ext:
                    kind = "link_loop" if exc.errno == errno.ELOOP else "read_error"
                    problem(e.path, kind, f"cannot stat: {exc.strerror or exc}")
                continue
            if stat.S_ISDIR(st.st_mode):
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    stack.append(e.path)
                continue
            if not (image_ext and stat.S_ISREG(st.st_mode)):
                if skipped is not None and stat.S_ISREG(st.st_mode):
                    skipped[_display(_ext(e.name))] += 1
                continue
            if not _is_utf8(e.path):
                problem(
                    e.path,
                    "bad_name",
                    "file name is not valid UTF-8 (bytes shown as \\xNN); rename the file "
                    "to index it",
                )
                continue
            refs.append(ImageRef(os.path.abspath(e.path), st.st_size, str(st.st_mtime_ns)))
    return refs


def _ext(name: str) -> str:
    return os.path.splitext(name)[1].lower() or "(none)"


def _list_fsspec_tree(
    source: str,
    exts: tuple[str, ...],
    storage_options: dict[str, Any] | None,
    skipped: Counter[str] | None = None,
) -> list[ImageRef]:
    fs, root = fsspec.core.url_to_fs(source, **_options_for(source, storage_options))
    if not fs.exists(root):
        raise SourceError(f"image source {source!r} does not exist")
    if fs.isfile(root):
        info = fs.info(root)
        return [ImageRef(fs.unstrip_protocol(root), info.get("size"), file_version(info))]
    found = fs.find(root, detail=True, withdirs=False)
    if skipped is not None:
        skipped.update(_ext(p) for p in found if os.path.splitext(p)[1].lower() not in exts)
    return [
        ImageRef(fs.unstrip_protocol(path), info.get("size"), file_version(info))
        for path, info in found.items()
        if os.path.splitext(path)[1].lower() in exts
    ]


def list_images(
    source: str,
    extensions: Iterable[str] = IMAGE_EXTENSIONS,
    storage_options: dict[str, Any] | None = None,
    image_root: str | None = None,
    allowed: Iterable[str] | None = None,
    skipped: Counter[str] | None = None,
) -> list[ImageRef]:
    """List a source's images, sorted by URI, each URI once.

    Args:
        source: folder, file, URI prefix, ``.txt`` list or COCO ``.json`` (see module doc).
        extensions: suffixes kept when walking folders/prefixes (case-insensitive).
        storage_options: fsspec options for remote URIs (ignored for local paths).
        image_root: for COCO files and .txt lists, the folder relative entries are under.
        allowed: protocols a list's absolute paths (``file``) and URIs may use
            (:func:`allowed_protocols`); None = any. Relative entries are always confined.
        skipped: counts, by extension, the files a folder or prefix walk left out because
            their extension is not in ``extensions`` (say which, not only how many).

    Raises:
        SourceError: the source does not exist, is malformed or holds no images, or a
            list's entry climbs out of its root or uses a protocol not allowed.
    """
    source = str(source)
    exts = _normalise_exts(extensions)
    lower = source.lower()
    protocols = None if allowed is None else frozenset(allowed)
    root = image_root if image_root is not None else _parent(source)  # of a list's entries
    if lower.endswith(".txt"):
        refs = _list_txt(source, storage_options, root, protocols)
    elif lower.endswith(".json"):
        refs = _list_coco(source, storage_options, root, protocols)
    elif _is_uri(source):
        refs = _list_fsspec_tree(source, exts, storage_options, skipped)
    else:
        path = source.removeprefix("file://")
        if os.path.isdir(path):
            refs = _list_local_tree(path, exts, skipped)
        elif os.path.isfile(path):
            st = os.stat(path)
            refs = [ImageRef(os.path.abspath(path), st.st_size, str(st.st_mtime_ns))]
        else:
            raise SourceError(f"image source {source!r} does not exist")
    unique = {r.uri: r for r in refs}
    if not unique:
        raise SourceError(f"image source {source!r} holds no images (extensions {list(exts)})")
    return [unique[u] for u in sorted(unique)]


def source_root(
    source: str, image_root: str | None = None, storage_options: dict[str, Any] | None = None
) -> str:
    """The folder or URI prefix that :func:`list_images`'s URIs for ``source`` are relative
    to, spelled the way those URIs are: a local folder's absolute path (a single file's
    folder), a URI prefix without its trailing ``/``, a ``.txt`` or COCO list's
    ``image_root`` (default: its folder). Nothing is read."""
    source = str(source)
    lower = source.lower()
    if lower.endswith((".txt", ".json")) and image_root is not None:
        source = str(image_root)
    elif lower.endswith((".txt", ".json")):
        return _parent(source)
    if _is_uri(source):
        fs, path = fsspec.core.url_to_fs(source, **_options_for(source, storage_options))
        return fs.unstrip_protocol(path.rstrip("/"))
    path = os.path.abspath(source.removeprefix("file://"))
    return os.path.dirname(path) if os.path.isfile(path) else path


def relative_path(uri: str, root: str) -> str:
    """``uri``'s path under ``root`` (:func:`source_root`), ``/``-separated: what a tool
    joins to the image folder. A URI outside the root (an absolute path in a ``.txt``
    list) keeps its whole path, without the protocol and the leading ``/``."""
    prefix = root.rstrip("/") + "/"
    if uri.startswith(prefix):
        return uri[len(prefix) :]
    if uri == root:
        return uri.rsplit("/", 1)[-1]
    return uri.split("://", 1)[-1].replace(os.sep, "/").lstrip("/")


def check_source(source: str, storage_options: dict[str, Any] | None = None) -> None:
    """Cheap pre-flight: raise SourceError if ``source`` does not exist (no listing)."""
    source = str(source)
    if _is_uri(source):
        try:
            fs, root = fsspec.core.url_to_fs(source, **_options_for(source, storage_options))
            ok = fs.exists(root)
        except Exception as exc:
            raise SourceError(f"image source {source!r} cannot be reached: {exc}") from None
    else:
        ok = os.path.exists(source.removeprefix("file://"))
    if not ok:
        raise SourceError(f"image source {source!r} does not exist")


def listing_hash(refs: Iterable[ImageRef]) -> str:
    """sha256 over (uri, size, version) of a listing: changes when any image may have."""
    h = hashlib.sha256()
    for r in sorted(refs):
        h.update(json.dumps([r.uri, r.size, r.version]).encode())
        h.update(b"\n")
    return h.hexdigest()


def read_bytes(
    uri: str, storage_options: dict[str, Any] | None = None, retry: RetryPolicy | None = None
) -> bytes:
    """The bytes of a local path or fsspec URI, retrying transient errors.

    Raises:
        FileNotFoundError: no such file.
        StoreError: a transient error outlived the retries.
    """

    def _read() -> bytes:
        if not _is_uri(uri):  # not fsspec: it reads "::" in a local file name as URL chaining
            with open(uri.removeprefix("file://"), "rb") as f:
                return f.read()
        with fsspec.open(uri, "rb", **_options_for(uri, storage_options)) as f:
            return f.read()

    return retry_call(f"read {uri}", _read, retry or RetryPolicy())
