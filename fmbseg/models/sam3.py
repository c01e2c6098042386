"""SAM 3 (Meta's ``sam3`` package) behind the :class:`~fmbseg.models.base.ConceptSegmenter`
interface: per image and class name, the instance masks of the concept and its presence.

``sam3`` is an optional extra (``pip install -e '.[sam3]'``; its pins move numpy, tqdm,
typing_extensions, huggingface_hub, pydantic and anyio back a little, see the README): this
module registers its names without importing it, and a builder says how to install it when
it is missing.

The model is composed here from ``sam3``'s own classes with the hyper-parameters of
``sam3.model_builder.build_sam3_image_model`` (:data:`SAM3`), because that builder cannot
run without CUDA (it precomputes a positional-encoding and box-bias cache on ``"cuda"``
for ``torch.compile``; both are filled lazily on the model's device here) and has no
smaller configuration; ``sam3_tiny`` (:data:`TINY`) is the same composition with tiny dims.
The video tracker and the SAM-1-style point head (``enable_inst_interactivity``) are not
built.

Weights: ``"hub"`` = ``facebook/sam3``'s ``sam3.pt`` from the Hugging Face hub (gated: the
account must have accepted the licence), a local path or a store URI (same rules as SAM);
the checkpoint's detector part is loaded. The text tokenizer's BPE vocabulary is
open_clip's copy of OpenAI CLIP's (the ``sam3`` wheel does not ship the file its builder
points at). Scores are ``sam3``'s own (``Sam3Processor``): an instance's probability times
the concept's presence probability.
"""

from __future__ import annotations

import contextlib
import importlib.util
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fmbseg.models.base import ConceptMasks, Precision, autocast, check_image, compute_dtype
from fmbseg.models.registry import MissingExtraError, register_builders
from fmbseg.models.weights import (
    CheckpointMismatchError,
    build_seeded,
    tag_not_found,
)

INSTALL_HINT = (
    "SAM 3 models need the sam3 package: install it with pip install -e '.[sam3]' "
    "(in one resolve with fmbseg, so pip picks versions that suit both)"
)
HF_REPO = "facebook/sam3"
HF_FILE = "sam3.pt"
DETECTOR_PREFIX = "detector."
MASK_THRESHOLD = 0.5  # a pixel is in a mask where the upsampled mask probability exceeds it


@dataclass(frozen=True)
class Sam3Dims:
    """The sizes of a SAM 3 image model (defaults: ``build_sam3_image_model``'s)."""

    image_size: int = 1008  # square input side (the image is resized to it, not padded)
    patch_size: int = 14
    vit_dim: int = 1024
    vit_depth: int = 32
    vit_heads: int = 16
    vit_mlp_ratio: float = 4.625
    vit_window: int = 24  # window attention side in patches, outside the global blocks
    vit_global_blocks: tuple[int, ...] = (7, 15, 23, 31)
    vit_pretrain_size: int = 336  # the absolute position embedding's grid, tiled
    d_model: int = 256  # neck, text projection, grounding encoder / decoder, mask head
    heads: int = 8
    ffn_dim: int = 2048
    encoder_layers: int = 6
    decoder_layers: int = 6
    num_queries: int = 200  # instance queries of the decoder: at most this many masks
    text_width: int = 1024
    text_heads: int = 16
    text_layers: int = 24
    geometry_layers: int = 3


SAM3 = Sam3Dims()
TINY = Sam3Dims(
    image_size=112,
    vit_dim=32,
    vit_depth=2,
    vit_heads=2,
    vit_mlp_ratio=2.0,
    vit_window=4,
    vit_global_blocks=(1,),
    vit_pretrain_size=56,
    d_model=32,  # the mask head's GroupNorm wants a multiple of 8
    heads=2,
    ffn_dim=64,
    encoder_layers=1,
    decoder_layers=1,
    num_queries=8,
    text_width=32,
    text_heads=2,
    text_layers=1,
    geometry_layers=1,
)
VARIANTS = {"sam3": SAM3, "sam3_tiny": TINY}


def require_package(model: str | None = None) -> None:
    """Raise :class:`MissingExtraError` (with the install hint) unless ``sam3`` is installed;
    with ``model``, only when that model is built with it (one of :data:`VARIANTS`). A flow
    with ``models.teacher: sam3`` checks this before any work."""
    if model is not None and model not in VARIANTS:
        return
    if importlib.util.find_spec("sam3") is None:
        raise MissingExtraError(INSTALL_HINT)


def _sam3() -> Any:
    """The ``sam3`` modules the adapter uses, or an install hint."""
    require_package()
    with warnings.catch_warnings():  # at import, neither concerns images:
        # sam3's video modules' autocast decorators without CUDA, and torch.jit.script
        warnings.filterwarnings("ignore", message=".*CUDA is not available.*")
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
        import sam3.model_builder as builder
        from sam3.model.data_misc import FindStage
        from sam3.model.sam3_image_processor import Sam3Processor
    return builder, FindStage, Sam3Processor


def _bpe_path() -> str:
    from open_clip.tokenizer import default_bpe

    return str(default_bpe())


def compose_sam3_image_model(dims: Sam3Dims) -> Any:
    """A random-weight ``sam3`` ``Sam3Image`` of ``dims`` on the CPU, in eval mode (the
    caller seeds): ``build_sam3_image_model``'s composition (segmentation head, no SAM-1
    point head) without its CUDA-only caches."""
    b, _, _ = _sam3()
    d, heads = dims.d_model, dims.heads

    def attention(batch_first: bool = False, dropout: float = 0.1) -> Any:
        return b.MultiheadAttention(
            num_heads=heads, dropout=dropout, embed_dim=d, batch_first=batch_first
        )

    def position_encoding() -> Any:
        return b.PositionEmbeddingSine(num_pos_feats=d, normalize=True, temperature=10000)

    def encoder_layer(batch_first: bool) -> Any:
        """The fusion encoder's layer (batch first, positions at the self-attention) or the
        geometry encoder's (sequence first, positions at the cross-attention keys)."""
        return b.TransformerEncoderLayer(
            activation="relu",
            d_model=d,
            dim_feedforward=dims.ffn_dim,
            dropout=0.1,
            pos_enc_at_attn=batch_first,
            pos_enc_at_cross_attn_keys=not batch_first,
            pos_enc_at_cross_attn_queries=False,
            pre_norm=True,
            self_attention=attention(batch_first),
            cross_attention=attention(batch_first),
        )

    vit = b.ViT(
        img_size=dims.image_size,
        pretrain_img_size=dims.vit_pretrain_size,
        patch_size=dims.patch_size,
        embed_dim=dims.vit_dim,
        depth=dims.vit_depth,
        num_heads=dims.vit_heads,
        mlp_ratio=dims.vit_mlp_ratio,
        norm_layer="LayerNorm",
        drop_path_rate=0.1,
        qkv_bias=True,
        use_abs_pos=True,
        tile_abs_pos=True,
        global_att_blocks=dims.vit_global_blocks,
        rel_pos_blocks=(),
        use_rope=True,
        use_interp_rope=True,
        window_size=dims.vit_window,
        pretrain_use_cls_token=True,
        retain_cls_token=False,
        ln_pre=True,
        ln_post=False,
        return_interm_layers=False,
        bias_patch_embed=False,
    )
    neck = b.Sam3DualViTDetNeck(
        position_encoding=position_encoding(),
        d_model=d,
        scale_factors=[4.0, 2.0, 1.0, 0.5],
        trunk=vit,
        add_sam2_neck=False,
    )
    text = b.VETextEncoder(
        tokenizer=b.SimpleTokenizer(bpe_path=_bpe_path()),
        d_model=d,
        width=dims.text_width,
        heads=dims.text_heads,
        layers=dims.text_layers,
    )
    backbone = b.SAM3VLBackbone(visual=neck, text=text, scalp=1)
    encoder = b.TransformerEncoderFusion(
        layer=encoder_layer(batch_first=True),
        num_layers=dims.encoder_layers,
        d_model=d,
        num_feature_levels=1,
        frozen=False,
        use_act_checkpoint=True,
        add_pooled_text_to_img_feat=False,
        pool_text_with_mask=True,
    )
    decoder = b.TransformerDecoder(
        layer=b.TransformerDecoderLayer(
            activation="relu",
            d_model=d,
            dim_feedforward=dims.ffn_dim,
            dropout=0.1,
            cross_attention=attention(),
            n_heads=heads,
            use_text_cross_attention=True,
        ),
        num_layers=dims.decoder_layers,
        num_queries=dims.num_queries,
        return_intermediate=True,
        box_refine=True,
        num_o2m_queries=0,
        dac=True,
        boxRPB="log",
        d_model=d,
        frozen=False,
        interaction_layer=None,
        dac_use_selfatt_ln=True,
        resolution=None,  # sam3: image_size and stride, to fill its cache on "cuda"
        stride=None,
        use_act_checkpoint=True,
        presence_token=True,
    )
    scoring = b.DotProductScoring(
        d_model=d,
        d_proj=d,
        prompt_mlp=b.MLP(
            input_dim=d,
            hidden_dim=dims.ffn_dim,
            output_dim=d,
            num_layers=2,
            dropout=0.1,
            residual=True,
            out_norm=torch.nn.LayerNorm(d),
        ),
    )
    segmentation_head = b.UniversalSegmentationHead(
        hidden_dim=d,
        upsampling_stages=3,
        aux_masks=False,
        presence_head=False,
        dot_product_scorer=None,
        act_ckpt=True,
        cross_attend_prompt=attention(dropout=0),
        pixel_decoder=b.PixelDecoder(
            num_upsampling_stages=3, interpolation_mode="nearest", hidden_dim=d
        ),
    )
    geometry_encoder = b.SequenceGeometryEncoder(
        pos_enc=position_encoding(),
        encode_boxes_as_points=False,
        points_direct_project=True,
        points_pool=True,
        points_pos_enc=True,
        boxes_direct_project=True,
        boxes_pool=True,
        boxes_pos_enc=True,
        d_model=d,
        num_layers=dims.geometry_layers,
        layer=encoder_layer(batch_first=False),
        use_act_ckpt=True,
        add_cls=True,
        add_post_encode_proj=True,
    )
    model = b.Sam3Image(
        backbone=backbone,
        transformer=b.TransformerWrapper(encoder=encoder, decoder=decoder, d_model=d),
        input_geometry_encoder=geometry_encoder,
        segmentation_head=segmentation_head,
        num_feature_levels=1,
        o2m_mask_predict=True,
        dot_prod_scoring=scoring,
        use_instance_query=False,
        multimask_output=True,
        inst_interactive_predictor=None,
        matcher=None,
    )
    # the text transformer leaves these two as torch.empty (uninitialised memory, so not
    # reproducible); a checkpoint overwrites them
    with torch.no_grad():
        text_model = text.encoder
        torch.nn.init.normal_(text_model.positional_embedding, std=0.01)
        torch.nn.init.normal_(text_model.text_projection, std=text_model.width**-0.5)
    return model.eval()


@contextlib.contextmanager
def text_only_on_cpu(model: Any) -> Iterator[None]:
    """Let ``sam3`` 0.1.4 ground text prompts on a machine without CUDA.

    Its geometry encoder pins a host tensor (``pin_memory``, which needs CUDA) in the box
    ROI pooling even when there are no boxes. Text prompts give it none, and with no boxes
    the pooling adds an empty tensor: leaving it out changes no number. On a CPU model it
    is left out for the duration; on CUDA nothing changes.
    """
    encoder = model.geometry_encoder
    pool = encoder.boxes_pool_project
    if model.device.type == "cuda" or pool is None:
        yield
        return
    encoder.boxes_pool_project = None
    try:
        yield
    finally:
        encoder.boxes_pool_project = pool


class Sam3ConceptSegmenter:
    """Text-prompted instance masks from SAM 3 for one image at a time.

    Args:
        model: a ``sam3`` ``Sam3Image`` (on its device).
        name: registry name, for messages.
        image_size: the model's square input side (:attr:`Sam3Dims.image_size`).
        precision: ``auto`` = bf16 autocast on CUDA (as ``sam3``'s own examples run),
            float32 on a CPU; ``fp32`` / ``bf16`` / ``fp16`` as :func:`compute_dtype`.
        prompts_per_batch: class names whose grounding runs in one batch; a batch holds
            ``names x num_queries`` low-resolution mask logits (``200 x 288 x 288`` float
            per name for the real model, 66 MB).
    """

    def __init__(
        self,
        model: Any,
        name: str,
        image_size: int,
        precision: Precision = "auto",
        prompts_per_batch: int = 8,
    ) -> None:
        _, self._FindStage, Sam3Processor = _sam3()
        if isinstance(prompts_per_batch, bool) or prompts_per_batch < 1:
            raise ValueError(
                f"{name}: prompts_per_batch must be a positive integer, got {prompts_per_batch!r}"
            )
        self.model = model.eval().requires_grad_(False)
        self.name = name
        self.device = model.device
        self.dtype = compute_dtype(precision, self.device, name)
        self.prompts_per_batch = prompts_per_batch
        self.image_size = image_size
        self.processor = Sam3Processor(
            model, resolution=self.image_size, device=str(self.device), confidence_threshold=0.0
        )
        self._state: dict[str, Any] | None = None
        self._image_hw: tuple[int, int] | None = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.name!r}, device={self.device}, "
            f"input={self.image_size}, dtype={self.dtype})"
        )

    def set_image(self, image: np.ndarray) -> None:
        """Embed ``HxWx3 uint8 RGB`` (resized to the model's square input, as ``sam3``
        does); :meth:`segment_concepts` then refers to this image."""
        check_image(image, f"{self.name}.set_image")
        self._state, self._image_hw = None, None
        # (3, H, W): sam3's processor reads a numpy array's size from its last two axes
        pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        with torch.inference_mode(), autocast(self.device, self.dtype):
            self._state = self.processor.set_image(pixels)
        self._image_hw = (int(image.shape[0]), int(image.shape[1]))

    def segment_concepts(
        self, names: Sequence[str], *, min_score: float = 0.0, max_masks: int | None = None
    ) -> list[ConceptMasks]:
        """One :class:`ConceptMasks` per name, as the protocol says (``fmbseg.models.base``).
        Instances are dropped before their masks are upsampled: the decoder proposes
        ``num_queries`` per name, mostly near 0."""
        if self._state is None or self._image_hw is None:
            raise RuntimeError(f"{self.name}.segment_concepts: call set_image(image) first")
        names = list(names)
        bad = [n for n in names if not isinstance(n, str) or not n.strip()]
        if bad:
            raise ValueError(f"{self.name}.segment_concepts: empty or non-string names {bad!r}")
        out: list[ConceptMasks] = []
        for start in range(0, len(names), self.prompts_per_batch):
            chunk = names[start : start + self.prompts_per_batch]
            out.extend(self._ground(chunk, min_score, max_masks))
        return out

    def _ground(
        self, names: list[str], min_score: float, max_masks: int | None
    ) -> list[ConceptMasks]:
        """One batch of names against the set image's embedding (``Sam3Processor.
        set_text_prompt`` for several prompts at once)."""
        assert self._state is not None and self._image_hw is not None
        model, k, dev = self.model, len(names), self.device
        with torch.inference_mode(), autocast(self.device, self.dtype):
            backbone_out = {
                **self._state["backbone_out"],
                **model.backbone.forward_text(names, device=dev),
            }
            find = self._FindStage(
                img_ids=torch.zeros(k, device=dev, dtype=torch.long),
                text_ids=torch.arange(k, device=dev, dtype=torch.long),
                input_boxes=None,
                input_boxes_mask=None,
                input_boxes_label=None,
                input_points=None,
                input_points_mask=None,
            )
            with text_only_on_cpu(model):
                outputs = model.forward_grounding(
                    backbone_out=backbone_out,
                    find_input=find,
                    geometric_prompt=model._get_dummy_prompt(num_prompts=k),
                    find_target=None,
                )
        presence = outputs["presence_logit_dec"].float().sigmoid().reshape(k)
        scores = outputs["pred_logits"].float().sigmoid().squeeze(-1) * presence[:, None]
        return [
            self._instances(
                float(presence[i]), scores[i], outputs["pred_masks"][i], min_score, max_masks
            )
            for i in range(k)
        ]

    def _instances(
        self,
        presence: float,
        scores: torch.Tensor,
        mask_logits: torch.Tensor,
        min_score: float,
        max_masks: int | None,
    ) -> ConceptMasks:
        """Kept instances of one name: scores ``(Q,)``, low-res mask logits ``(Q, h, w)``."""
        assert self._image_hw is not None
        order = torch.argsort(scores, descending=True, stable=True)
        order = order[scores[order] >= min_score]
        if max_masks is not None:
            order = order[:max_masks]
        h, w = self._image_hw
        if not len(order):
            return ConceptMasks(presence, np.zeros((0, h, w), bool), np.zeros(0, np.float32))
        with torch.inference_mode():
            probs = torch.nn.functional.interpolate(
                mask_logits[order][:, None].float(), (h, w), mode="bilinear", align_corners=False
            ).sigmoid()
        masks = (probs[:, 0] > MASK_THRESHOLD).cpu().numpy()
        return ConceptMasks(presence, masks, scores[order].cpu().numpy().astype(np.float32))


# ---- builders ---------------------------------------------------------------------------------


def _hub_checkpoint(name: str) -> str:
    """``facebook/sam3``'s ``sam3.pt`` through the Hugging Face cache (as ``sam3`` gets it)."""
    from huggingface_hub import hf_hub_download

    try:
        return str(hf_hub_download(repo_id=HF_REPO, filename=HF_FILE))
    except Exception as exc:  # noqa: BLE001 - offline / gated / missing: all "not found"
        looked = f"Hugging Face hub {HF_REPO}/{HF_FILE} (gated: accept its licence first)"
        raise tag_not_found(name, "hub", "sam3_weights", HF_FILE, looked, exc) from exc


def detector_state(state: dict[str, torch.Tensor], model: Any, path: Path) -> dict[str, Any]:
    """The detector part of a ``sam3.pt`` state (its ``detector.*`` tensors; the
    ``tracker.*`` ones serve video), to load strictly into ``model``: a buffer the file lacks
    keeps the value ``model`` computed at init (ViT RoPE frequencies, functions of the config
    alone)."""
    detector = {
        k[len(DETECTOR_PREFIX) :]: v for k, v in state.items() if k.startswith(DETECTOR_PREFIX)
    }
    if not detector:
        raise CheckpointMismatchError(
            f"SAM 3 checkpoint {path} holds no '{DETECTOR_PREFIX}*' tensors (first keys: "
            f"{', '.join(sorted(state)[:5])}); expected facebook/sam3's sam3.pt"
        )
    parameters = dict(model.named_parameters())
    for key, buf in model.state_dict().items():
        if key not in detector and key not in parameters:
            detector[key] = buf
    return detector


def build_sam3(
    name: str,
    weights: str | None,
    device: torch.device,
    *,
    store_options: dict[str, Any] | None = None,
    precision: Precision = "auto",
    prompts_per_batch: int = 8,
    cache_dir: str | None = None,
    seed: int = 0,
) -> Sam3ConceptSegmenter:
    """SAM 3 ``name`` (:data:`VARIANTS`) with weights ``"hub"`` (``facebook/sam3``'s
    ``sam3.pt``), a local path or a store URI; ``None`` = deterministic random init."""
    _sam3()  # an install hint before anything else
    dims = VARIANTS[name]
    model = build_seeded(
        lambda: compose_sam3_image_model(dims),
        _hub_checkpoint(name) if weights == "hub" else weights,  # before an 850M-param init
        "SAM 3",
        name,
        seed=seed,
        adapt=detector_state,
        field="sam3_weights",
        example=HF_FILE,
        cache_dir=cache_dir,
        storage_options=store_options,
        extra_fix=f"or 'hub' for {HF_REPO}'s {HF_FILE} from the Hugging Face hub",
    )
    return Sam3ConceptSegmenter(
        model.to(device), name, dims.image_size, precision, prompts_per_batch
    )


register_builders(
    "sam3",
    build_sam3,
    {
        "sam3": "SAM 3 image model, text concept prompts (facebook/sam3 sam3.pt)",
        "sam3_tiny": "random tiny SAM 3 (112 px input, ViT width 32, 2 blocks) for tests",
    },
)
