"""The compositional scenes world: 1-4 objects on a 2x2 grid of cells, with exact ground truth.

It sits beside :mod:`recon.shapes.world` (one object per image) and shares its shapes, colours, backgrounds and
drawing code. A scene is a background plus up to four objects, each in its own cell of a 2x2 grid, each with a shape,
a colour and a size; 32x32 px (a cell is 16 px: a small object ~8 px across, as small as the shapes world's).

Captions come from three templates that name every object (and the background), listing the objects in the scene's
``order`` (random per scene, so every relation word occurs):

* ``relational``: "a small red circle left of a large blue square, which is above a small green cross on a white
  background" -- each object after the first is placed relative to the one named before it;
* ``count``: "two small green triangles and a large red circle on a gray background" -- identical objects grouped
  and counted, no places;
* ``detailed``: "in the top left a small red circle and in the bottom right a large blue square on a white
  background" -- every object with its cell, the cell named first (a causal text encoder then carries the place into
  the object's words: the feasibility gate measured 62% exact 2-object scenes with this order, 4.5% with the cell
  after the object).

Held-out rule: an object *type* is (colour, shape); 10% of the unordered pairs of types (:data:`HELDOUT_PAIRS`,
fixed) never occur together in a ``train`` or ``test`` scene; every ``heldout`` scene holds at least one of them.
Every type and every relation is seen in training; only those co-occurrences are new.

:func:`parse_caption` turns any caption (ours or a model's) into :class:`Claims` (objects with attributes and
optional cells, relations between them), and the scoring functions compare claims with a scene exactly.
Everything is a pure function of a seed, as in the shapes world.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from recon.shapes.world import BACKGROUNDS, COLORS, SHAPES, SPLITS, draw_shape, jittered_fill

IMAGE_SIZE = 32
SUPERSAMPLE = 4
GRID = 2
CELL_SIDE = IMAGE_SIZE // GRID
CELLS = (
    "top left",
    "top right",
    "bottom left",
    "bottom right",
)  # reading order; cell i is (row i // 2, col i % 2)
SIZES = {"small": 0.5, "large": 0.8}  # object extent as a fraction of the cell side
MAX_OBJECTS = len(CELLS)
OBJECT_ATTRIBUTES = ("size", "color", "shape")
VALUES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": tuple(COLORS),
    "size": tuple(SIZES),
    "cell": CELLS,
    "background": tuple(BACKGROUNDS),
}
TEMPLATES = ("relational", "count", "detailed")
NUMBERS = ("a", "two", "three", "four")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
JITTER_PX = 1.0  # objects stay inside their cell: the largest one leaves 1.6 px of margin

TYPES: tuple[tuple[str, str], ...] = tuple(itertools.product(COLORS, SHAPES))  # (colour, shape)
HELDOUT_FRACTION = 0.1
_HELDOUT_SEED = 20261203
_ALL_PAIRS = tuple(itertools.combinations_with_replacement(TYPES, 2))
HELDOUT_PAIRS: frozenset[tuple[tuple[str, str], tuple[str, str]]] = frozenset(
    tuple(sorted(_ALL_PAIRS[i]))
    for i in np.random.default_rng(_HELDOUT_SEED).permutation(len(_ALL_PAIRS))[
        : round(HELDOUT_FRACTION * len(_ALL_PAIRS))
    ]
)


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    cell: str
    dx: float = 0.0  # jitter in pixels of the 32 px image
    dy: float = 0.0
    scale: float = 1.0
    tint: tuple[int, int, int] = (0, 0, 0)

    @property
    def kind(self) -> tuple[str, str, str]:
        """(size, colour, shape): what a caption says about the object besides its place."""
        return (self.size, self.color, self.shape)


@dataclass(frozen=True)
class Scene:
    """A background and up to four objects in distinct cells (sorted by cell); ``order`` is the order in which
    captions name the objects (indices into ``objects``), ``template`` an index into :data:`TEMPLATES`."""

    background: str
    objects: tuple[SceneObject, ...]
    template: int = 0
    order: tuple[int, ...] = ()

    @property
    def caption(self) -> str:
        return caption_for(self, self.template)

    @property
    def mention_order(self) -> tuple[int, ...]:
        return self.order or tuple(range(len(self.objects)))

    @property
    def layout(self) -> tuple[tuple[str, str, str] | None, ...]:
        """Per cell (reading order): the object's (size, colour, shape), or None; exact-scene identity."""
        by_cell = {o.cell: o.kind for o in self.objects}
        return tuple(by_cell.get(c) for c in CELLS)

    def is_heldout(self) -> bool:
        return any(p in HELDOUT_PAIRS for p in _type_pairs(self.objects))


def _type_pairs(objects) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    return [
        tuple(sorted([(a.color, a.shape), (b.color, b.shape)])) for a, b in itertools.combinations(objects, 2)
    ]


def relation(a: str, b: str) -> str:
    """Where cell ``a`` lies relative to cell ``b``: "left of", "above", "below right of", ... (cells differ)."""
    (ra, ca), (rb, cb) = divmod(CELLS.index(a), GRID), divmod(CELLS.index(b), GRID)
    vertical = "above" if ra < rb else "below" if ra > rb else ""
    horizontal = "left of" if ca < cb else "right of" if ca > cb else ""
    if not vertical and not horizontal:
        raise ValueError(f"relation of a cell to itself ({a!r})")
    return f"{vertical} {horizontal}".strip()


RELATIONS = tuple(sorted({relation(a, b) for a in CELLS for b in CELLS if a != b}, key=len))


# ----------------------------------------------------------------------------------------------- captions
def _phrase(kind: tuple[str, str, str], count: int = 1) -> str:
    size, color, shape = kind
    return f"{NUMBERS[count - 1]} {size} {color} {PLURALS[shape] if count > 1 else shape}"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption_for(scene: Scene, template: int | str = 0) -> str:
    name = TEMPLATES[template] if isinstance(template, int) else template
    objs = [scene.objects[i] for i in scene.mention_order]
    bg = scene.background
    if not objs:
        return f"an empty {bg} background"
    if name == "relational":
        text = _phrase(objs[0].kind)
        for k, (prev, obj) in enumerate(itertools.pairwise(objs)):
            text += (", which is " if k else " ") + f"{relation(prev.cell, obj.cell)} {_phrase(obj.kind)}"
        return f"{text} on a {bg} background"
    if name == "count":
        counts = Counter(o.kind for o in objs)  # insertion order: first mention
        return f"{_join([_phrase(k, n) for k, n in counts.items()])} on a {bg} background"
    if name == "detailed":
        return " and ".join(f"in the {o.cell} {_phrase(o.kind)}" for o in objs) + f" on a {bg} background"
    raise ValueError(f"template {template!r}: expected an index or one of {TEMPLATES}")


def caption_vocabulary() -> list[str]:
    """Every word a caption can use (the tokenizers must cover each)."""
    words = {"which", "is", "on", "background", "with", "in", "the", "and", "an", "empty", "of"}
    for vals in VALUES.values():
        for v in vals:
            words.update(v.split())
    words.update(NUMBERS)
    words.update(PLURALS.values())
    for r in RELATIONS:
        words.update(r.split())
    return sorted(words)


# ----------------------------------------------------------------------------------------------- sampling
def _rng(seed: int, split: str, *stream: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {sorted(SPLITS)}")
    return np.random.default_rng([int(seed), SPLITS[split], 7, *stream])  # 7: never the shapes world's stream


def _draw_scene(rng: np.random.Generator, n_objects: tuple[int, ...], templates: tuple[int, ...]) -> Scene:
    k = int(n_objects[int(rng.integers(len(n_objects)))])
    cells = sorted(rng.permutation(len(CELLS))[:k].tolist())
    objects = []
    for c in cells:
        jit = rng.uniform(-1, 1, 3)
        objects.append(
            SceneObject(
                shape=SHAPES[int(rng.integers(len(SHAPES)))],
                color=VALUES["color"][int(rng.integers(len(COLORS)))],
                size=VALUES["size"][int(rng.integers(len(SIZES)))],
                cell=CELLS[c],
                dx=JITTER_PX * float(jit[0]),
                dy=JITTER_PX * float(jit[1]),
                scale=1.0 + 0.06 * float(jit[2]),
                tint=tuple(int(t) for t in rng.integers(-12, 13, 3)),
            )
        )
    background = VALUES["background"][int(rng.integers(len(BACKGROUNDS)))]
    template = templates[int(rng.integers(len(templates)))]
    order = tuple(int(i) for i in rng.permutation(k))
    return Scene(background, tuple(objects), template, order)


def sample_scenes(
    n: int,
    seed: int,
    split: str = "train",
    stream: int = 0,
    n_objects: int | tuple[int, ...] = (1, 2, 3, 4),
    templates: tuple[str, ...] = TEMPLATES,
) -> list[Scene]:
    """``n`` scenes drawn deterministically from ``(seed, split, stream)``, each with a number of objects drawn
    uniformly from ``n_objects`` and a caption template drawn uniformly from ``templates`` (repeat a name to weight
    it). ``train`` / ``test`` never hold a held-out pair of types; ``heldout`` always does
    (so it needs ``n_objects >= 2``). Training uses ``stream = step``, as in the shapes world."""
    counts = (n_objects,) if isinstance(n_objects, int) else tuple(n_objects)
    if not counts or min(counts) < 0 or max(counts) > MAX_OBJECTS:
        raise ValueError(f"n_objects {n_objects!r}: expected numbers from 0 to {MAX_OBJECTS}")
    if split == "heldout" and max(counts) < 2:
        raise ValueError("the heldout split holds pairs of objects: pass n_objects >= 2")
    unknown = sorted(set(templates) - set(TEMPLATES))
    if not templates or unknown:
        raise ValueError(f"templates {templates!r}: expected names from {TEMPLATES}")
    template_ids = tuple(TEMPLATES.index(t) for t in templates)
    want_heldout = split == "heldout"
    rng = _rng(seed, split, stream)
    scenes: list[Scene] = []
    while len(scenes) < n:  # rejection keeps every accepted scene distributed as the unconditioned draw
        scene = _draw_scene(rng, counts, template_ids)
        if want_heldout and len(scene.objects) < 2:
            continue
        if scene.is_heldout() == want_heldout:
            scenes.append(scene)
    return scenes


# ----------------------------------------------------------------------------------------------- rendering
def render(scene: Scene) -> np.ndarray:
    """The scene as a ``(32, 32, 3)`` uint8 RGB array (drawn at 4x, box-filtered down)."""
    side = IMAGE_SIZE * SUPERSAMPLE
    px = SUPERSAMPLE
    img = Image.new("RGB", (side, side), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        row, col = divmod(CELLS.index(obj.cell), GRID)
        cx = (col + 0.5) * CELL_SIDE * px + obj.dx * px
        cy = (row + 0.5) * CELL_SIDE * px + obj.dy * px
        r = SIZES[obj.size] * obj.scale * CELL_SIDE * px / 2
        draw_shape(draw, obj.shape, cx, cy, r, jittered_fill(obj.color, obj.tint))
    return np.asarray(img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX))


def render_batch(scenes: list[Scene]) -> np.ndarray:
    """``(n, 32, 32, 3)`` uint8."""
    return (
        np.stack([render(s) for s in scenes])
        if scenes
        else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    )


# ----------------------------------------------------------------------------------------------- parsing
@dataclass(frozen=True)
class Claim:
    """One object a caption names; ``None`` where the caption leaves an attribute (or the cell) unsaid."""

    size: str | None
    color: str | None
    shape: str | None
    cell: str | None = None

    @property
    def kind(self) -> tuple[str | None, str | None, str | None]:
        return (self.size, self.color, self.shape)


@dataclass(frozen=True)
class Claims:
    """What a caption says: the background, the objects, and relations ``(i, relation, j)``: object i lies
    ``relation`` object j (indices into ``objects``; "a red circle left of a blue square" is ``(0, "left of", 1)``)."""

    background: str | None
    objects: tuple[Claim, ...] = ()
    relations: tuple[tuple[int, str, int], ...] = field(default=())


def claims_of(scene: Scene, template: int | str | None = None) -> Claims:
    """What the caption of ``scene`` under ``template`` (default: its own) claims; equals
    ``parse_caption(caption_for(scene, template))``."""
    t = scene.template if template is None else template
    name = TEMPLATES[t] if isinstance(t, int) else t
    objs = [scene.objects[i] for i in scene.mention_order]
    if name == "count":
        counts = Counter(o.kind for o in objs)
        return Claims(scene.background, tuple(Claim(*k) for k, n in counts.items() for _ in range(n)))
    if name == "detailed":
        return Claims(scene.background, tuple(Claim(*o.kind, cell=o.cell) for o in objs))
    rels = tuple((i - 1, relation(objs[i - 1].cell, objs[i].cell), i) for i in range(1, len(objs)))
    return Claims(scene.background, tuple(Claim(*o.kind) for o in objs), rels)


_WORD = re.compile(r"[a-z]+")
_NOUNS = {**{s: (s, 1) for s in SHAPES}, **{p: (s, 2) for s, p in PLURALS.items()}}
_COUNT_WORDS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4}
_RELATION_WORDS = sorted((tuple(r.split()) for r in RELATIONS), key=len, reverse=True)  # longest match first


def parse_caption(text: str) -> Claims:
    """The claims of any caption: objects (count word, size, colour, shape noun; a plural noun repeats the object),
    "in/at the <cell>" right after an object's noun (its cell) or else before an object (the next object's cell), a
    relation word before an object (relating it to the object named just before), "<background> background".
    Tolerant of model output: unknown words are skipped, a missing attribute is None."""
    words = _WORD.findall(text.lower())
    background = None
    objects: list[Claim] = []
    relations: list[tuple[int, str, int]] = []
    pending_relation: str | None = None
    pending_cell: str | None = None
    count, size, color = None, None, None
    i = 0
    while i < len(words):
        w = words[i]
        if w == "background":
            if i > 0 and words[i - 1] in BACKGROUNDS:
                background = words[i - 1]
            i += 1
            continue
        if w in ("in", "at") and words[i + 1 : i + 2] == ["the"]:
            cell = " ".join(words[i + 2 : i + 4])
            if cell in CELLS:
                if objects and i > 0 and words[i - 1] in _NOUNS:  # "a red circle in the top left"
                    last = objects[-1]
                    objects[-1] = Claim(last.size, last.color, last.shape, cell)
                else:  # "in the top left a red circle"
                    pending_cell = cell
                i += 4
                continue
        rel = next((r for r in _RELATION_WORDS if tuple(words[i : i + len(r)]) == r), None)
        if rel is not None:
            pending_relation = " ".join(rel)
            i += len(rel)
            continue
        if w in _COUNT_WORDS:
            count = _COUNT_WORDS[w]
        elif w in SIZES:
            size = w
        elif w in COLORS:
            color = w
        elif w in _NOUNS:
            shape, plural = _NOUNS[w]
            n = count if count is not None else plural
            n = max(n, 2) if plural == 2 else n
            start = len(objects)
            objects += [Claim(size, color, shape, pending_cell if k == 0 else None) for k in range(n)]
            if pending_relation is not None and start > 0:
                relations.append((start - 1, pending_relation, start))
            pending_relation, pending_cell, count, size, color = None, None, None, None, None
        i += 1
    return Claims(background, tuple(objects), tuple(relations))


# ----------------------------------------------------------------------------------------------- scoring
# Each score compares what a caption claims with the true scene; each is a fraction, higher is better, and None
# where the caption makes no claim of that kind.
def _f1(claimed: Counter, true: Counter) -> float:
    hit = sum((claimed & true).values())
    n_c, n_t = sum(claimed.values()), sum(true.values())
    if n_c == 0 and n_t == 0:
        return 1.0
    return 2 * hit / (n_c + n_t)


def object_f1(claims: Claims, scene: Scene) -> float:
    """F1 of the named objects' (size, colour, shape) against the scene's, as multisets (places ignored)."""
    return _f1(Counter(c.kind for c in claims.objects), Counter(o.kind for o in scene.objects))


def attribute_f1(claims: Claims, scene: Scene) -> float:
    """F1 of the attribute words alone (the bag of words: which sizes, colours and shapes occur, unbound)."""

    def bag(kinds) -> Counter:
        return Counter((a, v) for k in kinds for a, v in zip(OBJECT_ATTRIBUTES, k) if v is not None)

    return _f1(bag(c.kind for c in claims.objects), bag(o.kind for o in scene.objects))


def binding_accuracy(claims: Claims, scene: Scene) -> float | None:
    """Of the attribute pairs the caption binds to one object (colour-shape, size-shape, size-colour), the fraction
    that one object of the scene carries together (each scene object's pair used once). A binding swap ("red circle
    and blue square" for a blue circle and a red square) keeps :func:`attribute_f1` at 1 and fails here."""
    pairs = ((1, 2), (0, 2), (0, 1))
    claimed = Counter((p, c.kind[p[0]], c.kind[p[1]]) for c in claims.objects for p in pairs)
    if not claimed:
        return None
    true = Counter((p, o.kind[p[0]], o.kind[p[1]]) for o in scene.objects for p in pairs)
    return sum((claimed & true).values()) / sum(claimed.values())


def _cells_of(kind, scene: Scene) -> list[str]:
    return [o.cell for o in scene.objects if o.kind == kind]


def relation_accuracy(claims: Claims, scene: Scene) -> float | None:
    """Of the spatial claims (each relation, each named cell), the fraction that hold: some two distinct objects of
    the scene with the named attributes stand in that relation / some object with them is in that cell."""
    checks = []
    for c in claims.objects:
        if c.cell is not None:
            checks.append(c.cell in _cells_of(c.kind, scene))
    for i, rel, j in claims.relations:
        a_cells, b_cells = _cells_of(claims.objects[i].kind, scene), _cells_of(claims.objects[j].kind, scene)
        checks.append(any(a != b and relation(a, b) == rel for a in a_cells for b in b_cells))
    return float(np.mean(checks)) if checks else None


def count_accuracy(claims: Claims, scene: Scene) -> float | None:
    """Of the distinct objects the caption names, the fraction whose number it gets right (one named once, two
    named "two ..." or twice); the total object count is not scored separately."""
    claimed = Counter(c.kind for c in claims.objects)
    if not claimed:
        return None
    true = Counter(o.kind for o in scene.objects)
    return float(np.mean([true[k] == n for k, n in claimed.items()]))


def exact_match(claims: Claims, scene: Scene) -> bool:
    """True when every claim holds and nothing is left out: the background, and a one-to-one matching of named to
    true objects with equal attributes under which every named cell and every relation holds."""
    if claims.background != scene.background or len(claims.objects) != len(scene.objects):
        return False
    for perm in itertools.permutations(range(len(scene.objects))):
        objs = [scene.objects[p] for p in perm]
        if all(c.kind == o.kind and c.cell in (None, o.cell) for c, o in zip(claims.objects, objs)) and all(
            relation(objs[i].cell, objs[j].cell) == rel for i, rel, j in claims.relations
        ):
            return True
    return False


SCORES = {
    "exact": exact_match,
    "object_f1": object_f1,
    "attribute_f1": attribute_f1,
    "binding": binding_accuracy,
    "relation": relation_accuracy,
    "count": count_accuracy,
}


def score_claims(claims: Claims, scene: Scene) -> dict[str, float | None]:
    """Every score of one caption's claims against one scene."""
    return {k: (float(v) if (v := f(claims, scene)) is not None else None) for k, f in SCORES.items()}
