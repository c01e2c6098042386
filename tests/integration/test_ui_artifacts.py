"""The pictures reach people: Prefect's UI, in headless Chromium, renders the images that
fmbseg's markdown artifacts embed, and table cells as plain text (issue 19, item 6)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.prefect_stack import REPO, PrefectStack, free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

FLOW = r"""
import numpy as np
from prefect import flow
from fmbseg.flows.annotate import gallery_markdown
from fmbseg.flows.common import markdown_artifact, table_artifact
from fmbseg.storage import ArtifactStore
from fmbseg.tasks.annotate.gallery import jpeg

@flow
def show(store: str) -> None:
    st = ArtifactStore(store)
    for i in range(3):
        image = np.zeros((120, 160, 3), np.uint8)
        image[:, : 40 * (i + 1)], image[:, 40 * (i + 1):] = (200, 30, 30), (30, 30, 200)
        st.write_bytes(f"exports/fp/overlays/img{i}.jpg", jpeg(image))
    markdown_artifact("annotate-gallery", gallery_markdown(st, "fp"))
    table_artifact("annotate-summary", [{"what": "classes_found", "value": {"grass": 3, "sky": 1}}])

import sys
show(sys.argv[1])
"""


@pytest.fixture
def ui_stack(tmp_path: Path) -> Iterator[PrefectStack]:
    port = free_port()
    s = PrefectStack(home=tmp_path / "home", port=port, ui_api_url=f"http://127.0.0.1:{port}/api")
    try:
        s.start()
        yield s
    finally:
        s.stop()


def _dom(url: str) -> str:
    assert CHROMIUM is not None
    out = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=20000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    return out.stdout


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (Debian package `chromium`)")
def test_ui_renders_embedded_overlays_and_plain_tables(ui_stack: PrefectStack, tmp_path) -> None:
    env = dict(ui_stack.env, PYTHONPATH=str(REPO))
    run = subprocess.run(
        [sys.executable, "-c", FLOW, str(tmp_path / "store")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    found = ui_stack.api(
        "POST",
        "/artifacts/filter",
        json={"artifacts": {"key": {"any_": ["annotate-gallery", "annotate-summary"]}}},
    )
    ids = {a["key"]: a["id"] for a in found}
    base = f"http://127.0.0.1:{ui_stack.port}/v2/artifacts/artifact"
    gallery = _dom(f"{base}/{ids['annotate-gallery']}")
    assert gallery.count('src="data:image/jpeg;base64,') == 3, gallery[-3000:]
    table = _dom(f"{base}/{ids['annotate-summary']}")
    assert "grass 3, sky 1" in table and "{'grass'" not in table, table[-3000:]
