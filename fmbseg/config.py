"""Typed, frozen configuration: one dataclass per stage, loaded from YAML.

A config file is a mapping of section name -> mapping of field -> value (see
``fmbseg/configs/default.yaml``). Files may ``extends: <name|path>`` another file; the
child's keys override the parent's. Unknown sections or keys, wrong types and missing files
raise :class:`ConfigError` naming the key/file and what is allowed. CLI overrides use
``section.key=value`` strings whose value is parsed as YAML (``--set sam_auto.points_per_side=16``).

Every value METHOD.md leaves open ("ours") is a field here with the default it names.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A configuration file, key or value is wrong; the message names which and why."""


# --------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelsConfig:
    """Which foundation models to build; names are keys of ``fmbseg.models.registry``."""

    clip: str = "clip_vit_l14_336"  # open_clip ViT-L/14 @336 (paper: ViT-L/14)
    clip_weights: str | None = "openai"  # pretrained tag, local path or store URI; None = random
    clip_quick_gelu: bool | None = None  # None = as the tag says; files/URIs: true (OpenAI CLIP)
    sam: str = "sam_vit_h"  # segment-anything vit_h
    sam_weights: str | None = "sam_vit_h_4b8939.pth"  # local path or store URI; None = random
    # SAM's image encoder: auto = bf16 autocast on GPU (SAM 2's practice), fp32 on CPU;
    # fp32 = segment-anything's own numbers. Prompt encoder and mask decoder stay fp32.
    sam_precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    dino: str = "dinov2_vitl14"  # timm vit_large_patch14_dinov2 (paper: ViT-L/14)
    dino_weights: str | None = "hub"  # "hub" = timm pretrained, a local path, a URI; None = random


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how stages execute."""

    executor: Literal["ray", "local"] = "ray"  # local = in-process, for debugging and unit tests
    ray_address: str | None = None  # None = a local Ray; "auto" or "ray://host:10001" at scale
    num_workers: int = 0  # model-holding actors per stage; 0 = one per GPU, else 1 on CPU
    cpus_per_worker: float = 1.0  # Ray CPUs reserved by each actor
    gpus_per_worker: float = 1.0  # Ray GPUs reserved by each actor when GPUs exist
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = cuda when available
    shard_size: int = 256  # images per shard (unit of commit and of resume)
    max_retries: int = 3  # per shard, when a worker dies or storage fails transiently
    # A Ray worker that cannot be placed this long (its node lost, no spare capacity) is
    # dropped; with none placed at all, the stage fails. Covers an autoscaler's node start.
    placement_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if not self.placement_timeout_s > 0:
            raise ConfigError(
                f"runtime.placement_timeout_s must be > 0, got {self.placement_timeout_s}"
            )


@dataclass(frozen=True)
class IndexConfig:
    """Stage `index`: listing and decoding the image source."""

    extensions: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
    max_pixels: int = 178_956_970  # larger images are recorded as errors (PIL's bomb limit)
    verify_decode: bool = True  # decode every image fully (catches truncation); False = header only


@dataclass(frozen=True)
class ClipDenseConfig:
    """Stage `clip_dense` (METHOD 1.1.1-2): sliding-window dense CLIP features and presence."""

    mode: Literal["maskclip", "sclip"] = "maskclip"  # last-block path for dense features
    short_side: int = 1008  # image upsampled so its short side is this (ours)
    crop_size: int | None = None  # None = the CLIP model's input size (ours)
    stride_ratio: float = 2 / 3  # stride = round(crop_size * stride_ratio) (ours)
    templates: tuple[str, ...] = ("a photo of a {}.",)  # paper: one template
    min_crops: int = 2  # a class is present if it wins at least this many crops (paper: >1)
    batch_size: int = 16  # crops per forward pass, across images
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto = bf16 on GPU, fp32 on CPU


@dataclass(frozen=True)
class SamPromptConfig:
    """Stage `sam_prompt` (METHOD 1.1.3): top-k CLIP patches as SAM point prompts."""

    num_points: int = 5  # positive points per present class (paper: 5)
    multimask: bool = True  # keep the highest predicted-IoU of SAM's 3 masks


@dataclass(frozen=True)
class SamAutoConfig:
    """Stage `sam_auto` (METHOD 1.2): automatic masks, filtered, labelled from CLIP maps."""

    points_per_side: int = 32
    # prompts per decoder pass; None = 256 on a GPU (fills it better), SAM's own 64 on a CPU:
    # a pass holds points x 3 x 1024^2 float32 mask logits (3 GiB at 256), and on a CPU 256
    # had 0.72x the speed and 2.3x the peak memory of 64 (bench/sam_auto.py, sam_vit_b).
    # Not in the fingerprint: the masks are the same.
    points_per_batch: int | None = None
    pred_iou_thresh: float = 0.86
    stability_score_thresh: float = 0.92
    box_nms_thresh: float = 0.7
    min_mask_region_area: int = 100  # pixels
    max_area_fraction: float = 0.95  # drop masks covering more of the image than this


@dataclass(frozen=True)
class MergeConfig:
    """Stage `merge`: sample automatic masks and compose label maps."""

    auto_fraction: float = 0.5  # fraction of stage-1.2 masks kept (ours)
    seed: int = 0


@dataclass(frozen=True)
class ExportConfig:
    """Stage `export`: COCO JSON, PNG label maps, overlays and an HTML gallery."""

    png: bool = True
    # zlib level of the label PNGs (lossless at any): 6 = PIL's default; 1 encodes ~3x
    # faster for files ~1.8x larger, 9 is ~10% smaller and ~10x slower (bench/io_paths.py)
    png_compress_level: Literal[0, 1, 2, 3, 4, 5, 6, 7, 8, 9] = 6
    overlays: bool = True
    gallery_max_images: int = 200  # images shown in gallery.html
    overlay_alpha: float = 0.5


@dataclass(frozen=True)
class TrainConfig:
    """Stage 2 (METHOD stage 2): alignment module on frozen DINOv2 patch features."""

    input_size: int = 448  # DINOv2 input side (patch 14 -> 32x32 patches)
    min_labelled_fraction: float = 0.5  # majority label's share of a patch, else ignored (ours)
    heads: int = 16
    mlp_ratio: float = 4.0
    out_dim: int | None = None  # None = the CLIP text-embedding width
    temperature: float = 0.1
    templates: tuple[str, ...] = ("a photo of a {}.",)  # text prototypes (paper: one template)
    epochs: int = 10
    batch_size: int = 5  # images per batch (paper: 5)
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    seed: int = 0
    cache_features: bool = True  # store DINOv2 patch features so epochs/reruns reuse them
    num_loader_workers: int = 2
    model_name: str = "fmbseg-align"  # name in the store's model registry


@dataclass(frozen=True)
class EvaluateConfig:
    """Evaluation protocol (TCL's): sliding window over the short-side-resized image."""

    short_side: int = 448
    window: int = 448
    stride: int = 224
    templates: tuple[str, ...] = ("a photo of a {}.",)
    background: Literal["stuff_names", "constant"] = "stuff_names"  # paper's vs. TCL's
    background_score: float = 0.5  # for background == "constant"
    batch_size: int = 8
    max_long_side: int = 2048  # TCL/mmseg Resize img_scale=(2048, short_side), keep_ratio
    background_names: str = "coco-stuff-background"  # vocabulary of stuff names (paper's bg)
    mask_center: float = 0.25  # constant bg: soft mask sigmoid((cos - center) * scale), TCL's
    mask_scale: float = 10.0  # kp-branch values; makes cosines comparable to the 0.5 constant


@dataclass(frozen=True)
class Config:
    """The whole pipeline's configuration."""

    models: ModelsConfig = field(default_factory=ModelsConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    clip_dense: ClipDenseConfig = field(default_factory=ClipDenseConfig)
    sam_prompt: SamPromptConfig = field(default_factory=SamPromptConfig)
    sam_auto: SamAutoConfig = field(default_factory=SamAutoConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def to_dict(obj: Any) -> Any:
    """A JSON-able view of a config dataclass (tuples become lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def config_hash(obj: Any) -> str:
    """A stable hash of a config section (or any JSON-able value)."""
    blob = json.dumps(to_dict(obj), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against annotation ``tp``; returns the (possibly converted) value."""
    origin = get_origin(tp)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {list(allowed)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{where}: null is not allowed (expected {_type_name(tp)})")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: {value!r} does not match {_type_name(tp)}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp, *_rest) = get_args(tp)
        return tuple(_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported field type {tp}")  # pragma: no cover


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    where_ = where or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where_}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(
                f"{where_}: unknown key {key!r}; allowed keys: {', '.join(sorted(names))}"
            )
        tp = hints[key]
        sub = f"{where}.{key}" if where else key
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, sub)
        else:
            kwargs[key] = _coerce(value, tp, sub)
    return cls(**kwargs)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def builtin_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(name_or_path: str) -> Path:
    """A built-in config name (``tiny``) or a path to a YAML file."""
    path = Path(name_or_path)
    # A folder that happens to share a built-in's name (an output dir called "tiny") is not
    # a config file, so only .yaml/.yml paths and existing files count as paths.
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"config file not found: {name_or_path}")
        return path
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        raise ConfigError(
            f"no config named {name_or_path!r}: built-in configs are {builtin_configs()}; "
            "or pass a path to a .yaml file"
        )
    return candidate


def _load_raw(name_or_path: str, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = resolve_config_path(name_or_path).resolve()
    if path in seen:
        raise ConfigError(f"config {path} extends itself (cycle: {[str(p) for p in seen]})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping of sections")
    parent = data.pop("extends", None)
    if parent is not None:
        parent_ref = str(parent)
        if not Path(parent_ref).is_absolute() and (path.parent / parent_ref).is_file():
            parent_ref = str(path.parent / parent_ref)
        data = _deep_merge(_load_raw(parent_ref, (*seen, path)), data)
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"sam_auto.points_per_side=16"`` -> (["sam_auto", "points_per_side"], 16)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {text!r}: the key must be section.key, e.g. train.epochs=2")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {exc}") from exc
    return parts, value


def load_config(
    name_or_path: str | None = "default", overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """Load a built-in config by name or a YAML file, then apply ``section.key=value`` overrides."""
    data = _load_raw(name_or_path) if name_or_path else {}
    for text in overrides:
        (section, key), value = parse_override(text)
        data = _deep_merge(data, {section: {key: value}})
    return _build(Config, data, "")


def replace(cfg: Config, **sections: Any) -> Config:
    """A copy of ``cfg`` with whole sections or ``{section: {key: value}}`` dicts replaced."""
    updates = {}
    for name, value in sections.items():
        current = getattr(cfg, name)
        updates[name] = dataclasses.replace(current, **value) if isinstance(value, dict) else value
    return dataclasses.replace(cfg, **updates)
