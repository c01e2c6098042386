"""The champion promotion rule and how its decisions are recorded."""

from __future__ import annotations

import pytest
import torch

from fmbseg.storage import ArtifactStore
from fmbseg.storage.models import ModelRegistry
from fmbseg.tasks.train.promotion import decide, decide_and_record


@pytest.mark.parametrize(
    ("candidate", "champion", "has_champion", "promote", "reason"),
    [
        (None, None, False, True, "no champion yet"),
        ({"mIoU": 0.1}, {"mIoU": 0.9}, False, True, "no champion yet"),
        (None, {"mIoU": 0.5}, True, False, "not evaluated"),
        ({"loss": 0.2}, {"mIoU": 0.5}, True, False, "not evaluated"),
        ({"mIoU": 0.5}, {"mIoU": 0.5}, True, True, "0.5000 >= champion's 0.5000"),
        ({"mIoU": 0.6}, {"mIoU": 0.5}, True, True, ">= champion's"),
        ({"mIoU": 0.4}, {"mIoU": 0.5}, True, False, "0.4000 < champion's 0.5000"),
        ({"mIoU": 0.4}, None, True, True, "the champion has no mIoU"),
    ],
)
def test_decide(candidate, champion, has_champion, promote, reason) -> None:
    verdict = decide(candidate, champion, has_champion)
    assert verdict.promote is promote
    assert reason in verdict.reason


def test_decide_and_record_moves_the_pointer_only_when_promoted(tmp_path) -> None:
    reg = ModelRegistry(ArtifactStore(str(tmp_path)))
    for _ in range(3):
        reg.save("m", {"w": torch.zeros(2)}, {"kind": "test"})
    assert decide_and_record(reg, "m", "v0001", None, None).promote
    assert not decide_and_record(reg, "m", "v0002", {"mIoU": 0.4}, {"mIoU": 0.5}).promote
    assert reg.champion("m") == "v0001"
    assert decide_and_record(reg, "m", "v0003", {"mIoU": 0.5}, {"mIoU": 0.5}, {"why": "x"}).promote
    assert reg.champion("m") == "v0003"
    assert decide_and_record(reg, "m", "v0003", None, None).reason == "already the champion"

    card = reg.card("m", "v0002")["promotion"]
    assert card["promoted"] is False and card["previous_champion"] == "v0001"
    assert card["candidate_metrics"] == {"mIoU": 0.4} and card["champion_metrics"] == {"mIoU": 0.5}
    assert reg.card("m", "v0003")["promotion"]["why"] == "x"
    history = reg.champion_record("m")["history"]
    assert [(h["version"], h["promoted"]) for h in history] == [
        ("v0001", True),
        ("v0002", False),
        ("v0003", True),
    ]
