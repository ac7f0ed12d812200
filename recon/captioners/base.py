"""The captioner role: images in, candidate captions out; and the likelihood of given texts."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from PIL import Image

from recon import hub
from recon.config import DecodingConfig

log = logging.getLogger(__name__)


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


def warn_if_other_base(adapter_dir: str, model_id: str) -> None:
    """Warn when a peft adapter records another base model (``base_model_name_or_path``) than ``captioner.model``:
    LoRA weights of one captioner load onto another of the same shapes without an error, and caption badly."""
    try:
        base = json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return
    if not base or base == model_id:
        return
    try:
        same = Path(hub.resolve(base)).resolve() == Path(hub.resolve(model_id)).resolve()
    except Exception:  # noqa: BLE001 - a base that cannot be resolved here is simply another one
        same = False
    if not same:
        log.warning("captioner.adapter %s was trained on %s, but captioner.model is %s: its weights may not fit "
                    "this captioner; pass --set captioner.model=%s to use it as trained", adapter_dir, base, model_id,
                    base)
