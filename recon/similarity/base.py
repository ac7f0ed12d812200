"""The similarity role: an ``nn.Module`` comparing two batches sample by sample.

Every similarity takes two batches (image tensors ``[B, 3, H, W]`` in [0, 1], or two lists of strings) and
returns a float tensor ``[B]``. ``name`` is its result key and says the direction in words (``*_similarity``:
higher is more similar; ``*_distance``: lower is more similar); ``higher_is_better`` says it to code. Forward is
differentiable where the model is: there is no ``no_grad`` inside, callers wrap pure inference themselves.
Metric modules stay in eval mode (``.train()`` is a no-op), so a training loop holding one as a loss never turns
on its dropout.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from recon import hub
from recon.config import MetricConfig
from recon.preprocess import broadcast_batch


def as_device(device: torch.device | str) -> torch.device:
    return device if isinstance(device, torch.device) else hub.resolve_device(str(device))


def freeze(module: nn.Module) -> nn.Module:
    """Metric weights never train; the inputs still receive gradients."""
    return module.requires_grad_(False).eval()


class Similarity(nn.Module):
    """Base of all similarities: ``forward(a, b) -> [B]``; see the module docstring for the contract."""

    name: str = ""  # result key; an instance may override it (MetricConfig.name)
    higher_is_better: bool = True

    def __init__(self, name: str | None = None):
        super().__init__()
        if name:
            self.name = name

    @classmethod
    def from_config(cls, cfg: MetricConfig, device: torch.device | str = "cpu", where: str = "metric"):
        """Load the metric's model through recon.hub; ``where`` (``similarity.image.0``) prefixes errors."""
        raise NotImplementedError

    def train(self, mode: bool = True):
        return super().train(False)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, higher_is_better={self.higher_is_better}"


class EmbeddingSimilarity(Similarity):
    """Cosine of L2-normalised embeddings: in [-1, 1], 1 for identical inputs, higher is more similar.

    ``encode`` embeds a batch once, so one original can be compared with many candidates through
    ``similarity_to(ref_embeds, inputs)`` without re-embedding it.
    """

    def encode(self, inputs: Any) -> torch.Tensor:
        """``[B, D]`` unit-norm embeddings."""
        raise NotImplementedError

    @staticmethod
    def cosine(embeds_a: torch.Tensor, embeds_b: torch.Tensor) -> torch.Tensor:
        """Row-wise dot product of unit vectors ``[B or 1, D]`` x ``[B or 1, D]`` -> ``[B]`` (float32)."""
        embeds_a, embeds_b = broadcast_batch(embeds_a, embeds_b)
        return (embeds_a.float() * embeds_b.float()).sum(-1)

    def similarity_to(self, ref_embeds: torch.Tensor, inputs: Any) -> torch.Tensor:
        """Cosine between precomputed ``encode`` output ``[B or 1, D]`` and ``inputs`` -> ``[B]``."""
        return self.cosine(ref_embeds.to(self.device_of()), self.encode(inputs))

    def forward(self, inputs_a: Any, inputs_b: Any) -> torch.Tensor:
        return self.cosine(self.encode(inputs_a), self.encode(inputs_b))

    def device_of(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")


def check_texts(texts_a: Sequence[str], texts_b: Sequence[str]) -> None:
    for texts in (texts_a, texts_b):
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("text similarities take two lists of strings")
    if len(texts_a) != len(texts_b) and 1 not in (len(texts_a), len(texts_b)):
        raise ValueError(
            f"text batches differ in length: {len(texts_a)} vs {len(texts_b)} (or one must be 1)"
        )
