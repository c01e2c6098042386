"""SAM (segment-anything) behind the :class:`~fmbseg.models.base.Segmenter` interface.

Real models come from segment-anything's own ``sam_model_registry`` builders, built without
a checkpoint; the checkpoint is then loaded here with ``torch.load(weights_only=True)`` (the
library's loader uses a plain ``torch.load``). ``sam_tiny`` is a ``Sam`` of the same classes
with tiny dims (128 px input, width 32), fast enough for CPU tests of ``SamPredictor`` and
``SamAutomaticMaskGenerator``.

Coordinates: our points are continuous pixels with the origin at the top-left pixel's
*corner* (``fmbseg.models.base``); SAM treats a point as a pixel *index* (its prompt encoder
adds 0.5 to reach the pixel centre). :meth:`SamSegmenter.predict` subtracts 0.5, so the
point ``(x + 0.5, y + 0.5)`` asks about the centre of pixel column ``x``, row ``y``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import torch
from segment_anything import SamPredictor, sam_model_registry
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

from fmbseg.config import SamAutoConfig
from fmbseg.models.base import Precision, check_image, compute_dtype
from fmbseg.models.registry import register_builders
from fmbseg.models.sam_amg import BinaryMaskGenerator
from fmbseg.models.weights import build_seeded

# registry name -> (segment-anything variant, official checkpoint file name)
VARIANTS = {
    "sam_vit_h": ("vit_h", "sam_vit_h_4b8939.pth"),
    "sam_vit_l": ("vit_l", "sam_vit_l_0b3195.pth"),
    "sam_vit_b": ("vit_b", "sam_vit_b_01ec64.pth"),
    "sam_tiny": ("tiny", "sam_tiny.pth"),
}
GPU_POINTS_PER_BATCH = 256
CPU_POINTS_PER_BATCH = 64  # segment-anything's own default


def points_per_batch(configured: int | None, device: torch.device) -> int:
    """``sam_auto.points_per_batch``, or its default for ``device`` when None."""
    if configured is None:
        return GPU_POINTS_PER_BATCH if device.type == "cuda" else CPU_POINTS_PER_BATCH
    if isinstance(configured, bool) or not isinstance(configured, int) or configured < 1:
        raise ValueError(
            f"sam_auto.points_per_batch must be a positive integer or null (the device's "
            f"default), got {configured!r}"
        )
    return configured


class PromptedSegmenter:
    """What SAM and SAM 2.1 share: checks, the point prompts' contract and the automatic
    masks' area filter. A subclass embeds in :meth:`_embed`, decodes checked prompts in
    :meth:`_decode` and generates in :meth:`_generate`."""

    name: str
    device: torch.device
    image_size: int
    dtype: torch.dtype
    auto_config: SamAutoConfig
    _image_hw: tuple[int, int] | None = None

    def _setup(
        self,
        model: Any,
        encoder: torch.nn.Module,
        name: str,
        auto_config: SamAutoConfig | None,
        precision: Precision,
    ) -> Any:
        """Common attributes; the image ``encoder`` runs under the precision's autocast.
        Returns ``model`` frozen in eval mode."""
        self.dtype = compute_dtype(precision, model.device, name)  # fails fast
        self.name = name
        self.device = model.device
        self.auto_config = auto_config or SamAutoConfig()
        _set_encoder_dtype(encoder, self.dtype)
        return model.eval().requires_grad_(False)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.name!r}, device={self.device}, "
            f"input={self.image_size}, encoder dtype={self.dtype})"
        )

    def set_image(self, image: np.ndarray) -> None:
        """Embed ``HxWx3 uint8 RGB``; :meth:`predict` then refers to this image."""
        check_image(image, f"{self.name}.set_image")
        self._image_hw = None
        self._embed(image)
        self._image_hw = (int(image.shape[0]), int(image.shape[1]))

    def predict(
        self, points: np.ndarray, labels: np.ndarray, multimask: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Points ``(P, 2)`` float ``(x, y)`` in original pixels (corner origin), labels
        ``(P,)`` (1 = positive, 0 = negative) -> masks ``(M, H, W) bool`` at the original
        size and predicted IoU ``(M,) float32``; ``M`` = 3 with ``multimask`` else 1."""
        if self._image_hw is None:
            raise RuntimeError(f"{self.name}.predict: call set_image(image) first")
        pts = np.asarray(points, dtype=np.float32)
        lab = np.asarray(labels)
        if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) == 0:
            raise ValueError(
                f"{self.name}.predict: points must be (P, 2) with P >= 1, got {pts.shape}"
            )
        if lab.shape != (len(pts),):
            raise ValueError(f"{self.name}.predict: labels must be ({len(pts)},), got {lab.shape}")
        masks, scores = self.predict_batch(pts[None], lab[None], multimask)
        return masks[0], scores[0]

    def predict_batch(
        self, points: np.ndarray, labels: np.ndarray, multimask: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """``B`` prompts in one pass of the prompt encoder and mask decoder: points
        ``(B, P, 2)``, labels ``(B, P)`` -> masks ``(B, M, H, W) bool``, IoU ``(B, M) float32``;
        prompt ``b`` as :meth:`predict` of ``points[b]`` (up to float rounding)."""
        if self._image_hw is None:
            raise RuntimeError(f"{self.name}.predict_batch: call set_image(image) first")
        pts = np.asarray(points, dtype=np.float32)
        lab = np.asarray(labels)
        if pts.ndim != 3 or pts.shape[2] != 2 or 0 in pts.shape[:2]:
            raise ValueError(
                f"{self.name}.predict_batch: points must be (B, P, 2) with B, P >= 1, "
                f"got {pts.shape}"
            )
        if lab.shape != pts.shape[:2]:
            raise ValueError(
                f"{self.name}.predict_batch: labels must be {pts.shape[:2]}, got {lab.shape}"
            )
        return self._decode(pts, lab, multimask, self._image_hw)

    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        """Automatic masks of ``HxWx3 uint8 RGB`` in segment-anything's record format
        (``segmentation`` HxW bool, ``area``, ``bbox`` XYWH, ``predicted_iou``,
        ``stability_score``, ``point_coords``, ``crop_box``), filtered by the configured
        IoU / stability / NMS / small-region settings and by ``max_area_fraction``.

        Given the very array last passed to :meth:`set_image` (unchanged since), the image
        is not embedded again (one image-encoder pass serves prompts and automatic masks).
        Afterwards no image is set."""
        check_image(image, f"{self.name}.generate")
        try:
            records = self._generate(image)
        finally:
            self._image_hw = None
        limit = self.auto_config.max_area_fraction * image.shape[0] * image.shape[1]
        return [r for r in records if r["area"] <= limit]

    def _embed(self, image: np.ndarray) -> None:
        raise NotImplementedError

    def _decode(
        self, pts: np.ndarray, lab: np.ndarray, multimask: bool, image_hw: tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Checked prompts ``(B, P, 2)`` / ``(B, P)`` of the set image -> masks, IoU."""
        raise NotImplementedError

    def _generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        """The library generator's records; leaves the predictor reset."""
        raise NotImplementedError


class SamSegmenter(PromptedSegmenter):
    """Point-prompted and automatic SAM masks for one image at a time.

    Args:
        sam: a segment-anything ``Sam`` (on its device).
        name: registry name, for messages.
        auto_config: thresholds for :meth:`generate` (``SamAutoConfig()`` if None).
        precision: of the image encoder: ``"auto"`` = bf16 autocast on CUDA (as SAM 2 runs
            its image encoder), ``"bf16"``/``"fp16"`` autocast on CUDA, always float32 on a
            CPU; ``"fp32"`` = segment-anything's own numbers. The prompt encoder and mask
            decoder run in float32 on float32 embeddings either way.
    """

    def __init__(
        self,
        sam: Sam,
        name: str,
        auto_config: SamAutoConfig | None = None,
        precision: Precision = "auto",
    ) -> None:
        self.sam = self._setup(sam, sam.image_encoder, name, auto_config, precision)
        self.image_size = int(sam.image_encoder.img_size)  # SAM's input long side
        self.predictor = SamPredictor(sam)
        cfg = self.auto_config
        self._generator = BinaryMaskGenerator(
            sam,
            points_per_side=cfg.points_per_side,
            points_per_batch=points_per_batch(cfg.points_per_batch, self.device),
            pred_iou_thresh=cfg.pred_iou_thresh,
            stability_score_thresh=cfg.stability_score_thresh,
            box_nms_thresh=cfg.box_nms_thresh,
            min_mask_region_area=cfg.min_mask_region_area,
            crop_n_layers=cfg.crop_n_layers,
            crop_n_points_downscale_factor=cfg.crop_n_points_downscale_factor,
        )
        # one predictor: generate() reuses set_image's embedding of the same image array
        self._generator.predictor = self.predictor

    def _embed(self, image: np.ndarray) -> None:
        self._generator.embedded = None
        self.predictor.set_image(image, image_format="RGB")
        self._generator.embedded = image

    def _decode(
        self, pts: np.ndarray, lab: np.ndarray, multimask: bool, image_hw: tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        coords = self.predictor.transform.apply_coords(pts - 0.5, image_hw)
        with torch.inference_mode():
            masks, scores, _ = self.predictor.predict_torch(
                torch.as_tensor(coords, dtype=torch.float, device=self.device),
                torch.as_tensor(lab, dtype=torch.int, device=self.device),
                multimask_output=multimask,
            )
        return masks.cpu().numpy(), scores.float().cpu().numpy()

    def _generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        try:
            return self._generator.generate(image)
        finally:  # the generator resets the predictor
            self._generator.embedded = None


def _set_encoder_dtype(encoder: torch.nn.Module, dtype: torch.dtype) -> None:
    """Run ``encoder`` (SAM's ViT or SAM 2's Hiera + neck, nearly all of SAM's compute)
    under ``dtype`` autocast and hand on float32 outputs (a tensor, or SAM 2's dict of
    tensors and lists of tensors), so the prompt encoder and mask decoder stay float32;
    every caller (the predictor, the mask generator's crops) goes through it. Weights and
    the state dict are unchanged; float32 restores the plain forward (a model shared by two
    segmenters follows the last one built)."""
    plain = vars(encoder).get("_plain_forward", encoder.forward)
    if dtype == torch.float32:
        vars(encoder).pop("forward", None)
        return

    def forward(x: torch.Tensor) -> Any:
        with torch.autocast(x.device.type, dtype=dtype):
            return _to_float32(plain(x))

    encoder._plain_forward = plain  # type: ignore[assignment]
    encoder.forward = forward  # type: ignore[method-assign]


def _to_float32(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.float()
    if isinstance(x, list | tuple):
        return type(x)(_to_float32(v) for v in x)
    if isinstance(x, dict):
        return {k: _to_float32(v) for k, v in x.items()}
    return x


# ---- builders ---------------------------------------------------------------------------------


TINY_LOGIT_GAIN = 100.0
TINY_IOU_BIAS = 0.5


def sharpen_mask_heads(decoder: torch.nn.Module) -> None:
    """Scale a random mask decoder's last hypernetwork layers by ``TINY_LOGIT_GAIN``, so mask
    logits are large like a trained model's: with default init they stay within SAM's
    stability offset (1.0), every stability score would be 0 and that filter untestable."""
    with torch.no_grad():
        for mlp in decoder.output_hypernetworks_mlps:  # type: ignore[union-attr]
            mlp.layers[-1].weight.mul_(TINY_LOGIT_GAIN)
            mlp.layers[-1].bias.mul_(TINY_LOGIT_GAIN)


def build_tiny_sam_model(img_size: int = 128) -> Sam:
    """A random ``Sam`` of the real classes with tiny dims (width 32, depth 2, 2 heads),
    mask heads sharpened (:func:`sharpen_mask_heads`) and the IoU head centred on
    ``TINY_IOU_BIAS``, so predicted IoUs spread around a plausible value instead of around 0
    (where SAM's ``pred_iou_thresh > 0`` would drop them all)."""
    prompt_dim, patch = 32, 16
    grid = img_size // patch
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=2,
            embed_dim=32,
            img_size=img_size,
            mlp_ratio=2.0,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=2,
            patch_size=patch,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=(1,),
            window_size=4,
            out_chans=prompt_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(img_size, img_size),
            mask_in_chans=4,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=2, embedding_dim=prompt_dim, mlp_dim=64, num_heads=2
            ),
            transformer_dim=prompt_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=32,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    sharpen_mask_heads(sam.mask_decoder)
    with torch.no_grad():
        sam.mask_decoder.iou_prediction_head.layers[-1].bias.add_(TINY_IOU_BIAS)
    return sam


def build_sam(
    name: str,
    weights: str | None,
    device: torch.device,
    *,
    store_options: dict[str, Any] | None = None,
    auto_config: SamAutoConfig | None = None,
    precision: Precision = "auto",
    cache_dir: str | None = None,
    seed: int = 0,
) -> SamSegmenter:
    """SAM ``name`` (:data:`VARIANTS`) with weights from a local path or URI (``None`` =
    deterministic random init); ``precision`` as :class:`SamSegmenter`'s."""
    variant, example = VARIANTS[name]
    sam = build_seeded(
        build_tiny_sam_model if variant == "tiny" else sam_model_registry[variant],
        weights,
        "SAM",
        name,
        seed=seed,
        field="sam_weights",
        example=example,
        cache_dir=cache_dir,
        storage_options=store_options,
    )
    return SamSegmenter(sam.to(device), name, auto_config, precision)


register_builders(
    "sam",
    build_sam,
    {
        "sam_vit_h": "segment-anything ViT-H (sam_vit_h_4b8939.pth); the paper's SAM",
        "sam_vit_l": "segment-anything ViT-L (sam_vit_l_0b3195.pth)",
        "sam_vit_b": "segment-anything ViT-B (sam_vit_b_01ec64.pth)",
        "sam_tiny": "random tiny SAM (128 px input, width 32) for tests",
    },
)
