"""Stand-in predictors and datasets with known answers for the protocol tests."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from fmbseg.models.base import Preprocess

# name -> RGB colour; anything else is prompted as a colour far from every pixel.
COLOURS = {
    "cat": (220, 40, 40),
    "dog": (40, 200, 40),
    "bird": (40, 40, 220),
    "sky": (120, 170, 250),  # a COCO-Stuff stuff name: background in the paper's mode
}
FAR = (-1000.0, -1000.0, -1000.0)
PP = Preprocess(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), input_size=32, patch_size=8)


def to_rgb(windows: torch.Tensor, pp: Preprocess = PP) -> torch.Tensor:
    mean = torch.tensor(pp.mean).view(1, 3, 1, 1)
    std = torch.tensor(pp.std).view(1, 3, 1, 1)
    return (windows.cpu() * std + mean) * 255


class ColourPredictor:
    """Per-pixel scores ``1 - |rgb - colour_k| / 100``: a cosine-like value in about
    [-1, 1], 1 on the class colour. A function of each pixel alone, hence exactly
    translation-equivariant."""

    preprocess = PP
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.calls: list[tuple[int, ...]] = []

    def encode_text(self, names: Sequence[str], templates: tuple[str, ...]) -> torch.Tensor:
        return torch.tensor([COLOURS.get(n, FAR) for n in names], dtype=torch.float32)

    def scores(self, windows: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(windows.shape))
        rgb = to_rgb(windows)  # (B, 3, H, W)
        d = torch.linalg.vector_norm(rgb[:, None] - text[None, :, :, None, None], dim=2)
        return (1 - d / 100).clamp(-1, 1)


class LinearPixelPredictor:
    """Per-pixel random linear map to K channels (many classes, smooth random scores)."""

    preprocess = PP
    device = torch.device("cpu")

    def __init__(self, k: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(k, 3, generator=g)
        self.bias = torch.randn(k, generator=g) * 0.1

    def encode_text(self, names: Sequence[str], templates: tuple[str, ...]) -> list[str]:
        return list(names)

    def scores(self, windows: torch.Tensor, text: list[str]) -> torch.Tensor:
        return torch.einsum("bchw,kc->bkhw", windows, self.weight) + self.bias.view(1, -1, 1, 1)


class FixedScores:
    """The same score per class everywhere (``values[name]``, default -1)."""

    preprocess = PP
    device = torch.device("cpu")

    def __init__(self, values: dict[str, float]) -> None:
        self.values = values

    def encode_text(self, names: Sequence[str], templates: tuple[str, ...]) -> list[str]:
        return list(names)

    def scores(self, windows: torch.Tensor, text: list[str]) -> torch.Tensor:
        v = torch.tensor([self.values.get(n, -1.0) for n in text])
        b, _, h, w = windows.shape
        return v.view(1, -1, 1, 1).expand(b, -1, h, w).clone()


def colour_scene(
    seed: int,
    h: int = 30,
    w: int = 44,
    names: Sequence[str] = ("cat", "dog"),
    background: str = "sky",
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """An image of ``background`` colour with rectangles of ``names`` colours, and the
    names drawn at every pixel."""
    rng = np.random.default_rng(seed)
    img = np.empty((h, w, 3), np.uint8)
    img[:] = COLOURS[background]
    who = np.full((h, w), background, dtype=object)
    for i, n in enumerate(names):
        y0, x0 = (
            int(rng.integers(0, h // 2)),
            int(rng.integers(i * w // len(names), (i + 1) * w // len(names) - 8)),
        )
        img[y0 : y0 + h // 2, x0 : x0 + 8] = COLOURS[n]
        who[y0 : y0 + h // 2, x0 : x0 + 8] = n
    return img, who, list(names)


@dataclass
class ListDataset:
    """The parts of ``SegDataset`` the protocol uses, over in-memory samples."""

    name: str
    classes: tuple[str, ...]
    items: list[tuple[str, np.ndarray, np.ndarray]]
    background: int | None = None
    ignore_index: int = 255
    loaded: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        for item in self.items:
            self.loaded.append(item[0])
            yield item

    def iter_labels(self) -> Iterator[tuple[str, np.ndarray]]:
        for sid, _, lab in self:
            yield sid, lab

    def subset(self, indices: Sequence[int]) -> ListDataset:
        return ListDataset(
            self.name,
            self.classes,
            [self.items[i] for i in indices],
            self.background,
            self.ignore_index,
            self.loaded,
        )
