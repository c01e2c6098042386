"""Small jobs start fast (issue 19 item 4): a one-shard stage with no ``--ray-address``
runs in the CLI's process without starting Ray, and when Ray does start, its start-up
notices (token authentication, the dashboard URL) stay out of the default output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.synthetic import write_scenes
from tests.integration.ray_nodes import ray_env

# The CLI in a fresh interpreter (this one may have started Ray for other tests), then
# whether that interpreter started Ray.
DRIVER = """
import sys, time
from fmbseg.cli import main
started = time.monotonic()
rc = main(sys.argv[1:])
ray = sys.modules.get("ray")
print(f"rc={rc} ray_started={ray is not None and ray.is_initialized()} "
      f"seconds={time.monotonic() - started:.1f}")
"""


def _index(tmp_path: Path, store: str, *extra: str) -> tuple[dict[str, str], str]:
    from prefect.settings import PREFECT_API_URL

    home = tmp_path / "home"  # Ray writes its generated token under ~/.ray
    home.mkdir(exist_ok=True)
    env = ray_env(home, PREFECT_API_URL=str(PREFECT_API_URL.value()))
    argv = [
        "index",
        "--images",
        str(tmp_path / "images"),
        "--store",
        str(tmp_path / store),
        "--config",
        "tiny",
        *extra,
    ]
    run = subprocess.run(
        [sys.executable, "-c", DRIVER, *argv], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    last = run.stdout.strip().splitlines()[-1]
    assert "index: 3 images, 0 errors" in run.stdout
    return dict(kv.split("=") for kv in last.split()), run.stderr


@pytest.mark.slow
def test_three_images_run_without_ray_and_ray_starts_quietly(
    prefect_harness, tmp_path: Path
) -> None:
    write_scenes(tmp_path / "images", 3)

    small, err = _index(tmp_path, "small")  # tiny: executor ray, 4 images per shard: 1 shard
    assert small["rc"] == "0" and small["ray_started"] == "False"
    assert float(small["seconds"]) < 30, small  # no Ray to start (that alone takes 20-40 s)
    assert "ray" not in err.lower()

    sharded, err = _index(tmp_path, "sharded", "--set", "runtime.shard_size=1")  # 3 shards
    assert sharded["rc"] == "0" and sharded["ray_started"] == "True"
    for notice in ("Token authentication", "View the dashboard", "Started a local Ray"):
        assert notice not in err, err[-3000:]
