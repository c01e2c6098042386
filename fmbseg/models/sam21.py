"""SAM 2.1 (the official ``sam2`` package) behind the :class:`~fmbseg.models.base.Segmenter`
interface, so ``models.sam: sam2.1_hiera_l`` runs both SAM stages unchanged.

``sam2`` is an optional extra (``pip install --no-build-isolation '.[sam2]'`` with
``SAM2_BUILD_CUDA=0``; see the README's Install section): this module registers its names
without importing it, and a builder says how to install it when it is missing.

Models are built by ``sam2.build_sam.build_sam2`` from the package's own hydra configs
without a checkpoint; a checkpoint (its ``"model"`` entry) is then loaded with the same
rules as SAM's. ``sam2.1_tiny`` is the Hiera-T config shrunk by hydra overrides
(:data:`TINY_OVERRIDES`): a random model of the real classes, fast enough for CPU tests.

Prompt masks come from ``SAM2ImagePredictor``, automatic masks from
``SAM2AutomaticMaskGenerator`` with the ``sam_auto`` thresholds. Coordinates as in
:mod:`fmbseg.models.sam`: SAM 2's prompt encoder adds 0.5 itself, so 0.5 is subtracted.
"""

from __future__ import annotations

import contextlib
import importlib.util
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from fmbseg.config import SamAutoConfig
from fmbseg.models.base import Precision
from fmbseg.models.registry import MissingExtraError, register_builders
from fmbseg.models.sam import PromptedSegmenter, points_per_batch, sharpen_mask_heads
from fmbseg.models.weights import build_seeded

INSTALL_HINT = (
    "SAM 2.1 models need the sam2 package: install it with "
    "SAM2_BUILD_CUDA=0 pip install --no-build-isolation -e '.[sam2]' (after torch; "
    "`make setup` does this)"
)

# registry name -> (hydra config in the sam2 package, official checkpoint file name)
VARIANTS = {
    "sam2.1_hiera_t": ("configs/sam2.1/sam2.1_hiera_t.yaml", "sam2.1_hiera_tiny.pt"),
    "sam2.1_hiera_s": ("configs/sam2.1/sam2.1_hiera_s.yaml", "sam2.1_hiera_small.pt"),
    "sam2.1_hiera_b+": ("configs/sam2.1/sam2.1_hiera_b+.yaml", "sam2.1_hiera_base_plus.pt"),
    "sam2.1_hiera_l": ("configs/sam2.1/sam2.1_hiera_l.yaml", "sam2.1_hiera_large.pt"),
    "sam2.1_tiny": ("configs/sam2.1/sam2.1_hiera_t.yaml", "sam2.1_tiny.pt"),
}

TINY_IMAGE_SIZE = 128
TINY_DIM = 32  # prompt encoder / mask decoder / neck width (SAM 2.1: 256)
# Hiera-T shrunk: 4 stages of 1, 1, 2, 1 blocks (width 8, 16, 32, 64), the one global-
# attention block not the first of its stage (those pool queries, which needs a window).
TINY_OVERRIDES = (
    f"++model.image_size={TINY_IMAGE_SIZE}",
    "++model.image_encoder.trunk.embed_dim=8",
    "++model.image_encoder.trunk.stages=[1,1,2,1]",
    "++model.image_encoder.trunk.global_att_blocks=[3]",
    "++model.image_encoder.trunk.window_spec=[4,4,4,2]",
    "++model.image_encoder.neck.backbone_channel_list=[64,32,16,8]",
    f"++model.image_encoder.neck.d_model={TINY_DIM}",
    f"++model.image_encoder.neck.position_encoding.num_pos_feats={TINY_DIM}",
    # the video memory modules are built (SAM2Base wants them) but never run on images
    f"++model.memory_attention.d_model={TINY_DIM}",
    "++model.memory_attention.num_layers=1",
    f"++model.memory_attention.layer.d_model={TINY_DIM}",
    "++model.memory_attention.layer.dim_feedforward=64",
    f"++model.memory_attention.layer.self_attention.embedding_dim={TINY_DIM}",
    "++model.memory_attention.layer.self_attention.feat_sizes=[8,8]",
    f"++model.memory_attention.layer.cross_attention.embedding_dim={TINY_DIM}",
    "++model.memory_attention.layer.cross_attention.feat_sizes=[8,8]",
    "++model.memory_attention.layer.cross_attention.kv_in_dim=16",
    "++model.memory_encoder.out_dim=16",
    "++model.memory_encoder.position_encoding.num_pos_feats=16",
    f"++model.memory_encoder.in_dim={TINY_DIM}",
    f"++model.memory_encoder.mask_downsampler.embed_dim={TINY_DIM}",
    f"++model.memory_encoder.fuser.layer.dim={TINY_DIM}",
)


def _sam2() -> Any:
    """The ``sam2`` package's builder and classes, or an install hint."""
    if importlib.util.find_spec("sam2") is None:
        raise MissingExtraError(INSTALL_HINT)
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
    from sam2.build_sam import build_sam2
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    return build_sam2, SAM2ImagePredictor, SAM2AutomaticMaskGenerator


def _same_pixels(a: np.ndarray, b: np.ndarray | None) -> bool:
    """``a`` is ``b`` or a full view of it (what the generator's whole-image crop
    ``image[0:h, 0:w, :]`` is): same memory, shape and strides."""
    return (
        b is not None
        and a.shape == b.shape
        and a.strides == b.strides
        and a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
    )


@contextlib.contextmanager
def _no_jit_warning() -> Iterator[None]:
    """Silence torch's deprecation warning for ``SAM2Transforms``' own ``torch.jit.script``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
        yield


def _predictor(model: Any, source: Any | None = None, **kwargs: Any) -> Any:
    """A ``SAM2ImagePredictor`` for ``model`` at its input size (the package assumes 1024 px
    in ``_bb_feat_sizes``) that, given ``source`` (another predictor), takes over its
    embedding in ``set_image`` of the very pixels ``source`` embedded last."""
    _, SAM2ImagePredictor, _ = _sam2()

    class SharedEmbeddingPredictor(SAM2ImagePredictor):  # type: ignore[misc,valid-type]
        embedded: np.ndarray | None = None  # the array last given to set_image

        def set_image(self, image: Any) -> None:
            src = source
            if (
                src is not None
                and src._is_image_set
                and isinstance(image, np.ndarray)
                and _same_pixels(image, src.embedded)
            ):
                self.reset_predictor()
                self._features, self._orig_hw = src._features, list(src._orig_hw)
                self._is_image_set = True
                return
            self.embedded = None
            with warnings.catch_warnings():  # the stages' decoded images are read-only; the
                # transforms only read them (ToTensor, then a resized copy)
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                super().set_image(image)
            self.embedded = image if isinstance(image, np.ndarray) else None

        def reset_predictor(self) -> None:
            super().reset_predictor()
            self.embedded = None

    with _no_jit_warning():
        predictor = SharedEmbeddingPredictor(model, **kwargs)
    side = int(model.image_size)
    predictor._bb_feat_sizes = [(side // 4, side // 4), (side // 8, side // 8), (side // 16,) * 2]
    return predictor


class Sam2Segmenter(PromptedSegmenter):
    """Point-prompted and automatic SAM 2.1 masks for one image at a time.

    Args:
        model: a ``sam2`` ``SAM2Base`` (on its device).
        name: registry name, for messages.
        auto_config: thresholds of :meth:`generate` (``SamAutoConfig()`` if None).
        precision: of the image encoder (Hiera + FPN neck), as :class:`SamSegmenter`'s:
            ``auto`` = bf16 autocast on CUDA, float32 on a CPU; the prompt encoder and
            mask decoder run in float32 on float32 features either way.
    """

    def __init__(
        self,
        model: Any,
        name: str,
        auto_config: SamAutoConfig | None = None,
        precision: Precision = "auto",
    ) -> None:
        _, _, SAM2AutomaticMaskGenerator = _sam2()
        self.model = self._setup(model, model.image_encoder, name, auto_config, precision)
        self.image_size = int(model.image_size)
        self.predictor = _predictor(model)
        cfg = self.auto_config
        # SAM 2 spends min_mask_region_area on filling holes and removing sprinkles in its
        # low-res masks with its CUDA extension (sam2._C, skipped by SAM2_BUILD_CUDA=0;
        # without it this warns and does nothing); our stage's filter still drops masks
        # smaller than it afterwards
        has_extension = importlib.util.find_spec("sam2._C") is not None
        fill = cfg.min_mask_region_area if has_extension else 0
        with _no_jit_warning():
            self._generator = SAM2AutomaticMaskGenerator(
                model,
                points_per_side=cfg.points_per_side,
                points_per_batch=points_per_batch(cfg.points_per_batch, self.device),
                pred_iou_thresh=cfg.pred_iou_thresh,
                stability_score_thresh=cfg.stability_score_thresh,
                box_nms_thresh=cfg.box_nms_thresh,
                min_mask_region_area=fill,
                output_mode="binary_mask",
            )
        # generate() takes set_image's embedding of the same image array (one encoder pass)
        self._generator.predictor = _predictor(
            model, self.predictor, max_hole_area=fill, max_sprinkle_area=fill
        )

    def _embed(self, image: np.ndarray) -> None:
        with torch.inference_mode():
            self.predictor.set_image(image)

    def _decode(
        self, pts: np.ndarray, lab: np.ndarray, multimask: bool, image_hw: tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        p = self.predictor
        with torch.inference_mode():
            coords = p._transforms.transform_coords(
                torch.as_tensor(pts - 0.5, device=self.device),
                normalize=True,
                orig_hw=image_hw,
            )
            masks, scores, _ = p._predict(
                coords,
                torch.as_tensor(lab, dtype=torch.int, device=self.device),
                multimask_output=multimask,
            )
        return masks.cpu().numpy(), scores.float().cpu().numpy()

    def _generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        try:
            with torch.inference_mode():
                return self._generator.generate(image)  # type: ignore[no-any-return]
        finally:
            self.predictor.reset_predictor()


# ---- builders ---------------------------------------------------------------------------------


def build_sam2_model(name: str) -> Any:
    """A random-weight ``SAM2Base`` of registry ``name`` on the CPU (the caller seeds)."""
    build_sam2, _, _ = _sam2()
    config, _ = VARIANTS[name]
    tiny = name == "sam2.1_tiny"
    model = build_sam2(
        config, None, device="cpu", hydra_overrides_extra=list(TINY_OVERRIDES if tiny else ())
    )
    if tiny:
        sharpen_mask_heads(model.sam_mask_decoder)
    return model


def build_sam21(
    name: str,
    weights: str | None,
    device: torch.device,
    *,
    store_options: dict[str, Any] | None = None,
    auto_config: SamAutoConfig | None = None,
    precision: Precision = "auto",
    cache_dir: str | None = None,
    seed: int = 0,
) -> Sam2Segmenter:
    """SAM 2.1 ``name`` with weights from a local path or URI (``None`` = deterministic
    random init): the official checkpoints (``sam2.1_hiera_large.pt``, ...) hold the state
    dict under ``"model"``."""
    _sam2()  # an install hint before anything else
    model = build_seeded(
        lambda: build_sam2_model(name),
        weights,
        "SAM 2.1",
        name,
        seed=seed,
        field="sam_weights",
        example=VARIANTS[name][1],
        cache_dir=cache_dir,
        storage_options=store_options,
    )
    return Sam2Segmenter(model.to(device), name, auto_config, precision)


register_builders(
    "sam",
    build_sam21,
    {
        "sam2.1_hiera_t": "SAM 2.1 Hiera-T (sam2.1_hiera_tiny.pt)",
        "sam2.1_hiera_s": "SAM 2.1 Hiera-S (sam2.1_hiera_small.pt)",
        "sam2.1_hiera_b+": "SAM 2.1 Hiera-B+ (sam2.1_hiera_base_plus.pt)",
        "sam2.1_hiera_l": "SAM 2.1 Hiera-L (sam2.1_hiera_large.pt)",
        "sam2.1_tiny": "random tiny SAM 2.1 (128 px input, Hiera width 8) for tests",
    },
)
