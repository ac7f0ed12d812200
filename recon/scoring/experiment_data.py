"""Data of the experiments: shapes scenes with exact ground truth, or a user's images / texts and references.

On the shapes preset an experiment renders ``n`` scenes of the ``test`` split from ``(seed, stream)`` -- streams
:data:`DEV_STREAM` (for choosing settings such as the sampling temperature) and :data:`TEST_STREAM` (for the numbers
we report) are used by no training or evaluation code of the bundle -- and writes, under ``data/``:
``images/NNNNN.png``, ``refs.json`` (``{id: [the caption in every template]}``), ``texts.json`` (``{id: caption}``)
and ``truth.json`` (``{id: attributes}``). Ids are the image files' stems.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from recon.captions_io import read_references
from recon.config import MetricConfig
from recon.data import atomic_write_text, read_json, save_png
from recon.run_args import USER_ERRORS, add_run_args
from recon.runs import RESULTS, current_records, failure_note, latest_per_id, read_jsonl
from recon.shapes import scenes, world

DEV_STREAM = 10
TEST_STREAM = 11


def write_shapes_data(out: str | Path, n: int, seed: int = 0, stream: int = TEST_STREAM) -> Path:
    """Render ``n`` test-split scenes into ``out`` (idempotent: files are rewritten with the same bytes)."""
    out = Path(out)
    scenes = world.sample_scenes(n, seed, "test", stream)
    refs, texts, truth = {}, {}, {}
    for i, scene in enumerate(scenes):
        key = f"{i:05d}"
        save_png(world.render_pil(scene), out / "images" / f"{key}.png")
        refs[key] = [world.caption_for(scene.attributes, t) for t in range(len(world.TEMPLATES))]
        texts[key] = scene.caption
        truth[key] = scene.attributes
    for name, value in (("refs.json", refs), ("texts.json", texts), ("truth.json", truth)):
        atomic_write_text(out / name, json.dumps(value, indent=1) + "\n")
    return out


def write_scenes_data(out: str | Path, n: int, seed: int = 0, stream: int = TEST_STREAM) -> Path:
    """As :func:`write_shapes_data` for the compositional scenes world (1-4 objects): ``texts.json`` holds each
    scene's ``detailed`` caption, ``truth.json`` its background and objects (with cells)."""
    from PIL import Image

    out = Path(out)
    refs, texts, truth = {}, {}, {}
    for i, scene in enumerate(scenes.sample_scenes(n, seed, "test", stream)):
        key = f"{i:05d}"
        save_png(Image.fromarray(scenes.render(scene)), out / "images" / f"{key}.png")
        refs[key] = [scenes.caption_for(scene, t) for t in scenes.TEMPLATES]
        texts[key] = scenes.caption_for(scene, "detailed")
        truth[key] = {
            "background": scene.background,
            "objects": [
                {a: getattr(o, a) for a in ("shape", "color", "size", "cell")} for o in scene.objects
            ],
        }
    for name, value in (("refs.json", refs), ("texts.json", texts), ("truth.json", truth)):
        atomic_write_text(out / name, json.dumps(value, indent=1) + "\n")
    return out


def stem(item_id: str) -> str:
    """An image record's id (a path relative to the folder) as the key refs and truth use."""
    return Path(item_id).with_suffix("").as_posix()


def load_json(path: str | Path | None) -> dict | None:
    if path is None:
        return None

    data = read_json(path)
    return {str(k): v for k, v in data.items()} if isinstance(data, dict) else None


def attribute_scores(caption: str, truth: dict) -> dict[str, float]:
    """``exact``: 1 when the caption names all five attributes right (shapes parser), else 0;
    ``attributes``: the fraction of the five it names right. On a scenes truth (``objects``): ``exact`` is the
    exact scene match, ``attributes`` the object F1 (:mod:`recon.shapes.scenes`)."""
    if "objects" in truth:
        scene = scenes.Scene(truth["background"], tuple(scenes.SceneObject(**o) for o in truth["objects"]))
        claims = scenes.parse_caption(caption)
        return {
            "exact": float(scenes.exact_match(claims, scene)),
            "attributes": scenes.object_f1(claims, scene),
        }

    return attribute_agreement(world.parse_caption(caption), truth)


def attribute_agreement(predicted: dict[str, str], truth: dict[str, str]) -> dict[str, float]:
    """``exact`` / ``attributes`` of predicted attribute values (a parsed caption, or the judge's reading of an
    image) against the true ones."""
    right = [predicted.get(a) == v for a, v in truth.items()]
    return {"exact": float(all(right)), "attributes": sum(right) / len(right)}


def world_of(config) -> str | None:
    """``shapes`` / ``scenes`` when the preset is that world's (its name, or its captioner from that bundle)."""
    for name in ("shapes", "scenes"):
        if str(config.captioner.model).startswith(f"builtin:{name}/") or config.name == name:
            return name
    return None


def is_shapes(config) -> bool:
    return world_of(config) == "shapes"


def refs_by_stem(references) -> dict[str, list[str]]:
    """References keyed by image file stem: COCO annotations key them by image id and name the file."""
    out = dict(references.refs)
    for key, name in references.file_names.items():
        if key in references.refs:
            out.setdefault(Path(name).stem, references.refs[key])
    return out


# ------------------------------------------------------------------------------------- experiment scripts
def experiment_parser(doc: str, items: str) -> argparse.ArgumentParser:
    """The options every experiment script takes: the run options, ``--n``, ``--stream``, ``--resamples``."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    add_run_args(p, default_preset="shapes")
    p.add_argument("--n", type=int, default=50, help=items)
    p.add_argument(
        "--stream",
        type=int,
        default=TEST_STREAM,
        help=f"shapes scene stream ({DEV_STREAM}: dev, for choosing settings; {TEST_STREAM}: test)",
    )
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap / permutation resamples")
    return p


@dataclass
class Inputs:
    """What an experiment runs on: an image folder or a texts file, references and (shapes) ground truth."""

    images: Path | None = None
    texts: Path | None = None
    refs: dict[str, list[str]] | None = None
    truth: dict[str, dict[str, str]] | None = None


def experiment_inputs(
    config, out: Path, n: int, stream: int, images=None, refs=None, texts=None, need: str = "images"
) -> Inputs:
    """The user's ``images`` / ``texts`` (+ ``refs``), or on the shapes / scenes preset ``n`` rendered scenes."""
    given = images if need == "images" else texts
    if given is None:
        world = world_of(config)
        if world is None:
            raise ValueError(f"--{need} is needed outside the shapes and scenes presets")
        write = write_shapes_data if world == "shapes" else write_scenes_data
        data = write(Path(out) / "data", n, config.run.seed, stream)
        return Inputs(
            data / "images",
            data / "texts.json",
            refs_by_stem(read_references(data / "refs.json")),
            load_json(data / "truth.json"),
        )
    return Inputs(
        Path(images) if images else None,
        Path(texts) if texts else None,
        refs_by_stem(read_references(refs)) if refs else None,
    )


def text_metric_configs(config) -> list:
    """CLIP-text on the preset's CLIP (its first ``clip`` image metric) and SBERT."""
    from recon.scoring.caption_metrics import clip_metric_config

    _, clip = clip_metric_config(config)
    return [
        MetricConfig(kind="clip_text", model=clip.model, pretrained=clip.pretrained),
        MetricConfig(kind="sbert"),
    ]


def write_outputs(out: Path, table_md: str, summary: dict, details: list | None = None) -> None:
    """``table.md``, ``summary.json`` (and ``selection.json``); prints the table and where it is. A summary over
    zero items (``summary["n"]``) is an error saying why, never a table of empty cells."""
    out = Path(out)
    if not summary.get("n"):
        raise ValueError(nothing_measured(out))
    atomic_write_text(out / "table.md", table_md)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1, default=float) + "\n")
    if details is not None:
        atomic_write_text(out / "selection.json", json.dumps(details, indent=1, default=float) + "\n")
    print(table_md)
    print(json.dumps({"run_dir": str(out), "table": str(out / "table.md")}))


def nothing_measured(out: Path) -> str:
    """Why an experiment over ``out`` has no item to tabulate: how many items failed, and the first reason."""
    results = Path(out) / RESULTS
    note = failure_note(current_records(out, latest_per_id(read_jsonl(results)[0])), results)
    return f"{out}: no item was measured ({note or 'no item was recorded'}); nothing to tabulate"


def run_script(main: Callable[[], int], name: str) -> None:
    """Exit with ``main()``'s code; an error a user can fix is one line, not a traceback."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        sys.exit(130)
    except USER_ERRORS as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        sys.exit(2)
