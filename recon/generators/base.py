"""The generator role: captions in, images out, one seed per image."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch


@dataclass
class Generation:
    """``images``: float32 ``[B, 3, H, W]`` in [0, 1] on the CPU; ``flagged[i]``: the safety checker flagged image i;
    ``warnings[i]``: per-prompt notes (e.g. truncated to the text encoder's token limit)."""

    images: torch.Tensor
    flagged: list[bool] = field(default_factory=list)
    warnings: list[list[str]] = field(default_factory=list)


@runtime_checkable
class Generator(Protocol):
    model_id: str

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> Generation:
        """Image i is generated from ``prompts[i]`` with a ``torch.Generator`` seeded with ``seeds[i]``."""
        ...
