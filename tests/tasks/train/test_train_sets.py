"""run_train on several label sets (incremental batches) and from an initial model state."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

import fmbseg.tasks.train.features as feat
from fmbseg.segment import IncompatibleModelError
from fmbseg.storage.models import ModelRegistry
from fmbseg.storage.records import MaskRecords
from fmbseg.tasks.train.run import run_train, train_fingerprint
from tests.helpers.synthetic import VOCAB
from tests.helpers.world import INDEX_FP, LABELS_FP, commit_table, records_for
from tests.tasks.train.conftest import tiny_config

LABELS_B, INDEX_B = "labelsbbbbbbbbbb", "indexbbbbbbbbbbb"


def add_second_batch(world) -> list:
    """Batch B: the 6 held-out scenes plus a copy of 2 training scenes (same image ids)."""
    scenes = [*world.held_out, *world.train[:2]]
    rows = [r for sc in scenes for r in records_for(sc, world.uris[sc.image_id])]
    commit_table(world.store, "merge", LABELS_B, MaskRecords.from_rows(rows).table)
    index = [
        {
            "image_id": sc.image_id,
            "uri": world.uris[sc.image_id],
            "width": sc.image.shape[1],
            "height": sc.image.shape[0],
        }
        for sc in scenes
    ]
    commit_table(world.store, "index", INDEX_B, pa.Table.from_pylist(index))
    return scenes


def test_fingerprint_covers_every_pair_in_order_and_the_init() -> None:
    cfg, names = tiny_config(), list(VOCAB)

    def fp(labels, index=None, init=None):
        return train_fingerprint(cfg, "enc", "txt", labels, index, names, init)

    single = fp(LABELS_FP, INDEX_FP)
    assert fp([(LABELS_FP, INDEX_FP)]) == single  # one pair, either form: same fingerprint
    both = fp([(LABELS_FP, INDEX_FP), (LABELS_B, INDEX_B)])
    swapped = fp([(LABELS_B, INDEX_B), (LABELS_FP, INDEX_FP)])
    tuned = fp(LABELS_FP, INDEX_FP, init="fmbseg-align:v0001")
    assert len({single, both, swapped, tuned}) == 4
    with pytest.raises(ValueError, match="index_fp=None"):
        fp([(LABELS_FP, INDEX_FP)], INDEX_FP)
    with pytest.raises(ValueError, match="repeat"):
        fp([(LABELS_FP, INDEX_FP), (LABELS_FP, INDEX_FP)])


def test_union_of_label_sets_and_finetune_from_a_version(world, encoder, text_model) -> None:
    add_second_batch(world)
    cfg = tiny_config("train.epochs=1")
    sets = [(LABELS_FP, INDEX_FP), (LABELS_B, INDEX_B)]
    name, version = run_train(
        world.store, cfg, sets, None, list(VOCAB), encoder=encoder, text_model=text_model
    )
    reg = ModelRegistry(world.store)
    data = reg.card(name, version)["data"]
    # 16 + 6 new images; the 2 copied training scenes train once
    assert data["images"] == 22 and data["init_from"] is None
    assert [(s["labels_fp"], s["index_fp"]) for s in data["label_sets"]] == sets
    feature_fps = [s["features_fp"] for s in data["label_sets"]]
    assert len(set(feature_fps)) == 2
    assert sorted(world.store.committed_fingerprints(feat.STAGE)) == sorted(feature_fps)

    # Fine-tuning with lr 0 keeps the initial weights exactly: they were loaded.
    lr0 = tiny_config("train.epochs=1", "train.lr=0.0", "train.weight_decay=0.0")
    _, tuned = run_train(
        world.store,
        lr0,
        LABELS_FP,
        INDEX_FP,
        list(VOCAB),
        encoder=encoder,
        text_model=text_model,
        init_from=version,
    )
    assert tuned == "v0002"
    assert reg.card(name, tuned)["data"]["init_from"] == f"{name}:{version}"
    start, _ = reg.load(name, version)
    end, _ = reg.load(name, tuned)
    for key, value in start.items():
        assert torch.equal(value, end[key]), key

    wider = tiny_config("train.epochs=1", "train.heads=4")
    with pytest.raises(IncompatibleModelError, match="heads 2 .champion. vs 4 .config."):
        run_train(
            world.store,
            wider,
            LABELS_FP,
            INDEX_FP,
            list(VOCAB),
            encoder=encoder,
            text_model=text_model,
            init_from=f"{name}:{version}",
        )
