"""Fixtures shared by the model adapter tests: a test image."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """A 64x96 (H x W) image with a bright rectangle: not square, so x/y swaps show."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 60, size=(64, 96, 3), dtype=np.uint8)
    img[10:40, 50:90] = 220
    return img
