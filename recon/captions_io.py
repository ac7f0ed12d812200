"""Reference annotation files of public datasets and evaluation tools (candidate caption files, clipscore-style or
COCO results, have one reader: :func:`recon.scoring.inputs.read_caption_set`).

- COCO caption annotations ``{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}``
- Karpathy splits ``{"images": [{"filename", "filepath"?, "split", "sentences": [{"raw"}], "cocoid"?}]}``
- clipscore-style references ``{image_id: [captions]}``

Image ids: in COCO-family files (annotations, Karpathy ``cocoid``, results) an id that is an integer, or a
string spelling one canonically ("42", not "042"), becomes an ``int``, as the COCO evaluation tools expect;
any other id stays a ``str``. Keys of clipscore-style files are always strings (they are file stems).

Structural errors (malformed JSON, a missing key, a wrong container) raise :class:`~recon.data.DataError`
naming the file and the entry. Per-entry problems (a duplicate id: the first one is kept; a null or
non-string caption: skipped) do not raise; they are returned in ``problems`` for the run to record.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recon.data import DataError, ImageId, coco_image_id, entry_field, read_json


@dataclass(frozen=True)
class Problem:
    """A per-entry problem of an annotation file; ``message`` names the file and the entry."""

    id: ImageId | None
    message: str


@dataclass
class References:
    """Reference captions per image id, with the image's file name where the file gives one."""

    refs: dict[ImageId, list[str]] = field(default_factory=dict)
    file_names: dict[ImageId, str] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)


def _caption(
    value: Any, path: Path, where: str, image_id: ImageId | None, problems: list[Problem]
) -> str | None:
    if isinstance(value, str):
        return value.strip()
    kind = "null" if value is None else f"a {type(value).__name__}"
    problems.append(Problem(image_id, f"{path}: {where}: caption is {kind}, not a string; skipped"))
    return None


def _list_field(data: Any, key: str, path: Path, required: bool = True) -> list:
    if not isinstance(data, dict):
        raise DataError(
            f"{path}: expected a JSON object with {key!r} at the top level, got {type(data).__name__}"
        )
    if key not in data:
        if required:
            raise DataError(f"{path}: missing top-level key {key!r}")
        return []
    if not isinstance(data[key], list):
        raise DataError(f"{path}: {key!r} must be a list, got {type(data[key]).__name__}")
    return data[key]


def read_coco_captions(path: str | Path) -> References:
    """COCO caption annotations (e.g. ``captions_val2014.json``): refs and file names per image id.

    ``images`` is optional; an annotation whose image is not listed there is kept and reported.
    """
    path = Path(path)
    data = read_json(path)
    out = References()
    for i, img in enumerate(_list_field(data, "images", path, required=False)):
        image_id = coco_image_id(entry_field(img, ("id",), path, f"images[{i}]"), path, f"images[{i}].id")
        file_name = entry_field(img, ("file_name",), path, f"images[{i}]")
        if image_id in out.file_names:
            out.problems.append(
                Problem(image_id, f"{path}: images[{i}]: duplicate id {image_id!r}; the first entry is kept")
            )
            continue
        out.file_names[image_id] = str(file_name)
    for i, ann in enumerate(_list_field(data, "annotations", path)):
        where = f"annotations[{i}]"
        image_id = coco_image_id(entry_field(ann, ("image_id",), path, where), path, f"{where}.image_id")
        caption = _caption(entry_field(ann, ("caption",), path, where), path, where, image_id, out.problems)
        if caption is None:
            continue
        if out.file_names and image_id not in out.file_names and image_id not in out.refs:
            out.problems.append(
                Problem(image_id, f"{path}: {where}: image_id {image_id!r} is not in 'images'")
            )
        out.refs.setdefault(image_id, []).append(caption)
    return out


def read_karpathy(path: str | Path, split: str | Iterable[str] | None = None) -> References:
    """A Karpathy split file (``dataset_coco.json``, ``dataset_flickr30k.json``) as references.

    ``split``: keep only images whose ``split`` is this one (or one of these), e.g. ``"test"`` or
    ``("train", "restval")``; None keeps all. The id is ``cocoid`` when present, else the file name's stem;
    ``file_names`` holds ``filepath/filename``.
    """
    path = Path(path)
    wanted = None if split is None else {split} if isinstance(split, str) else set(split)
    out = References()
    seen_splits = set()
    for i, img in enumerate(_list_field(read_json(path), "images", path)):
        where = f"images[{i}]"
        filename = str(entry_field(img, ("filename",), path, where))
        if wanted is not None:
            img_split = entry_field(img, ("split",), path, where)
            seen_splits.add(str(img_split))
            if img_split not in wanted:
                continue
        raw_id = img.get("cocoid", Path(filename).stem)
        image_id = coco_image_id(raw_id, path, f"{where}.cocoid")
        if image_id in out.refs:
            out.problems.append(
                Problem(image_id, f"{path}: {where}: duplicate id {image_id!r}; the first entry is kept")
            )
            continue
        sentences = entry_field(img, ("sentences",), path, where)
        if not isinstance(sentences, list):
            raise DataError(f"{path}: {where}: 'sentences' must be a list, got {type(sentences).__name__}")
        refs = []
        for j, sentence in enumerate(sentences):
            swhere = f"{where}.sentences[{j}]"
            caption = _caption(
                entry_field(sentence, ("raw",), path, swhere), path, swhere, image_id, out.problems
            )
            if caption is not None:
                refs.append(caption)
        out.refs[image_id] = refs
        filepath = img.get("filepath")
        out.file_names[image_id] = f"{filepath}/{filename}" if filepath else filename
    if wanted is not None and not out.refs:
        raise DataError(f"{path}: no images in split {sorted(wanted)}; the file has {sorted(seen_splits)}")
    return out


def _mapping(path: Path) -> Any:
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object {{image_id: caption}}, got {type(data).__name__}")
    return data


def _duplicate(path: Path, key: str, problems: list[Problem], seen: set) -> bool:
    if key in seen:
        problems.append(Problem(key, f"{path}: duplicate key {key!r}; the first value is kept"))
        return True
    seen.add(key)
    return False


def read_clipscore_references(path: str | Path) -> References:
    """A clipscore-style references file ``{image_id: [captions]}`` (a single string is one reference)."""
    path = Path(path)
    out, seen = References(), set()
    for key, value in _mapping(path).pairs:
        if _duplicate(path, key, out.problems, seen):
            continue
        values = value if isinstance(value, list) else [value]
        refs = [
            c
            for j, v in enumerate(values)
            if (c := _caption(v, path, f"key {key!r}[{j}]", key, out.problems)) is not None
        ]
        out.refs[key] = refs
    return out


def read_references(path: str | Path) -> References:
    """The one references reader: COCO caption annotations, a Karpathy split file, or ``{image_id: [refs]}``
    (the format told from the content); ids become strings."""
    path = Path(path)
    data = read_json(path)
    if isinstance(data, dict) and "annotations" in data:
        refs = read_coco_captions(path)
    elif (
        isinstance(data, dict)
        and isinstance(data.get("images"), list)
        and data["images"]
        and isinstance(data["images"][0], dict)
        and "sentences" in data["images"][0]
    ):
        refs = read_karpathy(path)
    elif isinstance(data, dict):
        refs = read_clipscore_references(path)
    else:
        raise DataError(
            f"{path}: expected COCO caption annotations or an object {{image_id: [references]}}, "
            f"got {type(data).__name__}"
        )
    return References(
        {str(k): v for k, v in refs.refs.items()},
        {str(k): v for k, v in refs.file_names.items()},
        refs.problems,
    )
