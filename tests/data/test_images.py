"""decode_image / image_size over the pixel formats and failures found in real buckets."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
from PIL import Image

from fmbseg.data.images import ImageDecodeError, decode_image, image_size


def _encode(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _halves(w: int = 40, h: int = 20) -> Image.Image:
    """Left half red, right half blue (as stored)."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = (255, 0, 0)
    arr[:, w // 2 :] = (0, 0, 255)
    return Image.fromarray(arr)


def test_rgb_photo_round_trip(sample_images: list[np.ndarray]) -> None:
    photo = sample_images[0]
    out = decode_image(_encode(Image.fromarray(photo), "PNG"), "photo.png")
    assert out.dtype == np.uint8 and out.shape == photo.shape
    assert out.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(out, photo)
    jpeg = decode_image(_encode(Image.fromarray(photo), "JPEG", quality=95), "photo.jpg")
    assert jpeg.shape == photo.shape
    assert np.abs(jpeg.astype(int) - photo.astype(int)).mean() < 6


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_is_applied(fmt: str) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored image must be rotated 90 degrees clockwise for display
    data = _encode(_halves(40, 20), fmt, exif=exif)
    out = decode_image(data, f"rotated.{fmt.lower()}")
    assert out.shape == (40, 20, 3)  # displayed: 20 wide, 40 tall
    assert image_size(data) == (20, 40)
    # clockwise rotation moves the stored left (red) half to the top
    assert out[:15, :, 0].mean() > 200 and out[:15, :, 2].mean() < 50
    assert out[25:, :, 2].mean() > 200 and out[25:, :, 0].mean() < 50


def test_image_size_without_orientation() -> None:
    assert image_size(_encode(_halves(40, 20), "PNG")) == (40, 20)


def test_grayscale_and_bilevel_become_three_equal_channels() -> None:
    gray = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(6, 8) * 5)
    out = decode_image(_encode(gray, "PNG"))
    assert out.shape == (6, 8, 3)
    np.testing.assert_array_equal(out[..., 0], np.asarray(gray))
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    bilevel = gray.point(lambda v: 255 if v > 100 else 0).convert("1")
    out1 = decode_image(_encode(bilevel, "PNG"))
    assert set(np.unique(out1).tolist()) == {0, 255}


def test_transparency_is_composited_on_white() -> None:
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 0)  # invisible: must not leak through
    rgba[0, 1] = (10, 20, 30, 255)  # opaque: kept
    rgba[0, 2] = (0, 0, 0, 128)  # half black over white
    out = decode_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [10, 20, 30]
    assert all(abs(v - 127) <= 1 for v in out[0, 2].tolist())

    la = Image.fromarray(np.array([[[50, 0], [50, 255]]], np.uint8), "LA")
    assert decode_image(_encode(la, "PNG"))[0].tolist() == [[255] * 3, [50] * 3]

    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 255, 0, 200, 0, 0] + [0] * 762)
    palette.putdata([0, 1])
    data = _encode(palette, "PNG", transparency=0)
    assert decode_image(data).tolist() == [[[255, 255, 255], [200, 0, 0]]]


def test_sixteen_bit_is_scaled_to_eight() -> None:
    values = np.array([[0, 257 * 100, 65535, 300]], np.uint16)
    im = Image.fromarray(values)
    assert im.mode.startswith("I;16")
    out = decode_image(_encode(im, "PNG"), "deep.png")
    assert out[0, :, 0].tolist() == [0, 100, 255, 1]
    reloaded = Image.open(io.BytesIO(_encode(im, "PNG")))
    assert reloaded.mode in ("I;16", "I")  # whichever Pillow picks, the result is the same


def test_float_images_are_min_max_scaled() -> None:
    im = Image.fromarray(np.array([[-1.0, 0.0, 1.0]], np.float32), "F")
    out = decode_image(_encode(im, "TIFF"))
    assert out[0, :, 0].tolist() == [0, 128, 255]


def test_cmyk_is_converted() -> None:
    cmyk = Image.new("CMYK", (4, 4), (0, 0, 0, 0))  # no ink = white
    cmyk.paste((0, 255, 255, 0), (0, 0, 2, 4))  # magenta + yellow = red
    out = decode_image(_encode(cmyk, "JPEG", quality=100))
    assert out.shape == (4, 4, 3)
    assert out[0, 3].min() > 240  # white
    assert out[0, 0, 0] > 200 and out[0, 0, 1:].max() < 60  # red


def test_first_frame_of_animations() -> None:
    frames = [Image.new("RGB", (3, 3), c) for c in ((255, 0, 0), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    out = decode_image(buf.getvalue())
    assert out.shape == (3, 3, 3) and out[0, 0].tolist() == [255, 0, 0]


# ---- failures --------------------------------------------------------------------------------


def _jpeg(sample_images: list[np.ndarray]) -> bytes:
    return _encode(Image.fromarray(sample_images[0]), "JPEG", quality=90)


def test_empty_file() -> None:
    with pytest.raises(ImageDecodeError, match=r"^a\.jpg: empty file \(0 bytes\)$") as info:
        decode_image(b"", "a.jpg")
    assert info.value.kind == "empty" and info.value.uri == "a.jpg"


def test_text_named_jpg() -> None:
    with pytest.raises(ImageDecodeError, match="not an image file") as info:
        decode_image(b"hello, I am a text file\n", "notes.jpg")
    assert info.value.kind == "not_an_image"
    with pytest.raises(ImageDecodeError):
        image_size(b"hello", "notes.jpg")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file(sample_images: list[np.ndarray], fmt: str) -> None:
    data = _encode(Image.fromarray(sample_images[0]), fmt)
    cut = data[: len(data) // 2]
    with pytest.raises(ImageDecodeError, match="cannot decode pixels") as info:
        decode_image(cut, "cut")
    assert info.value.kind == "truncated"
    assert image_size(cut) == (sample_images[0].shape[1], sample_images[0].shape[0])  # header ok


def test_corrupt_body(sample_images: list[np.ndarray]) -> None:
    data = bytearray(_encode(Image.fromarray(sample_images[0]), "PNG"))
    data[60:400] = bytes(340)  # zero the start of the compressed stream (header intact)
    with pytest.raises(ImageDecodeError) as info:
        decode_image(bytes(data), "broken.png")
    assert info.value.kind in ("corrupt", "truncated")
    assert "broken.png" in str(info.value)


def test_too_many_pixels(sample_images: list[np.ndarray]) -> None:
    h, w = sample_images[0].shape[:2]
    with pytest.raises(ImageDecodeError, match=f"{w}x{h} = {w * h} pixels > max_pixels=100"):
        decode_image(_jpeg(sample_images), "big.jpg", max_pixels=100)
    assert decode_image(_jpeg(sample_images), "big.jpg", max_pixels=w * h).shape == (h, w, 3)


def test_decode_error_pickles() -> None:
    err = pickle.loads(pickle.dumps(ImageDecodeError("s3://b/x.jpg", "boom", "truncated")))
    assert (err.uri, err.reason, err.kind) == ("s3://b/x.jpg", "boom", "truncated")
    assert str(err) == "s3://b/x.jpg: boom"
