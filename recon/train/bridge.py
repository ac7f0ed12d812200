"""Captioner logits -> soft tokens in the generator's text-encoder vocabulary -> text-encoder states, with grad.

The captioner (BLIP: BERT WordPiece, 30524 ids) and the generator's text encoder (CLIP BPE, 49408 ids) do not
share a vocabulary. A fixed one-to-one index maps a CLIP token to the WordPiece id of the same word (``dog</w>``
-> ``dog``; see :func:`build_index` for the rule); CLIP tokens without one are *unmapped*. It is built once per
tokenizer pair and cached under
``$RECON_CACHE/bridge`` (a few ms to load, ~1 s to build). Everything is a gather along the vocabulary, never a
dense 30k x 49k matrix.

Variants (``BridgeConfig.variant``), on the captioner's next-token logits ``l`` at caption positions:

* ``prob`` (the original): ``q[c] = softmax(l / T)[index[c]]``, not renormalised;
* ``logit``: ``q = softmax(l[index] / T)`` over the CLIP vocabulary (equals ``prob`` renormalised);
* ``gumbel``: straight-through Gumbel-softmax over the ``logit`` distribution: the forward pass uses the hard
  sampled token's embedding exactly, the backward pass the soft sample's gradient.

The expected embedding ``q @ E_clip`` of every caption position is laid out as the tokenizer would lay out ids:
``[BOS] soft_1 .. soft_n [EOS] [PAD] ..`` up to the text encoder's length (77), then run through
:class:`TextEncoderFromEmbeddings` (transformers 5's CLIPTextModel takes no ``inputs_embeds``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from recon.runs import Cache
from recon.tokenizers import _bytes_to_unicode
from recon.train.config import BridgeConfig

log = logging.getLogger(__name__)

INDEX_VERSION = 2  # 2: one-to-one (v1 summed every CLIP row of a word)
UNMAPPED = -1


# ----------------------------------------------------------------------------------------------- the index
def _clip_byte_decoder() -> dict[str, int]:
    return {v: k for k, v in _bytes_to_unicode().items()}


def _clip_token_text(token: str, byte_decoder: dict[str, int]) -> str | None:
    """A CLIP BPE token as text, without its end-of-word marker; None for tokens that are not whole UTF-8."""
    token = token.removesuffix("</w>")
    try:
        return bytes(byte_decoder[ch] for ch in token).decode("utf-8")
    except (KeyError, UnicodeDecodeError):
        return None


def _source_pieces(source_vocab: dict[str, int], decoder: dict[str, int]) -> dict[int, tuple[str, bool]]:
    """Per source id: (its text, whether it starts a word), for the three vocabulary styles captioners use:
    WordPiece (BERT / BLIP: ``##`` marks a continuation), byte-level BPE (GPT-2 / OPT / MPT and our shapes LM:
    ``Ġ`` marks a word start) and SentencePiece (Llama: ``▁`` marks a word start)."""
    tokens = source_vocab.keys()
    byte_level = any(t.startswith("\u0120") for t in tokens)  # "Ġ": a space in GPT-2's byte alphabet
    sentencepiece = not byte_level and any(t.startswith("\u2581") for t in tokens)  # "▁"
    out = {}
    for token, sid in source_vocab.items():
        if byte_level:
            text = _clip_token_text(token, decoder)  # the same byte alphabet as CLIP's BPE
            initial = bool(text) and text.startswith(" ")
            text = text.strip() if text else None
        elif sentencepiece:
            initial, text = token.startswith("\u2581"), token.lstrip("\u2581")
        else:
            initial = not (token.startswith("##") and len(token) > 2)
            text = token if initial else token[2:]
        if text:
            out[sid] = (text, initial)
    return out


def build_index(
    source_vocab: dict[str, int], target_vocab: dict[str, int], target_special: set[int] = frozenset()
) -> torch.Tensor:
    """``index[target id] = source id`` of the same word, or ``UNMAPPED`` (-1); ``[len(target_vocab)]`` long.

    One-to-one: every source token reaches at most one target token, so a captioner certain of a word feeds the
    text encoder exactly that word's embedding (never the sum of ``dog</w>`` and ``dog``). The rule, per source
    piece (identical vocabularies simply map to themselves):

    * a word-initial piece ``w`` (WordPiece ``w``, byte-level ``Ġw``, SentencePiece ``▁w``) takes CLIP's whole
      word ``w</w>``, else the word-start piece ``w`` (right for the first piece of a word that continues);
    * a continuation piece (``##w``; a byte-level or SentencePiece piece without its marker) takes ``w</w>`` (it
      usually ends its word) if no word-initial piece holds it, else the inner piece ``w``;
    * pieces with no exact match try their lower-cased text last (a cased captioner; CLIP is lower-case).

    Words CLIP splits into several BPE tokens reach none of them (a captioner token cannot become two text-encoder
    slots). ``target_special`` ids (BOS/EOS) stay unmapped.
    """
    index = torch.full((max(target_vocab.values()) + 1,), UNMAPPED, dtype=torch.long)
    if source_vocab == target_vocab:
        for tid in target_vocab.values():
            if tid not in target_special:
                index[tid] = tid
        return index
    decoder = _clip_byte_decoder()
    whole, inner = {}, {}  # text -> target id, for word-final (``</w>``) and word-inner tokens
    for token, tid in target_vocab.items():
        text = None if tid in target_special else _clip_token_text(token, decoder)
        if text:
            (whole if token.endswith("</w>") else inner).setdefault(text, tid)
    pieces = _source_pieces(source_vocab, decoder)
    order = sorted(
        pieces, key=lambda sid: (not pieces[sid][1], sid)
    )  # word-initial pieces own the whole words
    claimed: set[int] = set()
    placed: set[int] = set()
    for fold in (False, True):
        for sid in order:
            if sid in placed:
                continue
            text = pieces[sid][0].lower() if fold else pieces[sid][0]
            for table in (whole, inner):
                tid = table.get(text)
                if tid is not None and tid not in claimed:
                    index[tid] = sid
                    claimed.add(tid)
                    placed.add(sid)
                    break
    return index


@dataclass
class VocabIndex:
    """The fixed CLIP -> captioner index and what it covers."""

    index: torch.Tensor  # [V_target] long, UNMAPPED where no same-word source token exists
    unk_id: int  # the source's [UNK]: where unmapped ids go under BridgeConfig.unmapped="unk"
    coverage: dict

    @property
    def mapped(self) -> torch.Tensor:
        return self.index != UNMAPPED


def coverage_report(index: torch.Tensor, source_size: int) -> dict:
    mapped = index != UNMAPPED
    return {
        "target_vocab": int(index.numel()),
        "target_mapped": int(mapped.sum()),
        "target_mapped_fraction": round(float(mapped.float().mean()), 4),
        "target_unmapped_fraction": round(1 - float(mapped.float().mean()), 4),
        "source_vocab": int(source_size),
        "source_reachable": int(index[mapped].unique().numel()),
        "source_reachable_fraction": round(index[mapped].unique().numel() / max(1, source_size), 4),
    }


def token_coverage(vocab_index: VocabIndex, source_ids: list[list[int]]) -> float:
    """Fraction of the given captioner token ids (e.g. of the training captions) that some CLIP token reaches."""
    reachable = set(vocab_index.index[vocab_index.mapped].tolist())
    flat = [i for row in source_ids for i in row]
    return sum(i in reachable for i in flat) / max(1, len(flat))


def _vocab_key(source_vocab: dict[str, int], target_vocab: dict[str, int], special: set[int]) -> str:
    blob = json.dumps(
        [INDEX_VERSION, sorted(source_vocab.items()), sorted(target_vocab.items()), sorted(special)]
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def vocab_index(source_tokenizer, target_tokenizer, cache_dir: str | Path | None = None) -> VocabIndex:
    """The index for a tokenizer pair, built once and cached as safetensors under ``cache_dir`` (None: no cache)."""
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    source_vocab, target_vocab = source_tokenizer.get_vocab(), target_tokenizer.get_vocab()
    # only the structural tokens: a pad token may be an ordinary character (our CLIP tokenizer pads with "!")
    special = {t for t in (target_tokenizer.bos_token_id, target_tokenizer.eos_token_id) if t is not None}
    key = _vocab_key(source_vocab, target_vocab, special)
    size, n_source = max(target_vocab.values()) + 1, max(source_vocab.values()) + 1

    def read(path: Path) -> torch.Tensor:  # a torn or tampered file raises: Cache.load rebuilds it, naming it
        index = st_load(path.read_bytes())["index"]
        if (
            index.dtype != torch.long
            or tuple(index.shape) != (size,)
            or bool(((index < UNMAPPED) | (index >= n_source)).any())
        ):
            raise ValueError(
                f"holds a {index.dtype} index of shape {tuple(index.shape)}, expected int64 [{size}] "
                f"with values in [{UNMAPPED}, {n_source})"
            )
        return index

    cache = Cache(cache_dir)
    index = cache.load("bridge", key, ".safetensors", read)
    if index is None:
        index = build_index(source_vocab, target_vocab, special)
        cache.put_bytes("bridge", key, st_save({"index": index}), ".safetensors")
    unk = source_tokenizer.unk_token_id
    coverage = dict(coverage_report(index, len(source_vocab)), cache_key=key[:16])
    return VocabIndex(index=index, unk_id=int(unk if unk is not None else 0), coverage=coverage)


# ----------------------------------------------------------------------------------------------- text encoder
class TextEncoderFromEmbeddings(nn.Module):
    """``CLIPTextModel.forward`` from token embeddings: embeddings (+ positions) -> causal mask -> encoder ->
    final layer norm -> pooled output at the given positions. Matches transformers 5.x ``modeling_clip.py``
    step by step; the wrapped model is not modified (it is not a submodule, so it is never saved twice).

    ``forward(token_embeds [B, L, D], pooled_positions [B])`` -> ``(last_hidden_state [B, L, D], pooled [B, D])``.
    """

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self._te = [text_encoder]  # a list: not registered as a submodule

    @property
    def text_encoder(self) -> nn.Module:
        return self._te[0]

    def token_embedding(self) -> nn.Embedding:
        return self.text_encoder.embeddings.token_embedding

    def forward(
        self,
        token_embeds: torch.Tensor,
        pooled_positions: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from transformers.masking_utils import create_causal_mask

        te = self.text_encoder
        hidden = te.embeddings(inputs_embeds=token_embeds)
        mask = create_causal_mask(
            config=te.config, inputs_embeds=hidden, attention_mask=attention_mask, cache=None
        )
        last = te.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True).last_hidden_state
        last = te.final_layer_norm(last)
        pooled = last[torch.arange(last.shape[0], device=last.device), pooled_positions.to(last.device)]
        return last, pooled

    def pooled_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Where CLIPTextModel pools for these ids: the first EOS (or the max id for legacy eos_token_id=2)."""
        te = self.text_encoder
        if te.config.eos_token_id == 2:
            return input_ids.to(torch.int).argmax(dim=-1)
        return (input_ids.to(torch.int) == te.config.eos_token_id).int().argmax(dim=-1)


# ----------------------------------------------------------------------------------------------- the bridge
class SoftTokenBridge(nn.Module):
    """Captioner logits at caption positions -> text-encoder hidden states, differentiable.

    ``forward(logits [B, T, V_src], caption_mask [B, T] bool, generator=None)`` ->
    ``(last_hidden_state [B, L, D], pooled [B, D])`` with ``L`` the tokenizer's ``model_max_length`` (77).
    ``caption_mask`` marks the positions whose prediction is a caption token (labels != -100, end token
    excluded); at most ``L - 2`` of them are kept, as the tokenizer truncates. ``generator`` draws the
    Gumbel noise (``variant="gumbel"``). No parameters of its own.
    """

    def __init__(
        self, index: VocabIndex, text_encoder: nn.Module, tokenizer, cfg: BridgeConfig | None = None
    ):
        super().__init__()
        self.cfg = cfg or BridgeConfig()
        self.encoder = TextEncoderFromEmbeddings(text_encoder)
        self.length = int(tokenizer.model_max_length)
        self.bos_id, self.eos_id = int(tokenizer.bos_token_id), int(tokenizer.eos_token_id)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id)
        self.coverage = index.coverage
        self._table: tuple | None = None  # (key, table, count): see aggregated_table
        keep_unk = self.cfg.unmapped == "unk"
        gather = index.index.clone()
        if keep_unk:
            gather[gather == UNMAPPED] = index.unk_id
        include = gather != UNMAPPED
        self.register_buffer("gather_index", gather.clamp(min=0), persistent=False)
        self.register_buffer("include", include, persistent=False)
        n_rows = self.encoder.token_embedding().weight.shape[0]
        if gather.numel() != n_rows:
            raise ValueError(
                f"bridge index covers {gather.numel()} tokens but the text encoder has {n_rows} rows"
            )

    def clip_distribution(self, logits: torch.Tensor) -> torch.Tensor:
        """``[N, V_src]`` captioner logits -> ``[N, V_clip]`` weights over the CLIP vocabulary (float32)."""
        logits = logits.float() / self.cfg.temperature
        if self.cfg.variant == "prob":
            return torch.softmax(logits, -1)[:, self.gather_index] * self.include
        gathered = logits[:, self.gather_index].masked_fill(~self.include, float("-inf"))
        return torch.softmax(gathered, -1)

    def aggregated_table(self, n_source: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per captioner token: the sum of the CLIP embedding rows mapped to it ``[V_src, D]`` and their number
        ``[V_src]`` (float32). ``q @ E_clip`` equals ``p @ table`` for ``prob`` and is computed that way.

        With the one-to-one index a row is one CLIP embedding (or zero); under ``unmapped="unk"`` the [UNK] row
        sums every unmapped CLIP row. The text encoder is frozen, so the table is built once and kept (94 MB for
        BLIP's 30524 WordPieces x SD 1.x's 768 dims, in float32) instead of once per micro-step; a change to the
        embedding weights (their version counter) rebuilds it.
        """
        weight = self.encoder.token_embedding().weight
        key = (n_source, weight.device, weight.data_ptr(), weight._version)
        if self._table is None or self._table[0] != key or weight.requires_grad:
            idx = self.gather_index[self.include]
            with torch.set_grad_enabled(
                weight.requires_grad
            ):  # a trained embedding: rebuilt with grad each call
                emb = weight.float()
                table = emb.new_zeros(n_source, emb.shape[1]).index_add(0, idx, emb[self.include])
            self._table = (key, table, torch.bincount(idx, minlength=n_source).float())
        return self._table[1], self._table[2]

    def soft_embeddings(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``[N, V_src]`` -> ``[N, D]``: expected (or straight-through sampled) CLIP token embeddings.

        ``prob`` and ``logit`` are evaluated per captioner token (``[N, V_src]``, never ``[N, V_clip]``): the same
        value as ``clip_distribution(logits) @ E_clip``, at a fraction of the cost of gathering 49k columns and
        scattering their gradient back. ``logit`` is the softmax over CLIP ids written per captioner token: a
        ``log(count)`` bias, each token's mass spread evenly over its CLIP rows.
        """
        dtype = self.encoder.token_embedding().weight.dtype
        if self.cfg.variant == "gumbel":
            return self._gumbel_embeddings(logits, generator)
        scaled = logits.float() / self.cfg.temperature
        table, count = self.aggregated_table(scaled.shape[-1])
        if self.cfg.variant == "prob":
            return (torch.softmax(scaled, -1) @ table).to(dtype)
        q = torch.softmax(scaled + count.log(), -1)  # log(0) = -inf: tokens no CLIP id maps to get no mass
        return (q @ (table / count.clamp(min=1)[:, None])).to(dtype)

    def _gumbel_embeddings(self, logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        emb = self.encoder.token_embedding().weight
        q = self.clip_distribution(logits)
        u = torch.rand(q.shape, generator=generator, device=q.device).clamp_(1e-10, 1 - 1e-7)
        y = torch.softmax((q.clamp_min(1e-30).log() - torch.log(-torch.log(u))) / self.cfg.gumbel_tau, -1)
        soft = y.to(emb.dtype) @ emb
        # forward: exactly the hard token's embedding (soft - soft is exactly 0); backward: the soft sample's
        return emb[y.argmax(-1)] + (soft - soft.detach())

    def layout(
        self, caption_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Hard ids of the sequence (soft slots hold the pad id), (batch, source position), target slot, eos pos."""
        mask = caption_mask.bool()
        rank = mask.long().cumsum(1) - 1
        keep = mask & (rank < self.length - 2)
        n = keep.sum(1)
        ids = torch.full((mask.shape[0], self.length), self.pad_id, dtype=torch.long, device=mask.device)
        ids[:, 0] = self.bos_id
        rows = torch.arange(mask.shape[0], device=mask.device)
        ids[rows, n + 1] = self.eos_id
        b, t = keep.nonzero(as_tuple=True)
        return ids, torch.stack([b, t]), rank[b, t] + 1, n + 1

    def sequence_embeddings(
        self, logits: torch.Tensor, caption_mask: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, L, D]`` token embeddings of ``[BOS] soft.. [EOS] [PAD]..`` and the EOS positions ``[B]``."""
        ids, (b, t), slot, eos = self.layout(caption_mask.to(logits.device))
        table = self.encoder.token_embedding()
        hard = table(ids)
        soft = self.soft_embeddings(logits[b, t], generator).to(hard.dtype)
        return hard.index_put((b, slot), soft), eos

    def forward(
        self, logits: torch.Tensor, caption_mask: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, eos = self.sequence_embeddings(logits, caption_mask, generator)
        return self.encoder(embeds, eos)


def caption_positions(
    labels: torch.Tensor, end_token_id: int | None, ignore_index: int = -100
) -> torch.Tensor:
    """Positions whose target is a caption token: scored (``labels != -100``) and not the end token."""
    mask = labels != ignore_index
    if end_token_id is not None:
        mask &= labels != end_token_id
    return mask


def coverage_line(cov: dict) -> str:
    return (
        f"bridge: {cov['target_mapped']}/{cov['target_vocab']} CLIP tokens map to a same-word captioner token "
        f"({100 * cov['target_mapped_fraction']:.1f}%; {100 * cov['target_unmapped_fraction']:.1f}% unmapped); "
        f"{cov['source_reachable']}/{cov['source_vocab']} captioner tokens reachable"
    )


__all__ = [
    "SoftTokenBridge",
    "TextEncoderFromEmbeddings",
    "VocabIndex",
    "build_index",
    "caption_positions",
    "coverage_line",
    "coverage_report",
    "token_coverage",
    "vocab_index",
]
