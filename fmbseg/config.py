"""Typed, frozen configuration: one dataclass per stage, loaded from YAML, checked by pydantic.

A config file is a mapping of section name -> mapping of field -> value (see
``fmbseg/configs/default.yaml``). Files may ``extends: <name|path>`` another file; the
child's keys override the parent's. Unknown sections or keys, wrong types and missing files
raise :class:`ConfigError` naming the key/file and what is allowed. CLI overrides use
``section.key=value`` strings whose value is parsed as YAML (``--set sam_auto.points_per_side=16``).

Every value METHOD.md leaves open ("ours") is a field here with the default it names.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import typing
from collections.abc import Mapping
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, dataclass_transform, get_args

import pydantic
import pydantic.dataclasses
import yaml
from annotated_types import Ge, Gt, Interval
from pydantic import ConfigDict, Field

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A configuration file, key or value is wrong; the message names which and why."""


# strict: an integer field takes only ints (YAML's "3", 2.5 and true are errors), a bool
# only true/false, a float ints and floats but not NaN/inf; defaults are checked too
_PYDANTIC = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, validate_default=True)

_T = TypeVar("_T")


@dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field,))
def _validated(cls: type[_T]) -> type[_T]:
    """``cls`` as a frozen pydantic dataclass: made from YAML, in Python or by :func:`replace`,
    it checks its fields' types and ranges, raising :class:`ConfigError` (see :func:`_message`)."""
    made: Any = pydantic.dataclasses.dataclass(frozen=True, config=_PYDANTIC)(cls)
    validate = made.__init__

    @functools.wraps(validate)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            validate(self, *args, **kwargs)
        except pydantic.ValidationError as exc:
            raise ConfigError(_message(made, exc)) from exc

    made.__init__ = __init__
    return made


_EXPECTED = {
    "int_type": "an integer",
    "float_type": "a number",
    "finite_number": "a finite number",
    "bool_type": "true/false",
    "string_type": "a string",
}
_RANGE = {
    "greater_than": ">",
    "greater_than_equal": ">=",
    "less_than": "<",
    "less_than_equal": "<=",
}


def _message(cls: type, exc: pydantic.ValidationError) -> str:
    """pydantic's errors as one line naming each field, what it must be and what it got:
    ``runtime.shard_size: must be >= 1, got 0; runtime.device: 'tpu' is not one of ['auto',
    'cpu', 'cuda']``."""
    section = {tp: name for name, tp in typing.get_type_hints(Config).items()}.get(cls, "")
    fields = getattr(cls, "__pydantic_fields__")  # noqa: B009
    out = []
    for err in exc.errors():
        loc, kind, got = err["loc"], err["type"], err["input"]
        name = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)
        where = f"{section}{name}" if section else name.lstrip(".")
        if kind == "unexpected_keyword_argument":
            allowed = ", ".join(sorted(fields))
            out.append(f"{section or 'config'}: unknown key {loc[0]!r}; allowed keys: {allowed}")
        elif kind in _RANGE:
            (bound,) = err.get("ctx", {}).values()  # a float field holds Gt(0) as 0.0
            bound = int(bound) if isinstance(bound, float) and bound.is_integer() else bound
            out.append(f"{where}: must be {_RANGE[kind]} {bound}, got {got!r}")
        elif kind == "literal_error" and len(loc) == 1:
            choices = list(get_args(fields[loc[0]].annotation))
            out.append(f"{where}: {got!r} is not one of {choices}")
        elif kind == "tuple_type":
            out.append(f"{where}: expected a list, got {type(got).__name__} {got!r}")
        else:
            expected = _EXPECTED.get(kind) or err["msg"].removeprefix("Input should be ")
            if len(loc) == 1 and type(None) in get_args(fields[loc[0]].annotation):
                expected += " or null"
            out.append(f"{where}: expected {expected}, got {got!r}")
    return "; ".join(out)


# Range-checked field types: annotated-types constraints, which pydantic reads as they are.
PosInt = Annotated[int, Ge(1)]
NonNegInt = Annotated[int, Ge(0)]
PosFloat = Annotated[float, Gt(0)]
NonNegFloat = Annotated[float, Ge(0)]
Fraction = Annotated[float, Interval(ge=0, le=1)]
PosFraction = Annotated[float, Interval(gt=0, le=1)]
Cosine = Annotated[float, Interval(ge=-1, le=1)]
# the sections hold tuples (frozen, hashable); lax, the field also takes YAML's lists
Strings = Annotated[tuple[str, ...], Field(strict=False)]


# ---- sections ------------------------------------------------------------------------


@_validated
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
    # stage 1's labeller: clip_sam = CLIP's presence vote + SAM prompt/automatic masks (the
    # paper); sam3 = SAM 3's text concepts (presence + instance masks; `annotate --teacher`)
    teacher: Literal["clip_sam", "sam3"] = "clip_sam"
    sam3: str = "sam3"  # SAM 3 text-concept segmenter (optional extra: pip install '.[sam3]')
    sam3_weights: str | None = "hub"  # "hub" = facebook/sam3 sam3.pt, a path, a URI; None = random


@_validated
class RuntimeConfig:
    """Where and how stages execute."""

    executor: Literal["ray", "local"] = "ray"  # local = in-process, for debugging and unit tests
    ray_address: str | None = None  # None = a local Ray; "auto" or "ray://host:10001" at scale
    num_workers: NonNegInt = 0  # model-holding actors per stage; 0 = one per GPU, else 1 on CPU
    cpus_per_worker: NonNegFloat = 1.0  # Ray CPUs reserved by each actor
    gpus_per_worker: NonNegFloat = 1.0  # Ray GPUs reserved by each actor when GPUs exist
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = cuda when available
    shard_size: PosInt = 256  # images per shard (unit of commit and of resume)
    max_retries: NonNegInt = 3  # per shard, when a worker dies or storage fails transiently
    # A Ray worker that cannot be placed this long (its node lost, no spare capacity) is
    # dropped; with none placed at all, the stage fails. Covers an autoscaler's node start.
    placement_timeout_s: PosFloat = 600.0


# every format the decoder reads that photos come in (GIF, TIFF: first frame/page)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@_validated
class IndexConfig:
    """Stage `index`: listing and decoding the image source."""

    extensions: Strings = IMAGE_EXTENSIONS  # walked in folders and URI prefixes
    max_pixels: PosInt = 178_956_970  # larger images are recorded as errors (PIL's bomb limit)
    verify_decode: bool = True  # decode every image fully (catches truncation); False = header only
    # protocols a .txt/COCO list's absolute paths and URIs may use ("file" = local paths,
    # "store" = the store's); relative entries always stay under the list's root
    allowed_protocols: Strings = ("file", "store")


@_validated
class ClipDenseConfig:
    """Stage `clip_dense` (METHOD 1.1.1-2): sliding-window dense CLIP features and presence."""

    mode: Literal["maskclip", "sclip"] = "maskclip"  # last-block path for dense features
    short_side: PosInt = 1008  # image upsampled so its short side is this (ours)
    crop_size: PosInt | None = None  # None = the CLIP model's input size (ours)
    stride_ratio: PosFraction = 2 / 3  # stride = round(crop_size * stride_ratio) (ours)
    templates: Strings = ("a photo of a {}.",)  # paper: one template
    min_crops: PosInt = 2  # a class is present if it wins at least this many crops (paper: >1)
    batch_size: PosInt = 16  # crops per forward pass, across images
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto = bf16 on GPU, fp32 on CPU


@_validated
class SamPromptConfig:
    """Stage `sam_prompt` (METHOD 1.1.3): top-k CLIP patches as SAM point prompts."""

    num_points: PosInt = 5  # positive points per present class (paper: 5)
    multimask: bool = True  # keep the highest predicted-IoU of SAM's 3 masks


@_validated
class SamAutoConfig:
    """Stage `sam_auto` (METHOD 1.2): automatic masks, filtered, labelled from CLIP maps."""

    points_per_side: PosInt = 32
    # prompts per decoder pass; None = 256 on a GPU (fills it better), SAM's own 64 on a CPU,
    # where 256 is slower and holds far more memory (points x 3 x 1024^2 float32 mask logits
    # a pass; bench/sam_auto.py). Not in the fingerprint: the masks are the same.
    points_per_batch: PosInt | None = None
    pred_iou_thresh: Fraction = 0.86
    stability_score_thresh: Fraction = 0.92
    box_nms_thresh: Fraction = 0.7
    min_mask_region_area: NonNegInt = 100  # pixels
    max_area_fraction: PosFraction = 0.95  # drop masks covering more of the image than this
    # SAM's labelling setting: 1 layer of 2x2 zoomed crops (each embedded again, so ~5x
    # the encoder passes), which finds small objects; 0 = the whole image only
    crop_n_layers: NonNegInt = 1
    crop_n_points_downscale_factor: PosInt = 2  # layer i's points per side: /factor**i


@_validated
class Sam3Config:
    """Stage `sam3` (ours, instead of CLIP presence + SAM prompts): SAM 3's text concepts."""

    # a class is present when SAM 3's presence probability for its name reaches this
    # (the score sam3 folds into every instance's; 0.5 = even odds)
    presence_threshold: Fraction = 0.5
    # an instance is kept when its score (instance probability x presence) reaches this;
    # 0.5 = sam3's own Sam3Processor default
    score_threshold: Fraction = 0.5
    max_masks_per_class: PosInt | None = None  # highest-scoring instances kept; None = all


@_validated
class MergeConfig:
    """Stage `merge`: sample automatic masks and compose label maps."""

    auto_fraction: Fraction = 0.5  # fraction of stage-1.2 masks kept (ours)
    seed: NonNegInt = 0
    # which mask wins a pixel several cover (fmbseg.storage.records.paint_order): area =
    # smaller over larger (ours); prompt_first = stage-1.1 masks over stage-1.2 ones;
    # fill_unlabelled = stage-1.2 masks only fill pixels no mask labelled, by SAM's IoU
    order: Literal["area", "prompt_first", "fill_unlabelled"] = "area"


@_validated
class ExportConfig:
    """Stage `export`: COCO JSON, PNG label maps, overlays and an HTML gallery."""

    png: bool = True
    # zlib level of the label PNGs (lossless at any): 6 = PIL's default; 1 is faster for
    # larger files, 9 a little smaller and much slower (bench/io_paths.py)
    png_compress_level: Literal[0, 1, 2, 3, 4, 5, 6, 7, 8, 9] = 6
    candidates: bool = True  # also write candidates.json: the raw overlapping masks as COCO
    overlays: bool = True
    gallery_max_images: NonNegInt = 200  # images shown in gallery.html
    overlay_alpha: Fraction = 0.5


@_validated
class TrainConfig:
    """Stage 2 (METHOD stage 2): alignment module on frozen DINOv2 patch features."""

    input_size: PosInt = 448  # DINOv2 input side (patch 14 -> 32x32 patches)
    # training crops per image: short side resized to input_size, input_size squares cut at
    # seeded offsets along the long side (features cached per crop); epochs cycle through them
    crops_per_image: PosInt = 2
    min_labelled_fraction: Fraction = 0.5  # majority label's share of a patch, else ignored (ours)
    heads: PosInt = 16
    mlp_ratio: PosFloat = 4.0
    out_dim: PosInt | None = None  # None = the CLIP text-embedding width
    temperature: PosFloat = 0.1
    # text prototypes in the loss's denominators: all = every vocabulary class (the paper's K),
    # batch = only the classes present in the batch (ablation)
    text_negatives: Literal["all", "batch"] = "all"
    templates: Strings = ("a photo of a {}.",)  # text prototypes (paper: one template)
    epochs: PosInt = 10
    batch_size: PosInt = 5  # images per batch (paper: 5)
    lr: NonNegFloat = 0.01  # 0 keeps the weights (a finetune that only re-evaluates)
    momentum: Annotated[float, Interval(ge=0, lt=1)] = 0.9
    weight_decay: NonNegFloat = 1e-4
    seed: NonNegInt = 0
    cache_features: bool = True  # store DINOv2 patch features so epochs/reruns reuse them
    num_loader_workers: NonNegInt = 2
    model_name: str = "fmbseg-align"  # name in the store's model registry


@_validated
class EvaluateConfig:
    """Evaluation protocol (TCL's): sliding window over the short-side-resized image."""

    short_side: PosInt = 448
    window: PosInt = 448
    stride: PosInt = 224
    templates: Strings = ("a photo of a {}.",)
    background: Literal["stuff_names", "constant"] = "stuff_names"  # paper's vs. TCL's
    background_score: Fraction = 0.5  # for background == "constant"
    batch_size: PosInt = 8
    max_long_side: PosInt = 2048  # TCL/mmseg Resize img_scale=(2048, short_side), keep_ratio
    # stuff names prompted as background (stuff_names): clean = ours, promptable
    # ("brick wall"); raw = COCO-Stuff's own ("wall-brick"), as the module was trained on
    background_names: Literal["clean", "raw"] = "clean"
    mask_center: Cosine = 0.25  # constant bg: soft mask sigmoid((cos - center) * scale), TCL's
    mask_scale: PosFloat = 10.0  # kp-branch values; makes cosines comparable to the 0.5 constant


@_validated
class Config:
    """The whole pipeline's configuration."""

    models: ModelsConfig = field(default_factory=ModelsConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    clip_dense: ClipDenseConfig = field(default_factory=ClipDenseConfig)
    sam_prompt: SamPromptConfig = field(default_factory=SamPromptConfig)
    sam_auto: SamAutoConfig = field(default_factory=SamAutoConfig)
    sam3: Sam3Config = field(default_factory=Sam3Config)
    merge: MergeConfig = field(default_factory=MergeConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


# ---- loading -------------------------------------------------------------------------


def to_dict(obj: Any) -> Any:
    """A JSON-able view of a config dataclass, at any depth: dataclasses and mappings become
    dicts with string keys, tuples lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def config_hash(obj: Any) -> str:
    """A stable hash of a config section (or any JSON-able value)."""
    blob = json.dumps(to_dict(obj), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _from_dict(data: dict[str, Any]) -> Config:
    """The Config a mapping of section -> mapping of key -> value describes."""
    classes = typing.get_type_hints(Config)
    sections = {}
    for name, values in data.items():
        if name in classes and not isinstance(values, dict):
            raise ConfigError(f"{name}: expected a mapping, got {type(values).__name__}")
        sections[name] = classes[name](**values) if name in classes else values
    return Config(**sections)


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
    return _from_dict(data)


def replace(cfg: Config, **sections: Any) -> Config:
    """A copy of ``cfg`` with whole sections or ``{section: {key: value}}`` dicts replaced."""
    updates = {}
    for name, value in sections.items():
        current = getattr(cfg, name)
        updates[name] = dataclasses.replace(current, **value) if isinstance(value, dict) else value
    return dataclasses.replace(cfg, **updates)
