"""The declared evaluation stages keep the fingerprints their committed outputs carry."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import tests.helpers.dataset_trees as trees
from fmbseg.config import load_config
from fmbseg.data.datasets import open_dataset
from fmbseg.storage import ArtifactStore
from fmbseg.storage.fingerprint import fingerprint
from fmbseg.tasks.evaluate.stage import resolve_model
from fmbseg.tasks.evaluate.stages import plan_evaluation, plan_label_quality


def test_evaluate_fingerprint_is_pinned(tmp_path: Path) -> None:
    root = str(tmp_path / "data")
    trees.write_voc(root)
    cfg, store = load_config("tiny"), ArtifactStore(str(tmp_path / "store"))
    job = plan_evaluation(store, "voc21", root, "maskclip", cfg, limit=2)
    ev = asdict(cfg.evaluate)
    ev.pop("batch_size")
    parts = {
        "dataset": "voc21",
        "data_root": root,
        "samples": open_dataset("voc21", root).subset(range(2)).files_digest(),
        "limit": 2,
        "evaluate": ev,
        "model": resolve_model(store, "maskclip", cfg).identity(),
    }
    assert job.fps == {"evaluate": fingerprint("evaluate", "2", parts)}


def test_label_quality_fingerprint_is_pinned(tmp_path: Path) -> None:
    root = str(tmp_path / "data")
    trees.write_voc(root)
    cfg, store = load_config("tiny"), ArtifactStore(str(tmp_path / "store"))
    store.commit("merge", "labels0000000000", 0)
    job = plan_label_quality(store, "voc21", root, "labels0000000000", cfg)
    samples = open_dataset("voc21", root).files_digest(images=False)
    parts = {"dataset": "voc21", "data_root": root, "samples": samples, "limit": None}
    expected = fingerprint("label_quality", "2", parts, {"merge": "labels0000000000"})
    assert job.fps == {"merge": "labels0000000000", "label_quality": expected}
