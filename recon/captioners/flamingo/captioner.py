"""Flamingo / OpenFlamingo as the captioner role: interleaved few-shot prompts, our own KV-cached decoding.

A caption prompt is OpenFlamingo's: demonstrations ``<image>Output:{caption}<|endofchunk|>`` joined by ``"\\n"``,
then ``<image>Output:`` for the query (``Output:`` is ``captioner.prompt``). Zero-shot uses two text-only
demonstrations (the captions without their images), as Flamingo and OpenFlamingo evaluate; decoding stops at
``<|endofchunk|>``. Demonstrations come from a pool of (image, caption) pairs, chosen per query at random (seeded
by the query's seed) or by CLIP similarity to the query (RICES, most similar last). The pool and shot count are
constructor arguments (``FlamingoCaptioner.from_config(cfg, demos=Demonstrations.from_coco(json, images),
num_shots=4, selection="rices")``); without a pool (a preset alone) the prompt is the query chunk only.

``captioner.model`` is either

* an OpenFlamingo release id from :data:`OPENFLAMINGO_RELEASES` (``openflamingo/OpenFlamingo-3B-vitl-mpt1b``):
  its LM, tokenizer and vision tower come from the table, its weights from ``checkpoint.pt`` in that hub repo, or
  from ``captioner.checkpoint`` (a local ``checkpoint.pt``) when set;
* a directory (local, hub id, ``builtin:``) with a ``flamingo.json``::

      {"release": "openflamingo/OpenFlamingo-3B-vitl-mpt1b",   # optional: start from a release's entry
       "lang_model": "lm", "tokenizer": "lm",                 # paths relative to the directory, or ids
       "vision": "ViT-L-14", "vision_pretrained": "openai",   # any hub.load_open_clip spec
       "cross_attn_every_n_layers": 1, "perceiver": {...}, "xattn": {...},
       "decoder_layers_attr": null, "trust_remote_code": false, "weights": "checkpoint.pt",
       "vision_sha256": null}                                 # optional: refuse a different local tower

  so an offline copy of a release is a folder with ``checkpoint.pt`` and a flamingo.json naming local LM / CLIP
  folders.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
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
from recon.captioners.flamingo.decoding import generate
from recon.captioners.flamingo.model import Flamingo, vision_embedding
from recon.captioners.flamingo.prompts import (
    EOC_TOKEN,
    TEXT_ONLY_ZERO_SHOT,
    Demonstrations,
    few_shot_prompt,
)
from recon.captioners.flamingo.weights import (
    flamingo_spec,
    load_flamingo,
)
from recon.config import CaptionerConfig, DecodingConfig
from recon.data import image_to_tensor
from recon.preprocess import ImagePreprocess

# LoRA: every linear layer of the perceiver and of the gated cross-attention blocks (peft full-matches the regex
# against module names of the Flamingo module); the tanh gates are trained whole.
LORA_TARGETS = (
    r"(perceiver\.layers\.\d+\.0\.(to_q|to_kv|to_out)|perceiver\.layers\.\d+\.1\.[13]"
    r"|gated_cross_attn\.\d+\.(attn\.(to_q|to_kv|to_out)|ff\.[13]))"
)
LORA_MODULES_TO_SAVE = ("attn_gate", "ff_gate")


class FlamingoCaptioner:
    """Flamingo captioner (see the module docstring for prompts and ``captioner.model``).

    * ``caption(images, num_candidates, decoding, seeds)`` -> per image ``num_candidates`` captions. Greedy and
      beam run in batches (left padding); nucleus runs one image at a time under ``seeded(seed)``. With
      ``num_shots > 0`` each query gets ``num_shots`` demonstrations (``selection``: ``random``, drawn with the
      query's seed, or ``rices``); with 0, ``text_only_zero_shot`` caption-only demonstrations (none without a pool).
    * ``log_likelihood(images, texts, seeds)`` -> float32 ``[B]``: ``sum log p(text + <|endofchunk|>)`` after the
      same prompt; higher is more likely.
    * Differentiable: ``preprocess_tensor`` (``[B, 3, H, W]`` in [0, 1] -> pixels) and ``teacher_forced_logits``.
    * ``lora_config()``: peft LoRA on the perceiver and cross-attention projections, gates kept trainable.
    """

    def __init__(
        self,
        model: Flamingo,
        tokenizer,
        preprocess_cfg: dict,
        cfg: CaptionerConfig | None = None,
        model_id: str = "",
        batch_size: int = 8,
        demos: Demonstrations | None = None,
        num_shots: int = 0,
        selection: str = "random",
        text_only_zero_shot: int = TEXT_ONLY_ZERO_SHOT,
        length_penalty: float = 0.0,
    ):
        if selection not in ("random", "rices"):
            raise ValueError(f"selection={selection!r}: expected random or rices")
        if num_shots and demos is None:
            raise ValueError(f"num_shots={num_shots} needs a demonstration pool (demos=Demonstrations(...))")
        self.model, self.tokenizer = model, tokenizer
        self.cfg = cfg or CaptionerConfig(backend="flamingo", prompt="Output:")
        self.prompt = self.cfg.prompt
        self.model_id = model_id or self.cfg.model
        self.batch_size = max(1, int(batch_size))
        self.demos, self.num_shots, self.selection = demos, int(num_shots), selection
        self.text_only_zero_shot, self.length_penalty = int(text_only_zero_shot), float(length_penalty)
        self.preprocess = ImagePreprocess.from_open_clip(preprocess_cfg)
        self.pad_id = tokenizer.pad_token_id

    @classmethod
    def from_config(
        cls,
        cfg: CaptionerConfig,
        device: torch.device | str = "auto",
        dtype: torch.dtype | None = None,
        batch_size: int = 8,
        **kwargs,
    ) -> FlamingoCaptioner:
        """Load ``cfg.model`` (+ ``cfg.checkpoint``) and the peft ``cfg.adapter``; ``kwargs`` go to ``__init__``."""
        device = hub.resolve_device(device) if isinstance(device, str) else device
        dtype = dtype or hub.resolve_dtype(cfg.dtype, device)
        model, tokenizer, pre = load_flamingo(flamingo_spec(cfg.model, cfg.checkpoint), device, dtype)
        model_id = cfg.model + (f"+checkpoint:{cfg.checkpoint}" if cfg.checkpoint else "")
        if cfg.adapter:
            from peft import PeftModel

            path = hub.resolve(cfg.adapter, "captioner adapter", "captioner.adapter")
            warn_if_other_base(path, cfg.model)
            PeftModel.from_pretrained(model, path).eval()  # injects LoRA into `model` in place
            model_id += f"+adapter:{cfg.adapter}"
        return cls(model, tokenizer, pre, cfg, model_id=model_id, batch_size=batch_size, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.model.perceiver.latents.device

    @property
    def end_token_id(self) -> int | None:
        """``<|endofchunk|>``: the token that ends a caption chunk."""
        return self.tokenizer.convert_tokens_to_ids(EOC_TOKEN)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.perceiver.latents.dtype

    # ------------------------------------------------------------------------------------------- inputs
    def preprocess_tensor(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` RGB in [0, 1] -> normalised pixels at the vision tower's size; differentiable."""
        return self.preprocess(images.float().to(self.device)).to(self.dtype)

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.cat([self.preprocess_tensor(image_to_tensor(im.convert("RGB"))[None]) for im in images])

    def _embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        with torch.no_grad():
            return vision_embedding(self.model.vision_encoder, self.pixel_values(images))

    def _demos_for(
        self, query_pixels: torch.Tensor, seeds: Sequence[int]
    ) -> list[tuple[list[str], list[int]]]:
        """Per query: demonstration captions, and the pool indices whose images go into the prompt."""
        if self.demos is None:
            return [([], [])] * len(seeds)
        k = self.num_shots or min(self.text_only_zero_shot, len(self.demos))
        if self.selection == "rices":
            with torch.no_grad():
                queries = vision_embedding(self.model.vision_encoder, query_pixels)
            picks = [self.demos.rank(k, q, self._embed) for q in queries]
        else:
            picks = [self.demos.select(k, s) for s in seeds]
        # zero-shot: the demonstrations' captions only, their images left out
        return [([self.demos.captions[i] for i in idx], idx if self.num_shots else []) for idx in picks]

    def _encode_rows(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.tokenizer(t).input_ids for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding: every prompt ends where decoding starts
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
        return ids.to(self.device), mask.to(self.device)

    def _media(self, query_pixels: torch.Tensor, demo_indices: list[list[int]]) -> torch.Tensor:
        """``[B, shots + 1, n, D]``: demonstration images (no gradient) then the query."""
        shots = {len(d) for d in demo_indices}
        if len(shots) != 1:
            raise ValueError("every query in a batch needs the same number of demonstration images")
        if shots == {0}:
            return self.model.encode_images(query_pixels[:, None])
        with torch.no_grad():
            demo_px = torch.stack([self.pixel_values(self.demos.images(idx)) for idx in demo_indices])
            demo_media = self.model.encode_images(demo_px)
        return torch.cat([demo_media, self.model.encode_images(query_pixels[:, None])], dim=1)

    # ------------------------------------------------------------------------------------------- captioning
    def caption(
        self,
        images: Sequence[Image.Image],
        num_candidates: int | None = None,
        decoding: DecodingConfig | None = None,
        seeds: Sequence[int] | None = None,
        batch_size: int | None = None,
    ) -> list[list[str]]:
        """Per image, ``num_candidates`` captions (default: ``cfg.num_candidates``, ``cfg.decoding``)."""
        images = list(images)
        decoding = decoding or self.cfg.decoding
        n = num_candidates or self.cfg.num_candidates
        kwargs = generation_kwargs(decoding, n)  # validates the settings exactly as the BLIP backend does
        seeds = [0] * len(images) if seeds is None else [int(s) for s in seeds]
        if len(seeds) != len(images):
            raise ValueError(f"{len(images)} images but {len(seeds)} seeds")
        if decoding.method == "nucleus":
            out = []
            for image, seed in zip(images, seeds):
                with seeded(seed, self.device):
                    out += self._generate([image], [seed], decoding, kwargs)
            return out
        size = max(1, int(batch_size or self.batch_size))
        return [
            c
            for s in range(0, len(images), size)
            for c in self._generate(images[s : s + size], seeds[s : s + size], decoding, kwargs)
        ]

    @torch.no_grad()
    def _generate(
        self, images: list[Image.Image], seeds: list[int], decoding: DecodingConfig, kwargs: dict
    ) -> list[list[str]]:
        pixels = self.pixel_values(images)
        demos = self._demos_for(pixels, seeds)
        ids, mask = self._encode_rows([few_shot_prompt(c, self.prompt, bool(idx)) for c, idx in demos])
        media = self._media(pixels, [idx for _, idx in demos])
        results = generate(
            self.model,
            ids,
            mask,
            media,
            max_new_tokens=decoding.max_new_tokens,
            min_new_tokens=decoding.min_new_tokens,
            method=decoding.method,
            num_beams=kwargs["num_beams"],
            num_return_sequences=kwargs["num_return_sequences"],
            top_p=decoding.top_p,
            top_k=decoding.top_k,
            temperature=decoding.temperature,
            repetition_penalty=decoding.repetition_penalty,
            length_penalty=self.length_penalty,
            banned_token_ids=(self.pad_id,),
        )
        return [
            [self._clean(self.tokenizer.decode(seq, skip_special_tokens=True)) for seq, _ in row]
            for row in results
        ]

    @staticmethod
    def _clean(text: str) -> str:
        """OpenFlamingo's post-processing (cut at a next ``Output``), whitespace normalised."""
        return " ".join(text.split("Output", 1)[0].split())

    # ------------------------------------------------------------------------------------------- likelihood
    def log_likelihood(
        self,
        images: Sequence[Image.Image],
        texts: Sequence[str],
        seeds: Sequence[int] | None = None,
        batch_size: int | None = None,
    ) -> torch.Tensor:
        """``log p(text <|endofchunk|> | prompt, images)``: float32 ``[B]`` on the CPU."""
        images, texts = list(images), list(texts)
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        seeds = [0] * len(images) if seeds is None else [int(s) for s in seeds]
        size = max(1, int(batch_size or self.batch_size))
        out = [torch.zeros(0)]
        with torch.no_grad():
            for s in range(0, len(images), size):
                pixels = self.pixel_values(images[s : s + size])
                logits, labels = self.teacher_forced_logits(pixels, texts[s : s + size], seeds[s : s + size])
                out.append(sequence_log_prob(logits, labels).float().cpu())
        return torch.cat(out)

    def with_lora(self, add_lora: Callable[[torch.nn.Module], torch.nn.Module]) -> FlamingoCaptioner:
        """This captioner with ``add_lora(model)`` as its model. A loaded ``cfg.adapter`` is injected in place and
        cannot be merged here, so starting from one is refused (the finetune config check says so before loading)."""
        if self.cfg.adapter:
            raise ValueError(
                f"captioner.adapter={self.cfg.adapter}: a Flamingo adapter is injected in place and cannot be merged "
                "before a new LoRA; start from the base model (captioner.adapter=null)"
            )
        self.model = add_lora(self.model)
        return self

    def teacher_forced_logits(
        self, pixel_values: torch.Tensor, texts: Sequence[str], seeds: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``logits [B, T, V]`` predicting ``labels [B, T]`` for prompt + text + ``<|endofchunk|>``; prompt and
        padding positions are ``-100``. Gradients flow to ``pixel_values`` (the query images) and the weights."""
        if len(texts) != pixel_values.shape[0]:
            raise ValueError(f"{pixel_values.shape[0]} images but {len(texts)} texts")
        seeds = [0] * len(texts) if seeds is None else list(seeds)
        demos = self._demos_for(pixel_values, seeds)
        prompts = [few_shot_prompt(c, self.prompt, bool(idx)) for c, idx in demos]
        rows, n_prompt = [], []
        for prompt, text in zip(prompts, texts):
            full = self.tokenizer(prompt + " ".join(text.split()) + EOC_TOKEN).input_ids
            head = self.tokenizer(prompt).input_ids
            rows.append(full)
            n_prompt.append(min(common_prefix(full, head), len(full) - 1))
        ids, mask = (t.to(self.device) for t in pad_right(rows, self.pad_id))
        media = self._media(pixel_values, [idx for _, idx in demos])
        logits = self.model(ids, media, attention_mask=mask).logits[:, :-1]
        labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE_INDEX)
        for i, k in enumerate(n_prompt):
            labels[i, : k - 1] = IGNORE_INDEX
        return logits, labels

    # ------------------------------------------------------------------------------------------- finetuning
    @staticmethod
    def lora_config(r: int = 8, alpha: int = 16, dropout: float = 0.0):
        """peft LoRA on every perceiver / cross-attention projection; the tanh gates stay fully trainable
        (``modules_to_save``). Apply with ``peft.get_peft_model(captioner.model, captioner.lora_config())``."""
        from peft import LoraConfig

        return LoraConfig(
            r=r,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=LORA_TARGETS,
            modules_to_save=list(LORA_MODULES_TO_SAVE),
        )
