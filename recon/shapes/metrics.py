"""Measurements against the world's ground truth, shared by training validation and ``recon shapes eval``.

Images are ``(n, 3, 32, 32)`` floats in [0, 1]; every accuracy is a fraction of items (higher is better), with a
tuple counted right only when all five attributes are.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from recon.shapes import world


def render_batch(
    seed: int, split: str, stream: int, n: int, device: str | torch.device = "cpu"
) -> tuple[list[world.Scene], torch.Tensor]:
    """Scenes and their images as ``(n, 3, 32, 32)`` float in [0, 1]."""
    scenes = world.sample_scenes(n, seed, split, stream)
    return scenes, to_tensor(world.render_batch(scenes)).to(device)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0)


@torch.no_grad()
def vae_round_trip(vae, images: torch.Tensor) -> torch.Tensor:
    """Encode (latent mode) and decode ``images`` in [0, 1]; the result is in [0, 1]."""
    return (vae.decode(vae.encode(images * 2 - 1).latent_dist.mode()).sample.clamp(-1, 1) + 1) / 2


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    return (x - torch.tensor(mean, device=x.device).view(1, 3, 1, 1)) / torch.tensor(
        std, device=x.device
    ).view(1, 3, 1, 1)


def captioner_accuracy(model, processor, scenes: list[world.Scene], batch: int = 128, **gen) -> dict:
    """Greedy (or ``gen``) decoding of rendered scenes; tuple and per-attribute accuracy, unparseable rate."""
    captions = []
    for i in range(0, len(scenes), batch):
        chunk = scenes[i : i + batch]
        pix = processor(images=list(world.render_batch(chunk)), return_tensors="pt").pixel_values.to(
            model.device
        )
        with torch.no_grad():
            out = model.generate(pixel_values=pix, max_new_tokens=20, **gen)
        captions += processor.batch_decode(out, skip_special_tokens=True)
    return score_captions(captions, scenes)


def score_captions(captions: list[str], scenes: list[world.Scene]) -> dict:
    parsed = [world.parse_caption(c) for c in captions]
    truth = [s.attributes for s in scenes]
    attr = {a: float(np.mean([p[a] == t[a] for p, t in zip(parsed, truth)])) for a in world.ATTRIBUTES}
    return {
        "tuple_acc": float(np.mean([p == t for p, t in zip(parsed, truth)])),
        "attr_acc": attr,
        "unparseable": float(np.mean([not world.is_parseable(p) for p in parsed])),
    }


def class_prompts() -> tuple[list[tuple[str, ...]], list[list[str]]]:
    """Every combination and its captions under every template (zero-shot classes, prompt-ensembled)."""
    combos = list(world.ALL_COMBOS)
    return combos, [
        [world.caption_for(dict(zip(world.ATTRIBUTES, c)), t) for t in range(len(world.TEMPLATES))]
        for c in combos
    ]


@torch.no_grad()
def clip_class_embeddings(model, tokenizer) -> torch.Tensor:
    combos, prompts = class_prompts()
    flat = [p for ps in prompts for p in ps]
    dev = next(model.parameters()).device
    emb = torch.cat(
        [
            model.encode_text(tokenizer(flat[i : i + 512]).to(dev), normalize=True)
            for i in range(0, len(flat), 512)
        ]
    )
    emb = emb.view(len(combos), len(world.TEMPLATES), -1).mean(1)
    return F.normalize(emb, dim=-1)


def clip_zero_shot(model, tokenizer, images: torch.Tensor, scenes: list[world.Scene], mean, std) -> dict:
    combos, _ = class_prompts()
    classes = clip_class_embeddings(model, tokenizer)
    with torch.no_grad():
        img = model.encode_image(normalize(images, mean, std), normalize=True)
    pred = [combos[i] for i in (img @ classes.T).argmax(-1).tolist()]
    truth = [s.combo for s in scenes]
    attr = {
        a: float(np.mean([p[j] == t[j] for p, t in zip(pred, truth)])) for j, a in enumerate(world.ATTRIBUTES)
    }
    return {"tuple_acc": float(np.mean([p == t for p, t in zip(pred, truth)])), "attr_acc": attr}


def judge_accuracy(judge, images: torch.Tensor, scenes: list[world.Scene]) -> dict:
    pred = judge.predict(images)
    truth = [s.attributes for s in scenes]
    attr = {a: float(np.mean([p[a] == t[a] for p, t in zip(pred, truth)])) for a in world.ATTRIBUTES}
    return {"tuple_acc": float(np.mean([p == t for p, t in zip(pred, truth)])), "attr_acc": attr}
