"""SAM 2.1 as the teacher end to end: ``fmbseg annotate`` -> ``train`` -> ``evaluate`` on the
tiny config with ``--set models.sam=sam2.1_tiny``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tests.helpers.dataset_trees as trees
from fmbseg.cli import main
from fmbseg.config import load_config, replace
from fmbseg.storage import ArtifactStore, ModelRegistry
from fmbseg.tasks.annotate.stages import stage_fingerprint
from tests.helpers.cli_output import summary
from tests.helpers.synthetic import VOCAB, write_scenes

SETS = ["--config", "tiny", "--set", "runtime.executor=local", "--set", "models.sam=sam2.1_tiny"]


@pytest.mark.slow
def test_annotate_train_evaluate_with_sam21(
    prefect_harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.set_num_threads(1)
    write_scenes(tmp_path / "images", 4)
    store_dir = tmp_path / "store"
    store_args = ["--store", str(store_dir)]
    argv = [
        "annotate",
        "--images",
        str(tmp_path / "images"),
        "--classes",
        ",".join(VOCAB),
        *store_args,
        *SETS,
    ]
    assert main(argv) == 0
    out = summary(capsys.readouterr().out)
    assert "annotate: 4 images indexed" in out

    store = ArtifactStore(str(store_dir))
    cfg = replace(load_config("tiny"), models={"sam": "sam2.1_tiny"})
    (clip_fp,) = store.committed_fingerprints("clip_dense")
    for stage in ("sam_prompt", "sam_auto"):  # SAM 2.1's outputs, not sam_tiny's
        (fp,) = store.committed_fingerprints(stage)
        assert fp == stage_fingerprint(stage, cfg, {"clip_dense": clip_fp})
        assert store.read_table(stage, fp).num_rows > 0

    assert main(["train", "--labels", "latest", *store_args, *SETS]) == 0
    out = summary(capsys.readouterr().out)
    assert "train: model fmbseg-align:v0001" in out
    assert ModelRegistry(store).versions("fmbseg-align") == ["v0001"]

    voc = tmp_path / "voc"
    trees.write_voc(str(voc))
    argv = [
        "evaluate",
        "--dataset",
        "voc21",
        "--data-root",
        str(voc),
        "--model",
        "fmbseg-align:v0001",
        *store_args,
        *SETS,
    ]
    assert main(argv) == 0
    out = summary(capsys.readouterr().out)
    assert out.startswith("voc21: 3 images, mIoU ")
    (eval_fp,) = store.committed_fingerprints("evaluate")
    report = store.read_json(f"evaluations/{eval_fp}/report.json")
    assert report["num_images"] == 3 and 0.0 <= report["mIoU"] <= 1.0
