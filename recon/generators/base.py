"""The generator role: captions in, images out, one seed per image."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch


@dataclass
class Generation:
    """``images``: float32 ``[B, 3, H, W]`` in [0, 1] on the CPU; ``flagged[i]``: the safety checker flagged image i;
    ``warnings[i]``: per-prompt notes (e.g. truncated to the text encoder's token limit: the wording of
    :func:`recon.config.truncation_warning`, which tables count; or encoded in chunks)."""

    images: torch.Tensor
    flagged: list[bool] = field(default_factory=list)
    warnings: list[list[str]] = field(default_factory=list)


@runtime_checkable
class Generator(Protocol):
    model_id: str

    def generate(
        self, prompts: Sequence[str], seeds: Sequence[int], on_progress: Callable[[float], None] | None = None
    ) -> Generation:
        """Image i is generated from ``prompts[i]`` with a ``torch.Generator`` seeded with ``seeds[i]``;
        ``on_progress(n)``: n more images' worth of work is done (fractions while sampling), for progress bars."""
        ...
