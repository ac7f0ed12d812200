"""The captioner role: images in, candidate captions out; and the likelihood of given texts."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from PIL import Image

from recon import hub
from recon.config import DecodingConfig

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- shared by the backends
IGNORE_INDEX = -100  # label value of positions that are not scored (prompt, image tokens, padding)


def generation_kwargs(decoding: DecodingConfig, num_candidates: int) -> dict:
    """``generate`` keyword arguments for a decoding config; beam width is raised to ``num_candidates`` if lower."""
    n = int(num_candidates)
    if n < 1:
        raise ValueError(f"num_candidates must be >= 1, got {n}")
    if decoding.min_new_tokens > decoding.max_new_tokens:
        raise ValueError(
            f"decoding.min_new_tokens={decoding.min_new_tokens} exceeds "
            f"decoding.max_new_tokens={decoding.max_new_tokens}"
        )
    common = dict(
        min_new_tokens=decoding.min_new_tokens,
        max_new_tokens=decoding.max_new_tokens,
        repetition_penalty=decoding.repetition_penalty,
        num_return_sequences=n,
    )
    if decoding.method == "greedy":
        if n > 1:
            raise ValueError(
                f"decoding.method=greedy yields one caption per image, but num_candidates={n}; "
                "use decoding.method=beam or nucleus for several candidates"
            )
        return dict(common, do_sample=False, num_beams=1)
    if decoding.method == "beam":
        return dict(common, do_sample=False, num_beams=max(decoding.num_beams, n))
    if decoding.method == "nucleus":
        return dict(
            common,
            do_sample=True,
            num_beams=1,
            top_p=decoding.top_p,
            top_k=decoding.top_k,
            temperature=decoding.temperature,
        )
    raise ValueError(f"decoding.method={decoding.method!r}: expected greedy, beam or nucleus")


def sequence_log_prob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-probability per sequence: ``logits [B, T, V]``, ``labels [B, T]`` (``-100`` = not scored) -> ``[B]``.

    Computed in float32; differentiable. ``-sequence_log_prob`` is the captioning NLL.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    mask = labels != IGNORE_INDEX
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device):
    """Seed torch's generators for one block and restore the caller's RNG state afterwards."""
    devices = list(range(torch.cuda.device_count())) if device.type == "cuda" else []  # manual_seed seeds all
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading token ids ``a`` and ``b`` share (where a prompt ends inside a tokenized caption)."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def pad_right(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows right-padded with ``pad_id`` into ``(ids, attention mask)``, both ``[len(rows), longest]``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


@runtime_checkable
class Captioner(Protocol):
    """A captioning model.

    ``caption`` returns, per image, ``num_candidates`` captions (prompt stripped). Sampling methods are seeded
    per image from ``seeds`` so that any single image's captions are reproducible alone.
    ``log_likelihood`` returns a float tensor ``[B]``: the summed log-probability of each text given its image
    (higher is more likely), prompt tokens excluded.
    """

    model_id: str

    def caption(
        self,
        images: Sequence[Image.Image],
        num_candidates: int = 1,
        decoding: DecodingConfig | None = None,
        seeds: Sequence[int] | None = None,
    ) -> list[list[str]]: ...

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

    def teacher_forced_logits(
        self, pixel_values: torch.Tensor, texts: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def with_lora(self, add_lora: Callable[[torch.nn.Module], torch.nn.Module]) -> TrainableCaptioner:
        """The captioner with ``add_lora(model)`` as its model: a fresh LoRA on top of the loaded weights (a loaded
        ``cfg.adapter`` merged into them first where the backend can)."""
        ...


def warn_if_other_base(adapter_dir: str, model_id: str) -> None:
    """Warn when a peft adapter records another base model (``base_model_name_or_path``) than ``captioner.model``:
    LoRA weights of one captioner load onto another of the same shapes without an error, and caption badly."""
    try:
        base = json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get(
            "base_model_name_or_path"
        )
    except (OSError, ValueError, AttributeError):
        return
    if not base or base == model_id:
        return
    try:
        same = Path(hub.resolve(base)).resolve() == Path(hub.resolve(model_id)).resolve()
    except Exception:  # noqa: BLE001 - a base that cannot be resolved here is simply another one
        same = False
    if not same:
        log.warning(
            "captioner.adapter %s was trained on %s, but captioner.model is %s: its weights may not fit "
            "this captioner; pass --set captioner.model=%s to use it as trained",
            adapter_dir,
            base,
            model_id,
            base,
        )
