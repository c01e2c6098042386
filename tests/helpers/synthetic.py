"""A synthetic world with known answers, shared by the tests.

- :func:`make_scene`: an ``HxWx3 uint8`` image of a background plus a few textured shapes,
  each class a known colour, with its true ``HxW uint8`` label map.
- :class:`ColourClip`: a stand-in :class:`~fmbseg.models.base.DenseClip`. A patch's dense
  feature is the mix of class text embeddings weighted by the fraction of the patch's pixels
  of each class colour, plus a fixed random linear function of the patch's pixels (noise).
  It is a function of each patch's pixels only, hence translation-equivariant on the patch
  grid. A crop's CLS embedding is the normalised mix over the whole crop (so its argmax is
  the crop's majority class).
- :class:`OracleSam`: a stand-in :class:`~fmbseg.models.base.Segmenter` that reads the true
  regions back from the colours: ``predict`` returns the region under most of the points
  (among deliberately worse candidates with lower scores), ``generate`` every region plus
  junk the thresholds must drop.
- :func:`miou`: mean IoU of predicted vs. true label maps (255 in the prediction = miss).
- Both stand-ins are registered models (``synthetic_colour_clip``, ``synthetic_oracle_sam``)
  so the real stage shells build them by name: :func:`synthetic_config`, :func:`write_scenes`.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from skimage.measure import label as connected_components

from fmbseg.config import Config, load_config, replace
from fmbseg.models.base import ConceptMasks, Preprocess
from fmbseg.models.registry import register_model

# Class name -> colour. The first two are backgrounds.
PALETTE: dict[str, tuple[int, int, int]] = {
    "grass": (40, 150, 40),
    "sky": (90, 150, 235),
    "car": (210, 40, 40),
    "dog": (235, 205, 50),
    "boat": (150, 50, 200),
    "road": (100, 100, 100),
}
VOCAB: tuple[str, ...] = tuple(PALETTE)
BACKGROUNDS = ("grass", "sky")
_COLOURS = np.array(list(PALETTE.values()), dtype=np.float32)  # (C, 3)
_MAX_COLOUR_DISTANCE = 40.0  # farther from every class colour = no class (e.g. padding)


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # HxWx3 uint8 RGB
    truth: np.ndarray  # HxW uint8, index into VOCAB
    image_id: str


def make_scene(seed: int, height: int = 48, width: int = 80, shapes: int = 2) -> Scene:
    """A background class and ``shapes`` rectangles/ellipses of other classes, textured."""
    rng = np.random.default_rng(seed)
    truth = np.full((height, width), VOCAB.index(BACKGROUNDS[seed % 2]), dtype=np.uint8)
    objects = [c for c in VOCAB if c not in BACKGROUNDS]
    yy, xx = np.mgrid[:height, :width]
    for k, name in enumerate(rng.choice(objects, size=shapes, replace=False)):
        h = int(rng.integers(height * 45 // 100, height * 65 // 100))
        w = int(rng.integers(width * 30 // 100, width * 45 // 100))
        # shapes sit in separate horizontal bands so each keeps most of its area
        band = width // shapes
        x0 = k * band + int(rng.integers(0, max(1, band - w)))
        y0 = int(rng.integers(0, height - h))
        if rng.random() < 0.5:
            region = (yy >= y0) & (yy < y0 + h) & (xx >= x0) & (xx < x0 + w)
        else:
            cy, cx = y0 + h / 2, x0 + w / 2
            region = ((yy + 0.5 - cy) / (h / 2)) ** 2 + ((xx + 0.5 - cx) / (w / 2)) ** 2 <= 1
        truth[region] = VOCAB.index(str(name))
    image = _COLOURS[truth].copy()
    image += rng.uniform(-12, 12, size=image.shape)  # texture: pixel noise ...
    image += 8 * np.sin(xx / 3.0 + seed)[..., None]  # ... and stripes
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return Scene(image, truth, f"scene-{seed:04d}")


def decode_classes(pixels: np.ndarray) -> np.ndarray:
    """``(..., 3)`` RGB in [0, 255] -> ``(...) int64`` nearest class index, -1 when far from all."""
    d = np.linalg.norm(pixels[..., None, :].astype(np.float32) - _COLOURS, axis=-1)
    idx = d.argmin(-1)
    return np.where(d.min(-1) <= _MAX_COLOUR_DISTANCE, idx, -1)


def _unit(name: str, dim: int) -> torch.Tensor:
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")
    v = torch.randn(dim, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


class ColourClip:
    """Stand-in DenseClip whose features are a real function of the crop's pixels."""

    def __init__(
        self, input_size: int = 32, patch_size: int = 8, embed_dim: int = 24, noise: float = 0.05
    ) -> None:
        self.preprocess = Preprocess(
            mean=(0.5, 0.5, 0.5),
            std=(0.25, 0.25, 0.25),
            input_size=input_size,
            patch_size=patch_size,
        )
        self.embed_dim = embed_dim
        self.device = torch.device("cpu")
        q, _ = torch.linalg.qr(
            torch.randn(embed_dim, embed_dim, generator=torch.Generator().manual_seed(0))
        )
        self.class_embeddings = q[: len(VOCAB)].contiguous()  # (C, D) orthonormal
        self.noise = noise
        self.projection = torch.randn(
            3 * patch_size**2, embed_dim, generator=torch.Generator().manual_seed(1)
        )
        self.projection /= self.projection.norm(dim=0, keepdim=True)
        self.dense_calls = 0
        self.crops_seen = 0

    def encode_text(self, names: list[str], templates: tuple[str, ...] = ("{}",)) -> torch.Tensor:
        rows = [
            self.class_embeddings[VOCAB.index(n)] if n in VOCAB else _unit(n, self.embed_dim)
            for n in names
        ]
        return F.normalize(torch.stack(rows), dim=1)

    def _fractions(self, crops: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` normalised -> ``(B, C, H, W)`` one-hot class of every pixel."""
        mean = torch.tensor(self.preprocess.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.preprocess.std).view(1, 3, 1, 1)
        rgb = ((crops.float() * std + mean) * 255).permute(0, 2, 3, 1).numpy()
        cls = torch.from_numpy(decode_classes(rgb))  # (B, H, W)
        onehot = F.one_hot(cls.clamp(min=0), len(VOCAB)).permute(0, 3, 1, 2).float()
        return onehot * (cls >= 0).unsqueeze(1)

    def dense_features(self, crops: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` (any H, W multiple of the patch) -> ``(B, D, H/p, W/p)``."""
        p = self.preprocess.patch_size
        frac = F.avg_pool2d(self._fractions(crops), p)  # (B, C, h, w)
        mix = torch.einsum("bchw,cd->bdhw", frac, self.class_embeddings)
        patches = F.unfold(crops.float(), p, stride=p)  # (B, 3p^2, h*w)
        h, w = crops.shape[-2] // p, crops.shape[-1] // p
        noise = torch.einsum("bkn,kd->bdn", patches, self.projection).reshape(
            crops.shape[0], self.embed_dim, h, w
        )
        return mix + self.noise * noise

    def crop_embeddings(self, crops: torch.Tensor) -> torch.Tensor:
        frac = self._fractions(crops).mean(dim=(2, 3))  # (B, C)
        return F.normalize(frac @ self.class_embeddings + 1e-3, dim=1)

    def crops_and_dense(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.dense_calls += 1
        self.crops_seen += crops.shape[0]
        return self.crop_embeddings(crops), self.dense_features(crops)


def predict_each(
    sam: Any, points: np.ndarray, labels: np.ndarray, multimask: bool
) -> tuple[np.ndarray, np.ndarray]:
    """``Segmenter.predict_batch`` of a stand-in: its ``predict`` on each prompt, stacked."""
    out = [sam.predict(p, lab, multimask) for p, lab in zip(points, labels, strict=True)]
    return np.stack([m for m, _ in out]), np.stack([s for _, s in out])


class OracleSam:
    """Stand-in Segmenter returning true regions, read back from the class colours."""

    def __init__(self) -> None:
        self.regions: np.ndarray | None = None  # HxW int connected-component ids (0 = none)

    def set_image(self, image: np.ndarray) -> None:
        cls = decode_classes(image)
        self.regions = connected_components(cls + 1, background=0, connectivity=1)

    def predict(
        self, points: np.ndarray, labels: np.ndarray, multimask: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        assert self.regions is not None, "set_image first"
        h, w = self.regions.shape
        cols = np.clip(np.floor(points[:, 0]).astype(int), 0, w - 1)
        rows = np.clip(np.floor(points[:, 1]).astype(int), 0, h - 1)
        hit = np.bincount(self.regions[rows, cols]).argmax()
        true = self.regions == hit
        if not multimask:
            return true[None], np.array([0.95], dtype=np.float32)
        box = np.zeros_like(true)
        ys, xs = np.nonzero(true)
        box[max(0, ys.min() - 3) : ys.max() + 4, max(0, xs.min() - 3) : xs.max() + 4] = True
        part = true.copy()
        part[: (ys.min() + ys.max()) // 2] = False
        return np.stack([part, true, box]), np.array([0.6, 0.95, 0.8], dtype=np.float32)

    def predict_batch(
        self, points: np.ndarray, labels: np.ndarray, multimask: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        return predict_each(self, points, labels, multimask)

    def generate(self, image: np.ndarray) -> list[dict]:
        self.set_image(image)
        assert self.regions is not None
        out = []
        for r in range(1, int(self.regions.max()) + 1):
            seg = self.regions == r
            out.append(_sam_record(seg, 0.95, 0.97))
        everything = np.ones(self.regions.shape, dtype=bool)
        corner = np.zeros_like(everything)
        corner[:5, :5] = True
        out.append(_sam_record(everything, 0.99, 0.99))  # dropped by max_area_fraction
        out.append(_sam_record(corner, 0.30, 0.50))  # dropped by the quality thresholds
        return out


class OracleSam3:
    """Stand-in ConceptSegmenter: each class name's instances are the connected regions of
    pixels of its colour; presence 0.97 where the class has pixels, else 0.02."""

    def __init__(self) -> None:
        self.classes: np.ndarray | None = None

    def set_image(self, image: np.ndarray) -> None:
        self.classes = decode_classes(image)

    def segment_concepts(
        self, names: Sequence[str], *, min_score: float = 0.0, max_masks: int | None = None
    ) -> list[ConceptMasks]:
        assert self.classes is not None, "set_image first"
        out = []
        for name in names:
            mine = (
                self.classes == VOCAB.index(name)
                if name in VOCAB
                else np.zeros_like(self.classes, dtype=bool)
            )
            regions = connected_components(mine, connectivity=1)
            masks = [regions == r for r in range(1, int(regions.max()) + 1)]
            masks = [m for m in masks if m.sum() >= 10]
            masks = sorted(masks, key=lambda m: -int(m.sum()))[:max_masks]
            scores = np.full(len(masks), 0.9, np.float32)
            keep = scores >= min_score
            stack = np.stack(masks) if masks else np.zeros((0, *mine.shape), bool)
            out.append(ConceptMasks(0.97 if mine.any() else 0.02, stack[keep], scores[keep]))
        return out


def _sam_record(seg: np.ndarray, iou: float, stability: float) -> dict:
    ys, xs = np.nonzero(seg)
    bbox = [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1]
    return {
        "segmentation": seg,
        "area": int(seg.sum()),
        "bbox": bbox,
        "predicted_iou": iou,
        "stability_score": stability,
    }


def miou(preds: list[np.ndarray], truths: list[np.ndarray], num_classes: int = len(VOCAB)) -> float:
    """Mean IoU over classes occurring in the truth or the prediction (255 = miss)."""
    conf = np.zeros((num_classes, num_classes + 1), dtype=np.int64)
    for pred, truth in zip(preds, truths, strict=True):
        p = np.where(pred == 255, num_classes, pred).astype(np.int64)
        np.add.at(conf, (truth.reshape(-1).astype(np.int64), p.reshape(-1)), 1)
    inter = np.diag(conf[:, :num_classes])
    union = conf.sum(1) + conf[:, :num_classes].sum(0) - inter
    valid = union > 0
    return float((inter[valid] / union[valid]).mean())


# ---- the stand-ins as registered models, and a ready-made world on disk --------------------

BUILDS: Counter[str] = Counter()  # how many times each stand-in was built (models load once)
CLIP_NAME, SAM_NAME = "synthetic_colour_clip", "synthetic_oracle_sam"
SAM3_NAME = "synthetic_oracle_sam3"


def _build_colour_clip(weights: str | None, device: torch.device, **kwargs: Any) -> ColourClip:
    BUILDS["clip"] += 1
    return ColourClip()


def _build_oracle_sam(weights: str | None, device: torch.device, **kwargs: Any) -> OracleSam:
    BUILDS["sam"] += 1
    return OracleSam()


register_model(CLIP_NAME, "clip", _build_colour_clip, "test stand-in: colour-reading CLIP")
register_model(SAM_NAME, "sam", _build_oracle_sam, "test stand-in: region-reading SAM")


def _build_oracle_sam3(weights: str | None, device: torch.device, **kwargs: Any) -> OracleSam3:
    BUILDS["sam3"] += 1
    return OracleSam3()


register_model(SAM3_NAME, "sam3", _build_oracle_sam3, "test stand-in: colour-reading SAM 3")


def synthetic_config(**sections: dict[str, Any]) -> Config:
    """The tiny config with the stand-ins, the local executor and small shards."""
    cfg = load_config("tiny")
    cfg = replace(
        cfg,
        models={
            "clip": CLIP_NAME,
            "clip_weights": None,
            "sam": SAM_NAME,
            "sam_weights": None,
            "sam3": SAM3_NAME,
            "sam3_weights": None,
        },
        runtime={"executor": "local", "shard_size": 4, "device": "cpu"},
        clip_dense={"short_side": 64, "min_crops": 1, "batch_size": 16},
        sam_auto={
            "pred_iou_thresh": 0.86,
            "stability_score_thresh": 0.92,
            "min_mask_region_area": 10,
            "max_area_fraction": 0.95,
        },
        export={"gallery_max_images": 6},
    )
    return replace(cfg, **sections) if sections else cfg


def write_scenes(
    folder: Path, n: int, height: int = 48, width: int = 96, shapes: int = 3
) -> dict[str, Scene]:
    """``n`` scenes saved as lossless PNGs in ``folder``; returns file stem -> scene."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for seed in range(n):
        scene = make_scene(seed, height, width, shapes)
        Image.fromarray(scene.image).save(folder / f"{scene.image_id}.png")
        out[scene.image_id] = scene
    return out


def run_pipeline(
    store: Any,
    cfg: Config,
    folder: Path,
    index_fp: str | None = None,
    image_labels: Any = None,
) -> dict[str, str]:
    """Every stage-1 stage on the images in ``folder`` (or on a committed index), with
    ``image_labels`` (an ``ImageLabels``) in place of CLIP's presence vote if given;
    returns stage -> fingerprint."""
    from fmbseg.engine.stage import run
    from fmbseg.tasks.annotate.index import run_index
    from fmbseg.tasks.annotate.stages import passes, stage1, stage_run

    index = index_fp or run_index(store, str(folder), cfg)
    job = stage_run(store, cfg, index, VOCAB, image_labels=image_labels)
    for stages in passes(stage1(cfg)):
        run(stages, job)
    return dict(job.fps)
