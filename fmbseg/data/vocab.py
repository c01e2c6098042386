"""Vocabularies: the class names a run labels images with, and the benchmarks' official lists.

A vocabulary is a tuple of class names; its order is the category id order (``category_id``
in records, label-map values). Built-in vocabularies live in ``vocabularies/<name>.txt``, one
name per line, in the benchmarks' official label order as mmsegmentation's dataset classes
(``mmseg/datasets/*.py``) and TCL/GroupViT's evaluation datasets list them:

- ``coco-stuff-171``: mmseg ``COCOStuffDataset`` (80 things, then 91 stuff classes; the
  official hyphenated names such as ``building-other`` are kept);
- ``coco-object-80`` / ``coco-object-81``: the first 80 of those; 81 = ``background`` + 80,
  TCL's / SCLIP's ``COCOObjectDataset``;
- ``voc-20`` / ``voc-21``: mmseg ``PascalVOCDataset`` (``background`` first for 21);
- ``context-59`` / ``context-60``: mmseg ``PascalContextDataset59`` / ``PascalContextDataset``;
- ``ade-150``: mmseg ``ADE20KDataset`` (mmseg's ``'bed '`` has a trailing space; stripped);
- ``cityscapes-19``: mmseg ``CityscapesDataset`` (train ids 0..18).

Prompt names: the evaluation prompts exactly these names, as TCL does (its evaluation uses
``dataset.CLASSES``: ``aeroplane``, ``diningtable``, ``pottedplant``, ``tvmonitor``, ...).
SCLIP instead prompts with edited names and synonym lists (``ship`` for boat, ``table``,
``person, person in shirt, ...``); we do not reproduce those, so our MaskCLIP/SCLIP baselines
follow the TCL protocol's names.

``coco-stuff-background`` is **ours**: the 91 COCO-Stuff stuff classes used as extra
"background" names for the paper's VOC21 handling (METHOD "Evaluation"), with the names made
promptable: ``-other``/``-stuff`` suffixes dropped (``building-other`` -> ``building``) and
material variants reworded (``wall-brick`` -> ``brick wall``, ``playingfield`` ->
``playing field``). The paper does not give its exact strings.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

VOCAB_DIR = Path(__file__).parent / "vocabularies"
BACKGROUND = "background"  # the name of the background class in 21/60/81-class vocabularies
STUFF_BACKGROUND = "coco-stuff-background"  # built-in list of stuff names used as background
# Classes a label map can hold: PNG label maps are uint8 with 255 = ignore, so ids 0..254.
MAX_LABEL_CLASSES = 255

_ALIASES = {  # short spellings users type -> built-in name
    "coco-stuff": "coco-stuff-171",
    "coco-object": "coco-object-80",
    "voc": "voc-21",
    "context": "context-59",
    "ade": "ade-150",
    "ade20k": "ade-150",
    "cityscapes": "cityscapes-19",
}


def name_key(name: str) -> str:
    """Comparison key of a class name: case- and whitespace-insensitive."""
    return re.sub(r"\s+", "", name).lower()


def builtin_vocabularies() -> list[str]:
    """Names of the bundled vocabularies (``voc-21``, ``coco-stuff-171``, ...), sorted."""
    return sorted(p.stem for p in VOCAB_DIR.glob("*.txt"))


def vocabulary_aliases() -> dict[str, str]:
    """Short spellings accepted for built-in vocabularies: ``{"voc": "voc-21", ...}``."""
    return dict(_ALIASES)


def validate_vocabulary(names: Iterable[str], where: str = "vocabulary") -> tuple[str, ...]:
    """Check a list of class names; returns them stripped, as a tuple.

    Raises ValueError naming the problem: an empty list, a non-string or blank name, or a
    duplicate (case- and whitespace-insensitive: ``"Potted Plant"`` == ``"pottedplant"``).
    """
    out: list[str] = []
    seen: dict[str, int] = {}
    for i, name in enumerate(names, 1):  # positions as people count them, from 1
        if not isinstance(name, str):
            raise ValueError(f"{where}: name #{i} is {type(name).__name__} {name!r}, not a string")
        stripped = name.strip()
        if not stripped:
            raise ValueError(f"{where}: name #{i} is blank")
        if "\n" in stripped:
            raise ValueError(f"{where}: name #{i} {stripped!r} contains a line break")
        key = name_key(stripped)
        if key in seen:
            j = seen[key]
            raise ValueError(
                f"{where}: duplicate name {stripped!r} (#{i}) repeats {out[j - 1]!r} (#{j}); "
                "names are compared ignoring case and spaces"
            )
        seen[key] = i
        out.append(stripped)
    if not out:
        raise ValueError(f"{where}: no class names given")
    return tuple(out)


def read_names(text: str) -> list[str]:
    """Lines of a class-list file: one name each; blank lines and ``#`` comments skipped."""
    return [
        ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")
    ]


def _builtin_path(name: str) -> Path | None:
    canonical = _ALIASES.get(name.lower(), name.lower())
    path = VOCAB_DIR / f"{canonical}.txt"
    return path if path.is_file() else None


def load_vocabulary(name_or_csv: str) -> tuple[str, ...]:
    """A vocabulary from a built-in name, a ``.txt`` file, or a comma-separated list.

    - built-in: ``"voc-21"``, ``"coco-stuff-171"``, ... (see :func:`builtin_vocabularies`;
      aliases ``voc``, ``coco-stuff``, ``ade20k``, ``cityscapes``, ... are accepted);
    - a path (local or any fsspec URI) ending in ``.txt``, or an existing file: one name per
      line, blank lines and lines starting with ``#`` skipped;
    - ``"cat, dog, potted plant"``: names separated by commas (a single name needs a
      trailing comma, ``"cat,"``, so a mistyped built-in name is an error, not a 1-class list).

    The result is validated with :func:`validate_vocabulary`.
    """
    if not isinstance(name_or_csv, str) or not name_or_csv.strip():
        raise ValueError(
            f"vocabulary: expected a name, a .txt path or a comma list, got {name_or_csv!r}"
        )
    spec = name_or_csv.strip()
    builtin = _builtin_path(spec)
    if builtin is not None:
        return validate_vocabulary(read_names(builtin.read_text()), f"vocabulary {spec!r}")
    if spec.endswith(".txt") or "://" in spec or Path(spec).is_file():
        return validate_vocabulary(read_names(_read_text(spec)), f"vocabulary file {spec}")
    if "," in spec:
        return validate_vocabulary(_comma_names(spec), "vocabulary list")
    raise ValueError(
        f"vocabulary {spec!r} is not a built-in name ({', '.join(builtin_vocabularies())}), "
        "not a .txt file, and not a comma-separated list (write 'name,' for a single class)"
    )


def resolve_vocabulary(
    classes: str | Sequence[str] | None,
    vocab: str | None,
    where: str = "classes",
    max_names: int | None = None,
) -> tuple[str, ...]:
    """Class names from exactly one of ``classes`` (comma-separated, or a list) and ``vocab``
    (a built-in name, a ``.txt`` file or a comma list), validated; errors name ``where``.

    One trailing comma is allowed (``"cat,"`` is one class, as ``--vocab`` needs it).
    ``max_names``: more names than this is an error (:data:`MAX_LABEL_CLASSES` for anything
    that writes label maps), raised here so it comes before any work.
    """
    if (classes is None) == (vocab is None):
        raise ValueError("give exactly one of classes (names) or vocab (a built-in or .txt)")
    if vocab is not None:
        names = load_vocabulary(vocab)
    elif isinstance(classes, str):
        if not classes.strip():
            raise ValueError(f"{where}: empty; give names separated by commas, e.g. 'cat,dog'")
        names = validate_vocabulary(_comma_names(classes), where)
    else:
        names = validate_vocabulary(classes or (), where)
    if max_names is not None and len(names) > max_names:
        raise ValueError(
            f"{len(names)} classes: a label map holds at most {max_names} "
            f"(values 0-{max_names - 1}, {max_names} = ignore); split the vocabulary into runs"
        )
    return names


def _read_text(path: str) -> str:
    if "://" not in path:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"vocabulary file {path} not found")
        return p.read_text(encoding="utf-8")
    import fsspec  # remote vocabularies only

    try:
        with fsspec.open(path, "rt", encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError as exc:
        raise ValueError(f"vocabulary file {path} not found") from exc


def _comma_names(text: str) -> list[str]:
    """``text`` split at commas; one trailing comma is allowed (``"cat,"`` = one name)."""
    parts = text.split(",")
    return parts[:-1] if len(parts) > 1 and not parts[-1].strip() else parts


BACKGROUND_NAME_SETS = ("clean", "raw")  # evaluate.background_names


def stuff_background_names(exclude: Sequence[str] = (), names: str = "clean") -> tuple[str, ...]:
    """Stuff names used as extra "background" prompts (the paper's VOC21 handling).

    ``names``: ``"clean"`` = ``coco-stuff-background`` (ours, promptable: ``building``,
    ``brick wall``); ``"raw"`` = COCO-Stuff's own 91 stuff names as the module was trained
    on them (``building-other``, ``wall-brick``; the last 91 of ``coco-stuff-171``). The two
    lists are parallel, entry for entry.

    A stuff class is dropped when its clean or its raw name equals (ignoring case and
    spaces) one of ``exclude``, so that a dataset's own class (Pascal Context's ``sky``,
    ``wall``...) is never swallowed by the background, and both sets drop the same stuff
    classes; this filter is **ours**.
    """
    if names not in BACKGROUND_NAME_SETS:
        raise ValueError(
            f"stuff background names must be one of {list(BACKGROUND_NAME_SETS)}, got {names!r}"
        )
    clean = load_vocabulary(STUFF_BACKGROUND)
    raw = load_vocabulary("coco-stuff-171")[80:]
    taken = {name_key(n) for n in exclude}
    chosen = clean if names == "clean" else raw
    return tuple(
        n
        for n, c, r in zip(chosen, clean, raw, strict=True)
        if name_key(c) not in taken and name_key(r) not in taken
    )
