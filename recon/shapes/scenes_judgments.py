"""The scenes judgment set: captions of compositional scenes with exactly known errors, one category per kind of
error, in the released formats of the human-judgment sets, so ``recon metaeval --scenes N`` runs on it as on
PASCAL-50S or FOIL.

Per scene (``sample_scenes(n, seed, "test", n_objects=(2, 3, 4))``) the true caption and one altered caption per
category that the scene allows (an altered scene's caption, so every candidate is a fluent caption of the world):

* ``binding-swap``: two objects that differ in at least two of size, colour and shape exchange one of them ("a red
  circle ... a blue square" -> "a blue circle ... a red square"): the same bag of words, bound wrong;
* ``relation-swap``: two different objects exchange their cells: the same bag of words, placed wrong;
* ``count-change`` (the ``count`` template, which names numbers and no cells): one more copy of an object
  (a free cell needed) or one fewer (where the scene holds two copies);
* ``omission``: one object left out; ``hallucination``: an object added in a free cell;
* ``single-attribute``: one object's size, colour or shape set to another value (the bag of words changes).

Every category but ``count-change`` uses the ``detailed`` template ("in the top left a small red circle and in the
bottom right ..."). The references are the true scene's ``relational`` captions in two mention orders, so no
candidate is a reference. Files:

* ``pascal50s/pair_pascal.mat`` + ``consensus_pascal.mat``: per scene one pair per allowed category, true vs
  altered (``category_names`` names them); per-category pair accuracy is the headline of this set;
* ``scenes_foil.json``: per scene the true ``detailed`` caption and its single-attribute foil, as FOIL (the only
  original, so the pair is never a ``relational`` caption against a ``detailed`` one; no references);
* ``ExpertAnnotations.txt`` + ``Scenes.token.txt``: every candidate rated on the 1-4 scale by its number of wrong
  objects (4 none, 3 one, 2 two, 1 more; an object is wrong when no true object has its attributes and cell, or a
  true object goes unnamed); a binding or relation swap makes two objects wrong.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np

from recon.data import atomic_write_text, save_png
from recon.shapes import scenes as S
from recon.shapes.judgments import already_written, write_foil, write_pascal

CATEGORIES = (
    "binding-swap",
    "relation-swap",
    "count-change",
    "omission",
    "hallucination",
    "single-attribute",
)
SWAPS = ("binding-swap", "relation-swap")  # the categories that keep the bag of words
N_OBJECTS = (2, 3, 4)
MANIFEST = "judgments.json"
DETAILED, COUNT, RELATIONAL = (S.TEMPLATES.index(t) for t in ("detailed", "count", "relational"))
EXPERT_SCORE = {0: 4, 1: 3, 2: 2}  # wrong objects -> score; more than two: 1


def _with(
    scene: S.Scene, objects: list[S.SceneObject], order: list[int], template: int = DETAILED
) -> S.Scene:
    return dataclasses.replace(scene, objects=tuple(objects), order=tuple(order), template=template)


def _new_object(rng: np.random.Generator, cell: str, like: S.SceneObject | None = None) -> S.SceneObject:
    if like is not None:
        return dataclasses.replace(like, cell=cell)
    return S.SceneObject(
        shape=S.SHAPES[int(rng.integers(len(S.SHAPES)))],
        color=S.VALUES["color"][int(rng.integers(len(S.VALUES["color"])))],
        size=S.VALUES["size"][int(rng.integers(len(S.SIZES)))],
        cell=cell,
    )


def alter(scene: S.Scene, category: str, rng: np.random.Generator) -> S.Scene | None:
    """The scene with one error of ``category`` (see the module doc), captioned in the category's template; None
    when the scene does not allow it."""
    objs, order = list(scene.objects), list(scene.mention_order)
    free = [c for c in S.CELLS if c not in {o.cell for o in objs}]
    if category == "binding-swap":
        options = [
            (i, j, a)
            for i, j in itertools.combinations(range(len(objs)), 2)
            for a in S.OBJECT_ATTRIBUTES
            if sum(getattr(objs[i], b) != getattr(objs[j], b) for b in S.OBJECT_ATTRIBUTES) >= 2
            and getattr(objs[i], a) != getattr(objs[j], a)
        ]
        if not options:
            return None
        i, j, a = options[int(rng.integers(len(options)))]
        objs[i], objs[j] = (
            dataclasses.replace(objs[i], **{a: getattr(objs[j], a)}),
            dataclasses.replace(objs[j], **{a: getattr(objs[i], a)}),
        )
        return _with(scene, objs, order)
    if category == "relation-swap":
        options = [
            (i, j) for i, j in itertools.combinations(range(len(objs)), 2) if objs[i].kind != objs[j].kind
        ]
        if not options:
            return None
        i, j = options[int(rng.integers(len(options)))]
        objs[i], objs[j] = (
            dataclasses.replace(objs[i], cell=objs[j].cell),
            dataclasses.replace(objs[j], cell=objs[i].cell),
        )
        return _with(scene, objs, order)
    if category == "count-change":
        copies = [i for i, o in enumerate(objs) if sum(p.kind == o.kind for p in objs) >= 2]
        if copies:
            drop = copies[int(rng.integers(len(copies)))]
            return _with(
                scene,
                [o for k, o in enumerate(objs) if k != drop],
                [k - (k > drop) for k in order if k != drop],
                COUNT,
            )
        if not free:
            return None
        like = objs[int(rng.integers(len(objs)))]
        return _with(
            scene,
            [*objs, _new_object(rng, free[int(rng.integers(len(free)))], like)],
            [*order, len(objs)],
            COUNT,
        )
    if category == "omission":
        drop = int(rng.integers(len(objs)))
        return _with(
            scene, [o for k, o in enumerate(objs) if k != drop], [k - (k > drop) for k in order if k != drop]
        )
    if category == "hallucination":
        if not free:
            return None
        at = int(rng.integers(len(order) + 1))
        return _with(
            scene,
            [*objs, _new_object(rng, free[int(rng.integers(len(free)))])],
            order[:at] + [len(objs)] + order[at:],
        )
    if category == "single-attribute":
        i, a = int(rng.integers(len(objs))), S.OBJECT_ATTRIBUTES[int(rng.integers(len(S.OBJECT_ATTRIBUTES)))]
        others = [v for v in S.VALUES[a] if v != getattr(objs[i], a)]
        objs[i] = dataclasses.replace(objs[i], **{a: others[int(rng.integers(len(others)))]})
        return _with(scene, objs, order)
    raise ValueError(f"category {category!r}: expected one of {CATEGORIES}")


def wrong_objects(claims: S.Claims, scene: S.Scene) -> int:
    """How many objects a caption gets wrong: named objects with no true object of those attributes (and that
    cell, where it names one), or true objects left unnamed, whichever is more (multisets)."""

    def key(kind, cell):
        return (kind, cell) if all(c.cell is not None for c in claims.objects) else (kind, None)

    claimed = Counter(key(c.kind, c.cell) for c in claims.objects)
    true = Counter(key(o.kind, o.cell) for o in scene.objects)
    return max(sum((claimed - true).values()), sum((true - claimed).values()))


def build_scenes(n: int, seed: int = 0) -> list[dict]:
    """Per scene: image name, the scene, references and candidates ``{code, category, caption, wrong}``."""
    rng = np.random.default_rng([seed, 4343])
    out = []
    for i, scene in enumerate(S.sample_scenes(n, seed, "test", n_objects=N_OBJECTS)):
        orders = [scene.mention_order, tuple(reversed(scene.mention_order))]
        refs = [S.caption_for(dataclasses.replace(scene, order=o), RELATIONAL) for o in orders]
        candidates = [
            {"code": f"true-{t}", "category": None, "caption": S.caption_for(scene, t), "wrong": 0}
            for t in ("detailed", "count")
        ]
        for cat in CATEGORIES:
            altered = alter(scene, cat, rng)
            if altered is not None:
                caption = altered.caption
                candidates.append(
                    {
                        "code": cat,
                        "category": cat,
                        "caption": caption,
                        "wrong": wrong_objects(S.parse_caption(caption), scene),
                    }
                )
        out.append({"image": f"{i:04d}.png", "scene": scene, "refs": refs, "candidates": candidates})
    return out


def _source_id(image: str, code: str) -> str:
    return f"{Path(image).stem}-{code}.png#0"


def write_judgment_set(out: str | Path, n: int, seed: int = 0) -> dict[str, Path]:
    """Write the set for ``n`` scenes under ``out``; returns the paths by format (and ``images``, ``refs``).
    A folder that already holds the set of the same ``n`` and ``seed`` is reused as it is."""
    out = Path(out)
    paths = {
        "images": out / "images",
        "refs": out / "Scenes.token.txt",
        "expert": out / "ExpertAnnotations.txt",
        "pascal50s": out / "pascal50s" / "pair_pascal.mat",
        "foil": out / "scenes_foil.json",
    }
    if already_written(out, paths, n, seed):
        return paths
    from PIL import Image

    items = build_scenes(n, seed)
    token, expert, pairs, foils = [], [], [], []
    for s in items:
        save_png(Image.fromarray(S.render(s["scene"])), paths["images"] / s["image"])
        token += [f"{s['image']}#{k}\t{r}" for k, r in enumerate(s["refs"])]
        by_code = {c["code"]: c for c in s["candidates"]}
        for c in s["candidates"]:
            source = _source_id(s["image"], c["code"])
            token.append(f"{source}\t{c['caption']}")
            expert.append("\t".join([s["image"], source] + [str(EXPERT_SCORE.get(c["wrong"], 1))] * 3))
            if c["category"] is not None:
                true = by_code["true-count" if c["category"] == "count-change" else "true-detailed"]
                pairs.append(
                    (
                        s["image"],
                        true["caption"],
                        c["caption"],
                        CATEGORIES.index(c["category"]) + 1,
                        s["refs"],
                        (0, c["wrong"]),
                    )
                )
        if "single-attribute" in by_code:
            true, foil = by_code["true-detailed"]["caption"], by_code["single-attribute"]["caption"]
            target, wrong = _changed_word(true, foil)
            foils.append((s["image"], [true], foil, target, wrong))  # FOIL draws one original: this one
    atomic_write_text(paths["refs"], "\n".join(token) + "\n")
    atomic_write_text(paths["expert"], "\n".join(expert) + "\n")
    write_pascal(paths["pascal50s"].parent, pairs, list(CATEGORIES), np.random.default_rng([seed, 5151]))
    write_foil(paths["foil"], foils)
    atomic_write_text(
        out / MANIFEST,
        json.dumps(
            {
                "n": n,
                "seed": seed,
                "split": "test",
                "n_objects": N_OBJECTS,
                "scenes": [
                    {
                        "image": s["image"],
                        "background": s["scene"].background,
                        "objects": [dataclasses.asdict(o) for o in s["scene"].objects],
                        "refs": s["refs"],
                        "candidates": s["candidates"],
                    }
                    for s in items
                ],
            },
            indent=1,
        )
        + "\n",
    )
    return paths


def _changed_word(true: str, foil: str) -> tuple[str, str]:
    """The word a single-attribute foil replaced (FOIL's target and foil words)."""
    diff = [(a, b) for a, b in zip(true.split(), foil.split()) if a != b]
    return diff[0] if len(diff) == 1 else ("?", "?")
