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

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from recon import hub
from recon.captioners.blip import (
    IGNORE_INDEX,
    _common_prefix,
    _pad_right,
    generation_kwargs,
    seeded,
    sequence_log_prob,
)
from recon.captioners.flamingo_model import (
    Flamingo,
    generate,
    load_openflamingo_state_dict,
    vision_embedding,
)
from recon.config import CaptionerConfig, DecodingConfig

log = logging.getLogger(__name__)

MEDIA_TOKEN, EOC_TOKEN, PAD_TOKEN = "<image>", "<|endofchunk|>", "<PAD>"
# LoRA: every linear layer of the perceiver and of the gated cross-attention blocks (peft full-matches the regex
# against module names of the Flamingo module); the tanh gates are trained whole.
LORA_TARGETS = (r"(perceiver\.layers\.\d+\.0\.(to_q|to_kv|to_out)|perceiver\.layers\.\d+\.1\.[13]"
                r"|gated_cross_attn\.\d+\.(attn\.(to_q|to_kv|to_out)|ff\.[13]))")
LORA_MODULES_TO_SAVE = ("attn_gate", "ff_gate")
CHUNK_SEPARATOR = "\n"  # OpenFlamingo's captioning evaluation joins demonstrations with a newline
TEXT_ONLY_ZERO_SHOT = 2

# OpenFlamingo v2 releases (all CLIP ViT-L-14 openai). COCO CIDEr reported by OpenFlamingo: 3B 74.9 / 77.3 / 93.0
# at 0 / 4 / 32 shots; 4-shot: 3B 77.3, 4B 81.8, 9B 89.0. Flamingo-3B (DeepMind): 73.0 / 85.0 / 99.0.
_VITL = dict(vision="ViT-L-14", vision_pretrained="openai")
OPENFLAMINGO_RELEASES: dict[str, dict] = {
    "openflamingo/OpenFlamingo-3B-vitl-mpt1b": dict(
        _VITL, lang_model="anas-awadalla/mpt-1b-redpajama-200b", cross_attn_every_n_layers=1),
    "openflamingo/OpenFlamingo-3B-vitl-mpt1b-langinstruct": dict(
        _VITL, lang_model="anas-awadalla/mpt-1b-redpajama-200b-dolly", cross_attn_every_n_layers=1),
    "openflamingo/OpenFlamingo-4B-vitl-rpj3b": dict(
        _VITL, lang_model="togethercomputer/RedPajama-INCITE-Base-3B-v1", cross_attn_every_n_layers=2),
    "openflamingo/OpenFlamingo-4B-vitl-rpj3b-langinstruct": dict(
        _VITL, lang_model="togethercomputer/RedPajama-INCITE-Instruct-3B-v1", cross_attn_every_n_layers=2),
    "openflamingo/OpenFlamingo-9B-vitl-mpt7b": dict(
        _VITL, lang_model="anas-awadalla/mpt-7b", cross_attn_every_n_layers=4),
}


# MosaicGPT (mpt-1b) has no transformers class: loading it runs code from its repository. recon never does that
# by default; opt in with RECON_TRUST_REMOTE_CODE=1 or "trust_remote_code": true in a flamingo.json.
REMOTE_CODE_LMS = {"anas-awadalla/mpt-1b-redpajama-200b", "anas-awadalla/mpt-1b-redpajama-200b-dolly"}


@dataclass
class FlamingoSpec:
    """What to build: the parts (ids or paths), the architecture, and the weights file."""

    lang_model: str
    vision: str
    vision_pretrained: str | None = None
    tokenizer: str | None = None  # default: lang_model
    cross_attn_every_n_layers: int = 1
    perceiver: dict = field(default_factory=dict)
    xattn: dict = field(default_factory=dict)
    decoder_layers_attr: str | None = None
    trust_remote_code: bool = False
    weights: str | None = None
    vision_sha256: str | None = None  # of the tower's weights file (local towers): training pairs them
    root: Path | None = None  # relative paths above are relative to this directory

    def part(self, ref: str | None, what: str) -> str | None:
        if ref is None:
            return None
        if self.root is not None and (self.root / ref).exists():
            return str(self.root / ref)
        return hub.resolve(ref, what, "captioner.model")


def flamingo_spec(model_id: str, checkpoint: str | None = None) -> FlamingoSpec:
    """Resolve ``captioner.model`` (+ ``captioner.checkpoint``) to a :class:`FlamingoSpec` (no weights loaded)."""
    known = {f.name for f in fields(FlamingoSpec)} - {"root"}
    if model_id in OPENFLAMINGO_RELEASES:
        spec = FlamingoSpec(**OPENFLAMINGO_RELEASES[model_id])
        spec.weights = checkpoint or str(Path(hub.resolve(model_id, "OpenFlamingo checkpoint", "captioner.model"))
                                         / "checkpoint.pt")
        return spec
    root = Path(hub.resolve(model_id, "captioner", "captioner.model"))
    meta_path = root / "flamingo.json"
    if not meta_path.is_file():
        raise ValueError(f"captioner.model={model_id!r}: {root} has no flamingo.json and is not an OpenFlamingo "
                         f"release ({', '.join(OPENFLAMINGO_RELEASES)}); see recon.captioners.flamingo's docstring")
    meta = json.loads(meta_path.read_text())
    release = meta.pop("release", None)
    for key in ("format", "version", "notes"):
        meta.pop(key, None)
    unknown = sorted(set(meta) - known)
    if unknown:
        raise ValueError(f"{meta_path}: unknown key(s) {unknown}; valid: {sorted(known | {'release'})}")
    if release is not None and release not in OPENFLAMINGO_RELEASES:
        raise ValueError(f"{meta_path}: unknown release {release!r}; known: {sorted(OPENFLAMINGO_RELEASES)}")
    spec = FlamingoSpec(**{**OPENFLAMINGO_RELEASES.get(release, {}), **meta}, root=root)
    if checkpoint:
        spec.weights = checkpoint
    elif spec.weights is None and (root / "checkpoint.pt").is_file():
        spec.weights = "checkpoint.pt"
    return spec


def load_flamingo(spec: FlamingoSpec, device: torch.device, dtype: torch.dtype = torch.float32):
    """Build the model of ``spec`` as OpenFlamingo's factory does (special tokens added, embeddings resized to the
    tokenizer), load its weights, move to ``device`` / ``dtype``. Returns ``(model, tokenizer, preprocess_cfg)``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm_path = spec.part(spec.lang_model, "Flamingo language model")
    tok_path = spec.part(spec.tokenizer, "Flamingo tokenizer") or lm_path
    trusted = spec.trust_remote_code or os.environ.get("RECON_TRUST_REMOTE_CODE") == "1"
    if spec.lang_model in REMOTE_CODE_LMS and not trusted:
        raise ValueError(f"{spec.lang_model} runs code from its own repository (no transformers class); recon does "
                         "not trust remote code by default. Opt in with RECON_TRUST_REMOTE_CODE=1, or "
                         "\"trust_remote_code\": true in the model folder's flamingo.json")
    remote = dict(trust_remote_code=True) if trusted else {}
    if remote:
        log.warning("loading %s with trust_remote_code=True (code from that repository runs)", spec.lang_model)
    tokenizer = AutoTokenizer.from_pretrained(tok_path, **remote)
    tokenizer.add_special_tokens({"additional_special_tokens": [EOC_TOKEN, MEDIA_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    lang_model = AutoModelForCausalLM.from_pretrained(lm_path, **remote)
    try:
        lang_model.get_input_embeddings()
    except (AttributeError, NotImplementedError):  # MosaicGPT (mpt-1b): patched as OpenFlamingo's factory does
        lang_model.get_input_embeddings = lambda: lang_model.transformer.wte
        lang_model.set_input_embeddings = lambda emb: setattr(lang_model.transformer, "wte", emb)
    if lang_model.get_input_embeddings().num_embeddings != len(tokenizer):
        lang_model.resize_token_embeddings(len(tokenizer))
    vision = str(spec.root / spec.vision) if spec.root and (spec.root / spec.vision).exists() else spec.vision
    if spec.vision_sha256:
        found = vision_weights_sha256(hub.resolve(vision, "Flamingo vision tower", "captioner.model"))
        if found != spec.vision_sha256:
            raise ValueError(f"vision tower {spec.vision} is not the one this Flamingo was trained with (weights "
                             f"sha256 {found} != {spec.vision_sha256}); retrain the perceiver and cross-attention "
                             "on it (shapes: python -m recon.shapes.flamingo train)")
    clip, preprocess_cfg, _ = hub.load_open_clip(vision, spec.vision_pretrained, torch.device("cpu"),
                                                 field="captioner.model")
    model = Flamingo(clip.visual, lang_model, tokenizer.convert_tokens_to_ids(MEDIA_TOKEN),
                     tokenizer.convert_tokens_to_ids(EOC_TOKEN), spec.cross_attn_every_n_layers, spec.perceiver,
                     spec.xattn, spec.decoder_layers_attr)
    if spec.weights:
        path = spec.part(spec.weights, "Flamingo weights")
        load_openflamingo_state_dict(model, hub.load_safetensors_or_pt(path), where=path)
    else:
        log.warning("%s: no weights file: perceiver and cross-attention are untrained (gates 0: the bare LM)",
                    spec.lang_model)
    return model.to(device=device, dtype=dtype).eval(), tokenizer, preprocess_cfg


def vision_weights_sha256(path: str | Path) -> str | None:
    """sha256 of an open_clip model folder's weights file (None if there is none)."""
    import hashlib

    for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        if (Path(path) / name).is_file():
            return hashlib.sha256((Path(path) / name).read_bytes()).hexdigest()
    return None


def save_flamingo(model: Flamingo, tokenizer, out: str | Path, vision: str, vision_pretrained: str | None = None,
                  half: bool = False, vision_sha256: str | None = None) -> Path:
    """Write ``out/`` loadable as ``captioner.model``: ``lm/`` (the LM and tokenizer, Hugging Face layout),
    ``flamingo.safetensors`` (perceiver, cross-attention and LM embeddings under OpenFlamingo's keys) and
    ``flamingo.json``. ``vision`` is the hub.load_open_clip spec of the tower (an id, not copied)."""
    from safetensors.torch import save_file

    from recon.captioners.flamingo_model import to_openflamingo_state_dict

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if half else torch.float32
    lm_state = {k: v.detach().to(dtype).contiguous() for k, v in model.lang_model.state_dict().items()}
    model.lang_model.save_pretrained(out / "lm", state_dict=lm_state)
    tokenizer.save_pretrained(out / "lm")
    state = {k: v.detach().to(dtype).contiguous() for k, v in to_openflamingo_state_dict(model).items()}
    save_file(state, str(out / "flamingo.safetensors"))
    meta = dict(format="recon-flamingo", version=1, lang_model="lm", tokenizer="lm", vision=vision,
                vision_pretrained=vision_pretrained, cross_attn_every_n_layers=model.cross_attn_every_n_layers,
                perceiver=model.perceiver_cfg, xattn=model.xattn_cfg, decoder_layers_attr=model.decoder_layers_attr,
                weights="flamingo.safetensors", vision_sha256=vision_sha256)
    (out / "flamingo.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


# ----------------------------------------------------------------------------------------------- prompts
def chunk(caption: str | None, prompt: str = "Output:", image: bool = True) -> str:
    """One interleaved chunk: ``<image>Output:{caption}<|endofchunk|>``; ``caption=None`` leaves it open."""
    head = (MEDIA_TOKEN if image else "") + prompt
    return head if caption is None else f"{head}{caption.strip()}{EOC_TOKEN}"


def few_shot_prompt(demo_captions: Sequence[str], prompt: str = "Output:", demo_images: bool = True,
                    separator: str = CHUNK_SEPARATOR) -> str:
    """Demonstrations then the open query chunk (the query always has its image)."""
    return "".join(chunk(c, prompt, demo_images) + separator for c in demo_captions) + chunk(None, prompt)


class Demonstrations:
    """A pool of (image, caption) pairs to draw in-context examples from; images as PIL or paths (loaded on use).

    ``select(k, seed)``: ``k`` distinct pairs drawn by ``numpy.random.default_rng(seed)``; ``rank(k, query)``: the
    ``k`` most CLIP-similar to a query embedding (RICES), ordered so the most similar comes last.
    """

    def __init__(self, images: Sequence[Image.Image | str | Path], captions: Sequence[str]):
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} demonstration images but {len(captions)} captions")
        self._images, self.captions = list(images), [" ".join(c.split()) for c in captions]
        self._embeddings: torch.Tensor | None = None

    @classmethod
    def from_coco(cls, captions_file: str | Path, image_dir: str | Path, limit: int | None = 2048,
                  seed: int = 0) -> Demonstrations:
        """A COCO captions json + its image folder; ``limit`` images drawn with ``seed`` (OpenFlamingo samples
        random demonstrations from 2048 training images), one of each image's captions drawn likewise."""
        from recon.captions_io import read_coco_captions

        refs = read_coco_captions(captions_file)
        ids = sorted(refs.refs, key=str)
        missing = [i for i in ids if i not in refs.file_names]
        if missing:
            raise ValueError(f"{captions_file}: no file_name for image id(s) {missing[:5]} in 'images'")
        rng = np.random.default_rng(int(seed))
        if limit and len(ids) > limit:
            ids = [ids[i] for i in sorted(rng.choice(len(ids), size=limit, replace=False))]
        captions = [refs.refs[i][int(rng.integers(len(refs.refs[i])))] for i in ids]
        return cls([Path(image_dir) / refs.file_names[i] for i in ids], captions)

    def image(self, i: int) -> Image.Image:
        im = self._images[i]
        if isinstance(im, Image.Image):
            return im
        from recon.data import load_image

        return load_image(im)

    def images(self, indices: Sequence[int]) -> list[Image.Image]:
        return [self.image(i) for i in indices]

    def __len__(self) -> int:
        return len(self.captions)

    def _check(self, k: int) -> None:
        if k > len(self):
            raise ValueError(f"{k} demonstrations asked for but the pool has {len(self)}")

    def select(self, k: int, seed: int) -> list[int]:
        self._check(k)
        return [int(i) for i in np.random.default_rng(int(seed)).choice(len(self), size=k, replace=False)]

    def rank(self, k: int, query: torch.Tensor, embed) -> list[int]:
        self._check(k)
        if self._embeddings is None:
            self._embeddings = torch.nn.functional.normalize(torch.cat(
                [embed(self.images(range(s, min(s + 64, len(self))))).float() for s in range(0, len(self), 64)]),
                dim=-1)
        sim = self._embeddings.to(query.device) @ torch.nn.functional.normalize(query.float(), dim=-1)
        return [int(i) for i in reversed(sim.topk(k).indices.tolist())]


# ----------------------------------------------------------------------------------------------- the backend
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

    def __init__(self, model: Flamingo, tokenizer, preprocess_cfg: dict, cfg: CaptionerConfig | None = None,
                 model_id: str = "", batch_size: int = 8, demos: Demonstrations | None = None, num_shots: int = 0,
                 selection: str = "random", text_only_zero_shot: int = TEXT_ONLY_ZERO_SHOT,
                 length_penalty: float = 0.0):
        from recon.similarity.preprocess import ImagePreprocess

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
    def from_config(cls, cfg: CaptionerConfig, device: torch.device | str = "auto", dtype: torch.dtype | None = None,
                    batch_size: int = 8, **kwargs) -> FlamingoCaptioner:
        """Load ``cfg.model`` (+ ``cfg.checkpoint``) and the peft ``cfg.adapter``; ``kwargs`` go to ``__init__``."""
        device = hub.resolve_device(device) if isinstance(device, str) else device
        dtype = dtype or hub.resolve_dtype(cfg.dtype, device)
        model, tokenizer, pre = load_flamingo(flamingo_spec(cfg.model, cfg.checkpoint), device, dtype)
        model_id = cfg.model + (f"+checkpoint:{cfg.checkpoint}" if cfg.checkpoint else "")
        if cfg.adapter:
            from peft import PeftModel

            path = hub.resolve(cfg.adapter, "captioner adapter", "captioner.adapter")
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
        from recon.data import image_to_tensor

        return torch.cat([self.preprocess_tensor(image_to_tensor(im.convert("RGB"))[None]) for im in images])

    def _embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        with torch.no_grad():
            return vision_embedding(self.model.vision_encoder, self.pixel_values(images))

    def _demos_for(self, query_pixels: torch.Tensor, seeds: Sequence[int]) -> list[tuple[list[str], list[int]]]:
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
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
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
    def caption(self, images: Sequence[Image.Image], num_candidates: int | None = None,
                decoding: DecodingConfig | None = None, seeds: Sequence[int] | None = None,
                batch_size: int | None = None) -> list[list[str]]:
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
        return [c for s in range(0, len(images), size)
                for c in self._generate(images[s:s + size], seeds[s:s + size], decoding, kwargs)]

    @torch.no_grad()
    def _generate(self, images: list[Image.Image], seeds: list[int], decoding: DecodingConfig, kwargs: dict
                  ) -> list[list[str]]:
        pixels = self.pixel_values(images)
        demos = self._demos_for(pixels, seeds)
        ids, mask = self._encode_rows([few_shot_prompt(c, self.prompt, bool(idx)) for c, idx in demos])
        media = self._media(pixels, [idx for _, idx in demos])
        results = generate(
            self.model, ids, mask, media, max_new_tokens=decoding.max_new_tokens,
            min_new_tokens=decoding.min_new_tokens, method=decoding.method, num_beams=kwargs["num_beams"],
            num_return_sequences=kwargs["num_return_sequences"], top_p=decoding.top_p, top_k=decoding.top_k,
            temperature=decoding.temperature, repetition_penalty=decoding.repetition_penalty,
            length_penalty=self.length_penalty, banned_token_ids=(self.pad_id,))
        return [[self._clean(self.tokenizer.decode(seq, skip_special_tokens=True)) for seq, _ in row]
                for row in results]

    @staticmethod
    def _clean(text: str) -> str:
        """OpenFlamingo's post-processing (cut at a next ``Output``), whitespace normalised."""
        return " ".join(text.split("Output", 1)[0].split())

    # ------------------------------------------------------------------------------------------- likelihood
    def log_likelihood(self, images: Sequence[Image.Image], texts: Sequence[str], seeds: Sequence[int] | None = None,
                       batch_size: int | None = None) -> torch.Tensor:
        """``log p(text <|endofchunk|> | prompt, images)``: float32 ``[B]`` on the CPU."""
        images, texts = list(images), list(texts)
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        seeds = [0] * len(images) if seeds is None else [int(s) for s in seeds]
        size = max(1, int(batch_size or self.batch_size))
        out = [torch.zeros(0)]
        with torch.no_grad():
            for s in range(0, len(images), size):
                pixels = self.pixel_values(images[s:s + size])
                logits, labels = self.teacher_forced_logits(pixels, texts[s:s + size], seeds[s:s + size])
                out.append(sequence_log_prob(logits, labels).float().cpu())
        return torch.cat(out)

    def teacher_forced_logits(self, pixel_values: torch.Tensor, texts: Sequence[str],
                              seeds: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
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
            n_prompt.append(min(_common_prefix(full, head), len(full) - 1))
        ids, mask = (t.to(self.device) for t in _pad_right(rows, self.pad_id))
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

        return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGETS,
                          modules_to_save=list(LORA_MODULES_TO_SAVE))
