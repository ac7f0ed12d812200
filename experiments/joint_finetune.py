"""Does reconstruction regularisation help joint finetuning? The shapes world, where attributes are exact.

Start: the shapes bundle's weak captioner (``builtin:shapes/captioner_weak``) and its generator. Every arm runs
``recon finetune`` from ``configs/finetune-shapes.yaml`` with the same data, seeds and step budget; only the loss
weights differ:

  a_task       task losses only: captioner NLL, UNet denoising                      (i2t2i = t2i2t = 0)
  b_i2t2i      + image -> soft caption -> UNet denoising of the original (denoising form)
  c_t2i2t      + text -> UNet x0 estimate -> decode -> captioner NLL of the caption
  d_both       + both regularisers
  e_image_sim  + image -> soft caption -> sampled reconstruction -> 1 - CLIP cosine (instead of b)

Each arm's exported adapters are loaded through recon's presets (``captioner.adapter``, ``generator.lora``) and
measured on ``--n`` test scenes (a stream neither training nor validation draws from), as is the untrained start:

* caption exact-attribute accuracy: beam-3 captions parsed back (recon.shapes.world.parse_caption); a tuple is
  right when all five attributes are;
* generator judge accuracy: images generated from the reference captions (DDIM 20 steps, guidance 5, fixed
  seeds per item), read by the bundle's judge.

95% intervals: percentile bootstrap over items (recon.stats, 2000 resamples); differences to ``a_task`` are paired
(same scenes, same seeds) with a permutation p-value. They cover evaluation sampling only, not training-seed
variance (one training run per arm).

    python experiments/joint_finetune.py --out runs/joint-finetune            # resumable; ~1 CPU-hour
    python experiments/joint_finetune.py --out runs/jf-quick --steps 20 --n 64 --arms a_task,d_both
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ARMS = {
    "a_task": ["loss.i2t2i=0", "loss.t2i2t=0", "loss.image_sim=0"],
    "b_i2t2i": ["loss.i2t2i=1", "loss.t2i2t=0", "loss.image_sim=0"],
    "c_t2i2t": ["loss.i2t2i=0", "loss.t2i2t=1", "loss.image_sim=0"],
    "d_both": ["loss.i2t2i=1", "loss.t2i2t=1", "loss.image_sim=0"],
    "e_image_sim": ["loss.i2t2i=0", "loss.t2i2t=0", "loss.image_sim=1"],
}
EVAL_STREAM = 2_000_003
METRICS = ("caption_tuple_acc", "caption_attr_acc", "judge_tuple_acc", "judge_attr_acc")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


@torch.no_grad()
def evaluate(
    cfg, adapter: str | None, lora: str | None, n: int, seed: int, bundle: Path, batch_size: int = 64
) -> dict:
    """Per-item correctness (lists of 0/1 and attribute fractions) of the captioner and the generator."""
    from recon.captioners import BlipCaptioner
    from recon.generators.diffusion import DiffusionGenerator
    from recon.runs import derive_seed
    from recon.shapes import models, world

    device = torch.device("cpu")
    captioner = BlipCaptioner.from_config(
        dataclasses.replace(cfg.captioner, adapter=adapter), device, batch_size=batch_size
    )
    generator = DiffusionGenerator.from_config(
        dataclasses.replace(cfg.generator, lora=lora), device, batch_size=batch_size
    )
    judge = models.load_judge(bundle / "judge", device)
    scenes = world.sample_scenes(n, seed, "test", EVAL_STREAM)
    captions = [
        c[0]
        for c in captioner.caption(
            [world.render_pil(s) for s in scenes], num_candidates=1, decoding=cfg.captioner.decoding
        )
    ]
    images = generator.generate(
        [s.caption for s in scenes], [derive_seed(seed, f"eval{i}", 0, 0) for i in range(n)]
    ).images
    judged = judge.predict(images)
    truth = [s.attributes for s in scenes]
    parsed = [world.parse_caption(c) for c in captions]
    attrs = world.ATTRIBUTES
    return {
        "caption_tuple_acc": [float(p == t) for p, t in zip(parsed, truth)],
        "caption_attr_acc": [float(np.mean([p[a] == t[a] for a in attrs])) for p, t in zip(parsed, truth)],
        "judge_tuple_acc": [float(j == t) for j, t in zip(judged, truth)],
        "judge_attr_acc": [float(np.mean([j[a] == t[a] for a in attrs])) for j, t in zip(judged, truth)],
        "captions": captions[:16],
    }


def fmt(value: float, low: float, high: float) -> str:
    return f"{100 * value:5.1f} [{100 * low:5.1f}, {100 * high:5.1f}]"


def table(results: dict[str, dict]) -> str:
    """Markdown: per arm the mean of each metric with its bootstrap CI; paired differences to ``a_task``."""
    from recon.stats import bootstrap_mean, paired_test

    rows = [
        "| arm | caption tuple acc % | caption attr acc % | judge tuple acc % | judge attr acc % |",
        "| --- | --- | --- | --- | --- |",
    ]
    for arm, r in results.items():
        cells = [bootstrap_mean(r[m], n_resamples=2000, seed=0) for m in METRICS]
        rows.append(f"| {arm} | " + " | ".join(fmt(e.value, e.low, e.high) for e in cells) + " |")
    if "a_task" in results:
        rows += [
            "",
            "Paired differences to a_task (percentage points; 95% bootstrap CI; permutation p):",
            "",
            "| arm | caption tuple | caption attr | judge tuple | judge attr |",
            "| --- | --- | --- | --- | --- |",
        ]
        for arm, r in results.items():
            if arm in ("a_task", "start"):
                continue
            tests = [paired_test(r[m], results["a_task"][m], n_resamples=2000, seed=0) for m in METRICS]
            rows.append(
                f"| {arm} | "
                + " | ".join(f"{fmt(t.diff, t.low, t.high)} p={t.p_value:.3f}" for t in tests)
                + " |"
            )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/joint-finetune"))
    parser.add_argument("--config", default="finetune-shapes")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument(
        "--steps", type=int, default=None, help="optimizer steps per arm (default: the config's)"
    )
    parser.add_argument("--n", type=int, default=500, help="evaluation scenes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="applied to every arm")
    parser.add_argument(
        "--report-only", action="store_true", help="print the table of the evaluations so far"
    )
    parser.add_argument(
        "--bundle",
        type=Path,
        default=None,
        help="a copy of the shapes bundle to use (default: the shipped one; a copy keeps a bundle "
        "being retrained from changing between arms)",
    )
    args = parser.parse_args(argv)

    from recon import hub
    from recon.train.config import load_finetune_config
    from recon.train.joint import finetune

    bundle = (args.bundle or hub.SHAPES_BUNDLE).resolve()
    if not all((bundle / part).is_dir() for part in ("captioner_weak", "generator", "clip", "judge")):
        print(
            f"the shapes bundle at {bundle} is incomplete (captioner_weak/, generator/, clip/, judge/ are needed): "
            "recon shapes train --component all",
            file=sys.stderr,
        )
        return 2
    torch.set_num_threads(args.threads)
    common = [
        f"captioner.model={bundle / 'captioner_weak'}",
        f"generator.model={bundle / 'generator'}",
        f"validation.metric.model={bundle / 'clip'}",
        f"loss.image_sim_terms.clip_metric.model={bundle / 'clip'}",
        *args.overrides,
        f"train.seed={args.seed}",
        f"train.threads={args.threads}",
    ]
    if args.steps:
        common.append(f"train.steps={args.steps}")
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    cache = args.out / "eval.json"
    if cache.exists():
        results = json.loads(cache.read_text())
    version = (bundle / "VERSION").read_text().strip() if (bundle / "VERSION").exists() else "?"
    key = f"n{args.n}-seed{args.seed}-bundle{version}"
    arms = ["start", *args.arms.split(",")]
    for arm in [] if args.report_only else arms:
        cfg = load_finetune_config(args.config, common + ARMS.get(arm, []))
        if arm != "start":
            t0 = time.time()
            log(f"{arm}: training ({cfg.train.steps} steps) into {args.out / arm}")
            summary = finetune(cfg, args.out / arm)
            log(f"{arm}: trained in {time.time() - t0:.0f}s ({summary})")
        if results.get(arm, {}).get("key") == key:
            continue
        t0 = time.time()
        adapter = str(args.out / arm / "captioner_adapter") if arm != "start" else None
        lora = str(args.out / arm / "sd_lora") if arm != "start" else None
        results[arm] = {"key": key, **evaluate(cfg, adapter, lora, args.n, args.seed, bundle)}
        log(
            f"{arm}: evaluated in {time.time() - t0:.0f}s: "
            + ", ".join(f"{m} {np.mean(results[arm][m]):.3f}" for m in METRICS)
        )
        cache.write_text(json.dumps(results))
    shown = {a: results[a] for a in arms if a in results}
    md = table(shown)
    (args.out / "results.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
