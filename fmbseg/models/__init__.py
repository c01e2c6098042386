"""Model adapters behind small interfaces, built from a registry by name.

``build_model(name, weights, device, **options)`` returns a :class:`DenseClip` (CLIP),
:class:`Segmenter` (SAM), :class:`PatchEncoder` (DINOv2) or :class:`ConceptSegmenter`
(SAM 3). The adapter classes are imported lazily (open_clip, timm and segment-anything take
seconds to import).
"""

from __future__ import annotations

import importlib
from typing import Any

from fmbseg.models.base import (
    ConceptMasks,
    ConceptSegmenter,
    DenseClip,
    PatchEncoder,
    Preprocess,
    Segmenter,
)
from fmbseg.models.registry import (
    MissingExtraError,
    ModelSpec,
    UnknownModelError,
    build_from_config,
    build_model,
    get_model_spec,
    list_models,
    register_model,
)
from fmbseg.models.weights import CheckpointMismatchError, WeightsNotFoundError, resolve_weights

_LAZY = {
    "OpenClipDense": "fmbseg.models.clip",
    "UnsupportedModelError": "fmbseg.models.clip_layers",
    "SamSegmenter": "fmbseg.models.sam",
    "Sam2Segmenter": "fmbseg.models.sam21",
    "Sam3ConceptSegmenter": "fmbseg.models.sam3",
    "DinoPatchEncoder": "fmbseg.models.dino",
}

__all__ = [
    "CheckpointMismatchError",
    "ConceptMasks",
    "ConceptSegmenter",
    "DenseClip",
    "DinoPatchEncoder",
    "MissingExtraError",
    "ModelSpec",
    "OpenClipDense",
    "PatchEncoder",
    "Preprocess",
    "Sam2Segmenter",
    "Sam3ConceptSegmenter",
    "SamSegmenter",
    "Segmenter",
    "UnknownModelError",
    "UnsupportedModelError",
    "WeightsNotFoundError",
    "build_from_config",
    "build_model",
    "get_model_spec",
    "list_models",
    "register_model",
    "resolve_weights",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fmbseg.models' has no attribute {name!r}")
