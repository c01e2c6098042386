"""Stage fingerprints and content hashes."""

from __future__ import annotations

from fmbseg.config import Config, IndexConfig, SamAutoConfig
from fmbseg.storage import content_hash, fingerprint
from fmbseg.storage.fingerprint import FINGERPRINT_LENGTH, canonical_json


def test_fingerprint_is_stable_and_short() -> None:
    a = fingerprint("sam_auto", "1", SamAutoConfig(), {"index": "abc", "clip": "def"})
    b = fingerprint("sam_auto", "1", SamAutoConfig(), {"clip": "def", "index": "abc"})
    assert a == b  # input order does not matter
    assert len(a) == FINGERPRINT_LENGTH
    assert int(a, 16) >= 0


def test_fingerprint_changes_with_every_ingredient() -> None:
    base = fingerprint("sam_auto", "1", SamAutoConfig(), {"index": "abc"})
    variants = [
        fingerprint("sam_prompt", "1", SamAutoConfig(), {"index": "abc"}),
        fingerprint("sam_auto", "2", SamAutoConfig(), {"index": "abc"}),
        fingerprint("sam_auto", "1", SamAutoConfig(pred_iou_thresh=0.5), {"index": "abc"}),
        fingerprint("sam_auto", "1", SamAutoConfig(), {"index": "abd"}),
        fingerprint("sam_auto", "1", SamAutoConfig(), {}),
    ]
    assert len({base, *variants}) == 6


def test_canonical_json_flattens_dataclasses_and_tuples() -> None:
    text = canonical_json({"b": IndexConfig(extensions=(".png",)), "a": (1, 2)})
    assert text.startswith(
        '{"a":[1,2],"b":{"allowed_protocols":["file","store"],"extensions":[".png"]'
    )


def test_content_hash() -> None:
    assert content_hash(b"abc") == content_hash(b"abc")
    assert content_hash(b"abc") != content_hash(b"abd")
    assert content_hash(b"abc") == "ba7816bf8f01cfea"  # sha256("abc")[:16]


def test_fingerprints_are_pinned() -> None:
    # existing stores are reused: the values a store already holds must not change
    assert fingerprint("sam_auto", "1", SamAutoConfig(), {"index": "abc", "clip": "def"}) == (
        "f280aff86dffb17c"
    )
    nested = {"a": (1, {2: IndexConfig()}), 10: [None, 1.5]}  # int keys, tuples, dataclasses
    assert fingerprint("merge", "2", nested, None) == "ccdeb532c9ccdd58"
    assert fingerprint("train", "3", Config(), {"merge": "m"}) == "25b3485a1d191667"
