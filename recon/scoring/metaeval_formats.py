"""Human-judgment sets for caption-metric meta-evaluation, read from their released formats (over 400 lines: five
readers, each short, sharing the row and error helpers).

Each reader returns :class:`Judgments`: judged captions (:class:`Candidate`: image, caption, the references it is
scored against) with either a human rating each (:class:`Rating`) or a human preference between two
(:class:`Pair`). A malformed row is a :class:`~recon.data.DataError` naming the file and the line (the entry, the
pair or the triplet in JSON and MATLAB files); rows a protocol leaves out are counted in ``notes``. Ratings must lie on
the set's scale. A row keyed like an earlier one (an Expert or CrowdFlower image and caption id, a token file's
caption id, a FOIL image id or original caption) is read once when it repeats the earlier row exactly, counted in
``notes``; when it disagrees it is an error naming both lines, since which one holds is unknowable (:class:`Repeats`).

* **Flickr8k-Expert** ``ExpertAnnotations.txt``: ``image \\t caption id \\t e1 \\t e2 \\t e3`` (scores 1-4); the caption
  text comes from ``Flickr8k.token.txt`` (``image#n \\t caption``). As in the SPICE and CLIPScore papers, each of the
  three expert scores is one judgment, and a candidate that is one of its image's references is left out.
* **Flickr8k-CF** ``CrowdFlowerAnnotations.txt``: ``image \\t caption id \\t yes fraction \\t yeses \\t noes``; the yes
  fraction is the rating, and captions judged for an image are removed from its references (CLIPScore's loader).
* **Composite** ``{8k,30k,coco}_correctness.csv``: Mechanical Turk results, ``;``-separated, one image per row:
  an image URL (``.../name.jpg``), then its N candidate captions, then their N ratings (1-5), then only empty
  columns. The split is by position (the 2N fields after the image), so a caption that is a number off the rating
  scale ("42") is a caption; a caption that is a number on the scale ("3") is an error, as it is what a row with a
  rating column too many looks like, and so is an odd number of fields. Captions judged for an image are removed from
  its references.
* **PASCAL-50S** ``pair_pascal.mat`` (``new_input``: image, caption A, caption B per pair; ``category`` 1-4 =
  HC/HI/HM/MM) with ``consensus_pascal.mat`` beside it (``triplets``: reference, A, B, winner +-1; the same number
  per pair). The human choice is the majority of a pair's votes, ties broken at random (seeded); its references are
  ``n_refs`` of its triplets' references, drawn at random (5, as in the CLIPScore paper). An optional
  ``category_names`` cell names the categories (the shapes set uses it).
* **FOIL** ``foilv1.0_test_2017.json``: COCO-style ``annotations`` with ``foil`` flags; a foil shares its ``id``
  with the original caption it was made from. One (original, foil) pair per image is drawn (seeded), as in the
  CLIPScore paper; its references are the image's other original captions.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from recon.captions_io import read_references as read_json_references
from recon.data import DataError, read_json, read_text_file

PASCAL_CATEGORIES = {1: "HC", 2: "HI", 3: "HM", 4: "MM"}
EXPERT_SCALE, COMPOSITE_SCALE = (1, 4), (1, 5)
_IMAGE = re.compile(r"\.(jpe?g|png|bmp|gif|webp)$", re.IGNORECASE)


@dataclass(frozen=True)
class Source:
    """A judgment file in one of :data:`FORMATS`, the folder of its images and its references (or None)."""

    path: Path
    format: str
    images: Path
    refs: Path | None = None


def one_line(text: str) -> str:
    """Whitespace runs as one space (the loaders of these sets all do this)."""
    return " ".join(str(text).split())


class Repeats:
    """The keys a reader has met in one file. A key met again with the same values is read once and counted (a
    repeated row would otherwise weigh twice in the statistic, or add a reference twice); with other values it is a
    :class:`DataError` naming the file and both places, since which of the two holds cannot be told."""

    def __init__(self, path: Path, what: str):
        self.path, self.what = path, what
        self.seen: dict = {}
        self.count = 0

    def first(self, key, value, where: str) -> bool:
        """True the first time ``key`` is met; False for an identical repeat."""
        if key not in self.seen:
            self.seen[key] = (value, where)
            return True
        old, old_where = self.seen[key]
        if old != value:
            raise DataError(
                f"{self.path}: {where}: {self.what} {key!r} again, with other values than at {old_where}; "
                "keep one of the two"
            )
        self.count += 1
        return False

    def notes(self) -> list[str]:
        return (
            [f"{self.path.name}: {self.count} exact repeats of an earlier {self.what} read once"]
            if self.count
            else []
        )


def _on_scale(value: float, scale: tuple[int, int], path: Path, lineno: int, what: str) -> float:
    if not scale[0] <= value <= scale[1]:
        raise DataError(
            f"{path}: line {lineno}: {what} {value:g} is outside the set's scale {scale[0]}-{scale[1]}"
        )
    return value


@dataclass(frozen=True)
class Candidate:
    """A judged caption: ``image`` is a path relative to the image folder; ``refs`` what reference metrics use."""

    image: str
    caption: str
    refs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rating:
    candidate: Candidate
    human: float
    cluster: str  # judgments of one cluster (an image) are resampled together by the bootstrap
    where: str


@dataclass(frozen=True)
class Pair:
    better: Candidate
    worse: Candidate
    category: str
    cluster: str
    where: str


@dataclass
class Judgments:
    format: str
    path: Path
    ratings: list[Rating] = field(default_factory=list)
    pairs: list[Pair] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def candidates(self) -> list[Candidate]:
        if self.ratings:
            return [r.candidate for r in self.ratings]
        return [c for p in self.pairs for c in (p.better, p.worse)]

    def limit(self, n_images: int | None) -> Judgments:
        """The judgments of the first ``n_images`` images in file order."""
        if n_images is None:
            return self
        keep = list(dict.fromkeys(c.image for c in self.candidates()))[:n_images]
        keep_set = set(keep)
        return Judgments(
            self.format,
            self.path,
            [r for r in self.ratings if r.candidate.image in keep_set],
            [p for p in self.pairs if p.better.image in keep_set],
            self.categories,
            self.notes,
        )


def detect_format(path: str | Path) -> str:
    """The format a file's name says (``ExpertAnnotations.txt``, ``*.csv``, ``pair_pascal.mat``, ``*.json``)."""
    name = Path(path).name.lower()
    for fmt in sorted(FORMAT.values(), key=lambda f: f.detect_order):
        if fmt.named(name):
            return fmt.name
    raise DataError(
        f"{path}: cannot tell the judgment format from the file name; pass --format ({', '.join(FORMATS)})"
    )


# ------------------------------------------------------------------------------------------------ references
@dataclass
class References:
    """Reference captions by image file name (and stem); caption text by Flickr caption id ``image#n``."""

    path: Path | None = None
    by_image: dict[str, list[str]] = field(default_factory=dict)
    captions: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def of(self, image: str) -> list[str]:
        for key in (image, Path(image).name, Path(image).stem):
            if key in self.by_image:
                return self.by_image[key]
        return []


def read_references(path: str | Path) -> References:
    """A Flickr token file (``Flickr8k.token.txt``, ``results_20130124.token``: ``image#n \\t caption``) or any
    references file ``recon score --refs`` reads (COCO caption annotations, Karpathy, ``{image_id: [refs]}``)."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        refs = read_json_references(path)
        out = References(path)
        for key, captions in refs.refs.items():
            captions = [one_line(c) for c in captions]
            out.by_image[str(key)] = captions
            if (name := refs.file_names.get(key)) is not None:
                out.by_image.setdefault(name, captions)
                out.by_image.setdefault(Path(name).name, captions)
        return out
    out, repeats = References(path), Repeats(path, "caption id")
    for lineno, line in enumerate(read_text_file(path).splitlines(), 1):
        if not line.strip():
            continue
        caption_id, tab, caption = line.partition("\t")
        if not tab or "#" not in caption_id or not caption.strip():
            raise DataError(
                f"{path}: line {lineno}: expected 'image#n<TAB>caption' (a Flickr token file), "
                f"got {line[:80]!r}"
            )
        caption_id, caption = caption_id.strip(), one_line(caption)
        if repeats.first(caption_id, caption, f"line {lineno}"):
            out.captions[caption_id] = caption
            out.by_image.setdefault(caption_id.rsplit("#", 1)[0], []).append(caption)
    out.notes += repeats.notes()
    return out


# ----------------------------------------------------------------------------------------------- Flickr8k
def _rows(path: Path, n_fields: int, what: str):
    for lineno, line in enumerate(read_text_file(path).splitlines(), 1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split("\t")]
        if len(parts) != n_fields:
            raise DataError(
                f"{path}: line {lineno}: expected {n_fields} tab-separated fields ({what}), got {len(parts)}"
            )
        yield lineno, parts


def _number(text: str, path: Path, lineno: int, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise DataError(f"{path}: line {lineno}: {what} {text!r} is not a number")
    return value


def _caption_text(refs: References | None, caption_id: str, path: Path, lineno: int) -> str:
    if refs is None or not refs.captions:
        raise DataError(
            f"{path} names captions by Flickr caption id (image#n): pass the Flickr8k.token.txt that "
            "holds their text with --refs"
        )
    if caption_id not in refs.captions:
        raise DataError(f"{path}: line {lineno}: caption id {caption_id!r} is not in {refs.path}")
    return refs.captions[caption_id]


def read_expert(path: str | Path, refs: References | None) -> Judgments:
    path = Path(path)
    out, skipped, repeats = Judgments("expert", path), 0, Repeats(path, "image and caption id")
    what = "image, caption id, three expert scores"
    for lineno, (image, caption_id, *scores) in _rows(path, 5, what):
        caption = _caption_text(refs, caption_id, path, lineno)
        values = [
            _on_scale(_number(s, path, lineno, "expert score"), EXPERT_SCALE, path, lineno, "expert score")
            for s in scores
        ]
        if not repeats.first((image, caption_id), values, f"line {lineno}"):
            continue
        image_refs = refs.of(image)
        if caption in image_refs:  # the SPICE / CLIPScore protocol: a reference is not a candidate
            skipped += 1
            continue
        cand = Candidate(image, caption, tuple(image_refs))
        out.ratings += [Rating(cand, v, image, f"{path}:{lineno}") for v in values]
    if skipped:
        out.notes.append(
            f"{path.name}: {skipped} candidates that are references of their image left out "
            "(SPICE / CLIPScore protocol)"
        )
    out.notes += repeats.notes()
    return out


def _without_candidates(
    judged: Sequence[tuple[str, str, float, str]], refs: References | None
) -> list[Rating]:
    """Ratings whose references are their image's, minus every caption judged for that image."""
    judged_captions: dict[str, set[str]] = {}
    for image, caption, _, _ in judged:
        judged_captions.setdefault(image, set()).add(caption)
    out = []
    for image, caption, value, where in judged:
        image_refs = [] if refs is None else [r for r in refs.of(image) if r not in judged_captions[image]]
        out.append(Rating(Candidate(image, caption, tuple(image_refs)), value, image, where))
    return out


def read_crowdflower(path: str | Path, refs: References | None) -> Judgments:
    path = Path(path)
    judged, repeats = [], Repeats(path, "image and caption id")
    for lineno, (image, caption_id, frac, n_yes, n_no) in _rows(
        path, 5, "image, caption id, yes fraction, yeses, noes"
    ):
        caption = _caption_text(refs, caption_id, path, lineno)
        value = _number(frac, path, lineno, "yes fraction")
        yes, no = (_number(x, path, lineno, "vote count") for x in (n_yes, n_no))
        if (
            yes < 0
            or no < 0
            or yes + no == 0
            or yes != int(yes)
            or no != int(no)
            or abs(value - yes / (yes + no)) > 1e-4
        ):
            raise DataError(
                f"{path}: line {lineno}: yes fraction {frac} does not equal yeses / (yeses + noes) "
                f"= {n_yes} / ({n_yes} + {n_no})"
            )
        if repeats.first((image, caption_id), (value, yes, no), f"line {lineno}"):
            judged.append((image, caption, value, f"{path}:{lineno}"))
    return Judgments("crowdflower", path, ratings=_without_candidates(judged, refs), notes=repeats.notes())


# ---------------------------------------------------------------------------------------------- Composite
def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def read_composite(path: str | Path, refs: References | None) -> Judgments:
    path = Path(path)
    text = read_text_file(path)
    first = text.split("\n", 1)[0]
    delimiter = ";" if first.count(";") >= first.count(",") else ","
    judged = []
    for lineno, row in enumerate(csv.reader(io.StringIO(text), delimiter=delimiter), 1):
        row = [c.strip() for c in row]
        if not any(row):
            continue
        at = next((i for i, c in enumerate(row) if _IMAGE.search(c.split("?")[0])), None)
        if at is None:
            if lineno == 1:
                continue  # the header
            raise DataError(f"{path}: line {lineno}: no image file name or URL (…/name.jpg) in this row")
        rest = row[at + 1 :]
        while rest and not rest[-1]:  # empty trailing columns (AMT's Approve, Reject)
            rest.pop()
        n = len(rest) // 2  # by position: a caption that is a number stays a caption
        if n == 0 or len(rest) % 2 or not all(_is_number(c) for c in rest[n:]):
            raise DataError(
                f"{path}: line {lineno}: expected the image, then N candidate captions, then their N "
                f"numeric ratings and nothing after them; found {len(rest)} fields after the image, "
                f"{sum(map(_is_number, rest[n:]))} of the last {len(rest) - n} numeric"
            )
        image = row[at].split("?")[0].rstrip("/").rsplit("/", 1)[-1]
        for caption, rating in zip(rest[:n], rest[n:]):
            if not caption:
                raise DataError(f"{path}: line {lineno}: an empty candidate caption")
            if _is_number(caption) and COMPOSITE_SCALE[0] <= float(caption) <= COMPOSITE_SCALE[1]:
                raise DataError(
                    f"{path}: line {lineno}: candidate caption {caption!r} is a rating on the scale "
                    f"{COMPOSITE_SCALE[0]}-{COMPOSITE_SCALE[1]}: more ratings than captions in this row?"
                )
            value = _on_scale(float(rating), COMPOSITE_SCALE, path, lineno, "rating")
            judged.append((image, one_line(caption), value, f"{path}:{lineno}"))
    if not judged:
        raise DataError(f"{path}: no judgments (expected rows of image URL; captions; ratings)")
    return Judgments("composite", path, ratings=_without_candidates(judged, refs))


# --------------------------------------------------------------------------------------------- PASCAL-50S
def _mat_items(value) -> list:
    """The elements of a MATLAB struct record or cell (scipy.io.loadmat's np.void or object array)."""
    if isinstance(value, np.void) and value.dtype.names:
        return [value[n] for n in value.dtype.names]
    return list(np.asarray(value, dtype=object).reshape(-1))


def _mat_scalar(value):
    """A string or number wrapped in any number of 1-element arrays (MATLAB cells and char arrays)."""
    while isinstance(value, np.ndarray):
        if value.size != 1:
            return None
        value = value.reshape(-1)[0]
    if isinstance(value, (str, np.str_)):
        return str(value)
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return float(value)
    return None


def _mat_text(value, path: Path, where: str) -> str:
    text = _mat_scalar(value)
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{path}: {where}: expected a non-empty string, got {value!r}"[:300])
    return one_line(text)


def _loadmat(path: Path, keys: Sequence[str]) -> dict:
    import scipy.io

    if not path.is_file():
        raise DataError(f"{path}: no such file (PASCAL-50S needs pair_pascal.mat and consensus_pascal.mat)")
    try:
        mat = scipy.io.loadmat(str(path))
    except NotImplementedError:  # scipy.io reads MATLAB v4 to v7.2; v7.3 files are HDF5
        raise DataError(
            f"{path}: a MATLAB v7.3 (HDF5) file, which scipy.io.loadmat cannot read; re-save it as v7 "
            "(MATLAB or Octave: load it, then save(..., '-v7'))"
        ) from None
    except (ValueError, TypeError, OSError) as e:
        raise DataError(f"{path}: not a readable MATLAB .mat file ({e})") from None
    if missing := [k for k in keys if k not in mat]:
        raise DataError(f"{path}: missing variable(s) {', '.join(missing)}")
    return mat


def read_pascal50s(path: str | Path, n_refs: int = 5, seed: int = 0) -> Judgments:
    """``path``: ``pair_pascal.mat`` or ``consensus_pascal.mat`` (the other one is read from the same folder)."""
    path = Path(path)
    pairs_path, votes_path = path.with_name("pair_pascal.mat"), path.with_name("consensus_pascal.mat")
    pmat = _loadmat(pairs_path, ("new_input", "category"))
    vmat = _loadmat(votes_path, ("triplets",))
    entries = list(pmat["new_input"].reshape(-1))  # a struct array or a cell array: one pair each
    categories = np.asarray(pmat["category"]).reshape(-1)
    triplets = list(vmat["triplets"].reshape(-1))
    names = dict(PASCAL_CATEGORIES)
    if "category_names" in pmat:
        names = {
            i + 1: _mat_text(v, pairs_path, f"category_names[{i}]")
            for i, v in enumerate(_mat_items(pmat["category_names"]))
        }
    if len(categories) != len(entries) or not entries:
        raise DataError(f"{pairs_path}: {len(entries)} pairs in new_input but {len(categories)} categories")
    if not triplets:  # no votes: every pair's winner would be a coin flip
        raise DataError(
            f"{votes_path}: no triplets (human votes) for the {len(entries)} pairs of {pairs_path.name}"
        )
    if len(triplets) % len(entries):
        raise DataError(
            f"{votes_path}: {len(triplets)} triplets do not split evenly over the {len(entries)} pairs "
            f"of {pairs_path.name}"
        )
    per_pair = len(triplets) // len(entries)
    rng = np.random.default_rng([seed, 50])
    out, ties = Judgments("pascal50s", pairs_path, categories=list(names.values())), 0
    for i, entry in enumerate(entries):
        where = f"pair {i}"
        fields = _mat_items(entry)
        if len(fields) != 3:
            raise DataError(
                f"{pairs_path}: {where}: expected (image, caption A, caption B), got {len(fields)} fields"
            )
        image, a, b = (_mat_text(f, pairs_path, where) for f in fields)
        cat = _mat_scalar(categories[i])
        if cat not in names:
            raise DataError(
                f"{pairs_path}: {where}: category {categories[i]!r} is not one of {sorted(names)}"
            )
        votes, pair_refs = {a: 0, b: 0}, []
        for j in range(i * per_pair, (i + 1) * per_pair):
            tw = f"triplet {j}"
            t = _mat_items(triplets[j])
            if len(t) != 4:
                raise DataError(
                    f"{votes_path}: {tw}: expected (reference, A, B, winner), got {len(t)} fields"
                )
            ref, ta, tb = (_mat_text(x, votes_path, tw) for x in t[:3])
            winner = _mat_scalar(t[3])
            if winner not in (1.0, -1.0):
                raise DataError(f"{votes_path}: {tw}: winner must be 1 or -1, got {t[3]!r}")
            chosen = ta if winner == 1.0 else tb
            if chosen not in votes:
                raise DataError(
                    f"{votes_path}: {tw}: its chosen caption {chosen[:60]!r} is neither caption of "
                    f"{pairs_path.name} {where}"
                )
            votes[chosen] += 1
            pair_refs.append(ref)
        if votes[a] == votes[b]:
            ties += 1
            a_wins = bool(rng.integers(2))
        else:
            a_wins = votes[a] > votes[b]
        if n_refs and len(pair_refs) > n_refs:
            pair_refs = [pair_refs[k] for k in sorted(rng.choice(len(pair_refs), n_refs, replace=False))]
        cands = Candidate(image, a, tuple(pair_refs)), Candidate(image, b, tuple(pair_refs))
        better, worse = cands if a_wins else cands[::-1]
        out.pairs.append(Pair(better, worse, names[cat], image, f"{pairs_path}:{where}"))
    if ties:
        out.notes.append(
            f"{pairs_path.name}: {ties} pairs with tied human votes; the winner was drawn at random "
            f"(seed {seed})"
        )
    return out


# --------------------------------------------------------------------------------------------------- FOIL
def read_foil(path: str | Path, seed: int = 0) -> Judgments:
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise DataError(f"{path}: expected a COCO-style object with an 'annotations' list (FOIL format)")
    file_names, image_repeats = {}, Repeats(path, "image id")
    for i, img in enumerate(data.get("images") or []):
        if not isinstance(img, dict) or "id" not in img or not isinstance(img.get("file_name"), str):
            raise DataError(f"{path}: images[{i}]: expected an object with 'id' and 'file_name'")
        if image_repeats.first(str(img["id"]), img["file_name"], f"images[{i}]"):
            file_names[str(img["id"])] = img["file_name"]
    original_repeats = Repeats(path, "original caption (image, id)")
    originals: dict[str, list[tuple[str, str]]] = {}  # image -> [(caption id, caption)]
    foils: dict[str, list[tuple[str, str, str]]] = {}  # image -> [(caption id, caption, where)]
    for i, ann in enumerate(data["annotations"]):
        where = f"annotations[{i}]"
        if not isinstance(ann, dict):
            raise DataError(f"{path}: {where}: expected an object, got {type(ann).__name__}")
        for key in ("image_id", "id", "caption", "foil"):
            if key not in ann:
                raise DataError(f"{path}: {where}: missing key {key!r}")
        if not isinstance(ann["caption"], str) or not ann["caption"].strip():
            raise DataError(f"{path}: {where}: 'caption' must be a non-empty string")
        if ann["foil"] not in (True, False):
            raise DataError(f"{path}: {where}: 'foil' must be true or false, got {ann['foil']!r}")
        image = file_names.get(str(ann["image_id"]), str(ann["image_id"]))
        entry = (str(ann["id"]), one_line(ann["caption"]))
        if ann["foil"]:
            foils.setdefault(image, []).append((*entry, f"{path}:{where}"))
        elif original_repeats.first((image, entry[0]), entry[1], where):
            originals.setdefault(image, []).append(entry)
    rng = np.random.default_rng([seed, 17])
    out, orphans = Judgments("foil", path, categories=["foil"]), 0
    for image, image_foils in foils.items():
        by_id = {cid: cap for cid, cap in originals.get(image, [])}
        options = [(by_id[cid], cid, cap, where) for cid, cap, where in image_foils if cid in by_id]
        orphans += len(image_foils) - len(options)
        if not options:
            continue
        true, cid, foil, where = options[int(rng.integers(len(options)))]
        refs = tuple(cap for other, cap in originals[image] if other != cid)
        out.pairs.append(
            Pair(Candidate(image, true, refs), Candidate(image, foil, refs), "foil", image, where)
        )
    if orphans:
        out.notes.append(
            f"{path.name}: {orphans} foils without an original caption of the same id and image left out"
        )
    out.notes += image_repeats.notes() + original_repeats.notes()
    if not out.pairs:
        raise DataError(
            f"{path}: no (original, foil) pairs: foils share their 'id' with the original caption"
        )
    return out


@dataclass(frozen=True)
class Format:
    """A judgment format: how its files are named and read, and how a metric is compared with its judgments.
    ``pairs``: the judgments are preferred-caption pairs (pairwise accuracy) rather than ratings (Kendall tau with
    ``statistic``'s variant); ``own_references``: its files carry their references (``--refs`` is not used)."""

    name: str
    statistic: str
    pairs: bool
    own_references: bool
    named: Callable[[str], bool]  # does a lower-cased file name say this format
    detect_order: int
    read: Callable[..., Judgments]  # (path, refs, n_refs, seed) -> Judgments
    files: Callable[[Path], list[Path]] = lambda path: [path]  # the files a judgment set's content lies in


# Adding a format: a reader above and one row here.
FORMAT: dict[str, Format] = {
    f.name: f
    for f in (
        Format(
            "expert",
            "kendall_tau_c",
            False,
            False,
            lambda n: "expert" in n,
            1,
            lambda path, refs, n_refs, seed: read_expert(path, refs),
        ),
        Format(
            "crowdflower",
            "kendall_tau_b",
            False,
            False,
            lambda n: "crowdflower" in n,
            2,
            lambda path, refs, n_refs, seed: read_crowdflower(path, refs),
        ),
        Format(
            "composite",
            "kendall_tau_c",
            False,
            False,
            lambda n: n.endswith(".csv"),
            3,
            lambda path, refs, n_refs, seed: read_composite(path, refs),
        ),
        Format(
            "pascal50s",
            "accuracy",
            True,
            True,
            lambda n: n.endswith(".mat"),
            0,
            lambda path, refs, n_refs, seed: read_pascal50s(path, n_refs, seed),
            lambda path: [path.with_name("pair_pascal.mat"), path.with_name("consensus_pascal.mat")],
        ),
        Format(
            "foil",
            "accuracy",
            True,
            True,
            lambda n: n.endswith(".json"),
            4,
            lambda path, refs, n_refs, seed: read_foil(path, seed),
        ),
    )
}
FORMATS = tuple(FORMAT)  # the --format choices
STATISTIC = {name: f.statistic for name, f in FORMAT.items()}


def read_judgments(
    path: str | Path, fmt: str, refs: References | None = None, n_refs: int = 5, seed: int = 0
) -> Judgments:
    if fmt not in FORMAT:
        raise ValueError(f"--format {fmt!r}: choose from {', '.join(FORMATS)}")
    return FORMAT[fmt].read(path, refs, n_refs, seed)
