"""What the Prefect UI shows: plain table cells, images embedded in markdown artifacts."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
from PIL import Image

from fmbseg.flows.annotate import ARTIFACT_THUMB_SIDE, gallery_markdown
from fmbseg.flows.common import plain
from fmbseg.flows.train import loss_markdown
from fmbseg.storage import ArtifactStore
from fmbseg.tasks.annotate.gallery import jpeg
from fmbseg.tasks.train.loop import loss_curve_png

DATA_IMAGE = re.compile(r"!\[([^\]]*)\]\(data:(image/[a-z]+);base64,([A-Za-z0-9+/=]+)\)")


def _images(markdown: str) -> list[tuple[str, str, Image.Image]]:
    return [
        (alt, mime, Image.open(io.BytesIO(base64.b64decode(b64))))
        for alt, mime, b64 in DATA_IMAGE.findall(markdown)
    ]


def test_table_cells_are_plain_values_not_reprs() -> None:
    assert plain({"grass": 3, "sky": 1}) == "grass 3, sky 1"
    assert plain({"index": {"corrupt": 2}, "merge": {"no_masks": 1}}) == (
        "index: corrupt 2; merge: no_masks 1"
    )
    assert plain(["cat", "dog"]) == "cat, dog" and plain(None) == "-" and plain({}) == "-"
    assert plain(3) == 3 and plain(0.5) == 0.5 and plain("s3://b/x") == "s3://b/x"


def test_gallery_markdown_embeds_a_few_overlays(tmp_path) -> None:
    store = ArtifactStore(str(tmp_path))
    rng = np.random.default_rng(0)
    for i in range(6):
        big = rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)
        store.write_bytes(f"exports/fp1/overlays/img{i}.jpg", jpeg(big))
        if i % 2:  # large overlays have a 320 px thumb; small ones do not
            store.write_bytes(f"exports/fp1/thumbs/img{i}.jpg", jpeg(big, 320))
    store.write_bytes("exports/fp1/gallery.html", b"<html></html>")
    md = gallery_markdown(store, "fp1")
    shown = _images(md)
    assert [alt for alt, _, _ in shown] == ["img0", "img1", "img2", "img3"]
    for _, mime, im in shown:
        assert mime == "image/jpeg" and im.format == "JPEG"
        assert max(im.size) == ARTIFACT_THUMB_SIDE and im.size[0] > im.size[1]
    assert len(md) < 4 * 40_000  # small enough for Prefect's database
    assert f"Full gallery: `{store.url('exports/fp1/gallery.html')}`" in md
    assert "no overlays" in gallery_markdown(store, "other")


def test_loss_markdown_embeds_the_curve() -> None:
    png = loss_curve_png([1.0, 0.5], [1.2, 0.9, 0.6, 0.4])
    summary = {
        "model": "m",
        "version": "v0001",
        "epoch_losses": [1.0, 0.5],
        "loss_curve": "file:///s/models/m/v0001/loss_curve.png",
    }
    md = loss_markdown(summary, png)
    ((alt, mime, im),) = _images(md)
    assert alt == "loss curve" and mime == "image/png" and im.format == "PNG"
    assert "| 2 | 0.5000 |" in md and "loss_curve.png`" in md
