"""Bad inputs to training and inference fail with errors that say which input and why."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from fmbseg.segment import IncompatibleModelError, OpenVocabSegmenter, write_outputs
from fmbseg.storage import ArtifactStore
from fmbseg.storage.models import ModelNotFoundError, ModelRegistry
from fmbseg.storage.records import MaskRecords, mask_row
from fmbseg.tasks.train.data import EpochOrder, NoLabelledPatchesError
from fmbseg.tasks.train.stages import run_train
from tests.helpers.synthetic import VOCAB, ColourClip, make_scene
from tests.helpers.world import INDEX_FP, LABELS_FP, ColourDino, commit_table
from tests.tasks.train.conftest import tiny_config


def test_no_labelled_patch_says_so_and_counts_images(tmp_path, encoder, text_model) -> None:
    store = ArtifactStore(str(tmp_path / "store"))
    rows, index = [], []
    for i in range(4):
        sc = make_scene(i)
        index.append(
            {"image_id": sc.image_id, "uri": f"/nowhere/{i}.png", "width": 80, "height": 48}
        )
        if i < 3:  # tiny masks: no patch is mostly labelled; image 3 has no mask at all
            speck = np.zeros((48, 80), bool)
            speck[10:13, 10:13] = True
            rows.append(
                mask_row(
                    speck,
                    image_id=sc.image_id,
                    image_uri=f"/nowhere/{i}.png",
                    category_id=2,
                    category="car",
                    source="auto",
                    score=0.9,
                    fingerprint="f",
                )
            )
    commit_table(store, "merge", LABELS_FP, MaskRecords.from_rows(rows).table)
    commit_table(store, "index", INDEX_FP, pa.Table.from_pylist(index))
    with pytest.raises(NoLabelledPatchesError, match=r"no labelled patch.*all 4 images"):
        run_train(
            store,
            tiny_config(),
            LABELS_FP,
            INDEX_FP,
            list(VOCAB),
            encoder=encoder,
            text_model=text_model,
        )


def test_vocabulary_problems(world, encoder, text_model) -> None:
    cfg = tiny_config()
    swapped = ["sky", "grass", *VOCAB[2:]]
    with pytest.raises(ValueError, match="category 'grass' with id 0.*has 'sky'"):
        run_train(
            world.store, cfg, LABELS_FP, INDEX_FP, swapped, encoder=encoder, text_model=text_model
        )
    with pytest.raises(ValueError, match="has nothing"):
        run_train(
            world.store,
            cfg,
            LABELS_FP,
            INDEX_FP,
            list(VOCAB[:3]),
            encoder=encoder,
            text_model=text_model,
        )
    with pytest.raises(ValueError, match="duplicate class names"):
        run_train(
            world.store,
            cfg,
            LABELS_FP,
            INDEX_FP,
            [*VOCAB, "car"],
            encoder=encoder,
            text_model=text_model,
        )
    with pytest.raises(ValueError, match="not a multiple of encoder 'colour_dino'"):
        run_train(
            world.store,
            tiny_config("train.input_size=50"),
            LABELS_FP,
            INDEX_FP,
            list(VOCAB),
            encoder=encoder,
            text_model=text_model,
        )
    with pytest.raises(ValueError, match="out_dim=16 differs"):
        run_train(
            world.store,
            tiny_config("train.out_dim=16"),
            LABELS_FP,
            INDEX_FP,
            list(VOCAB),
            encoder=encoder,
            text_model=text_model,
        )


def test_inference_rejects_incompatible_models_and_bad_classes(
    world, encoder, text_model, tmp_path
) -> None:
    with pytest.raises(ModelNotFoundError, match="no saved versions"):
        OpenVocabSegmenter.load(world.store, "latest", encoder=encoder, text_model=text_model)
    run_train(
        world.store,
        tiny_config("train.epochs=1"),
        LABELS_FP,
        INDEX_FP,
        list(VOCAB),
        encoder=encoder,
        text_model=text_model,
    )
    with pytest.raises(ModelNotFoundError, match="no champion"):
        OpenVocabSegmenter.load(world.store, encoder=encoder, text_model=text_model)

    def load(enc, txt):
        return OpenVocabSegmenter.load(
            world.store, "fmbseg-align:latest", encoder=enc, text_model=txt
        )

    with pytest.raises(IncompatibleModelError, match="encoder 'colour_dino', not 'other'"):
        load(ColourDino(name="other"), text_model)
    with pytest.raises(IncompatibleModelError, match="expects 32-d patch features"):
        load(ColourDino(embed_dim=16), text_model)
    with pytest.raises(IncompatibleModelError, match="24-d text space.*16-d"):
        load(encoder, ColourClip(embed_dim=16))
    txt = ColourClip(embed_dim=24)
    txt.name = "clip_vit_b16"  # type: ignore[attr-defined]
    with pytest.raises(IncompatibleModelError, match="text model 'clip_tiny', not 'clip_vit_b16'"):
        load(encoder, txt)

    seg = load(encoder, text_model)
    image = make_scene(99).image
    with pytest.raises(ValueError, match="non-empty list"):
        seg.segment(image, [])
    with pytest.raises(ValueError, match="duplicate class names"):
        seg.segment(image, ["car", "dog", "car"])
    with pytest.raises(ValueError, match="is not an image: use HxW"):
        seg.segment(np.zeros((4, 4, 5), np.int64), ["car"])
    with pytest.raises(ValueError, match="does not match image"):
        write_outputs(image, np.zeros((4, 4), np.uint8), ["car"], str(tmp_path / "x"))
    with pytest.raises(ValueError, match="label 3 has no class name"):
        write_outputs(image, np.full(image.shape[:2], 3, np.uint8), ["car"], str(tmp_path / "x"))

    ModelRegistry(world.store).save("other", {"w": torch.zeros(1)}, {"kind": "detector"})
    with pytest.raises(IncompatibleModelError, match="not an alignment module"):
        OpenVocabSegmenter.load(world.store, "other:latest", encoder=encoder, text_model=text_model)


def test_epoch_order_depends_only_on_seed_and_epoch() -> None:
    groups = [[0, 1, 2], [3, 4], [5, 6, 7, 8]]
    a, b = EpochOrder(groups, seed=3), EpochOrder(groups, seed=3)
    a.set_epoch(4)
    list(b)  # b's history must not matter
    b.set_epoch(4)
    keys = list(a)
    assert keys == list(b) and all(slot == 0 for _, slot in keys)  # no slots given: crop 0
    order = [i for i, _ in keys]
    assert sorted(order) == list(range(9))
    # shard groups stay contiguous, so a shard is read once per pass
    pos = {i: order.index(i) for i in range(9)}
    for g in groups:
        span = [pos[i] for i in g]
        assert max(span) - min(span) == len(g) - 1
    a.set_epoch(5)
    assert list(a) != keys
