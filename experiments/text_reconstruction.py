"""Text reconstruction: text -> K images -> a caption each; how close does the caption come back to the text?

Per text metric -- CLIP-text and SBERT cosine, and BLEU / METEOR / ROUGE-L / CIDEr with the text as the only
reference (pycocoevalcap) -- the distribution over (text, image) pairs: mean with a 95% bootstrap CI over texts
(each text's K captions averaged first), std, quantiles, and a histogram (plots/*.png). On shapes also the exact
and per-attribute accuracy of the recovered caption against the text's scene.

    python experiments/text_reconstruction.py --preset shapes --n 50 --out runs/text-reconstruction
    python experiments/text_reconstruction.py --preset blip-large-sd15 --texts captions.txt --n 200 --k 2 --out runs/t2i2t
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recon.scoring.experiment_data import experiment_parser, run_script  # noqa: E402

QUANTILES = (5, 25, 50, 75, 95)


def parse_args(argv=None) -> argparse.Namespace:
    p = experiment_parser(__doc__, "texts")
    p.add_argument(
        "--texts", default=None, help="texts (.txt lines, .json, .jsonl; default on shapes: scene captions)"
    )
    p.add_argument("--k", type=int, default=1, help="images generated (and captioned) per text")
    p.add_argument(
        "--ref-metrics", default="bleu,meteor,rouge,cider", help="pycocoevalcap metrics ('' for none)"
    )
    args = p.parse_args(argv)
    if args.out is None:
        p.error("--out DIR is required")
    return args


def histogram(path: Path, metric: str, values: list[float]) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.0, 2.6), dpi=80)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.hist(values, bins=max(5, min(30, len(values) // 2)), color="#4a78b5")
    ax.set_xlabel(metric, fontsize=8)
    ax.set_ylabel("(text, image) pairs", fontsize=8)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", metadata={"Software": None})
    return path


def main(argv=None) -> int:
    import numpy as np

    from recon import stats
    from recon.jobs import make_cache, reconstruct_texts
    from recon.pipeline import Reconstructor
    from recon.run_args import config_from_args
    from recon.scoring import caption_metrics as cm
    from recon.scoring.experiment_data import (
        attribute_scores,
        experiment_inputs,
        text_metric_configs,
        write_outputs,
    )

    args = parse_args(argv)
    config = config_from_args(args, [f"generator.images_per_caption={args.k}"])
    config.similarity.text = text_metric_configs(config)
    out = Path(args.out)
    data = experiment_inputs(config, out, args.n, args.stream, texts=args.texts, need="texts")
    truth = data.truth
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
    ok = [r for r in run.records() if r.get("status") == "ok"]
    # per metric: {text id: [value per image]}
    values: dict[str, dict[str, list[float]]] = {}
    for r in ok:
        for m, vs in r["scores_per_image"].items():
            values.setdefault(m, {})[r["id"]] = list(vs)
        if truth:
            scores = [attribute_scores(c, truth[str(r["id"])]) for c in r["captions"]]
            values.setdefault("exact_attribute_acc", {})[r["id"]] = [s["exact"] for s in scores]
            values.setdefault("attribute_acc", {})[r["id"]] = [s["attributes"] for s in scores]
    ref_metrics = [m for m in args.ref_metrics.split(",") if m.strip()]
    if ok and ref_metrics:
        pairs = {(r["id"], k): c for r in ok for k, c in enumerate(r["captions"])}
        text_of = {r["id"]: r["text"] for r in ok}
        refs = {(i, k): [text_of[i]] for i, k in pairs}
        scored = cm.reference_metrics({"captions": pairs}, refs, ref_metrics)["captions"]
        for (r_id, _), s in sorted(scored.per_item.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
            for m, v in s.items():
                values.setdefault(m, {}).setdefault(r_id, []).append(v)
    rows, summary = [], {}
    for j, (m, per_text) in enumerate(values.items()):
        flat = [v for vs in per_text.values() for v in vs]
        est = stats.bootstrap_mean(
            [np.mean(vs) for vs in per_text.values()], args.resamples, seed=[config.run.seed, j]
        )
        q = np.percentile(flat, QUANTILES).tolist() if flat else [float("nan")] * len(QUANTILES)
        plot = histogram(out / "plots" / f"{m}.png", m, flat) if flat else None
        summary[m] = {
            **est.to_dict(),
            "std": float(np.std(flat, ddof=1)) if len(flat) > 1 else None,
            "quantiles": dict(zip(map(str, QUANTILES), q)),
            "pairs": len(flat),
        }
        ci = f"[{est.low:.3f}, {est.high:.3f}]" if est.low == est.low else ""
        link = f"![{m}](plots/{m}.png)" if plot else ""
        rows.append(
            f"| {m} | {est.value:.3f} {ci} | {summary[m]['std'] if summary[m]['std'] is not None else float('nan'):.3f} | "
            + " | ".join(f"{v:.3f}" for v in q)
            + f" | {len(flat)} | {link} |"
        )
    md = (
        f"# Text reconstruction (text -> image -> text)\n\npreset `{config.name}`, {len(ok)} texts, K = {args.k} "
        f"image(s) per text, captioned by `{config.captioner.model}`.\n\n"
        "| metric | mean [95% CI over texts] | std | "
        + " | ".join(f"q{q}" for q in QUANTILES)
        + " | pairs | histogram |\n|---|---|---|"
        + "---|" * len(QUANTILES)
        + "---|---|\n"
        + "\n".join(rows)
        + "\n"
    )
    write_outputs(out, md, {"metrics": summary, "n": len(ok), "args": vars(args)})
    return 0


if __name__ == "__main__":
    run_script(main, "text_reconstruction")
