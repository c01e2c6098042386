"""Pseudo-label quality: prompt-only, auto-only and merged label maps vs. ground truth."""

from __future__ import annotations

import json

import numpy as np
import pytest

import tests.helpers.dataset_trees as trees
from fmbseg.data.datasets import open_dataset
from fmbseg.storage.records import MaskRecords, mask_row
from fmbseg.tasks.evaluate.label_quality import label_maps, pseudo_label_quality
from tests.helpers.standins import ListDataset

VOCAB = ("cat", "dog", "sky")  # the annotation vocabulary; category_id = position


def _mask(rows: slice, cols: slice, shape=(10, 10)) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[rows, cols] = True
    return m


def _row(mask: np.ndarray, name: str, source: str, image_id: str = "a") -> dict:
    return mask_row(
        mask,
        image_id=image_id,
        image_uri=f"mem://{image_id}.png",
        category_id=VOCAB.index(name),
        category=name,
        source=source,
        score=0.9,
        fingerprint="fp",
    )


def _world(background: bool = True):
    truth = np.zeros((10, 10), np.uint8)
    off = 1 if background else 0
    truth[:, :5] = off + 0  # cat
    truth[:, 5:] = off + 1  # dog
    truth[0, :] = 255
    classes = (("background",) if background else ()) + ("cat", "dog")
    ds = ListDataset(
        "toy",
        classes,
        [
            ("a", np.zeros((10, 10, 3), np.uint8), truth),
            ("b", np.zeros((10, 10, 3), np.uint8), truth.copy()),
        ],
        background=0 if background else None,
    )
    rows = [
        _row(_mask(slice(None), slice(0, 5)), "cat", "prompt"),  # exact cat, area 50
        _row(_mask(slice(None), slice(5, None)), "sky", "auto"),  # dog area called sky, area 50
        _row(_mask(slice(1, 3), slice(0, 2)), "dog", "auto"),  # 4 wrong pixels inside the cat
    ]
    return ds, rows


def test_three_label_maps_by_hand():
    ds, rows = _world()
    report = pseudo_label_quality(ds, {"a": rows})
    assert report["num_images"] == 2 and report["images_without_records"] == 1
    assert report["unmatched_categories"] == ["sky"]  # mapped to the dataset's background

    # image "b" has no records: everything there is unlabelled (a miss)
    p = report["prompt"]  # cat exact; dog region unlabelled
    iou = [r["IoU"] for r in p["per_class"]]
    assert iou == [None, 1.0 * 45 / 90, 0.0]  # cat: 45 hits of 90 true pixels (two images)
    assert p["coverage"] == pytest.approx(45 / 180) and p["precision"] == 1.0

    a = report["auto"]  # right half -> background (0), 4 cat pixels called dog
    assert [r["IoU"] for r in a["per_class"]] == [0.0, 0.0, 0.0]
    assert a["coverage"] == pytest.approx(49 / 180) and a["precision"] == 0.0

    m = report["merged"]  # cat (prompt) wins the area tie with sky; small dog painted last
    iou = [r["IoU"] for r in m["per_class"]]
    assert iou[0] == 0.0 and iou[1] == pytest.approx(41 / 90) and iou[2] == 0.0
    assert m["mIoU"] == pytest.approx(41 / 90 / 3)
    assert m["precision"] == pytest.approx(41 / 90)


def test_record_containers_are_equivalent_and_no_background_means_miss():
    ds, rows = _world(background=False)
    recs = MaskRecords.from_rows(rows)
    a = pseudo_label_quality(ds, {"a": recs, "b": recs.table}, limit=2)
    b = pseudo_label_quality(ds, lambda sid: rows)
    for v in ("prompt", "auto", "merged"):
        assert a[v]["confusion"] == b[v]["confusion"]
    # without a background class, "sky" is no prediction: the dog half stays unlabelled
    maps = label_maps(rows, 10, 10, ds.classes, None)
    assert (maps["auto"][:, 5:] == 255).all() and (maps["merged"][:, 5:] == 255).all()
    assert (maps["merged"][1:3, 0:2] == 1).all() and (maps["prompt"][:, :5] == 0).all()
    assert a["merged"]["coverage"] == pytest.approx(0.5)


def test_on_a_real_tree_perfect_records_score_one(tmp_path):
    raw = trees.write_context(str(tmp_path))
    ds = open_dataset("context60", str(tmp_path))
    records = {}
    for sid, lab in raw.items():
        rows = []
        for v in np.unique(lab):
            rows.append(
                mask_row(
                    lab == v,
                    image_id=sid,
                    image_uri=sid,
                    category_id=int(v),
                    category=ds.classes[v],
                    source="prompt",
                    score=1.0,
                    fingerprint="fp",
                )
            )
        records[sid] = rows
    report = pseudo_label_quality(ds, records)
    assert report["prompt"]["mIoU"] == 1.0 and report["merged"]["mIoU"] == 1.0
    assert report["auto"]["coverage"] == 0.0 and report["auto"]["precision"] is None
    present = {int(v) for lab in raw.values() for v in np.unique(lab)}
    assert {
        i for i, r in enumerate(report["merged"]["per_class"]) if r["IoU"] is not None
    } == present


def test_mismatched_record_size_is_an_error():
    ds, rows = _world()
    small = [_row(_mask(slice(None), slice(None), shape=(5, 5)), "cat", "prompt")]
    with pytest.raises(ValueError, match="a mask is 5x5, the image 10x10"):
        pseudo_label_quality(ds, {"a": small})


@pytest.mark.slow
def test_label_quality_stage_compares_the_merge_orders(tmp_path, monkeypatch):
    """The synthetic world with imperfect automatic masks: next to each object's exact
    mask, SAM also returns it grown 3 px into its surroundings (labelled, by its mean CLIP
    similarity, with the object's class). Painting by area lets that grown mask overwrite
    the exact background prompt mask; prompt_first and fill_unlabelled do not."""
    from PIL import Image
    from scipy import ndimage

    from fmbseg.config import replace
    from fmbseg.engine.stage import run
    from fmbseg.storage import ArtifactStore
    from fmbseg.tasks.evaluate.label_quality_stage import build_label_report
    from fmbseg.tasks.evaluate.stages import LABEL_QUALITY, plan_label_quality
    from tests.helpers.synthetic import VOCAB as WORLD
    from tests.helpers.synthetic import (
        OracleSam,
        _sam_record,
        run_pipeline,
        synthetic_config,
        write_scenes,
    )

    exact = OracleSam.generate

    def bleeding(self, image):
        out = exact(self, image)
        background = np.bincount(self.regions.ravel()).argmax()
        for r in range(1, int(self.regions.max()) + 1):
            if r != background:
                grown = ndimage.binary_dilation(self.regions == r, iterations=3)
                out.append(_sam_record(grown, 0.96, 0.97))
        return out

    monkeypatch.setattr(OracleSam, "generate", bleeding)
    ds = tmp_path / "ds"
    scenes = write_scenes(ds / "images", 6)
    (ds / "labels").mkdir()
    for sid, scene in scenes.items():
        Image.fromarray(scene.truth).save(ds / "labels" / f"{sid}.png")
    (ds / "classes.txt").write_text("\n".join(WORLD) + "\n")
    store = ArtifactStore(str(tmp_path / "store"))
    reports = {}
    for order in ("area", "prompt_first", "fill_unlabelled"):
        cfg = replace(synthetic_config(), merge={"order": order})
        fps = run_pipeline(store, cfg, ds / "images")
        job = plan_label_quality(store, "folder", str(ds), fps["merge"], cfg)
        run((LABEL_QUALITY,), job)
        reports[order] = build_label_report(job)
        assert reports[order]["merge_order"] == order
    merged = {o: r["merged"] for o, r in reports.items()}
    # the same masks, painted three ways: the same pixels labelled, not the same labels
    assert len({m["coverage"] for m in merged.values()}) == 1
    assert merged["prompt_first"]["mIoU"] > merged["fill_unlabelled"]["mIoU"]
    assert merged["fill_unlabelled"]["mIoU"] > merged["area"]["mIoU"] + 0.03
    assert merged["prompt_first"]["precision"] > merged["area"]["precision"]
    prompt = {r["prompt"]["mIoU"] for r in reports.values()}
    assert len(prompt) == 1  # prompt masks never overlap here: every order agrees


def _build_bleeding_sam(weights, device, **kwargs):
    """A second teacher: the oracle, plus a 3-px-dilated copy of every region (masks that
    bleed into their neighbours), so the two teachers score differently."""
    from scipy import ndimage

    from tests.helpers.synthetic import OracleSam, _sam_record

    class BleedingSam(OracleSam):
        def generate(self, image):
            out = super().generate(image)
            background = np.bincount(self.regions.ravel()).argmax()
            for r in range(1, int(self.regions.max()) + 1):
                if r != background:
                    grown = ndimage.binary_dilation(self.regions == r, iterations=3)
                    out.append(_sam_record(grown, 0.96, 0.97))
            return out

    return BleedingSam()


def test_teachers_side_by_side_from_their_sam_stages(tmp_path):
    """Three teachers (two models.sam, and SAM 3) annotate the same benchmark images: each
    column holds its single-teacher report's figures, its teacher from the SAM stages' (or
    the sam3 stage's) manifests, masks per image as the merge records of the scored images,
    and images/s from the recorded time."""
    from PIL import Image

    from fmbseg.config import replace
    from fmbseg.engine.stage import run
    from fmbseg.models.registry import register_model
    from fmbseg.storage import ArtifactStore
    from fmbseg.storage.fingerprint import content_hash
    from fmbseg.tasks.evaluate.label_quality_stage import (
        build_label_report,
        compare_teachers,
        teacher_of,
    )
    from fmbseg.tasks.evaluate.stages import LABEL_QUALITY, plan_label_quality
    from tests.helpers.synthetic import (
        SAM3_NAME,
        SAM_NAME,
        run_pipeline,
        synthetic_config,
        write_scenes,
    )
    from tests.helpers.synthetic import VOCAB as WORLD

    register_model("synthetic_bleeding_sam", "sam", _build_bleeding_sam, "test: bleeding SAM")
    ds = tmp_path / "ds"
    scenes = write_scenes(ds / "images", 6)
    (ds / "labels").mkdir()
    for sid, scene in scenes.items():
        Image.fromarray(scene.truth).save(ds / "labels" / f"{sid}.png")
    (ds / "classes.txt").write_text("\n".join(WORLD) + "\n")
    store = ArtifactStore(str(tmp_path / "store"))
    reports, runs = [], []
    teachers = [{"sam": SAM_NAME}, {"sam": "synthetic_bleeding_sam"}, {"teacher": "sam3"}]
    for models in teachers:
        cfg = replace(synthetic_config(), models=models)
        fps = run_pipeline(store, cfg, ds / "images")
        job = plan_label_quality(store, "folder", str(ds), fps["merge"], cfg, limit=4)
        run((LABEL_QUALITY,), job)
        reports.append(build_label_report(job))
        runs.append(fps)
    table = compare_teachers(reports)
    assert [r["teacher"] for r in table["teachers"]] == [
        SAM_NAME,
        "synthetic_bleeding_sam",
        SAM3_NAME,
    ]
    assert table["num_images"] == 4 and table["reports"] == reports
    scored = {
        content_hash((ds / "images" / f"{sid}.png").read_bytes()) for sid in sorted(scenes)[:4]
    }
    for row, report, fps in zip(table["teachers"], reports, runs, strict=True):
        assert row["labels"] == fps["merge"] and row["unavailable"] is None
        assert row["mIoU"] == report["merged"]["mIoU"]
        assert row["coverage"] == report["merged"]["coverage"] > 0
        merged = store.read_table("merge", fps["merge"]).to_pylist()
        assert row["masks_per_image"] == sum(r["image_id"] in scored for r in merged) / 4
        # the SAM stages ran in one pass (its time is theirs); SAM 3 is one stage
        stages = ("sam3",) if "sam3" in fps else ("sam_prompt", "sam_auto")
        times = [store.require_manifest(s, fps[s]).meta["timing"] for s in stages]
        assert all(t["outputs"] == {s: fps[s] for s in stages} for t in times)
        assert all(t["shards_run"] == t["shards"] == 2 for t in times)
        seconds = times[0]["wall_s"]
        assert row["images_per_second"] == 6 / seconds  # 6 images indexed
        assert report["teacher"]["sam_seconds"] == seconds
    oracle, bleeding, sam3 = table["teachers"]
    assert sam3["mIoU"] > bleeding["mIoU"] and sam3["coverage"] > 0
    assert (
        oracle["mIoU"] > bleeding["mIoU"]
        and bleeding["masks_per_image"] > oracle["masks_per_image"]
    )

    # a figure that cannot be known is None, with the reason; never a guess
    def set_meta(stage: str, fp: str, **meta) -> None:  # as an older version committed it
        path = tmp_path / "store" / "stages" / stage / fp / "_manifest.json"
        manifest = json.loads(path.read_text())
        path.write_text(json.dumps({**manifest, "meta": meta}))

    first = {s: store.require_manifest(s, runs[0][s]).meta for s in ("sam_prompt", "sam_auto")}
    shared = {
        **first["sam_prompt"]["timing"],
        "outputs": {"sam_prompt": runs[0]["sam_prompt"], "sam_auto": "x"},
    }
    set_meta("sam_prompt", runs[0]["sam_prompt"], **{**first["sam_prompt"], "timing": shared})
    got = teacher_of(store, runs[0]["merge"])
    assert got["sam"] == SAM_NAME and got["images_per_second"] is None
    assert got["unavailable"] == "a SAM pass also made another output: its time is shared"
    resumed = {**first["sam_prompt"]["timing"], "shards_run": 1}
    set_meta("sam_prompt", runs[0]["sam_prompt"], **{**first["sam_prompt"], "timing": resumed})
    got = teacher_of(store, runs[0]["merge"])
    assert got["sam"] == SAM_NAME and got["images_per_second"] is None
    assert got["unavailable"] == "SAM stages resumed: their wall time covers part of the images"
    for stage in ("sam_prompt", "sam_auto"):
        set_meta(stage, runs[0][stage], vocabulary=list(WORLD))
    got = teacher_of(store, runs[0]["merge"])
    assert got["sam"] is None and got["images_per_second"] is None
    assert got["unavailable"] == "teacher not recorded (SAM stages made before it was)"
    sam3_meta = store.require_manifest("sam3", runs[2]["sam3"]).meta
    set_meta(
        "sam3", runs[2]["sam3"], **{**sam3_meta, "timing": {**sam3_meta["timing"], "shards_run": 1}}
    )
    got = teacher_of(store, runs[2]["merge"])
    assert got["sam"] == SAM3_NAME and got["images_per_second"] is None
    assert got["unavailable"] == "sam3 resumed: its wall time covers part of the images"
