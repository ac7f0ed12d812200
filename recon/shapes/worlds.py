"""The two procedural worlds behind one interface, for code that trains or measures in either: ``WORLDS["shapes"]``
(one object, five attributes: :mod:`recon.shapes.world`) and ``WORLDS["scenes"]`` (1-4 objects on a 2x2 grid:
:mod:`recon.shapes.scenes`). A :class:`World` draws scenes from ``(n, seed, split, stream)`` as its bundle was trained
on them, renders them, scores a caption against its scene and reads a generated image with the bundle's judge.

Every score is per item and a number (a fraction, higher is better), so callers can pair items across runs:

* shapes: ``caption_tuple_acc`` (all five attributes parsed back exactly), ``caption_attr_acc`` (the fraction of
  attributes right), ``caption_unparseable``; judge: ``judge_tuple_acc``, ``judge_attr_acc``.
* scenes: ``caption_exact`` (:func:`recon.shapes.scenes.exact_match`: the background, every object, every named
  cell and relation), ``caption_object_f1`` (objects as (size, colour, shape) multisets, places ignored),
  ``caption_binding`` (:func:`recon.shapes.scenes.binding_accuracy`; 0 for a caption that names no object);
  judge: ``judge_exact`` (the image, read cell by cell, satisfies the caption).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recon.shapes import scenes, world

# The scenes bundle's captioner and generator learned from these (recon/shapes/scenes_bundle/MODEL_CARD.md):
# 1-4 objects, the cell-first `detailed` caption twice as often as the `count` one.
SCENES_OBJECTS = (1, 2, 3, 4)
SCENES_HELDOUT_OBJECTS = (2, 3, 4)  # a held-out scene holds a pair of objects never seen together
SCENES_TEMPLATES = ("detailed", "detailed", "count")


@dataclass(frozen=True)
class World:
    name: str
    image_size: int
    sample: Callable[[int, int, str, int], list]  # (n, seed, split, stream) -> scenes
    render_batch: Callable[[list], np.ndarray]  # scenes -> (n, S, S, 3) uint8
    caption_scores: Callable[[str, object], dict[str, float]]  # (caption, scene) -> scores of one item
    judge_scores: Callable[[object, object], dict[str, float]]  # (judge's reading, scene) -> scores
    judge_loader: Callable[[Path], object]  # the bundle judge folder -> the judge (CPU)
    # the score keys an experiment reports (the first caption metric is its headline)
    caption_metrics: tuple[str, ...]
    judge_metrics: tuple[str, ...]

    def load_judge(self, path: str | Path):
        """The bundle's judge (``predict(images [n, 3, S, S] in [0, 1])`` -> one reading per image), on the CPU."""
        return self.judge_loader(Path(path))

    def score_captions(self, captions: list[str], truth: list) -> dict[str, float]:
        """Mean of each caption score over the items."""
        return _means([self.caption_scores(c, s) for c, s in zip(captions, truth)])

    def score_judged(self, readings: list, truth: list) -> dict[str, float]:
        """Mean of each judge score over the items."""
        return _means([self.judge_scores(r, s) for r, s in zip(readings, truth)])


def _means(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} if rows else {}


# ----------------------------------------------------------------------------------------------- shapes
def _shapes_caption(caption: str, scene: world.Scene) -> dict[str, float]:
    parsed, truth = world.parse_caption(caption), scene.attributes
    return {
        "caption_tuple_acc": float(parsed == truth),
        "caption_attr_acc": float(np.mean([parsed[a] == truth[a] for a in world.ATTRIBUTES])),
        "caption_unparseable": float(not world.is_parseable(parsed)),
    }


def _shapes_judged(reading: dict[str, str], scene: world.Scene) -> dict[str, float]:
    truth = scene.attributes
    return {
        "judge_tuple_acc": float(reading == truth),
        "judge_attr_acc": float(np.mean([reading[a] == truth[a] for a in world.ATTRIBUTES])),
    }


def _shapes_judge(path: Path):
    from recon.shapes import models

    return models.load_judge(path, "cpu")


# ----------------------------------------------------------------------------------------------- scenes
def _scenes_sample(n: int, seed: int, split: str = "train", stream: int = 0) -> list[scenes.Scene]:
    objects = SCENES_HELDOUT_OBJECTS if split == "heldout" else SCENES_OBJECTS
    return scenes.sample_scenes(n, seed, split, stream, n_objects=objects, templates=SCENES_TEMPLATES)


def _scenes_caption(caption: str, scene: scenes.Scene) -> dict[str, float]:
    claims = scenes.parse_caption(caption)
    binding = scenes.binding_accuracy(claims, scene)
    return {
        "caption_exact": float(scenes.exact_match(claims, scene)),
        "caption_object_f1": scenes.object_f1(claims, scene),
        "caption_binding": 0.0 if binding is None else binding,
    }


def _scenes_judged(reading: scenes.Scene, scene: scenes.Scene) -> dict[str, float]:
    # the reading satisfies what the scene's own caption claims (a `count` caption names no cells)
    return {"judge_exact": float(scenes.exact_match(scenes.claims_of(scene), reading))}


def _scenes_judge(path: Path):
    from recon.shapes.scenes_train import load_judge

    return load_judge(path)


WORLDS = {
    "shapes": World(
        "shapes",
        world.IMAGE_SIZE,
        world.sample_scenes,
        world.render_batch,
        _shapes_caption,
        _shapes_judged,
        _shapes_judge,
        ("caption_tuple_acc", "caption_attr_acc"),
        ("judge_tuple_acc",),
    ),
    "scenes": World(
        "scenes",
        scenes.IMAGE_SIZE,
        _scenes_sample,
        scenes.render_batch,
        _scenes_caption,
        _scenes_judged,
        _scenes_judge,
        ("caption_exact", "caption_object_f1", "caption_binding"),
        ("judge_exact",),
    ),
}
