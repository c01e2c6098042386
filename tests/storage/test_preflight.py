"""The store's pre-flight check: a file, a read-only folder, a missing bucket and an endpoint
that is down or silent each fail in one line, fast, before any work."""

from __future__ import annotations

import errno
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fmbseg.cli import main
from fmbseg.storage import ArtifactStore, RetryPolicy
from fmbseg.storage.preflight import StoreUnusableError, check_store
from fmbseg.storage.retry import is_transient


@pytest.fixture
def readonly_dir(tmp_path: Path) -> Iterator[Path]:
    """A real read-only folder: a tmpfs mounted ``ro`` (tests run as root, and root writes
    through permission bits, so chmod would not make one). Skipped where mounting is not
    allowed."""
    folder = tmp_path / "ro"
    folder.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {done.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def _port_with_nothing_listening() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _s3_options(endpoint: str) -> dict[str, Any]:
    return {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
    }


def test_a_file_is_not_a_store(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(StoreUnusableError, match=r"store '.*/notes\.txt' is a file, not a folder"):
        check_store(str(tmp_path / "notes.txt"))
    with pytest.raises(StoreUnusableError, match=r"is under '.*/notes\.txt', which is a file"):
        check_store(str(tmp_path / "notes.txt" / "store"))
    assert (tmp_path / "notes.txt").read_text() == "mine"
    check_store(str(tmp_path / "new" / "store"))  # made on first write: its parent counts


def test_a_read_only_folder_is_refused_for_writing_only(readonly_dir: Path) -> None:
    with pytest.raises(StoreUnusableError) as info:
        check_store(str(readonly_dir))
    assert (
        str(info.value) == f"store {str(readonly_dir)!r} is not writable: a read-only file system"
    )
    with pytest.raises(StoreUnusableError, match="where it would be made.*read-only file system"):
        check_store(str(readonly_dir / "store"))
    check_store(str(readonly_dir), write=False)  # reading a read-only store is fine


def test_a_read_only_write_fails_at_once_instead_of_being_retried(readonly_dir: Path) -> None:
    assert not is_transient(OSError(errno.EROFS, "Read-only file system"))
    assert not is_transient(OSError(errno.ENOSPC, "No space left on device"))
    store = ArtifactStore(str(readonly_dir), retry=RetryPolicy(attempts=5, initial_delay=10.0))
    start = time.monotonic()
    with pytest.raises(OSError) as info:
        store.write_bytes("x.json", b"{}")
    assert info.value.errno == errno.EROFS
    assert time.monotonic() - start < 5  # the old code slept 10 s before its first retry


def test_s3_without_the_bucket(s3_server: dict[str, Any]) -> None:
    bucket = f"absent-{uuid.uuid4().hex[:8]}"
    with pytest.raises(StoreUnusableError) as info:
        check_store(f"s3://{bucket}/store", s3_server["storage_options"])
    assert str(info.value) == (
        f"store 's3://{bucket}/store': bucket {bucket!r} does not exist (create it first)"
    )
    check_store(
        f"s3://{s3_server['bucket']}/store-{uuid.uuid4().hex[:8]}", s3_server["storage_options"]
    )


def test_s3_location_that_is_a_file(s3_server: dict[str, Any]) -> None:
    store = ArtifactStore(f"s3://{s3_server['bucket']}", s3_server["storage_options"])
    name = f"file-{uuid.uuid4().hex[:8]}"
    store.write_bytes(name, b"data")
    with pytest.raises(StoreUnusableError, match=f"store 's3://.*/{name}' is a file, not a folder"):
        check_store(f"s3://{s3_server['bucket']}/{name}", s3_server["storage_options"])


def test_s3_endpoint_down_fails_within_seconds() -> None:
    endpoint = f"http://127.0.0.1:{_port_with_nothing_listening()}"
    start = time.monotonic()
    with pytest.raises(StoreUnusableError) as info:
        check_store("s3://bucket/store", _s3_options(endpoint))
    assert time.monotonic() - start < 5
    assert str(info.value).startswith(
        f"store 's3://bucket/store' cannot be reached at {endpoint} within 5 s: "
    )


def test_s3_endpoint_that_never_answers_times_out() -> None:
    with socket.socket() as silent:  # accepts connections (the kernel does), never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(StoreUnusableError, match=f"cannot be reached at {endpoint} within 1 s"):
            check_store("s3://bucket/store", _s3_options(endpoint), timeout=1.0)
        assert time.monotonic() - start < 8  # unchecked: 60 s read timeouts, retried


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = main(argv)
    return rc, capsys.readouterr().err


def test_cli_checks_the_store_before_any_work(
    tmp_path: Path,
    readonly_dir: Path,
    s3_server: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (tmp_path / "a-file").write_text("x")
    endpoint = s3_server["endpoint_url"]
    cases = [
        (["--store", str(tmp_path / "a-file")], "is a file, not a folder"),
        (["--store", str(readonly_dir)], "is not writable: a read-only file system"),
        (
            [
                "--store",
                "s3://no-such-bucket-here/x",
                "--storage-option",
                f"client_kwargs.endpoint_url={endpoint}",
            ],
            "bucket 'no-such-bucket-here' does not exist",
        ),
    ]
    for extra, message in cases:
        rc, err = _cli(["index", "--images", str(images), *extra], capsys)
        assert rc == 2, err
        assert err.startswith("fmbseg: error: store ") and message in err
        assert err.count("\n") == 1 and "Traceback" not in err
    # segment only reads the store: a read-only one passes the check (and has no model)
    rc, err = _cli(
        ["segment", str(images), "--classes", "a,b", "--store", str(readonly_dir)], capsys
    )
    assert rc == 2 and "not writable" not in err
