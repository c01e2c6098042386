"""``fmbseg annotate`` and ``fmbseg run`` end to end, and their input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image
from pycocotools.coco import COCO

from fmbseg.cli import main
from fmbseg.data.samples import SAMPLE_CLASSES, write_sample_photos
from fmbseg.storage import ArtifactStore, ModelRegistry
from tests.helpers.synthetic import VOCAB, synthetic_config, write_scenes


@pytest.mark.slow
def test_annotate_command_writes_labels_and_prints_where(
    prefect_harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_scenes(tmp_path / "images", 4)
    broken = tmp_path / "images" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not the rest of a PNG")
    config = tmp_path / "synthetic.yaml"
    config.write_text(yaml.safe_dump(synthetic_config().to_dict()))
    store = tmp_path / "store"
    argv = [
        "annotate",
        "--images",
        str(tmp_path / "images"),
        "--classes",
        ",".join(VOCAB),
        "--store",
        str(store),
        "--config",
        str(config),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "annotate: 4 images indexed, 4 labelled, 0 with no confident label, 0 failed" in out
    assert f"    {broken}: " in out  # the summary names the failing file, not only a count
    assert "errors.parquet" in out
    coco_line = next(ln for ln in out.splitlines() if "COCO JSON:" in ln)
    coco_path = coco_line.split("COCO JSON:", 1)[1].strip().removeprefix("file://")
    assert len(COCO(coco_path).imgs) == 4
    labels = Path(coco_path).parent / "labels"
    assert sorted(p.suffix for p in labels.iterdir()) == [".png"] * 4
    merge_fp = out.rsplit("merge fingerprint (for `fmbseg train --labels`): ", 1)[1].split()[0]
    assert ArtifactStore(str(store)).manifest("merge", merge_fp) is not None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--classes", "cat,cat"], "classes: duplicate name 'cat'"),
        (["--classes", " "], "classes: empty"),
        ([], "give exactly one of --classes or --vocab"),
        (["--classes", "cat", "--vocab", "voc-20"], "give exactly one of --classes or --vocab"),
        (["--vocab", "no-such-list"], "no-such-list"),
    ],
)
def test_annotate_bad_classes_exit_2_before_any_work(
    extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "images").mkdir()
    store = tmp_path / "store"
    argv = ["annotate", "--images", str(tmp_path / "images"), "--store", str(store), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fmbseg: error: ") and message in err and "Traceback" not in err
    assert not store.exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("image,labels\none.png,cat|zebra\n", "names are not in the vocabulary: 'zebra' (one.png)"),
        ("picture,labels\none.png,cat\n", "needs an image column"),
    ],
)
def test_annotate_bad_image_labels_exit_2_before_any_work(
    text: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "tags.csv").write_text(text)
    store = tmp_path / "store"
    argv = ["annotate", "--images", str(tmp_path / "images"), "--store", str(store)]
    argv += ["--classes", "cat,dog", "--image-labels", str(tmp_path / "tags.csv")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fmbseg: error: --image-labels: image labels ") and message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not store.exists()


@pytest.mark.slow
def test_annotate_with_image_labels_through_the_flow(
    prefect_harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scenes = write_scenes(tmp_path / "images", 3)
    config = tmp_path / "synthetic.yaml"
    config.write_text(yaml.safe_dump(synthetic_config().to_dict()))
    names = sorted(scenes)
    # the first image tagged with its true classes, the second with none, the third absent
    first = sorted({VOCAB[int(k)] for k in set(scenes[names[0]].truth.ravel().tolist())})
    (tmp_path / "tags.csv").write_text(
        f"image,labels\n{names[0]}.png,{'|'.join(first)}\n{names[1]}.png,\n"
    )
    store = tmp_path / "store"
    argv = ["annotate", "--images", str(tmp_path / "images"), "--classes", ",".join(VOCAB)]
    argv += ["--store", str(store), "--config", str(config)]
    argv += ["--image-labels", str(tmp_path / "tags.csv")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "annotate: 3 images indexed, 1 labelled, 1 with no confident label, 1 failed" in out
    assert "clip_dense errors: 1 no_image_labels" in out
    st = ArtifactStore(str(store))
    (clip_fp,) = st.committed_fingerprints("clip_dense")
    rows = st.read_table("clip_dense", clip_fp).to_pylist()
    present = {r["image_uri"].rsplit("/", 1)[-1]: r["present"] for r in rows}
    expected = {f"{names[0]}.png": sorted(VOCAB.index(n) for n in first), f"{names[1]}.png": []}
    assert present == expected
    assert st.require_manifest("clip_dense", clip_fp).meta["image_labels"]["root"] == str(
        tmp_path / "images"
    )


def test_sample_photos_are_written_once(tmp_path: Path) -> None:
    uri = write_sample_photos(str(tmp_path / "samples") + "/")
    files = sorted(Path(uri).iterdir())
    assert [p.name for p in files] == [
        "astronaut.jpg",
        "chelsea.jpg",
        "coffee.jpg",
        "motorcycle.jpg",
        "rocket.jpg",
    ]
    assert Image.open(files[1]).size == (451, 300)
    stamps = [p.stat().st_mtime_ns for p in files]
    write_sample_photos(uri)
    assert [p.stat().st_mtime_ns for p in files] == stamps
    assert len(set(SAMPLE_CLASSES)) == len(SAMPLE_CLASSES)


@pytest.mark.slow
def test_run_tiny_on_the_bundled_photos(
    prefect_harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "store"
    argv = [
        "run",
        "--config",
        "tiny",
        "--store",
        str(store),
        "--set",
        "runtime.executor=local",
        "--set",
        "clip_dense.short_side=64",
        "--set",
        "train.epochs=1",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "on the bundled sample photos" in out
    assert "annotate: 5 images indexed" in out
    assert "gallery:" in out and "champion:    promoted (no champion yet" in out
    registry = ModelRegistry(ArtifactStore(str(store)))
    (name,) = registry.names()
    assert registry.champion(name) == registry.latest(name) == "v0001"
    card = registry.card(name, "champion")
    assert card["promotion"]["promoted"] is True
    assert "fmbseg segment IMAGE" in out and "--model champion" in out
    lineage = [json.loads(p.read_text()) for p in (store / "runs").glob("*.json")]
    assert any(r["flow"] == "annotate-and-train" for r in lineage)
    (parent,) = [r for r in lineage if r["flow"] == "annotate-and-train"]
    children = {r["flow"]: r for r in lineage if r["flow"] != "annotate-and-train"}
    assert {"annotate", "train"} <= set(children)
    for record in lineage:
        assert record["outcome"] == "completed" and record["duration_s"] > 0
        assert record["started_at"] < record["ended_at"]
    assert parent["parent_run"] is None
    assert all(r["parent_run"] == parent["run_id"] for r in children.values())

    assert main(["status", "--store", str(store)]) == 0
    status = capsys.readouterr().out
    st = ArtifactStore(str(store))
    for stage in ("index", "clip_dense", "sam_prompt", "sam_auto", "merge", "export", "train"):
        (fp,) = st.committed_fingerprints(stage)
        rows = st.manifest(stage, fp).rows
        assert f"  {stage:<12} {fp}  {rows:>8} rows  " in status
    (export_fp,) = st.ls("exports")
    assert f"  {export_fp}  5 images, {len(SAMPLE_CLASSES)} classes, " in status
    assert st.url(f"exports/{export_fp}/gallery.html") in status
    assert f"  {name}: 1 version(s), latest v0001, champion v0001" in status
    assert "annotate-and-train completed" in status.replace("  ", " ")
    assert f"(in {parent['run_id']})" in status

    # Rerun: everything is a cache hit; no new model version, the champion stays.
    assert main(argv) == 0
    assert registry.versions(name) == ["v0001"]
    assert "already the champion" in capsys.readouterr().out


def test_run_offline_says_so_and_suggests_tiny(
    prefect_harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no-such-checkpoint.pth"
    argv = [
        "run",
        "--config",
        "tiny",
        "--store",
        str(tmp_path / "store"),
        "--set",
        "runtime.executor=local",
        "--set",
        f"models.sam_weights={missing}",
    ]
    assert main(argv) == 2
    out = capsys.readouterr()
    text = out.out + out.err
    assert "could not be loaded (offline?)" in text and "fmbseg run --config tiny" in text
    assert str(missing) in text and "models.sam_weights" in text


def test_run_offline_fails_fast_naming_every_missing_checkpoint(
    prefect_harness, tmp_path: Path, monkeypatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """quickstart with no network: an unreachable hub and empty caches. Every model's weights
    are located before the first stage, so it fails in seconds, indexes nothing, and says
    which keys to set (whole message, nothing cut)."""
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # an empty ~/.cache/fmbseg/weights
    store = tmp_path / "store"
    start = time.monotonic()
    status = main(["run", "--store", str(store)])  # default config: quickstart
    elapsed = time.monotonic() - start
    out = capsys.readouterr()
    assert status == 2, out.err
    assert elapsed < 30, f"took {elapsed:.1f} s to report missing weights"
    text = out.out + out.err
    for key, value in [
        ("clip_weights", "'openai'"),
        ("dino_weights", "'hub'"),
        ("sam_weights", "'https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth'"),
    ]:
        assert f"models.{key}={value}" in text
        assert f"set models.{key} to a local path or a store URI of the checkpoint" in text
    assert "http://127.0.0.1:9/timm/vit_base_patch16_clip_224.openai" in text
    assert "fmbseg run --config tiny" in text and "Traceback" not in text
    assert not (store / "stages").exists()  # nothing was indexed


MANY = ",".join(f"class{i}" for i in range(256))  # one more than a label map holds


@pytest.mark.parametrize("command", ["annotate", "run", "retrain", "segment"])
def test_more_classes_than_a_label_map_holds_exit_2_before_any_work(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.png")
    store = tmp_path / "store"
    source = str(tmp_path / "images")
    where = [f"{source}/a.png"] if command == "segment" else ["--images", source]
    assert main([command, *where, "--classes", MANY, "--store", str(store)]) == 2
    err = capsys.readouterr().err
    assert err == (
        "fmbseg: error: 256 classes: a label map holds at most 255 (values 0-254, 255 = "
        "ignore); split the vocabulary into runs\n"
    )
    assert not store.exists()


def test_a_vocabulary_file_of_too_many_names_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "images").mkdir()
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"thing {i}" for i in range(2000)))
    argv = ["annotate", "--images", str(tmp_path / "images"), "--vocab", str(names)]
    argv += ["--store", str(tmp_path / "store")]
    assert main(argv) == 2
    assert "2000 classes: a label map holds at most 255" in capsys.readouterr().err


def test_flows_called_from_python_refuse_too_many_classes_before_any_work(tmp_path: Path) -> None:
    from fmbseg.flows import annotate_and_train_flow, annotate_flow
    from fmbseg.flows.retrain import retrain_flow

    store = tmp_path / "store"
    for flow in (annotate_flow, annotate_and_train_flow, retrain_flow):
        with pytest.raises(ValueError, match="^256 classes: a label map holds at most 255"):
            flow.fn(images=str(tmp_path), store=str(store), classes=MANY.split(","))
    assert not store.exists()
    # 255 is fine for the check (the flow then fails on the empty source, not on the count)
    with pytest.raises(Exception, match="holds no images|does not exist") as info:
        names = MANY.split(",")[:255]
        annotate_flow.fn(images=str(tmp_path), store=str(store), classes=names, config="tiny")
    assert "classes" not in str(info.value)


@pytest.mark.slow
def test_annotate_with_the_sam3_teacher_then_train_on_its_labels(
    prefect_harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.helpers.labelled import OVERRIDES

    write_scenes(tmp_path / "images", 4)
    config = tmp_path / "synthetic.yaml"
    config.write_text(yaml.safe_dump(synthetic_config().to_dict()))
    store = ["--store", str(tmp_path / "store"), "--config", str(config)]
    images = ["--images", str(tmp_path / "images"), "--classes", ",".join(VOCAB)]
    assert main(["annotate", *images, *store, "--teacher", "sam3", "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert "sam3" in dry and "clip_dense" not in dry  # the teacher's stages, nothing run
    assert main(["annotate", *images, *store, "--teacher", "sam3"]) == 0
    out = capsys.readouterr().out
    assert "4 images indexed, 4 labelled, 0 with no confident label, 0 failed;" in out
    assert " SAM 3 masks" in out and "prompt masks" not in out
    merge_fp = out.rsplit("merge fingerprint (for `fmbseg train --labels`): ", 1)[1].split()[0]
    st = ArtifactStore(str(tmp_path / "store"))
    assert set(st.read_table("merge", merge_fp).column("source").to_pylist()) == {"sam3"}
    # stage 2 trains on SAM 3's labels unchanged
    train = ["train", "--labels", merge_fp, "--store", str(tmp_path / "store"), "--config", "tiny"]
    assert main([*train, *(a for o in OVERRIDES for a in ("--set", o))]) == 0
    assert "train: model fmbseg-align:v0001" in capsys.readouterr().out
    assert ModelRegistry(st).card("fmbseg-align", "v0001")["data"]["labels_fp"] == merge_fp
