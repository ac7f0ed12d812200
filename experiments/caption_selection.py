"""Caption selection by reconstruction (the paper's central finding) against the usual baselines.

Per image, N candidates (candidate 0: beam search; 1..N-1: nucleus samples at --temperature / --top-p) are each
rendered K times from the same K seeds (common random numbers); the candidate whose reconstructions are most similar
to the image (the preset's ``select_by`` metric) is chosen. Baselines on the same candidates: the first beam, a
random candidate, the highest captioner log-likelihood, the highest CLIPScore (and on shapes the oracle). The table
gives reference metrics per rule with 95% bootstrap CIs and paired tests against reconstruction; on shapes also the
exact-attribute accuracy of the chosen caption (the world's caption parser vs. the scene's ground truth).

    python experiments/caption_selection.py --preset shapes --n 50 --out runs/caption-selection
    python experiments/caption_selection.py --preset blip-large-sd15 --images val2014/ --refs captions_val2014.json \
        --n 500 --candidates 5 --k 4 --out runs/caption-selection-coco

On shapes (and on the compositional scenes world, ``--preset scenes``: exact scene match of the chosen caption) the
scenes come from stream 11 of the test split (--stream 10 is the dev stream for choosing settings such as the
temperature) and the captioner defaults to the bundle's weak one (builtin:shapes/captioner_weak,
builtin:scenes/captioner_weak), whose samples differ enough for selection to matter.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recon.scoring.experiment_data import experiment_parser, run_script  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = experiment_parser(__doc__, "images")
    p.add_argument("--images", default=None, help="image folder (default on shapes: rendered scenes)")
    p.add_argument("--refs", default=None, help="references {image_id: [refs]} or COCO annotations")
    p.add_argument("--candidates", type=int, default=8, help="N: 1 beam caption + N-1 nucleus samples")
    p.add_argument(
        "--temperature",
        type=float,
        default=0.3,
        help="sampling temperature of the nucleus samples (0.3: chosen on the shapes dev stream)",
    )
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass of the samples")
    p.add_argument(
        "--k", type=int, default=None, help="reconstructions per candidate (generator.images_per_caption)"
    )
    p.add_argument(
        "--captioner",
        default=None,
        help="captioner.model (shapes / scenes default: the bundle's "
        "weak captioner, builtin:WORLD/captioner_weak)",
    )
    p.add_argument(
        "--ref-metrics", default="bleu,meteor,rouge,cider", help="pycocoevalcap metrics ('' for none)"
    )
    args = p.parse_args(argv)
    if args.out is None:
        p.error("--out DIR is required")
    if args.candidates < 2:
        p.error("--candidates must be at least 2 (one beam caption and one sample)")
    return args


def main(argv=None) -> int:
    from recon import hub
    from recon.jobs import make_cache, reconstruct_images
    from recon.run_args import config_from_args
    from recon.scoring import caption_metrics as cm
    from recon.scoring.experiment_data import experiment_inputs, world_of, write_outputs
    from recon.scoring.scorers import shared_clip_metric
    from recon.scoring.selection import CandidateReconstructor, candidate_config, select_captions
    from recon.scoring.tables import compare_rules, rules_markdown

    args = parse_args(argv)
    config = config_from_args(args, [f"generator.images_per_caption={args.k}"] if args.k else [])
    if args.captioner:
        config.captioner.model = args.captioner
    elif (world := world_of(config)) and (hub.builtin_path(f"builtin:{world}") / "captioner_weak").is_dir():
        config.captioner.model = f"builtin:{world}/captioner_weak"
    out = Path(args.out)
    data = experiment_inputs(config, out, args.n, args.stream, images=args.images, refs=args.refs)
    cfg = candidate_config(config, args.candidates, args.temperature, args.top_p)
    recon = CandidateReconstructor(cfg, cache=make_cache(cfg))
    run = reconstruct_images(
        cfg,
        data.images,
        out,
        limit=args.n,
        retry_failed=args.retry_failed,
        progress=not args.no_progress,
        reconstructor=recon,
    )
    records = run.records()
    clip = cm.ClipScore.from_config(cfg, recon.device, shared_clip_metric(recon))
    ref_metrics = [m for m in args.ref_metrics.split(",") if m.strip()]
    values, details = select_captions(
        out, records, recon, clip, data.refs, data.truth, ref_metrics, cfg.run.seed
    )
    table = compare_rules(values, "reconstruction", seed=cfg.run.seed, n_resamples=args.resamples)
    distinct = sum(d["distinct"] for d in details) / max(1, len(details))
    select = details[0]["select_by"] if details else "-"
    header = (
        f"# Caption selection by reconstruction\n\npreset `{cfg.name}`, captioner `{cfg.captioner.model}`, "
        f"{len(details)} images ({sum(r.get('status') != 'ok' for r in records)} failed), N = {args.candidates} "
        f"candidates (1 beam + {args.candidates - 1} samples at temperature {args.temperature}, top-p "
        f"{args.top_p}; {distinct:.2f} distinct per image on average), K = "
        f"{cfg.generator.images_per_caption} reconstructions each, selected by `{select}`"
        f"{f', scenes of stream {args.stream}' if data.truth else ''}.\n\n"
    )
    shown = [
        "exact_attribute_acc",
        "attribute_acc",
        "bleu_4",
        "meteor",
        "rouge_l",
        "cider",
        "clipscore",
        *[m for m in table["metrics"] if m.startswith("recon_")],
        "log_likelihood",
    ]
    md = header + rules_markdown(
        table,
        "Chosen caption per rule",
        "Mean over images [95% bootstrap CI]; every metric is in summary.json.",
        shown,
    )
    write_outputs(
        out,
        md,
        {
            "table": table,
            "distinct_candidates": distinct,
            "n": len(details),
            "args": vars(args),
            "captioner": cfg.captioner.model,
        },
        details,
    )
    return 0


if __name__ == "__main__":
    run_script(main, "caption_selection")
