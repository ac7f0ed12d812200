"""Stable Diffusion (diffusers) as the generator role."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from recon import hub
from recon.config import GeneratorConfig, truncation_warning
from recon.generators.base import Generation


class DiffusionGenerator:
    """A ``StableDiffusionPipeline`` called with one ``torch.Generator`` per image.

    Generators live on the CPU whatever the device, so a seed gives the same initial noise on every machine.
    Prompts are sent to the pipeline in chunks of ``batch_size``. Batched kernels round differently with the
    batch size and even with an image's position in the batch (measured: ~1e-6, enough to flip PNG bytes, even
    with a fixed padded batch shape), so bitwise reproducibility of one image needs the same chunk layout:
    the Reconstructor therefore batches one item's images together (see ``Reconstructor.render``).
    Output: float32 ``[B, 3, H, W]`` in [0, 1] on the CPU.

    Prompts past the text encoder's context (77 tokens for SD) are truncated by the pipeline unless
    ``generator.long_prompts: chunk``: then such a prompt is encoded in context-sized chunks (see
    :func:`encode_long_prompts`) and passed as ``prompt_embeds``. Prompts that fit take the pipeline's own path in
    both modes, so their images are the same bit for bit. In chunk mode the prompts of one batch are sent to the
    pipeline in groups of equal chunk count (a long prompt's neighbours run in a smaller batch).
    """

    def __init__(self, pipe, cfg: GeneratorConfig, model_id: str = "", batch_size: int = 1):
        self.pipe = pipe
        self.cfg = cfg
        self.model_id = model_id or cfg.model
        self.batch_size = max(1, int(batch_size))

    @classmethod
    def from_config(
        cls, cfg: GeneratorConfig, device: torch.device, batch_size: int = 1
    ) -> DiffusionGenerator:
        dtype = hub.resolve_dtype(cfg.dtype, device)
        pipe = hub.load_diffusion_pipeline(
            cfg.model,
            device,
            dtype,
            scheduler=cfg.scheduler,
            safety_checker=cfg.safety_checker,
            lora=cfg.lora,
            field="generator.model",
        )
        return cls(pipe, cfg, batch_size=batch_size)

    @property
    def max_prompt_tokens(self) -> int:
        return int(self.pipe.tokenizer.model_max_length)

    def prompt_tokens(self, prompt: str) -> int:
        """Tokens of ``prompt`` with BOS and EOS, untruncated."""
        return len(self.pipe.tokenizer(prompt, truncation=False, verbose=False).input_ids)

    def prompt_chunks(self, prompt: str) -> int:
        """Context-sized chunks ``prompt`` takes in chunk mode (1 when it fits)."""
        return chunk_count(self.prompt_tokens(prompt), self.max_prompt_tokens)

    def prompt_warnings(self, prompt: str) -> list[str]:
        """The pipeline truncates silently at the text encoder's limit; we record it per prompt, with the mode."""
        n, limit = self.prompt_tokens(prompt), self.max_prompt_tokens
        if n <= limit:
            return []
        if self.cfg.long_prompts == "chunk":
            return [
                f"caption of {n} tokens encoded in {chunk_count(n, limit)} chunks of {limit} tokens "
                "(generator.long_prompts=chunk)"
            ]
        return [truncation_warning(n, limit, "text encoder limit; generator.long_prompts=truncate")]

    def generate(
        self, prompts: Sequence[str], seeds: Sequence[int], on_progress: Callable[[float], None] | None = None
    ) -> Generation:
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        images: list[torch.Tensor | None] = [None] * len(prompts)
        flagged = [False] * len(prompts)
        for start in range(0, len(prompts), self.batch_size):
            for group in self._groups(range(start, min(start + self.batch_size, len(prompts))), prompts):
                out = self._call([prompts[i] for i in group], [seeds[i] for i in group], on_progress)
                for j, i in enumerate(group):
                    images[i], flagged[i] = out.images[j], out.flagged[j]
        return Generation(
            images=torch.stack(images) if images else torch.zeros(0, 3, 0, 0),
            flagged=flagged,
            warnings=[self.prompt_warnings(p) for p in prompts],
        )

    def _groups(self, indices: range, prompts: Sequence[str]) -> list[list[int]]:
        """One group (the whole batch) unless chunk mode meets a long prompt: then one group per chunk count."""
        if self.cfg.long_prompts != "chunk":
            return [list(indices)]
        negative = self.prompt_chunks(self.cfg.negative_prompt) if self.cfg.negative_prompt else 1
        by_chunks: dict[int, list[int]] = {}
        for i in indices:
            by_chunks.setdefault(max(self.prompt_chunks(prompts[i]), negative), []).append(i)
        return list(by_chunks.values())

    @torch.inference_mode()
    def _call(
        self, prompts: list[str], seeds: list[int], on_progress: Callable[[float], None] | None = None
    ) -> Generation:
        cfg = self.cfg
        step_callback = {}
        if (
            on_progress is not None
        ):  # the batch's images, a denoising step's share at a time (latents untouched)
            share = len(prompts) / cfg.num_inference_steps

            def on_step_end(pipe, step, timestep, kwargs):
                on_progress(share)
                return kwargs

            step_callback = {"callback_on_step_end": on_step_end, "callback_on_step_end_tensor_inputs": []}
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        negative = [cfg.negative_prompt] * len(prompts) if cfg.negative_prompt else None
        chunks = (
            max(self.prompt_chunks(p) for p in prompts + (negative or []))
            if cfg.long_prompts == "chunk"
            else 1
        )
        if chunks > 1:
            pipe, device = self.pipe, self.pipe._execution_device
            text = {
                "prompt_embeds": encode_long_prompts(
                    pipe.tokenizer, pipe.text_encoder, prompts, chunks, device
                )
            }
            if (
                cfg.guidance_scale > 1
            ):  # the pipeline would encode "" at our sequence length in one pass: it can't
                text["negative_prompt_embeds"] = encode_long_prompts(
                    pipe.tokenizer, pipe.text_encoder, negative or [""] * len(prompts), chunks, device
                )
        else:
            text = {"prompt": list(prompts), "negative_prompt": negative}
        out = self.pipe(
            **text,
            num_inference_steps=cfg.num_inference_steps,
            guidance_scale=cfg.guidance_scale,
            height=cfg.height,
            width=cfg.width,
            generator=generators,
            output_type="pt",
            **step_callback,
        )
        flagged = out.nsfw_content_detected or [False] * len(prompts)
        return Generation(images=out.images.float().cpu(), flagged=[bool(f) for f in flagged])


def chunk_count(n_tokens: int, context: int) -> int:
    """Chunks of ``context`` tokens (BOS + ``context - 2`` tokens + EOS each) for a text of ``n_tokens``
    tokens counted with its BOS and EOS."""
    return max(1, math.ceil((n_tokens - 2) / (context - 2)))


def chunk_token_ids(
    tokenizer, text: str, chunks: int | None = None
) -> tuple[list[list[int]], list[list[int]]]:
    """``text`` as context-sized rows of token ids and their attention masks: its tokens split every
    ``context - 2`` at token boundaries, each row ``[BOS, tokens..., EOS, pad...]`` of the tokenizer's
    ``model_max_length``. The first row of a text that fits equals the tokenizer's own ``padding="max_length"``
    output. ``chunks``: pad with empty rows (``[BOS, EOS, pad...]``, the encoding of "") up to that many."""
    context = int(tokenizer.model_max_length)
    body = tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids
    pieces = [body[i : i + context - 2] for i in range(0, len(body), context - 2)] or [[]]
    if chunks is not None:
        if len(pieces) > chunks:
            raise ValueError(f"text of {len(body)} tokens needs {len(pieces)} chunks, more than {chunks}")
        pieces += [[] for _ in range(chunks - len(pieces))]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows, masks = [], []
    for piece in pieces:
        row = [tokenizer.bos_token_id, *piece, tokenizer.eos_token_id]
        rows.append(row + [pad] * (context - len(row)))
        masks.append([1] * len(row) + [0] * (context - len(row)))
    return rows, masks


def encode_long_prompts(
    tokenizer, text_encoder, prompts: Sequence[str], chunks: int, device: torch.device | str
) -> torch.Tensor:
    """``[B, chunks * context, D]``: each prompt's chunks (:func:`chunk_token_ids`, padded to ``chunks`` with the
    encoding of "") through the text encoder separately, last hidden states concatenated along the sequence axis,
    as the known long-prompt methods for Stable Diffusion do. One chunk equals the pipeline's own ``encode_prompt``."""
    rows = [chunk_token_ids(tokenizer, p, chunks) for p in prompts]
    ids = torch.tensor([r[0] for r in rows])  # [B, chunks, context]
    b, n, context = ids.shape
    mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):  # as encode_prompt passes it
        mask = torch.tensor([r[1] for r in rows]).reshape(b * n, context).to(device)
    hidden = text_encoder(ids.reshape(b * n, context).to(device), attention_mask=mask)[0]
    return hidden.reshape(b, n * context, -1).to(dtype=text_encoder.dtype, device=device)
