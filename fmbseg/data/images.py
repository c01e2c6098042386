"""Decoding image bytes into ``HxWx3 uint8 RGB`` arrays, whatever the file's pixel format.

Conventions (applied by every stage, so all of them see the same pixels):
- EXIF orientation is applied (``ImageOps.exif_transpose``): width/height are those of
  the image as displayed.
- Transparency (RGBA, LA, PA, palette with a transparent index) is composited onto white:
  pixels under alpha 0 hold arbitrary colours that viewers never show, so dropping alpha
  would label invisible content.
- Grayscale and bilevel images are replicated to 3 channels.
- 16-bit integer images (``I;16*``, 32-bit ``I`` holding 16-bit data) are scaled to 8 bits
  by ``round(v / 257)`` (65535 -> 255); 32-bit data beyond 16 bits and float (``F``) images
  are min-max scaled to [0, 255].
- CMYK, YCbCr, LAB and HSV are converted with Pillow's ``convert("RGB")``.
- Multi-frame files (GIF, TIFF) use their first frame.

Memory: a decoded image costs ``width x height x bytes per pixel`` of its file's mode
(:func:`decoded_bytes`; PIL keeps RGB in 4 bytes). :func:`check_image` (what the index runs)
decodes in the file's own mode and keeps nothing; :class:`MemoryBudget` bounds what several
threads decode at once; ``decode_image(..., max_side=)`` decodes a JPEG at a reduced scale
(libjpeg's DCT scaling) and shrinks other formats before the RGB conversion, for callers
that shrink the image anyway (``min_side=``: by the short side, as clip_dense does).
``bench/decode_memory.py`` prints the peaks.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import threading
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fmbseg.quiet import ignoring

log = logging.getLogger(__name__)

# EXIF orientations that swap width and height (transpose, rotate 90/270, transverse).
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION = 0x0112


class ImageDecodeError(ValueError):
    """An input is not a decodable image.

    Attributes:
        uri: the input's URI (or any name the caller gave).
        reason: what was wrong, in words.
        kind: a short machine-readable category: ``empty``, ``not_an_image``,
            ``truncated``, ``corrupt``, ``too_large``.
    """

    def __init__(self, uri: str, reason: str, kind: str = "corrupt") -> None:
        super().__init__(f"{uri}: {reason}")
        self.uri, self.reason, self.kind = uri, reason, kind

    def __reduce__(self):  # keep all three fields through pickling (Ray, multiprocessing)
        return (type(self), (self.uri, self.reason, self.kind))


def _open(data: bytes, uri: str, max_pixels: int | None) -> Image.Image:
    if not data:
        raise ImageDecodeError(uri, "empty file (0 bytes)", "empty")
    try:
        # Our own max_pixels check below replaces PIL's warning; keep its hard error.
        with ignoring(Image.DecompressionBombWarning):  # reads the header only: short
            im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageDecodeError(
            uri, f"not an image file (unrecognised format, {len(data)} bytes)", "not_an_image"
        ) from None
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(uri, f"image too large: {exc}", "too_large") from None
    except Exception as exc:  # a recognised header that is itself broken
        raise ImageDecodeError(uri, f"corrupt header: {type(exc).__name__}: {exc}") from None
    if max_pixels is not None and im.width * im.height > max_pixels:
        raise ImageDecodeError(
            uri,
            f"image too large: {im.width}x{im.height} = {im.width * im.height} pixels "
            f"> max_pixels={max_pixels}",
            "too_large",
        )
    return im


def _load(im: Image.Image, uri: str) -> None:
    try:
        # Not under fmbseg.quiet.ignoring: decoding runs in several threads at once. Only GIF,
        # ICO, ICNS and a few rarer formats check frame sizes again here, and they warn only
        # past PIL's 89-megapixel limit.
        im.load()
    except OSError as exc:
        text = str(exc)
        kind = "truncated" if "truncat" in text.lower() else "corrupt"
        raise ImageDecodeError(uri, f"cannot decode pixels: {text}", kind) from None
    except Exception as exc:
        raise ImageDecodeError(uri, f"cannot decode pixels: {type(exc).__name__}: {exc}") from None


def _to_rgb(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im)
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
        if mode == "RGB":
            return np.asarray(im)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(im).astype(np.float64)
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if mode == "I" and lo >= 0 and hi <= 255:
            gray = arr  # 8-bit data stored as 32-bit (some TIFFs, PNG via I)
        elif mode.startswith("I;16") or (mode == "I" and lo >= 0 and hi <= 65535):
            gray = arr / 257.0
        else:
            gray = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        gray8 = np.clip(np.rint(gray), 0, 255).astype(np.uint8)
        return np.repeat(gray8[:, :, None], 3, axis=2)
    if mode in ("L", "1"):
        gray8 = np.asarray(im.convert("L"))
        return np.repeat(gray8[:, :, None], 3, axis=2)
    return np.asarray(im.convert("RGB"))  # CMYK, YCbCr, LAB, HSV


def decoded_bytes(im: Image.Image) -> int:
    """Bytes PIL holds for ``im``'s pixels once loaded (its mode's bytes per pixel; PIL
    stores 3-band modes in 4 bytes)."""
    per_pixel = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "LA": 4, "PA": 4}
    return im.width * im.height * per_pixel.get(im.mode, 4)


# Decoded bytes one worker's image readers hold at once (index's checks, the model stages'
# read-ahead); a larger image is decoded alone.
WORKER_DECODE_BUDGET = 1 << 30


class MemoryBudget:
    """Bounds the decoded bytes that threads hold at once: :meth:`hold` waits until its
    bytes fit beside the others'. An image larger than the whole budget waits for every
    other one and then decodes alone, so the peak is ``max(limit, the largest image)``.
    """

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self._cond = threading.Condition()

    def acquire(self, nbytes: int) -> int:
        """Wait until ``nbytes`` (at most the limit) fit; returns what was taken, for
        :meth:`release`."""
        n = min(nbytes, self.limit)
        with self._cond:
            self._cond.wait_for(lambda: self.used + n <= self.limit)
            self.used += n
        return n

    def try_acquire(self, nbytes: int, force: bool = False) -> int | None:
        """Take ``nbytes`` now if they fit (or, with ``force``, even if not: the caller
        cannot wait); None when they do not."""
        with self._cond:
            if not force and self.used + min(nbytes, self.limit) > self.limit:
                return None
            self.used += nbytes
        return nbytes

    def release(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()

    @contextlib.contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        n = self.acquire(nbytes)
        try:
            yield
        finally:
            self.release(n)


def check_image(
    data: bytes,
    uri: str = "<bytes>",
    max_pixels: int | None = None,
    budget: MemoryBudget | None = None,
) -> tuple[int, int]:
    """Decode the whole file (catching truncation and corruption) and return ``(width,
    height)`` as displayed, keeping no pixels: no RGB conversion or array copy, so the
    peak is the file mode's own buffer (:func:`decoded_bytes`; a JPEG's at 1/8 scale),
    held under ``budget``.

    Raises:
        ImageDecodeError: as :func:`decode_image`.
    """
    im = _open(data, uri, max_pixels)
    size = _displayed(im)
    if im.format == "JPEG":
        # libjpeg's DCT scaling: every byte of the entropy-coded data is still decoded (a
        # truncated or corrupt stream still fails), the pixels kept are 1/64 as many
        im.draft(im.mode, (max(1, im.width // 8), max(1, im.height // 8)))
    with budget.hold(decoded_bytes(im)) if budget else contextlib.nullcontext():
        _load(im, uri)
        im.close()
    return size


def _reduce(im: Image.Image, max_side: int | None, min_side: int | None = None) -> Image.Image:
    """``im`` shrunk by a whole factor so its long side is at least ``max_side`` and its
    short side at least ``min_side`` (box filter, PIL's ``reduce``); as is when that is not
    possible for its mode."""
    factor = min(
        max(im.size) // max_side if max_side else 1 << 30,
        min(im.size) // min_side if min_side else 1 << 30,
    )
    if factor < 2:
        return im
    try:
        return im.reduce(factor)
    except (ValueError, NotImplementedError):  # modes reduce does not take (P, 1, I;16)
        return im


def _draft(im: Image.Image, scale: float) -> None:
    """Ask PIL to decode at the largest DCT scale whose result is at least ``scale`` times
    the size (ceil: the requested sides themselves stay within bounds)."""
    im.draft(im.mode, (max(1, math.ceil(im.width * scale)), max(1, math.ceil(im.height * scale))))


def decode_image(
    data: bytes,
    uri: str = "<bytes>",
    max_pixels: int | None = None,
    max_side: int | None = None,
    min_side: int | None = None,
) -> np.ndarray:
    """Decode an encoded image to ``HxWx3 uint8 RGB`` (C-contiguous), EXIF-oriented.

    Args:
        data: the file's bytes.
        uri: name used in error messages.
        max_pixels: images with more pixels (width x height) raise ``too_large``.
        max_side: for a caller that shrinks the image anyway: a larger image may come back
            smaller, its long side still at least ``max_side`` (aspect ratio kept, up to
            rounding). JPEGs are decoded at that scale (``Image.draft``), others shrunk
            before the RGB conversion; None = full size.
        min_side: the same for a caller that resizes by the short side (clip_dense): its
            short side stays at least ``min_side``. With both, both hold.

    Raises:
        ImageDecodeError: empty, not an image, truncated, corrupt or too large.
    """
    im = _open(data, uri, max_pixels)
    scale = min(
        max_side / max(im.size) if max_side else 1.0,
        min_side / min(im.size) if min_side else 1.0,
    )
    if scale < 1.0:
        with contextlib.suppress(Exception):  # a format without draft mode: decoded whole
            _draft(im, scale)
    _load(im, uri)
    if max_side is not None or min_side is not None:
        im = _reduce(im, max_side, min_side)
    try:
        ImageOps.exif_transpose(im, in_place=True)  # not a copy of an upright image
    except Exception as exc:  # a malformed EXIF block should not lose the pixels
        log.warning("%s: ignoring unreadable EXIF orientation (%s)", uri, exc)
    try:
        arr = _to_rgb(im)
    except Exception as exc:
        raise ImageDecodeError(uri, f"cannot convert mode {im.mode} to RGB: {exc}") from None
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:  # pragma: no cover
        raise ImageDecodeError(uri, f"decoded to {arr.shape} {arr.dtype}, not HxWx3 uint8")
    return np.ascontiguousarray(arr)


def decode_cost(
    data: bytes, uri: str = "<bytes>", max_pixels: int | None = None, min_side: int | None = None
) -> int:
    """Bytes ``decode_image(data, uri, max_pixels, min_side=min_side)`` needs at its peak,
    from the header: PIL's buffer in the file's mode (a JPEG's at its DCT scale) plus an
    RGB array as large (an upper bound: ``reduce`` then shrinks it).

    Raises:
        ImageDecodeError: as :func:`image_size`, and ``too_large`` past ``max_pixels``.
    """
    im = _open(data, uri, max_pixels)
    if min_side is not None and min(im.size) > min_side and im.format == "JPEG":
        _draft(im, min_side / min(im.size))  # as decode_image does
    return decoded_bytes(im) + 3 * im.width * im.height


def image_size(data: bytes, uri: str = "<bytes>") -> tuple[int, int]:
    """``(width, height)`` as displayed (EXIF orientation applied), from the header only.

    Cheap: the pixels are not decoded, so a truncated file may still report a size.

    Raises:
        ImageDecodeError: empty or not an image.
    """
    return _displayed(_open(data, uri, None))


def _displayed(im: Image.Image) -> tuple[int, int]:
    w, h = im.size
    try:
        orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:
        orientation = 1
    return (h, w) if orientation in _SWAPPING_ORIENTATIONS else (w, h)


def to_rgb(image: Image.Image | np.ndarray, what: str = "<image>") -> np.ndarray:
    """A PIL image or a numpy array -> ``HxWx3 uint8 RGB`` by the rules above, the ones
    :func:`decode_image` applies to files (so the Python API sees what the index stage sees).

    Arrays: ``HxW`` or ``HxWx1`` (gray), ``HxWx2`` (gray + alpha), ``HxWx3`` (RGB), ``HxWx4``
    (RGBA), of uint8, uint16 (scaled by 1/257) or a type Pillow reads as one channel
    (int32, float32: min-max scaled when beyond 8/16 bits).

    Raises:
        ImageDecodeError: a shape or dtype that is not an image (the message says which).
    """
    if isinstance(image, Image.Image):
        upright = ImageOps.exif_transpose(image)  # a copy: the caller's image is not changed
        return np.ascontiguousarray(_to_rgb(upright if upright is not None else image))
    arr = np.asarray(image)
    if arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3:
        return np.ascontiguousarray(arr)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.dtype == np.uint16:  # Pillow has no 16-bit RGB(A) mode
        arr = np.rint(arr / 257.0).astype(np.uint8)
    im: Image.Image | None
    try:
        im = Image.fromarray(arr)
    except (TypeError, ValueError, KeyError):
        im = None
    if im is None or arr.ndim not in (2, 3) or 0 in arr.shape[:2]:
        raise ImageDecodeError(
            what,
            f"a {arr.dtype} array of shape {arr.shape} is not an image: use HxW (gray), "
            "HxWx3 (RGB) or HxWx4 (RGBA), uint8 or uint16",
        )
    return np.ascontiguousarray(_to_rgb(im))
