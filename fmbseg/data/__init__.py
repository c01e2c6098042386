"""Image sources and decoding."""

from fmbseg.data.images import ImageDecodeError, decode_image, image_size
from fmbseg.data.sources import (
    ImageRef,
    SourceError,
    check_source,
    list_images,
    listing_hash,
    read_bytes,
)

__all__ = [
    "ImageDecodeError",
    "ImageRef",
    "SourceError",
    "check_source",
    "decode_image",
    "image_size",
    "list_images",
    "listing_hash",
    "read_bytes",
]
