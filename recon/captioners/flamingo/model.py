"""The Flamingo architecture over an open_clip vision tower and a Hugging Face causal LM, and OpenFlamingo keys.

Frozen vision encoder -> :class:`PerceiverResampler` (learned latents attend to the visual tokens concatenated with
themselves) -> :class:`GatedCrossAttentionBlock` (masked cross-attention then feed-forward, each scaled by
``tanh(alpha)`` with ``alpha = 0`` at init, so a new model equals its LM) run before every n-th decoder layer of the
frozen LM. The blocks are attached with forward pre-hooks, so the LM's own modules and state-dict keys stay those of
the Hugging Face class (it still saves and loads as itself). A text token cross-attends only to the latest
``<image>`` before it; tokens before any image get no visual input.

Parameter names follow OpenFlamingo's (``perceiver.layers.0.0.to_kv.weight``, ``...attn.to_q.weight``), so
:mod:`recon.captioners.flamingo.weights` maps keys, it does not convert.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch
from torch import nn

# Where the decoder layers live, by ``config.model_type`` (OpenFlamingo's table, plus gpt2).
DECODER_LAYERS = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "opt": "model.decoder.layers",
    "gpt_neox": "gpt_neox.layers",
    "mpt": "transformer.blocks",
    "mosaic_gpt": "transformer.blocks",
    "gpt2": "transformer.h",
    "gptj": "transformer.h",
    "gpt_neo": "transformer.h",
}
PERCEIVER_DEFAULTS = dict(depth=6, dim_head=64, heads=8, num_latents=64, ff_mult=4)
XATTN_DEFAULTS = dict(dim_head=64, heads=8, ff_mult=4, only_attend_immediate_media=True)


def feed_forward(dim: int, mult: float = 4) -> nn.Sequential:
    inner = int(dim * mult)
    return nn.Sequential(
        nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(), nn.Linear(inner, dim, bias=False)
    )


def _heads(x: torch.Tensor, h: int) -> torch.Tensor:
    """``[..., n, h * d]`` -> ``[..., h, n, d]``."""
    return x.unflatten(-1, (h, -1)).transpose(-3, -2)


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None = None
):
    """Softmax attention as OpenFlamingo computes it (max-subtracted, masked with ``-finfo.max``)."""
    sim = (q * scale) @ k.transpose(-1, -2)
    if mask is not None:
        sim = sim.masked_fill(~mask, -torch.finfo(sim.dtype).max)
    sim = sim - sim.amax(dim=-1, keepdim=True).detach()
    return sim.softmax(dim=-1)


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, dim_head: int = 64, heads: int = 8):
        super().__init__()
        self.scale, self.heads = dim_head**-0.5, heads
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

    def __init__(
        self,
        dim: int,
        depth: int = 6,
        dim_head: int = 64,
        heads: int = 8,
        num_latents: int = 64,
        ff_mult: float = 4,
    ):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads), feed_forward(dim, ff_mult)])
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[:2]
        latents = self.latents.expand(b, t, *self.latents.shape)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm(latents)


class MaskedCrossAttention(nn.Module):
    def __init__(
        self,
        dim: int,
        dim_visual: int,
        dim_head: int = 64,
        heads: int = 8,
        only_attend_immediate_media: bool = True,
    ):
        super().__init__()
        self.scale, self.heads = dim_head**-0.5, heads
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

    def __init__(
        self,
        dim: int,
        dim_visual: int,
        dim_head: int = 64,
        heads: int = 8,
        ff_mult: float = 4,
        only_attend_immediate_media: bool = True,
    ):
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
    raise TypeError(
        f"Flamingo needs an open_clip VisionTransformer or ModifiedResNet tower, got {type(visual).__name__}"
    )


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
        raise ValueError(
            f"no known decoder-layer list for model_type {model_type!r}; known: "
            f"{sorted(DECODER_LAYERS)}. Give decoder_layers_attr (e.g. 'model.layers') in flamingo.json"
        )
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

    def __init__(
        self,
        vision_encoder: nn.Module,
        lang_model: nn.Module,
        media_token_id: int,
        eoc_token_id: int,
        cross_attn_every_n_layers: int = 1,
        perceiver: Mapping | None = None,
        xattn: Mapping | None = None,
        decoder_layers_attr_name: str | None = None,
    ):
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
        self.gated_cross_attn = nn.ModuleDict(
            {
                str(i): GatedCrossAttentionBlock(self.lang_dim, self.vis_dim, **self.xattn_cfg)
                for i in range(len(layers))
                if (i + 1) % self.cross_attn_every_n_layers == 0
            }
        )
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
    def forward(
        self,
        input_ids: torch.Tensor,
        media: torch.Tensor | None = None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        use_cache: bool = False,
        media_offset: torch.Tensor | None = None,
        **lm_kwargs,
    ):
        """LM forward with cross-attention to ``media``. ``media_offset [B]``: images already consumed by the
        cached prefix (decoding steps after the prompt), so new tokens see the latest of them."""
        if media is None:
            media = torch.zeros(
                input_ids.shape[0],
                0,
                1,
                self.vis_dim,
                device=input_ids.device,
                dtype=self.perceiver.latents.dtype,
            )
        text_time = (input_ids == self.media_token_id).cumsum(-1)
        if media_offset is not None:
            text_time = text_time + media_offset.to(text_time.device)[:, None]
        if text_time.numel() and int(text_time.max()) > media.shape[1]:
            raise ValueError(
                f"the text has {int(text_time.max())} <image> tokens but only {media.shape[1]} images "
                "were given"
            )
        if torch.is_grad_enabled() and _activation_checkpointing(self.lang_model):
            # the recomputation in backward would run after the media context below is cleared
            raise RuntimeError(
                "Flamingo does not support gradient checkpointing of its language model; "
                "disable it (lang_model.gradient_checkpointing_disable())"
            )
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
        return {
            k: v for k, v in self.state_dict().items() if k.startswith(("perceiver.", "gated_cross_attn."))
        }
