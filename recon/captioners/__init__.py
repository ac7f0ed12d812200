"""Captioner backends: a preset's ``captioner.backend`` string -> class (one plain dict, no registry)."""

from __future__ import annotations

import torch

from recon.captioners.base import Captioner
from recon.captioners.blip import BlipCaptioner
from recon.captioners.flamingo import FlamingoCaptioner
from recon.config import CaptionerConfig, ConfigError

BACKENDS = {"blip": BlipCaptioner, "flamingo": FlamingoCaptioner}  # "blip": BLIP and BLIP-2 alike


def load_captioner(
    cfg: CaptionerConfig, device: torch.device | str = "auto", batch_size: int = 8
) -> Captioner:
    if cfg.backend not in BACKENDS:
        raise ConfigError(f"captioner.backend={cfg.backend!r} is unknown; choose one of {sorted(BACKENDS)}")
    return BACKENDS[cfg.backend].from_config(cfg, device, batch_size=batch_size)


__all__ = ["BACKENDS", "BlipCaptioner", "Captioner", "load_captioner"]
