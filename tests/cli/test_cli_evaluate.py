"""``fmbseg evaluate``: a baseline end to end, the report it prints and writes, input errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tests.helpers.dataset_trees as trees
from fmbseg.cli import main
from fmbseg.storage import ArtifactStore
from tests.helpers.cli_output import summary


@pytest.fixture
def voc_root(tmp_path: Path) -> str:
    torch.set_num_threads(1)
    root = tmp_path / "data"
    trees.write_voc(str(root))
    return str(root)


def _argv(root: str, store: Path, *extra: str) -> list[str]:
    return [
        "evaluate",
        "--dataset",
        "voc21",
        "--data-root",
        root,
        "--store",
        str(store),
        "--config",
        "tiny",
        "--set",
        "runtime.executor=local",
        *extra,
    ]


@pytest.mark.slow
def test_maskclip_baseline_end_to_end(
    prefect_harness, voc_root: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store_dir = tmp_path / "store"
    argv = _argv(voc_root, store_dir, "--model", "maskclip", "--set", "runtime.shard_size=2")
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out.startswith("evaluate: done (fingerprint ")  # the runner's stage report
    out = summary(out)
    assert out.startswith("voc21: 3 images, mIoU ")
    assert "aeroplane" in out and "tvmonitor" in out  # the per-class table
    assert "evaluate" in err and "shard" in err  # the progress bar: 2 shards
    store = ArtifactStore(str(store_dir))
    (fp,) = store.committed_fingerprints("evaluate")
    assert f"fingerprint: {fp}" in out
    uri = store.url(f"evaluations/{fp}/report.json")
    assert f"report:      {uri}" in out
    report = store.read_json(f"evaluations/{fp}/report.json")
    assert f"mIoU {100 * report['mIoU']:6.2f}" in out
    assert report["num_images"] == 3 and report["model"] == "maskclip"

    assert main([*argv, "--limit", "1"]) == 0
    out = summary(capsys.readouterr().out)
    assert out.startswith("voc21: 1 images, mIoU ")
    assert len(store.committed_fingerprints("evaluate")) == 2


@pytest.mark.slow
def test_pseudo_label_quality_summary(
    prefect_harness, voc_root: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.flows.test_evaluate_flow import _commit_labels

    store_dir = tmp_path / "store"
    _commit_labels(ArtifactStore(str(store_dir)), voc_root)
    assert main(_argv(voc_root, store_dir, "--model", "labels:latest")) == 0
    out = summary(capsys.readouterr().out)
    lines = out.splitlines()
    assert lines[0] == ("pseudo-labels labels0000000000 on voc21: 3 images (1 without records)")
    assert [ln.split()[0] for ln in lines[2:5]] == ["prompt", "auto", "merged"]
    assert "voc21 (merged): 3 images, mIoU" in out and "person" in out
    assert "report:      " in out and "model:       labels:labels0000000000" in out


@pytest.mark.slow
def test_both_coco_object_variants_are_accepted_and_named(
    prefect_harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "data"
    trees.write_coco(str(root))
    for name, k, description in [
        ("coco-object-80", 80, "COCO-Object val, 80 things only, background pixels ignored"),
        ("coco-object-81", 81, "COCO-Object val, 80 things + background (81 classes)"),
    ]:
        store = str(tmp_path / "store")
        argv = ["evaluate", "--dataset", name, "--data-root", str(root), "--store", store]
        argv += ["--config", "tiny", "--set", "runtime.executor=local"]
        argv += ["--model", "maskclip", "--limit", "1"]
        assert main(argv) == 0
        lines = summary(capsys.readouterr().out).splitlines()
        assert lines[0].startswith(f"{name}: 1 images, mIoU ") and lines[1] == f"  {description}"
        rows = lines[lines.index(f"{'class':<24}{'IoU':>8}{'Acc':>8}") + 1 :]
        assert rows[k].startswith("model:") and rows[k - 1].startswith("toothbrush")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data-root", "{tmp}/missing"], "voc21 root {tmp}/missing: directory not found"),
        (["--data-root", "{tmp}"], "voc21 root {tmp}: ImageSets/Segmentation/val.txt not found"),
        (["--dataset", "voc2099"], "unknown dataset 'voc2099'; known: ade20k, cityscapes"),
        (["--model", "champion", "--name", "seg"], "model 'seg' has no champion"),
        (["--model", "seg:v0007"], "model 'seg' has no complete version 'v0007'"),
        (["--model", "labels:latest"], "no committed pseudo-labels (stage merge) in "),
        (
            ["--model", "labels:../index/abc"],
            "labels '../index/abc' is not a fingerprint (letters and digits",
        ),
    ],
)
def test_input_errors_exit_2_naming_what_is_missing(
    prefect_harness,
    voc_root: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    extra = [e.format(tmp=tmp_path) for e in extra]
    assert main([*_argv(voc_root, tmp_path / "store", "--model", "maskclip"), *extra]) == 2
    err = capsys.readouterr().err
    assert f"fmbseg: error: {message.format(tmp=tmp_path)}" in err
    assert "Traceback" not in err


def test_bad_limit_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["evaluate", "--dataset", "voc21", "--data-root", str(tmp_path), "--limit", "0"]
    assert main(argv) == 2
    assert "--limit must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.slow
def test_a_listed_sample_without_its_label_file_is_an_error_naming_it(
    prefect_harness, voc_root: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (Path(voc_root) / "VOCdevkit/VOC2012/SegmentationClass/2007_000042.png").unlink()
    store = tmp_path / "store"
    assert main(_argv(voc_root, store, "--model", "maskclip")) == 2
    err = capsys.readouterr().err
    assert err.startswith("fmbseg: error: voc21 root ") and err.count("\n") == 1
    assert "SegmentationClass/2007_000042.png not found (the label of a sample " in err
    assert "1 of 3 samples lack theirs" in err
    assert not (store / "stages").exists()  # before any work


@pytest.mark.slow
def test_pseudo_labels_of_other_images_say_annotate_these_first(
    prefect_harness, voc_root: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.flows.test_evaluate_flow import _commit_labels

    store = tmp_path / "store"
    _commit_labels(ArtifactStore(str(store)), voc_root)  # labels of these images ...
    for i, jpg in enumerate(sorted((Path(voc_root) / "VOCdevkit/VOC2012/JPEGImages").iterdir())):
        jpg.write_bytes(trees._jpg(trees.image(100 + i)))  # ... which are now other images
    assert main(_argv(voc_root, store, "--model", "labels:latest")) == 2
    captured = capsys.readouterr()
    assert captured.err.endswith(  # after the stage's progress bar
        f"\nfmbseg: error: none of the 3 images of voc21 in {voc_root} has pseudo-labels in "
        "merge output labels0000000000: annotate them first (fmbseg annotate --images <the "
        "split's image folder> --vocab ...), then evaluate labels:latest\n"
    )
    assert "mIoU" not in captured.out  # no table of zeros


def _commit_teacher(store: ArtifactStore, sam: str, wall_s: float, images: int) -> dict:
    """SAM stage manifests as annotate commits them (one pass made both), and the clip_dense
    output they read (``images`` rows); returns the merge meta naming them."""
    import pyarrow as pa

    clip = f"clip{sam.replace('.', '').replace('_', '')}"[:16].ljust(16, "0")
    store.write_shard(
        "clip_dense", clip, 0, pa.table({"image_id": [str(i) for i in range(images)]})
    )
    store.commit("clip_dense", clip, 1, meta={})
    fps = {"sam_prompt": f"p{clip[1:]}", "sam_auto": f"a{clip[1:]}"}
    timing = {"wall_s": wall_s, "shards_run": 1, "shards": 1, "outputs": fps}
    models = {"sam": sam, "sam_weights": None, "sam_precision": "fp32"}
    for stage, fp in fps.items():
        store.commit(stage, fp, 0, meta={"clip_dense": clip, "models": models, "timing": timing})
    return fps


@pytest.mark.slow
def test_teachers_side_by_side_summary(
    prefect_harness, voc_root: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.flows.test_evaluate_flow import _commit_labels

    store_dir = tmp_path / "store"
    store = ArtifactStore(str(store_dir))
    _commit_labels(
        store, voc_root, "labels000000000a", **_commit_teacher(store, "sam2.1_hiera_t", 2.0, 5)
    )
    _commit_labels(store, voc_root, "labels000000000b")  # made before teachers were recorded
    model = "labels:labels000000000a,labels:labels000000000b"
    assert main(_argv(voc_root, store_dir, "--model", model)) == 0
    lines = summary(capsys.readouterr().out).splitlines()
    assert lines[0] == (
        "teachers on voc21: 3 images (merged pseudo-labels vs. ground truth, %; "
        "images/s of the SAM pass)"
    )
    rows = {ln.split()[0]: ln.split()[1:] for ln in lines[1:8]}
    assert rows["teacher"] == ["sam2.1_hiera_t", "n/a"]
    assert rows["labels"] == ["labels000000000a", "labels000000000b"]
    assert rows["masks/image"] == ["2.00", "2.00"]  # 3 records on each of 2 of the 3 images
    assert rows["images/s"] == ["2.50", "n/a"]  # 5 images through SAM in 2 s
    single = store.read_json(f"evaluations/{_lq_fp(store, 'labels000000000a')}/report.json")
    assert rows["mIoU"] == [f"{100 * single['merged']['mIoU']:.2f}"] * 2  # the same records
    assert lines[8] == (
        "  n/a in column 2 (labels000000000b): the merge output names no SAM stages"
    )
    (uri,) = [ln.split()[-1] for ln in lines if ln.startswith("report:")]
    fp = uri.rstrip("/").split("/")[-2]
    assert store.read_json(f"evaluations/{fp}/report.json")["teachers"][0]["teacher"] == (
        "sam2.1_hiera_t"
    )


def _lq_fp(store: ArtifactStore, merge_fp: str) -> str:
    """The label_quality fingerprint that scored ``merge_fp``."""
    (fp,) = [
        fp
        for fp in store.committed_fingerprints("label_quality")
        if store.require_manifest("label_quality", fp).meta["merge"] == merge_fp
    ]
    return fp


def test_teachers_compare_only_pseudo_labels(
    voc_root: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = _argv(voc_root, tmp_path / "store", "--model", "labels:latest,maskclip")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == (
        "fmbseg: error: --model: model 'labels:latest,maskclip': 'maskclip' is not "
        "labels:<merge fingerprint> or labels:latest (only pseudo-labels are compared side by "
        "side: labels:A,labels:B)\n"
    )
