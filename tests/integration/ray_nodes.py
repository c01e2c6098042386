"""A real Ray head for tests: a ``ray start --head --block`` process bound to loopback only.

The head runs in its own process group with its own temp dir and ``HOME`` (so no token
file or session leaks into the user's ``~/.ray`` or ``/tmp/ray``); ``RAY_ENABLE_WINDOWS_OR_
OSX_CLUSTER=0`` makes Ray pin every address it binds to 127.0.0.1 instead of the machine's
outward address. :func:`ray_env` is the environment a driver subprocess of that cluster
needs. Stopping the head SIGKILLs its whole process group (GCS, raylet, workers).
(``ray start`` refuses to add a second node under that pin; test_node_loss.py builds its
nodes with ``ray.cluster_utils.Cluster`` instead.)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.integration.prefect_stack import REPO

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ray_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a process of a loopback test cluster (``extra`` added)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PREFECT_"))}
    env.update(
        HOME=str(home),
        PYTHONPATH=str(REPO),
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # every Ray address on 127.0.0.1
        RAY_USAGE_STATS_ENABLED="0",
        RAY_ENABLE_UV_RUN_RUNTIME_ENV="0",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_LOGGING_LEVEL="WARNING",
    )
    env.update(extra)
    return env


@dataclass
class RayNode:
    """One ``ray start --head --block`` process group."""

    proc: subprocess.Popen[Any]
    temp_dir: Path
    log: Path
    address: str = ""  # the head's GCS host:port
    client_port: int = 0
    pgid: int = field(init=False)

    def __post_init__(self) -> None:
        self.pgid = self.proc.pid

    def pids(self, name: str) -> list[int]:
        """Pids of this node's processes whose command line contains ``name``."""
        out = subprocess.run(
            ["pgrep", "-g", str(self.pgid), "-f", name], capture_output=True, text=True
        ).stdout
        return [int(p) for p in out.split()]

    def kill(self) -> None:
        """SIGKILL the node's whole process group (raylet, workers; the GCS on a head)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_node(
    home: Path,
    *,
    num_cpus: int = 1,
    env: dict[str, str] | None = None,
    timeout_s: float = 120.0,
) -> RayNode:
    """A head node with a Ray Client server, ready (``ray start`` has said so)."""
    temp_dir = Path(tempfile.mkdtemp(prefix="fr", dir="/tmp"))  # socket paths must be short
    log = temp_dir.with_suffix(".log")
    args = [
        RAY,
        "start",
        "--block",
        "--node-ip-address",
        "127.0.0.1",
        "--num-cpus",
        str(num_cpus),
        "--num-gpus",
        "0",
        "--temp-dir",
        str(temp_dir),
        "--disable-usage-stats",
    ]
    port, client_port = free_port(), free_port()
    address = f"127.0.0.1:{port}"
    args += [
        "--head",
        "--port",
        str(port),
        "--ray-client-server-port",
        str(client_port),
        "--include-dashboard",
        "false",
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            args,
            env=env or ray_env(home),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    node = RayNode(proc, temp_dir, log, address, client_port)
    deadline = time.monotonic() + timeout_s
    while b"Ray runtime started" not in log.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            text = log.read_text(errors="replace")[-3000:]
            node.kill()
            raise RuntimeError(f"ray start failed:\n{text}")
        time.sleep(0.2)
    return node
