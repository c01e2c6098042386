"""The ``fmbseg`` command: help, input errors, ``index`` end to end on local and S3 stores."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import fsspec
import pytest

from fmbseg.cli import UsageError, main, parse_storage_options
from fmbseg.storage import ArtifactStore
from fmbseg.tasks.annotate.index import STAGE, read_index


def test_help_lists_commands_and_common_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: fmbseg" in out and "index" in out
    assert main(["index", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--images", "--store", "--config", "--set", "--ray-address", "--storage-option"):
        assert flag in out
    assert "./fmbseg-store" in out


@pytest.mark.parametrize("command", ["annotate", "run", "retrain", "segment"])
def test_vocab_help_lists_every_builtin_vocabulary_and_alias(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from fmbseg.data.vocab import VOCAB_DIR, resolve_vocabulary

    assert main([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    text = text.replace("- ", "-")  # and breaks names at their dashes
    for path in sorted(VOCAB_DIR.glob("*.txt")):
        assert path.stem in text
    for alias, name in [
        ("voc", "voc-21"),
        ("coco-stuff", "coco-stuff-171"),
        ("ade20k", "ade-150"),
        ("cityscapes", "cityscapes-19"),
        ("context", "context-59"),
        ("coco-object", "coco-object-80"),
        ("ade", "ade-150"),
    ]:
        assert f"{alias}={name}" in text
        assert resolve_vocabulary(None, alias) == resolve_vocabulary(None, name)


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: fmbseg" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--set", "runtime.bogus=1"], "runtime: unknown key 'bogus'; allowed keys:"),
        (["--set", "runtime.shard_size=big"], "runtime.shard_size: expected an integer, got 'big'"),
        (["--set", "shard_size=4"], "the key must be section.key"),
        (["--config", "nope"], "no config named 'nope'"),
        (["--config", "missing.yaml"], "config file not found: missing.yaml"),
        (["--storage-option", "novalue"], "--storage-option 'novalue' must look like key=value"),
        (["--images", "/no/such/folder"], "image source '/no/such/folder' does not exist"),
    ],
)
def test_input_errors_exit_2_without_traceback(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if "--images" not in argv:
        argv = [*argv, "--images", str(tmp_path)]
    assert main(["index", "--store", str(tmp_path / "store"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fmbseg: error: ")
    assert message in err
    assert "Traceback" not in err


def test_parse_storage_options() -> None:
    opts = parse_storage_options(
        ["key=abc", "client_kwargs.endpoint_url=http://127.0.0.1:9000", "anon=false", "n=3"]
    )
    assert opts == {
        "key": "abc",
        "anon": False,
        "n": 3,
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"},
    }
    with pytest.raises(UsageError, match="'key' is already a value"):
        parse_storage_options(["key=1", "key.sub=2"])


def _stage_files(store_root: Path) -> dict[str, int]:
    out = {}
    for folder, _, files in os.walk(store_root / "stages"):
        for name in files:
            path = os.path.join(folder, name)
            out[path] = os.stat(path).st_mtime_ns
    return out


def _check_messy_index(store: ArtifactStore, expected: dict[str, Any], root: str) -> str:
    fp = store.latest(STAGE)
    assert fp is not None
    index = read_index(store, fp)
    names = {u[len(root) :].lstrip("/") for u in index["uri"].to_pylist()}
    assert names == expected["good"]
    errors = store.read_table(STAGE, fp, kind="errors")
    got = dict(
        zip(
            [u[len(root) :].lstrip("/") for u in errors["uri"].to_pylist()],
            errors["error_type"].to_pylist(),
            strict=True,
        )
    )
    assert got == expected["errors"]
    return fp


@pytest.mark.slow
def test_index_end_to_end_local_store(
    prefect_harness,
    ray_session,
    messy_image_dir: Path,
    messy_expected: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store_dir = tmp_path / "store"
    argv = [
        "index",
        "--images",
        str(messy_image_dir),
        "--store",
        str(store_dir),
        "--config",
        "tiny",
    ]
    assert main(argv) == 0  # tiny: Ray executor, 4 images per shard
    out, err = capsys.readouterr()
    assert "index: 10 images, 6 errors, 2 duplicates\n" in out
    assert "errors by type: 1 corrupt, 2 duplicate, 1 empty, 1 not_an_image, 1 truncated" in out
    assert "index" in err and "shard" in err  # the progress bar
    store = ArtifactStore(str(store_dir))
    fp = _check_messy_index(store, messy_expected, str(messy_image_dir))
    assert f"fingerprint: {fp}" in out and store.stage_url(STAGE, fp) in out
    runs = store.ls("runs")
    assert len(runs) == 1
    lineage = store.read_json(f"runs/{runs[0]}")
    assert lineage["stages"] == {"index": fp} and lineage["images"] == str(messy_image_dir)
    assert lineage["config"]["models"]["clip"] == "clip_tiny"

    before = _stage_files(store_dir)
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "(cache hit: already indexed)" in out
    assert _stage_files(store_dir) == before  # nothing rewritten
    assert len(store.ls("runs")) == 2  # but the run is recorded


@pytest.mark.slow
@pytest.mark.s3
def test_index_end_to_end_s3(
    prefect_harness,
    s3_server: dict[str, Any],
    messy_image_dir: Path,
    messy_expected: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    options = s3_server["storage_options"]
    bucket = s3_server["bucket"]
    run = uuid.uuid4().hex[:8]
    images = f"s3://{bucket}/{run}/images"
    fs = fsspec.filesystem("s3", **options)
    for path in messy_image_dir.rglob("*"):
        if path.is_file():
            fs.put_file(str(path), f"{images}/{path.relative_to(messy_image_dir).as_posix()}")
    store_uri = f"s3://{bucket}/{run}/store"
    argv = [
        "index",
        "--images",
        images,
        "--store",
        store_uri,
        "--config",
        "tiny",
        "--set",
        "runtime.executor=local",
        "--storage-option",
        "key=testing",
        "--storage-option",
        "secret=testing",
        "--storage-option",
        f"client_kwargs.endpoint_url={s3_server['endpoint_url']}",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "index: 10 images, 6 errors, 2 duplicates\n" in out
    store = ArtifactStore(store_uri, options)
    fp = _check_messy_index(store, messy_expected, images)
    assert f"output:      {store_uri}/stages/index/{fp}" in out
    assert main(argv) == 0
    assert "(cache hit: already indexed)" in capsys.readouterr().out


@pytest.mark.slow
def test_empty_source_is_an_input_error_inside_the_flow(
    prefect_harness, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    argv = [
        "index",
        "--images",
        str(tmp_path / "empty"),
        "--store",
        str(tmp_path / "s"),
        "--set",
        "runtime.executor=local",
    ]
    assert main(argv) == 2
    err = capfd.readouterr().err
    assert "fmbseg: error: image source" in err and "holds no images" in err
    assert "Traceback" not in err


def test_make_clean_keeps_the_default_store() -> None:
    import shutil
    import subprocess

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    repo = Path(__file__).resolve().parents[2]
    dry = subprocess.run(["make", "-n", "clean"], cwd=repo, capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    assert "rm -rf .venv .pytest_cache" in dry.stdout
    assert "fmbseg-store" not in dry.stdout  # the user's labels and models


@pytest.mark.slow
def test_a_crafted_coco_source_is_confined(
    prefect_harness, image_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    import json

    coco = tmp_path / "users" / "crafted.json"
    coco.parent.mkdir()
    images = [{"id": 1, "file_name": "coffee.jpg"}, {"id": 2, "file_name": "../../etc/passwd"}]
    coco.write_text(json.dumps({"images": images}))
    base = ["index", "--images", str(coco), "--image-root", str(image_dir)]
    base += ["--store", str(tmp_path / "s"), "--set", "runtime.executor=local"]
    assert main(base) == 2
    err = capfd.readouterr().err
    assert (
        f"fmbseg: error: COCO file {str(coco)!r}: images[1] file_name '../../etc/passwd' climbs "
        f"out of the image root {str(image_dir)!r}\n"
    ) in err
    assert "Traceback" not in err and not (tmp_path / "s" / "stages").exists()

    images[1] = {"id": 2, "coco_url": "http://127.0.0.1:9/x.jpg"}
    coco.write_text(json.dumps({"images": images}))
    assert main(base) == 2
    assert "protocol 'http' is not allowed" in capfd.readouterr().err
    # a deployment that wants URLs says so in its config
    assert main([*base, "--set", "index.allowed_protocols=[file, store, http]"]) == 0
    out = capfd.readouterr().out
    assert "index: 1 images, 1 errors" in out  # the URL is listed, and fails to read
