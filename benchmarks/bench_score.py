"""``recon score`` speed: seconds per caption and where they go (generation vs. metrics), K = 1.

Scores N shapes captions (the scenes' true captions, references: the caption in every template) with the metrics
recon, clipscore, refclipscore, bleu, rouge, cider, sbert (add METEOR with --meteor: its jar adds ~25 s of start-up)
into a fresh run directory with the cache off, then prints, as JSON lines:

  * total: wall seconds, seconds per caption, captions per second;
  * shares: the fraction of the wall time spent per stage (``generation``, ``recon_similarity``, ``clipscore``,
    ``sbert``, ``reference_metrics``, ``loading`` (image decoding), ``model_loading`` (CLIPScore's text tower,
    SBERT; the generator and image metrics are loaded before the clock starts), and ``other``: run-directory I/O,
    leaderboard bootstrap and report), and generation vs. all metric stages together;
  * generation overhead: ``Reconstructor.render`` vs. the bare ``StableDiffusionPipeline`` call on the same
    prompts, seeds and batches, interleaved (ratio = recon / bare).

    python benchmarks/bench_score.py                      # shapes, 1000 captions
    python benchmarks/bench_score.py --n 100 --threads 2
    python benchmarks/bench_score.py --preset tiny-random --n 50
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recon import hub  # noqa: E402
from recon.config import load_config  # noqa: E402
from recon.pipeline import Reconstructor  # noqa: E402
from recon.runs import derive_seed  # noqa: E402
from recon.scoring.experiment_data import write_shapes_data  # noqa: E402
from recon.scoring.run import score_caption_sets  # noqa: E402

METRIC_STAGES = ("recon_similarity", "clipscore", "sbert", "reference_metrics")


def bare_vs_recon(recon: Reconstructor, prompts: list[str], seeds: list[int], repeats: int) -> dict:
    """Median seconds of Reconstructor.render (cache off) and of the bare pipeline on the same batches."""
    pipe, g, bs = recon.generator.pipe, recon.config.generator, recon.config.run.batch_size

    def bare():
        for i in range(0, len(prompts), bs):
            gens = [torch.Generator("cpu").manual_seed(s) for s in seeds[i:i + bs]]
            with torch.inference_mode():
                pipe(prompt=prompts[i:i + bs], num_inference_steps=g.num_inference_steps,
                     guidance_scale=g.guidance_scale, height=g.height, width=g.width, generator=gens,
                     output_type="pt")

    times = {"recon": [], "bare": []}
    bare()  # warm-up
    for _ in range(repeats):
        for name, fn in (("bare", bare), ("recon", lambda: recon.render(prompts, seeds))):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"prompts": len(prompts), "batch_size": bs, "recon_s": round(med["recon"], 3),
            "bare_s": round(med["bare"], 3), "ratio": round(med["recon"] / med["bare"], 3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="shapes")
    p.add_argument("--n", type=int, default=1000, help="captions to score")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-across-items", action="store_true",
                   help="generate across items (faster at K = 1; images then depend on batch neighbours at 1e-6)")
    p.add_argument("--meteor", action="store_true", help="also METEOR (Java, ~25 s start-up)")
    p.add_argument("--overhead-prompts", type=int, default=32, help="prompts in the bare-vs-recon comparison")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    threads = hub.configure_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    overrides = ["generator.images_per_caption=1", "run.cache_dir=''", f"run.batch_size={args.batch_size}",
                 f"run.device={args.device}", f"run.threads={threads}", "run.save_images=false",
                 f"generator.batch_across_items={str(args.batch_across_items).lower()}"]
    config = load_config(args.preset, overrides)
    metrics = "recon,clipscore,refclipscore,bleu,rouge,cider,sbert" + (",meteor" if args.meteor else "")
    with tempfile.TemporaryDirectory() as tmp:
        data = write_shapes_data(Path(tmp) / "data", args.n, seed=0)
        recon = Reconstructor(config)
        t0 = time.perf_counter()
        _ = recon.generator, recon.image_metrics  # loaded before the clock starts: shares are steady-state
        preload = time.perf_counter() - t0
        t0 = time.perf_counter()
        run = score_caption_sets(config, [data / "texts.json"], data / "images", Path(tmp) / "run",
                                 refs=data / "refs.json", metrics=metrics, names=["truth"], progress=False,
                                 reconstructor=recon, n_resamples=1000)
        total = time.perf_counter() - t0
        ok = sum(r.get("status") == "ok" for r in run.records)
        stages = dict(run.timing)
        stages["other"] = max(0.0, total - sum(stages.values()))
        metric_s = sum(stages.get(s, 0.0) for s in METRIC_STAGES)
        print(json.dumps({"bench": "score", "preset": config.name, "device": args.device, "threads": threads,
                          "captions": args.n, "ok": ok, "k": 1, "metrics": metrics,
                          "batch_across_items": args.batch_across_items, "wall_s": round(total, 2),
                          "generator_and_image_metrics_load_s": round(preload, 2),
                          "s_per_caption": round(total / max(1, args.n), 4),
                          "captions_per_s": round(args.n / total, 2)}))
        print(json.dumps({"bench": "score-shares", **{k: round(v / total, 4) for k, v in stages.items()},
                          "generation_vs_metrics": {"generation": round(stages.get("generation", 0.0) / total, 4),
                                                    "metrics": round(metric_s / total, 4)}}))
        print(json.dumps({"bench": "score-stage-seconds", **{k: round(v, 2) for k, v in stages.items()}}))
        captions = json.loads((data / "texts.json").read_text())
        keys = list(captions)[:args.overhead_prompts]
        prompts = [captions[k] for k in keys]
        seeds = [derive_seed(config.run.seed, k, 0, 0) for k in keys]
        print(json.dumps({"bench": "generation-overhead", **bare_vs_recon(recon, prompts, seeds, args.repeats)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
