"""Known answer: synthetic scenes through the real stage-1 code reach mIoU >= 0.9, and
deliberate coordinate bugs (x/y swap, crop offsets, stitching) bring it below 0.9.

The stand-ins (tests/helpers/synthetic.py) see only pixels: CLIP recognises class colours per
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

import fmbseg.tasks.annotate.clip_dense as clip_dense
import fmbseg.tasks.annotate.sam_prompt as sam_prompt
from fmbseg.storage import ArtifactStore
from fmbseg.tasks.annotate.index import read_index, run_index
from fmbseg.tasks.annotate.stages import stage1_fingerprints
from tests.helpers.synthetic import (
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


# ---- image-level tags (the paper's semi-supervised variant) ---------------------------------


def _small_dog_world(folder: Path) -> np.ndarray:
    """Grass with a 16x16 dog: at most 43% of any 32-px crop (short side 64), so grass wins
    every crop and CLIP's vote misses the dog. Also an image the tags do not name."""
    from tests.helpers.synthetic import PALETTE

    folder.mkdir()
    truth = np.full((48, 96), VOCAB.index("grass"), np.uint8)
    truth[16:32, 40:56] = VOCAB.index("dog")
    colours = np.array(list(PALETTE.values()), np.uint8)
    Image.fromarray(colours[truth]).save(folder / "tagged.png")
    Image.fromarray(colours[np.full_like(truth, VOCAB.index("sky"))]).save(folder / "other.png")
    return truth


def test_a_tag_clip_misses_gets_its_mask(tmp_path):
    from fmbseg.data.image_labels import load_image_labels
    from fmbseg.data.sources import source_root

    truth = _small_dog_world(tmp_path / "imgs")
    dog = truth == VOCAB.index("dog")
    cfg = synthetic_config()

    def dog_label(store, fps) -> np.ndarray:
        rel = f"exports/{fps['export']}/labels/tagged.png"
        return np.asarray(Image.open(io.BytesIO(store.read_bytes(rel))))[dog]

    plain = ArtifactStore(str(tmp_path / "plain"))
    fps = run_pipeline(plain, cfg, tmp_path / "imgs")
    clip = plain.read_table("clip_dense", fps["clip_dense"]).to_pylist()
    tagged_row = next(r for r in clip if r["image_uri"].endswith("tagged.png"))
    assert tagged_row["present"] == [VOCAB.index("grass")]  # the vote misses the dog
    assert tagged_row["votes"][VOCAB.index("dog")] == 0
    assert (dog_label(plain, fps) == VOCAB.index("grass")).all()

    csv = tmp_path / "tags.csv"
    csv.write_text("image,labels\ntagged.png,Grass|dog\n")
    tags = load_image_labels(str(csv), VOCAB).bound_to(source_root(str(tmp_path / "imgs")))
    store = ArtifactStore(str(tmp_path / "tagged"))
    fps2 = run_pipeline(store, cfg, tmp_path / "imgs", image_labels=tags)
    assert fps2["clip_dense"] != fps["clip_dense"] and fps2["index"] == fps["index"]
    (row,) = store.read_table("clip_dense", fps2["clip_dense"]).to_pylist()
    assert row["present"] == [VOCAB.index("grass"), VOCAB.index("dog")]
    assert row["votes"] == tagged_row["votes"]  # the vote is recorded, not used
    prompts = store.read_table("sam_prompt", fps2["sam_prompt"]).to_pylist()
    assert {r["category"] for r in prompts} == {"grass", "dog"}
    assert (dog_label(store, fps2) == VOCAB.index("dog")).mean() > 0.95
    # the image no tag names: a recorded skip, not run through CLIP
    errors = store.read_table("clip_dense", fps2["clip_dense"], kind="errors").to_pylist()
    assert [(e["uri"].rsplit("/", 1)[-1], e["error_type"]) for e in errors] == [
        ("other.png", "no_image_labels")
    ]
    assert "no entry in image labels" in errors[0]["message"]
    meta = store.require_manifest("clip_dense", fps2["clip_dense"]).meta
    assert meta["image_labels"]["file"] == str(csv)
