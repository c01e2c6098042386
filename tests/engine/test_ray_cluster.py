"""The up-front Ray address check (issue 21): a wrong address or a missing token fails in
seconds with one line, through the CLI (exit 2), against real Ray processes."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from fmbseg.cli import main
from fmbseg.engine.ray_cluster import RayAddressError, check_ray_address
from tests.integration.ray_nodes import free_port, ray_env, start_node

TOKEN = "0123456789abcdef0123456789abcdef"
CLI = "import sys; from fmbseg.cli import main; sys.exit(main(sys.argv[1:]))"
CHECK = "import sys; from fmbseg.engine.ray_cluster import check_ray_address as c; c(sys.argv[1])"


@pytest.mark.parametrize("scheme", ["", "ray://"])
def test_unreachable_address_exits_2_within_seconds(
    scheme: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "images").mkdir()
    address = f"{scheme}127.0.0.1:{free_port()}"  # nothing listens there
    argv = [
        "index",
        "--images",
        str(tmp_path / "images"),
        "--store",
        str(tmp_path / "store"),
        "--ray-address",
        address,
    ]
    import ray._private.grpc_utils  # noqa: F401  # importing Ray is not what is timed

    started = time.monotonic()
    assert main(argv) == 2
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err
    assert err == (
        f"fmbseg: error: ray address {address!r}: nothing answered within 5 s "
        "(is the cluster running, and the port open to this machine?)\n"
    )
    assert elapsed < 12  # Ray itself retries for 30-40 s
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("head-without-port", "expected 'auto', 'HOST:PORT'"),
        ("ray://", "expected 'auto', 'HOST:PORT'"),
        ("10.0.0.1:http", "expected 'auto', 'HOST:PORT'"),
    ],
)
def test_malformed_address_is_named(address: str, message: str) -> None:
    with pytest.raises(RayAddressError, match=message) as info:
        check_ray_address(address)
    assert str(info.value).startswith(f"ray address {address!r}: ")


def test_local_addresses_need_no_check() -> None:
    started = time.monotonic()
    check_ray_address(None)
    check_ray_address("local")
    assert time.monotonic() - started < 0.1


@pytest.mark.slow
def test_token_cluster_without_token_exits_2_naming_ray_auth_mode(tmp_path: Path) -> None:
    head_home, client_home = tmp_path / "head-home", tmp_path / "client-home"
    head_home.mkdir(), client_home.mkdir()
    head = start_node(
        head_home, env=ray_env(head_home, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN)
    )
    try:
        (tmp_path / "images").mkdir()
        gcs, client = head.address, f"ray://127.0.0.1:{head.client_port}"
        no_token = ray_env(client_home)  # no RAY_AUTH_*, no ~/.ray/auth_token
        for address in (gcs, client):
            started = time.monotonic()
            run = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    CLI,
                    "index",
                    "--images",
                    str(tmp_path / "images"),
                    "--store",
                    str(tmp_path / "store"),
                    "--ray-address",
                    address,
                ],
                env=no_token,
                capture_output=True,
                text=True,
                timeout=120,
            )
            elapsed = time.monotonic() - started
            assert run.returncode == 2, run.stderr[-2000:]
            assert run.stderr == (
                f"fmbseg: error: ray address {address!r}: the cluster requires token "
                "authentication; set RAY_AUTH_MODE=token and give the cluster's token "
                "(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)\n"
            )
            assert elapsed < 20, elapsed  # an interpreter start plus the check
        wrong = ray_env(client_home, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN[::-1])
        right = ray_env(client_home, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN)
        for address in (gcs, client):
            run = subprocess.run(
                [sys.executable, "-c", CHECK, address],
                env=wrong,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert "the cluster rejected this client's token" in run.stderr
            run = subprocess.run(
                [sys.executable, "-c", CHECK, address],
                env=right,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert run.returncode == 0, run.stderr[-2000:]
        assert not (tmp_path / "store").exists()
    finally:
        head.kill()
