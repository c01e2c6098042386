"""Predictors: baseline, alignment model and the similarities adapter; tiny real models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tests.helpers.dataset_trees as trees
from fmbseg.config import EvaluateConfig
from fmbseg.data.datasets import open_dataset
from fmbseg.models.base import Preprocess
from fmbseg.tasks.evaluate.predictors import (
    AlignmentPredictor,
    DenseClipPredictor,
    SimilaritiesPredictor,
    cosine_maps,
)
from fmbseg.tasks.evaluate.protocol import (
    evaluate_dataset,
    normalise_image,
    plan_prompts,
    predict_label_map,
)
from tests.helpers.standins import COLOURS, ColourPredictor, colour_scene, to_rgb

torch.set_num_threads(1)
PP = Preprocess(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), input_size=32, patch_size=8)
CFG = EvaluateConfig(short_side=32, window=16, stride=8, batch_size=4)


class PatchColourClip:
    """A DenseClip whose patch feature is the patch's mean RGB (so cosine compares colour
    directions); text embeddings are class colours."""

    preprocess = PP
    embed_dim = 3
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.sizes: list[tuple[int, int]] = []

    def encode_text(self, names, templates):
        return F.normalize(torch.tensor([COLOURS[n] for n in names], dtype=torch.float32), dim=1)

    def dense_features(self, crops):
        self.sizes.append(tuple(crops.shape[-2:]))
        assert crops.shape[-1] % 8 == 0
        return F.avg_pool2d(to_rgb(crops, PP), 8)

    def crop_embeddings(self, crops):  # pragma: no cover - protocol completeness
        return F.normalize(to_rgb(crops, PP).mean((2, 3)), dim=1)

    def crops_and_dense(self, crops):  # pragma: no cover
        return self.crop_embeddings(crops), self.dense_features(crops)


def test_dense_clip_predictor_is_upsampled_cosine():
    clip = PatchColourClip()
    pred = DenseClipPredictor(clip)
    windows = torch.zeros(2, 3, 16, 16)
    rgb = torch.tensor(COLOURS["cat"], dtype=torch.float32)
    windows[:] = ((rgb / 255 - torch.tensor(PP.mean)) / torch.tensor(PP.std)).view(1, 3, 1, 1)
    text = pred.encode_text(["cat", "dog"], ("{}",))
    s = pred.scores(windows, text)
    assert s.shape == (2, 2, 16, 16)
    torch.testing.assert_close(s[:, 0], torch.ones(2, 16, 16))
    expected = F.cosine_similarity(rgb, torch.tensor(COLOURS["dog"], dtype=torch.float32), dim=0)
    torch.testing.assert_close(s[0, 1, 3, 3], expected)


def test_windows_not_a_multiple_of_the_patch_are_resized():
    clip = PatchColourClip()
    s = DenseClipPredictor(clip).scores(
        torch.zeros(1, 3, 20, 20), clip.encode_text(["cat"], ("{}",))
    )
    assert clip.sizes == [(24, 24)] and s.shape == (1, 1, 20, 20)


def test_unpadded_non_square_windows_keep_their_shape():
    # An image smaller than the window is cut unpadded (mmseg): 12x16 crops, sides fitted
    # to the patch (8) one by one, scores back at the crop's own size.
    clip = PatchColourClip()
    s = DenseClipPredictor(clip).scores(
        torch.zeros(2, 3, 12, 16), clip.encode_text(["cat"], ("{}",))
    )
    assert clip.sizes == [(16, 16)] and s.shape == (2, 1, 12, 16)
    clip.sizes.clear()
    DenseClipPredictor(clip).scores(torch.zeros(1, 3, 10, 24), clip.encode_text(["cat"], ("{}",)))
    assert clip.sizes == [(8, 24)]


def test_cosine_maps_normalises_both_sides():
    f = torch.tensor([[3.0, 0.0], [0.0, 2.0]]).T.reshape(1, 2, 1, 2)  # two patches
    t = torch.tensor([[10.0, 0.0], [1.0, 1.0]])
    out = cosine_maps(f, t)
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([1.0, 2**-0.5]))
    torch.testing.assert_close(out[0, :, 0, 1], torch.tensor([0.0, 2**-0.5]))


class MeanColourEncoder:
    """A PatchEncoder whose patch features are the patch's mean RGB, row-major."""

    preprocess = Preprocess(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), input_size=16, patch_size=4)
    embed_dim = 3
    name = "mean_colour"
    device = torch.device("cpu")

    def patch_features(self, images):
        pooled = F.avg_pool2d(images, 4)  # (B, 3, h, w)
        return pooled.flatten(2).transpose(1, 2)  # (B, h*w, 3)


class ColourText:
    def encode_text(self, names, templates):
        return torch.tensor([COLOURS[n] for n in names], dtype=torch.float32)


def test_alignment_predictor_keeps_patch_layout():
    # Left half cat-coloured, bottom-right dog: a transposed reshape would swap them.
    pred = AlignmentPredictor(MeanColourEncoder(), torch.nn.Identity(), ColourText())
    w = torch.zeros(1, 3, 16, 16)
    w[0, :, :, :8] = torch.tensor(COLOURS["cat"], dtype=torch.float32).view(3, 1, 1) / 255
    w[0, :, 8:, 8:] = torch.tensor(COLOURS["dog"], dtype=torch.float32).view(3, 1, 1) / 255
    w[0, :, :8, 8:] = torch.tensor(COLOURS["bird"], dtype=torch.float32).view(3, 1, 1) / 255
    text = pred.encode_text(["cat", "dog", "bird"], ("{}",))
    s = pred.scores(w, text)
    assert s.shape == (1, 3, 16, 16)
    best = s[0].argmax(0)
    assert (best[:, :6] == 0).all() and (best[10:, 10:] == 1).all() and (best[:6, 10:] == 2).all()


def test_alignment_predictor_scales_a_short_crop_like_a_full_window():
    # input_size 8 for 16-px windows: a full window is halved; a 16x8 crop of a narrow
    # image is halved too (8x4, aspect kept), not squashed to 8x8.
    seen = []

    class Recording(MeanColourEncoder):
        def patch_features(self, images):
            seen.append(tuple(images.shape[-2:]))
            return super().patch_features(images)

    pred = AlignmentPredictor(Recording(), torch.nn.Identity(), ColourText(), input_size=8)
    text = pred.encode_text(["cat", "dog"], ("{}",))
    assert pred.scores(torch.rand(1, 3, 16, 16), text).shape == (1, 2, 16, 16)
    assert pred.scores(torch.rand(2, 3, 16, 8), text).shape == (2, 2, 16, 8)
    assert seen == [(8, 8), (8, 4)]


def test_similarities_adapter_matches_the_direct_predictor():
    direct = ColourPredictor()

    class Seg:
        def __init__(self):
            self.shapes = []

        def similarities(self, image, classes):
            assert image.dtype == np.uint8 and image.ndim == 3
            self.shapes.append(image.shape)
            x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
            x = (x - torch.tensor(direct.preprocess.mean).view(1, 3, 1, 1)) / torch.tensor(
                direct.preprocess.std
            ).view(1, 3, 1, 1)
            return direct.scores(x, direct.encode_text(classes, ("{}",)))[0].numpy()

    seg = Seg()
    adapter = SimilaritiesPredictor(seg)
    img, _, _ = colour_scene(3, h=32, w=40)
    plan = plan_prompts(("sky", "cat", "dog"), None, CFG)
    a = predict_label_map(adapter, img, adapter.encode_text(plan.names, ()), plan, CFG)
    b = predict_label_map(direct, img, direct.encode_text(plan.names, ()), plan, CFG)
    np.testing.assert_array_equal(a, b)
    assert seg.shapes and all(s == (16, 16, 3) for s in seg.shapes)
    with pytest.raises(TypeError, match="has no similarities"):
        SimilaritiesPredictor(object())


# ---- tiny real models end to end ------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip():
    from fmbseg.models import build_model

    return build_model("clip_tiny", None, "cpu", mode="maskclip")


def test_maskclip_baseline_end_to_end_on_a_voc_tree(tmp_path, tiny_clip):
    trees.write_voc(str(tmp_path))
    ds = open_dataset("voc21", str(tmp_path))
    cfg = EvaluateConfig(short_side=64, window=64, stride=32, batch_size=4)
    report = evaluate_dataset(DenseClipPredictor(tiny_clip), ds, cfg)
    labels = [lab for _, lab in ds.iter_labels()]
    assert report["pixels"] == sum(int((lab != 255).sum()) for lab in labels)
    assert len(report["per_class"]) == 21 and 0.0 <= report["aAcc"] <= 1.0
    counts = np.asarray(report["confusion"]["matrix"])
    truth = np.bincount(np.concatenate([lab[lab != 255] for lab in labels]), minlength=21)
    np.testing.assert_array_equal(counts.sum(axis=1), truth)


def test_alignment_module_on_tiny_dino(tiny_clip):
    from fmbseg.models import build_model
    from fmbseg.models.align import AlignmentConfig, AlignmentModule

    dino = build_model("dinov2_tiny", None, "cpu")
    module = AlignmentModule(
        AlignmentConfig(in_dim=dino.embed_dim, out_dim=tiny_clip.embed_dim, heads=2)
    )
    pred = AlignmentPredictor(dino, module, tiny_clip)
    img, _, _ = colour_scene(4, h=48, w=64)
    plan = plan_prompts(("background", "cat", "dog"), 0, CFG)
    text = pred.encode_text(plan.names, ("a photo of a {}.",))
    assert text.shape == (len(plan.names), tiny_clip.embed_dim)
    out = predict_label_map(pred, img, text, plan, CFG)  # windows of 16 -> 14 for DINOv2
    assert out.shape == (48, 64) and set(np.unique(out)) <= {0, 1, 2}


def test_from_segmenter_matches_open_vocab_segmenter(tiny_clip):
    from fmbseg.models import build_model
    from fmbseg.models.align import AlignmentConfig, AlignmentModule
    from fmbseg.segment import OpenVocabSegmenter

    torch.manual_seed(0)
    dino = build_model("dinov2_tiny", None, "cpu")
    module = AlignmentModule(
        AlignmentConfig(in_dim=dino.embed_dim, out_dim=tiny_clip.embed_dim, heads=2)
    )
    card = {"encoder": {"input_size": 56}, "text": {"templates": ["a photo of a {}."]}}
    seg = OpenVocabSegmenter(module, dino, tiny_clip, card, torch.device("cpu"))
    pred = AlignmentPredictor.from_segmenter(seg)
    img, _, _ = colour_scene(5, h=56, w=56)
    names = ["cat", "dog", "sky"]
    window = normalise_image(img, (56, 56), pred)[None]
    ours = pred.scores(window, pred.encode_text(names, ("a photo of a {}.",)))[0]
    theirs = seg.similarities(img, names)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_protocol_on_cuda_matches_cpu():
    from fmbseg.models import build_model

    img, _, _ = colour_scene(6, h=48, w=64)
    plan = plan_prompts(("background", "cat", "dog"), 0, CFG)
    maps = []
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        pred = DenseClipPredictor(build_model("clip_tiny", None, device, mode="sclip"))
        text = pred.encode_text(plan.names, CFG.templates)
        maps.append(predict_label_map(pred, img, text, plan, CFG))
    assert (maps[0] == maps[1]).mean() > 0.99  # TF32/bf16 may flip a few near-ties
