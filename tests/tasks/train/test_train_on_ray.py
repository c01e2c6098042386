"""Where the training loop runs (issue 21): a Ray worker holding GPUs when the cluster has
them, this process otherwise; the card records which (``trained_in``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fmbseg.storage import ModelRegistry
from fmbseg.tasks.train.stages import run_train
from tests.helpers.synthetic import VOCAB
from tests.helpers.world import INDEX_FP, LABELS_FP
from tests.integration.ray_nodes import ray_env
from tests.tasks.train.conftest import tiny_config

# A driver with its own local Ray that declares one GPU (a resource count: the task gets
# it, torch then finds no CUDA and trains on the CPU, as runtime.device=cpu asks anyway).
DRIVER = """
import json, os, sys
from pathlib import Path
import ray
from fmbseg.storage import ModelRegistry
from fmbseg.tasks.train.stages import run_train
from fmbseg.tasks.train.loop import load_checkpoint
from tests.helpers.synthetic import VOCAB
from tests.tasks.train.conftest import tiny_config
from tests.helpers.world import INDEX_FP, LABELS_FP, make_world

world = make_world(Path(sys.argv[1]))
ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, logging_level="ERROR")
cfg = tiny_config("runtime.executor=ray", "train.epochs=2", "runtime.device=cpu",
                  "runtime.num_workers=1", "runtime.gpus_per_worker=1")
reports = []
name, version = run_train(world.store, cfg, LABELS_FP, INDEX_FP, list(VOCAB),
                          progress=lambda done, total: reports.append((done, total)))
card = ModelRegistry(world.store).card(name, version)
fp = card["data"]["train_fp"]
again = run_train(world.store, cfg, LABELS_FP, INDEX_FP, list(VOCAB))
print(json.dumps({
    "driver_pid": os.getpid(), "driver_node": ray.get_runtime_context().get_node_id(),
    "trained_in": card["trained_in"], "epochs": reports,
    "losses": card["epoch_losses"], "checkpoint_epoch": load_checkpoint(world.store, fp)["epoch"],
    "committed": world.store.manifest("train", fp).meta, "again": list(again),
    "version": version, "name": name,
}))
"""


@pytest.mark.slow
def test_training_runs_in_a_ray_worker_when_the_cluster_has_gpus(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    run = subprocess.run(
        [sys.executable, "-c", DRIVER, str(tmp_path / "world")],
        env=ray_env(home),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    where = out["trained_in"]
    assert where["pid"] != out["driver_pid"]  # not the driver: a Ray worker process
    assert where["ray_node"] == out["driver_node"] and where["device"] == "cpu"
    assert out["epochs"] == [
        [0, 2],
        [1, 2],
        [2, 2],
    ]  # the worker's epoch reports reached the driver
    assert len(out["losses"]) == 2
    assert out["checkpoint_epoch"] == 2  # checkpoints and commit in the store, as locally
    assert out["committed"] == {"model": out["name"], "version": out["version"]}
    assert out["again"] == [out["name"], out["version"]]  # committed: not trained again


def test_training_runs_here_without_ray(world, encoder, text_model) -> None:
    name, version = run_train(
        world.store,
        tiny_config("train.epochs=1"),
        LABELS_FP,
        INDEX_FP,
        list(VOCAB),
        encoder=encoder,
        text_model=text_model,
    )
    where = ModelRegistry(world.store).card(name, version)["trained_in"]
    assert where["pid"] == os.getpid() and where["device"] == "cpu"
