"""The ``recon`` command: caption | generate | reconstruct | reconstruct-text | report | presets | shapes."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

# Errors a user can fix: shown as one line, never as a traceback (RECON_DEBUG=1 shows it).
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, PermissionError, RuntimeError)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None, help="preset name from configs/ or a YAML path (default: shapes)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override, e.g. --set generator.guidance_scale=5 (repeatable)")
    p.add_argument("--out", default=None, help="run directory (rerunning with the same --out resumes)")
    p.add_argument("--seed", type=int, default=None, help="run seed (run.seed)")
    p.add_argument("--batch-size", type=int, default=None, help="items per batch (run.batch_size)")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (run.device)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (run.threads)")
    p.add_argument("--limit", type=int, default=None, help="process only the first N items")
    p.add_argument("--retry-failed", action="store_true", help="on resume, redo items recorded as failed")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the content-keyed cache")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recon", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, arg, help_ in [("caption", "images", "caption an image folder (or one image)"),
                             ("generate", "texts", "generate images from a texts file (.txt lines or .json)"),
                             ("reconstruct", "images", "image -> captions -> images -> similarity"),
                             ("reconstruct-text", "texts", "text -> images -> captions -> text similarity")]:
        p = sub.add_parser(name, help=help_)
        p.add_argument(arg)
        _common(p)
    p = sub.add_parser("report", help="(re)write report.html of a run directory")
    p.add_argument("run_dir")
    sub.add_parser("presets", help="list the presets in configs/")
    try:
        from recon.shapes import commands as shapes_commands
    except ImportError:  # the shapes world is optional at development time
        shapes_commands = None
    if shapes_commands is not None:
        shapes_commands.register(sub)
    return parser


def _config(args):
    from recon.config import load_config

    overrides = list(args.overrides)
    for flag, key in [("seed", "run.seed"), ("batch_size", "run.batch_size"), ("device", "run.device"),
                      ("threads", "run.threads")]:
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    if args.no_cache:
        overrides.append("run.cache_dir=''")
    return load_config(args.preset, overrides)


def _summary(run) -> None:
    records = run.records()
    ok = [r for r in records if r.get("status") == "ok"]
    summary: dict = {"run_dir": str(run.path), "items": len(records), "ok": len(ok), "failed": len(records) - len(ok)}
    metrics = sorted({m for r in ok for m in (r.get("scores") or {})})
    for m in metrics:
        vals = [r["scores"][m] for r in ok if r["scores"].get(m) is not None]
        if vals:
            summary[f"mean_{m}"] = round(sum(vals) / len(vals), 4)
    print(json.dumps(summary))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    _quiet_libraries(args.verbose)
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print("recon: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if os.environ.get("RECON_DEBUG"):
            raise
        print(f"recon: error: {e}", file=sys.stderr)
        return 2


def _dispatch(args) -> int:
    from recon import jobs

    if args.command == "presets":
        from recon.config import list_presets

        print("\n".join(list_presets()))
        return 0
    if args.command == "report":
        from recon.config import read_yaml
        from recon.report import read_records, write_report

        run_dir = Path(args.run_dir)
        if not (run_dir / "results.jsonl").is_file():
            raise FileNotFoundError(f"{run_dir}: no results.jsonl (is this a recon run directory?)")
        cfg = read_yaml(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else None
        print(write_report(run_dir, read_records(run_dir / "results.jsonl"), cfg))
        return 0
    if args.command == "shapes":
        return args.handler(args)
    config = _config(args)
    out = args.out or f"runs/{args.command}-{config.name}"
    kw = dict(limit=args.limit, retry_failed=args.retry_failed, progress=not args.no_progress)
    fn = {"caption": jobs.caption_images, "generate": jobs.generate_images,
          "reconstruct": jobs.reconstruct_images, "reconstruct-text": jobs.reconstruct_texts}[args.command]
    run = fn(config, getattr(args, "images", None) or args.texts, out, **kw)
    if run.rank == 0:
        _summary(run)
    return 0


def _quiet_libraries(verbose: bool) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if verbose:
        return
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    try:
        import diffusers
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        diffusers.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - cosmetic only
        pass


if __name__ == "__main__":
    sys.exit(main())
