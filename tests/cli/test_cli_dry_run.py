"""``--dry-run`` on annotate, run, train and retrain: each stage, its fingerprint, whether it
is committed and the shards left; nothing written, and the fingerprints are those a real run
then commits."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from fmbseg.cli import main
from fmbseg.storage import ArtifactStore
from fmbseg.storage.store import MANIFEST
from tests.helpers.synthetic import VOCAB, synthetic_config, write_scenes

LINE = re.compile(
    r"  (\w+): fingerprint (\w+), (committed|not committed), (\d+) of (\d+) shards to run"
    r"|  (train): fingerprint (\w+), (committed|not committed), (\d+) epochs to run"
)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _plans(out: str) -> dict[str, tuple]:
    """stage -> (fingerprint, committed, left, shards) from a dry run's lines."""
    plans = {}
    for line in out.splitlines():
        m = LINE.fullmatch(line)
        if m and m.group(1):
            fp, state, left, shards = m.group(2, 3, 4, 5)
            plans[m.group(1)] = (fp, state == "committed", int(left), int(shards))
        elif m:
            plans["train"] = (m.group(7), m.group(8) == "committed", int(m.group(9)), None)
    return plans


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def _dry(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, tuple]:
    assert main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "--dry-run: nothing is run or written" in out
    return _plans(out)


STAGE1 = ("index", "clip_dense", "sam_prompt", "sam_auto", "merge", "export")


@pytest.mark.slow
def test_dry_runs_plan_what_the_real_runs_commit_and_write_nothing(
    prefect_harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_scenes(tmp_path / "images", 6)
    config = tmp_path / "synthetic.yaml"
    cfg = synthetic_config(runtime={"executor": "local", "shard_size": 2, "device": "cpu"})
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    store_dir = tmp_path / "store"
    common = ["--store", str(store_dir), "--config", str(config)]
    source = ["--images", str(tmp_path / "images"), "--classes", ",".join(VOCAB)]

    # a fresh store: every stage to run, all shards; the store is not even created
    planned = _dry(["annotate", *source, *common], capsys)
    assert list(planned) == list(STAGE1)
    assert all(p[1:] == (False, 3, 3) for p in planned.values())
    whole = _dry(["run", *source, *common], capsys)
    assert {s: whole[s] for s in STAGE1} == planned
    assert list(whole) == [*STAGE1, "dino_features", "train"]
    assert whole["dino_features"][1:] == (False, 3, 3)  # the 6 listed images' crops
    assert whole["train"][1:3] == (False, cfg.train.epochs)
    assert not store_dir.exists()

    # the real run commits exactly the planned fingerprints
    assert main(["annotate", *source, *common]) == 0
    capsys.readouterr()
    store = ArtifactStore(str(store_dir))
    for stage, (fp, *_) in planned.items():
        assert store.is_committed(stage, fp), stage

    # sam_auto interrupted after two of its three shards: 1 left; nothing else to run
    base = store_dir / store.stage_rel("sam_auto", planned["sam_auto"][0])
    (base / MANIFEST).unlink()
    (base / "receipt-00001.json").unlink()
    before = _snapshot(store_dir)
    again = _dry(["annotate", *source, *common], capsys)
    assert again["sam_auto"] == (planned["sam_auto"][0], False, 1, 3)
    assert all(again[s] == (planned[s][0], True, 0, 3) for s in STAGE1 if s != "sam_auto")
    train = _dry(["train", "--labels", "latest", *common], capsys)
    assert train == {
        "dino_features": whole["dino_features"],  # the committed index: its 6 images
        "train": (whole["train"][0], False, cfg.train.epochs, None),
    }
    retrain = _dry(["retrain", *source, *common], capsys)
    assert {s: retrain[s][:2] for s in STAGE1} == {s: again[s][:2] for s in STAGE1}
    assert _snapshot(store_dir) == before  # nothing written, not even a lock or a temp file

    # train commits the fingerprint both dry runs printed
    assert main(["annotate", *source, *common]) == 0
    assert main(["train", "--labels", planned["merge"][0], *common]) == 0
    capsys.readouterr()
    assert store.is_committed("train", whole["train"][0])
    assert store.is_committed("dino_features", whole["dino_features"][0])
    # train committed: its feature cache is not needed, so not listed
    assert _dry(["train", "--labels", "latest", *common], capsys) == {
        "train": (whole["train"][0], True, 0, None)
    }

    # retrain: the first batch is every image (its stages committed); trained from scratch
    # on it is the model train just made; fine-tuned from the champion, a new one
    planned = _dry(["retrain", *source, *common], capsys)
    assert all(planned[s][1] for s in STAGE1)
    assert planned["train"] == (whole["train"][0], True, 0, None)
    assert "dino_features" not in planned
    planned = _dry(["retrain", *source, "--mode", "finetune", *common], capsys)
    assert planned["train"][1] is False and planned["train"][0] != whole["train"][0]
    assert planned["dino_features"] == (whole["dino_features"][0], True, 0, 3)  # reused
    assert main(["retrain", *source, "--mode", "finetune", *common]) == 0
    capsys.readouterr()
    assert store.is_committed("train", planned["train"][0])


def test_dry_run_of_train_without_labels_is_an_input_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store_dir = tmp_path / "store"
    assert main(["train", "--store", str(store_dir), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "no committed pseudo-labels" in err and len(err.strip().splitlines()) == 1
    assert not store_dir.exists()
