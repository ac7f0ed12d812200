"""Image selection by reconstruction: text -> K images -> a caption each -> keep the image whose caption is closest
to the text (SBERT or CLIP-text cosine), against a random one of the K images.

The table gives, per rule, the CLIPScore of the kept image to the text and, on shapes, the accuracy of the bundle's
judge (an attribute classifier trained on renders) on the kept image: exact (all five attributes right) and per
attribute; the oracle keeps a judged-right image when there is one. 95% bootstrap CIs; paired tests of the SBERT rule against the others.

    python experiments/image_selection.py --preset shapes --n 50 --k 4 --out runs/image-selection
    python experiments/image_selection.py --preset blip-large-sd15 --texts prompts.txt --n 200 --k 4 --out runs/imsel
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recon.scoring.experiment_data import experiment_parser, run_script  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = experiment_parser(__doc__, "texts")
    p.add_argument(
        "--texts", default=None, help="texts (.txt lines, .json, .jsonl; default on shapes: scene captions)"
    )
    p.add_argument("--k", type=int, default=4, help="images generated per text")
    args = p.parse_args(argv)
    if args.out is None:
        p.error("--out DIR is required")
    if args.k < 2:
        p.error("--k must be at least 2 to have something to select")
    return args


def main(argv=None) -> int:
    from recon import hub
    from recon.jobs import make_cache, reconstruct_texts
    from recon.pipeline import Reconstructor
    from recon.run_args import config_from_args
    from recon.scoring import caption_metrics as cm
    from recon.scoring.experiment_data import experiment_inputs, is_shapes, text_metric_configs, write_outputs
    from recon.scoring.scorers import shared_clip_metric
    from recon.scoring.selection import select_images
    from recon.scoring.tables import compare_rules, rules_markdown

    args = parse_args(argv)
    config = config_from_args(args, [f"generator.images_per_caption={args.k}"])
    config.similarity.text = text_metric_configs(config)[::-1]  # SBERT first: it is the reference rule
    out = Path(args.out)
    data = experiment_inputs(config, out, args.n, args.stream, texts=args.texts, need="texts")
    judge = None
    if data.truth is not None and is_shapes(config) and (hub.SHAPES_BUNDLE / "judge").is_dir():  # its judge
        from recon.shapes.models import load_judge

        judge = load_judge(hub.SHAPES_BUNDLE / "judge")
    recon = Reconstructor(config, cache=make_cache(config))
    run = reconstruct_texts(
        config,
        data.texts,
        out,
        limit=args.n,
        retry_failed=args.retry_failed,
        progress=not args.no_progress,
        reconstructor=recon,
    )
    records = run.records()
    clip = cm.ClipScore.from_config(config, recon.device, shared_clip_metric(recon))
    values, details = select_images(out, records, clip, config.run.seed, judge, data.truth)
    reference = next((r for r in values if r.startswith("by_")), "random")
    table = compare_rules(values, reference, seed=config.run.seed, n_resamples=args.resamples)
    header = (
        f"# Image selection by reconstruction\n\npreset `{config.name}`, {len(details)} texts "
        f"({sum(r.get('status') != 'ok' for r in records)} failed), K = {args.k} images per text, each "
        f"captioned by `{config.captioner.model}`; `by_X` keeps the image whose caption is closest to the text "
        f"by X{'; judge: the shapes bundle judge (attribute classifier)' if judge else ''}.\n\n"
    )
    md = header + rules_markdown(table, "Kept image per rule", "Mean over texts [95% bootstrap CI].")
    write_outputs(out, md, {"table": table, "n": len(details), "args": vars(args)}, details)
    return 0


if __name__ == "__main__":
    run_script(main, "image_selection")
