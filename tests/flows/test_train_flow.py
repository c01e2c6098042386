"""The ``train`` flow under Prefect: labels resolution, model version + card, cache hit,
progress and artifacts, lineage, and clear errors for labels that are not committed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest
import torch

from fmbseg.engine.runner import add_reporter
from fmbseg.flows.common import observe_progress
from fmbseg.flows.train import TrainInputs, resolve_labels, train_flow
from fmbseg.storage import ArtifactStore
from fmbseg.storage.models import ModelRegistry
from fmbseg.storage.store import NotCommittedError
from tests.helpers.labelled import LABELS_A, LABELS_B, OVERRIDES, labelled_world
from tests.helpers.synthetic import VOCAB
from tests.helpers.world import INDEX_FP, LABELS_FP


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _latest_artifact(key: str) -> dict:
    from prefect.settings import PREFECT_API_URL

    # GET /artifacts/{key}/latest (the client's filter helpers send fields its server rejects)
    return httpx.get(f"{PREFECT_API_URL.value()}/artifacts/{key}/latest").json()


def test_resolve_labels_reads_lineage_from_the_merge_manifest(tmp_path: Path) -> None:
    store = labelled_world(tmp_path, second=True).store
    want_b = TrainInputs(LABELS_B, INDEX_FP, VOCAB)
    assert resolve_labels(store, "latest") == want_b  # B was committed after A
    assert resolve_labels(store, LABELS_A) == TrainInputs(LABELS_A, INDEX_FP, VOCAB)
    with pytest.raises(NotCommittedError, match=r"labels 'nope': no committed pseudo-labels"):
        resolve_labels(store, "nope")
    with pytest.raises(NotCommittedError, match=LABELS_B):  # the message lists what exists
        resolve_labels(store, "nope")
    with pytest.raises(ValueError, match=r"does not record \['index', 'vocabulary'\]"):
        resolve_labels(store, LABELS_FP)  # committed without lineage meta
    empty = ArtifactStore(str(tmp_path / "empty"))
    with pytest.raises(NotCommittedError, match="run `fmbseg annotate` first"):
        resolve_labels(empty, "latest")


def test_train_flow_trains_once_then_hits_the_cache(prefect_harness, tmp_path: Path) -> None:
    world = labelled_world(tmp_path, second=True)
    store_dir = world.store.uri
    reports: list[tuple[str, int, int]] = []
    said: list[str] = []
    remove = add_reporter(said.append)
    try:
        with observe_progress(lambda stage, done, total: reports.append((stage, done, total))):
            state = train_flow(store_dir, "latest", "tiny", OVERRIDES, return_state=True)
    finally:
        remove()
    result = state.result()
    # one line per stage: the features pass, then the training that used them
    assert [m.split(":")[0] for m in said] == ["dino_features", "train"], said
    assert said[1] == f"train: done (fingerprint {result.model.train_fp}), model fmbseg-align:v0001"
    registry = ModelRegistry(world.store)
    assert (result.model.name, result.model.version) == ("fmbseg-align", "v0001")
    assert registry.versions("fmbseg-align") == ["v0001"]
    assert result.cached is False and result.model.labels == LABELS_B  # latest = newest merge
    card = registry.card("fmbseg-align", "v0001")
    assert card["data"]["labels_fp"] == LABELS_B and card["data"]["index_fp"] == INDEX_FP
    assert card["vocabulary"] == list(VOCAB) and card["data"]["images"] == 4
    assert json.loads(Path(result.model.card.removeprefix("file://")).read_text()) == card
    curve = Path(result.model.loss_curve.removeprefix("file://"))
    assert curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (
        len(result.model.epoch_losses) == 2 and result.model.final_loss == card["epoch_losses"][-1]
    )
    # epochs reach the progress listeners (the CLI's bars), after the feature-cache shards
    assert [r for r in reports if r[0] == "train"] == [
        ("train", 0, 2),
        ("train", 1, 2),
        ("train", 2, 2),
    ]
    assert ("dino_features", 2, 2) in reports  # features of all 8 indexed images, 2 shards

    run_id = str(state.state_details.flow_run_id)
    lineage = world.store.read_run(run_id)
    assert lineage["flow"] == "train" and lineage["labels"] == "latest"
    assert lineage["stages"]["merge"] == LABELS_B and lineage["stages"]["index"] == INDEX_FP
    assert lineage["stages"]["train"] == result.model.train_fp == card["data"]["train_fp"]
    assert lineage["model"] == {
        "name": "fmbseg-align",
        "version": "v0001",
        "card": result.model.card,
    }
    loss = _latest_artifact("train-loss")
    assert loss["flow_run_id"] == run_id and loss["type"] == "markdown"
    for epoch, value in enumerate(result.model.epoch_losses, 1):
        assert f"| {epoch} | {value:.4f} |" in loss["data"]
    assert result.model.loss_curve in loss["data"]
    table = json.loads(_latest_artifact("train-model")["data"])
    assert table[0]["version"] == "v0001" and table[0]["card"] == result.model.card
    assert table[0]["labels"] == LABELS_B
    assert _latest_artifact("train-progress")["data"] == 100.0

    # the same labels by fingerprint: a cache hit, nothing retrained
    weights = Path(result.model.weights.removeprefix("file://"))
    before = os.stat(weights).st_mtime_ns
    reports.clear()
    with observe_progress(lambda stage, done, total: reports.append((stage, done, total))):
        again = train_flow(store_dir, LABELS_B, "tiny", OVERRIDES)
    assert again.cached is True
    assert (again.model.version, again.model.card) == ("v0001", result.model.card)
    assert registry.versions("fmbseg-align") == ["v0001"]
    assert os.stat(weights).st_mtime_ns == before and reports == []


def test_train_flow_rejects_labels_that_are_not_committed(prefect_harness, tmp_path: Path) -> None:
    world = labelled_world(tmp_path)
    with pytest.raises(NotCommittedError, match=r"labels 'deadbeef': no committed") as err:
        train_flow(world.store.uri, "deadbeef", "tiny", OVERRIDES)
    assert LABELS_A in str(err.value)
    assert ModelRegistry(world.store).versions("fmbseg-align") == []
