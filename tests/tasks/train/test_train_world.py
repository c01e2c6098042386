"""Training through run_train on the synthetic world; reload; resume == uninterrupted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import fmbseg.tasks.train.features as feat
from fmbseg.engine.stage import run
from fmbseg.segment import OpenVocabSegmenter, write_outputs
from fmbseg.storage import ArtifactStore
from fmbseg.storage.fingerprint import fingerprint
from fmbseg.storage.models import ModelRegistry
from fmbseg.tasks.train.crops import CropBox, crop_boxes, crop_inputs
from fmbseg.tasks.train.loop import load_checkpoint
from fmbseg.tasks.train.stages import DINO_FEATURES, feature_runs, run_train, train_run
from tests.helpers.synthetic import VOCAB, make_scene
from tests.helpers.world import INDEX_FP, LABELS_FP, commit_table, make_world
from tests.tasks.train.conftest import tiny_config


def pixel_accuracy(seg: OpenVocabSegmenter, scenes, classes) -> float:
    right = total = 0
    for sc in scenes:
        pred = seg.segment(sc.image, classes)
        keep = sc.truth >= 0
        right += int((pred[keep] == sc.truth[keep]).sum())
        total += int(keep.sum())
    return right / total


def test_train_reaches_accuracy_and_reloads(world, encoder, text_model, tmp_path) -> None:
    cfg = tiny_config("train.epochs=12")
    events = []
    name, version = run_train(
        world.store,
        cfg,
        LABELS_FP,
        INDEX_FP,
        list(VOCAB),
        progress=lambda done, total: events.append((done, total)),
        encoder=encoder,
        text_model=text_model,
    )
    assert (name, version) == ("fmbseg-align", "v0001")
    assert events == [(epoch, 12) for epoch in range(13)]  # before the first epoch, then each

    # features were cached once (2 shards of 8 images, 2 crops each, batches of 2 crops),
    # not recomputed per epoch
    assert encoder.calls == 16 and len(world.store.committed_fingerprints(feat.STAGE)) == 1

    reg = ModelRegistry(world.store)
    card = reg.card(name, version)
    assert card["module"] == {"in_dim": 32, "out_dim": 24, "heads": 2, "mlp_ratio": 4.0}
    assert card["vocabulary"] == list(VOCAB) and card["data"]["labels_fp"] == LABELS_FP
    assert card["encoder"]["name"] == "colour_dino" and card["encoder"]["input_size"] == 56
    assert card["data"]["images"] == 16 and card["data"]["images_without_labels"] == 0
    assert len(card["epoch_losses"]) == 12 and card["epoch_losses"][-1] < card["epoch_losses"][0]
    png = world.store.read_bytes(f"models/{name}/{version}/loss_curve.png")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"

    seg = OpenVocabSegmenter.load(world.store, "latest", encoder=encoder, text_model=text_model)
    # trained on crops with the aspect ratio segment sees: 0.89 (0.82 when training squashed
    # the 48x80 scenes to squares while segment resizes the short side)
    assert pixel_accuracy(seg, world.held_out, list(VOCAB)) >= 0.87

    # registry weights == the last epoch checkpoint; reloading gives identical predictions
    ckpt = load_checkpoint(world.store, card["data"]["train_fp"])
    assert ckpt["epoch"] == 12
    for k, v in ckpt["module"].items():
        assert torch.equal(v, seg.module.state_dict()[k])
    reg.promote(name, version, "first", {})
    again = OpenVocabSegmenter.load(world.store, "champion", encoder=encoder, text_model=text_model)
    direct = OpenVocabSegmenter.load(
        world.store,
        world.store.url(f"models/{name}/{version}"),
        encoder=encoder,
        text_model=text_model,
    )
    for sc in world.held_out[:2]:
        a = seg.similarities(sc.image, list(VOCAB))
        assert a.shape == (len(VOCAB), 48, 80)
        assert torch.equal(a, again.similarities(sc.image, list(VOCAB)))
        assert torch.equal(a, direct.similarities(sc.image, list(VOCAB)))

    # any vocabulary at test time: a subset in another order, plus an unseen name
    sc = world.held_out[0]
    classes = ["dog", "car", "grass", "sky", "boat", "road", "zebra"]
    labels = seg.segment(sc.image, classes)
    assert labels.shape == sc.truth.shape and labels.dtype == np.uint8
    mapped = np.array([classes.index(VOCAB[t]) for t in sc.truth.ravel()]).reshape(sc.truth.shape)
    assert (labels == mapped).mean() >= 0.8
    # what Python users pass: a PIL image, a path, RGBA, grayscale, uint16 -> as the index
    from PIL import Image as PILImage

    from fmbseg.data.images import decode_image

    path = world.uris[sc.image_id]
    assert np.array_equal(seg.segment(PILImage.fromarray(sc.image), classes), labels)
    assert np.array_equal(seg.segment(path, classes), labels)
    assert np.array_equal(seg.segment(Path(path), classes), labels)
    opaque = np.dstack([sc.image, np.full(sc.image.shape[:2], 255, np.uint8)])
    assert np.array_equal(seg.segment(opaque, classes), labels)
    assert np.array_equal(seg.segment(PILImage.fromarray(opaque, "RGBA"), classes), labels)
    half = opaque.copy()
    half[..., 3] = 0  # fully transparent: composited on white, as index decodes it
    rgba_file = tmp_path / "clear.png"
    PILImage.fromarray(half, "RGBA").save(rgba_file)
    white = seg.segment(np.full_like(sc.image, 255), classes)
    assert np.array_equal(seg.segment(half, classes), white)
    assert np.array_equal(seg.segment(str(rgba_file), classes), white)
    gray = np.asarray(PILImage.fromarray(sc.image).convert("L"))
    gray_png = tmp_path / "gray.png"
    PILImage.fromarray(gray).save(gray_png)
    as_indexed = decode_image(gray_png.read_bytes(), str(gray_png))  # (H, W, 3), replicated
    expected = seg.segment(as_indexed, classes)
    for form in (
        gray,
        gray[..., None],
        PILImage.fromarray(gray),
        str(gray_png),
        gray.astype(np.uint16) * 257,
    ):
        assert np.array_equal(seg.segment(form, classes), expected)
    with pytest.raises(ValueError, match=r"array of shape \(2, 3, 4, 5\) is not an image"):
        seg.segment(np.zeros((2, 3, 4, 5), np.uint8), classes)

    label_png, overlay_png = write_outputs(sc.image, labels, classes, str(tmp_path / "out/a"))
    from PIL import Image

    back = Image.open(label_png)
    assert back.mode == "P" and np.array_equal(np.asarray(back), labels)
    # one palette: segment's label PNG and overlay use the export's colours (gallery module)
    from fmbseg.tasks.annotate.gallery import class_colours, overlay
    from fmbseg.tasks.annotate.gallery import label_png as export_label_png

    colours = class_colours(len(classes))
    assert back.getpalette()[: 3 * len(classes)] == colours.ravel().tolist()
    assert Path(label_png).read_bytes() == export_label_png(labels, colours)
    drawn = np.asarray(Image.open(overlay_png))[: labels.shape[0]]
    assert np.array_equal(drawn, overlay(sc.image, labels, colours, 0.5))
    assert Image.open(overlay_png).size[0] == 80

    # a committed training fingerprint returns its model without training again
    calls = encoder.calls
    assert run_train(
        world.store, cfg, LABELS_FP, INDEX_FP, list(VOCAB), encoder=encoder, text_model=text_model
    ) == (name, version)
    assert encoder.calls == calls and reg.versions(name) == ["v0001"]


class Stop(Exception):
    pass


def test_resume_after_epoch_k_equals_uninterrupted(tmp_path, encoder, text_model) -> None:
    cfg = tiny_config("train.epochs=3", "train.cache_features=false")
    full = make_world(tmp_path / "a", n_train=6, n_held=0)
    run_train(
        full.store, cfg, LABELS_FP, INDEX_FP, list(VOCAB), encoder=encoder, text_model=text_model
    )
    want, want_card = ModelRegistry(full.store).load("fmbseg-align")

    part = make_world(tmp_path / "b", n_train=6, n_held=0)

    def stop_after_2(done, total):
        if done == 2:
            raise Stop

    with pytest.raises(Stop):
        run_train(
            part.store,
            cfg,
            LABELS_FP,
            INDEX_FP,
            list(VOCAB),
            progress=stop_after_2,
            encoder=encoder,
            text_model=text_model,
        )
    assert ModelRegistry(part.store).versions("fmbseg-align") == []
    events = []
    run_train(
        part.store,
        cfg,
        LABELS_FP,
        INDEX_FP,
        list(VOCAB),
        progress=lambda done, total: events.append((done, total)),
        encoder=encoder,
        text_model=text_model,
    )
    assert events == [(2, 3), (3, 3)]  # resumed after epoch 2: only epoch 3 is run
    got, got_card = ModelRegistry(part.store).load("fmbseg-align")
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert got_card["epoch_losses"] == want_card["epoch_losses"]


def test_card_rebuilds_module_without_other_input(world, encoder, text_model) -> None:
    cfg = tiny_config("train.epochs=1", "train.model_name=seg")
    name, version = run_train(
        world.store, cfg, LABELS_FP, INDEX_FP, list(VOCAB), encoder=encoder, text_model=text_model
    )
    raw = json.loads(world.store.read_bytes(f"models/{name}/{version}/card.json"))
    from fmbseg.models.align import AlignmentConfig, AlignmentModule

    tensors, _ = ModelRegistry(world.store).load(name, version)
    module = AlignmentModule(AlignmentConfig.from_dict(raw["module"]))
    module.load_state_dict(tensors)
    x = torch.randn(1, 16, 32)
    assert module(x).shape == (1, 16, 24)


def test_feature_cache_skips_unreadable_images_and_resumes(tmp_path, encoder) -> None:
    store = ArtifactStore(str(tmp_path / "store"))
    import pyarrow as pa
    from PIL import Image

    ids, uris = [], []
    for i in range(5):
        sc = make_scene(i)
        path = tmp_path / f"{i}.png"
        if i == 3:
            path.write_bytes(b"not an image")
        else:
            Image.fromarray(sc.image).save(path)
        ids.append(sc.image_id)
        uris.append(str(path))
    index = pa.table({"image_id": ids, "uri": uris, "width": [80] * 5, "height": [48] * 5})
    commit_table(store, "index", "idx", index)
    # tiny: 56-pixel crops, 2 per image, 2 per encoder call; the encoder named colour_dino
    cfg = tiny_config("runtime.shard_size=2")
    (job,) = feature_runs(train_run(store, cfg, [("labels", "idx")], VOCAB, encoder=encoder))
    fp = job.fp(feat.STAGE)
    parts = {"encoder": "colour_dino", "weights": None, "input_size": 56, "crops_per_image": 2}
    assert fp == fingerprint(feat.STAGE, "2", parts, {"index": "idx"})
    # an interrupted run left shard 0 written; only shards 1 and 2 are encoded now
    part, _ = feat.FeatureWorker(job).process(0, {"image_ids": ids[:2], "uris": uris[:2]})
    store.write_shard(feat.STAGE, fp, 0, part)
    calls = encoder.calls
    assert run((DINO_FEATURES,), job) == {feat.STAGE: fp}
    assert encoder.calls == calls + 2  # 2 crops per image, 2 crops per call
    errors = store.read_table(feat.STAGE, fp, kind="errors")
    assert errors.column("image_id").to_pylist() == [ids[3]]
    cache = feat.FeatureCache(store, fp)
    assert ids[3] not in cache and ids[4] in cache
    # the cache holds exactly the features of the training crops (48x80 -> 56x93, 2 crops)
    image = make_scene(4).image
    boxes = crop_boxes(ids[4], 48, 80, 56, 2)
    assert len(boxes) == 2 and boxes[0].x0 != boxes[1].x0
    x = crop_inputs(image, boxes, encoder.preprocess, 56)
    want = encoder.patch_features(x).to(torch.float16).numpy()
    for j, box in enumerate(boxes):
        assert cache.box(ids[4], j) == box == CropBox(56, 93, 0, box.x0)
        np.testing.assert_array_equal(cache.get(ids[4], j), want[j])
    with pytest.raises(KeyError, match="no cached features"):
        cache.get(ids[3])


def test_real_tiny_models_from_the_registry_and_card(world) -> None:
    """No injected models: run_train and OpenVocabSegmenter.load build them by name."""
    cfg = tiny_config("train.epochs=1")
    name, version = run_train(world.store, cfg, LABELS_FP, INDEX_FP, list(VOCAB))
    card = ModelRegistry(world.store).card(name, version)
    assert card["encoder"]["name"] == "dinov2_tiny" and card["text"]["name"] == "clip_tiny"
    seg = OpenVocabSegmenter.load(world.store, "latest")
    image = world.held_out[0].image
    sims = seg.similarities(image, ["car", "dog"])
    assert sims.shape == (2, 48, 80) and torch.isfinite(sims).all()
    assert sims.abs().max() <= 1.0 + 1e-5  # cosine similarities
    # the card rebuilds the very encoder the features were cached with
    cache = feat.FeatureCache(world.store, card["data"]["features_fp"])
    sc = world.train[0]
    boxes = crop_boxes(sc.image_id, 48, 80, 56, cfg.train.crops_per_image)
    x = crop_inputs(sc.image, boxes, seg.encoder.preprocess, 56)
    want = seg.encoder.patch_features(x).to(torch.float16).numpy()
    for j in range(len(boxes)):
        got = cache.get(sc.image_id, j).astype(np.float32)
        np.testing.assert_allclose(got, want[j], atol=1e-3)


@pytest.mark.slow
def test_feature_cache_on_ray_actors(world, ray_session) -> None:
    """The feature stage fans out to Ray actors that build dinov2_tiny from the config."""
    cfg = tiny_config("runtime.executor=ray", "train.epochs=1", "runtime.num_workers=1")
    name, version = run_train(world.store, cfg, LABELS_FP, INDEX_FP, list(VOCAB))
    card = ModelRegistry(world.store).card(name, version)
    manifest = world.store.manifest(feat.STAGE, card["data"]["features_fp"])
    assert manifest.num_shards == 2 and manifest.rows == 16 * cfg.train.crops_per_image
    assert card["encoder"]["name"] == "dinov2_tiny" and card["data"]["images"] == 16


def test_training_under_bf16_autocast_learns_and_keeps_float32_weights(
    world, encoder, text_model, monkeypatch
) -> None:
    # What a CUDA run does (bf16 autocast around the encoder and the module, the loss in
    # float32), run under CPU autocast: a dtype mix-up in that path fails here, without a GPU.
    import fmbseg.tasks.train.loop as loop

    calls = []

    def cpu_bf16(device: torch.device) -> torch.autocast:
        calls.append(device.type)
        return torch.autocast("cpu", dtype=torch.bfloat16)

    monkeypatch.setattr(feat, "autocast_for", cpu_bf16)
    monkeypatch.setattr(loop, "autocast_for", cpu_bf16)
    name, version = run_train(
        world.store,
        tiny_config("train.epochs=12"),
        LABELS_FP,
        INDEX_FP,
        list(VOCAB),
        encoder=encoder,
        text_model=text_model,
    )
    assert calls and set(calls) == {"cpu"}
    card = ModelRegistry(world.store).card(name, version)
    assert all(np.isfinite(card["epoch_losses"]))
    assert card["epoch_losses"][-1] < card["epoch_losses"][0]
    seg = OpenVocabSegmenter.load(world.store, "latest", encoder=encoder, text_model=text_model)
    assert all(v.dtype == torch.float32 for v in seg.module.state_dict().values())
    assert pixel_accuracy(seg, world.held_out, list(VOCAB)) >= 0.85
