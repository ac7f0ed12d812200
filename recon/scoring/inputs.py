"""The inputs of caption-set scoring: caption files, reference files, and the items they make with an image folder.

A caption file is a COCO results list ``[{"image_id", "caption"}]`` or a clipscore-style ``{image_id: caption}``
object; references are COCO caption annotations, a Karpathy split file or ``{image_id: [refs]}``. Image ids are
compared as strings. A malformed file is one :class:`~recon.data.DataError`; a bad entry (a missing key, a null or
empty caption, a duplicate id -- the first caption is kept --, an id with no image) becomes an item with an
``error``, which the run records as a failed item naming the file and the entry.

Item ids: ``SYSTEM/IMAGE_ID`` for an entry with an id (unique: a system name has no ``/``, an image id is kept once
per system); an entry with no usable id is ``SYSTEM/@entry-N``, a later duplicate ``SYSTEM/IMAGE_ID#entry-N``. An
image id may spell one of those (an image named ``@entry-0.png``): the invented id then takes a ``~2``, ``~3``, ...
suffix, so no record ever replaces another's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from recon.captions_io import References, read_references  # noqa: F401 - read_references: recon score's --refs
from recon.data import DataError, atomic_write_text, list_images, read_json, validate_text
from recon.runs import RunError

INPUTS = "inputs.json"
ALL_METRICS = ("recon", "clipscore", "refclipscore", "bleu", "meteor", "rouge", "cider", "spice", "sbert")
NEEDS_REFS = ("refclipscore", "bleu", "meteor", "rouge", "cider", "spice", "sbert")


@dataclass(frozen=True)
class Entry:
    """One entry of a captions file; ``error`` says why it cannot be scored."""

    key: str | None
    caption: str | None
    where: str
    error: str | None = None


@dataclass
class CaptionSet:
    name: str
    path: Path
    entries: list[Entry]


def _key(value) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return None
    return str(value)


def _entry(key_value, caption, where: str, path: Path, has_caption: bool = True) -> Entry:
    key = _key(key_value)
    if key is None:
        return Entry(
            None, None, where, f"{path}: {where}: image_id must be an integer or a string, got {key_value!r}"
        )
    if not has_caption:
        return Entry(key, None, where, f"{path}: {where}: missing key 'caption'")
    err = validate_text(caption)
    return Entry(
        key, None if err else caption.strip(), where, f"{path}: {where}: caption: {err}" if err else None
    )


def read_caption_set(path: str | Path, name: str) -> CaptionSet:
    """A COCO results list ``[{"image_id", "caption"}]`` or a clipscore-style ``{image_id: caption}`` object.

    Malformed JSON or a wrong top-level shape raise :class:`DataError`; a bad entry becomes an entry with an
    ``error`` (recorded as a failed item), so one broken line does not cost the other captions.
    """
    path = Path(path)
    data = read_json(path)
    entries = []
    if isinstance(data, list):
        for i, e in enumerate(data):
            where = f"entry {i}"
            if not isinstance(e, dict):
                entries.append(
                    Entry(
                        None,
                        None,
                        where,
                        f"{path}: {where}: expected an object with 'image_id' and "
                        f"'caption', got {type(e).__name__}",
                    )
                )
            elif "image_id" not in e:
                entries.append(Entry(None, None, where, f"{path}: {where}: missing key 'image_id'"))
            else:
                entries.append(_entry(e["image_id"], e.get("caption"), where, path, "caption" in e))
    elif isinstance(data, dict):
        for key, value in data.pairs:
            if isinstance(value, list):
                raise DataError(
                    f"{path}: key {key!r} holds a list: this looks like a references file; pass it "
                    "with --refs, and captions as {image_id: caption} or [{image_id, caption}]"
                )
            entries.append(_entry(key, value, f"key {key!r}", path))
    else:
        raise DataError(
            f"{path}: expected a COCO results list [{{'image_id', 'caption'}}] or an object "
            f"{{image_id: caption}}, got {type(data).__name__}"
        )
    return CaptionSet(name, path, entries)


def system_names(paths: Sequence[str | Path], names: Sequence[str] | None = None) -> list[str]:
    """File stems, made unique with the parent folder (then an index); or the given ``names``."""
    paths = [Path(p) for p in paths]
    if names:
        if len(names) != len(paths):
            raise ValueError(f"--names gives {len(names)} names for {len(paths)} caption files")
        out = [str(n).strip() for n in names]
    else:
        out = [p.stem for p in paths]
        if len(set(out)) < len(out):
            out = [f"{p.parent.name}-{p.stem}" if out.count(p.stem) > 1 else p.stem for p in paths]
        out = [n if out.count(n) == 1 else f"{n}-{i}" for i, n in enumerate(out)]
    for n in out:
        if not n or "/" in n or "\\" in n or n.startswith((".", "@")) or len(set(out)) < len(out):
            raise ValueError(
                f"caption set name {n!r}: names must be unique, non-empty, without '/', and not "
                "start with '.' or '@'"
            )
    return out


@dataclass(frozen=True)
class ScoreItem:
    id: str
    system: str
    key: str | None
    caption: str | None = None
    path: Path | None = None
    error: str | None = None


def build_items(
    sets: Sequence[CaptionSet], images: str | Path, refs: References | None = None, limit: int | None = None
) -> list[ScoreItem]:
    """Items image by image (all systems of one image together), in the image folder's order.

    An id is found as a file's path relative to ``images`` without extension (its stem at the top level), with
    extension, or through the file name a COCO annotation file gives it. ``limit`` keeps the first N image ids.
    """
    files = list_images(images)
    # Aliases by precedence: the exact relative path, then it without extension, then the bare file name. Two files
    # behind one alias (a.png and a.jpg for "a") make an id that uses it ambiguous: an error naming both.
    tiers: list[dict[str, list[tuple[int, Path]]]] = [{}, {}, {}]
    for n, it in enumerate(files):
        for tier, alias in zip(tiers, (it.id, Path(it.id).with_suffix("").as_posix(), Path(it.id).name)):
            tier.setdefault(alias, []).append((n, it.path))

    def find(key: str) -> tuple[int, Path] | None:
        for tier in tiers:
            hits = tier.get(key)
            if hits and len(hits) > 1:
                raise DataError(
                    f"image_id {key!r} matches several files in {images}: "
                    f"{', '.join(str(p) for _, p in hits)}; rename one of them, or use ids with "
                    "extensions"
                )
            if hits:
                return hits[0]
        return None

    lookup: dict[str, tuple[int, Path]] = {}
    for key in dict.fromkeys(e.key for s in sets for e in s.entries if e.key is not None):
        hit = find(key)
        if hit is None and refs is not None and (name := refs.file_names.get(key)) is not None:
            hit = find(name) or find(Path(name).name)
        if hit is not None:
            lookup[key] = hit
    keys: dict[str, int] = {}
    for s in sets:
        for e in s.entries:
            if e.key is not None and e.key not in keys:
                keys[e.key] = lookup[e.key][0] if e.key in lookup else len(files) + len(keys)
    order = sorted(keys, key=lambda k: keys[k])[:limit]
    wanted = set(order)
    first: dict[tuple[str, str], tuple[Entry, ScoreItem]] = {}
    extra: list[ScoreItem] = []  # ids invented for bad entries; made unique against every real id below
    for s in sets:
        for e in s.entries:
            if e.key is None:
                extra.append(ScoreItem(f"{s.name}/@{e.where.replace(' ', '-')}", s.name, None, error=e.error))
                continue
            if e.key not in wanted:
                continue
            if (s.name, e.key) in first:
                kept = first[(s.name, e.key)][0]
                extra.append(
                    ScoreItem(
                        f"{s.name}/{e.key}#{e.where.replace(' ', '-')}",
                        s.name,
                        e.key,
                        e.caption,
                        error=f"{s.path}: {e.where}: duplicate image_id {e.key!r}; the first "
                        f"caption ({kept.where}) is kept",
                    )
                )
                continue
            path = lookup.get(e.key, (0, None))[1]
            error = e.error or (
                None
                if path is not None
                else f"{s.path}: {e.where}: image_id {e.key!r} matches no image in {images} (ids are "
                "file paths relative to the folder without extension, or COCO file_names)"
            )
            first[(s.name, e.key)] = (
                e,
                ScoreItem(f"{s.name}/{e.key}", s.name, e.key, e.caption, path, error),
            )
    items = [first[(s.name, k)][1] for k in order for s in sets if (s.name, k) in first]
    taken = {it.id for it in items}
    for n, it in enumerate(extra):
        unique, suffix = it.id, 1
        while unique in taken:
            suffix += 1
            unique = f"{it.id}~{suffix}"
        taken.add(unique)
        extra[n] = replace(it, id=unique)
    return items + extra


def check_inputs(out: Path, inputs: dict) -> None:
    """Refuse to resume a run directory over different inputs; record the inputs of a new one."""
    if Path(out).exists() and not Path(out).is_dir():
        raise RunError(f"--out {out} is a file, not a directory; pass a new or existing directory")
    path = Path(out) / INPUTS
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        diff = sorted(k for k in set(old) | set(inputs) if old.get(k) != inputs.get(k))
        if diff:
            raise RunError(
                f"{out} holds a score run of different inputs ({', '.join(diff)}); pass a new --out "
                "to start a new run, or the same inputs to resume it"
            )
    elif (Path(out) / "results.jsonl").exists():
        raise RunError(f"{out} holds a run that is not a score run; pass a new --out")
    atomic_write_text(path, json.dumps(inputs, indent=1, ensure_ascii=False) + "\n")
