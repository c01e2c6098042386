"""Vocabularies: built-in lists, loading from names/files/lists, validation errors."""

from __future__ import annotations

import pytest

from fmbseg.data.vocab import (
    builtin_vocabularies,
    load_vocabulary,
    stuff_background_names,
    validate_vocabulary,
)


def test_builtin_lists_have_official_sizes_and_order():
    sizes = {
        "coco-stuff-171": 171,
        "coco-object-80": 80,
        "coco-object-81": 81,
        "voc-20": 20,
        "voc-21": 21,
        "context-59": 59,
        "context-60": 60,
        "ade-150": 150,
        "cityscapes-19": 19,
        "coco-stuff-background": 91,
    }
    assert set(sizes) <= set(builtin_vocabularies())
    for name, n in sizes.items():
        assert len(load_vocabulary(name)) == n, name
    cs = load_vocabulary("coco-stuff-171")
    assert cs[:3] == ("person", "bicycle", "car") and cs[79] == "toothbrush"
    assert cs[80] == "banner" and cs[-1] == "wood"
    assert load_vocabulary("coco-object-80") == cs[:80]
    assert load_vocabulary("coco-object-81") == ("background", *cs[:80])
    voc = load_vocabulary("voc-21")
    assert voc[0] == "background" and voc[1:] == load_vocabulary("voc-20")
    assert voc[1] == "aeroplane" and voc[11] == "diningtable" and voc[20] == "tvmonitor"
    assert load_vocabulary("context-60")[1:] == load_vocabulary("context-59")
    assert load_vocabulary("cityscapes-19")[6:8] == ("traffic light", "traffic sign")
    ade = load_vocabulary("ade-150")
    assert ade[:3] == ("wall", "building", "sky") and ade[7] == "bed" and ade[-1] == "flag"


def test_aliases_files_and_comma_lists(tmp_path):
    assert load_vocabulary("voc") == load_vocabulary("voc-21")
    assert load_vocabulary("ADE20K") == load_vocabulary("ade-150")
    f = tmp_path / "mine.txt"
    f.write_text("# my classes\ncat\n\n  potted plant  \ndog\n")
    assert load_vocabulary(str(f)) == ("cat", "potted plant", "dog")
    assert load_vocabulary(" cat , dog,bird ") == ("cat", "dog", "bird")
    assert load_vocabulary("cat,") == ("cat",)


def test_unknown_name_and_missing_file_are_errors(tmp_path):
    with pytest.raises(ValueError, match=r"'voc-22' is not a built-in name \(ade-150"):
        load_vocabulary("voc-22")
    with pytest.raises(ValueError, match="vocabulary file .*nope.txt not found"):
        load_vocabulary(str(tmp_path / "nope.txt"))
    with pytest.raises(ValueError, match="no class names"):
        (tmp_path / "empty.txt").write_text("# nothing\n\n")
        load_vocabulary(str(tmp_path / "empty.txt"))


@pytest.mark.parametrize(
    ("names", "message"),
    [
        ([], "no class names given"),
        (["cat", "  "], "name #2 is blank"),
        (["cat", 3], "name #2 is int 3, not a string"),
        (
            ["Potted Plant", "dog", "pottedplant"],
            "duplicate name 'pottedplant' \\(#3\\) repeats 'Potted Plant' \\(#1\\)",
        ),
        (["cat", "CAT"], "duplicate name 'CAT'"),
    ],
)
def test_validation_names_the_problem(names, message):
    with pytest.raises(ValueError, match=message):
        validate_vocabulary(names)


def test_comma_list_with_blank_item_is_an_error():
    with pytest.raises(ValueError, match="name #2 is blank"):
        load_vocabulary("cat,,dog")


def test_stuff_background_excludes_dataset_classes():
    all_stuff = stuff_background_names()
    assert len(all_stuff) == 91 and "sky" in all_stuff and "brick wall" in all_stuff
    assert not any("-other" in n or "-stuff" in n for n in all_stuff)
    ctx = stuff_background_names(exclude=load_vocabulary("context-60"))
    assert "sky" not in ctx and "wall" not in ctx and "banner" in ctx
    # VOC's classes are things: every stuff name stays a background name.
    assert stuff_background_names(exclude=load_vocabulary("voc-21")) == all_stuff


def test_raw_stuff_background_names_are_coco_stuffs_own():
    raw = stuff_background_names(names="raw")
    assert raw == load_vocabulary("coco-stuff-171")[80:]
    assert "sky-other" in raw and "wall-brick" in raw and "brick wall" not in raw
    # the same stuff classes are dropped in both sets: Context's "sky" drops "sky-other" too
    clean_ctx = stuff_background_names(exclude=load_vocabulary("context-60"))
    raw_ctx = stuff_background_names(exclude=load_vocabulary("context-60"), names="raw")
    assert len(raw_ctx) == len(clean_ctx) < 91
    assert "sky-other" not in raw_ctx and "wall-other" not in raw_ctx and "banner" in raw_ctx
    with pytest.raises(ValueError, match="must be one of \\['clean', 'raw'\\], got 'stuff'"):
        stuff_background_names(names="stuff")
