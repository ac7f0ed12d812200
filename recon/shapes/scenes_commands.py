"""``recon scenes train|eval|render``: the compositional scenes world's bundle (argparse wiring; recon/cli.py calls
:func:`register`). The models and loops are the shapes world's (:mod:`recon.shapes.train`) fed with this world's
scenes (:mod:`recon.shapes.scenes_train`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from recon.data import atomic_write_text, save_png
from recon.hub import SCENES_BUNDLE, cache_root, configure_threads
from recon.run_args import count
from recon.shapes import scenes
from recon.shapes.card import write_scenes_card

COMPONENTS = (
    "vae",
    "unet",
    "captioner",
    "clip",
    "judge",
)  # the weak captioner is a snapshot of the captioner run


def register(subparsers) -> argparse.ArgumentParser:
    scenes = subparsers.add_parser(
        "scenes",
        help="the compositional scenes world (1-4 objects on a 2x2 grid): "
        "train or evaluate its bundle, render scenes",
    )
    sub = scenes.add_subparsers(dest="scenes_command", required=True)

    tr = sub.add_parser("train", help="train a bundle component on CPU (checkpointed; a rerun resumes)")
    tr.add_argument("--component", required=True, choices=COMPONENTS)
    tr.add_argument(
        "--out", type=Path, default=SCENES_BUNDLE, help="bundle directory (default: the shipped one)"
    )
    tr.add_argument(
        "--work", type=Path, default=None, help="checkpoints (default: $RECON_CACHE/scenes-train/NAME)"
    )
    tr.add_argument("--objects", default="1,2,3,4", help="objects per training scene, e.g. 2 or 1,2,3,4")
    tr.add_argument(
        "--templates",
        default="relational,count,detailed",
        help="caption templates of the training scenes, e.g. detailed,detailed,count (a repeated name "
        "weighs more)",
    )
    tr.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="unet/captioner: continue from this bundle's weights (fresh optimizer and schedule)",
    )
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument(
        "--steps", type=count(1), default=None, help="optimizer steps (default: the shapes recipe's)"
    )
    tr.add_argument("--batch", type=count(1), default=None, help="batch size (default: the recipe's)")
    tr.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the recipe's)")
    tr.add_argument("--threads", type=count(1), default=1, help="torch threads (oversubscribing is slow)")
    tr.set_defaults(handler=run_train)

    ev = sub.add_parser(
        "eval", help="measure the bundle on unseen scenes and unseen type pairs; check its bars"
    )
    ev.add_argument("--n", type=count(1), default=200, help="scenes per split")
    ev.add_argument("--seed", type=int, default=1)
    ev.add_argument("--bundle", type=Path, default=SCENES_BUNDLE)
    ev.add_argument("--threads", type=count(1), default=None)
    ev.add_argument("--device", default="cpu")
    ev.add_argument(
        "--n-generate",
        type=int,
        default=None,
        metavar="N",
        help="generation metrics on the first N scenes of each split only (default: all n)",
    )
    ev.add_argument("--card", action="store_true", help="write MODEL_CARD.md and eval.json into the bundle")
    ev.add_argument(
        "--card-note", type=Path, default=None, metavar="MD", help="with --card: markdown appended"
    )
    ev.set_defaults(handler=run_eval)

    rd = sub.add_parser("render", help="write N rendered scenes as PNGs plus their true captions (refs.json)")
    rd.add_argument("--n", type=count(1), default=16)
    rd.add_argument("--seed", type=int, default=0)
    rd.add_argument("--split", default="test", choices=["train", "test", "heldout"])
    rd.add_argument("--objects", default="1,2,3,4", help="objects per scene, e.g. 2 or 1,2,3,4")
    rd.add_argument("--out", type=Path, required=True, help="folder for NNNN.png and refs.json")
    rd.set_defaults(handler=run_render)
    return scenes


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected comma-separated numbers, e.g. 1,2,3,4") from None


def run_train(args: argparse.Namespace) -> int:
    from recon.shapes.scenes_train import train
    from recon.shapes.train import TrainArgs

    templates = tuple(args.templates.split(","))
    if unknown := sorted(set(templates) - set(scenes.TEMPLATES)):
        raise ValueError(f"--templates: unknown {', '.join(unknown)}; expected names from {scenes.TEMPLATES}")
    work = args.work or cache_root() / "scenes-train" / Path(args.out).resolve().name
    targs = TrainArgs(
        component=args.component,
        out=Path(args.out),
        work=Path(work),
        seed=args.seed,
        steps=args.steps,
        threads=args.threads,
        init_from=args.init_from,
        batch=args.batch,
        lr=args.lr,
        world="scenes",
    )
    train(targs, _ints(args.objects, "--objects"), templates)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from recon.shapes.scenes_eval import BARS, evaluate

    configure_threads(args.threads)
    if args.card_note and not args.card_note.is_file():
        print(f"--card-note {args.card_note}: no such file", file=sys.stderr)
        return 2
    result = evaluate(args.n, args.seed, args.bundle, args.device, args.n_generate)
    print(json.dumps(result, indent=2))
    if args.card:
        note = args.card_note.read_text(encoding="utf-8") if args.card_note else ""
        print(f"wrote {write_scenes_card(args.bundle, result, note)}", file=sys.stderr)
    failed = [k for k, bar in BARS.items() if result["test"][k] < bar]
    print("bars: " + ("all met" if not failed else "below bar: " + ", ".join(failed)), file=sys.stderr)
    return 0


def run_render(args: argparse.Namespace) -> int:
    """Images for `recon reconstruct` and `{image_id: [caption]}` references (every template) for `recon score`."""
    from PIL import Image

    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} is a file, not a directory; pass a new or existing directory")
    refs = {}
    for i, scene in enumerate(
        scenes.sample_scenes(args.n, args.seed, args.split, 1, _ints(args.objects, "--objects"))
    ):
        save_png(Image.fromarray(scenes.render(scene)), args.out / f"{i:04d}.png")
        refs[f"{i:04d}"] = [scenes.caption_for(scene, t) for t in scenes.TEMPLATES]
    atomic_write_text(args.out / "refs.json", json.dumps(refs, indent=1))
    print(f"wrote {args.n} images and refs.json to {args.out}")
    return 0
