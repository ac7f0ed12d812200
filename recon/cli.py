"""The ``recon`` command: caption | generate | reconstruct | reconstruct-text | score | analyze | metaeval |
finetune | report | presets | shapes | scenes | env."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from recon import fingerprint, jobs
from recon.config import list_presets, read_yaml
from recon.report import write_report
from recon.run_args import USER_ERRORS, add_run_args, config_from_args
from recon.runs import RESULTS, failure_note, read_records
from recon.scoring import commands as scoring_cli
from recon.shapes import commands as shapes_commands
from recon.shapes import scenes_commands
from recon.train import commands as train_commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recon", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, arg, help_ in [
        ("caption", "images", "caption an image folder (or one image)"),
        ("generate", "texts", "generate images from a texts file (.txt lines or .json)"),
        ("reconstruct", "images", "image -> captions -> images -> similarity"),
        ("reconstruct-text", "texts", "text -> images -> captions -> text similarity"),
    ]:
        p = sub.add_parser(name, help=help_)
        p.add_argument(
            arg,
            help="an image folder (searched recursively) or one image file"
            if arg == "images"
            else "a texts file: .txt (one per line), .json (list or {id: text}) or .jsonl",
        )
        add_run_args(p)
    p = sub.add_parser("report", help="(re)write report.html of a run directory")
    p.add_argument("run_dir")
    sub.add_parser("presets", help="list the presets in configs/")
    p = sub.add_parser(
        "env", help="print the versions and devices that decide recon's numbers (for bug reports)"
    )
    p.add_argument("--json", action="store_true", help="as JSON")

    scoring_cli.register(sub)  # score, analyze
    train_commands.register(sub)  # finetune
    shapes_commands.register(sub)  # shapes train | eval | render
    scenes_commands.register(sub)  # scenes train | eval | render
    return parser


def _summary(run) -> None:
    records = run.records()
    ok = [r for r in records if r.get("status") == "ok"]
    summary: dict = {
        "run_dir": str(run.path),
        "items": len(records),
        "ok": len(ok),
        "failed": len(records) - len(ok),
    }
    metrics = sorted({m for r in ok for m in (r.get("scores") or {})})
    for m in metrics:
        vals = [r["scores"][m] for r in ok if r["scores"].get(m) is not None]
        if vals:
            summary[f"mean_{m}"] = round(sum(vals) / len(vals), 4)
            if len(vals) < len(ok):  # the mean covers part of the ok items: say how many
                summary[f"n_{m}"] = len(vals)
    print(json.dumps(summary))
    if note := failure_note(records, run.path / RESULTS):
        print(f"recon: {note}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """The entry point. Start-up imports only the standard library, yaml and argparse wiring: each command loads
    torch and the model libraries where it uses them, so ``--help``, ``presets`` and ``report`` start at once and a
    Ctrl-C at any moment (imports included) ends with one line, not a traceback."""
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(
            level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
        )
        _quiet_libraries(args.verbose)
        return _dispatch(args)
    except KeyboardInterrupt:
        print("recon: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `recon presets | head -1`: the reader left; nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except USER_ERRORS as e:
        if os.environ.get("RECON_DEBUG"):
            raise
        print(f"recon: error: {e}", file=sys.stderr)
        return 2


def _dispatch(args) -> int:
    if args.command == "presets":
        print("\n".join(list_presets()))
        return 0
    if args.command == "env":
        env = fingerprint.environment(devices=True)
        print(json.dumps(env, indent=1) if args.json else fingerprint.format_environment(env))
        return 0
    if args.command == "report":
        run_dir = Path(args.run_dir)
        if not (run_dir / "results.jsonl").is_file():
            raise FileNotFoundError(f"{run_dir}: no results.jsonl (is this a recon run directory?)")
        cfg = read_yaml(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else None
        print(write_report(run_dir, read_records(run_dir / "results.jsonl"), cfg))
        return 0
    if hasattr(args, "handler"):  # score, analyze, finetune, shapes
        return args.handler(args)

    config = config_from_args(args)
    out = args.out or f"runs/{args.command}-{config.name}"
    kw = dict(limit=args.limit, retry_failed=args.retry_failed, progress=not args.no_progress)
    fn = {
        "caption": jobs.caption_images,
        "generate": jobs.generate_images,
        "reconstruct": jobs.reconstruct_images,
        "reconstruct-text": jobs.reconstruct_texts,
    }[args.command]
    run = fn(config, getattr(args, "images", None) or args.texts, out, **kw)
    if run.rank == 0:
        _summary(run)
    return 0


def _quiet_libraries(verbose: bool) -> None:
    """Library chatter off unless ``-v``, through the environment variables the libraries read when they load:
    importing them here only to set a log level cost seconds on every command (a user's own setting wins)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if verbose:
        os.environ.setdefault("RECON_VERBOSE", "1")  # hub.quiet_loading keeps the libraries' loading bars
        return
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    for key, value in [
        ("TRANSFORMERS_VERBOSITY", "error"),
        ("DIFFUSERS_VERBOSITY", "error"),
        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
    ]:
        os.environ.setdefault(key, value)


if __name__ == "__main__":
    sys.exit(main())
