"""The captioner role: images in, candidate captions out; and the likelihood of given texts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from PIL import Image

from recon.config import DecodingConfig


@runtime_checkable
class Captioner(Protocol):
    """A captioning model.

    ``caption`` returns, per image, ``num_candidates`` captions (prompt stripped). Sampling methods are seeded
    per image from ``seeds`` so that any single image's captions are reproducible alone.
    ``log_likelihood`` returns a float tensor ``[B]``: the summed log-probability of each text given its image
    (higher is more likely), prompt tokens excluded.
    """

    model_id: str

    def caption(self, images: Sequence[Image.Image], num_candidates: int = 1,
                decoding: DecodingConfig | None = None, seeds: Sequence[int] | None = None) -> list[list[str]]: ...

    def log_likelihood(self, images: Sequence[Image.Image], texts: Sequence[str]) -> torch.Tensor: ...
