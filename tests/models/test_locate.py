"""locate_weights: every checkpoint found (or reported, key by key) in seconds, none loaded."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from fmbseg.config import load_config
from fmbseg.models.locate import locate_weights
from fmbseg.models.weights import WeightsNotFoundError


def test_random_weights_and_existing_files_pass(tmp_path: Path) -> None:
    ckpt = tmp_path / "sam.pth"
    ckpt.write_bytes(b"x")
    models = load_config(
        "tiny", [f"models.sam_weights={ckpt}", f"models.dino_weights=file://{ckpt}"]
    ).models
    locate_weights(models)  # clip: None = random init; the others exist


def test_missing_files_and_unreachable_store_are_reported_together(tmp_path: Path) -> None:
    uri = "s3://no-bucket/dino.safetensors"
    models = load_config(
        "tiny", [f"models.sam_weights={tmp_path}/missing.pth", f"models.dino_weights={uri}"]
    ).models
    options = {
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"},
        "anon": True,
        "config_kwargs": {"retries": {"max_attempts": 1}},
    }
    start = time.monotonic()
    with pytest.raises(WeightsNotFoundError) as info:
        locate_weights(models, store_options=options, timeout_s=3)
    assert time.monotonic() - start < 8
    lines = str(info.value).splitlines()
    assert lines[0] == "weights not found (offline?), checked before any work started:"
    assert lines[1].startswith(f"  models.sam_weights='{tmp_path}/missing.pth' (sam_tiny) ")
    assert f"no such file: {tmp_path}/missing.pth" in lines[1]
    assert lines[2].startswith(f"  models.dino_weights='{uri}' (dinov2_tiny) cannot be loaded: ")
    assert lines[-1] == "  or run with tiny random-weight models: --config tiny"
    locate_weights(models, kinds=("clip",))  # only what a flow needs is checked
