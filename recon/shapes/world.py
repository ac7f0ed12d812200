"""The shapes world: procedurally rendered 32x32 scenes with exact ground truth.

A scene is a background plus objects (one today; the structure allows more later). Every object has five
attributes -- shape, colour, size, position -- and the scene a background, so a scene's *combination* is the tuple
``(shape, color, size, position, background)``: 4 x 5 x 2 x 5 x 3 = 600 combinations. A fixed 10% of them
(:data:`HELDOUT_COMBOS`) never appear in the ``train`` or ``test`` splits; the ``heldout`` split draws only from
them, so generalisation to unseen combinations is measured separately.

Everything is a pure function of a seed: ``sample_scenes(n, seed, split)`` draws combinations, jitter and caption
templates, and ``render(scene)`` draws the scene at 4x and box-downsamples it (anti-aliased edges).
:func:`parse_caption` inverts the captions, so any caption (ours or a model's) can be scored attribute by attribute.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
SUPERSAMPLE = 4

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 190),
}
SIZES = {"small": 0.24, "large": 0.42}  # object extent as a fraction of the image side
POSITIONS = {
    "center": (0.5, 0.5),
    "top left": (0.27, 0.27),
    "top right": (0.73, 0.27),
    "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73),
}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}
ATTRIBUTES = ("shape", "color", "size", "position", "background")
VALUES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": tuple(COLORS),
    "size": tuple(SIZES),
    "position": tuple(POSITIONS),
    "background": tuple(BACKGROUNDS),
}

TEMPLATES = (
    "a {size} {color} {shape} at the {position} on a {background} background",
    "a {background} background with a {size} {color} {shape} at the {position}",
    "a {size} {color} {shape} in the {position} of a {background} picture",
    "there is a {size} {color} {shape} in the {position}, {background} background",
)

ALL_COMBOS: tuple[tuple[str, ...], ...] = tuple(itertools.product(*(VALUES[a] for a in ATTRIBUTES)))
HELDOUT_FRACTION = 0.1
_HELDOUT_SEED = 20240601
HELDOUT_COMBOS: frozenset[tuple[str, ...]] = frozenset(
    ALL_COMBOS[i]
    for i in np.random.default_rng(_HELDOUT_SEED).permutation(len(ALL_COMBOS))[
        : round(HELDOUT_FRACTION * len(ALL_COMBOS))
    ]
)
SEEN_COMBOS: tuple[tuple[str, ...], ...] = tuple(c for c in ALL_COMBOS if c not in HELDOUT_COMBOS)
SPLITS = {"train": 0, "test": 1, "heldout": 2}  # mixed into the seed: splits never share a random stream
# The held-out combinations in two fixed halves (semi-supervised experiments supply unpaired data of one half and
# measure the other); "heldout_a" / "heldout_b" draw from one half, under the held-out split's random stream.
_SORTED_HELDOUT = sorted(HELDOUT_COMBOS)
_HALVES = np.random.default_rng(_HELDOUT_SEED + 1).permutation(len(_SORTED_HELDOUT))
HELDOUT_A: tuple[tuple[str, ...], ...] = tuple(
    _SORTED_HELDOUT[i] for i in sorted(_HALVES[: len(_HALVES) // 2])
)
HELDOUT_B: tuple[tuple[str, ...], ...] = tuple(
    _SORTED_HELDOUT[i] for i in sorted(_HALVES[len(_HALVES) // 2 :])
)


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    color: str
    size: str
    position: str
    dx: float = 0.0  # jitter in pixels of the 32 px image
    dy: float = 0.0
    scale: float = 1.0
    tint: tuple[int, int, int] = (0, 0, 0)  # per-channel colour jitter


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[ShapeObject, ...]
    template: int = 0

    @property
    def attributes(self) -> dict[str, str]:
        """Attributes of the (first) object plus the background."""
        o = self.objects[0]
        return {
            "shape": o.shape,
            "color": o.color,
            "size": o.size,
            "position": o.position,
            "background": self.background,
        }

    @property
    def combo(self) -> tuple[str, ...]:
        a = self.attributes
        return tuple(a[k] for k in ATTRIBUTES)

    @property
    def caption(self) -> str:
        return caption_for(self.attributes, self.template)

    def with_attribute(self, name: str, value: str) -> Scene:
        """The same scene (jitter, template) with one attribute changed."""
        if name == "background":
            return replace(self, background=value)
        return replace(self, objects=(replace(self.objects[0], **{name: value}),) + self.objects[1:])


def caption_for(attributes: dict[str, str], template: int = 0) -> str:
    return TEMPLATES[template].format(**attributes)


# ----------------------------------------------------------------------------------------------- sampling
def _rng(seed: int, split: str, *stream: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {sorted(SPLITS)}")
    return np.random.default_rng([int(seed), SPLITS[split], *stream])


def sample_scenes(n: int, seed: int, split: str = "train", stream: int = 0) -> list[Scene]:
    """``n`` scenes drawn deterministically from ``(seed, split, stream)``.

    ``train`` and ``test`` use the seen combinations, ``heldout`` only the held-out ones, ``heldout_a`` /
    ``heldout_b`` one half of them (``heldout``'s random stream). Training uses ``stream = step`` so every batch is
    fresh yet reproducible (and resume needs no data state).
    """
    halves = {"heldout_a": HELDOUT_A, "heldout_b": HELDOUT_B}
    rng = _rng(seed, "heldout" if split in halves else split, stream)
    combos = halves.get(split) or (_SORTED_HELDOUT if split == "heldout" else SEEN_COMBOS)
    idx = rng.integers(0, len(combos), n)
    jit = rng.uniform(-1, 1, (n, 3))
    tint = rng.integers(-12, 13, (n, 3))
    tmpl = rng.integers(0, len(TEMPLATES), n)
    scenes = []
    for i in range(n):
        shape, color, size, position, background = combos[idx[i]]
        obj = ShapeObject(
            shape,
            color,
            size,
            position,
            dx=1.5 * float(jit[i, 0]),
            dy=1.5 * float(jit[i, 1]),
            scale=1.0 + 0.08 * float(jit[i, 2]),
            tint=tuple(int(t) for t in tint[i]),
        )
        scenes.append(Scene(background, (obj,), int(tmpl[i])))
    return scenes


def corrupt(scene: Scene, rng: np.random.Generator) -> tuple[Scene, str]:
    """The scene with one uniformly chosen attribute set to a different value; returns (scene, attribute)."""
    name = ATTRIBUTES[int(rng.integers(len(ATTRIBUTES)))]
    current = scene.attributes[name]
    choices = [v for v in VALUES[name] if v != current]
    return scene.with_attribute(name, choices[int(rng.integers(len(choices)))]), name


# ----------------------------------------------------------------------------------------------- rendering
def draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple[int, int, int]
) -> None:
    """One shape of half-extent ``r`` centred at ``(cx, cy)`` (pixels of the supersampled canvas)."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.86  # equal area-ish with the circle, so size is not confounded with shape
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r * 1.05, cy + r * 0.8), (cx - r * 1.05, cy + r * 0.8)], fill=fill)
    elif shape == "cross":
        w = r * 0.38
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def jittered_fill(color: str, tint: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + t, 0, 255)) for c, t in zip(COLORS[color], tint))


def _draw_object(draw: ImageDraw.ImageDraw, obj: ShapeObject, side: int) -> None:
    cx, cy = POSITIONS[obj.position]
    px = side / IMAGE_SIZE
    cx, cy = cx * side + obj.dx * px, cy * side + obj.dy * px
    r = SIZES[obj.size] * obj.scale * side / 2
    draw_shape(draw, obj.shape, cx, cy, r, jittered_fill(obj.color, obj.tint))


def render(scene: Scene) -> np.ndarray:
    """The scene as a ``(32, 32, 3)`` uint8 RGB array (drawn at 4x, box-filtered down)."""
    side = IMAGE_SIZE * SUPERSAMPLE
    img = Image.new("RGB", (side, side), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        _draw_object(draw, obj, side)
    return np.asarray(img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX))


def render_batch(scenes: list[Scene]) -> np.ndarray:
    """``(n, 32, 32, 3)`` uint8."""
    return (
        np.stack([render(s) for s in scenes])
        if scenes
        else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    )


def render_pil(scene: Scene) -> Image.Image:
    return Image.fromarray(render(scene))


# ----------------------------------------------------------------------------------------------- parsing
_WORD = re.compile(r"[a-z]+")
_POSITION_WORDS = {p: tuple(p.split()) for p in POSITIONS}


def parse_caption(text: str) -> dict[str, str | None]:
    """Attributes named in a caption; ``None`` where an attribute is missing or ambiguous (two different values).

    Works on any template (and on model output with odd spacing or punctuation): it looks for the vocabulary of
    each attribute, not for a sentence pattern.
    """
    words = _WORD.findall(text.lower())
    found: dict[str, set[str]] = {a: set() for a in ATTRIBUTES}
    for a in ("shape", "color", "size", "background"):
        found[a] = {w for w in words if w in VALUES[a]}
    bigrams = set(zip(words, words[1:]))
    for p, ws in _POSITION_WORDS.items():
        if (len(ws) == 1 and ws[0] in words) or (len(ws) == 2 and ws in bigrams):
            found["position"].add(p)
    return {a: next(iter(v)) if len(v) == 1 else None for a, v in found.items()}


def is_parseable(parsed: dict[str, str | None]) -> bool:
    return all(v is not None for v in parsed.values())


def caption_vocabulary() -> list[str]:
    """Every caption the world can produce (all combinations x templates): the token set a captioner needs."""
    return [caption_for(dict(zip(ATTRIBUTES, c)), t) for c in ALL_COMBOS for t in range(len(TEMPLATES))]
