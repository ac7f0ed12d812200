"""Stable Diffusion (diffusers) as the generator role."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from recon import hub
from recon.config import GeneratorConfig
from recon.generators.base import Generation


class DiffusionGenerator:
    """A ``StableDiffusionPipeline`` called with one ``torch.Generator`` per image.

    Generators live on the CPU whatever the device, so a seed gives the same initial noise on every machine.
    Prompts are sent to the pipeline in chunks of ``batch_size``. Batched kernels round differently with the
    batch size and even with an image's position in the batch (measured: ~1e-6, enough to flip PNG bytes, even
    with a fixed padded batch shape), so bitwise reproducibility of one image needs the same chunk layout:
    the Reconstructor therefore batches one item's images together (see ``Reconstructor.render``).
    Output: float32 ``[B, 3, H, W]`` in [0, 1] on the CPU.
    """

    def __init__(self, pipe, cfg: GeneratorConfig, model_id: str = "", batch_size: int = 1):
        self.pipe = pipe
        self.cfg = cfg
        self.model_id = model_id or cfg.model
        self.batch_size = max(1, int(batch_size))

    @classmethod
    def from_config(cls, cfg: GeneratorConfig, device: torch.device, batch_size: int = 1) -> DiffusionGenerator:
        dtype = hub.resolve_dtype(cfg.dtype, device)
        pipe = hub.load_diffusion_pipeline(cfg.model, device, dtype, scheduler=cfg.scheduler,
                                           safety_checker=cfg.safety_checker, lora=cfg.lora, field="generator.model")
        return cls(pipe, cfg, batch_size=batch_size)

    @property
    def max_prompt_tokens(self) -> int:
        return int(self.pipe.tokenizer.model_max_length)

    def prompt_warnings(self, prompt: str) -> list[str]:
        """The pipeline truncates silently at the text encoder's limit; we record it per prompt."""
        n = len(self.pipe.tokenizer(prompt, truncation=False).input_ids)
        if n > self.max_prompt_tokens:
            return [f"caption truncated from {n} to {self.max_prompt_tokens} tokens (text encoder limit)"]
        return []

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> Generation:
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        images, flagged = [], []
        for start in range(0, len(prompts), self.batch_size):
            out = self._call(list(prompts[start:start + self.batch_size]), list(seeds[start:start + self.batch_size]))
            images.append(out.images)
            flagged += out.flagged
        return Generation(images=torch.cat(images), flagged=flagged,
                          warnings=[self.prompt_warnings(p) for p in prompts])

    @torch.inference_mode()
    def _call(self, prompts: list[str], seeds: list[int]) -> Generation:
        cfg = self.cfg
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        out = self.pipe(
            prompt=list(prompts),
            negative_prompt=[cfg.negative_prompt] * len(prompts) if cfg.negative_prompt else None,
            num_inference_steps=cfg.num_inference_steps,
            guidance_scale=cfg.guidance_scale,
            height=cfg.height,
            width=cfg.width,
            generator=generators,
            output_type="pt",
        )
        flagged = out.nsfw_content_detected or [False] * len(prompts)
        return Generation(images=out.images.float().cpu(), flagged=[bool(f) for f in flagged])
