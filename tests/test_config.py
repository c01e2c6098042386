"""Config loading: built-ins, extends, overrides, and the messages for every kind of mistake."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fmbseg.config import (
    Config,
    ConfigError,
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
        (["train.out_dim=wide"], "train.out_dim: 'wide' does not match int | None"),
        (["runtime.shard_size=null"], "runtime.shard_size: expected an integer, got None"),
        (["train.out_dim=[1]"], "train.out_dim: [1] does not match int | None"),
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
