"""Open-vocabulary inference with a trained alignment module (METHOD.md stage 2, "Inference").

frozen DINOv2 -> alignment module -> cosine similarity with the text embeddings of *any*
class list -> bilinear upsampling to the image size -> per-pixel argmax.

Geometry, as in training (:mod:`fmbseg.tasks.train_crops`) and the evaluation protocol: the
image is resized so its short side is the training input size (``card.encoder.input_size``)
and scored in square windows of that size, stride half a window, with the evaluation's own
sliding-window code (:mod:`fmbseg.tasks.evaluate`); objects keep their aspect ratio.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import torch
import torch.nn.functional as F

from fmbseg.config import TrainConfig
from fmbseg.models.align import AlignmentConfig, AlignmentModule
from fmbseg.models.base import DenseClip, PatchEncoder
from fmbseg.storage.models import ModelRef, ModelRegistry
from fmbseg.storage.store import ArtifactStore
from fmbseg.tasks.train import CARD_KIND, resolve_device
from fmbseg.tasks.train_crops import resized_short_side
from fmbseg.tasks.train_data import vocabulary_names

WINDOW_BATCH = 8  # windows per encoder call (bounds memory; does not change the result)


class IncompatibleModelError(ValueError):
    """A checkpoint and an encoder / text model do not fit together; the message says why."""


class OpenVocabSegmenter:
    """A loaded alignment module with its encoder and text model (load once, segment many).

    Build with :meth:`load`. Images are ``HxWx3 uint8 RGB``; class lists are any non-empty
    list of distinct names (not necessarily the training vocabulary).
    """

    def __init__(
        self,
        module: AlignmentModule,
        encoder: PatchEncoder,
        text_model: DenseClip,
        card: dict[str, Any],
        device: torch.device,
        ref: ModelRef | None = None,
        templates: tuple[str, ...] | None = None,
    ) -> None:
        self.module = module.eval().to(device)
        self.encoder = encoder
        self.text_model = text_model
        self.card = card
        self.device = device
        self.ref = ref
        self.input_size = int(card["encoder"]["input_size"])
        self.templates = tuple(templates or card["text"]["templates"])
        self._text_cache: dict[tuple[str, ...], torch.Tensor] = {}

    @classmethod
    def load(
        cls,
        store: ArtifactStore,
        ref: str = "champion",
        name: str | None = None,
        device: str | torch.device = "auto",
        *,
        encoder: PatchEncoder | None = None,
        text_model: DenseClip | None = None,
        templates: tuple[str, ...] | None = None,
    ) -> OpenVocabSegmenter:
        """Load a model version and the encoder / text model its card names.

        Args:
            ref: ``"champion"``, ``"latest"``, ``"vNNNN"``, ``"name:version"`` or a version
                folder URI (see :mod:`fmbseg.storage.models`).
            name: model name for refs without one; default ``TrainConfig.model_name``.
            encoder, text_model: prebuilt models to use instead of building the card's (they
                are checked against the card).
            templates: text templates; default the ones the model was trained with.
        """
        dev = resolve_device(device) if isinstance(device, str) else device
        tensors, card, resolved = ModelRegistry(store).load_ref(
            ref, name or TrainConfig().model_name
        )
        where = f"model {resolved.name}:{resolved.version}"
        if card.get("kind") != CARD_KIND:
            raise IncompatibleModelError(
                f"{where} is not an alignment module (card kind "
                f"{card.get('kind')!r}, expected {CARD_KIND!r})"
            )
        mcfg = AlignmentConfig.from_dict(card["module"])
        if encoder is None or text_model is None:
            from fmbseg.models.registry import build_model

            enc, txt, opts = card["encoder"], card["text"], store.storage_options
            encoder = encoder or build_model(
                enc["name"],
                enc["weights"],
                dev,
                kind="dino",
                store_options=opts,
                img_size=enc["input_size"],
            )
            text_model = text_model or build_model(
                txt["name"],
                txt["weights"],
                dev,
                kind="clip",
                store_options=opts,
                quick_gelu=txt.get("quick_gelu"),
            )
        check_compatible(card, mcfg, encoder, text_model, where)
        module = AlignmentModule(mcfg)
        try:
            module.load_state_dict(tensors)
        except RuntimeError as exc:
            raise IncompatibleModelError(
                f"{where}: weights do not fit the module its card describes ({mcfg}): {exc}"
            ) from exc
        return cls(module, encoder, text_model, card, dev, resolved, templates)

    # ---- embeddings ------------------------------------------------------------------------

    def text_embeddings(self, classes: list[str]) -> torch.Tensor:
        """``(K, D) float32`` L2-normalised text embeddings of ``classes`` (cached per list)."""
        names = tuple(vocabulary_names(classes))
        if names not in self._text_cache:
            with torch.no_grad():
                t = self.text_model.encode_text(list(names), self.templates).float()
            self._text_cache[names] = F.normalize(t.to(self.device), dim=-1)
        return self._text_cache[names]

    @torch.no_grad()
    def similarities(self, image: np.ndarray, classes: list[str]) -> torch.Tensor:
        """``(K, H, W) float32`` cosine similarities, bilinearly upsampled to the image size.

        The image is resized (bilinear) so its short side is ``input_size``; square
        ``input_size`` windows with stride ``input_size // 2`` (the evaluation's 448/224) are
        scored by :class:`~fmbseg.tasks.predictors.AlignmentPredictor` and averaged where
        they overlap (mmseg's slide inference), then upsampled to ``H x W``.
        """
        from fmbseg.tasks.evaluate import normalise_image, sliding_window_scores
        from fmbseg.tasks.predictors import AlignmentPredictor

        text = self.text_embeddings(classes)
        predictor = AlignmentPredictor.from_segmenter(self)
        h, w = image.shape[:2]
        x = normalise_image(image, resized_short_side(h, w, self.input_size), predictor)
        window = self.input_size
        stride = max(self.encoder.preprocess.patch_size, window // 2)
        sims = sliding_window_scores(x, predictor, text, window, stride, WINDOW_BATCH)
        return F.interpolate(sims[None], size=(h, w), mode="bilinear", align_corners=False)[0]

    def segment(self, image: np.ndarray, classes: list[str]) -> np.ndarray:
        """``HxW`` label map of indices into ``classes``: uint8 for up to 255 classes, else
        int32. Argmax over the upsampled similarities."""
        labels = self.similarities(image, classes).argmax(0).cpu().numpy()
        return labels.astype(np.uint8 if len(classes) <= 255 else np.int32)


def check_compatible(
    card: dict[str, Any],
    mcfg: AlignmentConfig,
    encoder: PatchEncoder,
    text_model: DenseClip,
    where: str,
) -> None:
    """Raise :class:`IncompatibleModelError` naming what does not match the card, and why."""
    enc = card["encoder"]
    if encoder.name != enc["name"]:
        raise IncompatibleModelError(
            f"{where} was trained on features of encoder {enc['name']!r}, not {encoder.name!r}: "
            "another encoder's patch features live in a different space"
        )
    if encoder.embed_dim != mcfg.in_dim:
        raise IncompatibleModelError(
            f"{where} expects {mcfg.in_dim}-d patch features; encoder {encoder.name!r} gives "
            f"{encoder.embed_dim}-d"
        )
    pre = encoder.preprocess
    want = enc.get("preprocess", {})
    if want and (
        pre.patch_size != want["patch_size"]
        or tuple(pre.mean) != tuple(want["mean"])
        or tuple(pre.std) != tuple(want["std"])
    ):
        raise IncompatibleModelError(
            f"{where} was trained with preprocessing {want}; encoder {encoder.name!r} uses "
            f"patch {pre.patch_size}, mean {pre.mean}, std {pre.std}"
        )
    if int(enc["input_size"]) % pre.patch_size:
        raise IncompatibleModelError(
            f"{where}: input size {enc['input_size']} is not a "
            f"multiple of the encoder's patch size {pre.patch_size}"
        )
    text_name = getattr(text_model, "name", None)
    if text_name is not None and text_name != card["text"]["name"]:
        raise IncompatibleModelError(
            f"{where} was aligned to text model {card['text']['name']!r}, not {text_name!r}: "
            "its outputs are only comparable with that model's text embeddings"
        )
    if text_model.embed_dim != mcfg.out_dim:
        raise IncompatibleModelError(
            f"{where} maps into a {mcfg.out_dim}-d text space; the text model gives "
            f"{text_model.embed_dim}-d embeddings"
        )


# ---- outputs -----------------------------------------------------------------------------------


def palette(n: int) -> np.ndarray:
    """``(n, 3) uint8`` distinct colours (PASCAL VOC's bit-interleaved colour map)."""
    out = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i + 1, 0, 0, 0  # +1: class 0 is not black
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        out[i] = (r, g, b)
    return out


def write_outputs(
    image: np.ndarray,
    label_map: np.ndarray,
    classes: list[str],
    out_path: str,
    alpha: float = 0.5,
    storage_options: dict[str, Any] | None = None,
) -> tuple[str, str]:
    """Write ``{stem}.png`` (palette label map) and ``{stem}_overlay.png`` (image + colours + legend).

    ``out_path``: local path or fsspec URI, with or without ``.png``. ``label_map``: ``HxW``
    indices into ``classes`` (at most 255 classes: a palette PNG holds 256 colours; index 255
    is drawn black, as ignore). Returns the two paths written.
    """
    from PIL import Image, ImageDraw

    if label_map.shape != image.shape[:2]:
        raise ValueError(
            f"write_outputs: label map {label_map.shape} does not match image {image.shape[:2]}"
        )
    if len(classes) > 255:
        raise ValueError(
            f"write_outputs: a palette PNG holds at most 255 classes, got {len(classes)}"
        )
    if label_map.size and int(label_map.max()) >= len(classes) and int(label_map.max()) != 255:
        raise ValueError(
            f"write_outputs: label {int(label_map.max())} has no class name "
            f"({len(classes)} classes)"
        )
    stem = out_path[:-4] if out_path.endswith(".png") else out_path
    colours = np.zeros((256, 3), dtype=np.uint8)
    colours[: len(classes)] = palette(len(classes))
    indexed = Image.fromarray(label_map.astype(np.uint8), mode="P")
    indexed.putpalette(colours.ravel().tolist())

    blend = image.astype(np.float32) * (1 - alpha) + colours[label_map.astype(np.uint8)] * alpha
    overlay = Image.fromarray(blend.clip(0, 255).astype(np.uint8))
    present = [int(v) for v in np.unique(label_map) if int(v) < len(classes)]
    if present:
        row = 12
        legend = Image.new("RGB", (overlay.width, row * len(present) + 4), (255, 255, 255))
        draw = ImageDraw.Draw(legend)
        for j, k in enumerate(present):
            y = 2 + j * row
            draw.rectangle((2, y, 12, y + 9), fill=tuple(int(c) for c in colours[k]))
            draw.text((16, y - 1), classes[k], fill=(0, 0, 0))
        canvas = Image.new("RGB", (overlay.width, overlay.height + legend.height))
        canvas.paste(overlay, (0, 0))
        canvas.paste(legend, (0, overlay.height))
        overlay = canvas

    paths = (f"{stem}.png", f"{stem}_overlay.png")
    for pil, path in zip((indexed, overlay), paths, strict=True):
        if "://" not in path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        with fsspec.open(path, "wb", **(storage_options or {})) as f:
            pil.save(f, format="PNG")
    return paths
