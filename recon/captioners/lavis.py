"""Original BLIP / LAVIS captioning checkpoints (``.pth``) onto transformers' ``BlipForConditionalGeneration``.

The paper used ``model_base_caption_capfilt_large.pth`` from salesforce/BLIP; LAVIS' ``blip_caption`` checkpoints
have the same layout (``{"model": state_dict, ...}``): a timm-style ViT under ``visual_encoder.`` and a BERT
LM-head decoder under ``text_decoder.``. transformers keeps BLIP's fused ``qkv`` projection and BERT's module
names, so conversion is a renaming of the vision keys plus dropping the decoder's ``position_ids`` buffer;
``pos_embed`` is resized bicubically when the checkpoint was trained at another image size, as BLIP's own
loader does. salesforce-lavis itself is not needed (it pins an ancient transformers).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from recon import hub

log = logging.getLogger(__name__)

# (original BLIP key, transformers key); {i} is a layer index, {p} the rest of the key.
KEY_PAIRS = [
    ("visual_encoder.cls_token", "vision_model.embeddings.class_embedding"),
    ("visual_encoder.pos_embed", "vision_model.embeddings.position_embedding"),
    ("visual_encoder.patch_embed.proj.{p}", "vision_model.embeddings.patch_embedding.{p}"),
    ("visual_encoder.blocks.{i}.norm1.{p}", "vision_model.encoder.layers.{i}.layer_norm1.{p}"),
    ("visual_encoder.blocks.{i}.attn.qkv.{p}", "vision_model.encoder.layers.{i}.self_attn.qkv.{p}"),
    ("visual_encoder.blocks.{i}.attn.proj.{p}", "vision_model.encoder.layers.{i}.self_attn.projection.{p}"),
    ("visual_encoder.blocks.{i}.norm2.{p}", "vision_model.encoder.layers.{i}.layer_norm2.{p}"),
    ("visual_encoder.blocks.{i}.mlp.{p}", "vision_model.encoder.layers.{i}.mlp.{p}"),
    ("visual_encoder.norm.{p}", "vision_model.post_layernorm.{p}"),
    ("text_decoder.{p}", "text_decoder.{p}"),
]
POSITION_IDS = "text_decoder.bert.embeddings.position_ids"  # a persistent buffer in BLIP's med.py, not in HF
POS_EMBED = "vision_model.embeddings.position_embedding"
# Tied in both implementations; a checkpoint may store only one side of each pair.
TIED = {
    "text_decoder.cls.predictions.decoder.weight": "text_decoder.bert.embeddings.word_embeddings.weight",
    "text_decoder.cls.predictions.decoder.bias": "text_decoder.cls.predictions.bias",
}


class CheckpointMismatchError(ValueError):
    """An original BLIP checkpoint does not fit the model; the message names every offending key."""


def _compile(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>.+)")
    return re.compile(pattern + "$")


_TO_HF = [(_compile(orig), hf) for orig, hf in KEY_PAIRS]
_TO_ORIGINAL = [(_compile(hf), orig) for orig, hf in KEY_PAIRS]


def _rename(key: str, table) -> str | None:
    for pattern, template in table:
        m = pattern.match(key)
        if m:
            return template.format(**m.groupdict())
    return None


def hf_key(original_key: str) -> str:
    """The transformers name of an original BLIP key (unchanged when it has none)."""
    return _rename(original_key, _TO_HF) or original_key


def original_key(hf_name: str) -> str:
    return _rename(hf_name, _TO_ORIGINAL) or hf_name


def convert_blip_state_dict(original_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original BLIP / LAVIS caption state dict -> ``BlipForConditionalGeneration`` state dict.

    Keys without a transformers counterpart (``text_encoder.*`` of a pretraining checkpoint, momentum encoders,
    BLIP-2's ``Qformer.*``) are kept under their original names, so loading reports them as unexpected.
    """
    out = {hf_key(k): v for k, v in original_sd.items() if k != POSITION_IDS}
    for a, b in TIED.items():
        if a not in out and b in out:
            out[a] = out[b]
        elif b not in out and a in out:
            out[b] = out[a]
    return out


def to_original_blip_state_dict(hf_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`convert_blip_state_dict`: what BLIP's ``BLIP_Decoder.state_dict()`` looks like."""
    unknown = sorted(k for k in hf_sd if _rename(k, _TO_ORIGINAL) is None)
    if unknown:
        raise KeyError(f"not BlipForConditionalGeneration keys: {', '.join(unknown[:10])}")
    out = {original_key(k): v for k, v in hf_sd.items()}
    n_pos = hf_sd["text_decoder.bert.embeddings.position_embeddings.weight"].shape[0]
    out[POSITION_IDS] = torch.arange(n_pos).unsqueeze(0)
    return out


def unwrap_checkpoint(obj) -> dict[str, torch.Tensor]:
    """BLIP and LAVIS save ``{"model": state_dict, "optimizer": ..., "config": ...}``; accept a bare dict too."""
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            return obj[key]
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise CheckpointMismatchError("not a BLIP checkpoint: expected a state dict or {'model': state_dict}")


def resize_pos_embed(pos_embed: torch.Tensor, num_positions: int) -> torch.Tensor:
    """``[1, 1 + g*g, D]`` -> ``[1, num_positions, D]``: the class token kept, the patch grid resized bicubically."""
    old, new = int(round((pos_embed.shape[1] - 1) ** 0.5)), int(round((num_positions - 1) ** 0.5))
    if old * old + 1 != pos_embed.shape[1] or new * new + 1 != num_positions:
        raise CheckpointMismatchError(
            f"{POS_EMBED}: cannot resize a non-square grid "
            f"({pos_embed.shape[1]} -> {num_positions} positions)"
        )
    grid = pos_embed[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new * new, -1).to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :1], grid], dim=1)


@dataclass
class LoadReport:
    loaded: int
    unexpected: list[str] = field(default_factory=list)  # original names, ignored
    resized: list[str] = field(default_factory=list)


def load_original_blip_checkpoint(model, path: str | Path, strict: bool = False) -> LoadReport:
    """Load an original BLIP / LAVIS caption ``.pth`` into ``model`` (a ``BlipForConditionalGeneration``).

    Missing keys and shape mismatches raise :class:`CheckpointMismatchError` naming each key in both layouts.
    Keys the captioner does not use (e.g. a pretraining checkpoint's ``text_encoder.*``) are logged and ignored,
    as BLIP's own loader does, unless ``strict``.
    """
    original = unwrap_checkpoint(hub.load_safetensors_or_pt(path))
    sd = convert_blip_state_dict(original)
    expected = model.state_dict()
    report = LoadReport(loaded=0)
    if (
        POS_EMBED in sd
        and POS_EMBED in expected
        and sd[POS_EMBED].shape != expected[POS_EMBED].shape
        and sd[POS_EMBED].shape[-1] == expected[POS_EMBED].shape[-1]
    ):
        sd[POS_EMBED] = resize_pos_embed(sd[POS_EMBED], expected[POS_EMBED].shape[1])
        report.resized.append(original_key(POS_EMBED))

    def both(k: str) -> str:
        return f"{original_key(k)} (transformers: {k})"

    missing = [both(k) for k in expected if k not in sd]
    mismatched = [
        f"{both(k)}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in sd and sd[k].shape != expected[k].shape
    ]
    report.unexpected = sorted(original_key(k) for k in sd if k not in expected)
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s) the model needs: " + ", ".join(missing))
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): " + "; ".join(mismatched))
    if strict and report.unexpected:
        problems.append(f"{len(report.unexpected)} unexpected key(s): " + ", ".join(report.unexpected))
    if problems:
        raise CheckpointMismatchError(f"{path}: " + "; ".join(problems))
    if report.unexpected:
        log.warning(
            "%s: ignoring %d key(s) the captioner does not use: %s",
            path,
            len(report.unexpected),
            ", ".join(report.unexpected[:20]) + (" ..." if len(report.unexpected) > 20 else ""),
        )
    model.load_state_dict({k: sd[k] for k in expected}, strict=True)
    report.loaded = len(expected)
    return report
