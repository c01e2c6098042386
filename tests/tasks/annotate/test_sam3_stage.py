"""The SAM 3 teacher (``models.teacher: sam3``) through the engine: sam3 -> merge -> export.

The synthetic world's stand-in SAM 3 (tests.helpers.synthetic.OracleSam3) returns each class
name's colour regions, so the label maps have a known answer. The real ``sam3`` package is
exercised in tests/models/test_sam3.py where it is installed.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tests.helpers.synthetic as synthetic
from fmbseg.config import ConfigError, replace
from fmbseg.models.registry import MissingExtraError
from fmbseg.storage import ArtifactStore
from fmbseg.tasks.annotate.export import image_names
from fmbseg.tasks.annotate.stages import check_teacher, stage1_fingerprints
from tests.helpers.export_helpers import check_semantic_coco
from tests.helpers.synthetic import VOCAB, miou, run_pipeline, synthetic_config, write_scenes

SAM3 = synthetic_config(models={"teacher": "sam3"})


def _labels(store: ArtifactStore, export_fp: str, names: list[str]) -> dict[str, np.ndarray]:
    base = f"exports/{export_fp}/labels"
    return {
        n: np.asarray(Image.open(io.BytesIO(store.read_bytes(f"{base}/{n}.png")))) for n in names
    }


def test_sam3_teacher_labels_the_world_and_exports_it_the_same_way(tmp_path: Path) -> None:
    scenes = write_scenes(tmp_path / "images", 6)
    Image.fromarray(np.full((48, 96, 3), 255, np.uint8)).save(tmp_path / "images" / "blank.png")
    store = ArtifactStore(str(tmp_path / "store"))
    sets: list[int] = []
    set_image = synthetic.OracleSam3.set_image

    def counting(self, image):
        sets.append(1)
        return set_image(self, image)

    synthetic.BUILDS.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(synthetic.OracleSam3, "set_image", counting)
        fps = run_pipeline(store, SAM3, tmp_path / "images")

    assert set(fps) == {"index", "sam3", "merge", "export"}  # no CLIP, no SAM stages
    assert synthetic.BUILDS == {"sam3": 1}  # one worker, SAM 3 built once
    assert len(sets) == 7  # each image encoded once for all six class names
    records = store.read_table("sam3", fps["sam3"])
    assert set(records.column("source").to_pylist()) == {"sam3"}
    assert set(records.column("fingerprint").to_pylist()) == {fps["sam3"]}
    errors = store.read_table("sam3", fps["sam3"], "errors").to_pylist()
    assert [(e["uri"].rsplit("/", 1)[-1], e["error_type"]) for e in errors] == [
        ("blank.png", "no_class_present")
    ]
    meta = store.require_manifest("sam3", fps["sam3"]).meta
    assert meta["vocabulary"] == list(VOCAB)
    assert meta["models"] == {"sam3": synthetic.SAM3_NAME, "sam3_weights": None}
    assert store.require_manifest("merge", fps["merge"]).meta["sam3"] == fps["sam3"]

    # the label maps are the world's truth (the stand-in returns exact regions)
    names = sorted(scenes)
    maps = _labels(store, fps["export"], image_names([f"{n}.png" for n in names], names))
    got = [maps[n] for n in names]
    assert miou(got, [scenes[n].truth for n in names]) > 0.97
    blank = _labels(store, fps["export"], ["blank"])["blank"]
    assert (blank == 255).all()  # no class found: exported with no label, not a failure
    export = store.read_json(f"exports/{fps['export']}/export.json")
    assert (export["labelled_images"], export["no_confident_label"]) == (6, 1)
    check_semantic_coco(store, f"exports/{fps['export']}", tmp_path)

    synthetic.BUILDS.clear()
    assert run_pipeline(store, SAM3, tmp_path / "images") == fps  # committed: reused
    assert not synthetic.BUILDS


def test_sam3_fingerprints_cover_its_config_and_not_the_clip_sam_stages() -> None:
    base = stage1_fingerprints(SAM3, "idx", VOCAB)
    assert set(base) == {"sam3", "merge", "export"}
    assert base["merge"] != stage1_fingerprints(synthetic_config(), "idx", VOCAB)["merge"]
    stricter = replace(SAM3, sam3={"presence_threshold": 0.8})
    assert all(stage1_fingerprints(stricter, "idx", VOCAB)[s] != base[s] for s in base)
    other = replace(SAM3, sam_auto={"pred_iou_thresh": 0.5}, clip_dense={"short_side": 96})
    assert stage1_fingerprints(other, "idx", VOCAB) == base
    renamed = stage1_fingerprints(SAM3, "idx", (*VOCAB[:-1], "street"))
    assert all(renamed[s] != base[s] for s in base)


def test_check_teacher_refuses_image_labels_and_a_missing_package(hide_package) -> None:
    with pytest.raises(ConfigError, match="image labels replace CLIP's presence vote"):
        check_teacher(SAM3, image_labels=object())
    check_teacher(synthetic_config(), image_labels=object())  # the CLIP teacher takes them
    hide_package("sam3")
    with pytest.raises(MissingExtraError, match=r"sam3"):
        check_teacher(replace(SAM3, models={"sam3": "sam3_tiny"}))
    check_teacher(SAM3)  # the stand-in needs no package
