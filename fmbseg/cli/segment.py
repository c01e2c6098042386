"""``fmbseg segment``: label images with a trained model and any list of class names."""

from __future__ import annotations

import argparse
import os
import posixpath
from collections.abc import Sequence
from typing import Any

from fmbseg.cli.annotate import CLASSES, VOCAB, vocabulary_from_args
from fmbseg.cli.core import Arg, Common, UsageError, command, usage_errors


def check_images(images: Sequence[str], storage_options: dict[str, Any]) -> None:
    """Raise UsageError naming every image path or URI that is not an existing file."""
    import fsspec

    bad = []
    for image in images:
        if (local := _local(image)) is None:
            with usage_errors(f"image {image!r} cannot be reached: ", Exception):
                fs, path = fsspec.core.url_to_fs(image, **storage_options)
                ok = fs.isfile(path)
        else:
            ok = os.path.isfile(local)
        if not ok:
            bad.append(image)
    if bad:
        raise UsageError(f"image not found (or not a file): {', '.join(map(repr, bad))}")


def output_names(stem: str) -> tuple[str, str]:
    """The label map and the overlay written for ``stem``."""
    return f"{stem}.png", f"{stem}_overlay.png"


def output_stems(images: Sequence[str], out: str) -> list[str]:
    """``{out}/{image file stem}`` per image, no two images writing the same file: a stem
    already taken (a repeated one, or ``x_overlay`` beside ``x``) gets ``-2``, ``-3``, ..."""
    join = posixpath.join if "://" in out else os.path.join
    taken: set[str] = set()
    stems = []
    for image in images:
        base = os.path.splitext(posixpath.basename(image.rstrip("/")))[0] or "image"
        n = 1
        while taken.intersection(output_names(base if n == 1 else f"{base}-{n}")):
            n += 1
        stem = base if n == 1 else f"{base}-{n}"
        taken.update(output_names(stem))
        stems.append(join(out, stem))
    return stems


def _local(path: str) -> str | None:
    """The resolved local path (symlinks followed), or None for a remote URI."""
    if "://" in path and not path.startswith("file://"):
        return None
    return os.path.realpath(path.removeprefix("file://"))


def check_outputs(
    images: Sequence[str],
    stems: Sequence[str],
    out: str,
    overwrite: bool,
    storage_options: dict[str, Any],
) -> None:
    """Raise UsageError naming the first output file that would replace an input image
    (never allowed) or an existing file (allowed with ``overwrite``), before any work."""
    import fsspec

    outputs = [p for stem in stems for p in output_names(stem)]
    inputs = {(_local(i) or i): i for i in images}
    for path in outputs:
        image = inputs.get(_local(path) or path)
        if image is not None:
            raise UsageError(
                f"--out {out!r} would replace input image {image!r} with its label map "
                "or overlay; choose another --out"
            )
    if _local(out) is not None:
        folder = out.removeprefix("file://")
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise UsageError(f"--out {out!r} is a file, not a folder")
        existing = [p for p in outputs if os.path.lexists(p.removeprefix("file://"))]
        folders = [p for p in existing if os.path.isdir(p.removeprefix("file://"))]
    else:
        with usage_errors(f"--out {out!r} cannot be reached: ", Exception):
            fs = fsspec.core.url_to_fs(out, **storage_options)[0]
            existing = [p for p in outputs if fs.exists(p)]
            folders = [p for p in existing if fs.isdir(p)]
    if folders:
        raise UsageError(f"--out {out!r}: output {folders[0]!r} is a folder")
    if existing and not overwrite:
        more = (
            f" ({len(existing)} of the {len(outputs)} output files do)" if len(existing) > 1 else ""
        )
        raise UsageError(
            f"--out {out!r}: {existing[0]!r} exists{more}; pass --overwrite to replace "
            "existing outputs"
        )


@command(
    "segment",
    "segment images with a trained model and any list of class names",
    Arg("images", nargs="+", metavar="IMAGE", help="image files: local paths or fsspec URIs"),
    CLASSES,
    VOCAB,
    Arg(
        "--model",
        default="champion",
        metavar="champion|latest|vNNNN|NAME:VERSION|URI",
        help="which model version to use (default: champion, the promoted version)",
    ),
    Arg(
        "--name",
        default=None,
        help="model name in the store's registry (default: the config's train.model_name)",
    ),
    Arg(
        "--out",
        default="./fmbseg-segment",
        help="output folder or fsspec URI (default %(default)s)",
    ),
    Arg(
        "--overwrite",
        action="store_true",
        help="replace output files that exist already (an input image is never replaced)",
    ),
    writes_store=False,
)
def cmd_segment(args: argparse.Namespace, common: Common) -> int:
    from fmbseg.data.images import decode_image
    from fmbseg.data.sources import read_bytes
    from fmbseg.segment import IncompatibleModelError, OpenVocabSegmenter, write_outputs
    from fmbseg.storage.models import CorruptModelError, ModelNotFoundError

    classes = list(vocabulary_from_args(args))  # at most 255: label maps are palette PNGs
    check_images(args.images, common.storage_options)
    stems = output_stems(args.images, args.out)
    check_outputs(args.images, stems, args.out, args.overwrite, common.storage_options)
    name = args.name or common.cfg.train.model_name
    try:
        segmenter = OpenVocabSegmenter.load(
            common.open_store(), args.model, name, common.cfg.runtime.device
        )
    except ModelNotFoundError as exc:
        hint = ""
        if args.model.endswith("champion") and not isinstance(exc, CorruptModelError):
            hint = (
                "; use --model latest (or NAME:vNNNN) for an unpromoted version, promote one "
                "with `fmbseg models promote NAME:vNNNN`, or run `fmbseg train` first if "
                "there is none"
            )
        raise UsageError(f"{exc}{hint}") from None
    except (IncompatibleModelError, ValueError) as exc:
        raise UsageError(f"--model {args.model!r}: {exc}") from None
    ref = segmenter.ref
    assert ref is not None  # load() always resolves one
    print(
        f"segment: {len(args.images)} image(s), model {ref.name}:{ref.version} ({ref.uri}), "
        f"{len(classes)} classes"
    )
    for image_uri, stem in zip(args.images, stems, strict=True):
        # ImageDecodeError is a ValueError
        with usage_errors(f"image {image_uri!r} cannot be read: ", FileNotFoundError, ValueError):
            image = decode_image(read_bytes(image_uri, common.storage_options), image_uri)
        label_map = segmenter.segment(image, classes)
        labels_png, overlay_png = write_outputs(
            image, label_map, classes, stem, storage_options=common.storage_options
        )
        print(f"  {image_uri} -> {labels_png} (label map), {overlay_png} (overlay)")
    print("  label values: " + ", ".join(f"{i}={c}" for i, c in enumerate(classes)))
    return 0
