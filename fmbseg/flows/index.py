"""Flow ``index``: list an image source and index it into the store (stage ``index``)."""

from __future__ import annotations

from typing import Any

from prefect import flow, task

from fmbseg.config import Config
from fmbseg.flows.common import (
    LINEAGE_HOOKS,
    PLANNING_TASK,
    configure,
    flow_lineage,
    manifest_artifact,
    open_store,
    pass_task,
    table_artifact,
)
from fmbseg.storage.store import ArtifactStore
from fmbseg.tasks.annotate.index import INDEX, STAGE, IndexPlan, index_job, plan_index

# the listing and the index fingerprint (reads no image)
list_images_task = task(name="list-images", **PLANNING_TASK)(plan_index)


def index_listing(
    st: ArtifactStore,
    cfg: Config,
    listing: IndexPlan,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Index ``listing`` (or reuse its committed index) in a Prefect task; returns its fp."""
    return pass_task((INDEX,))(index_job(st, listing, cfg, storage_options))[STAGE]


@flow(name="index", **LINEAGE_HOOKS)
def index_flow(
    images: str,
    store: str = "./fmbseg-store",
    config: str = "default",
    overrides: list[str] | None = None,
    ray_address: str | None = None,
    storage_options: dict[str, Any] | None = None,
    image_root: str | None = None,
) -> str:
    """Index ``images`` (folder, URI prefix, .txt list or COCO JSON) into ``store``.

    ``storage_options`` (fsspec, e.g. an S3 endpoint) apply to both the source and the
    store. They are flow parameters, so the Prefect API records them: pass credentials
    through the environment or a profile, not here. Returns the index fingerprint.
    """
    cfg = configure(config, overrides, ray_address)
    st = open_store(store, storage_options)
    listing = list_images_task(images, cfg, storage_options, image_root, st.uri)
    fp = index_listing(st, cfg, listing, storage_options)
    manifest_artifact(st, STAGE, fp)
    errors = st.require_manifest(STAGE, fp).meta.get("errors_by_type", {})
    table_artifact(
        f"{STAGE}-errors",
        [{"error_type": k, "count": v} for k, v in errors.items()],
        description="index errors by type",
    )
    flow_lineage(st, "index", images=images, config=cfg.to_dict(), stages={STAGE: fp})
    return fp
