"""Measure the scenes bundle against exact ground truth: ``recon scenes eval``.

Two splits of ``n`` scenes of 1-4 objects, rendered from ``seed`` (stream 1: never a training or validation
batch): ``test`` (type pairs seen in training) and ``heldout`` (every scene holds a pair of object types never seen
together in training; 2-4 objects). Per split:

* ``captioner_exact`` / ``captioner_object_f1``: the captioner's caption (beam 3, as the preset decodes) parsed by
  :func:`recon.shapes.scenes.parse_caption` and compared with the scene exactly;
* ``generator_exact``: images generated from each scene's ``detailed`` caption (DDIM 20 steps, guidance 5), read
  cell by cell by the judge, equal to the scene (background, every cell); also by number of objects;
* ``clip_single_attribute`` / ``clip_binding_swap`` / ``clip_relation_swap``: how often the CLIP scores the true
  ``detailed`` caption above an altered one (:func:`recon.shapes.scenes_judgments.alter`) -- the premise of the
  swap experiment: a gap between single errors and swaps is the bag-of-words behaviour;
* ``judge_exact_on_renders``: the judge's own accuracy (the ceiling of every generator number).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from recon import hub
from recon.shapes import scenes as S
from recon.shapes.evaluate import batch_slices
from recon.shapes.metrics import normalize, to_tensor
from recon.shapes.scenes_judgments import alter
from recon.shapes.scenes_train import generate, load_judge, render_scenes

BARS = {
    "captioner_exact": 0.8,
    "generator_exact": 0.4,
    "clip_single_attribute": 0.9,
    "judge_exact_on_renders": 0.99,
}
EVAL_STREAM = 1
DECODING = dict(num_beams=3, min_new_tokens=3, max_new_tokens=44)  # scenes_train.CAPTIONER_MAX_NEW_TOKENS
SAMPLING = dict(num_inference_steps=20, guidance_scale=5.0)


@torch.no_grad()
def captioner_scores(
    bundle: Path, scenes: list[S.Scene], device: torch.device, part: str = "captioner", batch: int = 64
) -> dict:
    model, processor = hub.load_captioner_model(str(bundle / part), device, torch.float32)
    captions = []
    for sl in batch_slices(len(scenes), batch):
        pix = processor(images=list(S.render_batch(scenes[sl])), return_tensors="pt").pixel_values.to(device)
        captions += processor.batch_decode(
            model.generate(pixel_values=pix, **DECODING), skip_special_tokens=True
        )
    scores = [S.score_claims(S.parse_caption(c), s) for c, s in zip(captions, scenes)]
    return {
        "exact": float(np.mean([s["exact"] for s in scores])),
        "object_f1": float(np.mean([s["object_f1"] for s in scores])),
        "examples": captions[:4],
    }


@torch.no_grad()
def generator_scores(
    bundle: Path, scenes: list[S.Scene], seed: int, device: torch.device, judge, batch: int = 50
) -> dict:
    pipe = hub.load_diffusion_pipeline(str(bundle / "generator"), device, torch.float32)
    pipe.set_progress_bar_config(disable=True)
    prompts = [S.caption_for(s, "detailed") for s in scenes]
    images = torch.cat(
        [
            generate(
                pipe,
                prompts[sl],
                [seed * 100_003 + i for i in range(sl.start, sl.stop)],
                SAMPLING["num_inference_steps"],
                SAMPLING["guidance_scale"],
            )
            for sl in batch_slices(len(scenes), batch)
        ]
    )
    exact = np.array(
        [S.exact_match(S.claims_of(t, "detailed"), j) for t, j in zip(scenes, judge.predict(images))]
    )
    counts = np.array([len(s.objects) for s in scenes])
    return {
        "exact": float(exact.mean()),
        "exact_by_objects": {int(k): float(exact[counts == k].mean()) for k in sorted(set(counts.tolist()))},
    }


@torch.no_grad()
def clip_scores(bundle: Path, scenes: list[S.Scene], seed: int, device: torch.device) -> dict:
    clip, pre, tokenizer = hub.load_open_clip(str(bundle / "clip"), None, device)
    rng = np.random.default_rng([seed, 77])
    out = {}
    for category in ("single-attribute", "binding-swap", "relation-swap"):
        pairs = [(s, a) for s in scenes if len(s.objects) >= 2 and (a := alter(s, category, rng)) is not None]
        x = to_tensor(S.render_batch([s for s, _ in pairs])).to(device)
        img = clip.encode_image(normalize(x, pre["mean"], pre["std"]), normalize=True)
        true = clip.encode_text(
            tokenizer([S.caption_for(s, "detailed") for s, _ in pairs]).to(device), normalize=True
        )
        wrong = clip.encode_text(tokenizer([a.caption for _, a in pairs]).to(device), normalize=True)
        st, sw = (img * true).sum(1), (img * wrong).sum(1)
        out[category.replace("-", "_")] = float(((st > sw).float() + 0.5 * (st == sw).float()).mean())
    return out


def evaluate(
    n: int, seed: int, bundle: str | Path, device: str = "cpu", generate_n: int | None = None
) -> dict:
    bundle, dev = Path(bundle), torch.device(device)
    judge = load_judge(bundle / "judge").to(dev)
    result: dict = {
        "n": n,
        "seed": seed,
        "device": device,
        "decoding": DECODING,
        "sampling": SAMPLING,
        "bars": BARS,
    }
    for split, objects in (("test", (1, 2, 3, 4)), ("heldout", (2, 3, 4))):
        scenes, x = render_scenes(seed, split, EVAL_STREAM, n, n_objects=objects)
        r = {
            "judge_exact_on_renders": float(
                np.mean(
                    [
                        S.exact_match(S.claims_of(t, "detailed"), j)
                        for t, j in zip(scenes, judge.predict(x.to(dev)))
                    ]
                )
            )
        }
        cap = captioner_scores(bundle, scenes, dev)
        r |= {
            "captioner_exact": cap["exact"],
            "captioner_object_f1": cap["object_f1"],
            "captioner_examples": cap["examples"],
        }
        if (bundle / "captioner_weak").is_dir():
            weak = captioner_scores(bundle, scenes, dev, "captioner_weak")
            r |= {"weak_captioner_exact": weak["exact"]}
        gen = generator_scores(bundle, scenes[:generate_n], seed, dev, judge)
        r |= {"generator_exact": gen["exact"], "generator_exact_by_objects": gen["exact_by_objects"]}
        r |= {f"clip_{k}": v for k, v in clip_scores(bundle, scenes, seed, dev).items()}
        result[split] = r
    return result
