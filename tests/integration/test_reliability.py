"""Reliability of real stages (issue 6): a Ray actor dies mid-stage; the whole flow is killed.

(a) clip_dense on a Ray actor pool whose worker process vanishes (``os._exit``) on one shard
    the first time: the stage still commits every image exactly once.
(b) the ``annotate`` flow in a subprocess is SIGKILLed after some clip_dense shards commit;
    a rerun leaves those shards' files untouched, processes only the missing shards, and
    ends with the same labels as an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import ray.cloudpickle
import yaml

import fmbseg.tasks.annotate.clip_dense as clip_dense
from fmbseg.config import load_config, replace
from fmbseg.storage import ArtifactStore
from fmbseg.tasks.annotate.index import run_index
from fmbseg.tasks.annotate.stages import run_declared
from tests.helpers.synthetic import VOCAB, run_pipeline, synthetic_config, write_scenes
from tests.integration.prefect_stack import REPO, stop_process

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _dies_once_on(base: type, shard_to_kill: int, marker: str) -> type:
    """A subclass of the stage worker ``base`` whose process exits on ``shard_to_kill``,
    the first time only (``marker`` records that it did)."""

    class DiesOnce(base):  # type: ignore[misc, valid-type]
        def process(self, shard: int, spec: Any) -> Any:
            if shard == shard_to_kill and not os.path.exists(marker):
                Path(marker).touch()
                os._exit(1)  # the actor's process vanishes mid-shard, no cleanup
            return super().process(shard, spec)

    return DiesOnce


@pytest.mark.slow
def test_actor_killed_mid_stage_every_image_labelled_once(
    ray_session, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scenes = write_scenes(tmp_path / "images", 8)
    store = ArtifactStore(str(tmp_path / "store"))
    tiny = load_config("tiny")
    local = replace(tiny, runtime={"executor": "local", "shard_size": 2})
    index_fp = run_index(store, str(tmp_path / "images"), local)
    marker = tmp_path / "died-on-shard-2"
    # the stage's own worker class, looked up by clip_dense.prepare at call time
    monkeypatch.setattr(
        clip_dense, "ClipDenseWorker", _dies_once_on(clip_dense.ClipDenseWorker, 2, str(marker))
    )
    on_ray = replace(
        local,
        runtime={
            "executor": "ray",
            "num_workers": 2,
            "cpus_per_worker": 1.0,
            "max_retries": 2,
        },
    )
    fp = run_declared(store, on_ray, "clip_dense", {"index": index_fp}, vocabulary=VOCAB)[
        "clip_dense"
    ]

    assert marker.exists()  # shard 2's first attempt really killed its actor
    manifest = store.require_manifest("clip_dense", fp)
    assert manifest.num_shards == 4
    ids = Counter(store.read_table("clip_dense", fp).column("image_id").to_pylist())
    index_ids = store.read_table("index", index_fp).column("image_id").to_pylist()
    assert len(index_ids) == len(scenes) == 8
    assert ids == Counter(index_ids)  # every image exactly once: none lost, none twice
    assert store.read_table("clip_dense", fp, "errors").num_rows == 0


# ---- (b) kill the whole flow, rerun -----------------------------------------------------------

N_IMAGES = 6
KILL_AFTER = 2  # clip_dense receipts seen before the SIGKILL

_FLOW_SCRIPT = """
import sys, time
import tests.helpers.synthetic  # registers the stand-in models
import fmbseg.tasks.annotate.clip_dense as clip_dense
from fmbseg.tasks.annotate.stages import run_declared
from fmbseg.flows.annotate import annotate_flow

slow = clip_dense.ClipDenseWorker.process
def process(self, shard, spec):  # slow enough to be killed between two shards
    time.sleep(1.0)
    return slow(self, shard, spec)
clip_dense.ClipDenseWorker.process = process
images, store, config = sys.argv[1:4]
annotate_flow(images, store, classes=",".join(tests.helpers.synthetic.VOCAB), config=config)
"""


def _files(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir())}


def _per_image(store: ArtifactStore, fp: str) -> Counter[tuple[str, str, str]]:
    t = store.read_table("merge", fp).select(["image_id", "category", "source"]).to_pylist()
    return Counter((r["image_id"], r["category"], str(r["source"])) for r in t)


@pytest.mark.slow
def test_killed_flow_resumes_from_committed_shards(
    prefect_harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_scenes(tmp_path / "images", N_IMAGES)
    cfg = synthetic_config(runtime={"executor": "local", "shard_size": 1, "device": "cpu"})
    config = tmp_path / "synthetic.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    store_dir = tmp_path / "store"
    script = tmp_path / "flow.py"
    script.write_text(textwrap.dedent(_FLOW_SCRIPT))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PYTHONPATH=str(REPO),
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        # its own temporary server: 20 s by default, too short on a busy 2-core box
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
    )
    log = tmp_path / "flow.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / "images"), str(store_dir), str(config)],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    stage_root = store_dir / "stages" / "clip_dense"
    try:
        deadline = time.monotonic() + 240  # the temporary server may take up to 120 s
        while len(list(stage_root.glob("*/receipt-*.json"))) < KILL_AFTER:
            assert proc.poll() is None, f"flow ended before the kill:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no receipts:\n{log.read_text()[-3000:]}"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the flow and everything it started
        proc.wait(timeout=30)
    finally:
        stop_process(proc)

    (fp_dir,) = stage_root.iterdir()
    assert not (fp_dir / "_manifest.json").exists()  # killed before the commit
    before = _files(fp_dir)
    done = sorted(int(n[8:13]) for n in before if n.startswith("receipt-"))
    assert KILL_AFTER <= len(done) < N_IMAGES
    kept = {n: v for n, v in before.items() if n.startswith(("receipt-", "part-"))}

    from fmbseg.flows.annotate import annotate_flow

    called: list[int] = []
    real = clip_dense.ClipDenseWorker.process

    def recording(self, shard: int, spec: Any) -> Any:
        called.append(shard)
        return real(self, shard, spec)

    monkeypatch.setattr(clip_dense.ClipDenseWorker, "process", recording)
    out = annotate_flow(
        str(tmp_path / "images"), str(store_dir), classes=",".join(VOCAB), config=str(config)
    )

    assert sorted(called) == [s for s in range(N_IMAGES) if s not in done]  # only the missing
    after = _files(fp_dir)
    committed = [
        n
        for n in kept
        if n.startswith(tuple(f"{k}-{s:05d}" for s in done for k in ("part", "receipt")))
    ]
    assert len(committed) >= 2 * len(done)
    for name in committed:  # same bytes and same mtime: not rewritten
        assert after.get(name) == kept[name], f"{name} was rewritten or removed"
    store = ArtifactStore(str(store_dir))
    fps = out.fingerprints
    ids = Counter(store.read_table("clip_dense", fps["clip_dense"]).column("image_id").to_pylist())
    assert len(ids) == N_IMAGES and set(ids.values()) == {1}  # every image exactly once

    clean = ArtifactStore(str(tmp_path / "clean"))
    clean_fps = run_pipeline(clean, cfg, tmp_path / "images")
    assert clean_fps["merge"] == fps["merge"]
    assert _per_image(store, fps["merge"]) == _per_image(clean, clean_fps["merge"])
