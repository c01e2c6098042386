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
from tests.synthetic import VOCAB, synthetic_config, write_scenes


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
    argv = ["annotate", "--images", str(tmp_path / "images"), "--classes", ",".join(VOCAB),
            "--store", str(store), "--config", str(config)]  # fmt: skip
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
    argv = ["run", "--config", "tiny", "--store", str(store),
            "--set", "runtime.executor=local", "--set", "clip_dense.short_side=64",
            "--set", "train.epochs=1"]  # fmt: skip
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

    # Rerun: everything is a cache hit; no new model version, the champion stays.
    assert main(argv) == 0
    assert registry.versions(name) == ["v0001"]
    assert "already the champion" in capsys.readouterr().out


def test_run_offline_says_so_and_suggests_tiny(
    prefect_harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no-such-checkpoint.pth"
    argv = ["run", "--config", "tiny", "--store", str(tmp_path / "store"),
            "--set", "runtime.executor=local", "--set", f"models.sam_weights={missing}"]  # fmt: skip
    assert main(argv) == 2
    out = capsys.readouterr()
    text = out.out + out.err
    assert "could not be loaded (offline?)" in text and "fmbseg run --config tiny" in text
    assert str(missing) in text and "models.sam_weights" in text
