"""Fixtures shared by the model adapter tests: a test image, and a missing optional package."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import numpy as np
import pytest


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """A 64x96 (H x W) image with a bright rectangle: not square, so x/y swaps show."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 60, size=(64, 96, 3), dtype=np.uint8)
    img[10:40, 50:90] = 220
    return img


@pytest.fixture
def hide_package(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """``hide_package(name)``: for the rest of the test, ``importlib.util.find_spec(name)``
    answers None, as when the optional package ``name`` is not installed."""

    def hide(name: str) -> None:
        real = importlib.util.find_spec
        monkeypatch.setattr(
            importlib.util, "find_spec", lambda n, *a: None if n == name else real(n, *a)
        )

    return hide
