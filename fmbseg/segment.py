"""Open-vocabulary inference with a trained alignment module (METHOD.md stage 2, "Inference").

frozen DINOv2 -> alignment module -> cosine similarity with the text embeddings of *any*
class list -> bilinear upsampling to the image size -> per-pixel argmax; the geometry is
training's (:mod:`fmbseg.tasks.train.crops`) and the evaluation protocol's (see
:meth:`OpenVocabSegmenter.similarities`), so objects keep their aspect ratio.
"""

from __future__ import annotations

import functools
import io
import os
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fmbseg.config import TrainConfig
from fmbseg.data.images import decode_image, to_rgb
from fmbseg.data.sources import read_bytes
from fmbseg.models.align import CARD_KIND, AlignmentConfig, AlignmentModule, IncompatibleModelError
from fmbseg.models.base import DenseClip, PatchEncoder
from fmbseg.storage.models import ModelRef, ModelRegistry
from fmbseg.storage.store import ArtifactStore
from fmbseg.tasks.train.crops import resized_short_side
from fmbseg.tasks.train.data import vocabulary_names
from fmbseg.tasks.train.run import resolve_device

WINDOW_BATCH = 8  # windows per encoder call (bounds memory; does not change the result)


ImageLike = np.ndarray | Image.Image | str | os.PathLike[str]


class OpenVocabSegmenter:
    """A loaded alignment module with its encoder and text model (load once, segment many).

    Build with :meth:`load`. Images (:data:`ImageLike`): a numpy array (``HxWx3`` RGB,
    ``HxW`` gray, ``HxWx4`` RGBA, uint8 or uint16), a PIL image in any mode, or a local path
    / fsspec URI; each is converted to ``HxWx3 uint8 RGB`` exactly as the index stage
    decodes files (:mod:`fmbseg.data.images`: alpha composited on white, gray replicated,
    EXIF orientation applied). Class lists are any non-empty list of distinct names (not
    necessarily the training vocabulary).
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
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.storage_options = dict(storage_options or {})  # for images given as URIs
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
        module = alignment_module(tensors, card, where)
        if encoder is None or text_model is None:
            from fmbseg.models.registry import build_model

            enc, txt = card["encoder"], card["text"]
            build = functools.partial(build_model, device=dev, store_options=store.storage_options)
            encoder = encoder or build(
                enc["name"], enc["weights"], kind="dino", img_size=enc["input_size"]
            )
            text_model = text_model or build(
                txt["name"], txt["weights"], kind="clip", quick_gelu=txt.get("quick_gelu")
            )
        check_compatible(card, module.cfg, encoder, text_model, where)
        return cls(
            module, encoder, text_model, card, dev, resolved, templates, store.storage_options
        )

    def as_rgb(self, image: ImageLike) -> np.ndarray:
        """Any :data:`ImageLike` -> ``HxWx3 uint8 RGB`` (paths and URIs are read and decoded)."""
        if isinstance(image, (str, os.PathLike)):
            uri = os.fspath(image)
            return decode_image(read_bytes(uri, self.storage_options), uri)
        return to_rgb(image)

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
    def similarities(self, image: ImageLike, classes: list[str]) -> torch.Tensor:
        """``(K, H, W) float32`` cosine similarities, bilinearly upsampled to the image size.

        The image is resized (bilinear) so its short side is ``input_size`` (the card's
        ``encoder.input_size``, training's); square ``input_size`` windows with stride
        ``input_size // 2`` (the evaluation's 448/224) are scored by
        :class:`~fmbseg.tasks.evaluate.predictors.AlignmentPredictor` and averaged where they
        overlap (mmseg's slide inference), then upsampled to ``H x W``.
        """
        from fmbseg.tasks.evaluate.predictors import AlignmentPredictor
        from fmbseg.tasks.evaluate.protocol import normalise_image, sliding_window_scores

        image = self.as_rgb(image)
        text = self.text_embeddings(classes)
        predictor = AlignmentPredictor.from_segmenter(self)
        h, w = image.shape[:2]
        x = normalise_image(image, resized_short_side(h, w, self.input_size), predictor)
        window = self.input_size
        stride = max(self.encoder.preprocess.patch_size, window // 2)
        sims = sliding_window_scores(x, predictor, text, window, stride, WINDOW_BATCH)
        return F.interpolate(sims[None], size=(h, w), mode="bilinear", align_corners=False)[0]

    def segment(self, image: ImageLike, classes: list[str]) -> np.ndarray:
        """``HxW`` label map of indices into ``classes``: uint8 for up to 255 classes, else
        int32. Argmax over the upsampled similarities. ``image``: see the class docstring."""
        labels = self.similarities(image, classes).argmax(0).cpu().numpy()
        return labels.astype(np.uint8 if len(classes) <= 255 else np.int32)


def alignment_module(
    tensors: dict[str, torch.Tensor], card: dict[str, Any], where: str
) -> AlignmentModule:
    """The alignment module ``card`` describes, ``tensors`` loaded into it; raises
    :class:`IncompatibleModelError`, its message after ``where``, when the card is not an
    alignment module's or the weights do not fit the module it describes."""
    if card.get("kind") != CARD_KIND:
        raise IncompatibleModelError(
            f"{where}: not an alignment module (card kind {card.get('kind')!r}, expected "
            f"{CARD_KIND!r})"
        )
    try:
        module = AlignmentModule(AlignmentConfig.from_dict(card["module"]))
        module.load_state_dict(tensors)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise IncompatibleModelError(
            f"{where}: its weights do not fit the module its card describes ({first})"
        ) from None
    return module


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
    is drawn black, as ignore). Colours, label PNG and overlay are the export's
    (:mod:`fmbseg.tasks.annotate.gallery`), so class ``k`` looks the same in both. Returns the two
    paths written.
    """
    from PIL import ImageDraw

    from fmbseg.tasks.annotate.gallery import class_colours, label_png, overlay

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
    colours = class_colours(len(classes))
    label = label_map.astype(np.uint8)
    blended = Image.fromarray(overlay(image, label, colours, alpha))
    present = [int(v) for v in np.unique(label_map) if int(v) < len(classes)]
    if present:
        row = 12
        legend = Image.new("RGB", (blended.width, row * len(present) + 4), (255, 255, 255))
        draw = ImageDraw.Draw(legend)
        for j, k in enumerate(present):
            y = 2 + j * row
            draw.rectangle((2, y, 12, y + 9), fill=tuple(int(c) for c in colours[k]))
            draw.text((16, y - 1), classes[k], fill=(0, 0, 0))
        canvas = Image.new("RGB", (blended.width, blended.height + legend.height))
        canvas.paste(blended, (0, 0))
        canvas.paste(legend, (0, blended.height))
        blended = canvas
    overlay_bytes = io.BytesIO()
    blended.save(overlay_bytes, format="PNG")

    paths = (f"{stem}.png", f"{stem}_overlay.png")
    for data, path in zip(
        (label_png(label, colours), overlay_bytes.getvalue()), paths, strict=True
    ):
        if "://" not in path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        with fsspec.open(path, "wb", **(storage_options or {})) as f:
            f.write(data)
    return paths
