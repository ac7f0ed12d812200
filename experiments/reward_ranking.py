"""How good a label does each ranking of the captioner's candidates choose? E4's signals measured before training.

The reward arms of E4 (experiments/semi_supervised.py) train the captioner on the caption a signal picks among its
own candidates; how often that pick is right bounds what the arm can teach. For ``--n`` unlabelled scenes of a world
(the training split's unlabelled-image stream), the untrained weak captioner's candidates -- E4's: the 4 beams of a
width-4 beam search -- are ranked by each signal with the arms' own code (recon.train.losses.JointObjective), and
the chosen caption is scored exactly against its scene (recon.shapes.worlds):

  beam        the first beam: the captioner's own choice (the i2t2i target)
  random      a seeded uniform pick among the candidates
  denoise     the lowest UNet noise MSE under the caption (pseudo_label; loss.pseudo_label_draws shared draws)
  recon_clip  the render most similar to the image by the bundle's CLIP (best_of_n_recon; dpo_recon's "chosen")
  recon_ssim  the same by SSIM (a layout-aware similarity; not an E4 arm)
  oracle      1 when any candidate is right: the ceiling of every ranking

and, for the preference arm, each ranking's worst candidate (dpo_recon's "rejected"). Renders: the training sampler
(10 DDIM steps, no gradient), one starting noise per image shared by its candidates, as in training. Differences
between rankings are paired over scenes (recon.stats.paired_test: bootstrap CI, sign-flip p).

    python experiments/reward_ranking.py --world shapes --n 400 --out runs/reward-ranking-shapes.json
    python experiments/reward_ranking.py --world scenes --n 400 --out runs/reward-ranking-scenes.json

``--renders GENERATOR`` measures E5's generator preference the same way: for ``--n`` training scenes' captions,
two renders each from GENERATOR (E5's weak UNet) through the diffusion_dpo term's own sampling and ranking code,
the one the full captioner finds likelier chosen; the bundle's judge reads both. It reports how often the two
renders differ in the judge's eyes (only those pairs carry a preference a judge can see) and how often the
captioner's choice is then the right one, and the chosen render's judge accuracy against a random one's.

    python experiments/reward_ranking.py --world shapes --n 400 --renders runs/weakgen900/generator \
        --out runs/render-pairs-e5.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from recon.shapes.worlds import WORLDS

RANKINGS = ("beam", "random", "denoise", "recon_clip", "recon_ssim")
CONTRASTS = (
    ("recon_clip", "denoise"),
    ("recon_clip", "beam"),
    ("denoise", "beam"),
    ("recon_ssim", "recon_clip"),
    ("recon_ssim", "denoise"),
)
CHUNK = 8  # images per ranking call: a training micro-batch
SEED = 0


def e4_overrides(world: str, bundle: Path) -> list[str]:
    """The finetune overrides of E4's ranked arms (their candidates, draws and reward metric) in ``world``."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from semi_supervised import E4_CANDIDATES

    return [x.format(bundle=bundle) for x in E4_CANDIDATES] + [
        f"captioner.model={bundle / 'captioner_weak'}",
        f"generator.model={bundle / 'generator'}",
        f"data.unlabelled_images={world}",
        "loss.pseudo_label=1",
        "loss.best_of_n_recon=1",
        "loss.i2t2i=0",
        "loss.t2i2t=0",
        "train.report_to=none",
    ]


def rank(world: str, n: int, bundle: Path | None = None) -> dict:
    """Per scene and ranking: the chosen (and, for the rankings with a worst, the rejected) caption's scores."""
    import torch

    from recon import hub
    from recon.config import MetricConfig
    from recon.similarity import load_similarity
    from recon.train.config import load_finetune_config
    from recon.train.data import UNLABELLED_STREAM, render_scenes
    from recon.train.diffusion import Diffusion
    from recon.train.joint import image_sim_metrics, load_roles
    from recon.train.losses import JointObjective

    w = WORLDS[world]
    bundle = bundle or (hub.SCENES_BUNDLE if world == "scenes" else hub.SHAPES_BUNDLE)
    cfg = load_finetune_config(f"finetune-{world}", e4_overrides(world, bundle))
    device = torch.device("cpu")
    captioner, pipe = load_roles(cfg, device, torch.float32, seed=SEED)
    captioner.model.eval()
    pipe.unet.eval()
    diffusion = Diffusion(pipe, gradient_checkpointing=False)
    metrics = image_sim_metrics(cfg, device)
    objective = JointObjective(captioner, diffusion, None, cfg.loss, cfg.sampler, metrics)
    ssim = load_similarity(MetricConfig(kind="ssim"), device, "recon_ssim", "image")
    resolution = int(pipe.unet.config.sample_size * pipe.vae_scale_factor)
    scenes = w.sample(n, SEED, "train", UNLABELLED_STREAM)
    picks = np.random.default_rng([SEED, 11]).integers(0, cfg.loss.recon_reward_candidates, n)
    rows: list[dict] = []
    cpu = dict.fromkeys(("candidates", "denoise", "recon_clip", "recon_ssim"), 0.0)  # CPU-s of each step
    for start in range(0, n, CHUNK):
        batch = scenes[start : start + CHUNK]
        images = render_scenes(batch, resolution, w)
        t0 = time.process_time()
        candidates = objective.captions_of(
            images, cfg.loss.recon_reward_candidates, cfg.loss.recon_reward_decoding
        )
        cpu["candidates"] += time.process_time() - t0
        t0 = time.process_time()
        generator = torch.Generator().manual_seed(SEED + start)
        scores = {"denoise": -objective.denoising_errors(images, candidates, generator)}
        cpu["denoise"] += time.process_time() - t0
        for name, metric in (("recon_clip", metrics["recon_reward"]), ("recon_ssim", ssim)):
            t0 = time.process_time()
            objective.metrics = {"recon_reward": metric}
            scores[name] = objective.reconstruction_scores(
                images, candidates, torch.Generator().manual_seed(SEED + start)
            )
            cpu[name] += time.process_time() - t0
        for i, (scene, caps) in enumerate(zip(batch, candidates)):
            exact = [w.caption_scores(c, scene) for c in caps]
            row = {
                "beam": exact[0],
                "random": exact[int(picks[start + i])],
                "oracle": {k: max(e[k] for e in exact) for k in exact[0]},
                "distinct": len(set(caps)),
            }
            for name, s in scores.items():
                row[name] = exact[int(s[i].argmax())]
                row[f"{name}_worst"] = exact[int(s[i].argmin())]
            rows.append(row)
    return {
        "world": world,
        "n": n,
        "candidates": cfg.loss.recon_reward_candidates,
        "cpu_ms_per_image": {k: round(1000 * v / n, 1) for k, v in cpu.items()},
        "rows": rows,
    }


def rank_renders(n: int, generator_path: Path, bundle: Path | None = None) -> dict:
    """Per caption: the judge's score of each of its two renders and the captioner's log-likelihood of it."""
    import torch

    from recon import hub
    from recon.train.config import load_finetune_config
    from recon.train.data import UNLABELLED_STREAM
    from recon.train.diffusion import Diffusion
    from recon.train.joint import image_sim_metrics, load_roles
    from recon.train.losses import JointObjective

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from semi_supervised import arm_overrides, config_name

    w = WORLDS["shapes"]  # E5's world
    bundle = bundle or hub.SHAPES_BUNDLE
    sets = arm_overrides(bundle, "e5", "diffusion_dpo", 200, SEED, None, generator_path)
    cfg = load_finetune_config(config_name("e5"), sets)
    device = torch.device("cpu")
    captioner, pipe = load_roles(cfg, device, torch.float32, seed=SEED)
    captioner.model.eval()
    d = Diffusion(pipe, gradient_checkpointing=False)
    objective = JointObjective(captioner, d, None, cfg.loss, cfg.sampler, image_sim_metrics(cfg, device))
    judge = w.load_judge(bundle / "judge")
    scenes = w.sample(n, SEED, "train", UNLABELLED_STREAM)
    rows: list[dict] = []
    for start in range(0, n, CHUNK):
        batch = scenes[start : start + CHUNK]
        texts, k = [s.caption for s in batch], len(batch)
        generator = torch.Generator().manual_seed(SEED + start)
        _, images, ll = objective.render_pairs(d.text_states(texts), texts, generator)
        with torch.no_grad():
            readings = judge.predict(images)
        for i, scene in enumerate(batch):
            right = [w.judge_scores(readings[j], scene)[w.judge_metrics[0]] for j in (i, k + i)]
            rows.append({"right": right, "log_likelihood": [float(ll[i]), float(ll[k + i])]})
    return {"world": "shapes", "n": n, "generator": str(generator_path), "rows": rows}


def report_renders(result: dict) -> str:
    """The preference's quality: pairs the judge separates, the chosen render's accuracy against a random one's."""
    from recon.stats import bootstrap_mean, paired_test

    rows = result["rows"]
    first = [r["log_likelihood"][0] >= r["log_likelihood"][1] for r in rows]  # diffusion_preference's rule
    chosen = [r["right"][1 - f] for r, f in zip(rows, first)]
    rejected = [r["right"][f] for r, f in zip(rows, first)]
    # a random pick's expected accuracy: a coin flip between the two renders
    random = [float(np.mean(r["right"])) for r in rows]
    split = [c != j for c, j in zip(chosen, rejected)]
    agree = [c > j for c, j, s in zip(chosen, rejected, split) if s]

    def pct(values):
        e = bootstrap_mean(values)
        return f"{100 * e.value:.1f} [{100 * e.low:.1f}, {100 * e.high:.1f}]"

    t = paired_test(chosen, random)
    return "\n".join(
        [
            f"### Generator preference: {result['n']} captions, two renders each ({result['generator']})",
            "",
            "| quantity | % (95% CI) |",
            "| --- | --- |",
            f"| judge: both renders right | {pct([float(min(r['right'])) for r in rows])} |",
            f"| judge: the two renders differ (a preference the judge can see) | {pct([float(s) for s in split])} |",
            f"| of those, the captioner chose the right one | {pct([float(a) for a in agree])} (n={len(agree)}) |",
            f"| chosen render right | {pct(chosen)} |",
            f"| rejected render right | {pct(rejected)} |",
            f"| a random render right | {pct(random)} |",
            "",
            f"chosen - random: {100 * t.diff:+.1f} [{100 * t.low:+.1f}, {100 * t.high:+.1f}] points p={t.p_value:.3f}",
            "",
        ]
    )


def report(result: dict) -> str:
    from recon.stats import bootstrap_mean, paired_test

    w, rows = WORLDS[result["world"]], result["rows"]
    lines = [
        f"### {result['world']}: {result['n']} unlabelled scenes, {result['candidates']} candidates (4-beam search)",
        "",
        "| ranking | " + " | ".join(f"{k} % (95% CI)" for k in w.caption_metrics) + " | worst candidate's "
        f"{w.caption_metrics[0]} % |",
        "| --- |" + " --- |" * (len(w.caption_metrics) + 1),
    ]
    for name in (*RANKINGS, "oracle"):
        cells = []
        for k in w.caption_metrics:
            e = bootstrap_mean([r[name][k] for r in rows])
            cells.append(f"{100 * e.value:.1f} [{100 * e.low:.1f}, {100 * e.high:.1f}]")
        worst = (
            f"{100 * np.mean([r[f'{name}_worst'][w.caption_metrics[0]] for r in rows]):.1f}"
            if f"{name}_worst" in rows[0]
            else "-"
        )
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {worst} |")
    head = w.caption_metrics[0]
    lines += [
        "",
        f"Paired differences in {head} (points, 95% bootstrap CI over scenes, sign-flip p):",
        "",
        "| contrast | difference |",
        "| --- | --- |",
    ]
    for a, b in CONTRASTS:
        t = paired_test([r[a][head] for r in rows], [r[b][head] for r in rows])
        lines.append(
            f"| {a} - {b} | {100 * t.diff:+.1f} [{100 * t.low:+.1f}, {100 * t.high:+.1f}] p={t.p_value:.3f} |"
        )
    distinct = np.mean([r["distinct"] for r in rows])
    cost = ", ".join(f"{k} {v:.0f}" for k, v in result["cpu_ms_per_image"].items())
    lines += [
        "",
        f"Distinct candidates per image: {distinct:.2f} of {result['candidates']}. "
        f"CPU-ms per image (1 thread): {cost}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", choices=sorted(WORLDS), default="shapes")
    parser.add_argument("--n", type=int, default=400, help="unlabelled scenes ranked")
    parser.add_argument(
        "--out", type=Path, required=True, help="a JSON file: per scene scores, and the table"
    )
    parser.add_argument(
        "--bundle", type=Path, default=None, help="the world's bundle (default: the shipped one)"
    )
    parser.add_argument(
        "--renders",
        type=Path,
        default=None,
        metavar="GENERATOR",
        help="measure E5's generator preference (two renders per caption from this generator) instead",
    )
    args = parser.parse_args(argv)
    if args.n < 2:
        parser.error(f"--n {args.n}: rank at least 2 scenes (a CI needs two)")
    if args.renders and args.world != "shapes":
        parser.error(
            f"--renders with --world {args.world}: E5's generator preference is measured in shapes only"
        )
    import torch

    torch.set_num_threads(1)
    t0, cpu0 = time.time(), time.process_time()
    if args.renders:
        result = rank_renders(args.n, args.renders, args.bundle)
    else:
        result = rank(args.world, args.n, args.bundle)
    result |= {"wall_s": round(time.time() - t0, 1), "cpu_s": round(time.process_time() - cpu0, 1)}
    md = report_renders(result) if args.renders else report(result)
    from recon.data import atomic_write_text

    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result | {"table": md}))
    print(md + f"\n{result['wall_s']:.0f} s wall, {result['cpu_s']:.0f} CPU-s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
