"""Stage-2 synthetic world: scenes on disk, pseudo-label records in the real schema, an index,
and a stand-in DINOv2 whose patch features are class-informative.

- :class:`ColourDino`: a :class:`~fmbseg.models.base.PatchEncoder`. A patch's feature is the
  mix of fixed random class vectors (in its own 32-d space, unrelated to the text space)
  weighted by the fraction of the patch's pixels of each class colour, plus a fixed random
  linear function of the patch's pixels (noise). Deterministic: a function of the pixels.
- :func:`make_world`: writes scenes as PNGs, commits a `merge` output (one mask per class
  present, some classes deliberately left unlabelled) and an `index` output to a store.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from PIL import Image

from fmbseg.models.base import Preprocess
from fmbseg.storage import ArtifactStore
from fmbseg.storage.records import MaskRecords, mask_row
from tests.helpers.synthetic import VOCAB, Scene, decode_classes, make_scene

LABELS_FP = "labels0000000000"
INDEX_FP = "index00000000000"


class ColourDino:
    """Stand-in PatchEncoder (patch 14) with class-informative features."""

    def __init__(
        self,
        input_size: int = 56,
        embed_dim: int = 32,
        noise: float = 0.3,
        name: str = "colour_dino",
    ) -> None:
        self.name = name
        self.preprocess = Preprocess(
            mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225),
            input_size=input_size,
            patch_size=14,
        )
        self.embed_dim = embed_dim
        g = torch.Generator().manual_seed(7)
        self.class_vectors = torch.randn(len(VOCAB), embed_dim, generator=g)
        self.projection = torch.randn(3 * 14 * 14, embed_dim, generator=g) / 14.0
        self.noise = noise
        self.calls = 0

    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        mean = torch.tensor(self.preprocess.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.preprocess.std).view(1, 3, 1, 1)
        x = images.float().cpu()
        rgb = ((x * std + mean) * 255).permute(0, 2, 3, 1).numpy()
        cls = torch.from_numpy(decode_classes(rgb))
        onehot = F.one_hot(cls.clamp(min=0), len(VOCAB)).permute(0, 3, 1, 2).float()
        frac = F.avg_pool2d(onehot * (cls >= 0).unsqueeze(1), 14)  # (B, C, g, g)
        mix = torch.einsum("bchw,cd->bhwd", frac, self.class_vectors).flatten(1, 2)
        patches = F.unfold(x, 14, stride=14).transpose(1, 2)  # (B, N, 3*14*14)
        return mix + self.noise * patches @ self.projection


@dataclass
class World:
    store: ArtifactStore
    train: list[Scene]
    held_out: list[Scene]
    uris: dict[str, str]


def records_for(scene: Scene, uri: str, drop: int | None = None) -> list[dict]:
    """One pseudo-label mask per class present in the truth (class ``drop`` left out)."""
    rows = []
    for k in np.unique(scene.truth):
        if int(k) == drop:
            continue
        rows.append(
            mask_row(
                scene.truth == k,
                image_id=scene.image_id,
                image_uri=uri,
                category_id=int(k),
                category=VOCAB[int(k)],
                source="prompt" if k % 2 else "auto",
                score=0.9,
                fingerprint="sam0000000000000",
            )
        )
    return rows


def commit_table(
    store: ArtifactStore, stage: str, fp: str, table: pa.Table, shard_size: int = 8
) -> None:
    n = max(1, -(-table.num_rows // shard_size))
    for s in range(n):
        store.write_shard(stage, fp, s, table.slice(s * shard_size, shard_size))
    store.commit(stage, fp, n)


def make_world(root: Path, n_train: int = 16, n_held: int = 6, seed: int = 0) -> World:
    """Scenes as PNG files under ``root/images``, a store with `merge` and `index` outputs."""
    store = ArtifactStore(str(root / "store"))
    (root / "images").mkdir(parents=True, exist_ok=True)
    scenes = [make_scene(seed + i, height=48, width=80, shapes=2) for i in range(n_train + n_held)]
    uris, rows, index_rows = {}, [], []
    for i, sc in enumerate(scenes):
        path = root / "images" / f"{sc.image_id}.png"
        Image.fromarray(sc.image).save(path)
        uris[sc.image_id] = str(path)
        if i < n_train:
            # every third image leaves one object class unlabelled (ignored pixels)
            drop = int(np.unique(sc.truth)[-1]) if i % 3 == 2 else None
            rows += records_for(sc, str(path), drop)
        index_rows.append(
            {
                "image_id": sc.image_id,
                "uri": str(path),
                "width": sc.image.shape[1],
                "height": sc.image.shape[0],
            }
        )
    commit_table(store, "merge", LABELS_FP, MaskRecords.from_rows(rows).table)
    commit_table(store, "index", INDEX_FP, pa.Table.from_pylist(index_rows[:n_train]))
    return World(store, scenes[:n_train], scenes[n_train:], uris)
