"""Config loading: built-ins, extends, overrides, and the messages for every kind of mistake."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Annotated

import pytest
from annotated_types import Ge, GroupedMetadata, Gt, Le, Lt

from fmbseg.config import (
    Config,
    ConfigError,
    IndexConfig,
    RuntimeConfig,
    builtin_configs,
    config_hash,
    load_config,
    parse_override,
    replace,
)


def _yaml(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_builtin_default_is_the_dataclass_defaults() -> None:
    # default.yaml documents the paper's values; they must be the dataclass defaults
    assert load_config("default") == Config()
    assert load_config(None) == Config()
    assert {"default", "tiny"} <= set(builtin_configs())


def test_tiny_extends_default() -> None:
    cfg = load_config("tiny")
    assert cfg.models.clip == "clip_tiny" and cfg.models.clip_weights is None
    assert cfg.runtime.shard_size == 4 and cfg.runtime.device == "cpu"
    assert cfg.sam_auto.max_area_fraction == 0.95  # inherited from default
    assert cfg.clip_dense.templates == ("a photo of a {}.",)


def test_user_file_extends_sibling_and_builtin(tmp_path: Path) -> None:
    _yaml(tmp_path / "base.yaml", "extends: tiny\nruntime:\n  shard_size: 8\nmerge:\n  seed: 3\n")
    child = _yaml(tmp_path / "child.yml", "extends: base.yaml\nmerge:\n  seed: 5\n")
    cfg = load_config(child)
    assert cfg.runtime.shard_size == 8  # from base.yaml, found beside child.yml
    assert cfg.merge.seed == 5  # the child wins
    assert cfg.models.sam == "sam_tiny"  # from tiny, two levels up
    assert cfg.runtime.device == "cpu"  # sibling keys of an overridden section survive


def test_overrides_are_parsed_as_yaml() -> None:
    cfg = load_config(
        "tiny",
        [
            "sam_auto.points_per_side=16",
            "clip_dense.templates=['a photo of a {}.', 'a picture of a {}.']",
            "models.clip_weights=openai",
            "models.sam_weights=null",
            "train.lr=1",
            "sam_prompt.multimask=false",
            "runtime.ray_address=ray://head:10001",
        ],
    )
    assert cfg.sam_auto.points_per_side == 16
    assert cfg.clip_dense.templates == ("a photo of a {}.", "a picture of a {}.")
    assert cfg.models.clip_weights == "openai" and cfg.models.sam_weights is None
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.sam_prompt.multimask is False
    assert cfg.runtime.ray_address == "ray://head:10001"
    assert parse_override("a.b= x=y ") == (["a", "b"], "x=y")  # only the first '=' splits


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["bogus.key=1"], "unknown key 'bogus'; allowed keys: clip_dense, evaluate, export"),
        (["runtime.bogus=1"], "runtime: unknown key 'bogus'; allowed keys: cpus_per_worker"),
        (["runtime.shard_size=abc"], "runtime.shard_size: expected an integer, got 'abc'"),
        (["runtime.shard_size=2.5"], "runtime.shard_size: expected an integer, got 2.5"),
        (["runtime.shard_size=true"], "runtime.shard_size: expected an integer, got True"),
        (["train.lr=fast"], "train.lr: expected a number, got 'fast'"),
        (["sam_prompt.multimask=3"], "sam_prompt.multimask: expected true/false, got 3"),
        (["runtime.executor=dask"], "runtime.executor: 'dask' is not one of ['ray', 'local']"),
        (["clip_dense.templates=a {}"], "clip_dense.templates: expected a list, got str"),
        (["clip_dense.templates=[1]"], "clip_dense.templates[0]: expected a string, got 1"),
        (["train.out_dim=wide"], "train.out_dim: expected an integer or null, got 'wide'"),
        (["runtime.shard_size=null"], "runtime.shard_size: expected an integer, got None"),
        (["train.out_dim=[1]"], "train.out_dim: expected an integer or null, got [1]"),
        (
            ["models.clip_quick_gelu=1"],
            "models.clip_quick_gelu: expected true/false or null, got 1",
        ),
        (["train.lr=.inf"], "train.lr: expected a finite number, got inf"),
        (["runtime.shard_size"], "must look like section.key=value"),
        (["shard_size=3"], "the key must be section.key"),
        (["runtime.shard_size=[1"], "value is not valid YAML"),
    ],
)
def test_override_errors_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("default", overrides)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("runtime: 3\n", "runtime: expected a mapping, got int"),
        ("- a\n- b\n", "top level must be a mapping of sections"),
        ("runtime: [\n", "is not valid YAML"),
        ("sam_auto:\n  pred_iou: 0.5\n", "sam_auto: unknown key 'pred_iou'; allowed keys:"),
        ("extends: nope-nope\n", "no config named 'nope-nope'"),
    ],
)
def test_file_errors(tmp_path: Path, text: str, message: str) -> None:
    path = _yaml(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value)


def test_missing_files_and_names(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file not found: .*/absent\.yaml"):
        load_config(str(tmp_path / "absent.yaml"))
    with pytest.raises(ConfigError, match=r"no config named 'papr'.*built-in configs are \["):
        load_config("papr")


def test_extends_cycle(tmp_path: Path) -> None:
    _yaml(tmp_path / "a.yaml", "extends: b.yaml\n")
    _yaml(tmp_path / "b.yaml", "extends: a.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(str(tmp_path / "a.yaml"))


def test_builtin_name_wins_over_a_folder_of_that_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()  # e.g. an output folder named like the config
    assert load_config("tiny").models.clip == "clip_tiny"


def test_configs_are_frozen_and_replace_makes_copies() -> None:
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.runtime.shard_size = 3  # type: ignore[misc]
    changed = replace(cfg, runtime={"shard_size": 8}, merge=dataclasses.replace(cfg.merge, seed=1))
    assert changed.runtime.shard_size == 8 and changed.runtime.executor == "ray"
    assert changed.merge.seed == 1
    assert cfg.runtime == RuntimeConfig()


def test_config_hash() -> None:
    assert config_hash(Config().sam_auto) == config_hash(load_config("default").sam_auto)
    assert config_hash(Config().sam_auto) != config_hash(load_config("tiny").sam_auto)
    assert len(config_hash(Config())) == 64
    assert Config().to_dict()["clip_dense"]["templates"] == ["a photo of a {}."]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("runtime.shard_size=0", "runtime.shard_size: must be >= 1, got 0"),
        ("runtime.shard_size=-5", "runtime.shard_size: must be >= 1, got -5"),
        ("index.max_pixels=-1", "index.max_pixels: must be >= 1, got -1"),
        ("runtime.num_workers=-1", "runtime.num_workers: must be >= 0, got -1"),
        ("sam_auto.pred_iou_thresh=1.5", "sam_auto.pred_iou_thresh: must be <= 1, got 1.5"),
        ("sam_auto.points_per_batch=0", "sam_auto.points_per_batch: must be >= 1, got 0"),
        ("clip_dense.stride_ratio=0", "clip_dense.stride_ratio: must be > 0, got 0"),
        ("merge.auto_fraction=-0.1", "merge.auto_fraction: must be >= 0, got -0.1"),
        ("train.temperature=0", "train.temperature: must be > 0, got 0"),
        ("train.lr=.nan", "train.lr: expected a finite number, got nan"),
        ("train.out_dim=0", "train.out_dim: must be >= 1, got 0"),
        ("evaluate.mask_center=2", "evaluate.mask_center: must be <= 1, got 2"),
    ],
)
def test_out_of_range_values_fail_at_load_naming_the_field(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("default", [override])
    assert str(info.value) == message


def test_range_checks_also_guard_replace_and_direct_construction() -> None:
    with pytest.raises(ConfigError, match=r"^runtime\.shard_size: must be >= 1, got 0$"):
        replace(Config(), runtime={"shard_size": 0})
    with pytest.raises(ConfigError, match=r"^index\.max_pixels: must be >= 1, got -7$"):
        IndexConfig(max_pixels=-7)
    # edges are in range, None stays allowed for optional fields
    cfg = load_config(
        "default",
        [
            "runtime.num_workers=0",
            "sam_auto.pred_iou_thresh=1",
            "merge.auto_fraction=0",
            "train.out_dim=null",
        ],
    )
    assert cfg.runtime.num_workers == 0 and cfg.train.out_dim is None


def test_types_are_checked_in_python_too_and_every_problem_is_named() -> None:
    with pytest.raises(ConfigError, match=r"^runtime\.shard_size: expected an integer, got '8'$"):
        replace(Config(), runtime={"shard_size": "8"})
    with pytest.raises(ConfigError, match=r"^index: unknown key 'max_pixel'; allowed keys: "):
        IndexConfig(max_pixel=3)  # type: ignore[call-arg]
    with pytest.raises(ConfigError) as info:
        RuntimeConfig(shard_size=0, num_workers=-1, device="tpu")  # type: ignore[arg-type]
    assert str(info.value).split("; ") == [
        "runtime.num_workers: must be >= 0, got -1",
        "runtime.device: 'tpu' is not one of ['auto', 'cpu', 'cuda']",
        "runtime.shard_size: must be >= 1, got 0",
    ]
    # a list (what YAML has) is read as the tuple the field holds; an int as the float
    index = IndexConfig(extensions=[".png"])  # type: ignore[arg-type]
    assert index.extensions == (".png",) and hash(index) == hash(IndexConfig(extensions=(".png",)))
    assert RuntimeConfig(cpus_per_worker=2).cpus_per_worker == 2.0
    assert isinstance(RuntimeConfig(cpus_per_worker=2).cpus_per_worker, float)


def _bounds(tp: typing.Any) -> list[typing.Any]:
    """The range constraints of an annotation ``Annotated[int, Ge(1)]`` (also inside
    ``... | None``), read here from the annotation so the sweep below checks that whatever
    enforces them enforces every one."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [b for arg in typing.get_args(tp) for b in _bounds(arg)]
    if typing.get_origin(tp) is not Annotated:
        return []
    flat = [
        m
        for meta in tp.__metadata__
        for m in (meta if isinstance(meta, GroupedMetadata) else (meta,))
    ]
    return [m for m in flat if isinstance(m, (Gt, Ge, Lt, Le))]


def _base(tp: typing.Any) -> typing.Any:
    """``int`` for ``Annotated[int, Ge(1)] | None``, ``str | None`` stays a union."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is Annotated:
        return args[0]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return _base(args[0])
    return tp


def _numeric_fields() -> list[tuple[str, str, typing.Any]]:
    """(section, field, annotation) of every int/float field of every section."""
    out = []
    for section, cls in typing.get_type_hints(Config).items():
        hints = typing.get_type_hints(cls, include_extras=True)
        for f in dataclasses.fields(cls):
            if _base(hints[f.name]) in (int, float):
                out.append((section, f.name, hints[f.name]))
    return out


def _outside(bound: typing.Any, is_int: bool) -> typing.Any:
    """A value just outside ``bound``."""
    step = 1 if is_int else 0.5
    if isinstance(bound, Ge):
        return bound.ge - step
    if isinstance(bound, Gt):
        return bound.gt
    if isinstance(bound, Le):
        return bound.le + step
    assert isinstance(bound, Lt)
    return bound.lt


def test_every_numeric_field_has_a_range_and_rejects_a_value_outside_it() -> None:
    fields = _numeric_fields()
    assert len(fields) >= 40  # the sweep sees the fields (not vacuous)
    for section, name, tp in fields:
        bounds = _bounds(tp)
        assert bounds, f"{section}.{name} has no range: annotate it, e.g. Annotated[int, Ge(1)]"
        for bound in bounds:  # every bound is enforced, not only the first
            bad = _outside(bound, _base(tp) is int)
            with pytest.raises(ConfigError) as info:
                load_config("default", [f"{section}.{name}={bad}"])
            assert str(info.value).startswith(f"{section}.{name}: must be "), str(info.value)
    for name in builtin_configs():  # the shipped configs are in range
        load_config(name)
