"""The ``evaluate`` flow: sharded evaluation merges exactly, reports, caching, registry models."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

import tests.helpers.dataset_trees as trees
from fmbseg.config import load_config
from fmbseg.data.datasets import DatasetError, open_dataset
from fmbseg.flows.evaluate import evaluate_flow
from fmbseg.storage import ArtifactStore
from fmbseg.storage.models import ModelNotFoundError, ModelRegistry
from fmbseg.tasks.evaluate.predictors import AlignmentPredictor, DenseClipPredictor
from fmbseg.tasks.evaluate.protocol import evaluate_dataset
from fmbseg.tasks.evaluate.stage import STAGE

LOCAL = ["runtime.executor=local", "runtime.shard_size=1"]
REPORT_KEYS = {
    "dataset",
    "data_root",
    "limit",
    "model",
    "model_ref",
    "fingerprint",
    "num_images",
    "images_failed",
    "mIoU",
    "mAcc",
    "aAcc",
    "pixel_accuracy",
    "per_class",
    "confusion",
    "pixels",
    "coverage",
    "background",
    "prompt_names",
    "templates",
    "protocol",
    "seconds",
    "images_per_second",
    "dataset_description",
    "background_names",
}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture
def voc_root(tmp_path: Path) -> str:
    root = tmp_path / "data"
    trees.write_voc(str(root))
    return str(root)


def _single_process(predictor: Any, root: str, limit: int | None = None) -> dict[str, Any]:
    return evaluate_dataset(predictor, open_dataset("voc21", root), load_config("tiny"), limit)


def _maskclip() -> DenseClipPredictor:
    from fmbseg.models import build_model

    return DenseClipPredictor(build_model("clip_tiny", None, "cpu", mode="maskclip"))


def _stage_files(store_dir: str) -> dict[str, int]:
    out = {}
    for folder, _, files in os.walk(Path(store_dir) / "stages"):
        for name in files:
            out[os.path.join(folder, name)] = os.stat(os.path.join(folder, name)).st_mtime_ns
    return out


@pytest.mark.slow
def test_sharded_ray_evaluation_equals_single_process_and_is_cached(
    prefect_harness, ray_session, voc_root: str, tmp_path: Path
) -> None:
    from prefect.settings import PREFECT_API_URL

    store_dir = str(tmp_path / "store")
    state = evaluate_flow(
        "voc21",
        voc_root,
        "maskclip",
        store_dir,
        "tiny",
        ["runtime.shard_size=1"],
        return_state=True,
    )
    report = state.result()  # tiny: Ray executor, one actor; 3 images -> 3 shards
    expected = _single_process(_maskclip(), voc_root)
    assert report.confusion == expected["confusion"]  # exact: counts add across shards
    assert report.mIoU == expected["mIoU"] and report.per_class == expected["per_class"]
    assert set(report.json) == REPORT_KEYS
    assert report.num_images == 3 and report.images_failed == 0
    assert report.dataset == "voc21" and report.model == "maskclip"
    assert report.model_ref["clip"] == "clip_tiny"
    assert report.json["dataset_description"] == "PASCAL VOC 2012 val, 20 classes + background"
    assert report.json["background"] == "stuff_names" and report.json["background_names"] == "clean"

    store = ArtifactStore(store_dir)
    fp = report.fingerprint
    assert store.require_manifest(STAGE, fp).num_shards == 3
    assert report.report_uris == (store.url(f"evaluations/{fp}/report.json"),)
    assert store.read_json(f"evaluations/{fp}/report.json") == report.json
    assert report.json["confusion"] == expected["confusion"] and report.json["mIoU"] == report.mIoU
    run_id = str(state.state_details.flow_run_id)
    lineage = store.read_run(run_id)
    assert lineage["stages"] == {STAGE: fp} and lineage["model"]["mode"] == "maskclip"
    api = PREFECT_API_URL.value()
    latest = {
        k: httpx.get(f"{api}/artifacts/{k}/latest").json()
        for k in ("evaluate-progress", "evaluate-results", "evaluate-per-class")
    }
    assert {a["flow_run_id"] for a in latest.values()} == {run_id}
    assert latest["evaluate-progress"]["data"] == 100.0
    table = json.loads(latest["evaluate-results"]["data"])
    assert table[0]["mIoU"] == report.mIoU and table[0]["images"] == 3
    assert "| aeroplane |" in latest["evaluate-per-class"]["data"]

    before = _stage_files(store_dir)
    again = evaluate_flow(
        "voc21", voc_root, "maskclip", store_dir, "tiny", ["runtime.shard_size=1"]
    )
    assert _stage_files(store_dir) == before  # cache hit: no shard rewritten
    assert again.fingerprint == fp and again.confusion == report.confusion


@pytest.mark.slow
def test_limit_sharding_and_unreadable_images(
    prefect_harness, voc_root: str, tmp_path: Path
) -> None:
    store_dir = str(tmp_path / "store")
    full = evaluate_flow("voc21", voc_root, "maskclip", store_dir, "tiny", LOCAL)
    two = evaluate_flow("voc21", voc_root, "maskclip", store_dir, "tiny", LOCAL, limit=2)
    assert two.num_images == 2 and two.json["limit"] == 2
    assert two.fingerprint != full.fingerprint
    assert two.confusion == _single_process(_maskclip(), voc_root, limit=2)["confusion"]
    # shard size does not change the numbers, nor the fingerprint (a cache hit)
    wide = evaluate_flow(
        "voc21",
        voc_root,
        "maskclip",
        store_dir,
        "tiny",
        ["runtime.executor=local", "runtime.shard_size=8"],
    )
    assert wide.fingerprint == full.fingerprint and wide.confusion == full.confusion

    jpg = Path(voc_root) / "VOCdevkit/VOC2012/JPEGImages/2007_000042.jpg"
    jpg.write_bytes(b"not a jpeg")
    # an image edited in place is evaluated again, in the same store: not the cached report
    broken = evaluate_flow("voc21", voc_root, "maskclip", store_dir, "tiny", LOCAL)
    assert broken.fingerprint != full.fingerprint
    assert broken.num_images == 2 and broken.images_failed == 1
    errors = ArtifactStore(store_dir).read_table(STAGE, broken.fingerprint, kind="errors")
    assert errors["image_id"].to_pylist() == ["2007_000042"]
    assert errors["uri"][0].as_py() == f"file://{jpg}"
    assert "cannot decode image JPEGImages/2007_000042.jpg" in errors["message"][0].as_py()


def _save_tiny_alignment(store: ArtifactStore, name: str = "seg") -> str:
    from fmbseg.models import build_model
    from fmbseg.models.align import AlignmentConfig, AlignmentModule
    from fmbseg.tasks.train.run import CARD_KIND

    dino = build_model("dinov2_tiny", None, "cpu", img_size=56)
    clip = build_model("clip_tiny", None, "cpu")
    torch.manual_seed(0)
    mcfg = AlignmentConfig(in_dim=dino.embed_dim, out_dim=clip.embed_dim, heads=2)
    module = AlignmentModule(mcfg)
    card = {
        "kind": CARD_KIND,
        "module": mcfg.to_dict(),
        "encoder": {"name": dino.name, "weights": None, "input_size": 56},
        "text": {
            "name": clip.name,
            "weights": None,
            "quick_gelu": None,
            "templates": ["a photo of a {}."],
        },
        "metrics": {"final_loss": 1.5},
    }
    return ModelRegistry(store).save(name, dict(module.state_dict()), card)


@pytest.mark.slow
def test_registry_champion_report_next_to_its_card(
    prefect_harness, voc_root: str, tmp_path: Path
) -> None:
    from fmbseg.segment import OpenVocabSegmenter

    store_dir = str(tmp_path / "store")
    store = ArtifactStore(store_dir)
    with pytest.raises(ModelNotFoundError, match="model 'seg' has no champion"):
        evaluate_flow("voc21", voc_root, "champion", store_dir, "tiny", LOCAL, model_name="seg")
    v1 = _save_tiny_alignment(store)
    ModelRegistry(store).promote("seg", v1, "first")
    report = evaluate_flow(
        "voc21", voc_root, "champion", store_dir, "tiny", LOCAL, model_name="seg", limit=2
    )
    seg = OpenVocabSegmenter.load(store, "seg:v0001", device="cpu")
    expected = _single_process(AlignmentPredictor.from_segmenter(seg), voc_root, limit=2)
    assert report.confusion == expected["confusion"]
    assert report.model == "seg:v0001"
    assert report.model_ref == {
        "kind": "registry",
        "name": "seg",
        "version": "v0001",
        "uri": store.url("models/seg/v0001"),
    }
    assert report.report_uris[0] == store.url("models/seg/v0001/eval/voc21-limit2.json")
    assert store.read_json("models/seg/v0001/eval/voc21-limit2.json") == report.json
    assert report.json["mIoU"] == report.mIoU
    card = ModelRegistry(store).card("seg", "v0001")
    assert card["metrics"] == {"final_loss": 1.5, "mIoU/voc21-limit2": report.mIoU}
    assert card["evaluations"]["voc21-limit2"]["fingerprint"] == report.fingerprint
    # the fingerprint names the resolved version, not the word "champion"
    same = evaluate_flow("voc21", voc_root, "seg:v0001", store_dir, "tiny", LOCAL, limit=2)
    assert same.fingerprint == report.fingerprint
    v2 = _save_tiny_alignment(store)
    ModelRegistry(store).promote("seg", v2, "second")
    other = evaluate_flow(
        "voc21", voc_root, "champion", store_dir, "tiny", LOCAL, model_name="seg", limit=2
    )
    assert other.model == "seg:v0002" and other.fingerprint != report.fingerprint


@pytest.mark.slow
@pytest.mark.parametrize(
    ("dataset", "sub", "message"),
    [
        ("voc21", "nowhere", "voc21 root {root}: directory not found"),
        ("voc21", "", "voc21 root {root}: ImageSets/Segmentation/val.txt not found"),
        ("pascal-voc-2099", "", "unknown dataset 'pascal-voc-2099'; known: ade20k"),
    ],
)
def test_bad_dataset_inputs_fail_before_any_work(
    prefect_harness, tmp_path: Path, dataset: str, sub: str, message: str
) -> None:
    root = str(tmp_path / sub) if sub else str(tmp_path)
    with pytest.raises(DatasetError) as info:
        evaluate_flow(dataset, root, "maskclip", str(tmp_path / "store"), "tiny", LOCAL)
    assert message.format(root=root) in str(info.value)
    assert not (tmp_path / "store" / "stages").exists()


def _commit_labels(
    store: ArtifactStore, root: str, fp: str = "labels0000000000", **meta: Any
) -> dict:
    """Pseudo-labels of the first two VOC images as the merge stage commits them (2 shards,
    annotated from another folder: matched by content): person exact (prompt), aeroplane
    exact (auto), tvmonitor called "sky" (auto; no VOC class -> background)."""
    from fmbseg.storage.fingerprint import content_hash
    from fmbseg.storage.records import MaskRecords, mask_row

    ds = open_dataset("voc21", root)
    by_sid = {}
    for shard, sample in enumerate(ds.samples[:2]):
        data = (Path(root) / "VOCdevkit/VOC2012" / sample.image).read_bytes()
        lab = ds.load_label(sample)
        rows = [
            mask_row(
                lab == value,
                image_id=content_hash(data),
                category_id=cid,
                image_uri=f"file:///elsewhere/{sample.sample_id}.jpg",
                category=name,
                source=source,
                score=0.9,
                fingerprint=fp,
            )
            for value, cid, name, source in (
                (15, 0, "person", "prompt"),
                (1, 1, "aeroplane", "auto"),
                (20, 2, "sky", "auto"),
            )
        ]
        store.write_shard("merge", fp, shard, MaskRecords.from_rows(rows).table)
        by_sid[sample.sample_id] = rows
    store.commit("merge", fp, 2, meta={"vocabulary": ["person", "aeroplane", "sky"], **meta})
    return by_sid


@pytest.mark.slow
def test_pseudo_label_quality_through_the_evaluate_flow(
    prefect_harness, voc_root: str, tmp_path: Path
) -> None:
    from fmbseg.tasks.evaluate.label_quality import pseudo_label_quality

    store_dir = str(tmp_path / "store")
    store = ArtifactStore(store_dir)
    by_sid = _commit_labels(store, voc_root)
    report = evaluate_flow("voc21", voc_root, "labels:latest", store_dir, "tiny", LOCAL)
    expected = pseudo_label_quality(open_dataset("voc21", voc_root), by_sid)
    for v in ("prompt", "auto", "merged"):
        # 3 shards, merged exactly
        assert report.variant(v)["confusion"] == expected[v]["confusion"]
    assert report.num_images == 3 and report.images_without_records == 1
    assert report.unmatched_categories == ["sky"] and report.labels == "labels0000000000"
    labels = [lab for _, lab in open_dataset("voc21", voc_root).iter_labels()]

    def share_in_first_two(value: int) -> float:  # exact masks there, none on image 3
        counts = [int((lab == value).sum()) for lab in labels]
        return sum(counts[:2]) / sum(counts)

    share = {"person": share_in_first_two(15), "aeroplane": share_in_first_two(1)}
    iou = {r["class"]: r["IoU"] for r in report.merged["per_class"]}
    assert iou["person"] == share["person"] and iou["aeroplane"] == share["aeroplane"]
    assert 0 < share["person"] < 1 and iou["tvmonitor"] == 0.0
    assert {r["class"]: r["IoU"] for r in report.prompt["per_class"]}["aeroplane"] == 0.0
    assert report.merged["precision"] < 1.0  # tvmonitor pixels labelled background
    uri = store.url(f"evaluations/{report.fingerprint}/report.json")
    assert report.report_uris == (uri,)
    assert store.read_json(f"evaluations/{report.fingerprint}/report.json") == report.json
    before = _stage_files(store_dir)
    again = evaluate_flow("voc21", voc_root, "labels:labels0000000000", store_dir, "tiny", LOCAL)
    assert again.fingerprint == report.fingerprint  # same merge output: a cache hit
    assert _stage_files(store_dir) == before


@pytest.mark.slow
def test_sam_and_sam21_side_by_side_through_the_evaluate_flow(
    prefect_harness, voc_root: str, tmp_path: Path
) -> None:
    """The split's images annotated by both tiny teachers (same store, same index and CLIP
    output; only models.sam differs), then `labels:A,labels:B`: one column per teacher."""
    from fmbseg.config import replace
    from fmbseg.storage.fingerprint import content_hash
    from fmbseg.tasks.annotate.index import run_index
    from fmbseg.tasks.annotate.stages import SAM_PASS, run_declared

    store_dir = str(tmp_path / "store")
    store = ArtifactStore(store_dir)
    images = Path(voc_root) / "VOCdevkit/VOC2012/JPEGImages"  # 3 val images + 1 train image
    val_ids = ("2007_000033", "2007_000042", "2008_000002")
    tiny = replace(load_config("tiny"), runtime={"executor": "local", "shard_size": 2})
    index = run_index(store, str(images), tiny)
    vocab = ("person", "aeroplane", "tvmonitor", "sky")
    clip = run_declared(store, tiny, "clip_dense", {"index": index}, vocabulary=vocab)["clip_dense"]
    merges, sam_fps = {}, {}
    for sam in ("sam_tiny", "sam2.1_tiny"):
        cfg = replace(tiny, models={"sam": sam})
        sam_fps[sam] = run_declared(store, cfg, SAM_PASS, {"clip_dense": clip})
        inputs = {"index": index, "clip_dense": clip, **sam_fps[sam]}
        merges[sam] = run_declared(store, cfg, "merge", inputs)["merge"]
    model = f"labels:{merges['sam_tiny']},labels:{merges['sam2.1_tiny']}"
    report = evaluate_flow("voc21", voc_root, model, store_dir, "tiny", LOCAL)

    assert [r.teacher for r in report.teachers] == ["sam_tiny", "sam2.1_tiny"]
    assert [r.labels for r in report.teachers] == list(merges.values())
    assert report.num_images == 3
    val = {content_hash((images / f"{sid}.jpg").read_bytes()) for sid in val_ids}
    for row, sam in zip(report.teachers, merges, strict=True):
        single = evaluate_flow("voc21", voc_root, f"labels:{merges[sam]}", store_dir, "tiny", LOCAL)
        assert row.mIoU == single.merged["mIoU"]
        assert row.coverage == single.merged["coverage"]
        assert row.precision == single.merged["precision"]
        records = store.read_table("merge", merges[sam], columns=["image_id"]).to_pylist()
        assert row.masks_per_image == sum(r["image_id"] in val for r in records) / 3
        timing = store.require_manifest("sam_prompt", sam_fps[sam]["sam_prompt"]).meta["timing"]
        assert timing["outputs"] == sam_fps[sam]  # one pass made both stages
        assert row.images_per_second == 4 / timing["wall_s"] and row.unavailable is None
    stored = store.read_json(f"evaluations/{report.fingerprint}/report.json")
    assert stored["teachers"] == [asdict(r) for r in report.teachers] and stored == report.json
    # each teacher's own report, with its report_uris, as the comparison has always embedded it
    assert stored["reports"] == [
        {**r.json, "report_uris": list(r.report_uris)} for r in report.reports
    ]
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    latest = {
        k: httpx.get(f"{api}/artifacts/{k}/latest").json()
        for k in ("teacher-comparison", "teacher-comparison-table")
    }
    table = json.loads(latest["teacher-comparison"]["data"])
    assert [r["teacher"] for r in table] == ["sam_tiny", "sam2.1_tiny"]
    assert [r["masks_per_image"] for r in table] == [r.masks_per_image for r in report.teachers]
    assert "| sam2.1_tiny |" in latest["teacher-comparison-table"]["data"]
    assert report.report_uris == (store.url(f"evaluations/{report.fingerprint}/report.json"),)
