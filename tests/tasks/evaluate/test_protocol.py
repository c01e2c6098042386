"""The evaluation protocol: geometry, sliding windows, background handling, datasets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fmbseg.config import EvaluateConfig, load_config
from fmbseg.data.vocab import load_vocabulary
from fmbseg.tasks.evaluate.protocol import (
    ARGMAX_CHUNK,
    evaluate_dataset,
    format_report,
    image_scores,
    normalise_image,
    plan_prompts,
    predict_label_map,
    resized_size,
    sliding_window_scores,
    window_boxes,
)
from tests.helpers.standins import (
    ColourPredictor,
    FixedScores,
    LinearPixelPredictor,
    ListDataset,
    colour_scene,
)

torch.set_num_threads(1)
CFG = EvaluateConfig(short_side=30, window=16, stride=8, batch_size=3)


def test_resize_matches_mmseg_keep_ratio():
    assert resized_size(375, 500, 448, 2048) == (448, 597)  # a VOC image
    assert resized_size(1024, 2048, 448, 2048) == (448, 896)  # Cityscapes
    assert resized_size(100, 3000, 448, 2048) == (68, 2048)  # long side capped


def test_window_grid_is_mmseg_slide_inference():
    assert window_boxes(448, 597, 448, 224) == [(0, 448, 0, 448), (0, 448, 149, 597)]
    boxes = window_boxes(20, 28, 16, 8)
    assert [(b[0], b[1]) for b in boxes[::3]] == [(0, 16), (4, 20)]
    assert [(b[2], b[3]) for b in boxes[:3]] == [(0, 16), (8, 24), (12, 28)]
    assert window_boxes(10, 12, 16, 8) == [(0, 10, 0, 12)]  # window larger than the image
    cover = np.zeros((37, 53), int)
    for y1, y2, x1, x2 in window_boxes(37, 53, 16, 10):
        assert y2 - y1 == 16 and x2 - x1 == 16
        cover[y1:y2, x1:x2] += 1
    assert cover.min() >= 1


@pytest.mark.parametrize(
    ("h", "w", "window", "stride"),
    [(30, 44, 16, 8), (30, 44, 16, 5), (23, 17, 16, 16), (10, 12, 16, 8)],
)
def test_sliding_window_equals_whole_image_for_an_equivariant_predictor(h, w, window, stride):
    pred = LinearPixelPredictor(k=5)
    x = torch.randn(3, h, w)
    slid = sliding_window_scores(x, pred, None, window, stride, batch_size=2)
    whole = pred.scores(x[None], None)[0]
    torch.testing.assert_close(slid, whole, rtol=1e-5, atol=1e-5)


class RecordingPredictor:
    """Scores each pixel by its window's mean first channel, recording the windows fed."""

    preprocess = ColourPredictor.preprocess
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.windows: list[torch.Tensor] = []

    def scores(self, windows: torch.Tensor, text: None) -> torch.Tensor:
        self.windows.extend(windows.clone())
        return windows[:, :1].mean((2, 3), keepdim=True).expand(-1, 1, *windows.shape[-2:])


def test_image_smaller_than_a_window_is_cut_unpadded_as_mmseg_does():
    # mmseg slide_inference, h=10, w=40, crop 16, stride 8, by hand:
    # h_grids = max(10 - 16 + 8 - 1, 0) // 8 + 1 = 1; w_grids = (40 - 16 + 7) // 8 + 1 = 4;
    # y2 = min(0 + 16, 10) = 10, y1 = max(10 - 16, 0) = 0; x2 = 16, 24, 32, 40 -> x1 = x2 - 16.
    mmseg = [(0, 10, 0, 16), (0, 10, 8, 24), (0, 10, 16, 32), (0, 10, 24, 40)]
    assert window_boxes(10, 40, 16, 8) == mmseg
    x = torch.randn(3, 10, 40, generator=torch.Generator().manual_seed(0))
    pred = RecordingPredictor()
    out = sliding_window_scores(x, pred, None, 16, 8, batch_size=3)
    assert [tuple(w.shape) for w in pred.windows] == [(3, 10, 16)] * 4  # no zero rows
    for w, (y1, y2, x1, x2) in zip(pred.windows, mmseg, strict=True):
        torch.testing.assert_close(w, x[:, y1:y2, x1:x2], atol=0, rtol=0)
    # each pixel: the mean of its windows' means (a padded window would dilute them)
    means = [x[0, :, x1:x2].mean() for _, _, x1, x2 in mmseg]
    torch.testing.assert_close(out[0, 3, 0], means[0])
    torch.testing.assert_close(out[0, 3, 20], (means[1] + means[2]) / 2)
    torch.testing.assert_close(out[0, 3, 30], (means[2] + means[3]) / 2)
    # smaller than the window on both sides: the whole image, once
    pred = RecordingPredictor()
    sliding_window_scores(x[:, :, :12], pred, None, 16, 8, batch_size=3)
    assert [tuple(w.shape) for w in pred.windows] == [(3, 10, 12)]


def test_background_names_clean_or_raw_and_the_report_says_which():
    classes = ("background", "cat", "dog")
    clean = plan_prompts(classes, 0, CFG)
    raw_cfg = EvaluateConfig(short_side=30, window=16, stride=8, background_names="raw")
    raw = plan_prompts(classes, 0, raw_cfg)
    assert clean.names[:2] == raw.names[:2] == ("cat", "dog")
    assert "building" in clean.names and "building-other" not in clean.names
    assert "building-other" in raw.names and "building" not in raw.names
    assert len(raw.names) == len(clean.names) == 2 + 91
    assert (clean.background_names, raw.background_names) == ("clean", "raw")
    with pytest.raises(Exception, match="'tidy' is not one of"):
        load_config("tiny", ["evaluate.background_names=tidy"])


def _scene_item() -> tuple[str, np.ndarray, np.ndarray]:
    img, who, _ = colour_scene(0)
    return "s0", img, np.vectorize({"sky": 255, "cat": 0, "dog": 1}.get)(who).astype(np.uint8)


def test_report_names_the_coco_object_variant():
    ds = ListDataset("coco-object-80", ("cat", "dog"), [_scene_item()])
    report = evaluate_dataset(ColourPredictor(), ds, CFG)
    assert report["dataset_description"] == (
        "COCO-Object val, 80 things only, background pixels ignored"
    )
    assert report["background"] is None and report["background_names"] is None
    text = format_report(report)
    assert text.splitlines()[1] == "  COCO-Object val, 80 things only, background pixels ignored"
    ds81 = ListDataset("coco-object-81", ("background", "cat", "dog"), [_scene_item()], 0)
    text = format_report(evaluate_dataset(ColourPredictor(), ds81, CFG))
    assert "  COCO-Object val, 80 things + background (81 classes)" in text
    assert "  background: stuff_names, clean COCO-Stuff names" in text


def test_windows_are_batched_and_square():
    pred = ColourPredictor()
    img, _, _ = colour_scene(0)
    plan = plan_prompts(("cat", "dog"), None, CFG)
    text = pred.encode_text(plan.names, CFG.templates)
    image_scores(pred, img, text, plan, CFG)
    n = len(window_boxes(30, 44, 16, 8))
    assert sum(s[0] for s in pred.calls) == n and max(s[0] for s in pred.calls) == 3
    assert all(s[1:] == (3, 16, 16) for s in pred.calls)


def test_image_is_resized_to_short_side_and_normalised():
    pred = ColourPredictor()
    img = np.full((15, 22, 3), 200, np.uint8)
    x = normalise_image(img, resized_size(15, 22, 30, 2048), pred)
    assert x.shape == (3, 30, 44)
    expected = (200 / 255 - torch.tensor(pred.preprocess.mean)) / torch.tensor(pred.preprocess.std)
    torch.testing.assert_close(x[:, 5, 7], expected.float())


def test_scores_upsampled_to_label_size_before_argmax():
    # Per-pixel scores at half resolution; the label map is at the original size.
    pred = ColourPredictor()
    img, who, _ = colour_scene(1, h=15, w=22)
    plan = plan_prompts(("sky", "cat", "dog"), None, CFG)
    text = pred.encode_text(plan.names, CFG.templates)
    out = predict_label_map(pred, img, text, plan, CFG)
    assert out.shape == (15, 22) and out.dtype == np.uint8
    expected = np.vectorize({"sky": 0, "cat": 1, "dog": 2}.get)(who)
    np.testing.assert_array_equal(out, expected)


def test_chunked_argmax_equals_full_argmax():
    k = ARGMAX_CHUNK * 2 + 5
    pred = LinearPixelPredictor(k=k, seed=3)
    img = np.random.default_rng(0).integers(0, 256, (17, 26, 3), dtype=np.uint8)
    names = tuple(f"c{i}" for i in range(k))
    plan = plan_prompts(names, None, CFG)
    scores = image_scores(pred, img, names, plan, CFG)
    full = F.interpolate(scores[None], size=(17, 26), mode="bilinear", align_corners=False)[0]
    np.testing.assert_array_equal(
        predict_label_map(pred, img, names, plan, CFG), full.argmax(0).numpy().astype(np.uint8)
    )


# ---- background -----------------------------------------------------------------------------


def test_plans_for_both_background_modes():
    voc = load_vocabulary("voc-21")
    stuff = plan_prompts(voc, 0, CFG)
    assert stuff.names[:20] == voc[1:] and len(stuff.names) == 20 + 91
    assert stuff.channel_class == (*range(1, 21), *([0] * 91)) and stuff.constant is None
    const = plan_prompts(voc, 0, EvaluateConfig(background="constant"))
    assert const.names == voc[1:] and const.constant == 0.5
    assert const.channel_class == tuple(range(21))  # constant channel first -> background 0
    ctx = plan_prompts(load_vocabulary("context-60"), 0, CFG)
    assert "sky" not in ctx.names[59:] and "banner" in ctx.names[59:]
    plain = plan_prompts(load_vocabulary("voc-20"), None, CFG)
    assert plain.names == load_vocabulary("voc-20") and plain.channel_class == tuple(range(20))


def test_stuff_names_map_to_background():
    pred = ColourPredictor()
    img, who, _ = colour_scene(2)
    classes = ("background", "cat", "dog", "bird")
    plan = plan_prompts(classes, 0, CFG)
    assert "sky" in plan.names  # a stuff name, prompted as background
    out = predict_label_map(pred, img, pred.encode_text(plan.names, CFG.templates), plan, CFG)
    expected = np.vectorize({"sky": 0, "cat": 1, "dog": 2}.get)(who)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize(
    ("cat", "dog", "expected"), [(0.30, 0.20, 1), (0.20, 0.35, 2), (0.20, 0.24, 0), (-0.5, 0.1, 0)]
)
def test_constant_background_is_tcl_05_on_soft_masks(cat, dog, expected):
    # TCL: background 0.5 vs sigmoid((cos - 0.25) * 10): a class wins only above cos 0.25.
    cfg = EvaluateConfig(short_side=30, window=16, stride=8, background="constant")
    pred = FixedScores({"cat": cat, "dog": dog})
    plan = plan_prompts(("background", "cat", "dog"), 0, cfg)
    img = np.zeros((30, 30, 3), np.uint8)
    out = predict_label_map(pred, img, plan.names, plan, cfg)
    assert (out == expected).all()
    scores = image_scores(pred, img, plan.names, plan, cfg)
    assert scores.shape == (3, 30, 30) and torch.all(scores[0] == 0.5)
    torch.testing.assert_close(scores[1, 0, 0], torch.sigmoid(torch.tensor((cat - 0.25) * 10)))


def test_constant_background_without_sigmoid_would_differ():
    # Raw cosine 0.3 < 0.5, yet TCL's soft mask makes it the winner: the transform matters.
    cfg = EvaluateConfig(short_side=16, window=16, stride=8, background="constant")
    plan = plan_prompts(("background", "cat"), 0, cfg)
    out = predict_label_map(
        FixedScores({"cat": 0.3}), np.zeros((16, 16, 3), np.uint8), ["cat"], plan, cfg
    )
    assert (out == 1).all()


# ---- datasets -----------------------------------------------------------------------------


def _scenes(n: int, ignore_border: bool = True) -> ListDataset:
    classes = ("background", "cat", "dog", "bird")
    items = []
    for i in range(n):
        img, who, _ = colour_scene(i, names=("cat", "dog") if i % 2 else ("bird", "cat"))
        lab = np.vectorize({"sky": 0, "cat": 1, "dog": 2, "bird": 3}.get)(who).astype(np.uint8)
        if ignore_border:
            lab[0, :] = 255
        items.append((f"s{i}", img, lab))
    return ListDataset("scenes", classes, items, background=0)


def test_evaluate_dataset_perfect_predictor_and_report():
    ds = _scenes(3)
    seen = []
    report = evaluate_dataset(
        ColourPredictor(),
        ds,
        load_config("tiny"),
        limit=2,
        progress=lambda i, n: seen.append((i, n)),
    )
    assert report["num_images"] == 2 and seen == [(1, 2), (2, 2)]
    assert ds.loaded == ["s0", "s1"]
    assert report["mIoU"] == 1.0 and report["aAcc"] == 1.0
    assert report["pixels"] == 2 * (30 * 44 - 44)  # ignore pixels not counted
    assert [r["class"] for r in report["per_class"]] == list(ds.classes)
    assert report["background"] == "stuff_names" and "sky" in report["prompt_names"]
    assert report["protocol"]["window"] == 64 and report["images_per_second"] > 0
    text = format_report(report)
    assert "mIoU 100.00" in text and "bird" in text


def test_evaluate_dataset_counts_mistakes():
    # A predictor that always says "cat": IoU(cat) = cat pixels / all pixels.
    ds = _scenes(2, ignore_border=False)
    report = evaluate_dataset(FixedScores({"cat": 0.9}), ds, CFG)
    labels = np.stack([lab for _, _, lab in ds.items])
    cat = (labels == 1).sum() / labels.size
    iou = {r["class"]: r["IoU"] for r in report["per_class"]}
    assert iou["cat"] == pytest.approx(cat) and iou["background"] == 0.0
    assert report["aAcc"] == pytest.approx(cat)


def test_bad_protocol_config_is_an_error():
    with pytest.raises(ValueError, match="stride .* must not exceed evaluate.window"):
        evaluate_dataset(ColourPredictor(), _scenes(1), EvaluateConfig(window=16, stride=32))
    with pytest.raises(ValueError, match=r"returned shape \(1, 2, 8, 8\)"):

        class Bad(FixedScores):
            def scores(self, windows, text):
                return torch.zeros(1, 2, 8, 8)

        evaluate_dataset(Bad({}), _scenes(1), CFG)
