"""Measure the shapes bundle against exact ground truth: ``recon shapes eval`` / :func:`evaluate`.

Two splits of ``n`` items each, rendered from ``seed``: ``test`` (new renders of the combinations seen in training)
and ``heldout`` (combinations never seen in training). Per split:

* ``captioner_tuple_acc`` / ``captioner_attr_acc``: the captioner's caption (beam 3, as the preset decodes) parsed
  back to attributes; a tuple is right when all five are. ``captioner_unparseable``: captions missing an attribute.
* ``generator_judge_tuple_acc``: images generated from the true caption (DDIM 20 steps, guidance 5), read by the
  judge (a classifier trained on renders; its own accuracy on renders is ``judge_tuple_acc_on_renders``).
* ``clip_zero_shot_tuple_acc``: CLIP image embedding vs. all 600 combination captions (template-ensembled).
* ``recon_discrimination``: fraction of items where the reconstruction from the true caption is more similar to the
  original (CLIP image-image cosine, higher is more similar) than the reconstruction from a caption with one attribute
  changed, both generated from the same seed.

Optionally (``rerank > 0``) the weak captioner's 8 sampled captions per image are ranked by reconstruction
similarity: tuple accuracy of the chosen caption vs. a random one vs. the best possible.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from recon import hub
from recon.shapes import models, world
from recon.shapes.metrics import (
    captioner_accuracy,
    clip_zero_shot,
    judge_accuracy,
    normalize,
    score_captions,
    to_tensor,
)

BARS = {
    "captioner_tuple_acc": 0.95,
    "generator_judge_tuple_acc": 0.75,
    "clip_zero_shot_tuple_acc": 0.95,
    "recon_discrimination": 0.95,
}
EVAL_STREAM = 1  # training validation uses stream 0 of the test split; evaluation never sees those renders
DECODING = dict(num_beams=3, min_new_tokens=3)
SAMPLING = dict(num_inference_steps=20, guidance_scale=5.0)


class Bundle:
    """The bundle's models loaded through recon.hub, as recon's pipeline loads them (fp32)."""

    def __init__(self, bundle_dir: str | Path, device: torch.device):
        bundle_dir = Path(bundle_dir)
        self.device = device
        self.captioner, self.processor = hub.load_captioner_model(
            str(bundle_dir / "captioner"), device, torch.float32
        )
        self.pipe = hub.load_diffusion_pipeline(str(bundle_dir / "generator"), device, torch.float32)
        self.clip, clip_pre, self.clip_tokenizer = hub.load_open_clip(str(bundle_dir / "clip"), None, device)
        self.clip_mean, self.clip_std = clip_pre["mean"], clip_pre["std"]
        self.judge = models.load_judge(bundle_dir / "judge", device)
        weak = bundle_dir / "captioner_weak"
        self.weak_dir = str(weak) if weak.is_dir() else None

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        """``(n, 3, 32, 32)`` in [0, 1]; image i from ``seeds[i]`` (same seed: same starting noise)."""
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        latents = torch.stack(
            [torch.randn((4, world.IMAGE_SIZE // 2, world.IMAGE_SIZE // 2), generator=g) for g in gens]
        ).to(self.device)
        out = self.pipe(prompt=prompts, latents=latents, output_type="np", **SAMPLING).images
        return to_tensor((np.asarray(out) * 255).round().clip(0, 255).astype(np.uint8)).to(self.device)

    @torch.no_grad()
    def clip_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(normalize(images, self.clip_mean, self.clip_std), normalize=True)


def batch_slices(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


def evaluate_split(
    b: Bundle, scenes: list[world.Scene], seed: int, batch_size: int, generate_n: int | None = None, log=None
) -> dict:
    """All metrics on ``scenes``; the generation metrics on the first ``generate_n`` of them (None: all)."""
    t0 = time.time()
    originals = to_tensor(world.render_batch(scenes)).to(b.device)
    cap = captioner_accuracy(b.captioner, b.processor, scenes, batch=batch_size, **DECODING)
    clip = clip_zero_shot(b.clip, b.clip_tokenizer, originals, scenes, b.clip_mean, b.clip_std)
    judge_renders = judge_accuracy(b.judge, originals, scenes)
    rng = np.random.default_rng([seed, 7])
    corrupted = [world.corrupt(s, rng) for s in scenes]
    judged, wins, changed = [], [], []
    n_gen = len(scenes) if generate_n is None else min(generate_n, len(scenes))
    for sl in batch_slices(n_gen, batch_size):
        chunk = scenes[sl]
        seeds = [seed * 1_000_003 + i for i in range(sl.start, sl.stop)]
        right = b.generate([s.caption for s in chunk], seeds)
        wrong = b.generate([c.caption for c, _ in corrupted[sl]], seeds)
        judged += b.judge.predict(right)
        orig = b.clip_image(originals[sl])
        sim_right = (orig * b.clip_image(right)).sum(-1)
        sim_wrong = (orig * b.clip_image(wrong)).sum(-1)
        wins += (sim_right > sim_wrong).tolist()
        changed += [a for _, a in corrupted[sl]]
        if log:
            log(f"  generated {sl.stop}/{n_gen} ({time.time() - t0:.0f}s)")
    truth = [s.attributes for s in scenes[:n_gen]]
    gen_attr = {a: float(np.mean([p[a] == t[a] for p, t in zip(judged, truth)])) for a in world.ATTRIBUTES}
    by_attr = {
        a: float(np.mean([w for w, c in zip(wins, changed) if c == a]))
        for a in world.ATTRIBUTES
        if a in changed
    }
    return {
        "n": len(scenes),
        "n_generated": n_gen,
        "captioner_tuple_acc": cap["tuple_acc"],
        "captioner_attr_acc": cap["attr_acc"],
        "captioner_unparseable": cap["unparseable"],
        "generator_judge_tuple_acc": float(np.mean([p == t for p, t in zip(judged, truth)])),
        "generator_judge_attr_acc": gen_attr,
        "clip_zero_shot_tuple_acc": clip["tuple_acc"],
        "clip_zero_shot_attr_acc": clip["attr_acc"],
        "recon_discrimination": float(np.mean(wins)),
        "recon_discrimination_by_changed_attr": by_attr,
        "judge_tuple_acc_on_renders": judge_renders["tuple_acc"],
        "seconds": round(time.time() - t0, 1),
    }


@torch.no_grad()
def rerank_weak(b: Bundle, scenes: list[world.Scene], seed: int, k: int = 8) -> dict:
    """Weak captioner: k sampled captions per image, the one whose reconstruction is most CLIP-similar wins."""
    weak, processor = hub.load_captioner_model(b.weak_dir, b.device, torch.float32)
    chosen, first, oracle = [], [], []
    for i, scene in enumerate(scenes):
        pix = processor(images=[world.render(scene)], return_tensors="pt").pixel_values.to(b.device)
        torch.manual_seed(seed * 7_919 + i)
        out = weak.generate(
            pixel_values=pix, do_sample=True, top_p=0.9, num_return_sequences=k, max_new_tokens=24
        )
        captions = processor.batch_decode(out, skip_special_tokens=True)
        images = b.generate(captions, [seed * 1_000_003 + i] * k)
        orig = b.clip_image(to_tensor(world.render(scene)[None]).to(b.device))
        best = int((b.clip_image(images) @ orig.T).squeeze(-1).argmax())
        right = [world.parse_caption(c) == scene.attributes for c in captions]
        chosen.append(right[best])
        first.append(right[0])
        oracle.append(any(right))
    greedy = score_captions(
        processor.batch_decode(
            weak.generate(
                pixel_values=processor(
                    images=list(world.render_batch(scenes)), return_tensors="pt"
                ).pixel_values.to(b.device),
                max_new_tokens=24,
            ),
            skip_special_tokens=True,
        ),
        scenes,
    )
    return {
        "n": len(scenes),
        "k": k,
        "weak_greedy_tuple_acc": greedy["tuple_acc"],
        "random_sample_tuple_acc": float(np.mean(first)),
        "reranked_tuple_acc": float(np.mean(chosen)),
        "oracle_tuple_acc": float(np.mean(oracle)),
    }


def evaluate(
    n: int = 1000,
    seed: int = 0,
    bundle_dir: str | Path = hub.SHAPES_BUNDLE,
    device: str = "cpu",
    batch_size: int = 50,
    rerank: int = 0,
    generate_n: int | None = None,
    progress: bool = False,
) -> dict:
    """Evaluate the bundle on ``n`` test and ``n`` held-out-combination items; see the module docstring.

    ``generate_n`` limits the generation metrics (2 images per item) to the first items of each split: on a CPU
    1000 items take about 4000 diffusion samples.
    """
    dev = hub.resolve_device(device)
    log = (lambda m: print(m, flush=True)) if progress else None
    t0 = time.time()
    b = Bundle(bundle_dir, dev)
    result: dict = {
        "seed": seed,
        "bundle": str(bundle_dir),
        "bars": BARS,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "sampling": SAMPLING,
        "decoding": DECODING,
    }
    for split in ("test", "heldout"):
        if log:
            log(f"{split}: {n} items")
        result[split] = evaluate_split(
            b, world.sample_scenes(n, seed, split, EVAL_STREAM), seed, batch_size, generate_n, log
        )
    if rerank and b.weak_dir:
        result["weak_rerank"] = rerank_weak(
            b, world.sample_scenes(rerank, seed, "test", EVAL_STREAM + 1), seed
        )
    result["bars_met"] = all(result["test"][k] >= bar for k, bar in BARS.items())
    result["seconds"] = round(time.time() - t0, 1)
    return result
