"""Models by name: one builder signature for CLIP, SAM, DINOv2 and SAM 3, real and tiny.

Builders register themselves with :func:`register_model` (as timm's ``@register_model``
does); :func:`build_model` looks a name up and calls its builder as
``builder(weights, device, store_options=..., **kwargs)``. The built-in names live in
``fmbseg.models.clip`` / ``sam`` / ``sam21`` / ``dino`` / ``sam3`` and are imported on first
use, so importing this module stays cheap::

    clip = build_model("clip_vit_l14_336", "openai", "cuda", mode="sclip")
    sam = build_model("sam_tiny", None, auto_config=SamAutoConfig(points_per_side=4))
    dino = build_from_config(cfg.models, "dino", "cuda", img_size=cfg.train.input_size)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch

from fmbseg.models.base import ConceptSegmenter, DenseClip, PatchEncoder, Segmenter

if TYPE_CHECKING:
    from fmbseg.config import ModelsConfig

ModelKind = Literal["clip", "sam", "dino", "sam3"]
KINDS: tuple[ModelKind, ...] = get_args(ModelKind)
PROTOCOLS: dict[str, type] = {
    "clip": DenseClip,
    "sam": Segmenter,
    "dino": PatchEncoder,
    "sam3": ConceptSegmenter,
}
_BUILTIN_MODULES = (
    "fmbseg.models.clip",
    "fmbseg.models.sam",
    "fmbseg.models.sam21",
    "fmbseg.models.dino",
    "fmbseg.models.sam3",
)

Builder = Callable[..., Any]


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: its name, kind, builder and a one-line description."""

    name: str
    kind: ModelKind
    builder: Builder
    description: str


_REGISTRY: dict[str, ModelSpec] = {}


class MissingExtraError(ModuleNotFoundError):
    """A registered model whose optional package is not installed; the message says how to
    install it (an input error for the CLI: exit 2, one line)."""


class UnknownModelError(KeyError):
    """A model name that is not registered; the message lists the known names."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def register_model(
    name: str, kind: ModelKind, builder: Builder | None = None, description: str = ""
) -> Any:
    """Register ``builder`` under ``name``; usable as a decorator when ``builder`` is omitted.

    The builder is called as ``builder(weights, device, *, store_options, **kwargs)`` and
    returns an object implementing the protocol of ``kind`` (``fmbseg.models.base``).
    """
    if kind not in KINDS:
        raise ValueError(f"register_model({name!r}): kind {kind!r} is not one of {list(KINDS)}")

    def _register(fn: Builder) -> Builder:
        old = _REGISTRY.get(name)
        same_origin = old is not None and (
            (old.builder.__module__, old.builder.__qualname__) == (fn.__module__, fn.__qualname__)
        )
        if old is not None and not same_origin:  # a reload may re-register the same builder
            raise ValueError(
                f"model name {name!r} is already registered by "
                f"{old.builder.__module__}.{old.builder.__qualname__}"
            )
        _REGISTRY[name] = ModelSpec(name, kind, fn, description or (fn.__doc__ or "").strip())
        return fn

    return _register(builder) if builder is not None else _register


def register_builders(
    kind: ModelKind, build: Callable[..., Any], descriptions: Mapping[str, str]
) -> None:
    """Register ``build(name, weights, device, **kwargs)`` under each name of ``descriptions``
    (name -> one-line description) as a ``kind`` builder."""
    for name, description in descriptions.items():
        register_model(name, kind, _bound(build, name), description)


def _bound(build: Callable[..., Any], name: str) -> Builder:
    def builder(weights: str | None, device: torch.device, **kwargs: Any) -> Any:
        return build(name, weights, device, **kwargs)

    builder.__module__ = build.__module__  # a re-import re-registers the same builder
    builder.__qualname__ = f"build_{name.replace('.', '_').replace('+', 'p')}"
    return builder


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def list_models(kind: ModelKind | None = None) -> list[str]:
    """Registered names (sorted), optionally of one kind."""
    _load_builtins()
    if kind is not None and kind not in KINDS:
        raise ValueError(f"list_models: kind {kind!r} is not one of {list(KINDS)}")
    return sorted(n for n, s in _REGISTRY.items() if kind is None or s.kind == kind)


def get_model_spec(name: str, kind: ModelKind | None = None) -> ModelSpec:
    """The spec registered under ``name``; an unknown name lists the known ones of its kind."""
    _load_builtins()
    spec = _REGISTRY.get(name)
    if spec is not None and (kind is None or spec.kind == kind):
        return spec
    if spec is not None:
        raise ValueError(
            f"model {name!r} is a {spec.kind} model, but a {kind} model was asked for; "
            f"known {kind} models: {', '.join(list_models(kind))}"
        )
    prefixes = sorted((k for k in KINDS if name.startswith(k)), key=len, reverse=True)
    guess = kind or next(iter(prefixes), None)  # sam3_x is a sam3 name, not a sam one
    if guess is not None:
        known = f"known {guess} models: {', '.join(list_models(guess))}"
    else:
        known = "known models: " + "; ".join(f"{k}: {', '.join(list_models(k))}" for k in KINDS)
    raise UnknownModelError(f"unknown model name {name!r}; {known}")


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else as ``torch.device``."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def build_model(
    name: str,
    weights: str | None,
    device: str | torch.device = "cpu",
    *,
    kind: ModelKind | None = None,
    store_options: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Any:
    """Build the registered model ``name``.

    Args:
        name: a registry name (:func:`list_models`).
        weights: ``None`` = deterministic random init (tiny configs); else a pretrained tag,
            a local path or an fsspec URI, as the model's builder documents.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"auto"``.
        kind: if given, ``name`` must be of this kind (catches a SAM name in the CLIP slot).
        store_options: fsspec options used to download URI weights.
        **kwargs: builder options (CLIP: ``mode``, ``precision``; SAM: ``auto_config``;
            DINOv2: ``img_size``, ``precision``; SAM 3: ``precision``,
            ``prompts_per_batch``; all: ``cache_dir``, ``seed``).

    Returns:
        A :class:`DenseClip`, :class:`Segmenter`, :class:`PatchEncoder` or
        :class:`ConceptSegmenter`.
    """
    spec = get_model_spec(name, kind)
    model = spec.builder(
        weights, resolve_device(device), store_options=dict(store_options or {}), **kwargs
    )
    protocol = PROTOCOLS[spec.kind]
    if not isinstance(model, protocol):
        raise TypeError(
            f"builder of {name!r} returned {type(model).__name__}, which does not implement "
            f"{protocol.__name__}"
        )
    return model


def build_from_config(
    models: ModelsConfig,
    kind: ModelKind,
    device: str | torch.device = "cpu",
    *,
    store_options: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Any:
    """Build the ``kind`` model a :class:`~fmbseg.config.ModelsConfig` names, with its weights.

    ``build_from_config(cfg.models, "clip", dev, mode=...)`` is
    ``build_model(cfg.models.clip, cfg.models.clip_weights, dev, kind="clip", ...)`` plus
    the model-specific keys of the section (``clip_quick_gelu``, ``sam_precision``).
    """
    if kind not in KINDS:
        raise ValueError(f"build_from_config: kind {kind!r} is not one of {list(KINDS)}")
    if kind == "clip":
        kwargs.setdefault("quick_gelu", models.clip_quick_gelu)
    elif kind == "sam":
        kwargs.setdefault("precision", models.sam_precision)
    return build_model(
        getattr(models, kind),
        getattr(models, f"{kind}_weights"),
        device,
        kind=kind,
        store_options=store_options,
        **kwargs,
    )
