"""The Flamingo architecture over an open_clip vision tower and a Hugging Face causal LM, and OpenFlamingo keys.

Frozen vision encoder -> :class:`PerceiverResampler` (learned latents attend to the visual tokens concatenated with
themselves) -> :class:`GatedCrossAttentionBlock` (masked cross-attention then feed-forward, each scaled by
``tanh(alpha)`` with ``alpha = 0`` at init, so a new model equals its LM) run before every n-th decoder layer of the
frozen LM. The blocks are attached with forward pre-hooks, so the LM's own modules and state-dict keys stay those of
the Hugging Face class (it still saves and loads as itself). A text token cross-attends only to the latest
``<image>`` before it; tokens before any image get no visual input.

Parameter names follow OpenFlamingo's (``perceiver.layers.0.0.to_kv.weight``, ``...attn.to_q.weight``), so
:func:`to_openflamingo_state_dict` / :func:`load_openflamingo_state_dict` are a key map, not a conversion.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping

import torch
from torch import nn

log = logging.getLogger(__name__)

# Where the decoder layers live, by ``config.model_type`` (OpenFlamingo's table, plus gpt2).
DECODER_LAYERS = {"llama": "model.layers", "mistral": "model.layers", "opt": "model.decoder.layers",
                  "gpt_neox": "gpt_neox.layers", "mpt": "transformer.blocks", "mosaic_gpt": "transformer.blocks",
                  "gpt2": "transformer.h", "gptj": "transformer.h", "gpt_neo": "transformer.h"}
PERCEIVER_DEFAULTS = dict(depth=6, dim_head=64, heads=8, num_latents=64, ff_mult=4)
XATTN_DEFAULTS = dict(dim_head=64, heads=8, ff_mult=4, only_attend_immediate_media=True)


def feed_forward(dim: int, mult: float = 4) -> nn.Sequential:
    inner = int(dim * mult)
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(),
                         nn.Linear(inner, dim, bias=False))


def _heads(x: torch.Tensor, h: int) -> torch.Tensor:
    """``[..., n, h * d]`` -> ``[..., h, n, d]``."""
    return x.unflatten(-1, (h, -1)).transpose(-3, -2)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None = None):
    """Softmax attention as OpenFlamingo computes it (max-subtracted, masked with ``-finfo.max``)."""
    sim = (q * scale) @ k.transpose(-1, -2)
    if mask is not None:
        sim = sim.masked_fill(~mask, -torch.finfo(sim.dtype).max)
    sim = sim - sim.amax(dim=-1, keepdim=True).detach()
    return sim.softmax(dim=-1)


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, dim_head: int = 64, heads: int = 8):
        super().__init__()
        self.scale, self.heads = dim_head ** -0.5, heads
        inner = dim_head * heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """``x [b, T, v, D]`` visual tokens, ``latents [b, T, n, D]`` -> ``[b, T, n, D]``."""
        x, latents = self.norm_media(x), self.norm_latents(latents)
        q = _heads(self.to_q(latents), self.heads)
        k, v = (_heads(t, self.heads) for t in self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1))
        out = _attend(q, k, v, self.scale) @ v
        return self.to_out(out.transpose(-3, -2).flatten(-2))


class PerceiverResampler(nn.Module):
    """Visual tokens ``[b, T, v, D]`` -> ``num_latents`` tokens per image ``[b, T, n, D]``."""

    def __init__(self, dim: int, depth: int = 6, dim_head: int = 64, heads: int = 8, num_latents: int = 64,
                 ff_mult: float = 4):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads), feed_forward(dim, ff_mult)]) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[:2]
        latents = self.latents.expand(b, t, *self.latents.shape)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm(latents)


class MaskedCrossAttention(nn.Module):
    def __init__(self, dim: int, dim_visual: int, dim_head: int = 64, heads: int = 8,
                 only_attend_immediate_media: bool = True):
        super().__init__()
        self.scale, self.heads = dim_head ** -0.5, heads
        inner = dim_head * heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim_visual, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.only_attend_immediate_media = only_attend_immediate_media

    def forward(self, x: torch.Tensor, media: torch.Tensor, text_time: torch.Tensor) -> torch.Tensor:
        """``x [B, L, D]``, ``media [B, T_img, n, Dv]``, ``text_time [B, L]`` (how many ``<image>`` tokens precede
        each token, itself included: token i sees image ``text_time[i]``, none when 0) -> ``[B, L, D]``."""
        n_img, n = media.shape[1:3]
        q = _heads(self.to_q(self.norm(x)), self.heads)
        k, v = (_heads(t, self.heads) for t in self.to_kv(media.flatten(1, 2)).chunk(2, dim=-1))
        media_time = torch.arange(1, n_img + 1, device=x.device).repeat_interleave(n)
        op = torch.eq if self.only_attend_immediate_media else torch.ge
        mask = op(text_time[:, None, :, None], media_time[None, None, None, :])
        attn = _attend(q, k, v, self.scale, mask)
        if self.only_attend_immediate_media:  # text before the first image attends to nothing
            attn = attn.masked_fill((text_time == 0)[:, None, :, None], 0.0)
        return self.to_out((attn @ v).transpose(1, 2).flatten(-2))


class TanhGate(nn.Module):
    """``x * tanh(alpha)``, ``alpha`` initialised to 0. A module (not a bare parameter) so peft can keep it
    trainable with ``modules_to_save``."""

    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.alpha.tanh()


class GatedCrossAttentionBlock(nn.Module):
    """GATED XATTN-DENSE: ``x + tanh(a) * xattn(x)``, then ``+ tanh(b) * ffw(.)``."""

    def __init__(self, dim: int, dim_visual: int, dim_head: int = 64, heads: int = 8, ff_mult: float = 4,
                 only_attend_immediate_media: bool = True):
        super().__init__()
        self.attn = MaskedCrossAttention(dim, dim_visual, dim_head, heads, only_attend_immediate_media)
        self.attn_gate = TanhGate()
        self.ff = feed_forward(dim, ff_mult)
        self.ff_gate = TanhGate()

    def forward(self, x: torch.Tensor, media: torch.Tensor, text_time: torch.Tensor) -> torch.Tensor:
        x = self.attn_gate(self.attn(x, media, text_time)) + x
        return self.ff_gate(self.ff(x)) + x


# ----------------------------------------------------------------------------------------------- vision
def _open_clip_kind(visual: nn.Module) -> str:
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import VisionTransformer

    if isinstance(visual, VisionTransformer):
        return "vit"
    if isinstance(visual, ModifiedResNet):
        return "resnet"
    raise TypeError(f"Flamingo needs an open_clip VisionTransformer or ModifiedResNet tower, "
                    f"got {type(visual).__name__}")


def vision_feature_dim(visual: nn.Module) -> int:
    """Width of the visual tokens (OpenFlamingo: ``vision_cfg.width`` of a ViT)."""
    if _open_clip_kind(visual) == "vit":
        return int(visual.conv1.out_channels)
    return int(visual.layer4[-1].conv3.out_channels)


def vision_tokens(visual: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """``[N, 3, H, W]`` normalised pixels -> visual tokens ``[N, v, D]``: a ViT's patch tokens after ``ln_post``
    (what OpenFlamingo feeds its resampler), or a ModifiedResNet's last feature map, one token per position."""
    if _open_clip_kind(visual) == "vit":
        visual.output_tokens = True
        return visual(pixels)[1]
    x = pixels
    for block in (visual.stem, visual.layer1, visual.layer2, visual.layer3, visual.layer4):
        x = block(x)
    return x.flatten(2).transpose(1, 2)


def vision_embedding(visual: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """The tower's pooled (CLIP) image embedding ``[N, E]``, used to rank demonstrations (RICES)."""
    out = visual(pixels)
    return out[0] if isinstance(out, tuple) else out


# ----------------------------------------------------------------------------------------------- the model
def get_path(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def decoder_layers_attr(lang_model: nn.Module) -> str:
    model_type = getattr(getattr(lang_model, "config", None), "model_type", None)
    if model_type not in DECODER_LAYERS:
        raise ValueError(f"no known decoder-layer list for model_type {model_type!r}; known: "
                         f"{sorted(DECODER_LAYERS)}. Give decoder_layers_attr (e.g. 'model.layers') in flamingo.json")
    return DECODER_LAYERS[model_type]


def _activation_checkpointing(lang_model: nn.Module) -> bool:
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # transformers 5 / 4
        if hasattr(type(lang_model), name):
            return bool(getattr(lang_model, name))
    return False


def _input_embeddings(lang_model: nn.Module) -> nn.Module:
    try:
        return lang_model.get_input_embeddings()
    except (AttributeError, NotImplementedError):  # MosaicGPT (mpt-1b) has no get_input_embeddings
        return lang_model.transformer.wte


class Flamingo(nn.Module):
    """Vision tower + perceiver + LM with gated cross-attention before every ``cross_attn_every_n_layers``-th layer.

    ``forward(input_ids [B, L], media [B, T_img, n, Dv], ...)`` returns the LM's output (``logits [B, L, V]``);
    ``media`` comes from :meth:`encode_images` (``pixels [B, T_img, 3, H, W]`` -> ``[B, T_img, n, Dv]``), computed
    once and reused for every decoding step. Vision tower and LM are frozen (``requires_grad=False``); perceiver and
    cross-attention blocks are trainable. Gradients still flow through the frozen parts to the pixels.
    """

    def __init__(self, vision_encoder: nn.Module, lang_model: nn.Module, media_token_id: int, eoc_token_id: int,
                 cross_attn_every_n_layers: int = 1, perceiver: Mapping | None = None, xattn: Mapping | None = None,
                 decoder_layers_attr_name: str | None = None):
        super().__init__()
        self.vision_encoder = vision_encoder
        self.lang_model = lang_model
        self.media_token_id, self.eoc_token_id = int(media_token_id), int(eoc_token_id)
        self.cross_attn_every_n_layers = int(cross_attn_every_n_layers)
        self.vis_dim = vision_feature_dim(vision_encoder)
        self.lang_dim = _input_embeddings(lang_model).embedding_dim
        self.perceiver_cfg = {**PERCEIVER_DEFAULTS, **(perceiver or {})}
        self.xattn_cfg = {**XATTN_DEFAULTS, **(xattn or {})}
        self.decoder_layers_attr = decoder_layers_attr_name or decoder_layers_attr(lang_model)
        self.perceiver = PerceiverResampler(self.vis_dim, **self.perceiver_cfg)
        layers = get_path(lang_model, self.decoder_layers_attr)
        self.gated_cross_attn = nn.ModuleDict({
            str(i): GatedCrossAttentionBlock(self.lang_dim, self.vis_dim, **self.xattn_cfg)
            for i in range(len(layers)) if (i + 1) % self.cross_attn_every_n_layers == 0})
        for i, layer in enumerate(layers):
            if str(i) in self.gated_cross_attn:
                layer.register_forward_pre_hook(self._make_hook(str(i)), with_kwargs=True)
        self._media: torch.Tensor | None = None
        self._text_time: torch.Tensor | None = None
        params = inspect.signature(lang_model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._takes_position_ids = "position_ids" in params
        self.freeze_backbones()

    def freeze_backbones(self) -> None:
        self.vision_encoder.requires_grad_(False)
        self.lang_model.requires_grad_(False)
        self.perceiver.requires_grad_(True)
        self.gated_cross_attn.requires_grad_(True)

    def _make_hook(self, key: str):
        def hook(module, args, kwargs):
            if self._media is None:  # the LM called on its own: no visual input
                return None
            block = self.gated_cross_attn[key]
            if args:
                return (block(args[0], self._media, self._text_time), *args[1:]), kwargs
            kwargs = dict(kwargs, hidden_states=block(kwargs["hidden_states"], self._media, self._text_time))
            return args, kwargs
        return hook

    # ------------------------------------------------------------------------------------------- vision
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels [B, T_img, 3, H, W]`` (normalised) -> resampled media ``[B, T_img, n, Dv]``."""
        b, t = pixels.shape[:2]
        tokens = vision_tokens(self.vision_encoder, pixels.flatten(0, 1))
        return self.perceiver(tokens.unflatten(0, (b, t)))

    # ------------------------------------------------------------------------------------------- language
    def forward(self, input_ids: torch.Tensor, media: torch.Tensor | None = None, attention_mask=None,
                position_ids=None, cache=None, use_cache: bool = False, media_offset: torch.Tensor | None = None,
                **lm_kwargs):
        """LM forward with cross-attention to ``media``. ``media_offset [B]``: images already consumed by the
        cached prefix (decoding steps after the prompt), so new tokens see the latest of them."""
        if media is None:
            media = torch.zeros(input_ids.shape[0], 0, 1, self.vis_dim, device=input_ids.device,
                                dtype=self.perceiver.latents.dtype)
        text_time = (input_ids == self.media_token_id).cumsum(-1)
        if media_offset is not None:
            text_time = text_time + media_offset.to(text_time.device)[:, None]
        if text_time.numel() and int(text_time.max()) > media.shape[1]:
            raise ValueError(f"the text has {int(text_time.max())} <image> tokens but only {media.shape[1]} images "
                             "were given")
        if torch.is_grad_enabled() and _activation_checkpointing(self.lang_model):
            # the recomputation in backward would run after the media context below is cleared
            raise RuntimeError("Flamingo does not support gradient checkpointing of its language model; "
                               "disable it (lang_model.gradient_checkpointing_disable())")
        kwargs = dict(lm_kwargs, input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)
        if cache is not None:
            kwargs[self._cache_kw] = cache
        if position_ids is not None and self._takes_position_ids:
            kwargs["position_ids"] = position_ids
        self._media, self._text_time = media, text_time
        try:
            return self.lang_model(**kwargs)
        finally:
            self._media = self._text_time = None

    def output_cache(self, output):
        return getattr(output, "cache", None) if self._cache_kw == "cache" else output.past_key_values

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if k.startswith(("perceiver.", "gated_cross_attn."))}


# ----------------------------------------------------------------------------------------------- OpenFlamingo keys
_GATES = {"attn_gate": "attn_gate.alpha", "ff_gate": "ff_gate.alpha"}
_DUPLICATES = ("lang_encoder.gated_cross_attn_layers.", "lang_encoder.old_decoder_blocks.")
_BUFFER_SUFFIXES = (".inv_freq", ".masked_bias", "attention.bias", "attn.bias", "attn_bias")  # old transformers


def _input_embedding_name(lang_model: nn.Module) -> str:
    emb = _input_embeddings(lang_model)
    return next(f"{n}.weight" for n, m in lang_model.named_modules() if m is emb)


def _embedding_param_names(model: Flamingo) -> list[str]:
    """LM parameters OpenFlamingo keeps in its checkpoints: names containing 'embed', and the input embeddings."""
    names = {n for n, _ in model.lang_model.named_parameters() if "embed" in n}
    return sorted(names | {_input_embedding_name(model.lang_model)})


def to_openflamingo_state_dict(model: Flamingo) -> dict[str, torch.Tensor]:
    """Our trainable weights + LM embeddings under OpenFlamingo's checkpoint.pt keys."""
    attr = model.decoder_layers_attr
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("perceiver."):
            out[k] = v
        elif k.startswith("gated_cross_attn."):
            _, i, rest = k.split(".", 2)
            rest = {alias: name for name, alias in _GATES.items()}.get(rest, rest)
            out[f"lang_encoder.{attr}.{i}.gated_cross_attn_layer.{rest}"] = v
    lm_state = model.lang_model.state_dict(keep_vars=False)
    for name in _embedding_param_names(model):
        out[f"lang_encoder.{name}"] = lm_state[name]
    return out


def openflamingo_key_map(model: Flamingo, key: str) -> tuple[str, str] | None:
    """``(part, our key)`` of an OpenFlamingo checkpoint key (part: trainable | lm | vision | skip); None: unknown."""
    attr = model.decoder_layers_attr
    if key.startswith("perceiver."):
        return "trainable", key
    if key.startswith(_DUPLICATES):
        return "skip", key
    if key.startswith(f"lang_encoder.{attr}."):
        i, sub, rest = key[len(f"lang_encoder.{attr}."):].split(".", 2)
        if sub == "gated_cross_attn_layer":
            return "trainable", f"gated_cross_attn.{i}.{_GATES.get(rest, rest)}"
        if sub == "decoder_layer":
            return "lm", f"{attr}.{i}.{rest}"
        return None
    if key.startswith("lang_encoder."):
        return "lm", key[len("lang_encoder."):]
    if key.startswith("vision_encoder."):
        return "vision", key[len("vision_encoder."):]
    return None


class CheckpointKeyError(KeyError):
    """An OpenFlamingo checkpoint does not fit the model; the message names the keys."""

    def __str__(self) -> str:
        return str(self.args[0])


def _names(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_openflamingo_state_dict(model: Flamingo, state: Mapping[str, torch.Tensor], where: str = "checkpoint"
                                 ) -> dict[str, list[str]]:
    """Load an OpenFlamingo ``checkpoint.pt`` state dict (or ours from :func:`to_openflamingo_state_dict`).

    Every perceiver / cross-attention weight and the LM input embeddings must be present; LM and vision weights are
    optional (OpenFlamingo's checkpoints omit the frozen ones). Raises :class:`CheckpointKeyError` naming missing,
    unexpected or mis-shaped keys. Returns ``{"loaded": [...], "ignored": [...]}`` (ignored: duplicate views and
    buffers old transformers versions saved).
    """
    if "model_state_dict" in state:
        state = state["model_state_dict"]
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    ours = {"trainable": model.state_dict(), "lm": model.lang_model.state_dict(),
            "vision": model.vision_encoder.state_dict()}
    prefix = {"trainable": "", "lm": "lang_model.", "vision": "vision_encoder."}
    updates, unexpected, ignored, shapes = {}, [], [], []
    for key, value in state.items():
        mapped = openflamingo_key_map(model, key)
        if mapped is None:
            unexpected.append(key)
            continue
        part, target = mapped
        if part == "skip":
            ignored.append(key)
        elif target not in ours[part]:
            (ignored if part == "lm" and key.endswith(_BUFFER_SUFFIXES) else unexpected).append(key)
        elif tuple(ours[part][target].shape) != tuple(value.shape):
            shapes.append(f"{key} {tuple(value.shape)} vs ours {tuple(ours[part][target].shape)}")
        else:
            updates[prefix[part] + target] = value
    required = set(model.trainable_state_dict()) | {f"lang_model.{_input_embedding_name(model.lang_model)}"}
    missing = sorted(required - set(updates))
    problems = []
    if missing:
        problems.append(f"missing trainable keys (under our names): {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_names(sorted(unexpected))}")
    if shapes:
        problems.append(f"shape mismatches: {_names(shapes, 4)}")
    if problems:
        hint = (f" -- the model has cross-attention before every {model.cross_attn_every_n_layers}. layer of "
                f"{len(get_path(model.lang_model, model.decoder_layers_attr))} ({model.decoder_layers_attr}); "
                "a different LM or cross_attn_every_n_layers than the checkpoint was trained with?")
        raise CheckpointKeyError(f"{where} does not fit this Flamingo: " + "; ".join(problems) + hint)
    current = model.state_dict()
    with torch.no_grad():
        for k, v in updates.items():
            current[k].copy_(v.to(current[k].dtype))
    return {"loaded": sorted(updates), "ignored": sorted(ignored)}


# ----------------------------------------------------------------------------------------------- decoding
def _cache_repeat(cache, k: int):
    if hasattr(cache, "batch_repeat_interleave"):
        cache.batch_repeat_interleave(k)
        return cache
    return tuple(tuple(t.repeat_interleave(k, 0) for t in layer) for layer in cache)  # legacy tuple caches


def _cache_select(cache, index: torch.Tensor):
    if hasattr(cache, "reorder_cache"):
        cache.reorder_cache(index)
        return cache
    return tuple(tuple(t.index_select(0, index) for t in layer) for layer in cache)


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k and top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -float("inf"))
    return logits


@torch.no_grad()
def generate(model: Flamingo, input_ids: torch.Tensor, attention_mask: torch.Tensor, media: torch.Tensor, *,
             max_new_tokens: int, min_new_tokens: int = 0, method: str = "greedy", num_beams: int = 1,
             num_return_sequences: int = 1, top_p: float = 1.0, top_k: int = 0, temperature: float = 1.0,
             repetition_penalty: float = 1.0, length_penalty: float = 1.0, eos_token_id: int | None = None,
             banned_token_ids: tuple[int, ...] = ()) -> list[list[tuple[list[int], float]]]:
    """Decode after left-padded prompts ``input_ids [B, L]`` with their ``media [B, T_img, n, Dv]``.

    The prompt runs once with the LM's KV cache; each step then feeds one token, which cross-attends to the row's
    latest image (``media_offset``). ``method``: ``greedy``, ``beam`` (``num_beams`` wide, scores
    ``sum log p / length ** length_penalty``) or ``nucleus`` (``top_p`` / ``top_k`` / ``temperature``; uses torch's
    global RNG, so seed around the call). Decoding of a sequence stops at ``eos_token_id`` (default
    ``<|endofchunk|>``). ``repetition_penalty`` applies to the tokens generated so far, not to the prompt (few-shot
    prompts share the answer's vocabulary). Returns per row ``num_return_sequences`` ``(token ids without eos,
    score)``, best first.
    """
    eos = model.eoc_token_id if eos_token_id is None else int(eos_token_id)
    b = input_ids.shape[0]
    k = num_beams if method == "beam" else num_return_sequences
    if method == "beam" and num_return_sequences > num_beams:
        raise ValueError(f"num_return_sequences={num_return_sequences} exceeds num_beams={num_beams}")
    if method not in ("greedy", "beam", "nucleus"):
        raise ValueError(f"decoding method {method!r}: expected greedy, beam or nucleus")
    mask = attention_mask.long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids, media, attention_mask=mask, position_ids=positions, use_cache=True)
    cache, logits = model.output_cache(out), out.logits[:, -1].float()
    media_count = (input_ids == model.media_token_id).sum(-1)
    last_pos = positions[:, -1]
    if k > 1:
        cache = _cache_repeat(cache, k)
        logits, mask, media, media_count, last_pos = (t.repeat_interleave(k, 0) for t in
                                                     (logits, mask, media, media_count, last_pos))
    banned = torch.tensor(sorted(set(banned_token_ids) | {model.media_token_id}), device=logits.device)
    generated = torch.zeros(b * k, 0, dtype=torch.long, device=logits.device)
    scores = torch.zeros(b * k, device=logits.device)
    if method == "beam":
        scores.view(b, k)[:, 1:] = -float("inf")  # step 0: every beam starts from the same prompt
    done = torch.zeros(b * k, dtype=torch.bool, device=logits.device)
    finished: list[list[tuple[list[int], float]]] = [[] for _ in range(b)]
    row_done = [False] * b

    def norm(score: float, length: int) -> float:
        return score / max(length, 1) ** length_penalty

    for step in range(max_new_tokens):
        logits[:, banned] = -float("inf")
        if step < min_new_tokens:
            logits[:, eos] = -float("inf")
        if repetition_penalty != 1.0 and generated.shape[1]:
            seen = logits.gather(1, generated)
            logits.scatter_(1, generated, torch.where(seen > 0, seen / repetition_penalty, seen * repetition_penalty))
        if method == "nucleus":
            logits = _filter_top_k_top_p(logits / temperature, top_k, top_p)
        logp = logits.log_softmax(-1)
        if method == "beam":
            vocab = logp.shape[-1]
            top_s, top_i = (scores[:, None] + logp).view(b, k * vocab).topk(2 * k, dim=-1)
            select = torch.arange(b * k, device=logp.device)
            tokens = torch.full((b * k,), eos, dtype=torch.long, device=logp.device)
            new_scores = torch.full((b * k,), -float("inf"), device=logp.device)
            for row in range(b):
                if row_done[row]:
                    continue
                j = 0
                for rank, (s, idx) in enumerate(zip(top_s[row].tolist(), top_i[row].tolist())):
                    src, tok = row * k + idx // vocab, idx % vocab
                    if tok == eos:
                        if rank < k:
                            finished[row].append((generated[src].tolist(), norm(s, step + 1)))
                        continue
                    select[row * k + j], tokens[row * k + j], new_scores[row * k + j] = src, tok, s
                    j += 1
                    if j == k:
                        break
                finished[row] = sorted(finished[row], key=lambda h: -h[1])[:k]
                best_running = norm(float(new_scores[row * k]), step + 1)
                if len(finished[row]) == k and finished[row][-1][1] >= best_running:
                    row_done[row] = True
            if all(row_done):
                break
            generated = torch.cat([generated[select], tokens[:, None]], dim=1)
            scores = new_scores
            cache = _cache_select(cache, select)
        else:
            tokens = logp.argmax(-1) if method == "greedy" else torch.multinomial(logp.exp(), 1).squeeze(1)
            tokens = tokens.masked_fill(done, eos)
            scores = scores + logp.gather(1, tokens[:, None]).squeeze(1).masked_fill(done, 0.0)
            generated = torch.cat([generated, tokens[:, None]], dim=1)
            done = done | (tokens == eos)
            if bool(done.all()):
                break
        if step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones(b * k, 1)], dim=1)
        last_pos = last_pos + 1
        out = model(tokens[:, None], media, attention_mask=mask, position_ids=last_pos[:, None], cache=cache,
                    use_cache=True, media_offset=media_count)
        cache, logits = model.output_cache(out), out.logits[:, -1].float()

    results = []
    for row in range(b):
        if method == "beam":
            hyps = list(finished[row])
            if not row_done[row]:
                hyps += [(generated[row * k + j].tolist(), norm(float(scores[row * k + j]), generated.shape[1]))
                         for j in range(k) if scores[row * k + j] > -float("inf")]
            results.append(sorted(hyps, key=lambda h: -h[1])[:num_return_sequences])
        else:
            rows = []
            for j in range(k):
                seq = generated[row * k + j].tolist()
                rows.append((seq[: seq.index(eos)] if eos in seq else seq, float(scores[row * k + j])))
            results.append(rows)
    return results
