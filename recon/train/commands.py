"""``recon finetune CONFIG --out DIR [--set key=value ...]``: argparse wiring; recon/cli.py calls :func:`register`.

``python -m recon.train.commands finetune ...`` (and ``accelerate launch -m recon.train.commands finetune ...``)
runs the same command without the rest of the CLI.
"""

from __future__ import annotations

import argparse
import sys

from recon.train.config import load_finetune_config


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``finetune`` command to an argparse subparsers object; its handler is ``args.handler(args)``."""
    p = subparsers.add_parser(
        "finetune",
        help="jointly LoRA-finetune captioner and generator with reconstruction regularisers",
        description="Joint LoRA finetuning (see configs/finetune-*.yaml). Rerunning with the same --out resumes "
        "from the newest checkpoint. Multi-GPU: accelerate launch -m recon finetune ...",
    )
    p.add_argument("config", help="finetune YAML, or a name in configs/ (e.g. finetune-shapes-smoke)")
    p.add_argument("--out", required=True, help="run directory (checkpoints, logs, exported adapters)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted config override, e.g. --set loss.i2t2i=0.5 (repeatable)",
    )
    p.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="STEPS",
        help="stop after this many optimizer steps in total (checkpointed; rerun to continue)",
    )
    p.set_defaults(handler=run_finetune)
    return p


def run_finetune(args: argparse.Namespace) -> int:
    from recon.train.joint import finetune

    if args.stop_after is not None and args.stop_after < 1:
        raise ValueError(f"--stop-after {args.stop_after}: must be >= 1 (optimizer steps)")
    cfg = load_finetune_config(args.config, args.overrides)
    summary = finetune(cfg, args.out, stop_after=args.stop_after)
    return 0 if summary["step"] > 0 or summary["finished"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="recon")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
