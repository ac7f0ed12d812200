"""Semi-supervised joint finetuning in the procedural worlds: can the reconstruction losses use data without labels?

Every arm is a ``recon finetune`` run of ``configs/finetune-shapes.yaml`` (``finetune-scenes.yaml`` for the scenes
world; alternating image / text micro-batches, both in every optimizer step, so every arm updates each model equally
often) from the world's bundle, with a fixed pool of labelled pairs (``data.labelled_pairs``) and, per arm, unpaired
data for the regularisers:

  task          task losses only (captioner NLL, UNet denoising) on the labelled pairs
  t2i2t         + unpaired texts -> sampled image (gradient through its last 5 of 10 DDIM steps) -> captioner NLL
  t2i2t_nograd  the same with no gradient through the sampler (sampler.grad_steps=0): the captioner learns from
                synthetic pairs and the UNet is not pushed by the captioner -- the control for "the cycle is
                differentiable"
  t2i2t_nograd_w0.25  t2i2t_nograd with the t2i2t loss weighted 0.25 (the captioner NLL stays 1)
  i2t2i         + unlabelled images -> the captioner's own caption as soft tokens -> UNet denoising of the image
  both          t2i2t + i2t2i
  pseudo_label  + unlabelled images labelled by the generator: of 8 sampled captions the one under which the UNet
                denoises the image best (no gradient through the generator) -- the control for i2t2i
  best_of_n_recon  + unlabelled images labelled by reconstruction: of the captioner's candidates the one whose
                render (the generator's sample, no gradient) is most similar to the image (CLIP) -- captioner NLL on it
  dpo_recon     + the same ranking as a preference: DPO on the best vs the worst candidate against the captioner with
                its LoRA disabled
  task_3x       task for three times the steps: the compute-matched control of the costlier arms (with model
                selection, more steps can only help it)

Experiments (``--experiment``):

  e1  weak captioner (59% tuple accuracy), full generator; labelled pairs from ``--labelled`` (a list)
  e2  full captioner and generator; unpaired texts and unlabelled images of held-out half A only
      (``data.unpaired_combos=heldout_a``); measured on seen scenes, half A and half B
  e3  weak generator (``--generator``: a UNet trained for a cut recipe), full captioner frozen (a critic): arms
      denoise (task loss only) / t2i2t_onestep (+ text -> one-step x0 at t <= 500 -> captioner NLL) / image_sim
      (+ image -> soft caption -> sampled reconstruction -> 1 - CLIP cosine); every term on every micro-batch
  e4  the captioner reward (issue 23): E1's weak captioner; arms task, task_3x, pseudo_label, best_of_n_recon,
      dpo_recon, i2t2i, all candidates from the same width-4 beam search; model selection for every arm
  e5  the generator reward: E3's weak generator and frozen full captioner; arms denoise, t2i2t_onestep,
      diffusion_dpo (two samples per caption ranked by the captioner's likelihood of it); model selection by the
      held-out denoising loss
  e1r E1 re-checked with model selection: task, task_3x, t2i2t_nograd, t2i2t
  e4s E4 in the compositional scenes world (configs/finetune-scenes.yaml, the scenes bundle's weak captioner and
      generator; --arms picks which): caption exact-scene / object F1 / binding accuracy, judge exact scenes

Model selection (e4, e5, e1r; the same rule for every arm, fixed before the runs): the last fifth of the labelled pool
(``data.selection_pairs``) is held out of training, a checkpoint is kept every ``--select-every`` steps, and the
adapters evaluated are those of the checkpoint (or the untrained start) with the lowest held-out loss
(recon.train.selection). Each arm's ``eval.json`` records its compute: optimizer steps, training CPU-seconds of its
process, and the captioner examples it read with gradient (in the whole run and up to the selected step).

Evaluation (fixed scenes for every arm and seed, so arms are paired): beam-3 captions of ``--n`` test scenes (and
held-out scenes) parsed back exactly (shapes: tuple / attribute accuracy; scenes: exact scene, object F1, binding
accuracy: recon.shapes.worlds); images generated from the reference captions (DDIM 20, guidance 5), read by the
bundle's judge; ``eval.json`` keeps every caption in scene order beside its per-scene scores. Intervals over
training seeds and scenes, paired to the baseline: ``--interval t`` (default; recon.stats.seeds_by_items_t_interval, which
covers at 3-5 seeds) or ``bootstrap`` (the two-way bootstrap of the earlier tables, too narrow at few seeds).

    python experiments/semi_supervised.py --out runs/semi-e1 --experiment e1 --labelled 200 --seeds 0,1,2 --jobs 2
    python experiments/semi_supervised.py --out runs/semi-e1 --report-only      # tables and plot of what is done

Resumable: a finished arm (its ``eval.json``) is skipped; an interrupted one resumes from its checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from recon.shapes.worlds import WORLDS

ARMS = {
    "task": ["loss.i2t2i=0", "loss.t2i2t=0"],
    "t2i2t": ["loss.i2t2i=0", "loss.t2i2t=1", "data.unpaired_texts={world}", "loss.t2i2t_form=sampler"],
    "t2i2t_nograd": [
        "loss.i2t2i=0",
        "loss.t2i2t=1",
        "data.unpaired_texts={world}",
        "loss.t2i2t_form=sampler",
        "sampler.grad_steps=0",
    ],
    # the same at a quarter of the weight: E2's 1:1 mix cost 4.9 points on seen combinations
    "t2i2t_nograd_w0.25": [
        "loss.i2t2i=0",
        "loss.t2i2t=0.25",
        "data.unpaired_texts={world}",
        "loss.t2i2t_form=sampler",
        "sampler.grad_steps=0",
    ],
    "i2t2i": ["loss.i2t2i=1", "loss.t2i2t=0", "data.unlabelled_images={world}"],
    "both": [
        "loss.i2t2i=1",
        "loss.t2i2t=1",
        "data.unpaired_texts={world}",
        "loss.t2i2t_form=sampler",
        "data.unlabelled_images={world}",
    ],
    "pseudo_label": ["loss.i2t2i=0", "loss.t2i2t=0", "loss.pseudo_label=1", "data.unlabelled_images={world}"],
}
# issue 23's arms: E4 (captioner reward) and the compute-matched control of E4 and E1r
REWARD_ARMS = {
    "best_of_n_recon": [
        "loss.i2t2i=0",
        "loss.t2i2t=0",
        "loss.best_of_n_recon=1",
        "data.unlabelled_images={world}",
    ],
    "dpo_recon": ["loss.i2t2i=0", "loss.t2i2t=0", "loss.dpo_recon=1", "data.unlabelled_images={world}"],
    "task_3x": ["loss.i2t2i=0", "loss.t2i2t=0"],
}
STEP_FACTORS = {"task_3x": 3}  # arms trained for a multiple of the experiment's steps
# paired contrasts reported beside the differences to the baseline: (arm, control)
CONTRASTS = (
    ("t2i2t", "t2i2t_nograd"),
    ("i2t2i", "pseudo_label"),
    ("t2i2t_nograd_w0.25", "t2i2t_nograd"),
    ("image_sim", "t2i2t_onestep"),
    ("best_of_n_recon", "pseudo_label"),
    ("dpo_recon", "pseudo_label"),
    ("dpo_recon", "best_of_n_recon"),
    ("best_of_n_recon", "task_3x"),
    ("dpo_recon", "task_3x"),
    ("t2i2t_nograd", "task_3x"),
    ("diffusion_dpo", "t2i2t_onestep"),
)
E3_COMMON = [
    "captioner_lora.targets=none",
    "loss.caption_nll=0",
    "loss.i2t2i=0",
    "loss.schedule=sum",
    "train.grad_accum=1",
]
E3_ARMS = {
    "denoise": E3_COMMON + ["loss.t2i2t=0", "loss.image_sim=0"],
    "t2i2t_onestep": E3_COMMON
    + ["loss.t2i2t=1", "loss.t2i2t_form=one_step", "loss.one_step_max_timestep=500", "loss.image_sim=0"],
    "image_sim": E3_COMMON + ["loss.t2i2t=0", "loss.image_sim=1"],
}
E5_ARMS = {arm: E3_ARMS[arm] for arm in ("denoise", "t2i2t_onestep")} | {
    "diffusion_dpo": E3_COMMON + ["loss.t2i2t=0", "loss.image_sim=0", "loss.diffusion_dpo=1"],
}
# E4's candidates: the 4 beams of a width-4 beam search for every ranked arm (E1's pseudo_label setting), so ranking
# by reconstruction and ranking by denoising error choose among the same captions
E4_CANDIDATES = [
    "loss.pseudo_label_decoding.method=beam",
    "loss.pseudo_label_decoding.num_beams=4",
    "loss.pseudo_label_candidates=4",
    "loss.recon_reward_decoding.method=beam",
    "loss.recon_reward_decoding.num_beams=4",
    "loss.recon_reward_candidates=4",
    "loss.recon_reward_metric.model={bundle}/clip",
]
EXPERIMENTS = {
    "e1": {
        "captioner": "captioner_weak",
        "extra": [],
        "splits": ("test", "heldout"),
        "judge_splits": ("test",),
        "arms": ARMS,
        "baseline": "task",
    },
    "e2": {
        "captioner": "captioner",
        "extra": ["data.unpaired_combos=heldout_a"],
        "splits": ("test", "heldout_a", "heldout_b"),
        "judge_splits": ("test", "heldout_a", "heldout_b"),
        "arms": ARMS,
        "baseline": "task",
    },
    "e3": {
        "captioner": "captioner",
        "extra": [],
        "splits": (),
        "judge_splits": ("test", "heldout"),
        "arms": E3_ARMS,
        "baseline": "denoise",
    },
    "e4": {
        "captioner": "captioner_weak",
        "extra": E4_CANDIDATES,
        "splits": ("test", "heldout"),
        "judge_splits": ("test",),
        "baseline": "task",
        "select": "caption_nll",
        "arms": {
            a: (ARMS | REWARD_ARMS)[a]
            for a in ("task", "task_3x", "pseudo_label", "best_of_n_recon", "dpo_recon", "i2t2i")
        },
    },
    "e5": {
        "captioner": "captioner",
        "extra": [],
        "splits": (),
        "judge_splits": ("test", "heldout"),
        "arms": E5_ARMS,
        "baseline": "denoise",
        "select": "denoise",
    },
    "e1r": {
        "captioner": "captioner_weak",
        "extra": [],
        "splits": ("test", "heldout"),
        "judge_splits": ("test",),
        "baseline": "task",
        "select": "caption_nll",
        "arms": {a: (ARMS | REWARD_ARMS)[a] for a in ("task", "task_3x", "t2i2t_nograd", "t2i2t")},
    },
}
# E4's arms in the compositional scenes world (its bundle's weak captioner: 36% exact scenes); which arms run is --arms
# (pre-registered in RESULTS.md: task and E4's best two)
EXPERIMENTS["e4s"] = EXPERIMENTS["e4"] | {"world": "scenes"}
SELECT_EVERY = 25  # optimizer steps between the checkpoints model selection chooses from
SELECTION_FRACTION = 5  # the last 1/5 of the labelled pool is held out for model selection
EVAL_STREAM = (
    2_000_003  # the test / held-out stream of experiments/joint_finetune.py; no training stream is here
)
EVAL_SEED = 0  # the scenes are the same for every arm and training seed
METRICS = tuple(m for w in WORLDS.values() for m in (*w.caption_metrics, *w.judge_metrics))


def world(experiment: str) -> str:
    """The procedural world an experiment trains and measures in (recon.shapes.worlds)."""
    return EXPERIMENTS[experiment].get("world", "shapes")


def config_name(experiment: str) -> str:
    """The finetune config every arm of the experiment starts from (configs/finetune-<world>.yaml)."""
    return f"finetune-{world(experiment)}"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------- one arm
def arm_overrides(
    bundle: Path,
    experiment: str,
    arm: str,
    labelled: int,
    seed: int,
    steps: int | None,
    generator: Path | None = None,
    extra: list[str] = (),
    select_every: int = SELECT_EVERY,
) -> list[str]:
    spec = EXPERIMENTS[experiment]
    sets = [
        f"captioner.model={bundle / spec['captioner']}",
        f"generator.model={generator or bundle / 'generator'}",
        f"validation.metric.model={bundle / 'clip'}",
        f"loss.image_sim_terms.clip_metric.model={bundle / 'clip'}",
        "validation.every=0",
        "validation.final=false",
        "train.report_to=none",
        "train.threads=1",
        f"data.labelled_pairs={labelled or 'null'}",
        f"train.seed={seed}",
        *(
            x.format(bundle=bundle, world=world(experiment))
            for x in (*spec["extra"], *spec["arms"].get(arm, []))
        ),
    ]
    if spec.get("select"):
        if not labelled:
            raise ValueError(
                f"--experiment {experiment} selects models on a held-out slice of the labelled pool: "
                "pass --labelled N (not 0)"
            )
        sets += [
            f"data.selection_pairs={max(1, labelled // SELECTION_FRACTION)}",
            f"train.checkpoint_every={select_every}",
            "train.checkpoints_total_limit=100000",
        ]
    if arm in STEP_FACTORS:
        from recon.train.config import load_finetune_config

        steps = (steps or load_finetune_config(config_name(experiment)).train.steps) * STEP_FACTORS[arm]
    return sets + [*extra] + ([f"train.steps={steps}"] if steps else [])


def evaluate(
    cfg,
    adapter: str | None,
    lora: str | None,
    n: int,
    splits,
    bundle: Path,
    judge_splits=("test",),
    world: str = "shapes",
) -> dict:
    """Per scene scores of the captioner and of the generator, per split (the world's, recon.shapes.worlds):
    captions parsed back exactly; images generated from the reference captions, read by the bundle's judge."""
    import torch
    from PIL import Image

    from recon.captioners import BlipCaptioner
    from recon.generators.diffusion import DiffusionGenerator
    from recon.runs import derive_seed
    from recon.shapes.worlds import WORLDS

    w = WORLDS[world]
    device = torch.device("cpu")
    captioner = (  # loaded only when captions are read (e3 and e5 read none), as the generator below
        BlipCaptioner.from_config(dataclasses.replace(cfg.captioner, adapter=adapter), device, batch_size=64)
        if splits
        else None
    )
    out: dict[str, list[float]] = {}
    with torch.no_grad():
        for split in splits:
            scenes = w.sample(n, EVAL_SEED, split, EVAL_STREAM)
            captions = [
                c[0]
                for c in captioner.caption(
                    [Image.fromarray(a) for a in w.render_batch(scenes)],
                    num_candidates=1,
                    decoding=cfg.captioner.decoding,
                )
            ]
            scores = [w.caption_scores(c, s) for c, s in zip(captions, scenes)]
            for k in w.caption_metrics:
                out[f"{split}/{k}"] = [r[k] for r in scores]
            out[f"{split}/captions"] = captions  # all, in scene order: errors can be read after the run
        if not judge_splits:
            return out
        generator = DiffusionGenerator.from_config(
            dataclasses.replace(cfg.generator, lora=lora), device, batch_size=64
        )
        judge = w.load_judge(bundle / "judge")
        seeds = [derive_seed(EVAL_SEED, f"eval{i}", 0, 0) for i in range(n)]
        for split in judge_splits:
            scenes = w.sample(n, EVAL_SEED, split, EVAL_STREAM)
            readings = judge.predict(generator.generate([s.caption for s in scenes], seeds).images)
            scores = [w.judge_scores(r, s) for r, s in zip(readings, scenes)]
            for k in w.judge_metrics:
                out[f"{split}/{k}"] = [r[k] for r in scores]
    return out


def run_arm(
    out: Path,
    experiment: str,
    arm: str,
    labelled: int,
    seed: int,
    n: int,
    steps: int | None,
    bundle: Path,
    generator: Path | None = None,
    extra: list[str] = (),
    select_every: int = SELECT_EVERY,
    eval_final: bool = False,
) -> dict:
    """Train (resumably), select (if the experiment does) and evaluate one arm; ``eval.json`` marks it done.
    ``eval_final``: with selection, also evaluate the last step's adapters (keys ``final/...``; the selected ones'
    results again when the last step was selected)."""
    import torch

    from recon.train.config import load_finetune_config
    from recon.train.joint import finetune

    torch.set_num_threads(1)
    cfg = load_finetune_config(
        config_name(experiment),
        arm_overrides(bundle, experiment, arm, labelled, seed, steps, generator, extra, select_every),
    )
    spec = EXPERIMENTS[experiment]
    adapter = lora = None
    t0, cpu0 = time.time(), time.process_time()
    compute: dict = {}
    if arm != "start":
        summary = finetune(cfg, out)
        compute = {"steps": summary["step"], "train_process_cpu_s": round(time.process_time() - cpu0, 1)}
        run = out
        if spec.get("select"):
            from recon.train.selection import SELECTED_DIR, select_checkpoint

            cpu1 = time.process_time()
            chosen = select_checkpoint(cfg, out, spec["select"])
            run = out / SELECTED_DIR
            compute |= {
                "selected_step": chosen["best_step"],
                "selection_criterion": chosen["criterion"],
                "selection_process_cpu_s": round(time.process_time() - cpu1, 1),
            }
        compute |= captioner_examples(out, compute.get("selected_step"))
        adapter, lora = str(run / "captioner_adapter"), str(run / "sd_lora")
    train_s = time.time() - t0
    result = evaluate(
        cfg,
        adapter if cfg.captioner_lora.targets != "none" else None,
        lora,
        n,
        spec["splits"],
        bundle,
        spec["judge_splits"],
        world(experiment),
    )
    if eval_final and "selected_step" in compute:
        final = (
            result
            if compute["selected_step"] == compute["steps"]
            else evaluate(
                cfg,
                str(out / "captioner_adapter") if cfg.captioner_lora.targets != "none" else None,
                str(out / "sd_lora"),
                n,
                spec["splits"],
                bundle,
                spec["judge_splits"],
                world(experiment),
            )
        )
        result |= {f"final/{k}": v for k, v in final.items()}
    record = {
        "experiment": experiment,
        "arm": arm,
        "labelled": labelled,
        "seed": seed,
        "n": n,
        # wall-clock seconds of this one-thread process, despite the names (kept so that every earlier record reads
        # the same); the training loop's process CPU is `train_process_cpu_s`
        "train_cpu_s": round(train_s, 1),
        "eval_cpu_s": round(time.time() - t0 - train_s, 1),
        **compute,
        **result,
    }
    from recon.data import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "eval.json", json.dumps(record))
    return record


def captioner_examples(out: Path, selected_step: int | None = None) -> dict:
    """The captioner examples read with gradient (metrics.jsonl's per-step counts), in the run and up to the
    selected step."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    total = sum(int(r.get("captioner_examples", 0)) for r in records)
    found = {"captioner_examples": total}
    if selected_step is not None:
        found["captioner_examples_selected"] = sum(
            int(r.get("captioner_examples", 0)) for r in records if r["step"] <= selected_step
        )
    return found


# ----------------------------------------------------------------------------------------------- report
def load_records(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.glob("**/eval.json"))]


def fmt(e) -> str:
    return f"{100 * e.diff:5.1f} [{100 * e.low:5.1f}, {100 * e.high:5.1f}]"


def compute_cells(runs: list[dict]) -> str:
    """An arm's compute, mean over its seeds: CPU-minutes of training, optimizer steps and captioner examples (k)
    of the run; where a model was selected, each seed's selected step (in seed order: whether more steps ever
    changed the choice is read from them) and the mean examples to it in parentheses."""

    def mean(key):
        values = [r[key] for r in runs if r.get(key) is not None]
        return float(np.mean(values)) if values else None

    cpu, steps = mean("train_process_cpu_s"), mean("steps")
    chosen = [str(r["selected_step"]) for r in runs if r.get("selected_step") is not None]
    examples, examples_chosen = mean("captioner_examples"), mean("captioner_examples_selected")
    cells = [
        f"{cpu / 60:.1f}" if cpu is not None else "-",
        "-" if steps is None else f"{steps:.0f}" + (f" ({', '.join(chosen)})" if chosen else ""),
        "-"
        if examples is None
        else f"{examples / 1000:.1f}"
        + (f" ({examples_chosen / 1000:.1f})" if examples_chosen is not None else ""),
    ]
    return " | ".join(cells)


def report(root: Path, interval: str = "t") -> str:
    """Markdown tables: per labelled size and arm, mean over seeds with CIs and compute; paired differences to the
    baseline. ``interval``: ``t`` (seeds_by_items_t_interval) or ``bootstrap`` (seeds_by_items_bootstrap)."""
    from recon.stats import SEED_INTERVALS

    seeds_by_items = SEED_INTERVALS[interval]
    records = load_records(root)
    if not records:
        return "no finished arms yet"
    keys = list(
        dict.fromkeys(k for r in records for k in r if k.endswith(METRICS) and isinstance(r[k], list))
    )
    spec = EXPERIMENTS[records[0].get("experiment", "e1")]
    base = spec["baseline"]
    by = {}
    for r in records:
        by.setdefault(r["labelled"], {}).setdefault(r["arm"], {})[r["seed"]] = r
    lines = []
    for labelled in sorted(by):
        arms = by[labelled]
        order = [a for a in ("start", *spec["arms"]) if a in arms]
        lines += [
            f"### {labelled or 'unlimited'} labelled pairs",
            "",
            "| arm | seeds | "
            + " | ".join(k.replace("/", " ") + " %" for k in keys)
            + " | train wall-min | train CPU-min | optimizer steps (selected, by seed) | captioner examples k (selected) |",
            "| --- | --- |" + " --- |" * len(keys) + " --- | --- | --- | --- |",
        ]
        grids = {}
        for arm in order:
            seeds = sorted(arms[arm])
            grids[arm] = {
                k: np.array([arms[arm][s][k] for s in seeds])
                for k in keys
                if all(k in arms[arm][s] for s in seeds)
            }  # final/...: only arms that selected a model
            minutes = np.mean([arms[arm][s]["train_cpu_s"] for s in seeds]) / 60
            cells = [fmt(seeds_by_items(grids[arm][k])) if k in grids[arm] else "-" for k in keys]
            lines.append(
                f"| {arm} | {','.join(map(str, seeds))} | "
                + " | ".join(cells)
                + f" | {minutes:.1f} | "
                + compute_cells([arms[arm][s] for s in seeds])
                + " |"
            )
        if base in arms:
            lines += [
                "",
                f"Differences to `{base}` (points; 95% CI over seeds and scenes, paired on shared seeds; "
                f"{'t-test' if interval == 't' else 'bootstrap'} p):",
                "",
                "| arm | " + " | ".join(k.replace("/", " ") for k in keys) + " |",
                "| --- |" + " --- |" * len(keys),
            ]
            pairs = [(arm, base) for arm in order if arm not in (base, "start")]
            pairs += [(a, b) for a, b in CONTRASTS if a in arms and b in arms]
            for arm, control in pairs:
                shared = sorted(set(arms[arm]) & set(arms[control]))
                if not shared:
                    continue
                cells = []
                for k in keys:
                    if not all(k in arms[a][s] for a in (arm, control) for s in shared):
                        cells.append("-")
                        continue
                    t = seeds_by_items(
                        np.array([arms[arm][s][k] for s in shared]),
                        np.array([arms[control][s][k] for s in shared]),
                    )
                    cells.append(
                        f"{100 * t.diff:+.1f} [{100 * t.low:+.1f}, {100 * t.high:+.1f}] p={t.p_value:.3f}"
                    )
                lines.append(
                    f"| {arm if control == base else f'{arm} - {control}'} | " + " | ".join(cells) + " |"
                )
        lines.append("")
    return "\n".join(lines)


def plot(root: Path, path: Path, metric: str = "test/caption_tuple_acc", interval: str = "t") -> Path | None:
    """Left: the metric per arm (mean over seeds, 95% CI) against labelled pairs (a line per arm; bars for one size).
    Right, where the baseline ran: each arm minus the baseline, paired on shared seeds and scenes (95% CI) -- the
    comparison the hypotheses are read on; the per-arm intervals on the left hide the pairing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from recon.stats import SEED_INTERVALS

    seeds_by_items = SEED_INTERVALS[interval]
    start = [r for r in load_records(root) if r["arm"] == "start" and metric in r]
    records = [r for r in load_records(root) if r["arm"] != "start" and metric in r]
    if not records:
        return None
    spec = EXPERIMENTS[records[0].get("experiment", "e1")]
    sizes = sorted({r["labelled"] for r in records})
    arms = [a for a in spec["arms"] if any(r["arm"] == a for r in records)]
    by = {(r["arm"], r["labelled"], r["seed"]): r[metric] for r in records}
    base = spec["baseline"] if spec["baseline"] in arms else None
    fig, axes = plt.subplots(1, 2 if base else 1, figsize=(11.0 if base else 6.4, 4.0), squeeze=False)

    colour = {arm: f"C{i}" for i, arm in enumerate(arms)}  # an arm keeps its colour in both panels

    def draw(ax, arm_list, estimate, ylabel):
        for i, arm in enumerate(arm_list):
            xs, ys, lo, hi = [], [], [], []
            for size in sizes:
                e = estimate(arm, size)
                if e is not None:
                    # several sizes: each arm a little to the side of the size (log axis), so error bars
                    # that overlap in value stay apart
                    xs.append(size * 1.03 ** (i - (len(arm_list) - 1) / 2) if len(sizes) > 1 else i)
                    ys.append(100 * e.diff)
                    lo.append(100 * (e.diff - e.low))
                    hi.append(100 * (e.high - e.diff))
            if len(sizes) > 1:
                ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=arm, color=colour[arm])
            else:
                ax.bar(xs, ys, yerr=[lo, hi], capsize=4, color=colour[arm])  # the x ticks name the arms
        if len(sizes) > 1:
            ax.set_xscale("log")
            ax.set_xlabel("labelled pairs")
            ax.legend()
        else:
            ax.set_xticks(range(len(arm_list)), arm_list, rotation=30, ha="right")
            ax.set_xlabel(f"arm ({sizes[0]} labelled pairs)")
        ax.set_ylabel(ylabel)

    def absolute(arm, size):
        grid = [v for (a, n, _), v in sorted(by.items()) if a == arm and n == size]
        return seeds_by_items(np.array(grid)) if grid else None

    def paired(arm, size):
        shared = sorted(s for (a, n, s) in by if a == arm and n == size and (base, size, s) in by)
        if not shared:
            return None
        return seeds_by_items(
            np.array([by[(arm, size, s)] for s in shared]), np.array([by[(base, size, s)] for s in shared])
        )

    draw(axes[0][0], arms, absolute, f"{metric} %\n(95% CI, seeds x scenes)")
    if start:
        axes[0][0].axhline(
            100 * float(np.mean(start[0][metric])), color="gray", linestyle="--", label="start (untrained)"
        )
        axes[0][0].legend(loc="lower right")
    if base:
        ax = axes[0][1]
        draw(ax, [a for a in arms if a != base], paired, f"{metric}: arm - {base}, points\n(95% CI, paired)")
        ax.axhline(0.0, color="black", linewidth=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/semi-e1"))
    parser.add_argument("--experiment", choices=sorted(EXPERIMENTS), default="e1")
    parser.add_argument("--arms", default=None, help="comma-separated (default: every arm of the experiment)")
    parser.add_argument(
        "--labelled", default="200", help="comma-separated labelled pool sizes (0: unlimited)"
    )
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    parser.add_argument(
        "--steps", type=int, default=None, help="optimizer steps per arm (default: the config's)"
    )
    parser.add_argument("--n", type=int, default=400, help="evaluation scenes per split")
    parser.add_argument("--jobs", type=int, default=2, help="arms trained at once, one thread each")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--generator", type=Path, default=None, help="generator dir (default: the bundle's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="applied to every arm")
    parser.add_argument(
        "--metric", default=None, help="plotted metric (default: caption tuple acc; e3, e5: judge)"
    )
    parser.add_argument(
        "--interval",
        choices=("t", "bootstrap"),
        default="t",
        help="seeds x scenes interval (t: covers at few seeds; bootstrap: the earlier tables')",
    )
    parser.add_argument(
        "--select-every",
        type=int,
        default=SELECT_EVERY,
        help="steps between the checkpoints model selection chooses from (e4, e5, e1r)",
    )
    parser.add_argument(
        "--eval-final",
        action="store_true",
        help="with model selection, also evaluate each arm's last step (columns final/...)",
    )
    parser.add_argument("--one", nargs=3, metavar=("ARM", "LABELLED", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    from recon import hub

    default_bundle = hub.SCENES_BUNDLE if world(args.experiment) == "scenes" else hub.SHAPES_BUNDLE
    bundle = (args.bundle or default_bundle).resolve()
    if args.one:  # a worker: one arm in this process
        arm, labelled, seed = args.one[0], int(args.one[1]), int(args.one[2])
        done = args.out / f"l{labelled}" / arm / f"seed{seed}" / "eval.json"
        if done.exists():  # finished by another launcher since this one listed it: never evaluated twice
            log(f"{arm} l{labelled} seed{seed}: already finished ({done})")
            return 0
        r = run_arm(
            args.out / f"l{labelled}" / arm / f"seed{seed}",
            args.experiment,
            arm,
            labelled,
            seed,
            args.n,
            args.steps,
            bundle,
            args.generator,
            args.overrides,
            args.select_every,
            args.eval_final,
        )
        log(
            f"{arm} l{labelled} seed{seed}: "
            + ", ".join(f"{k} {np.mean(v):.3f}" for k, v in r.items() if k.endswith(METRICS))
        )
        return 0
    failures = 0
    if not args.report_only:
        jobs = [("start", int(labelled), 0) for labelled in args.labelled.split(",")][:1]
        jobs += [
            (arm, int(labelled), int(seed))
            for labelled in args.labelled.split(",")
            for seed in args.seeds.split(",")
            for arm in (args.arms.split(",") if args.arms else EXPERIMENTS[args.experiment]["arms"])
        ]
        pending = [
            j for j in jobs if not (args.out / f"l{j[1]}" / j[0] / f"seed{j[2]}" / "eval.json").exists()
        ]
        log(f"{len(pending)} of {len(jobs)} arms to run, {args.jobs} at a time")

        def work(job):
            arm, labelled, seed = job
            cmd = [
                sys.executable,
                __file__,
                "--out",
                str(args.out),
                "--experiment",
                args.experiment,
                "--n",
                str(args.n),
                "--bundle",
                str(bundle),
                "--one",
                arm,
                str(labelled),
                str(seed),
            ]
            cmd += ["--steps", str(args.steps)] if args.steps else []
            cmd += ["--generator", str(args.generator)] if args.generator else []
            cmd += ["--select-every", str(args.select_every)] + (["--eval-final"] if args.eval_final else [])
            cmd += [x for o in args.overrides for x in ("--set", o)]
            logfile = args.out / f"l{labelled}" / arm / f"seed{seed}.log"
            logfile.parent.mkdir(parents=True, exist_ok=True)
            with open(logfile, "a") as f:
                rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
            log(f"{arm} l{labelled} seed{seed}: exit {rc} ({logfile})")
            return rc

        with ThreadPoolExecutor(args.jobs) as pool:
            failures = sum(rc != 0 for rc in pool.map(work, pending))
        if failures:
            log(f"{failures} arm(s) failed; rerun to retry them")
    if not load_records(args.out):  # never a report of empty tables
        print(
            f"semi_supervised: error: {args.out}: no finished arm to report (each arm's log: "
            f"{args.out}/l*/ARM/seed*.log)",
            file=sys.stderr,
        )
        return 2
    md = report(args.out, args.interval)
    (args.out / "results.md").write_text(md + "\n")
    done = load_records(args.out)  # --report-only needs no --experiment: the records name theirs
    experiment = done[0].get("experiment", args.experiment) if done else args.experiment
    w = WORLDS[world(experiment)]
    metric = (
        args.metric or f"test/{(w.judge_metrics if experiment in ('e3', 'e5') else w.caption_metrics)[0]}"
    )
    plot(args.out, args.out / f"{metric.replace('/', '_')}.png", metric, args.interval)
    print(md)
    return 1 if not args.report_only and failures else 0


if __name__ == "__main__":
    sys.exit(main())
