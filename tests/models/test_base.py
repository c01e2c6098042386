"""The preprocessing that travels with a model."""

from __future__ import annotations

import torch

from fmbseg.models.base import Preprocess

PRE = Preprocess(mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0), input_size=32, patch_size=16)


def test_normalize_uses_the_models_mean_and_std_per_channel() -> None:
    x = torch.tensor([1.0, 0.5, 0.25]).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    out = PRE.normalize(x)
    assert out.shape == (2, 3, 2, 2)
    assert out[0, :, 0, 0].tolist() == [1.0, 1.0, 0.25]
    # 0..255 pixels normalised directly: the same numbers
    assert torch.allclose(PRE.normalize(x * 255.0, 255.0), out)
