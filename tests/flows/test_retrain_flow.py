"""The ``retrain`` flow: only new images are annotated, the model retrains on every batch,
and the champion pointer moves only when the new version is at least as good."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import yaml
from PIL import Image

from fmbseg.cli import main
from fmbseg.cli.retrain import print_retrain
from fmbseg.flows.retrain import retrain_flow
from fmbseg.models.registry import register_model
from fmbseg.storage import ArtifactStore
from fmbseg.storage.models import ModelRegistry
from fmbseg.tasks.train.ledger import read_ledger
from tests.helpers.synthetic import VOCAB, make_scene, synthetic_config
from tests.helpers.world import ColourDino

DINO_NAME = "synthetic_colour_dino"
N, M = 6, 2
MODEL = "fmbseg-align"


def _build_colour_dino(
    weights: str | None, device: torch.device, img_size: int = 56, **kwargs: Any
) -> ColourDino:
    return ColourDino(input_size=img_size, name=DINO_NAME)


register_model(DINO_NAME, "dino", _build_colour_dino, "test stand-in: colour-reading DINOv2")


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def write_images(folder: Path, seeds: range) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        scene = make_scene(seed, 48, 96, 3)
        Image.fromarray(scene.image).save(folder / f"{scene.image_id}.png")


def write_held_out(root: Path, seeds: range) -> None:
    """Scenes and their truth in the ``folder`` dataset layout."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "classes.txt").write_text("\n".join(VOCAB) + "\n")
    for seed in seeds:
        scene = make_scene(seed, 48, 96, 3)
        Image.fromarray(scene.image).save(root / "images" / f"{scene.image_id}.png")
        Image.fromarray(scene.truth, "L").save(root / "labels" / f"{scene.image_id}.png")


def config_file(tmp_path: Path) -> str:
    cfg = synthetic_config(
        models={"dino": DINO_NAME, "dino_weights": None},
        train={"epochs": 2, "lr": 0.05, "batch_size": 4},
    )
    path = tmp_path / "synthetic.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return str(path)


def manifests(store: ArtifactStore, fps: dict[str, str]) -> dict[str, str]:
    return {
        s: store.read_bytes(f"stages/{s}/{fp}/_manifest.json").decode()
        for s, fp in fps.items()
        if s != "export"
    }


@pytest.mark.slow
def test_retrain_annotates_only_new_images_and_promotes_by_the_rule(
    prefect_harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from prefect.settings import PREFECT_API_URL

    images, held = tmp_path / "images", tmp_path / "held"
    write_images(images, range(N))
    (images / "broken.png").write_bytes(b"not an image")  # an index error, covered too
    write_held_out(held, range(100, 104))
    store_dir = str(tmp_path / "store")
    args = dict(
        images=str(images),
        store=store_dir,
        classes=list(VOCAB),
        config=config_file(tmp_path),
        eval_dataset="folder",
        eval_data_root=str(held),
    )
    st = ArtifactStore(store_dir)
    reg = ModelRegistry(st)

    # Run 1: every image is new; the first model becomes the champion.
    first = retrain_flow(**args)
    assert (first.listed, first.new_images, first.annotated) == (N + 1, N + 1, N)
    assert first.batch == 1 and first.model.version == "v0001"
    assert first.promoted is True and "no champion yet" in first.reason
    assert reg.champion(MODEL) == "v0001"
    card1 = reg.card(MODEL, "v0001")
    assert card1["promotion"]["promoted"] is True
    assert card1["retrain"]["batches"][0]["images"] == N and card1["data"]["images"] == N
    assert 0.0 <= first.evaluation.metrics.mIoU <= 1.0
    batch1 = manifests(st, first.fingerprints)

    # Run 2: only the M new images are annotated; v0002 trains on all N + M (fine-tuned).
    write_images(images, range(N, N + M))
    second = retrain_flow(**args, mode="finetune")
    fps2 = second.fingerprints
    assert (second.listed, second.new_images, second.annotated) == (N + M + 1, M, M)
    assert st.require_manifest("index", fps2["index"]).rows == M
    assert st.require_manifest("clip_dense", fps2["clip_dense"]).rows == M
    merged = st.read_table("merge", fps2["merge"]).column("image_uri").unique().to_pylist()
    assert sorted(Path(u).name for u in merged) == [f"scene-{s:04d}.png" for s in range(N, N + M)]
    assert manifests(st, first.fingerprints) == batch1  # batch 1 untouched
    assert len(st.committed_fingerprints("clip_dense")) == 2
    assert second.model.version == "v0002" and second.batch == 2
    card2 = reg.card(MODEL, "v0002")
    assert card2["data"]["images"] == N + M and len(card2["data"]["label_sets"]) == 2
    assert [b["batch"] for b in card2["retrain"]["batches"]] == [1, 2]
    assert card2["retrain"]["init_from"] == f"{MODEL}:v0001" == card2["data"]["init_from"]
    ev = second.evaluation
    new, old = ev.metrics.mIoU, ev.champion_metrics.mIoU
    assert ev.metrics.images == ev.champion_metrics.images == 4  # same held-out set
    assert second.promoted is (new >= old)
    assert reg.champion(MODEL) == ("v0002" if new >= old else "v0001")
    assert card2["promotion"]["promoted"] is (new >= old)
    assert card2["promotion"]["candidate_metrics"]["mIoU"] == new
    assert card2["promotion"]["champion_metrics"]["mIoU"] == old
    assert card2["promotion"]["previous_champion"] == "v0001"
    history = st.read_json(f"models/{MODEL}/champion.json")["history"]
    assert [(h["version"], h["promoted"]) for h in history] == [
        ("v0001", True),
        ("v0002", new >= old),
    ]

    print_retrain(second)
    printed = capsys.readouterr().out
    assert f"{N + M + 1} images listed, {M} new, {M} annotated (batch 2)" in printed
    assert f"{MODEL}:v0002 on {N + M} images" in printed
    assert ("promoted to champion" if new >= old else "not promoted") in printed

    # Run 3 (through the CLI): nothing new -> nothing annotated, no new version.
    argv = [
        "retrain",
        "--images",
        str(images),
        "--store",
        store_dir,
        "--classes",
        ",".join(VOCAB),
        "--config",
        args["config"],
        "--eval-dataset",
        "folder",
        "--eval-data-root",
        str(held),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"{N + M + 1} images listed, 0 new, 0 annotated; 2 batches in all" in printed
    assert "not retrained: nothing new: fmbseg-align:v0002 is trained on all 2 batches" in printed
    assert reg.versions(MODEL) == ["v0001", "v0002"]
    assert len(st.committed_fingerprints("index")) == 2
    ledger = read_ledger(st, MODEL)
    assert [(b["batch"], b["images"]) for b in ledger["batches"]] == [(1, N), (2, M)]
    assert [m["version"] for m in ledger["models"]] == ["v0001", "v0002"]
    assert [r["new_images"] for r in ledger["runs"]] == [N + 1, M, 0]
    assert ledger["runs"][-1]["reason"].startswith("nothing new")

    # Run 4: nothing new, but another train config: retrained (no relabelling); without a
    # held-out set the new version is not evaluated, so the champion stays.
    champion = reg.champion(MODEL)
    fourth = retrain_flow(
        **{**args, "eval_dataset": None, "eval_data_root": None}, overrides=["train.epochs=1"]
    )
    assert (fourth.new_images, fourth.model.version) == (0, "v0003")
    assert fourth.promoted is False and "not evaluated" in fourth.reason
    assert reg.champion(MODEL) == champion
    assert reg.card(MODEL, "v0003")["promotion"]["promoted"] is False
    assert len(st.committed_fingerprints("clip_dense")) == 2
    api = PREFECT_API_URL.value()
    table = httpx.get(f"{api}/artifacts/retrain-summary/latest").json()
    rows = {r["what"]: r["value"] for r in json.loads(table["data"])}
    assert rows["new images found"] == "0" and rows["model version"] == f"{MODEL}:v0003"
    assert rows["promoted"] == "False" and "not evaluated" in rows["reason"]
    lineage = json.loads(
        st.read_bytes(
            next(
                f"runs/{r}"
                for r in st.ls("runs")
                if st.read_json(f"runs/{r}")["flow"] == "retrain"
                and st.read_json(f"runs/{r}")["reason"].startswith("nothing new")
            )
        )
    )
    assert lineage["model"] is None and len(lineage["batches"]) == 2


@pytest.mark.slow
def test_crash_before_the_batch_is_recorded_relabels_nothing(
    prefect_harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fmbseg.flows import retrain as retrain_module

    write_images(tmp_path / "images", range(4))
    store_dir = str(tmp_path / "store")
    args = dict(
        images=str(tmp_path / "images"),
        store=store_dir,
        classes=list(VOCAB),
        config=config_file(tmp_path),
    )

    def crash(*a: Any, **k: Any) -> None:
        raise RuntimeError("killed after the merge committed")

    monkeypatch.setattr(retrain_module.ledger_, "append_batch", crash)
    with pytest.raises(RuntimeError, match="killed"):
        retrain_flow(**args)
    monkeypatch.undo()
    st = ArtifactStore(store_dir)
    committed = {s: st.committed_fingerprints(s) for s in ("index", "clip_dense", "merge")}
    assert all(len(fps) == 1 for fps in committed.values())
    before = manifests(st, {s: fps[0] for s, fps in committed.items()})
    assert read_ledger(st, MODEL)["batches"] == []

    out = retrain_flow(**args)  # the same 4 images are new: same fingerprints, cache hits
    assert out.new_images == 4 and out.batch == 1 and out.model.version == "v0001"
    assert {s: [out.fingerprints[s]] for s in committed} == committed
    assert manifests(st, {s: fps[0] for s, fps in committed.items()}) == before
    assert out.promoted is True  # the first model, not evaluated


def test_retrain_rejects_bad_input_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mode 'warm'"):
        retrain_flow.fn(str(tmp_path), str(tmp_path / "store"), classes="cat,dog", mode="warm")
    with pytest.raises(ValueError, match="both eval_dataset and eval_data_root"):
        retrain_flow.fn(
            str(tmp_path), str(tmp_path / "store"), classes="cat", eval_dataset="folder"
        )
    assert not (tmp_path / "store").exists()


def test_retrain_cli_input_errors_exit_2(tmp_path: Path, capsys) -> None:
    base = ["retrain", "--images", str(tmp_path), "--store", str(tmp_path / "store")]
    assert main([*base, "--classes", "cat", "--eval-dataset", "folder"]) == 2
    assert "both --eval-dataset and --eval-data-root" in capsys.readouterr().err
    assert main([*base, "--classes", "cat,Cat"]) == 2
    assert "duplicate" in capsys.readouterr().err
    assert not (tmp_path / "store").exists()


@pytest.mark.slow
def test_annotate_and_train_evaluates_and_promotes_by_the_rule(
    prefect_harness, tmp_path: Path
) -> None:
    from fmbseg.flows.annotate_and_train import annotate_and_train_flow

    images, held = tmp_path / "images", tmp_path / "held"
    write_images(images, range(4))
    write_held_out(held, range(100, 103))
    store_dir = str(tmp_path / "store")
    args = dict(
        images=str(images),
        store=store_dir,
        classes=",".join(VOCAB),
        config=config_file(tmp_path),
        eval_dataset="folder",
        eval_data_root=str(held),
    )
    reg = ModelRegistry(ArtifactStore(store_dir))

    first = annotate_and_train_flow(**args)
    assert first.training.model.version == "v0001" and first.evaluation.promoted is True
    assert first.evaluation.champion_metrics is None
    assert first.evaluation.metrics.images == 3
    miou1 = first.evaluation.metrics.mIoU
    assert reg.card(MODEL, "v0001")["promotion"]["candidate_metrics"]["mIoU"] == miou1

    # Another training setting: v0002 is evaluated beside the champion on the same set.
    second = annotate_and_train_flow(**args, overrides=["train.lr=0.0001"])
    assert second.annotation.fingerprints == first.annotation.fingerprints  # the labels were reused
    ev = second.evaluation
    assert second.training.model.version == "v0002"
    assert ev.champion_metrics.mIoU == miou1
    assert ev.promoted == (ev.metrics.mIoU >= miou1)
    assert reg.champion(MODEL) == ("v0002" if ev.promoted else "v0001")
    history = reg.champion_record(MODEL)["history"]
    assert [(d["version"], d["promoted"]) for d in history] == [
        ("v0001", True),
        ("v0002", ev.promoted),
    ]
    assert reg.card(MODEL, "v0002")["promotion"]["reason"] == ev.reason
