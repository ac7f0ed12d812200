"""Generator backends: a preset's ``generator.backend`` string -> class (one plain dict, no registry)."""

from __future__ import annotations

import torch

from recon.config import GeneratorConfig
from recon.generators.base import Generation, Generator
from recon.generators.diffusion import DiffusionGenerator

BACKENDS = {"diffusion": DiffusionGenerator}


def load_generator(cfg: GeneratorConfig, device: torch.device, batch_size: int = 1) -> Generator:
    if cfg.backend not in BACKENDS:
        raise ValueError(f"generator.backend={cfg.backend!r} is unknown; choose one of {sorted(BACKENDS)}")
    return BACKENDS[cfg.backend].from_config(cfg, device, batch_size=batch_size)


__all__ = ["BACKENDS", "DiffusionGenerator", "Generation", "Generator", "load_generator"]
