"""The evaluation protocol (TCL's, METHOD "Evaluation") as a pure core over a Predictor.

Per image (``HxWx3 uint8``, truth ``HxW``):

1. resize so the short side is ``short_side`` (bilinear), unless the long side would then
   exceed ``max_long_side`` -- mmseg's ``Resize(img_scale=(2048, 448), keep_ratio=True)``,
   including its rounding ``int(side * scale + 0.5)``;
2. normalise with the predictor's own mean/std and slide a ``window`` square with ``stride``
   over it exactly as mmseg's ``slide_inference`` does (the last window in each direction is
   shifted back to end at the border; where the image is smaller than the window along a
   side, the crop is the whole side, fed to the predictor unpadded at its own size, as
   mmseg's ``crop_img = img[:, :, y1:y2, x1:x2]`` is);
3. average the window scores where windows overlap;
4. resize the scores bilinearly to the label size, then argmax.

Background, for datasets that have a background class (VOC21, Context60, COCO-Object):

- ``"stuff_names"`` (the paper's): COCO-Stuff's stuff names are prompted as extra classes
  and pixels won by any of them are background. Stuff names equal to one of the dataset's
  classes are left out (ours). ``background_names`` picks the names: ``clean`` (ours,
  promptable: ``brick wall``) or ``raw`` (COCO-Stuff's own, ``wall-brick``, as the
  alignment module was trained on them).
- ``"constant"`` (TCL's, ``TCLSegInference.encode_decode`` in kakaobrain/tcl): a constant
  ``background_score`` (0.5) channel is concatenated *before* the class channels of each
  window. TCL's class channels are soft masks in [0, 1] -- sigmoid outputs of its masker,
  mixed with its "kp branch" ``sigmoid((cos - 0.25) * 10)`` of plain CLIP cosine -- not raw
  cosines nor softmax probabilities. Our predictors return cosines, so in this mode each
  window's scores go through that same kp-branch soft mask ``sigmoid((cos - mask_center) *
  mask_scale)`` before averaging; background wins where every class mask is below 0.5.
  (TCL applies the sigmoid before upsampling the patch grid, we after; both are monotone.)

SCLIP's own protocol differs (a background synonym list plus a 0.1 softmax-probability
threshold, logit scales, 336-px short side); METHOD lists SCLIP's numbers "with its own
protocol", and we evaluate it under TCL's, like every other predictor.

A ``Config`` or just its ``EvaluateConfig`` section is accepted wherever ``cfg`` is taken.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fmbseg.config import Config, EvaluateConfig
from fmbseg.data.datasets import dataset_description
from fmbseg.data.vocab import stuff_background_names
from fmbseg.tasks.evaluate.metrics import ConfusionMatrix
from fmbseg.tasks.evaluate.predictors import Predictor

Progress = Callable[[int, int], None]
ARGMAX_CHUNK = 32  # channels upsampled at once to label size (bounds memory for 171+ names)


def evaluate_config(cfg: Config | EvaluateConfig) -> EvaluateConfig:
    """The ``evaluate`` section of ``cfg`` (itself if it is one), checked."""
    ev = cfg.evaluate if isinstance(cfg, Config) else cfg
    if not isinstance(ev, EvaluateConfig):
        raise TypeError(f"expected a Config or EvaluateConfig, got {type(cfg).__name__}")
    # value ranges are checked where the fields are defined (fmbseg.config)
    if ev.stride > ev.window:
        raise ValueError(
            f"evaluate.stride ({ev.stride}) must not exceed evaluate.window "
            f"({ev.window}): pixels between windows would get no score"
        )
    if not ev.templates or any("{}" not in t for t in ev.templates):
        raise ValueError(f"evaluate.templates must be non-empty, each with '{{}}': {ev.templates}")
    return ev


# ---- what is prompted, and how score channels map to classes -----------------------------------


@dataclass(frozen=True)
class PromptPlan:
    """Names to prompt and the dataset class of each score channel.

    Channel ``c`` of the final scores is class ``channel_class[c]``. With a ``constant``
    background the first channel is that constant (TCL), followed by one per name.
    """

    names: tuple[str, ...]
    channel_class: tuple[int, ...]
    constant: float | None = None
    background_mode: str | None = None
    background_names: str | None = None  # "clean" | "raw" with stuff-name backgrounds

    def lut(self) -> np.ndarray:
        return np.asarray(self.channel_class, dtype=np.uint8)


def plan_prompts(
    classes: Sequence[str], background: int | None, cfg: Config | EvaluateConfig
) -> PromptPlan:
    """How to prompt a dataset's ``classes`` (``background`` = index of its background class)."""
    ev = evaluate_config(cfg)
    k = len(classes)
    if background is None:
        return PromptPlan(tuple(classes), tuple(range(k)))
    if not 0 <= background < k:
        raise ValueError(f"background index {background} is outside the {k} classes")
    fg = [i for i in range(k) if i != background]
    fg_names = tuple(classes[i] for i in fg)
    if ev.background == "constant":
        return PromptPlan(fg_names, (background, *fg), ev.background_score, "constant")
    stuff = stuff_background_names(exclude=classes, names=ev.background_names)
    channels = (*fg, *([background] * len(stuff)))
    return PromptPlan(fg_names + stuff, channels, None, "stuff_names", ev.background_names)


# ---- geometry ---------------------------------------------------------------------------------


def resized_size(height: int, width: int, short_side: int, max_long_side: int) -> tuple[int, int]:
    """mmseg ``Resize(img_scale=(max_long_side, short_side), keep_ratio=True)`` output size."""
    scale = min(short_side / min(height, width), max_long_side / max(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


def window_boxes(
    height: int, width: int, window: int, stride: int
) -> list[tuple[int, int, int, int]]:
    """``(y1, y2, x1, x2)`` windows of mmseg's ``slide_inference`` over a ``height x width`` image."""
    boxes = []
    rows = max(height - window + stride - 1, 0) // stride + 1
    cols = max(width - window + stride - 1, 0) // stride + 1
    for r in range(rows):
        for c in range(cols):
            y2 = min(r * stride + window, height)
            x2 = min(c * stride + window, width)
            boxes.append((max(y2 - window, 0), y2, max(x2 - window, 0), x2))
    return boxes


def normalise_image(image: np.ndarray, size: tuple[int, int], predictor: Predictor) -> torch.Tensor:
    """``HxWx3 uint8`` -> ``(3, h, w) float32`` resized (bilinear, like cv2) and normalised."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 image, got {image.shape} {image.dtype}")
    if not image.flags.writeable or not image.flags.c_contiguous:
        image = np.array(image)  # torch.from_numpy wants a writable, contiguous array
    x = torch.from_numpy(image).to(predictor.device)
    x = x.permute(2, 0, 1)[None].float()
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return predictor.preprocess.normalize(x, 255.0)[0]


# ---- sliding-window inference -----------------------------------------------------------------


def soft_mask(scores: torch.Tensor, center: float, scale: float) -> torch.Tensor:
    """TCL's kp-branch soft mask of cosine scores: ``sigmoid((s - center) * scale)``."""
    return torch.sigmoid((scores - center) * scale)


def sliding_window_scores(
    image: torch.Tensor,
    predictor: Predictor,
    text: Any,
    window: int,
    stride: int,
    batch_size: int,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``(3, H, W)`` normalised image -> ``(C, H, W)`` window scores averaged over overlaps.

    Windows are batched ``batch_size`` at a time; ``transform`` (e.g. :func:`soft_mask`) is
    applied to each window's scores before averaging.
    """
    _, h, w = image.shape
    boxes = window_boxes(h, w, window, stride)
    # Every box is min(h, window) x min(w, window) (window_boxes' y1 = max(y2 - window, 0)),
    # so the crops of a batch stack without padding.
    total: torch.Tensor | None = None
    count = torch.zeros((1, h, w), device=image.device)
    for start in range(0, len(boxes), batch_size):
        batch = boxes[start : start + batch_size]
        crops = torch.stack([image[:, y1:y2, x1:x2] for y1, y2, x1, x2 in batch])
        scores = predictor.scores(crops, text)
        ch, cw = crops.shape[-2:]
        if scores.ndim != 4 or (scores.shape[0], *scores.shape[-2:]) != (len(batch), ch, cw):
            raise ValueError(
                f"{type(predictor).__name__}.scores returned shape {tuple(scores.shape)} for "
                f"windows {tuple(crops.shape)}; expected ({len(batch)}, K, {ch}, {cw})"
            )
        scores = scores.to(image.device, torch.float32)
        if transform is not None:
            scores = transform(scores)
        if total is None:
            total = image.new_zeros((scores.shape[1], h, w))
        for j, (y1, y2, x1, x2) in enumerate(batch):
            total[:, y1:y2, x1:x2] += scores[j]
            count[:, y1:y2, x1:x2] += 1
    assert total is not None  # window_boxes never returns an empty list
    return total.div_(count)  # in place: a second (C, H, W) buffer costs more than the math


def image_scores(
    predictor: Predictor,
    image: np.ndarray,
    text: Any,
    plan: PromptPlan,
    cfg: Config | EvaluateConfig,
) -> torch.Tensor:
    """Scores at the resized resolution, ``(C, h, w)``, with the constant channel if any."""
    ev = evaluate_config(cfg)
    size = resized_size(image.shape[0], image.shape[1], ev.short_side, ev.max_long_side)
    x = normalise_image(image, size, predictor)
    transform = None
    if plan.constant is not None:
        transform = partial(soft_mask, center=ev.mask_center, scale=ev.mask_scale)
    scores = sliding_window_scores(
        x, predictor, text, ev.window, ev.stride, ev.batch_size, transform
    )
    if scores.shape[0] != len(plan.names):
        raise ValueError(
            f"{type(predictor).__name__} returned {scores.shape[0]} score channels "
            f"for {len(plan.names)} prompted names"
        )
    if plan.constant is not None:
        const = scores.new_full((1, *scores.shape[1:]), plan.constant)
        scores = torch.cat([const, scores])
    return scores


def predict_label_map(
    predictor: Predictor,
    image: np.ndarray,
    text: Any,
    plan: PromptPlan,
    cfg: Config | EvaluateConfig,
    out_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """One image -> ``HxW uint8`` map of dataset class indices (``out_size`` = label size,
    default the image's). Scores are upsampled bilinearly before the argmax, a chunk of
    channels at a time so 171+ classes at full resolution stay within memory."""
    scores = image_scores(predictor, image, text, plan, cfg)
    out_size = out_size or (image.shape[0], image.shape[1])
    best_val = best_idx = torch.empty(0)
    for c0 in range(0, scores.shape[0], ARGMAX_CHUNK):
        up = F.interpolate(
            scores[None, c0 : c0 + ARGMAX_CHUNK],
            size=out_size,
            mode="bilinear",
            align_corners=False,
        )[0]
        val, idx = up.max(dim=0)
        if c0 == 0:
            best_val, best_idx = val, idx
        else:
            better = val > best_val  # strict: the earlier channel wins ties, as argmax does
            best_val = torch.where(better, val, best_val)
            best_idx = torch.where(better, idx + c0, best_idx)
    return plan.lut()[best_idx.cpu().numpy()]


# ---- datasets -----------------------------------------------------------------------------------


def accumulate(
    predictor: Predictor,
    dataset: Any,
    cfg: Config | EvaluateConfig,
    limit: int | None = None,
    progress: Progress | None = None,
) -> ConfusionMatrix:
    """Run the protocol over the first ``limit`` samples of ``dataset`` (a ``SegDataset``)
    -> counts; ``progress(done, total)`` after each image."""
    ev = evaluate_config(cfg)
    plan = plan_prompts(dataset.classes, dataset.background, ev)
    cm = ConfusionMatrix(len(dataset.classes), dataset.ignore_index)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    if n == 0:
        return cm
    subset = dataset if n == len(dataset) else dataset.subset(range(n))
    with torch.inference_mode():
        text = predictor.encode_text(list(plan.names), tuple(ev.templates))
        for i, (_sid, image, label) in enumerate(subset):
            pred = predict_label_map(predictor, image, text, plan, ev, out_size=label.shape)
            cm.update(pred, label)
            if progress is not None:
                progress(i + 1, n)
    return cm


def _finite(x: float) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def metrics_report(cm: ConfusionMatrix, classes: Sequence[str]) -> dict[str, Any]:
    """Metrics of ``cm`` with a per-class table; NaN (excluded class) becomes ``None``."""
    m = cm.compute()
    truth = cm.matrix.sum(axis=1)
    return {
        "mIoU": _finite(m["mIoU"]),
        "mAcc": _finite(m["mAcc"]),
        "aAcc": _finite(m["aAcc"]),
        "pixels": m["pixels"],
        "coverage": _finite(m["coverage"]),
        "per_class": [
            {"class": name, "IoU": _finite(iou), "Acc": _finite(acc), "pixels": int(px)}
            for name, iou, acc, px in zip(classes, m["IoU"], m["Acc"], truth, strict=True)
        ],
        "confusion": cm.to_dict(),
    }


def evaluate_dataset(
    predictor: Predictor,
    dataset: Any,
    cfg: Config | EvaluateConfig,
    limit: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Evaluate ``predictor`` on ``dataset`` -> report dict.

    Keys: ``dataset``, ``dataset_description`` (which variant: "COCO-Object val, 80 things
    only, background pixels ignored"), ``num_images``, ``mIoU``/``mAcc``/``aAcc``
    (fractions), ``per_class`` (class, IoU, Acc, pixels), ``confusion``
    (``ConfusionMatrix.to_dict``), the protocol (``background``, ``background_names``,
    ``prompt_names``, ``templates``, sizes) and timing.
    """
    start = time.perf_counter()
    cm = accumulate(predictor, dataset, cfg, limit, progress)
    seconds = time.perf_counter() - start
    n = len(dataset) if limit is None else min(limit, len(dataset))
    name = getattr(dataset, "name", type(dataset).__name__)
    return {
        "dataset": name,
        "dataset_description": dataset_description(name),
        "num_images": n,
        **metrics_report(cm, dataset.classes),
        **protocol_report(dataset, cfg, n, seconds),
    }


def protocol_report(
    dataset: Any, cfg: Config | EvaluateConfig, images: int, seconds: float
) -> dict[str, Any]:
    """A report's protocol (``background``, ``background_names``, ``prompt_names``,
    ``templates``, ``protocol`` sizes) and speed (``seconds``, ``images_per_second``)."""
    ev = evaluate_config(cfg)
    plan = plan_prompts(dataset.classes, dataset.background, ev)
    return {
        "background": plan.background_mode,
        "background_names": plan.background_names,
        "prompt_names": list(plan.names),
        "templates": list(ev.templates),
        "protocol": {
            "short_side": ev.short_side,
            "window": ev.window,
            "stride": ev.stride,
            "max_long_side": ev.max_long_side,
        },
        "seconds": seconds,
        "images_per_second": images / seconds if seconds > 0 else None,
    }


def format_report(report: dict[str, Any]) -> str:
    """A plain-text table of a report (percentages, as papers print them)."""

    def pct(v: float | None) -> str:
        return "   -  " if v is None else f"{100 * v:6.2f}"

    lines = [
        f"{report.get('dataset', '?')}: {report.get('num_images', '?')} images, "
        f"mIoU {pct(report['mIoU'])}  mAcc {pct(report['mAcc'])}  aAcc {pct(report['aAcc'])}",
    ]
    if report.get("dataset_description"):  # which variant (COCO-Object 80 vs 81, ...)
        lines.append(f"  {report['dataset_description']}")
    if report.get("background"):
        names = report.get("background_names")
        names = f", {names} COCO-Stuff names" if names else ""
        lines.append(f"  background: {report['background']}{names}")
    lines.append(f"{'class':<24}{'IoU':>8}{'Acc':>8}")
    for row in report["per_class"]:
        lines.append(f"{row['class'][:23]:<24}{pct(row['IoU']):>8}{pct(row['Acc']):>8}")
    return "\n".join(lines)
