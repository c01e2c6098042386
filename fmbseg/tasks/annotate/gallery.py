"""What a person looks at: class colours, label-map PNGs, overlays and one static gallery page.

Pure functions (arrays and strings in, bytes and strings out); :mod:`fmbseg.tasks.annotate.export`
decides what to write where.
"""

from __future__ import annotations

import colorsys
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import quote

import numpy as np
from PIL import Image

from fmbseg.storage.records import IGNORE

IGNORE_COLOUR = (0, 0, 0)
THUMB_SIDE = 320  # long side of the gallery's card images


def has_thumb(height: int, width: int) -> bool:
    """Whether an image's overlay gets a separate thumbnail: only one larger than
    :data:`THUMB_SIDE`; a card shows a smaller overlay itself."""
    return max(height, width) > THUMB_SIDE


def class_colours(n: int) -> np.ndarray:
    """``(n, 3) uint8`` RGB colours, deterministic; never black (black = unlabelled)."""
    from matplotlib import colormaps  # here: importing it costs the CLI a fraction of a second

    # distinct, readable colours for the first classes: Tableau 20, its 10 dark then 10 light
    tab20 = np.rint(colormaps["tab20"](np.arange(20))[:, :3] * 255).astype(int)
    out = np.concatenate([tab20[0::2], tab20[1::2]])[:n].tolist()
    for i in range(len(out), n):  # golden-ratio hues, alternating lightness
        h = (i * 0.618033988749895) % 1.0
        r, g, b = colorsys.hls_to_rgb(h, 0.45 if i % 2 else 0.65, 0.75)
        out.append((round(255 * r), round(255 * g), round(255 * b)))
    return np.array(out, dtype=np.uint8).reshape(n, 3)


def palette(colours: np.ndarray) -> list[int]:
    """A 768-entry PIL palette: class ``k`` -> ``colours[k]``, 255 (ignore) -> black."""
    pal = np.zeros((256, 3), dtype=np.uint8)
    pal[: len(colours)] = colours
    pal[IGNORE] = IGNORE_COLOUR
    return pal.reshape(-1).tolist()


def label_png(label: np.ndarray, colours: np.ndarray, compress_level: int = 6) -> bytes:
    """``HxW uint8`` label map -> palette PNG bytes; pixel values are the class ids (255 = ignore).

    ``compress_level``: zlib's 0-9 (PIL's default 6); lossless at every level.
    """
    if label.dtype != np.uint8 or label.ndim != 2:
        raise ValueError(
            f"label_png: expected an HxW uint8 label map, got {label.shape} {label.dtype}"
        )
    im = Image.fromarray(label)  # mode "L"; putpalette turns it into "P" keeping the values
    im.putpalette(palette(colours))
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False, compress_level=compress_level)
    return buf.getvalue()


def overlay(image: np.ndarray, label: np.ndarray, colours: np.ndarray, alpha: float) -> np.ndarray:
    """``HxWx3 uint8`` image blended with the label colours; region outlines in white.

    Unlabelled pixels keep the image, darkened, so gaps in the pseudo-labels stand out.
    The blend, darkening and selection are Pillow's (C, one pass each, the GIL released):
    the same pixels as the float formula ``(1 - alpha) * image + alpha * colour`` truncated.
    """
    if image.shape[:2] != label.shape or image.shape[2:] != (3,) or label.dtype != np.uint8:
        raise ValueError(
            f"overlay: expected an HxWx3 image and an HxW uint8 label map, got "
            f"{image.shape} {image.dtype} and {label.shape} {label.dtype}"
        )
    classes = Image.fromarray(label)
    labelled = classes.point(_LABELLED)  # 255 where labelled, 0 where IGNORE
    classes.putpalette(palette(colours))
    base = Image.fromarray(np.ascontiguousarray(image))
    blended = Image.blend(base, classes.convert("RGB"), alpha)
    out = np.array(Image.composite(blended, base.point(_DARKEN), labelled))
    out[inner_boundaries(label)] = 255
    return out


_LABELLED = [255] * IGNORE + [0] * (256 - IGNORE)
_DARKEN = [int(v * 0.6) for v in range(256)] * 3  # per band


def inner_boundaries(label: np.ndarray) -> np.ndarray:
    """``HxW bool``: labelled pixels with a 4-neighbour of another value (image edges excluded).

    The same as ``skimage.segmentation.find_boundaries(label, mode="inner",
    background=IGNORE)``, with four array comparisons instead of two grey-morphology passes.
    """
    edge = np.zeros(label.shape, dtype=bool)
    down = label[1:] != label[:-1]
    edge[1:] |= down
    edge[:-1] |= down
    right = label[:, 1:] != label[:, :-1]
    edge[:, 1:] |= right
    edge[:, :-1] |= right
    edge &= label != IGNORE
    return edge


def jpeg(image: np.ndarray, max_side: int | None = None, quality: int = 85) -> bytes:
    """``HxWx3 uint8`` -> JPEG bytes, shrunk so the long side is at most ``max_side``."""
    im = Image.fromarray(image)
    if max_side and max(im.size) > max_side:
        scale = max_side / max(im.size)
        im = im.resize(
            (max(1, round(im.width * scale)), max(1, round(im.height * scale))),
            Image.Resampling.LANCZOS,
        )
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@dataclass
class GalleryEntry:
    """One image card: thumbnail/overlay paths relative to the page, and mask counts."""

    name: str
    uri: str
    thumb: str
    full: str
    label_file: str | None
    prompt_masks: int
    auto_masks: int
    classes: list[int] = field(default_factory=list)  # category ids in the label map


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5rem;background:#fafafa;color:#222}
h1{margin:0 0 .3rem}.sum{color:#555;margin-bottom:1rem}
.legend{display:flex;flex-wrap:wrap;gap:.4rem .9rem;margin:1rem 0}
.sw{display:inline-block;width:.9rem;height:.9rem;border-radius:2px;vertical-align:-2px;
margin-right:.3rem;border:1px solid #0003}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(240px,1fr));gap:1rem}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.5rem}
.card img{width:100%;border-radius:4px}.name{font-weight:600;word-break:break-all}
.meta{font-size:.85rem;color:#555}.chips{display:flex;flex-wrap:wrap;gap:.25rem;margin-top:.3rem}
.chip{font-size:.75rem;padding:0 .35rem;border-radius:3px}
table{border-collapse:collapse;font-size:.85rem}td,th{border:1px solid #ddd;padding:.2rem .5rem}
"""


def _chip(name: str, colour: Sequence[int]) -> str:
    r, g, b = (int(c) for c in colour)
    ink = "#000" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "#fff"  # readable on the colour
    return (
        f'<span class="chip" style="background:rgb({r},{g},{b});color:{ink}">'
        f"{html.escape(name)}</span>"
    )


def _href(path: str) -> str:
    """A relative path as an attribute value: ``#``, ``?``, ``%`` and spaces in file names
    would otherwise change what the browser fetches."""
    return html.escape(quote(path))


def gallery_html(
    title: str,
    entries: Sequence[GalleryEntry],
    vocabulary: Sequence[str],
    colours: np.ndarray,
    mask_counts: Sequence[int],
    summary: dict[str, int],
    errors: Sequence[tuple[str, str, str]] = (),
    num_errors: int | None = None,
) -> str:
    """A self-contained static page: summary, class legend, image cards, unlabelled images.

    ``mask_counts[k]``: masks of class ``k`` over the whole export; ``errors``: ``(uri,
    error_type, message)`` of failed inputs (the first 200 are listed);
    ``num_errors``: how many there are in all (default ``len(errors)``), for a caller that
    passes only the first ones.
    """
    legend = "".join(
        f'<span><span class="sw" style="background:rgb({c[0]},{c[1]},{c[2]})"></span>'
        f"{html.escape(name)} <span class='meta'>({n})</span></span>"
        for name, c, n in zip(vocabulary, colours.tolist(), mask_counts, strict=True)
    )
    cards = []
    for e in entries:
        chips = "".join(_chip(vocabulary[k], colours[k]) for k in e.classes)
        label_link = f' · <a href="{_href(e.label_file)}">label PNG</a>' if e.label_file else ""
        cards.append(
            f'<div class="card"><a href="{_href(e.full)}"><img loading="lazy" '
            f'src="{_href(e.thumb)}" alt="{html.escape(e.name)}"></a>'
            f'<div class="name" title="{html.escape(e.uri)}">{html.escape(e.name)}</div>'
            f'<div class="meta">{e.prompt_masks + e.auto_masks} masks: {e.prompt_masks} '
            f"prompt, {e.auto_masks} auto{label_link}</div>"
            f'<div class="chips">{chips}</div></div>'
        )
    summary_text = " · ".join(f"{html.escape(k)}: {v}" for k, v in summary.items())
    err_rows = "".join(
        f"<tr><td>{html.escape(u)}</td><td>{html.escape(t)}</td><td>{html.escape(m)}</td></tr>"
        for u, t, m in list(errors)[:200]
    )
    total = len(errors) if num_errors is None else num_errors
    err_html = (
        f"<h2>Failed inputs ({total})</h2><table><tr><th>image</th>"
        f"<th>reason</th><th>detail</th></tr>{err_rows}</table>"
        if errors
        else ""
    )
    shown = (
        f"<p class='meta'>showing {len(entries)} of "
        f"{summary.get('labelled images', len(entries))}"
        " labelled images</p>"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
        f'<div class="sum">{summary_text}</div><h2>Classes</h2><div class="legend">{legend}</div>'
        f'<h2>Images</h2>{shown}<div class="grid">{"".join(cards)}</div>{err_html}'
        "</body></html>"
    )
