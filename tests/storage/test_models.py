"""Model registry: versions, concurrent saves, champion pointer, references."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from fmbseg.storage import ArtifactStore
from fmbseg.storage.models import ModelNotFoundError, ModelRegistry


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(3, 4, generator=g), "b": torch.arange(5, dtype=torch.int64) + seed}


def test_save_load_versions_and_cards(local_store: ArtifactStore) -> None:
    reg = ModelRegistry(local_store)
    assert reg.versions("seg") == [] and reg.latest("seg") is None
    assert reg.save("seg", _tensors(0), {"metrics": {"loss": 1.0}}) == "v0001"
    assert (
        reg.save("seg", _tensors(1), {"metrics": {"loss": 0.5}}, files={"loss_curve.png": b"png"})
        == "v0002"
    )
    assert reg.versions("seg") == ["v0001", "v0002"]
    tensors, card = reg.load("seg")
    assert card["version"] == "v0002" and card["name"] == "seg" and card["metrics"]["loss"] == 0.5
    assert torch.equal(tensors["w"], _tensors(1)["w"]) and tensors["b"].dtype == torch.int64
    assert local_store.read_bytes("models/seg/v0002/loss_curve.png") == b"png"
    old, _ = reg.load("seg", "v0001")
    assert torch.equal(old["b"], _tensors(0)["b"])
    updated = reg.update_card("seg", "v0001", {"metrics": {"miou": 0.3}})
    assert reg.card("seg", "v0001")["metrics"] == {"miou": 0.3} == updated["metrics"]
    with pytest.raises(ValueError, match="cannot be changed"):
        reg.update_card("seg", "v0001", {"version": "v0009"})


def test_concurrent_saves_never_collide(local_store: ArtifactStore) -> None:
    reg = ModelRegistry(local_store)
    with ThreadPoolExecutor(6) as pool:
        versions = list(pool.map(lambda i: reg.save("m", _tensors(i), {"i": i}), range(12)))
    assert sorted(versions) == [f"v{i:04d}" for i in range(1, 13)]
    for i, v in enumerate(versions):  # each version holds what its saver wrote
        tensors, card = reg.load("m", v)
        assert card["i"] == i and torch.equal(tensors["w"], _tensors(i)["w"])


def test_claimed_but_incomplete_version_is_skipped_and_invisible(
    local_store: ArtifactStore,
) -> None:
    reg = ModelRegistry(local_store)
    reg.save("m", _tensors(0), {})
    # Another writer claimed v0002 and crashed before writing its card.
    assert local_store.create_exclusive("models/m/v0002/_claim.json", b"{}")
    assert reg.save("m", _tensors(1), {}) == "v0003"
    assert reg.versions("m") == ["v0001", "v0003"] and reg.latest("m") == "v0003"
    with pytest.raises(ModelNotFoundError, match="no complete version 'v0002'"):
        reg.load("m", "v0002")


def test_champion_promotion_and_history(local_store: ArtifactStore) -> None:
    reg = ModelRegistry(local_store)
    for i in range(3):
        reg.save("m", _tensors(i), {})
    assert reg.champion("m") is None
    with pytest.raises(ModelNotFoundError, match="no champion"):
        reg.load("m", "champion")
    reg.promote("m", "v0001", "first model", {"miou": 0.2})
    rec = reg.promote("m", "latest", "better", {"miou": 0.3})
    assert rec["version"] == "v0003" and reg.champion("m") == "v0003"
    rec = reg.reject("m", "v0002", "worse", {"miou": 0.1})
    assert reg.champion("m") == "v0003"
    history = json.loads(local_store.read_bytes("models/m/champion.json"))["history"]
    assert [(h["version"], h["promoted"], h["previous"]) for h in history] == [
        ("v0001", True, None),
        ("v0003", True, "v0001"),
        ("v0002", False, "v0003"),
    ]
    assert history[1]["metrics"] == {"miou": 0.3} and history[2]["reason"] == "worse"
    tensors, card = reg.load("m", "champion")
    assert card["version"] == "v0003" and torch.equal(tensors["w"], _tensors(2)["w"])
    with pytest.raises(ModelNotFoundError, match="no complete version 'v0009'"):
        reg.promote("m", "v0009", "typo", {})


def test_resolve_references(local_store: ArtifactStore, tmp_path) -> None:
    reg = ModelRegistry(local_store)
    reg.save("seg", _tensors(0), {})
    reg.save("seg", _tensors(1), {})
    reg.promote("seg", "v0001", "ok", {})
    assert reg.resolve("champion", "seg").version == "v0001"
    assert reg.resolve("latest", "seg").version == "v0002"
    assert reg.resolve("v0002", "seg").version == "v0002"
    assert reg.resolve("seg:champion").version == "v0001"
    ref = reg.resolve("seg:v0002")
    assert (ref.name, ref.version) == ("seg", "v0002")
    assert ref.uri == local_store.url("models/seg/v0002")
    # a direct URI (and a plain path) to a version folder
    for uri in (ref.uri, local_store.path("models/seg/v0001")):
        tensors, card, direct = reg.load_ref(uri)
        assert direct.name == "seg" and card["version"] == direct.version
        assert torch.equal(tensors["w"], _tensors(int(direct.version[-1]) - 1)["w"])
    with pytest.raises(ValueError, match="needs a model name"):
        reg.resolve("champion")
    with pytest.raises(ModelNotFoundError, match="no saved versions"):
        reg.resolve("other:latest")
    with pytest.raises(ModelNotFoundError, match="version folder"):
        reg.resolve(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="model name"):
        reg.save("bad/name", _tensors(0), {})
    with pytest.raises(TypeError, match="JSON"):
        reg.save("seg", _tensors(0), {"x": object()})


@pytest.mark.s3
def test_registry_on_s3(s3_store: ArtifactStore) -> None:
    reg = ModelRegistry(s3_store)
    with ThreadPoolExecutor(3) as pool:
        versions = list(pool.map(lambda i: reg.save("m", _tensors(i), {"i": i}), range(3)))
    assert sorted(versions) == ["v0001", "v0002", "v0003"]
    reg.promote("m", "v0002", "best", {"miou": 0.5})
    tensors, card, ref = reg.load_ref("m:champion")
    assert ref.uri.startswith("s3://") and card["version"] == "v0002"
    assert torch.equal(tensors["w"], _tensors(versions.index("v0002"))["w"])
    tensors, card, _ = reg.load_ref(ref.uri)  # direct s3:// URI with the store's options
    assert card["version"] == "v0002"
