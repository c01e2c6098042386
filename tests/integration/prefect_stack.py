"""A real Prefect server (SQLite) and CLI, run as subprocesses with their own environment.

Nothing here touches ``os.environ`` or Prefect settings of the test process, so the
session-scoped ``prefect_test_harness`` other tests use is unaffected.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]
PREFECT = [sys.executable, "-m", "prefect"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stack_env(home: Path, api_url: str, ui_api_url: str | None = None) -> dict[str, str]:
    """The environment of every Prefect subprocess: its own home, profile, DB and API URL.

    ``ui_api_url``: serve the UI, telling it where the API is (``PREFECT_UI_API_URL``, what
    the README says to set when the browser reaches the server under another address)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_PROFILES_PATH=str(home / "profiles.toml"),
        PREFECT_API_URL=api_url,
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false" if ui_api_url is None else "true",
        PREFECT_LOGGING_LEVEL="INFO",
        RAY_USAGE_STATS_ENABLED="0",
    )
    if ui_api_url is not None:
        env["PREFECT_UI_API_URL"] = ui_api_url
    return env


def stop_process(proc: subprocess.Popen[Any], grace_s: float = 10.0) -> None:
    """SIGTERM the process group ``proc`` leads (started with start_new_session), then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace_s)
    except ProcessLookupError:
        pass


@dataclass
class PrefectStack:
    """A running ``prefect server start`` plus helpers to call the CLI and the REST API."""

    home: Path
    port: int
    server: subprocess.Popen[Any] | None = None
    logs: list[Path] = field(default_factory=list)
    ui_api_url: str | None = None  # serve the UI with this API URL (None: no UI)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def env(self) -> dict[str, str]:
        return stack_env(self.home, self.api_url, self.ui_api_url)

    def start(self, timeout_s: float = 90.0) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        log = self.home / "server.log"
        self.logs.append(log)
        with log.open("wb") as out:
            self.server = subprocess.Popen(
                [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                env=self.env,
                cwd=self.home,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.server.poll() is not None:
                raise RuntimeError(f"prefect server exited early:\n{self.tail(log)}")
            try:
                if httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"prefect server not healthy after {timeout_s}s:\n{self.tail(log)}")

    def stop(self) -> None:
        if self.server is not None:
            stop_process(self.server)

    def cli(self, *args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
        """``prefect <args>`` from the repository root; output merged into ``stdout``."""
        return subprocess.run(
            [*PREFECT, *args],
            env=self.env,
            cwd=REPO,
            capture_output=False,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout_s,
        )

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        response = httpx.request(method, f"{self.api_url}{path}", timeout=30, **kwargs)
        response.raise_for_status()
        return response.json()

    @staticmethod
    def tail(path: Path, chars: int = 4000) -> str:
        return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


def flow_run_id(cli_output: str) -> str:
    """The flow run UUID that ``prefect deployment run`` printed."""
    match = re.search(r"UUID: ([0-9a-f-]{36})", cli_output)
    if match is None:
        raise AssertionError(f"no flow run UUID in:\n{cli_output}")
    return match.group(1)
