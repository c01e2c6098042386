"""The embedded default input: five real photos shipped with scikit-image.

``fmbseg run`` writes them (as JPEGs) into the store under ``samples/`` so that every worker
that can read the store can read them (a local folder, or s3://... on a cluster).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from typing import Any

import fsspec
import numpy as np
from PIL import Image

# The class list the sample photos are annotated with by default.
SAMPLE_CLASSES: tuple[str, ...] = (
    "person",
    "cat",
    "cup",
    "rocket",
    "motorcycle",
    "flag",
    "sky",
    "tree",
    "building",
    "table",
    "wall",
    "grass",
)


def _photos() -> dict[str, Callable[[], np.ndarray]]:
    import skimage.data as d

    return {
        "astronaut": d.astronaut,
        "chelsea": d.chelsea,
        "coffee": d.coffee,
        "rocket": d.rocket,
        "motorcycle": lambda: d.stereo_motorcycle()[0],
    }


def write_sample_photos(prefix: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """Write the sample photos as ``{prefix}/{name}.jpg`` (kept if already there).

    Returns ``prefix`` without a trailing slash, ready to be an image source.
    """
    fs, root = fsspec.core.url_to_fs(prefix, **dict(storage_options or {}))
    root = root.rstrip("/")
    fs.makedirs(root, exist_ok=True)
    for name, load in _photos().items():
        path = f"{root}/{name}.jpg"
        if fs.exists(path):
            continue
        buf = io.BytesIO()
        Image.fromarray(load()).convert("RGB").save(buf, format="JPEG", quality=92)
        fs.pipe_file(path, buf.getvalue())
    return prefix.rstrip("/")
