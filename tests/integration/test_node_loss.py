"""Losing a Ray node never hangs a stage (issue 21): real nodes on loopback, one SIGKILLed.

A head and a worker node (one CPU each, one actor each) run the index stage, slowed down,
from a driver subprocess (the session's own ``ray.init`` in conftest cannot join another
cluster). The worker node's raylet is SIGKILLed mid-stage: its actor's shards go back to the
queue, the replacement actor finds no room and holds no shards, so the remaining shards run
on the head's actor; after ``placement_timeout_s`` the replacement is dropped with a warning.
Then a third node joins and the pool grows onto it. Every image is indexed exactly once.

The nodes are ``ray.cluster_utils.Cluster`` nodes (each its own raylet and object store)
kept by a subprocess: ``ray start`` refuses to add a node to a cluster pinned to loopback
(``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``), and without that pin Ray binds the machine's
outward address.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest

from fmbseg.storage import ArtifactStore
from tests.helpers.synthetic import write_scenes
from tests.integration.prefect_stack import stop_process
from tests.integration.ray_nodes import ray_env

N_IMAGES = 12
HOLD_FROM = 8  # shards >= this wait while the gate file exists (until the third node joins)

# Keeps the cluster: writes its address and each node's (node id, raylet pid) to
# nodes.json, adds a node when the file "add" appears, runs until killed.
KEEPER = """
import json, os, sys, time
from ray import ray_constants
from ray.cluster_utils import Cluster

folder = sys.argv[1]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
nodes = [cluster.head_node, cluster.add_node(num_cpus=1)]

def publish():
    info = {"address": cluster.address, "nodes": [
        [n.node_id, n.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid]
        for n in nodes]}
    with open(os.path.join(folder, "nodes.tmp"), "w") as f:
        json.dump(info, f)
    os.replace(os.path.join(folder, "nodes.tmp"), os.path.join(folder, "nodes.json"))

publish()
while True:
    if os.path.exists(os.path.join(folder, "add")):
        os.remove(os.path.join(folder, "add"))
        nodes.append(cluster.add_node(num_cpus=1))
        publish()
    time.sleep(0.1)
"""

DRIVER = """
import json, logging, os, sys, time
import ray
import fmbseg.tasks.annotate.index as index
from fmbseg.config import load_config, replace
from fmbseg.storage import ArtifactStore

images, store, address, marks, gate, hold_from = sys.argv[1:7]

class SlowIndexWorker(index.IndexWorker):  # pickled by value: defined in __main__
    def process(self, shard, spec):
        time.sleep(0.5)
        while shard >= int(hold_from) and os.path.exists(gate):
            time.sleep(0.1)
        out = super().process(shard, spec)
        node = ray.get_runtime_context().get_node_id()
        open(os.path.join(marks, f"{shard}.{node}.{time.monotonic_ns()}"), "w").close()
        return out

index.IndexWorker = SlowIndexWorker
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
ray.init(address=address, logging_level=logging.WARNING)
while len([n for n in ray.nodes() if n["Alive"]]) < 2:
    time.sleep(0.2)
cfg = replace(load_config("tiny"), runtime={
    "executor": "ray", "ray_address": address, "num_workers": 2, "cpus_per_worker": 1.0,
    "shard_size": 1, "max_retries": 3, "placement_timeout_s": 5.0})
started = time.monotonic()
fp = index.run_index(ArtifactStore(store), images, cfg)
print(json.dumps({"fp": fp, "seconds": time.monotonic() - started}), flush=True)
"""


def _nodes_with_marks(marks: Path) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for p in marks.iterdir():
        shard, node, _ = p.name.split(".")
        out.setdefault(node, []).append(int(shard))
    return out


def _wait(what: str, check, log: Path, proc: subprocess.Popen, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert proc.poll() is None, f"driver ended while waiting for {what}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no {what}:\n{log.read_text()[-4000:]}"
        time.sleep(0.1)


@pytest.mark.slow
def test_node_killed_mid_stage_run_completes_on_the_other(tmp_path: Path) -> None:
    started = time.monotonic()
    write_scenes(tmp_path / "images", N_IMAGES)
    home = tmp_path / "home"
    home.mkdir()
    # the GCS notices a dead node within ~2 s instead of ~30 s
    env = ray_env(
        home,
        RAY_health_check_period_ms="500",
        RAY_health_check_timeout_ms="500",
        RAY_health_check_failure_threshold="3",
    )
    marks, gate, keep = tmp_path / "marks", tmp_path / "gate", tmp_path / "keeper"
    marks.mkdir(), keep.mkdir()
    gate.touch()
    keeper_log, log = tmp_path / "keeper.log", tmp_path / "driver.log"
    ray_tmp = tempfile.mkdtemp(prefix="fr", dir="/tmp")  # sessions; socket paths must be short
    with keeper_log.open("wb") as out:
        keeper = subprocess.Popen(
            [sys.executable, "-c", KEEPER, str(keep)],
            env={**env, "RAY_TMPDIR": ray_tmp},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    driver: subprocess.Popen | None = None
    try:
        _wait("the cluster", lambda: (keep / "nodes.json").exists(), keeper_log, keeper)
        info = json.loads((keep / "nodes.json").read_text())
        (head, head_raylet), (lost, lost_raylet) = info["nodes"]
        with log.open("wb") as out:
            driver = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    DRIVER,
                    str(tmp_path / "images"),
                    str(tmp_path / "store"),
                    info["address"],
                    str(marks),
                    str(gate),
                    str(HOLD_FROM),
                ],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        # both actors have finished a shard: SIGKILL the worker node's raylet
        _wait(
            "shards on both nodes",
            lambda: set(_nodes_with_marks(marks)) == {head, lost},
            log,
            driver,
        )
        # the node is gone: its raylet and the worker processes it started (the actor's)
        children = subprocess.run(
            ["pgrep", "-P", str(lost_raylet)], capture_output=True, text=True
        ).stdout.split()
        for pid in [lost_raylet, *map(int, children)]:
            os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        _wait(
            "a dropped replacement",
            lambda: "was not placed within 5 s" in log.read_text(),
            log,
            driver,
        )
        text = log.read_text()
        assert "worker died on shard" in text and "replacing it" in text
        assert "(waits for 1 CPU); dropped, continuing with 1" in text
        # the shards after the kill ran on the head alone, up to the held ones
        assert len(_nodes_with_marks(marks)[head]) >= 2
        # a node comes back: the pool grows onto it, then the held shards run
        (keep / "add").touch()
        _wait(
            "the pool growing",
            lambda: "a worker was placed; 2 in the pool" in log.read_text(),
            log,
            driver,
        )
        gate.unlink()
        driver.wait(timeout=180)
        text = log.read_text()
        assert driver.returncode == 0, text[-4000:]
        assert time.monotonic() - killed_at < 120  # no hang after the kill
    finally:
        if driver is not None:
            stop_process(driver)
        os.killpg(keeper.pid, signal.SIGKILL)  # the cluster's every process
        keeper.wait(timeout=30)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    done = _nodes_with_marks(marks)
    (new,) = set(done) - {head, lost}
    assert done[new]  # the third node took shards
    assert max(done[lost]) < HOLD_FROM  # nothing ran on the lost node after the kill
    store = ArtifactStore(str(tmp_path / "store"))
    (fp,) = store.committed_fingerprints("index")
    ids = Counter(store.read_table("index", fp).column("image_id").to_pylist())
    assert len(ids) == N_IMAGES and set(ids.values()) == {1}  # every image exactly once
    print(f"node-loss test wall time: {time.monotonic() - started:.1f} s")
