"""Weights references: local paths, cached URI downloads, safe loading, clear errors."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from fmbseg.models.weights import (
    CheckpointMismatchError,
    WeightsNotFoundError,
    load_into,
    load_state_dict_file,
    resolve_weights,
    seeded,
)

ARGS: dict[str, Any] = {"field": "sam_weights", "example": "sam_vit_h_4b8939.pth"}


def _memory_uri(data: bytes, name: str = "w.pth") -> str:
    uri = f"memory://fmbseg-w-{uuid.uuid4().hex[:8]}/{name}"
    with fsspec.open(uri, "wb") as f:
        f.write(data)
    return uri


def test_local_path_and_bare_name_in_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local = tmp_path / "a.pth"
    local.write_bytes(b"x")
    assert resolve_weights(str(local), **ARGS) == local
    assert resolve_weights(f"file://{local}", **ARGS) == local
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "sam_vit_h_4b8939.pth").write_bytes(b"y")
    monkeypatch.chdir(tmp_path)
    assert resolve_weights("sam_vit_h_4b8939.pth", cache_dir=cache, **ARGS) == (
        cache / "sam_vit_h_4b8939.pth"
    )


def test_missing_local_file_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WeightsNotFoundError) as info:
        resolve_weights("sam_vit_h_4b8939.pth", cache_dir=tmp_path / "c", **ARGS)
    msg = str(info.value)
    assert "'sam_vit_h_4b8939.pth' (models.sam_weights)" in msg
    assert (
        f"looked in {tmp_path / 'sam_vit_h_4b8939.pth'}; {tmp_path / 'c' / 'sam_vit_h_4b8939.pth'}"
        in msg
    )
    assert msg.endswith(
        "Fix: set models.sam_weights to a local path or a store URI "
        "(e.g. --set models.sam_weights=s3://bucket/sam_vit_h_4b8939.pth)."
    )
    assert isinstance(info.value, FileNotFoundError)


def test_uri_downloaded_once_into_cache(tmp_path: Path) -> None:
    uri = _memory_uri(b"weights-1")
    cache = tmp_path / "cache"
    first = resolve_weights(uri, cache_dir=cache, **ARGS)
    assert first.read_bytes() == b"weights-1" and first.name == "w.pth"
    assert first.parent.parent == cache
    assert [p.name for p in first.parent.iterdir()] == ["w.pth"]  # no .part left behind
    fsspec.filesystem("memory").rm(uri)
    assert resolve_weights(uri, cache_dir=cache, **ARGS) == first  # served from the cache
    other = resolve_weights(_memory_uri(b"weights-2"), cache_dir=cache, **ARGS)
    assert other != first and other.read_bytes() == b"weights-2"  # keyed by URI


def test_missing_uri_names_uri_and_cause(tmp_path: Path) -> None:
    uri = f"memory://fmbseg-w-{uuid.uuid4().hex[:8]}/nothing.pth"
    with pytest.raises(WeightsNotFoundError) as info:
        resolve_weights(uri, cache_dir=tmp_path, **ARGS)
    assert f"looked in {uri}" in str(info.value) and "FileNotFoundError" in str(info.value)
    assert list(tmp_path.rglob("*.part")) == []


@pytest.mark.s3
def test_s3_uri_with_store_options(tmp_path: Path, s3_server: dict[str, Any]) -> None:
    options = s3_server["storage_options"]
    uri = f"s3://{s3_server['bucket']}/weights-{uuid.uuid4().hex[:8]}/sam_tiny.pth"
    with fsspec.open(uri, "wb", **options) as f:
        f.write(b"s3-bytes")
    path = resolve_weights(uri, cache_dir=tmp_path, storage_options=options, **ARGS)
    assert path.read_bytes() == b"s3-bytes"


def test_load_state_dict_file_formats(tmp_path: Path) -> None:
    sd = {"a.weight": torch.arange(4.0), "b": torch.ones(2, 2)}
    save_file(sd, str(tmp_path / "x.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "x.pth")
    for name in ("x.safetensors", "x.pth"):
        got = load_state_dict_file(tmp_path / name)
        assert got.keys() == sd.keys()
        assert all(torch.equal(got[k], sd[k]) for k in sd)


def test_pickled_module_is_refused(tmp_path: Path) -> None:
    torch.save(nn.Linear(2, 2), tmp_path / "module.pth")  # would run code on unpickling
    with pytest.raises(CheckpointMismatchError, match="weights_only=True"):
        load_state_dict_file(tmp_path / "module.pth")
    torch.save({"epoch": 3}, tmp_path / "meta.pth")
    with pytest.raises(CheckpointMismatchError, match="mapping of parameter names to tensors"):
        load_state_dict_file(tmp_path / "meta.pth")


def test_load_into_names_offending_keys() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    sd = dict(model.state_dict())
    sd.pop("1.bias")
    sd["0.weight"] = torch.zeros(5, 3)
    sd.update({f"extra.{i}": torch.zeros(1) for i in range(7)})
    with pytest.raises(CheckpointMismatchError) as info:
        load_into(model, sd, "ckpt.pth for toy")
    msg = str(info.value)
    assert msg.startswith("ckpt.pth for toy does not fit")
    assert "missing keys: 1.bias;" in msg
    assert "unexpected keys: extra.0, extra.1, extra.2, extra.3, extra.4, ... (7 in all)" in msg
    assert "shape mismatches: 0.weight (5, 3) vs model (4, 3)" in msg
    good = {k: torch.full_like(v, 0.5) for k, v in model.state_dict().items()}
    load_into(model, good, "good")
    assert all(torch.all(p == 0.5) for p in model.parameters())


def test_seeded_is_deterministic_and_restores_rng() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    with seeded(0):
        a = nn.Linear(4, 4).weight.detach().clone()
    with seeded(0):
        b = nn.Linear(4, 4).weight.detach().clone()
    assert torch.equal(a, b)
    assert torch.equal(torch.rand(1), expected_next)  # caller's RNG stream untouched
