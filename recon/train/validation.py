"""Validation during finetuning: caption metrics, reconstruction score, a sample grid.

On a fixed held-out batch (same images, same seeds at every validation, so numbers and grids compare over
steps): the captioner captions the originals (``validation.decoding``); the generator regenerates from those
captions (the reconstruction, scored against the original with ``validation.metric``) and from the reference
captions (the generator alone). Reported: the references' mean log-likelihood per caption (higher is better),
the reconstruction similarity, and the data's own scores (shapes: exact-attribute accuracy of the captions
and the judge's accuracy on images from the reference captions).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from recon.config import GeneratorConfig
from recon.data import tensor_to_pil
from recon.generators.diffusion import DiffusionGenerator
from recon.runs import derive_seed
from recon.train.config import ValidationConfig
from recon.train.data import Batch


def sample_grid(rows: list[torch.Tensor], n: int) -> torch.Tensor:
    """``[3, rows * H, n * W]``: one row per batch (originals, reconstructions, ...), ``n`` columns."""
    h, w = rows[0].shape[-2:]
    rows = [
        torch.nn.functional.interpolate(r[:n].float().cpu(), size=(h, w), mode="nearest")
        if r.shape[-2:] != (h, w)
        else r[:n].float().cpu()
        for r in rows
    ]
    return torch.cat([torch.cat(list(r), dim=-1) for r in rows], dim=-2).clamp(0, 1)


@dataclass
class Validation:
    metrics: dict[str, float]  # "val/<name>": value
    grid: (
        torch.Tensor
    )  # [3, 3 * H, n * W] in [0, 1]: originals / reconstructions / images from the references
    captions: list[str]  # the captioner's captions of the batch


@torch.no_grad()
def validate(
    captioner,
    pipe,
    generator_cfg: GeneratorConfig,
    batch: Batch,
    pairs,
    cfg: ValidationConfig,
    metric: torch.nn.Module,
    seed: int,
) -> Validation:
    """Caption and reconstruction metrics on ``batch``, with the sample grid; models are left in their modes."""
    captioner_mode, unet_mode = captioner.model.training, pipe.unet.training
    captioner.model.eval()
    pipe.unet.eval()
    try:
        pil = [tensor_to_pil(img) for img in batch.images]
        captions = [c[0] for c in captioner.caption(pil, num_candidates=1, decoding=cfg.decoding)]
        ref_ll = captioner.log_likelihood(pil, batch.captions)
        gen_cfg = dataclasses.replace(
            generator_cfg,
            num_inference_steps=cfg.num_inference_steps,
            guidance_scale=cfg.guidance_scale,
            images_per_caption=1,
        )
        generator = DiffusionGenerator(pipe, gen_cfg, batch_size=len(pil))
        seeds = [derive_seed(seed, f"val{i}", 0, 0) for i in range(len(pil))]
        recon = generator.generate(captions, seeds).images
        from_refs = generator.generate(batch.captions, seeds).images
        score = metric(batch.images.to(recon.dtype), recon).float()
    finally:
        captioner.model.train(captioner_mode)
        pipe.unet.train(unet_mode)
    metrics = {
        "ref_log_likelihood": float(ref_ll.mean()),
        f"recon_{metric.name}": float(score.mean()),
        **pairs.score_captions(captions, batch),
        **pairs.score_images(from_refs, batch),
    }
    grid = sample_grid([batch.images, recon, from_refs], cfg.grid_items)
    return Validation({f"val/{k}": v for k, v in metrics.items()}, grid, captions)
