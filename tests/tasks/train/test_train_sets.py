"""run_train on several label sets (incremental batches) and from an initial model state."""

from __future__ import annotations

from types import SimpleNamespace

import pyarrow as pa
import pytest
import torch

import fmbseg.tasks.train.features as feat
from fmbseg.config import to_dict
from fmbseg.segment import IncompatibleModelError
from fmbseg.storage.fingerprint import canonical_json, content_hash, fingerprint
from fmbseg.storage.models import ModelRegistry
from fmbseg.storage.records import MaskRecords
from fmbseg.tasks.train.sets import label_sets
from fmbseg.tasks.train.stages import run_train, train_run
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


ENC, TXT = SimpleNamespace(name="enc"), SimpleNamespace(name="txt")  # models by name only


def train_fp(cfg, labels, index=None, init=None, **models) -> str:
    sets = label_sets(labels, index)
    return train_run(None, cfg, sets, list(VOCAB), init, **models).fp("train")


def test_fingerprint_covers_every_pair_in_order_and_the_init() -> None:
    cfg = tiny_config()

    def fp(labels, index=None, init=None):
        return train_fp(cfg, labels, index, init, encoder=ENC, text_model=TXT)

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


def test_train_fingerprint_is_the_one_committed_stores_were_keyed_by() -> None:
    cfg = tiny_config()
    train = {k: v for k, v in to_dict(cfg.train).items() if k != "num_loader_workers"}
    parts = {
        "train": train,
        "encoder": "enc",
        "encoder_weights": None,
        "text": "txt",
        "text_weights": None,
    }
    vocabulary = content_hash(canonical_json(list(VOCAB)).encode())
    one = {"labels": LABELS_FP, "index": INDEX_FP, "vocabulary": vocabulary}
    assert train_fp(cfg, LABELS_FP, INDEX_FP, encoder=ENC, text_model=TXT) == fingerprint(
        "train", "2", parts, one
    )
    pairs = [(LABELS_FP, INDEX_FP), (LABELS_B, INDEX_B)]
    two = {
        "label_sets": canonical_json([list(p) for p in pairs]),
        "init": "fmbseg-align:v0001",
        "vocabulary": vocabulary,
    }
    tuned = train_fp(cfg, pairs, None, "fmbseg-align:v0001", encoder=ENC, text_model=TXT)
    assert tuned == fingerprint("train", "2", parts, two)
    # no prebuilt models: the names cfg.models gives
    named = {**parts, "encoder": "dinov2_tiny", "text": "clip_tiny"}
    assert train_fp(cfg, LABELS_FP, INDEX_FP) == fingerprint("train", "2", named, one)


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
