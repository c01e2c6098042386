"""Shared test fixtures: Ray, Prefect, a loopback S3 server, stores and sample photos.

Everything expensive (Ray, the Prefect test server, the moto server) is session-scoped and
lazy: it starts only when a test asks for it, once per session, and is stopped at the end.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# Set before anything imports prefect (tests, fmbseg.flows).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

# Photos from skimage.data used as "real" images: (name, target long side).
SAMPLE_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
)
SAMPLE_LONG_SIDE = 96


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- Ray ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ray_session() -> Iterator[Any]:
    """A local Ray instance with 2 CPUs for the whole session (started on first use).

    Tests that run the ``ray`` executor request this so that the runner finds Ray already
    initialised (``ray.is_initialized()``) and does not start its own. Workers import
    ``fmbseg`` from the installed package; classes defined in a test module are only
    importable on workers if the module is pickled by value:
    ``ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])`` (Ray's vendored
    cloudpickle, not the standalone package).
    """
    import ray

    started = False
    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            num_gpus=0,
            include_dashboard=False,
            object_store_memory=80 * 1024 * 1024,
            log_to_driver=False,
            configure_logging=False,
        )
        started = True
    yield ray
    if started:
        ray.shutdown()


# ---- Prefect --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect API server + database for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


# ---- S3 on loopback -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, Any]]:
    """A moto S3 server on 127.0.0.1 with dummy credentials.

    Yields a dict:
        endpoint_url: ``http://127.0.0.1:<port>``
        storage_options: fsspec/s3fs options for that endpoint (key, secret, client_kwargs)
        bucket: name of a bucket that already exists
        make_bucket: ``make_bucket(name) -> name`` creates a bucket if absent
    """
    from moto.server import ThreadedMotoServer

    for var, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        os.environ[var] = value
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    options = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
    }
    made: set[str] = set()

    def make_bucket(name: str) -> str:
        if name not in made:
            import boto3

            client = boto3.client(
                "s3",
                endpoint_url=endpoint,
                aws_access_key_id="testing",
                aws_secret_access_key="testing",
                region_name="us-east-1",
            )
            existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
            if name not in existing:
                client.create_bucket(Bucket=name)
            made.add(name)
        return name

    info = {
        "endpoint_url": endpoint,
        "storage_options": options,
        "bucket": make_bucket("fmbseg-test"),
        "make_bucket": make_bucket,
    }
    yield info
    server.stop()


# ---- stores ---------------------------------------------------------------------------------


@pytest.fixture
def local_store(tmp_path: Path) -> Any:
    """An ArtifactStore on a fresh local folder."""
    from fmbseg.storage import ArtifactStore

    return ArtifactStore(str(tmp_path / "store"))


@pytest.fixture
def s3_store(s3_server: dict[str, Any]) -> Any:
    """An ArtifactStore on a fresh prefix of the loopback S3 bucket."""
    from fmbseg.storage import ArtifactStore

    uri = f"s3://{s3_server['bucket']}/store-{uuid.uuid4().hex[:12]}"
    return ArtifactStore(uri, storage_options=s3_server["storage_options"])


@pytest.fixture(params=["local", "s3"])
def any_store(request: pytest.FixtureRequest) -> Any:
    """Parametrised over a local store and a loopback-S3 store."""
    if request.param == "local":
        return request.getfixturevalue("local_store")
    return request.getfixturevalue("s3_store")


# ---- images ---------------------------------------------------------------------------------


def _downscale(image: Any, long_side: int) -> Any:
    from PIL import Image

    pil = Image.fromarray(image)
    scale = long_side / max(pil.size)
    size = (max(1, round(pil.width * scale)), max(1, round(pil.height * scale)))
    return pil.convert("RGB").resize(size, Image.Resampling.BILINEAR)


@pytest.fixture(scope="session")
def _sample_photo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import skimage.data

    out = tmp_path_factory.mktemp("sample_photos")
    for i, name in enumerate(SAMPLE_PHOTOS):
        pil = _downscale(getattr(skimage.data, name)(), SAMPLE_LONG_SIDE)
        # Alternate formats so both JPEG and PNG decoding are exercised.
        suffix = ".jpg" if i % 2 == 0 else ".png"
        pil.save(out / f"{name}{suffix}", quality=90)
    return out


@pytest.fixture
def image_dir(tmp_path: Path, _sample_photo_dir: Path) -> Path:
    """A fresh folder of real sample photos (skimage.data), ~96 px on the long side.

    Files: astronaut.jpg, chelsea.png, coffee.jpg, rocket.png, hubble_deep_field.jpg,
    immunohistochemistry.png. The folder is a per-test copy, so tests may add or corrupt files.
    """
    out = tmp_path / "images"
    shutil.copytree(_sample_photo_dir, out)
    return out


@pytest.fixture
def sample_images(_sample_photo_dir: Path) -> list[Any]:
    """The sample photos as ``HxWx3 uint8 RGB`` numpy arrays (sorted by file name)."""
    import numpy as np
    from PIL import Image

    return [np.asarray(Image.open(p).convert("RGB")) for p in sorted(_sample_photo_dir.iterdir())]


# What the index stage must make of ``messy_image_dir`` (file name -> outcome).
MESSY_GOOD = {
    "astronaut.jpg",
    "chelsea.png",
    "coffee.jpg",
    "hubble_deep_field.jpg",
    "immunohistochemistry.png",
    "rocket.png",
    "cmyk.jpg",
    "deep16.png",
    "rgba.png",
    "rotated.jpg",
}
MESSY_ERRORS = {
    "corrupt.jpg": "corrupt",
    "empty.jpg": "empty",
    "notes.jpg": "not_an_image",
    "truncated.jpg": "truncated",
    "coffee_copy.jpg": "duplicate",  # same bytes as coffee.jpg
    "zz/coffee.jpg": "duplicate",
}


@pytest.fixture
def messy_image_dir(image_dir: Path) -> Path:
    """``image_dir`` plus the awkward files real buckets hold (see MESSY_GOOD/MESSY_ERRORS).

    Decodable: 16-bit grayscale PNG, CMYK JPEG, RGBA PNG, a JPEG stored 30 wide x 20 tall
    with EXIF orientation 6 (displayed 20 x 30). Errors: random bytes after a JPEG marker,
    an empty file, a text file named .jpg, a JPEG cut in half, two byte-identical copies
    of coffee.jpg (one in a subfolder).
    """
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (image_dir / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + rng.bytes(500))
    (image_dir / "empty.jpg").write_bytes(b"")
    (image_dir / "notes.jpg").write_text("shopping list: milk, eggs\n")
    photo = (image_dir / "astronaut.jpg").read_bytes()
    (image_dir / "truncated.jpg").write_bytes(photo[: len(photo) // 2])
    coffee = (image_dir / "coffee.jpg").read_bytes()
    (image_dir / "coffee_copy.jpg").write_bytes(coffee)
    (image_dir / "zz").mkdir()
    (image_dir / "zz" / "coffee.jpg").write_bytes(coffee)
    ramp = (np.arange(24 * 32, dtype=np.uint32).reshape(24, 32) * 85).astype(np.uint16)
    Image.fromarray(ramp).save(image_dir / "deep16.png")
    cmyk = Image.new("CMYK", (24, 16), (0, 255, 255, 0))
    cmyk.save(image_dir / "cmyk.jpg", quality=95)
    rgba = rng.integers(0, 256, (16, 16, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(image_dir / "rgba.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.new("RGB", (30, 20), (0, 128, 255)).save(buf, format="JPEG", exif=exif)
    (image_dir / "rotated.jpg").write_bytes(buf.getvalue())
    return image_dir


@pytest.fixture
def messy_expected() -> dict[str, Any]:
    """``{"good": set of file names, "errors": {relative file name: error_type}}``."""
    return {"good": set(MESSY_GOOD), "errors": dict(MESSY_ERRORS)}


@pytest.fixture
def hide_package(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """``hide_package(name)``: for the rest of the test, ``importlib.util.find_spec(name)``
    answers None, as when the optional package ``name`` is not installed."""

    def hide(name: str) -> None:
        real = importlib.util.find_spec
        monkeypatch.setattr(
            importlib.util, "find_spec", lambda n, *a: None if n == name else real(n, *a)
        )

    return hide
