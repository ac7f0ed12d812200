"""The shapes judgment set: captions whose wrongness is known exactly, written in the released formats of the
human-judgment sets, so ``recon metaeval`` runs on it as on Flickr8k, PASCAL-50S or FOIL.

Per scene (``sample_scenes(n, seed, "test")``) six candidate captions, all in the scene's own caption template,
with 0..5 of its five attributes set to another value (which ones, and to what, drawn from ``seed``). The
references are the true caption in the three other templates, so no candidate is a reference. The judge never errs:

* ``ExpertAnnotations.txt``: three equal expert scores on Flickr8k-Expert's 1-4 scale: 4 all five attributes
  right, 3 one wrong ("minor mistakes"), 2 two or three wrong, 1 four or five wrong. Caption ids point into
  ``Shapes.token.txt`` (``image#n \\t caption``), which also holds the references.
* ``CrowdFlowerAnnotations.txt``: five votes per caption, one per attribute: the yes fraction is the share of
  right attributes (six levels, the exact truth).
* ``pascal50s/pair_pascal.mat`` + ``consensus_pascal.mat``: four pairs per scene, one per category (named in
  ``category_names``): right vs one wrong, right vs five wrong (an unrelated caption, like PASCAL's HI), one vs
  two wrong, two vs four wrong; three unanimous votes per pair (one per reference). ``new_data`` holds the two
  captions' wrong-attribute counts.
* ``shapes_foil.json``: per scene the right caption and its foil, the one-wrong candidate (one attribute's words
  replaced, as FOIL replaces one noun), sharing an ``id``; the references are further originals of the image.

Every pair reuses the six candidates, so scoring all four files renders each caption once (the cache does the rest).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from recon.data import atomic_write_text, save_png
from recon.shapes.world import ATTRIBUTES, TEMPLATES, VALUES, Scene, caption_for, render_pil, sample_scenes

N_WRONG = tuple(range(len(ATTRIBUTES) + 1))  # 0..5 attributes wrong
EXPERT_SCORE = {0: 4, 1: 3, 2: 2, 3: 2, 4: 1, 5: 1}
PAIR_CATEGORIES = (
    ("right-vs-1wrong", 0, 1),
    ("right-vs-5wrong", 0, 5),
    ("1wrong-vs-2wrong", 1, 2),
    ("2wrong-vs-4wrong", 2, 4),
)
MANIFEST = "judgments.json"


def corrupt_attributes(scene: Scene, n_wrong: int, rng: np.random.Generator) -> tuple[Scene, list[dict]]:
    """The scene with ``n_wrong`` distinct attributes set to another value; returns it and the changes."""
    changes = []
    for name in rng.permutation(len(ATTRIBUTES))[:n_wrong]:
        name = ATTRIBUTES[int(name)]
        old = scene.attributes[name]
        choices = [v for v in VALUES[name] if v != old]
        new = choices[int(rng.integers(len(choices)))]
        scene = scene.with_attribute(name, new)
        changes.append({"attribute": name, "true": old, "wrong": new})
    return scene, changes


def build_scenes(n: int, seed: int = 0) -> list[dict]:
    """Per scene: its image name, attributes, references and candidates ``{n_wrong, caption, changes}``."""
    rng = np.random.default_rng([seed, 4242])
    out = []
    for i, scene in enumerate(sample_scenes(n, seed, "test")):
        t = scene.template
        refs = [caption_for(scene.attributes, k) for k in range(len(TEMPLATES)) if k != t]
        candidates = []
        for n_wrong in N_WRONG:
            wrong, changes = corrupt_attributes(scene, n_wrong, rng)
            candidates.append(
                {"n_wrong": n_wrong, "caption": caption_for(wrong.attributes, t), "changes": changes}
            )
        out.append(
            {
                "image": f"{i:04d}.png",
                "scene": scene,
                "attributes": scene.attributes,
                "template": t,
                "refs": refs,
                "candidates": candidates,
            }
        )
    return out


def _source_id(image: str, n_wrong: int) -> str:
    """A Flickr-style caption id for a candidate: the caption of a (never rendered) scene with those attributes."""
    return f"{Path(image).stem}-wrong{n_wrong}.png#0"


def write_judgment_set(out: str | Path, n: int, seed: int = 0) -> dict[str, Path]:
    """Write the set for ``n`` scenes under ``out``; returns the paths by format (and ``images``, ``refs``).

    A folder that already holds the set of the same ``n`` and ``seed`` is reused as it is.
    """
    out = Path(out)
    paths = {
        "images": out / "images",
        "refs": out / "Shapes.token.txt",
        "expert": out / "ExpertAnnotations.txt",
        "crowdflower": out / "CrowdFlowerAnnotations.txt",
        "pascal50s": out / "pascal50s" / "pair_pascal.mat",
        "foil": out / "shapes_foil.json",
    }
    if already_written(out, paths, n, seed):
        return paths
    scenes = build_scenes(n, seed)
    token, expert, crowd = [], [], []
    for s in scenes:
        save_png(render_pil(s["scene"]), paths["images"] / s["image"])
        token += [f"{s['image']}#{k}\t{r}" for k, r in enumerate(s["refs"])]
        for c in s["candidates"]:
            source, right = _source_id(s["image"], c["n_wrong"]), len(ATTRIBUTES) - c["n_wrong"]
            token.append(f"{source}\t{c['caption']}")
            expert.append("\t".join([s["image"], source] + [str(EXPERT_SCORE[c["n_wrong"]])] * 3))
            crowd.append(f"{s['image']}\t{source}\t{right / len(ATTRIBUTES):g}\t{right}\t{c['n_wrong']}")
    atomic_write_text(paths["refs"], "\n".join(token) + "\n")
    atomic_write_text(paths["expert"], "\n".join(expert) + "\n")
    atomic_write_text(paths["crowdflower"], "\n".join(crowd) + "\n")
    _write_pascal(paths["pascal50s"].parent, scenes, np.random.default_rng([seed, 5050]))
    _write_foil(paths["foil"], scenes)
    atomic_write_text(
        out / MANIFEST,
        json.dumps(
            {
                "n": n,
                "seed": seed,
                "split": "test",
                "scenes": [{k: v for k, v in s.items() if k != "scene"} for s in scenes],
            },
            indent=1,
        )
        + "\n",
    )
    return paths


def already_written(out: Path, paths: dict[str, Path], n: int, seed: int) -> bool:
    """Whether ``out`` holds a judgment set of ``n`` scenes from ``seed`` with all of ``paths`` (then it is reused);
    an ``out`` that is a file is an error."""
    manifest = out / MANIFEST
    if manifest.is_file():
        old = json.loads(manifest.read_text(encoding="utf-8"))
        if old.get("n") == n and old.get("seed") == seed and all(p.exists() for p in paths.values()):
            return True
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a directory; pass a new or existing directory")
    return False


def _write_pascal(folder: Path, scenes: list[dict], rng: np.random.Generator) -> None:
    pairs = []
    for s in scenes:
        by_wrong = {c["n_wrong"]: c["caption"] for c in s["candidates"]}
        pairs += [
            (s["image"], by_wrong[better], by_wrong[worse], cat, s["refs"], (better, worse))
            for cat, (_, better, worse) in enumerate(PAIR_CATEGORIES, 1)
        ]
    write_pascal(folder, pairs, [name for name, _, _ in PAIR_CATEGORIES], rng)


def write_pascal(
    folder: Path, pairs: list[tuple], category_names: list[str], rng: np.random.Generator
) -> None:
    """PASCAL-50S's two files from ``pairs`` = ``(image, better caption, worse caption, category (1-based), refs,
    (better's code, worse's code))``: the better caption is A or B at random (position tells nothing), one
    unanimous consensus triplet per reference; the codes go to ``new_data``."""
    import scipy.io

    rows, triplets, categories, kinds = [], [], [], []
    for image, better, worse, cat, refs, codes in pairs:
        a_better = bool(rng.integers(2))
        a, b = (better, worse) if a_better else (worse, better)
        rows.append((image, a, b))
        triplets += [(ref, a, b, 1.0 if a_better else -1.0) for ref in refs]
        categories.append(cat)
        kinds.append(codes if a_better else codes[::-1])
    new_input = np.empty(
        (1, len(rows)), dtype=[("image", object), ("caption_a", object), ("caption_b", object)]
    )
    for i, p in enumerate(rows):
        new_input[0, i] = p
    trip = np.empty(
        (1, len(triplets)),
        dtype=[("reference", object), ("caption_a", object), ("caption_b", object), ("winner", object)],
    )
    for i, t in enumerate(triplets):
        trip[0, i] = t
    names = np.empty((1, len(category_names)), dtype=object)
    for i, name in enumerate(category_names):
        names[0, i] = name
    folder.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(
        str(folder / "pair_pascal.mat"),
        {
            "new_input": new_input,
            "category": np.array([categories], dtype=np.float64),
            "new_data": np.array(kinds, dtype=np.float64),
            "category_names": names,
        },
    )
    scipy.io.savemat(str(folder / "consensus_pascal.mat"), {"triplets": trip})


def _write_foil(path: Path, scenes: list[dict]) -> None:
    foils = []
    for s in scenes:
        one_wrong = s["candidates"][1]
        change = one_wrong["changes"][0]
        foils.append(
            (
                s["image"],
                [*s["refs"], s["candidates"][0]["caption"]],
                one_wrong["caption"],
                change["true"],
                change["wrong"],
            )
        )
    write_foil(path, foils)


def write_foil(path: Path, foils: list[tuple[str, list[str], str, str, str]]) -> None:
    """FOIL's json from ``(image, original captions, foil caption, target word, foil word)`` per image; the foil
    shares the id of the last original."""
    images, annotations = [], []
    for i, (image, originals, foil, target, wrong) in enumerate(foils):
        images.append({"id": i, "file_name": image})
        for k, caption in enumerate(originals):
            annotations.append(
                {
                    "image_id": i,
                    "id": 10 * i + k,
                    "caption": caption,
                    "foil": False,
                    "target_word": "ORIG",
                    "foil_word": "ORIG",
                    "foil_id": len(annotations),
                }
            )
        annotations.append(
            {
                "image_id": i,
                "id": 10 * i + len(originals) - 1,
                "caption": foil,
                "foil": True,
                "target_word": target,
                "foil_word": wrong,
                "foil_id": len(annotations),
            }
        )
    atomic_write_text(path, json.dumps({"images": images, "annotations": annotations}, indent=1) + "\n")
