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


@runtime_checkable
class TrainableCaptioner(Captioner, Protocol):
    """What joint finetuning (recon.train) needs of a captioner beyond captioning.

    ``model``: the ``nn.Module`` LoRA is added to (and trained); ``tokenizer``: its vocabulary, which the soft-token
    bridge maps onto the generator's; ``end_token_id``: the token that ends a caption (excluded from the soft
    caption); ``preprocess_tensor``: ``[B, 3, H, W]`` in [0, 1] -> the model's pixel input, differentiable;
    ``teacher_forced_logits``: (pixels, texts) -> ``logits [B, T, V]`` predicting ``labels [B, T]`` (-100 where
    not scored), differentiable in pixels and weights.
    """

    model: torch.nn.Module
    tokenizer: object

    @property
    def end_token_id(self) -> int | None: ...

    def preprocess_tensor(self, images: torch.Tensor) -> torch.Tensor: ...

    def teacher_forced_logits(self, pixel_values: torch.Tensor, texts: Sequence[str]
                              ) -> tuple[torch.Tensor, torch.Tensor]: ...
