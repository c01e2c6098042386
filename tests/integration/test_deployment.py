"""prefect.yaml against a real Prefect server + process worker on loopback (issue 6, item 2).

Server, ``prefect deploy``, ``prefect deployment run`` and the worker are subprocesses with
their own PREFECT_HOME and SQLite DB (tests/integration/prefect_stack.py), as a user runs them.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from fmbseg.storage import ArtifactStore
from tests.integration.prefect_stack import (
    PREFECT,
    REPO,
    PrefectStack,
    flow_run_id,
    free_port,
    stop_process,
)

POOL = "fmbseg-process"
N_SAMPLES = 5  # fmbseg/data/samples.py
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[PrefectStack]:
    port = free_port()
    # the UI's API URL given as the README says (another name than the server's own address)
    s = PrefectStack(
        home=tmp_path / "prefect-home", port=port, ui_api_url=f"http://localhost:{port}/api"
    )
    try:
        s.start()
        yield s
    finally:
        s.stop()


def _deploy_all(stack: PrefectStack) -> dict[str, dict]:
    """``prefect deploy --all`` from the repository root; {name: deployment} from the API.

    (prefect 3.8.8 + fastapi >= 0.151 made this exit 1 with a 422; pyproject pins below.)
    """
    out = stack.cli("--no-prompt", "deploy", "--all")
    assert out.returncode == 0, out.stdout[-3000:]
    found = {}
    for flow_name, name in (
        ("annotate-and-train", "default"),
        ("annotate-and-train", "smoke"),
        ("retrain", "nightly"),
    ):
        assert f"Deployment '{flow_name}/{name}' successfully created" in out.stdout
        found[name] = stack.api("GET", f"/deployments/name/{flow_name}/{name}")
    return found


def _run_worker(stack: PrefectStack, run_id: str, log_path: Path, timeout_s: float) -> dict:
    """``prefect worker start --run-once`` until the flow run is terminal; its final state."""
    with log_path.open("ab") as log:
        worker = subprocess.Popen(
            [*PREFECT, "worker", "start", "--pool", POOL, "--run-once"],
            env=stack.env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            run = stack.api("GET", f"/flow_runs/{run_id}")
            if run["state_type"] in TERMINAL or time.monotonic() > deadline:
                return run
            if worker.poll() is not None and run["state_type"] == "SCHEDULED":
                # --run-once found nothing yet (the run was not due): poll again
                return _run_worker(stack, run_id, log_path, deadline - time.monotonic())
            time.sleep(1)
    finally:
        stop_process(worker)


@pytest.mark.slow
def test_smoke_deployment_runs_to_completed_on_a_worker(stack: PrefectStack, tmp_path: Path):
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    assert {d["name"] for d in spec["deployments"]} == {"default", "smoke", "nightly"}

    out = stack.cli("work-pool", "create", POOL, "--type", "process")
    assert out.returncode == 0, out.stdout[-3000:]
    deployed = _deploy_all(stack)
    default, smoke, nightly = deployed["default"], deployed["smoke"], deployed["nightly"]
    assert nightly["entrypoint"] == "fmbseg/flows/retrain.py:retrain_flow"
    assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["0 3 * * *"]
    assert nightly["parameters"]["mode"] == "finetune"
    # shipped paused (its parameters are placeholders); resumed as the README says
    (schedule,) = nightly["schedules"]
    assert schedule["active"] is False
    listed = stack.cli("deployment", "schedule", "ls", "retrain/nightly")
    assert listed.returncode == 0 and schedule["id"] in listed.stdout, listed.stdout[-2000:]
    resumed = stack.cli("deployment", "schedule", "resume", "retrain/nightly", schedule["id"])
    assert resumed.returncode == 0, resumed.stdout[-2000:]
    nightly = stack.api("GET", "/deployments/name/retrain/nightly")
    assert [s["active"] for s in nightly["schedules"]] == [True]
    # the UI asks the server where the API is: PREFECT_UI_API_URL, not the default port
    ui = httpx.get(f"http://127.0.0.1:{stack.port}/ui-settings", timeout=10).json()
    assert ui["api_url"] == stack.ui_api_url
    for dep in (default, smoke):
        assert dep["entrypoint"] == "fmbseg/flows/annotate_and_train.py:annotate_and_train_flow"
        assert dep["work_pool_name"] == POOL
        # no pull step in prefect.yaml -> `prefect deploy` records the directory it ran in
        assert dep["pull_steps"] == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}
        ]
    assert default["parameters"]["config"] == "default"
    assert smoke["parameters"]["config"] == "tiny"
    # smoke's own overrides plus the in-process executor (no Ray start-up on 2 CI cores)
    overrides = [*smoke["parameters"]["overrides"], "runtime.executor=local"]

    # no images parameter: the bundled sample photos, written into the store
    store_dir = tmp_path / "store"
    run = stack.cli(
        "deployment",
        "run",
        "annotate-and-train/smoke",
        "-p",
        f"store={store_dir}",
        "-p",
        f"overrides={json.dumps(overrides)}",
    )
    assert run.returncode == 0, run.stdout[-3000:]
    run_id = flow_run_id(run.stdout)

    worker_log = tmp_path / "worker.log"
    final = _run_worker(stack, run_id, worker_log, timeout_s=240)
    assert final["state_type"] == "COMPLETED", (
        f"flow run ended {final['state_type']}: {final['state']['message']}\n"
        f"{PrefectStack.tail(worker_log)}"
    )

    store = ArtifactStore(str(store_dir))
    lineage = json.loads((store_dir / "runs" / f"{run_id}.json").read_text())
    assert lineage["flow"] == "annotate-and-train"
    fps = lineage["stages"]
    assert lineage["images"] == store.url("samples")
    index = store.require_manifest("index", fps["index"])
    assert index.rows == N_SAMPLES
    merge = store.require_manifest("merge", fps["merge"])
    assert merge.rows > 0
    coco = json.loads((store_dir / "exports" / fps["export"] / "annotations.json").read_text())
    assert len(coco["images"]) == index.rows and coco["annotations"]  # one segment per class
    candidates = json.loads((store_dir / "exports" / fps["export"] / "candidates.json").read_text())
    assert len(candidates["annotations"]) == merge.rows
    name, version = lineage["model"]["name"], lineage["model"]["version"]
    model_dir = store_dir / "models" / name / version
    assert (model_dir / "weights.safetensors").stat().st_size > 0
    card = json.loads((model_dir / "card.json").read_text())
    assert json.dumps(card).count(fps["merge"]) >= 1  # the card names the labels it used

    # the pictures the UI shows: overlays and the loss curve embedded in markdown artifacts,
    # tables of plain values
    artifacts = {
        a["key"]: a
        for a in stack.api(
            "POST",
            "/artifacts/filter",
            json={
                "artifacts": {
                    "key": {"any_": ["annotate-gallery", "train-loss", "annotate-summary"]}
                },
            },
        )
    }
    gallery, loss = artifacts["annotate-gallery"], artifacts["train-loss"]
    assert gallery["type"] == "markdown" and gallery["data"].count("](data:image/jpeg;base64,") >= 1
    assert loss["type"] == "markdown" and "](data:image/png;base64," in loss["data"]
    summary = artifacts["annotate-summary"]
    rows = json.loads(summary["data"]) if isinstance(summary["data"], str) else summary["data"]
    cells = [str(v) for row in rows for v in row.values()]
    assert cells and not any(c.startswith(("{", "[")) or c == "None" for c in cells), cells
