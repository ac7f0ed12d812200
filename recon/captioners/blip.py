"""BLIP and BLIP-2 (transformers) as the captioner role.

Captions come from the model's own ``generate`` fed by its own processor, so a caption equals a bare
``model.generate(**processor(images=..., text=[prompt] * B), **settings)`` call with the prompt tokens cut off.
The text prompt (``"a picture of "`` for BLIP) is the decoder prefix, exactly as BLIP was trained to caption.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from recon import hub
from recon.captioners.base import (
    IGNORE_INDEX,
    common_prefix,
    generation_kwargs,
    pad_right,
    seeded,
    sequence_log_prob,
    warn_if_other_base,
)
from recon.captioners.lavis import load_original_blip_checkpoint
from recon.config import CaptionerConfig, DecodingConfig

log = logging.getLogger(__name__)


class BlipCaptioner:
    """BLIP (``BlipForConditionalGeneration``) or BLIP-2 (``Blip2ForConditionalGeneration``) captioner.

    * ``caption(images, num_candidates, decoding, seeds, batch_size)`` -> per image a list of ``num_candidates``
      strings, prompt stripped, whitespace normalised. Greedy and beam run in batches of ``batch_size`` (the last
      batch padded by repeating its last image, so every call has the same shape and an image's caption does not
      depend on its neighbours); nucleus sampling runs one image at a time under ``torch.manual_seed(seed)``, so
      an image's samples are reproducible alone. The caller's RNG state is left untouched.
    * ``log_likelihood(images, texts)`` -> float32 ``[B]`` on the CPU: ``sum log p(text tokens | image, prompt)``,
      higher is more likely; prompt, image and padding tokens excluded; the end-of-caption token the tokenizer
      appends (BLIP's ``[SEP]``) is included, as in BLIP's training loss.
    * Differentiable entry points for training: ``preprocess_tensor`` (``[B, 3, H, W]`` in [0, 1] -> pixel values)
      and ``teacher_forced_logits`` (pixel values + texts -> ``logits [B, T, V]``, ``labels [B, T]``).
    """

    def __init__(
        self, model, processor, cfg: CaptionerConfig | None = None, model_id: str = "", batch_size: int = 8
    ):
        from transformers import Blip2ForConditionalGeneration

        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.cfg = cfg or CaptionerConfig()
        self.prompt = self.cfg.prompt
        self.batch_size = max(1, int(batch_size))
        self.model_id = model_id or self.cfg.model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.is_blip2 = isinstance(base, Blip2ForConditionalGeneration)
        self.config = base.config
        self._vision_weight = base.vision_model.embeddings.patch_embedding.weight
        if self.is_blip2:
            self._check_blip2_processor()

    def _check_blip2_processor(self) -> None:
        """transformers 5 puts BLIP-2's query outputs at ``<image>`` tokens the processor inserts; without them
        the image would be silently ignored. Processors saved before that change lack ``num_query_tokens``."""
        if getattr(self.processor, "num_query_tokens", None) is None:
            self.processor.num_query_tokens = self.config.num_query_tokens
        token = getattr(self.processor, "image_token", None)
        token_id = self.tokenizer.convert_tokens_to_ids(str(token)) if token is not None else None
        if token_id is None or token_id != self._image_token_id():
            raise ValueError(
                f"{self.model_id}: the processor's image token {token!s} has id {token_id}, but the "
                f"model expects image_token_index={self._image_token_id()}"
            )

    @classmethod
    def from_config(
        cls,
        cfg: CaptionerConfig,
        device: torch.device | str = "auto",
        dtype: torch.dtype | None = None,
        batch_size: int = 8,
    ) -> BlipCaptioner:
        """Load ``cfg.model`` through the hub, then the original-BLIP ``cfg.checkpoint`` and the peft ``cfg.adapter``."""
        device = hub.resolve_device(device) if isinstance(device, str) else device
        dtype = dtype or hub.resolve_dtype(cfg.dtype, device)
        model, processor = hub.load_captioner_model(cfg.model, device, dtype, field="captioner.model")
        model_id = cfg.model
        if cfg.checkpoint:
            if model.config.model_type != "blip":
                raise ValueError(
                    f"captioner.checkpoint converts original BLIP weights onto a BLIP model, but "
                    f"captioner.model={cfg.model!r} is {model.config.model_type!r}"
                )
            load_original_blip_checkpoint(
                model, hub.resolve(cfg.checkpoint, "captioner checkpoint", "captioner.checkpoint")
            )
            model_id += f"+checkpoint:{cfg.checkpoint}"
        if cfg.adapter:
            from peft import PeftModel

            path = hub.resolve(cfg.adapter, "captioner adapter", "captioner.adapter")
            warn_if_other_base(path, cfg.model)
            model = PeftModel.from_pretrained(model, path).eval()
            model_id += f"+adapter:{cfg.adapter}"
        return cls(model, processor, cfg, model_id=model_id, batch_size=batch_size)

    @property
    def device(self) -> torch.device:
        return self._vision_weight.device

    @property
    def end_token_id(self) -> int | None:
        """The token that ends a caption: BLIP's ``[SEP]`` (BLIP-2's language model: its EOS)."""
        tok = self.tokenizer
        return tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id

    @property
    def dtype(self) -> torch.dtype:
        return self._vision_weight.dtype

    # ------------------------------------------------------------------------------------------- captioning
    def caption(
        self,
        images: Sequence[Image.Image],
        num_candidates: int | None = None,
        decoding: DecodingConfig | None = None,
        seeds: Sequence[int] | None = None,
        batch_size: int | None = None,
    ) -> list[list[str]]:
        """Per image, ``num_candidates`` captions (default: ``cfg.num_candidates``, ``cfg.decoding``).

        ``seeds`` (one per image; default 0 for every image) seed nucleus sampling; greedy and beam ignore them.
        """
        images = list(images)
        decoding = decoding or self.cfg.decoding
        n = num_candidates or self.cfg.num_candidates
        kwargs = generation_kwargs(decoding, n)
        if not images:
            return []
        if decoding.method == "nucleus":
            seeds = [0] * len(images) if seeds is None else list(seeds)
            if len(seeds) != len(images):
                raise ValueError(f"{len(images)} images but {len(seeds)} seeds")
            out = []
            for image, seed in zip(images, seeds):
                with seeded(seed, self.device):
                    out += self._generate([image], kwargs, n)
            return out
        size = max(1, int(batch_size or self.batch_size))
        out = []
        for start in range(0, len(images), size):
            chunk = images[start : start + size]
            out += self._generate(chunk + chunk[-1:] * (size - len(chunk)), kwargs, n)[: len(chunk)]
        return out

    @torch.no_grad()
    def _generate(self, images: list[Image.Image], kwargs: dict, n: int) -> list[list[str]]:
        inputs = self.processor(images=images, text=[self.prompt] * len(images), return_tensors="pt").to(
            self.device
        )
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        prompt_ids = inputs["input_ids"].clone()  # BLIP's generate rewrites input_ids[:, 0] in place
        ids = self.model.generate(**inputs, **kwargs)
        new = ids[:, self._generated_prefix_len(prompt_ids, ids) :]
        texts = [" ".join(t.split()) for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]
        return [texts[i * n : (i + 1) * n] for i in range(len(images))]

    def _generated_prefix_len(self, prompt_ids: torch.Tensor, ids: torch.Tensor) -> int:
        """How many leading tokens of ``generate``'s output are the prompt (to be cut off)."""
        if not self.is_blip2:
            return prompt_ids.shape[1] - 1  # BLIP decodes from [DEC] + prompt, dropping the prompt's [SEP]
        if self.config.use_decoder_only_language_model:
            length = prompt_ids.shape[1]
            rows = prompt_ids.repeat_interleave(ids.shape[0] // prompt_ids.shape[0], dim=0)
            if ids.shape[1] >= length and torch.equal(ids[:, :length], rows):
                return length
        return 0  # encoder-decoder language models return only the decoder's tokens

    # ------------------------------------------------------------------------------------------- likelihood
    def log_likelihood(
        self, images: Sequence[Image.Image], texts: Sequence[str], batch_size: int | None = None
    ) -> torch.Tensor:
        """``log p(text | image, prompt)`` summed over the text's tokens: float32 ``[B]`` on the CPU."""
        images, texts = list(images), list(texts)
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        size = max(1, int(batch_size or self.batch_size))
        out = [torch.zeros(0)]
        with torch.no_grad():
            for start in range(0, len(images), size):
                pixels = self.processor.image_processor(images[start : start + size], return_tensors="pt")
                pixel_values = pixels["pixel_values"].to(self.device, self.dtype)
                logits, labels = self.teacher_forced_logits(pixel_values, texts[start : start + size])
                out.append(sequence_log_prob(logits, labels).float().cpu())
        return torch.cat(out)

    # ------------------------------------------------------------------------------------------- differentiable
    def preprocess_tensor(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` RGB in [0, 1] -> normalised pixel values ``[B, 3, h, w]`` at the model's input size.

        Bicubic antialiased resize and the processor's mean/std, all differentiable. It matches the PIL
        processor up to resampling (PIL resizes uint8 images); use the processor for PIL inputs.
        """
        ip = self.processor.image_processor
        size = (int(ip.size["height"]), int(ip.size["width"]))
        x = images.float()
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        mean = torch.tensor(ip.image_mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(ip.image_std, device=x.device).view(1, -1, 1, 1)
        return ((x - mean) / std).to(self.dtype)

    def with_lora(self, add_lora: Callable[[torch.nn.Module], torch.nn.Module]) -> BlipCaptioner:
        """A new captioner on ``add_lora(model)``; a loaded peft adapter is merged into the weights first, so the new
        LoRA trains on top of it."""
        model = self.model.merge_and_unload() if hasattr(self.model, "merge_and_unload") else self.model
        return BlipCaptioner(
            add_lora(model), self.processor, self.cfg, model_id=self.model_id, batch_size=self.batch_size
        )

    def teacher_forced_logits(
        self, pixel_values: torch.Tensor, texts: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token logits of ``prompt + text`` given the image, aligned with their targets.

        ``pixel_values [B, 3, h, w]`` (from the processor or :meth:`preprocess_tensor`) -> ``logits [B, T, V]`` and
        ``labels [B, T]`` where ``logits[:, t]`` predicts ``labels[:, t]``; prompt, image and padding positions
        are ``-100``. ``F.cross_entropy(logits.transpose(1, 2), labels)`` is BLIP's captioning loss and
        :func:`sequence_log_prob` the per-text log-likelihood. Gradients flow to the pixels and the weights.
        """
        if len(texts) != pixel_values.shape[0]:
            raise ValueError(f"{pixel_values.shape[0]} images but {len(texts)} texts")
        if self.is_blip2 and not self.config.use_decoder_only_language_model:
            return self._seq2seq_logits(pixel_values, texts)
        rows, n_prompt = zip(*(self._prompt_and_text_ids(t) for t in texts))
        ids, mask = pad_right(list(rows), self.tokenizer.pad_token_id or 0)
        ids, mask = ids.to(pixel_values.device), mask.to(pixel_values.device)
        logits = self.model(pixel_values=pixel_values, input_ids=ids, attention_mask=mask).logits[:, :-1]
        labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE_INDEX)
        for i, k in enumerate(n_prompt):
            labels[i, : k - 1] = IGNORE_INDEX
        return logits, labels

    def _joined(self, text: str) -> str:
        text = " ".join(text.split())
        return self.prompt + text if not self.prompt or self.prompt[-1].isspace() else f"{self.prompt} {text}"

    def _prompt_and_text_ids(self, text: str) -> tuple[list[int], int]:
        """Token ids of prompt + text as the decoder sees them, and how many leading ids are not scored."""
        max_len = self._max_text_tokens()
        full = self.tokenizer(self._joined(text), truncation=True, max_length=max_len).input_ids
        prompt = self.tokenizer(self.prompt).input_ids
        special = set(self.tokenizer.all_special_ids)
        while len(prompt) > 1 and prompt[-1] in special:  # the prompt's own end token ([SEP]) is not a prefix
            prompt = prompt[:-1]
        if not self.is_blip2:
            full[0] = prompt[0] = self.config.text_config.bos_token_id  # BLIP decodes from [DEC], not [CLS]
        n_prompt = min(common_prefix(full, prompt), len(prompt))
        if self.is_blip2:
            image = [self._image_token_id()] * self.config.num_query_tokens
            return image + full, len(image) + n_prompt
        return full, n_prompt

    def _max_text_tokens(self) -> int:
        limit = int(getattr(self.config.text_config, "max_position_embeddings", 0) or 512)
        if self.is_blip2:
            limit -= self.config.num_query_tokens
        return min(limit, int(self.tokenizer.model_max_length))

    def _image_token_id(self) -> int:
        token_id = getattr(self.config, "image_token_id", None)
        if token_id is None:
            raise ValueError(
                f"{self.model_id}: this BLIP-2 config has no image_token_index; re-save it with a "
                "transformers version that places image tokens in the prompt"
            )
        return int(token_id)

    def _seq2seq_logits(
        self, pixel_values: torch.Tensor, texts: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """BLIP-2 with an encoder-decoder LM (Flan-T5): the prompt goes to the encoder, the text is the target."""
        prompt = self.tokenizer(self.prompt).input_ids
        image = [self._image_token_id()] * self.config.num_query_tokens
        ids = torch.tensor([image + prompt] * len(texts), device=pixel_values.device)
        targets = [self.tokenizer(" ".join(t.split()), truncation=True).input_ids for t in texts]
        labels, mask = pad_right(targets, self.tokenizer.pad_token_id or 0)
        labels = labels.masked_fill(mask == 0, IGNORE_INDEX).to(pixel_values.device)
        logits = self.model(pixel_values=pixel_values, input_ids=ids, labels=labels).logits
        return logits, labels
