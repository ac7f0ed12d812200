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

``--vs-libraries``: ``recon score`` with reference metrics and CLIPScore (``bleu,rouge,cider,clipscore``; METEOR too
with --meteor) against the same computation done directly with the libraries, in the same process, alternating:
pycocoevalcap as COCOEvalCap calls it (PTB tokenizer, then each scorer's ``compute_score``) and torchmetrics'
``CLIPScore`` on the same images and the preset's CLIP (the open_clip model adapted to the transformers interface
torchmetrics calls). Prints the wall time of each, the ratio recon / bare (goal <= 1.1), and a check that both
found the same scores. ``--memory N1,N2,...``: peak resident memory of each side in a fresh process per caption
count, and its growth per 10k captions.

    python benchmarks/bench_score.py --vs-libraries --n 5000
    python benchmarks/bench_score.py --vs-libraries --memory 1000,2000,5000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
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
from recon.scoring.caption_metrics import clip_metric_config  # noqa: E402
from recon.scoring.experiment_data import write_shapes_data  # noqa: E402
from recon.scoring.run import score_caption_sets  # noqa: E402

METRIC_STAGES = ("recon_similarity", "clipscore", "sbert", "reference_metrics")


def bare_vs_recon(recon: Reconstructor, prompts: list[str], seeds: list[int], repeats: int) -> dict:
    """Median seconds of Reconstructor.render (cache off) and of the bare pipeline on the same batches."""
    pipe, g, bs = recon.generator.pipe, recon.config.generator, recon.config.run.batch_size

    def bare():
        for i in range(0, len(prompts), bs):
            gens = [torch.Generator("cpu").manual_seed(s) for s in seeds[i : i + bs]]
            with torch.inference_mode():
                pipe(
                    prompt=prompts[i : i + bs],
                    num_inference_steps=g.num_inference_steps,
                    guidance_scale=g.guidance_scale,
                    height=g.height,
                    width=g.width,
                    generator=gens,
                    output_type="pt",
                )

    times = {"recon": [], "bare": []}
    bare()  # warm-up
    for _ in range(repeats):
        for name, fn in (("bare", bare), ("recon", lambda: recon.render(prompts, seeds))):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "prompts": len(prompts),
        "batch_size": bs,
        "recon_s": round(med["recon"], 3),
        "bare_s": round(med["bare"], 3),
        "ratio": round(med["recon"] / med["bare"], 3),
    }


# ------------------------------------------------------------------------------ recon score vs the libraries
class OpenClipAsTransformers(torch.nn.Module):
    """An open_clip model behind the two methods torchmetrics' CLIPScore calls on a transformers CLIPModel."""

    def __init__(self, clip: torch.nn.Module):
        super().__init__()
        self.clip, self.config = (
            clip,
            type("Config", (), {})(),
        )  # no text_config: no truncation by torchmetrics

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(pixel_values)

    def get_text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.clip.encode_text(input_ids)


class OpenClipProcessor:
    """open_clip's own preprocessing and tokenizer behind the transformers processor call torchmetrics makes."""

    def __init__(self, preprocess_cfg: dict, tokenizer):
        import open_clip
        from torchvision.transforms.functional import to_pil_image

        size = preprocess_cfg.get("size", 224)
        self.transform = open_clip.image_transform(
            size,
            is_train=False,
            mean=preprocess_cfg.get("mean"),
            std=preprocess_cfg.get("std"),
            interpolation=preprocess_cfg.get("interpolation", "bicubic"),
            resize_mode=preprocess_cfg.get("resize_mode", "shortest"),
        )
        self.to_pil, self.tokenizer = to_pil_image, tokenizer

    def __call__(self, text=None, images=None, return_tensors="pt", padding=True) -> dict:
        if images is not None:
            return {"pixel_values": torch.stack([self.transform(self.to_pil(im)) for im in images])}
        tokens = self.tokenizer(list(text))
        return {"input_ids": tokens, "attention_mask": (tokens != 0).long()}


def bare_libraries(config, data: Path, meteor: bool, batch: int = 64) -> dict:
    """pycocoevalcap (COCOEvalCap's calls) and torchmetrics' CLIPScore on ``data``; per-caption scores."""
    from PIL import Image
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    from torchmetrics.multimodal.clip_score import CLIPScore
    from torchvision.transforms.functional import pil_to_tensor

    captions, refs = (
        json.loads((data / "texts.json").read_text()),
        json.loads((data / "refs.json").read_text()),
    )
    keys = sorted(captions)
    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": r} for r in refs[k]] for k in keys})
    res = tok.tokenize({k: [{"caption": captions[k]}] for k in keys})
    scorers = [
        (Bleu(4), ["bleu_1", "bleu_2", "bleu_3", "bleu_4"]),
        (Rouge(), ["rouge_l"]),
        (Cider(), ["cider"]),
    ]
    if meteor:
        from pycocoevalcap.meteor.meteor import Meteor

        scorers.append((Meteor(), ["meteor"]))
    out = {}
    for scorer, names in scorers:
        _, per_item = scorer.compute_score(gts, res)
        per_item = per_item if len(names) > 1 else [per_item]
        for name, values in zip(names, per_item):
            out[name] = dict(zip(keys, map(float, values)))
    where, cfg = clip_metric_config(config)
    clip, preprocess_cfg, tokenizer = hub.load_open_clip(
        *hub.open_clip_source(cfg, where), torch.device("cpu")
    )
    metric = CLIPScore(
        model_name_or_path=lambda: (
            OpenClipAsTransformers(clip),
            OpenClipProcessor(preprocess_cfg, tokenizer),
        )
    )
    scores = []
    with torch.inference_mode():
        for i in range(0, len(keys), batch):
            part = keys[i : i + batch]
            images = []
            for k in part:
                with Image.open(data / "images" / f"{k}.png") as im:
                    images.append(pil_to_tensor(im.convert("RGB")))
            metric.update(images, [captions[k] for k in part])
            scores.append(float(metric.compute()))  # running mean of 100 cos over the captions so far
    out["torchmetrics_clipscore_mean_100cos"] = scores[-1] if scores else float("nan")
    return out


def recon_score(config, data: Path, out: Path, meteor: bool) -> dict:
    metrics = "bleu,rouge,cider,clipscore" + (",meteor" if meteor else "")
    run = score_caption_sets(
        config,
        [data / "texts.json"],
        data / "images",
        out,
        refs=data / "refs.json",
        metrics=metrics,
        names=["truth"],
        progress=False,
        n_resamples=1000,
    )
    return {r["image_id"]: r["scores"] for r in run.records if r.get("status") == "ok"}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def vs_libraries(args, config) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        data = write_shapes_data(Path(tmp) / "data", args.n, seed=0)
        if args.only:  # one side in this process, for its peak memory
            t0 = time.perf_counter()
            if args.only == "recon":
                recon_score(config, data, Path(tmp) / "run", args.meteor)
            else:
                bare_libraries(config, data, args.meteor)
            print(
                json.dumps(
                    {
                        "bench": "score-memory",
                        "side": args.only,
                        "captions": args.n,
                        "wall_s": round(time.perf_counter() - t0, 2),
                        "peak_rss_mb": round(peak_rss_mb(), 1),
                    }
                )
            )
            return 0
        times: dict[str, list[float]] = {"recon": [], "bare": []}
        bare_libraries(
            config, write_shapes_data(Path(tmp) / "warm", 16, seed=1), args.meteor
        )  # warm-up: loads
        for rep in range(args.repeats):
            for side in ("bare", "recon") if rep % 2 == 0 else ("recon", "bare"):
                t0 = time.perf_counter()
                if side == "recon":
                    got = recon_score(config, data, Path(tmp) / f"run{rep}", args.meteor)
                else:
                    bare = bare_libraries(config, data, args.meteor)
                times[side].append(time.perf_counter() - t0)
        same = {
            m: max(abs(got[k][m] - v) for k, v in bare[m].items())
            for m in bare
            if m in next(iter(got.values()))
        }
        cos_recon = statistics.mean(s["clipscore"] for s in got.values()) / 2.5  # w * max(cos, 0)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(
            json.dumps(
                {
                    "bench": "score-vs-libraries",
                    "captions": args.n,
                    "repeats": args.repeats,
                    "metrics": "bleu,rouge,cider,clipscore" + (",meteor" if args.meteor else ""),
                    "recon_s": round(med["recon"], 2),
                    "bare_s": round(med["bare"], 2),
                    "ratio": round(med["recon"] / med["bare"], 3),
                    "max_abs_diff_per_caption": same,
                    "mean_cos_recon": round(cos_recon, 5),
                    "mean_cos_torchmetrics": round(bare["torchmetrics_clipscore_mean_100cos"] / 100, 5),
                }
            )
        )
    return 0


def memory_table(args) -> int:
    rows = []
    for n in [int(x) for x in args.memory.split(",")]:
        for side in ("recon", "bare"):
            cmd = [
                sys.executable,
                __file__,
                "--vs-libraries",
                "--only",
                side,
                "--n",
                str(n),
                "--preset",
                args.preset,
                "--threads",
                str(args.threads or 1),
            ]
            cmd += ["--meteor"] if args.meteor else []
            line = (
                subprocess.run(cmd, capture_output=True, text=True, check=True)
                .stdout.strip()
                .splitlines()[-1]
            )
            rows.append(json.loads(line))
            print(line, flush=True)
    for side in ("recon", "bare"):
        pts = [(r["captions"], r["peak_rss_mb"]) for r in rows if r["side"] == side]
        if len(pts) > 1:
            (n0, m0), (n1, m1) = pts[0], pts[-1]
            print(
                json.dumps(
                    {
                        "bench": "score-memory-slope",
                        "side": side,
                        "mb_per_10k_captions": round((m1 - m0) / (n1 - n0) * 10_000, 1),
                    }
                )
            )
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="shapes")
    p.add_argument("--n", type=int, default=1000, help="captions to score")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--batch-across-items",
        action="store_true",
        help="generate across items (faster at K = 1; images then depend on batch neighbours at 1e-6)",
    )
    p.add_argument("--meteor", action="store_true", help="also METEOR (Java, ~25 s start-up)")
    p.add_argument("--overhead-prompts", type=int, default=32, help="prompts in the bare-vs-recon comparison")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--vs-libraries",
        action="store_true",
        help="recon score (reference metrics + CLIPScore) against pycocoevalcap + torchmetrics",
    )
    p.add_argument("--only", choices=["recon", "bare"], help=argparse.SUPPRESS)
    p.add_argument("--memory", help="caption counts for the peak-memory table, e.g. 1000,2000,5000")
    args = p.parse_args(argv)
    threads = hub.configure_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.memory:
        return memory_table(args)
    if args.vs_libraries:
        return vs_libraries(
            args,
            load_config(args.preset, ["run.cache_dir=''", f"run.threads={threads}", "run.save_images=false"]),
        )
    overrides = [
        "generator.images_per_caption=1",
        "run.cache_dir=''",
        f"run.batch_size={args.batch_size}",
        f"run.device={args.device}",
        f"run.threads={threads}",
        "run.save_images=false",
        f"generator.batch_across_items={str(args.batch_across_items).lower()}",
    ]
    config = load_config(args.preset, overrides)
    metrics = "recon,clipscore,refclipscore,bleu,rouge,cider,sbert" + (",meteor" if args.meteor else "")
    with tempfile.TemporaryDirectory() as tmp:
        data = write_shapes_data(Path(tmp) / "data", args.n, seed=0)
        recon = Reconstructor(config)
        t0 = time.perf_counter()
        _ = recon.generator, recon.image_metrics  # loaded before the clock starts: shares are steady-state
        preload = time.perf_counter() - t0
        t0 = time.perf_counter()
        run = score_caption_sets(
            config,
            [data / "texts.json"],
            data / "images",
            Path(tmp) / "run",
            refs=data / "refs.json",
            metrics=metrics,
            names=["truth"],
            progress=False,
            reconstructor=recon,
            n_resamples=1000,
        )
        total = time.perf_counter() - t0
        ok = sum(r.get("status") == "ok" for r in run.records)
        stages = dict(run.timing)
        stages["other"] = max(0.0, total - sum(stages.values()))
        metric_s = sum(stages.get(s, 0.0) for s in METRIC_STAGES)
        print(
            json.dumps(
                {
                    "bench": "score",
                    "preset": config.name,
                    "device": args.device,
                    "threads": threads,
                    "captions": args.n,
                    "ok": ok,
                    "k": 1,
                    "metrics": metrics,
                    "batch_across_items": args.batch_across_items,
                    "wall_s": round(total, 2),
                    "generator_and_image_metrics_load_s": round(preload, 2),
                    "s_per_caption": round(total / max(1, args.n), 4),
                    "captions_per_s": round(args.n / total, 2),
                }
            )
        )
        print(
            json.dumps(
                {
                    "bench": "score-shares",
                    **{k: round(v / total, 4) for k, v in stages.items()},
                    "generation_vs_metrics": {
                        "generation": round(stages.get("generation", 0.0) / total, 4),
                        "metrics": round(metric_s / total, 4),
                    },
                }
            )
        )
        print(json.dumps({"bench": "score-stage-seconds", **{k: round(v, 2) for k, v in stages.items()}}))
        captions = json.loads((data / "texts.json").read_text())
        keys = list(captions)[: args.overhead_prompts]
        prompts = [captions[k] for k in keys]
        seeds = [derive_seed(config.run.seed, k, 0, 0) for k in keys]
        print(
            json.dumps({"bench": "generation-overhead", **bare_vs_recon(recon, prompts, seeds, args.repeats)})
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
