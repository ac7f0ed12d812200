"""The options every run command takes (``--preset --set --out --seed --batch-size --device --threads --limit
--retry-failed --no-cache --no-progress``) and the config they make, shared by ``recon score`` and the
experiment scripts and recon.cli's caption / generate / reconstruct commands."""

from __future__ import annotations

import argparse

from recon.config import load_config

# Errors a user can fix: shown as one line, never as a traceback (RECON_DEBUG=1 shows it) by recon.cli and the
# experiment scripts alike.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, PermissionError, RuntimeError)


def count(minimum: int):
    """An argparse ``type``: an integer >= ``minimum``; anything else is argparse's one-line usage error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be >= {minimum}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def add_run_args(
    p: argparse.ArgumentParser,
    default_preset: str | None = None,
    limit_help: str = "process only the first N items",
) -> None:
    p.add_argument(
        "--preset", default=default_preset, help="preset name from configs/ or a YAML path (default: shapes)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted config override, e.g. --set generator.images_per_caption=4 (repeatable)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="run directory (default: runs/COMMAND-PRESET; rerunning with the same --out resumes)",
    )
    p.add_argument("--seed", type=int, default=None, help="run seed (run.seed)")
    p.add_argument("--batch-size", type=count(1), default=None, help="items per batch (run.batch_size)")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (run.device)")
    p.add_argument(
        "--threads",
        type=count(1),
        default=None,
        help="torch CPU threads (run.threads; default: torch's; on a busy or small CPU --threads 1 was "
        "2-3x faster)",
    )
    p.add_argument("--limit", type=count(0), default=None, help=limit_help)
    p.add_argument("--retry-failed", action="store_true", help="on resume, redo items recorded as failed")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the content-keyed cache")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace, extra: list[str] | tuple[str, ...] = ()):
    """The preset with ``extra`` overrides, then ``--set`` ones, then the flags (flags win)."""
    overrides = [*extra, *args.overrides]
    for flag, key in [
        ("seed", "run.seed"),
        ("batch_size", "run.batch_size"),
        ("device", "run.device"),
        ("threads", "run.threads"),
    ]:
        if getattr(args, flag, None) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    if getattr(args, "no_cache", False):
        overrides.append("run.cache_dir=''")
    return load_config(args.preset, overrides)
