"""Known answer: synthetic scenes through the real stage-1 code reach mIoU >= 0.9, and
deliberate coordinate bugs (x/y swap, crop offsets, stitching) bring it below 0.9.

The stand-ins (tests/synthetic.py) see only pixels: CLIP recognises class colours per
patch, SAM returns the true region under the points. So the score measures the geometry
between them: windows, stitching, grid -> pixel mapping, point order, labels, merge.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from fmbseg.storage import ArtifactStore
from fmbseg.tasks import clip_dense, sam_prompt
from fmbseg.tasks.index import read_index, run_index
from fmbseg.tasks.stage1 import stage1_fingerprints
from tests.synthetic import (
    BUILDS,
    VOCAB,
    ColourClip,
    OracleSam,
    miou,
    run_pipeline,
    synthetic_config,
    write_scenes,
)

torch.set_num_threads(1)
N_IMAGES = 12


def exported_miou(store: ArtifactStore, fp: str, scenes) -> float:
    preds, truths = [], []
    for name, scene in scenes.items():
        rel = f"exports/{fp}/labels/{name}.png"
        pred = (
            np.asarray(Image.open(io.BytesIO(store.read_bytes(rel))))
            if store.exists(rel)
            else np.full(scene.truth.shape, 255, np.uint8)
        )
        preds.append(pred)
        truths.append(scene.truth)
    return miou(preds, truths)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scenes")
    return folder, write_scenes(folder, N_IMAGES)


def _score(tmp_path: Path, world, cfg=None) -> float:
    folder, scenes = world
    store = ArtifactStore(str(tmp_path / "store"))
    fps = run_pipeline(store, cfg or synthetic_config(), folder)
    return exported_miou(store, fps["export"], scenes)


def test_pseudo_labels_of_synthetic_scenes_reach_the_known_answer(tmp_path, world):
    assert _score(tmp_path, world) >= 0.9


def test_x_y_swap_of_the_prompt_points_fails(tmp_path, world, monkeypatch):
    right = sam_prompt.prompt_points
    monkeypatch.setattr(sam_prompt, "prompt_points", lambda *a: right(*a)[:, ::-1].copy())
    assert _score(tmp_path, world) < 0.9


def test_crops_stitched_at_the_wrong_offsets_fail(tmp_path, world, monkeypatch):
    add = clip_dense._Pending.add

    def mirrored(self, index, cls, dense):  # each crop lands at another window's offset
        return add(self, len(self.geo.windows) - 1 - index, cls, dense)

    monkeypatch.setattr(clip_dense._Pending, "add", mirrored)
    assert _score(tmp_path, world) < 0.9


def test_transposed_patch_maps_when_stitching_fail(tmp_path, world, monkeypatch):
    add = clip_dense._Pending.add
    monkeypatch.setattr(
        clip_dense._Pending,
        "add",
        lambda self, i, cls, dense: add(self, i, cls, dense.transpose(1, 2)),
    )
    assert _score(tmp_path, world) < 0.9


def test_changed_sam_threshold_reruns_only_sam_auto_merge_and_export(tmp_path, world):
    folder, scenes = world
    store = ArtifactStore(str(tmp_path / "store"))
    cfg = synthetic_config()
    first = run_pipeline(store, cfg, folder)
    assert stage1_fingerprints(cfg, first["index"], VOCAB) == {
        k: v for k, v in first.items() if k != "index"
    }  # known before running
    builds = BUILDS.copy()
    again = run_pipeline(store, cfg, folder)
    assert again == first and builds == BUILDS  # all committed: nothing rebuilt or rerun
    changed = synthetic_config(sam_auto={**cfg.sam_auto.__dict__, "pred_iou_thresh": 0.5})
    second = run_pipeline(store, changed, folder)
    same = {k for k in first if first[k] == second[k]}
    assert same == {"index", "clip_dense", "sam_prompt"}
    assert BUILDS["clip"] == builds["clip"]  # CLIP was not even built
    assert BUILDS["sam"] == builds["sam"] + 1  # one SAM worker, for sam_auto only
    for stage in ("clip_dense", "sam_prompt"):
        assert len(store.committed_fingerprints(stage)) == 1
    for stage in ("sam_auto", "merge"):
        assert len(store.committed_fingerprints(stage)) == 2
    assert exported_miou(store, second["export"], scenes) >= 0.9


# ---- robustness of the stage shells ---------------------------------------------------------


def _errors(store: ArtifactStore, stage: str, fp: str) -> dict[str, str]:
    t = store.read_table(stage, fp, "errors")
    return (
        {}
        if not t.num_columns
        else {r["image_id"] or r["uri"]: r["error_type"] for r in t.to_pylist()}
    )


def test_failing_images_become_error_rows_and_the_rest_commits(tmp_path, monkeypatch):
    folder = tmp_path / "images"
    scenes = write_scenes(folder, 7)
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(folder / "blank.png")
    cfg = synthetic_config()
    store = ArtifactStore(str(tmp_path / "store"))
    index_fp = run_index(store, str(folder), cfg)
    ids = dict(
        zip(
            [u.rsplit("/", 1)[-1] for u in read_index(store, index_fp)["uri"].to_pylist()],
            read_index(store, index_fp)["image_id"].to_pylist(),
            strict=True,
        )
    )
    # lost after indexing; CLIP fails on blank crops; SAM fails on one image
    (folder / "scene-0001.png").unlink()
    dense = ColourClip.crops_and_dense

    def picky_clip(self, crops):
        if (crops.flatten(1).std(dim=1) == 0).any():
            raise ValueError("stand-in CLIP cannot embed a blank crop")
        return dense(self, crops)

    generate = OracleSam.generate

    def picky_sam(self, image):
        if np.array_equal(image, scenes["scene-0003"].image):
            raise RuntimeError("CUDA out of memory (pretend)")
        return generate(self, image)

    monkeypatch.setattr(ColourClip, "crops_and_dense", picky_clip)
    monkeypatch.setattr(OracleSam, "generate", picky_sam)
    fps = run_pipeline(store, cfg, folder, index_fp)
    assert _errors(store, "clip_dense", fps["clip_dense"]) == {
        ids["scene-0001.png"]: "FileNotFoundError",
        ids["blank.png"]: "ValueError",
    }
    assert _errors(store, "sam_auto", fps["sam_auto"]) == {ids["scene-0003.png"]: "RuntimeError"}
    assert _errors(store, "sam_prompt", fps["sam_prompt"]) == {}
    assert _errors(store, "merge", fps["merge"]) == {
        ids["scene-0001.png"]: "FileNotFoundError",
        ids["blank.png"]: "ValueError",
    }
    merged = store.read_table("merge", fps["merge"])
    assert set(merged["image_id"].to_pylist()) == {ids[f"{k}.png"] for k in scenes} - {
        ids["scene-0001.png"]
    }
    sources = merged.filter(pc.equal(merged["image_id"], ids["scene-0003.png"]))["source"]
    assert set(sources.to_pylist()) == {"prompt"}  # its prompt masks survive the SAM failure
    # the export: every indexed image, and one errors table naming each stage's failures
    base = f"exports/{fps['export']}"
    errors = pq.read_table(io.BytesIO(store.read_bytes(f"{base}/errors.parquet"))).to_pylist()
    assert sorted((e["image_id"], e["stage"], e["error_type"]) for e in errors) == sorted(
        [
            (ids["scene-0001.png"], "clip_dense", "FileNotFoundError"),
            (ids["blank.png"], "clip_dense", "ValueError"),
            (ids["scene-0003.png"], "sam_auto", "RuntimeError"),
        ]
    )
    coco = json.loads(store.read_bytes(f"{base}/annotations.json"))
    status = {i["fmbseg_image_id"]: i["status"] for i in coco["images"]}
    assert len(status) == len(ids)
    assert status[ids["scene-0001.png"]] == status[ids["blank.png"]] == "failed"
    assert status[ids["scene-0003.png"]] == "labelled"


def test_images_with_no_present_class_yield_reasons_not_crashes(tmp_path):
    folder = tmp_path / "images"
    write_scenes(folder, 3)
    cfg = synthetic_config(clip_dense={"short_side": 64, "min_crops": 99})
    store = ArtifactStore(str(tmp_path / "store"))
    fps = run_pipeline(store, cfg, folder)
    for stage in ("sam_prompt", "sam_auto", "merge"):
        assert set(_errors(store, stage, fps[stage]).values()) == {"no_class_present"}
        assert store.require_manifest(stage, fps[stage]).rows == 0
    summary = store.read_json(f"exports/{fps['export']}/export.json")
    assert summary["masks"] == 0 and summary["no_confident_label"] == 3
    assert summary["images"] == 3 and summary["errors"] == 0  # a result, not a failure
    for name in ("scene-0000", "scene-0001", "scene-0002"):  # exported as all-ignore maps
        label = Image.open(
            io.BytesIO(store.read_bytes(f"exports/{fps['export']}/labels/{name}.png"))
        )
        assert set(np.unique(np.asarray(label)).tolist()) == {255}
