"""A rerun says what it reused: ``cached (fingerprint ...)``, ``resumed, k of n shards already
committed``, and each stage's counts and fingerprint when it commits (CLI output and the
Prefect run's log)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import httpx
import pytest
import yaml

from fmbseg.cli import main
from fmbseg.storage import ArtifactStore
from fmbseg.storage.store import MANIFEST
from tests.helpers.synthetic import VOCAB, synthetic_config, write_scenes

STAGES = ("index", "clip_dense", "sam_prompt", "sam_auto", "merge", "export")


def _reports(out: str) -> dict[str, list[str]]:
    """stage -> the report lines the CLI printed for it, in order."""
    found: dict[str, list[str]] = {}
    for line in out.splitlines():
        m = re.fullmatch(r"(\w+): (cached|resumed|done)\b.*", line.strip())
        if m and m.group(1) in STAGES:
            found.setdefault(m.group(1), []).append(line.strip())
    return found


@pytest.mark.slow
def test_annotate_rerun_says_cached_resumed_and_done(
    prefect_harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_scenes(tmp_path / "images", 6)
    config = tmp_path / "synthetic.yaml"
    cfg = synthetic_config(runtime={"executor": "local", "shard_size": 2, "device": "cpu"})
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    store_dir = tmp_path / "store"
    argv = [
        "annotate",
        "--images",
        str(tmp_path / "images"),
        "--classes",
        ",".join(VOCAB),
        "--store",
        str(store_dir),
        "--config",
        str(config),
    ]
    assert main(argv) == 0
    first = _reports(capsys.readouterr().out)
    store = ArtifactStore(str(store_dir))
    fps = {}
    for stage in STAGES:
        (line,) = first[stage]
        fp = re.search(r"\(fingerprint (\w+)\)", line).group(1)
        m = store.require_manifest(stage, fp)  # the fingerprint printed is the one committed
        assert line == (
            f"{stage}: done (fingerprint {fp}), 3 shards, 6 images, {m.rows} records, "
            f"{m.error_rows} errors"
        )
        fps[stage] = fp

    # sam_auto "interrupted": its commit and one shard's receipt gone
    base = store_dir / store.stage_rel("sam_auto", fps["sam_auto"])
    (base / MANIFEST).unlink()
    (base / "receipt-00001.json").unlink()
    assert main(argv) == 0
    again = _reports(capsys.readouterr().out)
    for stage in ("index", "clip_dense", "sam_prompt", "merge", "export"):
        m = store.require_manifest(stage, fps[stage])
        assert again[stage] == [
            f"{stage}: cached (fingerprint {fps[stage]}), 3 shards, 6 images, {m.rows} records, "
            f"{m.error_rows} errors"
        ]
    auto = store.require_manifest("sam_auto", fps["sam_auto"])
    assert again["sam_auto"] == [
        "sam_auto: resumed, 2 of 3 shards already committed",
        f"sam_auto: done (fingerprint {fps['sam_auto']}), 3 shards, 6 images, {auto.rows} "
        f"records, {auto.error_rows} errors",
    ]

    # the flow run's log (Prefect API) carries the same reports
    from prefect.logging.handlers import APILogHandler
    from prefect.settings import PREFECT_API_URL

    from fmbseg.flows.annotate import annotate_flow

    task_log = logging.getLogger("prefect.task_runs")  # tests run Prefect at WARNING
    level = task_log.level
    task_log.setLevel(logging.INFO)
    try:
        state = annotate_flow(
            str(tmp_path / "images"),
            str(store_dir),
            classes=list(VOCAB),
            config=str(config),
            return_state=True,
        )
    finally:
        task_log.setLevel(level)
    assert state.is_completed()
    APILogHandler().flush()
    run_id = str(state.state_details.flow_run_id)
    logs = httpx.post(
        f"{PREFECT_API_URL.value()}/logs/filter",
        json={"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200},
    ).json()
    messages = {log["message"] for log in logs}
    for stage in STAGES:
        assert any(
            msg.startswith(f"{stage}: cached (fingerprint {fps[stage]}), 3 shards, 6 images")
            for msg in messages
        ), (stage, sorted(messages))
