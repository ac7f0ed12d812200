"""``recon score`` and ``recon analyze``: argparse wiring. recon/cli.py calls :func:`register`; handlers return
exit codes and raise ValueError / RuntimeError subclasses (DataError, RunError, ...) for errors a user can fix,
which the CLI prints as one line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from recon.run_args import add_run_args, config_from_args, count
from recon.runs import RESULTS, failure_note
from recon.scoring import metaeval
from recon.scoring.inputs import ALL_METRICS


def register(subparsers) -> None:
    """Add the ``score`` and ``analyze`` commands to an argparse subparsers object."""
    p = subparsers.add_parser(
        "score",
        help="score caption files (one per system) against an image folder",
        description="Score one or more caption files: reconstruction similarity, CLIPScore, "
        "and with --refs RefCLIPScore, BLEU, METEOR, ROUGE-L, CIDEr, SPICE, SBERT. "
        "Several files give a leaderboard with bootstrap CIs and paired tests.",
    )
    p.add_argument(
        "captions", nargs="+", help="COCO results json [{image_id, caption}] or {image_id: caption}"
    )
    p.add_argument(
        "--images", required=True, help="image folder; image_id is a file's path without extension"
    )
    p.add_argument("--refs", default=None, help="references: COCO caption annotations or {image_id: [refs]}")
    p.add_argument(
        "--metrics",
        default=None,
        help=f"comma-separated subset of {','.join(ALL_METRICS)} (default: all that the inputs allow; "
        "METEOR takes ~25 s to start, SPICE needs extra jars)",
    )
    p.add_argument("--names", default=None, help="comma-separated system names (default: the files' stems)")
    p.add_argument(
        "--clip-prefix",
        default="",
        help="text put before captions for CLIPScore (Hessel et al. use 'A photo depicts ')",
    )
    p.add_argument("--resamples", type=count(1), default=1000, help="bootstrap / permutation resamples")
    add_run_args(p, limit_help="score only the first N images (in the image folder's order), every system")
    p.set_defaults(handler=run_score)

    a = subparsers.add_parser(
        "analyze",
        help="correlate the reconstruction score with the other metrics of a "
        "score run (Spearman, Kendall, bootstrap CIs, scatter plots)",
    )
    a.add_argument("run_dir")
    a.add_argument(
        "--recon-metric", default=None, help="score key to correlate (default: the first recon_* key)"
    )
    a.add_argument("--resamples", type=count(1), default=1000, help="bootstrap resamples")
    a.add_argument("--seed", type=int, default=None, help="bootstrap seed (default: the run's seed)")
    a.set_defaults(handler=run_analyze)

    metaeval.register(subparsers)  # metaeval


def run_score(args: argparse.Namespace) -> int:
    from recon.scoring.run import score_caption_sets

    config = config_from_args(args)
    out = args.out or f"runs/score-{config.name}"
    names = [n for n in args.names.split(",")] if args.names else None
    run = score_caption_sets(
        config,
        args.captions,
        args.images,
        out,
        refs=args.refs,
        metrics=args.metrics,
        names=names,
        limit=args.limit,
        retry_failed=args.retry_failed,
        progress=not args.no_progress,
        clip_prefix=args.clip_prefix,
        n_resamples=args.resamples,
    )
    for note in run.notes:
        print(f"recon: {note}", file=sys.stderr)
    ok = sum(r.get("status") == "ok" for r in run.records)
    print(
        json.dumps(
            {
                "run_dir": str(run.path),
                "items": len(run.records),
                "ok": ok,
                "failed": len(run.records) - ok,
                "aggregate": {s: {m: round(v, 4) for m, v in a.items()} for s, a in run.aggregate.items()},
            }
        )
    )
    if note := failure_note(run.records, Path(run.path) / RESULTS):
        print(f"recon: {note}", file=sys.stderr)
    return 0


def run_analyze(args: argparse.Namespace) -> int:
    from recon.scoring.analyze import analyze_run

    res = analyze_run(args.run_dir, args.recon_metric, seed=args.seed, n_resamples=args.resamples)
    print(
        json.dumps(
            {
                "run_dir": args.run_dir,
                "recon_metric": res["recon_metric"],
                "spearman": {m: res["item"][m]["spearman"]["r"] for m in res["metrics"]},
                "kendall": {m: res["item"][m]["kendall"]["r"] for m in res["metrics"]},
            }
        )
    )
    return 0
