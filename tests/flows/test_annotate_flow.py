"""The ``annotate`` flow under Prefect: stages cached by fingerprint, summary, artifacts, lineage."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from fmbseg.data.vocab import resolve_vocabulary
from fmbseg.flows.annotate import annotate_flow
from fmbseg.storage import ArtifactStore
from tests.helpers.export_helpers import check_semantic_coco
from tests.helpers.synthetic import BUILDS, VOCAB, synthetic_config, write_scenes

N_IMAGES = 6


def _config_file(tmp_path: Path, name: str = "synthetic.yaml", **sections) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(synthetic_config(**sections).to_dict()))
    return str(path)


@pytest.mark.slow
def test_annotate_flow_runs_caches_and_reruns_only_what_changed(
    prefect_harness, tmp_path: Path
) -> None:
    from prefect.settings import PREFECT_API_URL

    write_scenes(tmp_path / "images", N_IMAGES)
    store_dir = str(tmp_path / "store")
    config = _config_file(tmp_path)
    BUILDS.clear()
    state = annotate_flow(
        str(tmp_path / "images"),
        store_dir,
        classes=",".join(VOCAB),
        config=config,
        return_state=True,
    )
    out = state.result()
    fps, summary = out.fingerprints, out.summary
    assert set(fps) == {"index", "clip_dense", "sam_prompt", "sam_auto", "merge", "export"}
    assert summary.images_indexed == N_IMAGES
    assert summary.images_with_masks == N_IMAGES
    assert summary.masks_prompt > 0 and summary.masks_auto > 0
    assert set(summary.classes_found) <= set(VOCAB) and summary.errors == {}
    assert BUILDS == {"clip": 1, "sam": 1}  # one CLIP; one SAM for both SAM stages (one pass)

    store = ArtifactStore(store_dir)
    coco_path = Path(summary.coco.removeprefix("file://"))
    coco = COCO(str(coco_path))
    assert len(coco.imgs) == N_IMAGES
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(VOCAB)
    # merged semantic labels: per image one segment per class of its label map, which
    # tile exactly its labelled pixels (the raw masks are in candidates.json)
    check_semantic_coco(store, f"exports/{fps['export']}", tmp_path)
    candidates = COCO(str(coco_path.parent / "candidates.json"))
    assert len(candidates.anns) == summary.masks_prompt + summary.masks_auto
    ann = coco.anns[coco.getAnnIds()[0]]
    assert int(mask_utils.area(ann["segmentation"])) == ann["area"] > 0
    assert sorted(i["file_name"] for i in coco.dataset["images"]) == sorted(
        p.name for p in (tmp_path / "images").iterdir()
    )
    assert summary.gallery and Path(summary.gallery.removeprefix("file://")).is_file()

    lineage = store.read_run(str(state.state_details.flow_run_id))
    assert lineage["flow"] == "annotate" and lineage["stages"] == fps
    assert lineage["vocabulary"] == list(VOCAB)
    api = PREFECT_API_URL.value()
    table = httpx.get(f"{api}/artifacts/annotate-summary/latest").json()
    assert table["flow_run_id"] == str(state.state_details.flow_run_id)
    rows = {r["what"]: r["value"] for r in json.loads(table["data"])}
    assert rows["images_indexed"] == N_IMAGES  # plain values, not Python reprs
    found = summary.classes_found
    assert rows["classes_found"] == ", ".join(f"{k} {v}" for k, v in found.items())
    assert rows["errors"] == "-"
    gallery = httpx.get(f"{api}/artifacts/annotate-gallery/latest").json()
    assert gallery["type"] == "markdown" and "](data:image/jpeg;base64," in gallery["data"]
    progress = httpx.get(f"{api}/artifacts/sam-auto-progress/latest").json()
    assert progress["data"] == 100.0

    # A changed SAM threshold: sam_auto, merge and export rerun; CLIP and prompting do not.
    BUILDS.clear()
    changed = _config_file(
        tmp_path,
        "changed.yaml",
        sam_auto={
            "pred_iou_thresh": 0.9,
            "stability_score_thresh": 0.92,
            "min_mask_region_area": 10,
            "max_area_fraction": 0.95,
        },
    )
    again = annotate_flow(str(tmp_path / "images"), store_dir, classes=list(VOCAB), config=changed)
    same = {s for s in fps if again.fingerprints[s] == fps[s]}
    assert same == {"index", "clip_dense", "sam_prompt"}
    assert BUILDS == {"sam": 1}
    merged = store.read_table("merge", again.fingerprints["merge"])
    assert sorted(set(merged.column("image_id").to_pylist())) == sorted(
        store.read_table("merge", fps["merge"]).column("image_id").unique().to_pylist()
    )

    # Everything committed: a third run builds no model at all.
    BUILDS.clear()
    third = annotate_flow(str(tmp_path / "images"), store_dir, classes=list(VOCAB), config=changed)
    assert third.fingerprints == again.fingerprints and BUILDS == {}


@pytest.mark.parametrize(
    ("classes", "vocab", "message"),
    [
        ("cat, dog, Cat", None, "duplicate name 'Cat'"),
        ("cat,,dog", None, "name #2 is blank"),
        ("", None, "classes: empty"),
        ([], None, "classes: no class names given"),
        (None, None, "exactly one of"),
        ("cat", "voc-20", "exactly one of"),
        (None, "no-such-vocab", "no-such-vocab"),
    ],
)
def test_bad_vocabulary_fails_before_any_work(classes, vocab, message, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_vocabulary(classes, vocab)
    with pytest.raises(ValueError, match=message):
        annotate_flow.fn(str(tmp_path / "nothing"), str(tmp_path / "store"), classes, vocab)
    assert not (tmp_path / "store").exists()


def test_unknown_image_label_names_fail_both_flows_before_any_work(tmp_path: Path) -> None:
    from fmbseg.data.image_labels import ImageLabelsError
    from fmbseg.flows.annotate_and_train import annotate_and_train_flow

    (tmp_path / "tags.csv").write_text("image,labels\na.png,dog|zebra\n")
    store, tags = str(tmp_path / "store"), str(tmp_path / "tags.csv")
    for flow in (annotate_flow, annotate_and_train_flow):
        with pytest.raises(ImageLabelsError, match="not in the vocabulary: 'zebra' \\(a.png\\)"):
            flow.fn(str(tmp_path / "nothing"), store, "cat,dog", image_labels=tags)
    assert not (tmp_path / "store").exists()


def test_builtin_vocabulary_and_single_class() -> None:
    assert resolve_vocabulary(None, "voc-20")[:3] == ("aeroplane", "bicycle", "bird")
    assert resolve_vocabulary("cat", None) == ("cat",)
    assert resolve_vocabulary("cat,", None) == ("cat",)  # as --vocab "cat," and segment read it
    assert resolve_vocabulary(" cat , dog ,", None) == ("cat", "dog")
    assert resolve_vocabulary(["cat", " dog "], None) == ("cat", "dog")
    assert len(resolve_vocabulary(None, "coco-stuff-171")) == 171
    assert np.all([isinstance(n, str) for n in resolve_vocabulary(None, "ade-150")])


def test_annotate_and_train_refuses_image_labels_with_the_sam3_teacher_before_any_work(
    tmp_path: Path,
) -> None:
    from fmbseg.config import ConfigError
    from fmbseg.flows.annotate_and_train import annotate_and_train_flow

    (stem,) = write_scenes(tmp_path / "images", 1)
    tags = tmp_path / "tags.csv"
    tags.write_text(f"image,labels\n{stem}.png,{VOCAB[0]}\n")
    store = tmp_path / "store"
    with pytest.raises(ConfigError, match="image labels replace CLIP's presence vote"):
        annotate_and_train_flow.fn(
            store=str(store),
            images=str(tmp_path / "images"),
            classes=list(VOCAB),
            image_labels=str(tags),
            config="tiny",
            overrides=["models.teacher=sam3"],
        )
    assert not store.exists()  # refused before the store is opened
