"""``fmbseg train`` and ``fmbseg segment``: end to end on a labelled store, and input errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fmbseg.cli import main
from fmbseg.storage.models import ModelRegistry
from tests.helpers.labelled import LABELS_A, OVERRIDES, labelled_world

TINY = ["--config", "tiny", *(a for o in OVERRIDES for a in ("--set", o))]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_train_then_segment(
    prefect_harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    world = labelled_world(tmp_path)
    store = ["--store", world.store.uri]
    status, out, err = _run(["train", "--labels", "latest", *store, *TINY], capsys)
    assert status == 0, err
    assert "train: model fmbseg-align:v0001\n" in out  # trained now: no cache-hit note
    assert f"labels:     {LABELS_A} (merge)" in out and "epochs:     2," in out
    version_dir = world.store.url("models/fmbseg-align/v0001")
    for what in ("weights.safetensors", "card.json", "loss_curve.png"):
        assert f"{version_dir}/{what}" in out
    assert "fmbseg segment IMAGE... " in out and "--model fmbseg-align:v0001" in out
    assert "  champion:   v0001 (the first model of fmbseg-align becomes its champion)" in out
    assert "train" in err  # the epoch progress bar (stderr)
    assert ModelRegistry(world.store).champion("fmbseg-align") == "v0001"

    status, out, _ = _run(["train", "--labels", LABELS_A, *store, *TINY], capsys)
    assert status == 0 and "fmbseg-align:v0001 (cache hit" in out
    assert ModelRegistry(world.store).versions("fmbseg-align") == ["v0001"]

    images = [world.uris[sc.image_id] for sc in world.held_out]
    out_dir = tmp_path / "seg"
    argv = [
        "segment",
        *images,
        "--classes",
        "cat,dog,grass",
        "--model",
        "champion",
        "--out",
        str(out_dir),
        *store,
        *TINY,
    ]
    status, out, err = _run(argv, capsys)
    assert status == 0, err
    assert "model fmbseg-align:v0001" in out and "0=cat, 1=dog, 2=grass" in out
    for image in images:
        stem = Path(image).stem
        labels_png, overlay_png = out_dir / f"{stem}.png", out_dir / f"{stem}_overlay.png"
        assert f"{image} -> {labels_png} (label map), {overlay_png} (overlay)" in out
        pixels = np.asarray(Image.open(image))
        label_map = np.asarray(Image.open(labels_png))
        assert label_map.shape == pixels.shape[:2] and label_map.dtype == np.uint8
        assert int(label_map.max()) < 3
        overlay = Image.open(overlay_png)
        assert overlay.mode == "RGB" and overlay.width == pixels.shape[1]
        assert overlay.height >= pixels.shape[0]  # the image, then a legend below it


def test_train_rejects_labels_that_are_not_committed(
    prefect_harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    world = labelled_world(tmp_path)
    status, _, err = _run(
        ["train", "--labels", "cafe0000", "--store", world.store.uri, *TINY], capsys
    )
    assert status == 2
    assert err.startswith("fmbseg: error: labels 'cafe0000': no committed pseudo-labels")
    assert LABELS_A in err and "Traceback" not in err
    # the failed run is in the store's lineage, with its outcome and error
    (record,) = [world.store.read_json(f"runs/{e}") for e in world.store.ls("runs")]
    assert record["flow"] == "train" and record["outcome"] == "failed"
    assert "labels 'cafe0000': no committed pseudo-labels" in record["error"]
    assert record["duration_s"] >= 0 and record["parameters"]["labels"] == "cafe0000"
    assert main(["status", "--store", world.store.uri]) == 0
    out = capsys.readouterr().out
    assert f"  merge        {LABELS_A}  " in out and "models:\n  none" in out
    assert " train              failed " in out


def test_train_refuses_labels_that_are_paths(
    prefect_harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    world = labelled_world(tmp_path)
    index_fp = world.store.committed_fingerprints("index")[0]
    argv = ["train", "--labels", f"../index/{index_fp}", "--store", world.store.uri, *TINY]
    status, out, err = _run(argv, capsys)
    assert status == 2 and "train: model" not in out
    assert err == (
        f"fmbseg: error: labels '../index/{index_fp}' is not a fingerprint (letters and "
        "digits, as `fmbseg status` lists them) or 'latest'\n"
    )
    assert ModelRegistry(world.store).versions("fmbseg-align") == []


@pytest.fixture(scope="module")
def trained_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(store URI, an image path): a store holding one trained, unpromoted version."""
    from fmbseg.config import load_config
    from fmbseg.tasks.train.stages import run_train
    from tests.helpers.synthetic import VOCAB
    from tests.helpers.world import INDEX_FP

    torch.set_num_threads(1)
    world = labelled_world(tmp_path_factory.mktemp("trained"))
    run_train(
        world.store, load_config("tiny", [*OVERRIDES, "train.epochs=1"]), LABELS_A, INDEX_FP, VOCAB
    )
    return world.store.uri, world.uris[world.held_out[0].image_id]


CLASSES = ["--classes", "cat,dog"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["{image}", *CLASSES, "--model", "champion"],
            "model 'fmbseg-align' has no champion in {store} (nothing promoted yet; versions: "
            "['v0001']); use --model latest",
        ),
        (
            ["{image}", *CLASSES, "--name", "other", "--model", "latest"],
            "model 'other' has no saved versions",
        ),
        (
            ["{image}", *CLASSES, "--model", "v0007"],
            "model 'fmbseg-align' has no complete version 'v0007'",
        ),
        (
            ["{image}", *CLASSES, "--model", "{tmp}"],
            "is neither 'latest', 'champion', 'vNNNN', 'name:version' nor",
        ),
        (
            ["{image}", "--classes", "cat,Cat", "--model", "latest"],
            "--classes: duplicate name 'Cat' (#2) repeats 'cat' (#1)",
        ),
        (
            ["{image}", "--vocab", "nonsense", "--model", "latest"],
            "vocabulary 'nonsense' is not a built-in name",
        ),
        (
            ["{image}", *CLASSES, "--vocab", "voc-21", "--model", "latest"],
            "exactly one of --classes or --vocab",
        ),
        (["{image}", "--model", "latest"], "exactly one of --classes or --vocab"),
        (
            ["{image}", "{tmp}/missing.png", *CLASSES, "--model", "latest"],
            "image not found (or not a file): '{tmp}/missing.png'",
        ),
    ],
)
def test_segment_input_errors_exit_2(
    trained_store: tuple[str, str],
    args: list[str],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store, image = trained_store
    fill = {"image": image, "store": store, "tmp": tmp_path}
    argv = [
        "segment",
        *(a.format(**fill) for a in args),
        "--out",
        str(tmp_path / "out"),
        "--store",
        store,
        "--config",
        "tiny",
    ]
    status, _, err = _run(argv, capsys)
    assert status == 2
    assert err.startswith("fmbseg: error: ")
    assert message.format(**fill) in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_segment_never_replaces_an_input_and_asks_before_replacing_outputs(
    trained_store: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store, source = trained_store
    photos = tmp_path / "photos"
    photos.mkdir()
    photo = photos / "photo.png"
    photo.write_bytes(Path(source).read_bytes())
    original = photo.read_bytes()
    base = ["segment", str(photo), *CLASSES, "--model", "latest", "--store", store]
    base += ["--config", "tiny"]
    for extra in ([], ["--overwrite"]):  # an input is never replaced, --overwrite or not
        status, _, err = _run([*base, "--out", str(photos), *extra], capsys)
        assert status == 2
        assert err == (
            f"fmbseg: error: --out {str(photos)!r} would replace input image {str(photo)!r} "
            "with its label map or overlay; choose another --out\n"
        )
        assert photo.read_bytes() == original and sorted(photos.iterdir()) == [photo]

    out = tmp_path / "out"
    out.mkdir()
    (out / "photo_overlay.png").write_bytes(b"mine")
    status, _, err = _run([*base, "--out", str(out)], capsys)
    assert status == 2
    assert err == (
        f"fmbseg: error: --out {str(out)!r}: {str(out / 'photo_overlay.png')!r} exists; "
        "pass --overwrite to replace existing outputs\n"
    )
    assert (out / "photo_overlay.png").read_bytes() == b"mine"
    assert not (out / "photo.png").exists()  # nothing written before the refusal

    status, stdout, err = _run([*base, "--out", str(out), "--overwrite"], capsys)
    assert status == 0, err
    assert (out / "photo_overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(out / "photo.png").size == Image.open(photo).size


def test_segment_output_names_never_collide(tmp_path: Path) -> None:
    from fmbseg.cli.segment import output_stems

    images = ["a/x.jpg", "b/x.png", "c/x_overlay.jpg", "x-2.jpg", "d/x.jpg"]
    stems = [Path(s).name for s in output_stems(images, str(tmp_path))]
    assert stems == ["x", "x-2", "x_overlay-2", "x-2-2", "x-3"]
    names = [n for s in stems for n in (f"{s}.png", f"{s}_overlay.png")]
    assert len(set(names)) == len(names)
