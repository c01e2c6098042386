"""Fixtures for stage-2 tests: a synthetic world in a local store, a tiny config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fmbseg.config import Config, load_config
from tests.helpers.synthetic import ColourClip
from tests.helpers.world import ColourDino, World, make_world


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture
def world(tmp_path: Path) -> World:
    return make_world(tmp_path)


@pytest.fixture
def encoder() -> ColourDino:
    return ColourDino()


@pytest.fixture
def text_model() -> ColourClip:
    return ColourClip(embed_dim=24)


def tiny_config(*overrides: str) -> Config:
    return load_config(
        "tiny", ["runtime.executor=local", "runtime.shard_size=8", "train.lr=0.05", *overrides]
    )
