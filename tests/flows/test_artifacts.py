"""What the Prefect UI shows: plain table cells, images embedded in markdown artifacts."""

from __future__ import annotations

import base64
import dataclasses
import io
import pickle
import re
from typing import Any

import numpy as np
from PIL import Image

from fmbseg.flows.annotate import (
    ARTIFACT_THUMB_SIDE,
    AnnotateResult,
    AnnotationSummary,
    gallery_markdown,
)
from fmbseg.flows.annotate_and_train import AnnotateAndTrainResult, Promotion, Score
from fmbseg.flows.common import plain
from fmbseg.flows.evaluate import (
    EvaluationReport,
    LabelQualityReport,
    TeacherComparison,
    TeacherRow,
)
from fmbseg.flows.retrain import RetrainResult
from fmbseg.flows.train import TrainedModel, TrainResult, loss_markdown
from fmbseg.storage import ArtifactStore
from fmbseg.tasks.annotate.gallery import jpeg
from fmbseg.tasks.train.loop import loss_curve_png

DATA_IMAGE = re.compile(r"!\[([^\]]*)\]\(data:(image/[a-z]+);base64,([A-Za-z0-9+/=]+)\)")


def _images(markdown: str) -> list[tuple[str, str, Image.Image]]:
    return [
        (alt, mime, Image.open(io.BytesIO(base64.b64decode(b64))))
        for alt, mime, b64 in DATA_IMAGE.findall(markdown)
    ]


def test_table_cells_are_plain_values_not_reprs() -> None:
    assert plain({"grass": 3, "sky": 1}) == "grass 3, sky 1"
    assert plain({"index": {"corrupt": 2}, "merge": {"no_masks": 1}}) == (
        "index: corrupt 2; merge: no_masks 1"
    )
    assert plain(["cat", "dog"]) == "cat, dog" and plain(None) == "-" and plain({}) == "-"
    assert plain(3) == 3 and plain(0.5) == 0.5 and plain("s3://b/x") == "s3://b/x"


def test_gallery_markdown_embeds_a_few_overlays(tmp_path) -> None:
    store = ArtifactStore(str(tmp_path))
    rng = np.random.default_rng(0)
    for i in range(6):
        big = rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)
        store.write_bytes(f"exports/fp1/overlays/img{i}.jpg", jpeg(big))
        if i % 2:  # large overlays have a 320 px thumb; small ones do not
            store.write_bytes(f"exports/fp1/thumbs/img{i}.jpg", jpeg(big, 320))
    store.write_bytes("exports/fp1/gallery.html", b"<html></html>")
    md = gallery_markdown(store, "fp1")
    shown = _images(md)
    assert [alt for alt, _, _ in shown] == ["img0", "img1", "img2", "img3"]
    for _, mime, im in shown:
        assert mime == "image/jpeg" and im.format == "JPEG"
        assert max(im.size) == ARTIFACT_THUMB_SIDE and im.size[0] > im.size[1]
    assert len(md) < 4 * 40_000  # small enough for Prefect's database
    assert f"Full gallery: `{store.url('exports/fp1/gallery.html')}`" in md
    assert "no overlays" in gallery_markdown(store, "other")


def test_loss_markdown_embeds_the_curve() -> None:
    png = loss_curve_png([1.0, 0.5], [1.2, 0.9, 0.6, 0.4])
    model = _trained()
    md = loss_markdown(model, png)
    ((alt, mime, im),) = _images(md)
    assert alt == "loss curve" and mime == "image/png" and im.format == "PNG"
    assert "| 2 | 0.5000 |" in md and "loss_curve.png`" in md


def _trained(version: str = "v0001") -> TrainedModel:
    base = f"file:///s/models/m/{version}"
    return TrainedModel(
        name="m",
        version=version,
        uri=base,
        card=f"{base}/card.json",
        weights=f"{base}/weights.safetensors",
        loss_curve=f"{base}/loss_curve.png",
        train_fp="train0000000000",
        labels="labels0000000000",
        index="index00000000000",
        features=None,
        vocabulary=("cat", "dog"),
        images=4,
        epoch_losses=(1.0, 0.5),
        final_loss=0.5,
    )


def _summary(**changes: Any) -> AnnotationSummary:
    values: dict[str, Any] = {
        "images_indexed": 5,
        "skipped_extensions": {".txt": 1},
        "images_with_masks": 3,
        "images_no_label": 1,
        "images_failed": 1,
        "masks_prompt": 7,
        "masks_auto": 2,
        "classes_found": {"cat": 6, "dog": 3},
        "errors": {"index": {"corrupt": 1}},
        "first_errors": [{"uri": "file:///x.png", "error_type": "corrupt", "message": "bad"}],
        "export": "file:///s/exports/e",
        "gallery": None,
        "coco": "file:///s/exports/e/annotations.json",
        "errors_table": "file:///s/exports/e/errors.parquet",
    }
    return AnnotationSummary(**{**values, **changes})


def test_annotate_summary_rows_are_the_fields_in_order() -> None:
    summary = _summary()
    assert summary.rows() == [
        {"what": "images_indexed", "value": 5},
        {"what": "skipped_extensions", "value": {".txt": 1}},
        {"what": "images_with_masks", "value": 3},
        {"what": "images_no_label", "value": 1},
        {"what": "images_failed", "value": 1},
        {"what": "masks_prompt", "value": 7},
        {"what": "masks_auto", "value": 2},
        {"what": "masks_sam3", "value": 0},
        {"what": "classes_found", "value": {"cat": 6, "dog": 3}},
        {"what": "errors", "value": {"index": {"corrupt": 1}}},
        {"what": "first_errors", "value": summary.first_errors},
        {"what": "export", "value": "file:///s/exports/e"},
        {"what": "gallery", "value": None},
        {"what": "coco", "value": "file:///s/exports/e/annotations.json"},
        {"what": "errors_table", "value": "file:///s/exports/e/errors.parquet"},
    ]
    # a teacher without one of the SAM stages: its mask count is 0, not a missing key
    values = {k: v for k, v in vars(summary).items() if k != "masks_auto"}
    assert AnnotationSummary(**values).masks_auto == 0


def test_train_and_retrain_rows() -> None:
    model = _trained()
    assert model.ref == "m:v0001"
    assert model.table_row() == {
        "model": "m",
        "version": "v0001",
        "labels": "labels0000000000",
        "index": "index00000000000",
        "train_fp": "train0000000000",
        "images": 4,
        "final_loss": 0.5,
        "card": "file:///s/models/m/v0001/card.json",
        "weights": "file:///s/models/m/v0001/weights.safetensors",
        "loss_curve": "file:///s/models/m/v0001/loss_curve.png",
    }
    assert "### Stage-2 training loss: m:v0001" in loss_markdown(model)
    decision = Promotion(Score(0.5, "folder", 3), None, True, "no champion yet")
    assert decision.to_dict() == {
        "metrics": {"mIoU": 0.5, "dataset": "folder", "images": 3},
        "champion_metrics": None,
        "promoted": True,
        "reason": "no champion yet",
    }
    trained = RetrainResult(9, 4, 3, 2, 2, {"index": "i"}, model, decision, "no champion yet")
    assert trained.trained and trained.promoted is True
    assert trained.rows() == [
        {"what": "images listed", "value": "9"},
        {"what": "new images found", "value": "4"},
        {"what": "annotated (indexed)", "value": "3"},
        {"what": "model version", "value": "m:v0001"},
        {"what": "promoted", "value": "True"},
        {"what": "reason", "value": "no champion yet"},
    ]
    idle = RetrainResult(9, 0, 0, None, 2, {}, None, None, "nothing new")
    assert not idle.trained and idle.promoted is None
    assert [r["value"] for r in idle.rows()[3:]] == ["none (not retrained)", "None", "nothing new"]
    run = AnnotateAndTrainResult(
        AnnotateResult({"merge": "labels0000000000"}, _summary(gallery="file:///g.html")),
        TrainResult(model, cached=False, champion="v0001", promoted=False, flow_run=None),
        decision,
    )
    assert run.rows() == [
        {"what": "images", "value": 5},
        {"what": "labels (COCO)", "value": "file:///s/exports/e/annotations.json"},
        {"what": "gallery", "value": "file:///g.html"},
        {"what": "model", "value": "m:v0001"},
        {"what": "champion", "value": "promoted (no champion yet)"},
    ]
    # Prefect persists flow results by pickling them
    assert pickle.loads(pickle.dumps(run)) == run
    assert pickle.loads(pickle.dumps(trained)) == trained


def _scores(miou: float) -> dict[str, Any]:
    return {"mIoU": miou, "aAcc": 0.9, "coverage": 0.8, "precision": 0.7, "per_class": []}


def test_evaluation_report_rows() -> None:
    json_report = {
        "dataset": "voc21",
        "model": "maskclip",
        "model_ref": {"kind": "maskclip"},
        "fingerprint": "eval000000000000",
        "num_images": 3,
        "images_failed": 0,
        "mIoU": 0.25,
        "mAcc": 0.5,
        "aAcc": 0.75,
        "per_class": [{"class": "cat", "IoU": 0.25, "Acc": 0.5, "pixels": 10}],
        "confusion": {"num_classes": 1},
        "background": "stuff_names",
    }
    report = EvaluationReport.from_json(json_report, ["file:///a.json", "file:///b.json"])
    assert report.json is json_report and report.report_uris == ("file:///a.json", "file:///b.json")
    assert report.table_row() == {
        "dataset": "voc21",
        "model": "maskclip",
        "mIoU": 0.25,
        "pixel_acc": 0.75,
        "images": 3,
        "report": "file:///a.json",
    }
    labels = {
        "dataset": "voc21",
        "model": "labels:labels0000000000",
        "labels": "labels0000000000",
        "fingerprint": "lq00000000000000",
        "num_images": 3,
        "images_without_records": 1,
        "unmatched_categories": [],
        "masks_per_image": 2.0,
        "teacher": {"sam": "sam_tiny", "images_per_second": 4.0, "unavailable": None},
        "prompt": _scores(0.1),
        "auto": _scores(0.2),
        "merged": _scores(0.3),
    }
    lq = LabelQualityReport.from_json(labels, ["file:///lq.json"])
    assert [(r["labels"], r["mIoU"]) for r in lq.table_rows()] == [
        ("prompt", 0.1),
        ("auto", 0.2),
        ("merged", 0.3),
    ]
    assert lq.table_rows()[2] == {
        "dataset": "voc21",
        "labels": "merged",
        "mIoU": 0.3,
        "pixel_acc": 0.9,
        "coverage": 0.8,
        "precision": 0.7,
        "images": 3,
    }
    assert lq.merged_report() == {
        **_scores(0.3),
        "model": "labels:labels0000000000 (merged)",
        "dataset": "voc21",
        "num_images": 3,
        "fingerprint": "lq00000000000000",
    }
    assert lq.with_uris() == {**labels, "report_uris": ["file:///lq.json"]}
    row = TeacherRow("labels0000000000", "sam_tiny", 0.3, 0.8, 0.7, 2.0, 4.0, None)
    comparison = TeacherComparison(
        "labels:labels0000000000", "voc21", "cmp0000000000000", 3, (row,), (lq,), {}, ()
    )
    assert comparison.table_rows() == [
        {
            "labels": "labels0000000000",
            "teacher": "sam_tiny",
            "mIoU": 0.3,
            "coverage": 0.8,
            "masks_per_image": 2.0,
            "images_per_second": 4.0,
            "unavailable": None,
        }
    ]
    assert pickle.loads(pickle.dumps(comparison)) == comparison
    # fields not read from the JSON as they are (the rows, the reports) are given
    compared = {
        "model": "labels:labels0000000000",
        "dataset": "voc21",
        "fingerprint": "cmp0000000000000",
        "num_images": 3,
        "teachers": [vars(row)],
    }
    built = TeacherComparison.from_json(
        compared, ["file:///c.json"], teachers=(row,), reports=(lq,)
    )
    assert built == dataclasses.replace(comparison, json=compared, report_uris=("file:///c.json",))
