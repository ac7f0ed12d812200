"""``recon shapes train|eval|render``: argparse wiring. recon/cli.py calls :func:`register`; handlers return exit codes.

``python -m recon.shapes.commands train ...`` runs the same commands without the rest of the CLI.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from recon.data import atomic_write_text, save_png
from recon.hub import SHAPES_BUNDLE, cache_root, configure_threads
from recon.run_args import count
from recon.shapes.card import COMPONENTS, write_model_card
from recon.shapes.world import TEMPLATES, caption_for, render_pil, sample_scenes


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``shapes`` command (subcommands ``train`` and ``eval``) to an argparse subparsers object."""

    shapes = subparsers.add_parser("shapes", help="the shapes world: train or evaluate the offline bundle")
    sub = shapes.add_subparsers(dest="shapes_command", required=True)

    tr = sub.add_parser("train", help="train bundle components on CPU (checkpointed; a rerun resumes)")
    tr.add_argument(
        "--component",
        required=True,
        choices=[*COMPONENTS, "flamingo", "all"],
        help="all: every part but weak and flamingo (flamingo needs the trained clip)",
    )
    tr.add_argument(
        "--out", type=Path, default=SHAPES_BUNDLE, help="bundle directory (default: the shipped one)"
    )
    tr.add_argument(
        "--work", type=Path, default=None, help="checkpoints (default: $RECON_CACHE/shapes-train/NAME)"
    )
    tr.add_argument("--seed", type=int, default=0)
    budget = tr.add_mutually_exclusive_group()
    budget.add_argument(
        "--steps", type=count(1), default=None, help="optimizer steps (default: the bundle's recipe)"
    )
    budget.add_argument(
        "--minutes", type=float, default=None, help="wall-clock budget; steps set after 20 steps"
    )
    tr.add_argument(
        "--threads", type=count(1), default=1, help="torch threads per process (oversubscribing is slow)"
    )
    tr.add_argument("--device", default="cpu", help="cpu (the recipe) or cuda")
    tr.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="unet/captioner: continue from this bundle's weights (fresh optimizer and schedule)",
    )
    tr.add_argument("--batch", type=count(1), default=None, help="batch size (default: the recipe's)")
    tr.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the recipe's)")
    tr.set_defaults(handler=run_train)

    ev = sub.add_parser("eval", help="measure the bundle on held-out renders and held-out combinations")
    ev.add_argument("--n", type=count(1), default=1000, help="items per split")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--bundle", type=Path, default=SHAPES_BUNDLE)
    ev.add_argument("--threads", type=count(1), default=None)
    ev.add_argument("--device", default="cpu")
    ev.add_argument(
        "--rerank",
        type=int,
        default=0,
        metavar="N",
        help="also rank the weak captioner's 8 sampled captions by reconstruction on N items",
    )
    ev.add_argument(
        "--n-generate",
        type=int,
        default=None,
        metavar="N",
        help="generation metrics on the first N items of each split only (default: all n)",
    )
    ev.add_argument(
        "--card", action="store_true", help="write MODEL_CARD.md, VERSION and eval.json into the bundle"
    )
    ev.add_argument(
        "--card-note",
        type=Path,
        default=None,
        metavar="MD",
        help="with --card: markdown appended to the card (history, known limits)",
    )
    ev.add_argument("--json", action="store_true", help="print only the json")
    ev.add_argument(
        "--captioner",
        default="blip",
        choices=["blip", "flamingo"],
        help="flamingo: few-shot learning of an unseen caption format, keyed by shot count",
    )
    ev.add_argument("--shots", default="0,1,2,4", help="with --captioner flamingo: in-context example counts")
    ev.set_defaults(handler=run_eval)

    rd = sub.add_parser("render", help="write N rendered scenes as PNGs plus their true captions (refs.json)")
    rd.add_argument("--n", type=count(1), default=16)
    rd.add_argument("--seed", type=int, default=0)
    rd.add_argument("--split", default="test", choices=["train", "test", "heldout"])
    rd.add_argument("--out", type=Path, required=True, help="folder for NNNN.png and refs.json")
    rd.set_defaults(handler=run_render)
    return shapes


def run_render(args: argparse.Namespace) -> int:
    """Images for `recon reconstruct` and `{image_id: [caption]}` references for `recon score --refs`."""
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} is a file, not a directory; pass a new or existing directory")
    refs = {}
    for i, scene in enumerate(sample_scenes(args.n, args.seed, args.split)):
        save_png(render_pil(scene), args.out / f"{i:04d}.png")
        refs[f"{i:04d}"] = [caption_for(scene.attributes, t) for t in range(len(TEMPLATES))]
    atomic_write_text(args.out / "refs.json", json.dumps(refs, indent=1))
    print(f"wrote {args.n} images and refs.json to {args.out}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    from recon.shapes.train import TrainArgs, train

    work = args.work or cache_root() / "shapes-train" / Path(args.out).resolve().name
    if (
        args.component == "flamingo"
    ):  # two stages of its own: the LM on text, then perceiver + cross-attention
        from recon.shapes.flamingo import train as train_flamingo

        train_flamingo(
            Path(args.out) / "flamingo",
            Path(work) / "flamingo",
            seed=args.seed,
            flamingo_steps=args.steps,
            threads=args.threads,
        )
        return 0
    train(
        TrainArgs(
            component=args.component,
            out=Path(args.out),
            work=Path(work),
            seed=args.seed,
            steps=args.steps,
            minutes=args.minutes,
            threads=args.threads,
            device=args.device,
            init_from=args.init_from,
            batch=args.batch,
            lr=args.lr,
        )
    )
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from recon.shapes.evaluate import BARS, evaluate

    configure_threads(args.threads)
    if args.card_note and not args.card_note.is_file():
        print(f"--card-note {args.card_note}: no such file", file=sys.stderr)
        return 2
    if args.captioner == "flamingo":
        from recon.shapes.flamingo import fewshot_eval

        shots = [int(x) for x in args.shots.split(",") if x.strip()]
        print(json.dumps(fewshot_eval(shots, args.n, args.seed, args.bundle, device=args.device), indent=2))
        return 0
    result = evaluate(
        args.n,
        args.seed,
        args.bundle,
        device=args.device,
        rerank=args.rerank,
        generate_n=args.n_generate,
        progress=not args.json,
    )
    print(json.dumps(result, indent=2))
    if args.card:
        note = args.card_note.read_text(encoding="utf-8") if args.card_note else ""
        print(f"wrote {write_model_card(args.bundle, result, note)}", file=sys.stderr)
    if not args.json:
        failed = [k for k, bar in BARS.items() if result["test"][k] < bar]
        print("bars: " + ("all met" if not failed else "below bar: " + ", ".join(failed)), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recon.shapes.commands")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["shapes", *(sys.argv[1:] if argv is None else argv)])
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
