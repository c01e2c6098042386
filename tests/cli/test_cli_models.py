"""``fmbseg models list|show|promote`` and a registry that is corrupt: exit 2, one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fmbseg.cli import main
from fmbseg.models.align import AlignmentConfig, AlignmentModule
from fmbseg.storage import ArtifactStore
from fmbseg.storage.models import ModelRegistry
from fmbseg.tasks.train.promotion import promote_if_first
from fmbseg.tasks.train.run import CARD_KIND

NAME = "fmbseg-align"


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _save(reg: ModelRegistry, seed: int, **card: object) -> str:
    """A small but real alignment-module version, with a card as run_train writes it."""
    import torch

    torch.manual_seed(seed)
    mcfg = AlignmentConfig(in_dim=8, out_dim=4, heads=2, mlp_ratio=1.0)
    tensors = AlignmentModule(mcfg).state_dict()
    full = {
        "kind": CARD_KIND,
        "module": mcfg.to_dict(),
        "vocabulary": ["cat", "dog", "grass"],
        "data": {
            "labels_fp": f"labels{seed:010d}",
            "index_fp": f"index{seed:011d}",
            "images": 8 + seed,
        },
        "metrics": {"final_loss": 1.0 / (seed + 1)},
        **card,
    }
    return reg.save(NAME, tensors, full)


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    reg = ModelRegistry(ArtifactStore(str(tmp_path / "store")))
    first = _save(reg, 0)
    assert promote_if_first(reg, NAME, first) is not None  # the first model: champion
    assert promote_if_first(reg, NAME, _save(reg, 1)) is None  # later ones: not
    return reg


def _store(reg: ModelRegistry) -> list[str]:
    return ["--store", reg.store.uri]


def test_list_show_and_promote(registry: ModelRegistry, capsys) -> None:
    status, out, err = _run(["models", "list", *_store(registry)], capsys)
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0] == f"{NAME}: 2 version(s), champion v0001"
    assert lines[1].startswith("  * v0001  ") and lines[2].startswith("    v0002  ")
    assert "labels labels0000000001  index index00000000001  9 images, 3 classes" in lines[2]
    assert "final_loss 0.5000" in lines[2]

    status, out, _ = _run(["models", "show", f"{NAME}:v0002", *_store(registry)], capsys)
    assert status == 0
    head, body = out.split("\n", 1)
    assert head.startswith(f"{NAME}:v0002 (champion is v0001)")
    assert json.loads(body)["data"]["labels_fp"] == "labels0000000001"

    argv = ["models", "promote", f"{NAME}:v0002", "--reason", "better on our held-out set"]
    status, out, err = _run([*argv, *_store(registry)], capsys)
    assert status == 0, err
    assert out.startswith(f"{NAME}: champion v0001 -> v0002 (better on our held-out set)")
    record = registry.champion_record(NAME)
    assert record is not None and record["version"] == "v0002"
    assert [(d["version"], d["promoted"], d["reason"]) for d in record["history"]] == [
        ("v0001", True, "no champion yet: the first model becomes the champion"),
        ("v0002", True, "better on our held-out set"),
    ]
    promotion = registry.card(NAME, "v0002")["promotion"]
    assert promotion["previous_champion"] == "v0001" and promotion["promoted"] is True
    status, out, _ = _run(["models", "list", NAME, *_store(registry)], capsys)
    assert "  * v0002  " in out and "    v0001  " in out
    status, out, _ = _run([*argv, *_store(registry)], capsys)  # again: nothing changes
    assert status == 0 and "already the champion" in out
    assert len(registry.champion_record(NAME)["history"]) == 2


@pytest.mark.parametrize(
    ("make", "ref", "message"),
    [
        (None, f"{NAME}:v0009", f"model '{NAME}' has no complete version 'v0009'"),
        (None, NAME, f"models promote needs an explicit version: {NAME}:vNNNN"),
        (None, f"{NAME}:latest", "needs an explicit version"),
        (None, "../evil:v0001", "model name '../evil' is not valid"),
        (
            {"kind": "something-else"},
            f"{NAME}:v0003",
            f"model {NAME}:v0003 cannot be promoted: not an alignment module",
        ),
        (
            {"module": {"in_dim": 16, "out_dim": 4, "heads": 2, "mlp_ratio": 1.0}},
            f"{NAME}:v0003",
            f"model {NAME}:v0003 cannot be promoted: its weights do not fit the module",
        ),
    ],
)
def test_promote_refuses_missing_or_incompatible_versions(
    registry: ModelRegistry, make, ref: str, message: str, capsys
) -> None:
    if make is not None:
        assert _save(registry, 3, **make) == "v0003"
    status, out, err = _run(["models", "promote", ref, *_store(registry)], capsys)
    assert status == 2 and out == ""
    assert err.startswith("fmbseg: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert registry.champion(NAME) == "v0001"  # the pointer did not move


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


@pytest.mark.parametrize(
    ("damage", "argv", "file", "message"),
    [
        (
            lambda d: _truncate(d / "v0002" / "card.json"),
            ["models", "show", f"{NAME}:v0002"],
            "v0002/card.json",
            "model card is truncated or not JSON",
        ),
        (
            lambda d: _truncate(d / "v0002" / "card.json"),
            ["models", "list"],
            "v0002/card.json",
            "model card is truncated or not JSON",
        ),
        (
            lambda d: (d / "v0001" / "weights.safetensors").unlink(),
            ["models", "promote", f"{NAME}:v0001"],
            "v0001/weights.safetensors",
            "weights file missing",
        ),
        (
            lambda d: _truncate(d / "v0002" / "weights.safetensors"),
            ["models", "promote", f"{NAME}:v0002"],
            "v0002/weights.safetensors",
            "weights file truncated or not safetensors",
        ),
        (
            lambda d: _truncate(d / "champion.json"),
            ["models", "list"],
            "champion.json",
            "champion pointer is truncated or not JSON",
        ),
        (
            lambda d: (d / "champion.json").write_text('{"version": "../../stages/x"}'),
            ["models", "show", f"{NAME}:champion"],
            "champion.json",
            "version '../../stages/x' is not of the form vNNNN",
        ),
        (
            lambda d: (d / "champion.json").write_text('{"version": "v1"}'),
            ["segment", "IMAGE", "--classes", "cat,dog", "--model", "champion"],
            "champion.json",
            "version 'v1' is not of the form vNNNN",
        ),
        (
            lambda d: (d / "v0001" / "weights.safetensors").write_bytes(b"\x08\x00"),
            ["segment", "IMAGE", "--classes", "cat,dog", "--model", "v0001"],
            "v0001/weights.safetensors",
            "weights file truncated or not safetensors",
        ),
    ],
)
def test_corrupt_registry_exits_2_naming_the_file(
    registry: ModelRegistry,
    damage,
    argv: list[str],
    file: str,
    message: str,
    tmp_path: Path,
    capsys,
) -> None:
    from PIL import Image

    image = tmp_path / "photo.png"
    Image.new("RGB", (16, 12), (10, 20, 30)).save(image)
    folder = Path(registry.store.uri.removeprefix("file://")) / "models" / NAME
    damage(folder)
    argv = [str(image) if a == "IMAGE" else a for a in argv]
    status, _, err = _run([*argv, *_store(registry), "--config", "tiny"], capsys)
    assert status == 2, err
    assert err.startswith("fmbseg: error: ") and err.count("\n") == 1, err
    assert f"models/{NAME}/{file}" in err and message in err, err
    assert "Traceback" not in err
