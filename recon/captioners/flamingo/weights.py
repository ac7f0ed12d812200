"""OpenFlamingo checkpoints and recon's own saved Flamingos: what to build (``FlamingoSpec`` from a release id or a
``flamingo.json``), building and loading it, saving it, and the OpenFlamingo state-dict key map."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from recon import hub
from recon.captioners.flamingo.model import Flamingo, _input_embeddings, get_path
from recon.captioners.flamingo.prompts import EOC_TOKEN, MEDIA_TOKEN, PAD_TOKEN

log = logging.getLogger(__name__)


# OpenFlamingo v2 releases (all CLIP ViT-L-14 openai). COCO CIDEr reported by OpenFlamingo: 3B 74.9 / 77.3 / 93.0
# at 0 / 4 / 32 shots; 4-shot: 3B 77.3, 4B 81.8, 9B 89.0. Flamingo-3B (DeepMind): 73.0 / 85.0 / 99.0.
_VITL = dict(vision="ViT-L-14", vision_pretrained="openai")
OPENFLAMINGO_RELEASES: dict[str, dict] = {
    "openflamingo/OpenFlamingo-3B-vitl-mpt1b": dict(
        _VITL, lang_model="anas-awadalla/mpt-1b-redpajama-200b", cross_attn_every_n_layers=1
    ),
    "openflamingo/OpenFlamingo-3B-vitl-mpt1b-langinstruct": dict(
        _VITL, lang_model="anas-awadalla/mpt-1b-redpajama-200b-dolly", cross_attn_every_n_layers=1
    ),
    "openflamingo/OpenFlamingo-4B-vitl-rpj3b": dict(
        _VITL, lang_model="togethercomputer/RedPajama-INCITE-Base-3B-v1", cross_attn_every_n_layers=2
    ),
    "openflamingo/OpenFlamingo-4B-vitl-rpj3b-langinstruct": dict(
        _VITL, lang_model="togethercomputer/RedPajama-INCITE-Instruct-3B-v1", cross_attn_every_n_layers=2
    ),
    "openflamingo/OpenFlamingo-9B-vitl-mpt7b": dict(
        _VITL, lang_model="anas-awadalla/mpt-7b", cross_attn_every_n_layers=4
    ),
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
        spec.weights = checkpoint or str(
            Path(hub.resolve(model_id, "OpenFlamingo checkpoint", "captioner.model")) / "checkpoint.pt"
        )
        return spec
    root = Path(hub.resolve(model_id, "captioner", "captioner.model"))
    meta_path = root / "flamingo.json"
    if not meta_path.is_file():
        raise ValueError(
            f"captioner.model={model_id!r}: {root} has no flamingo.json and is not an OpenFlamingo "
            f"release ({', '.join(OPENFLAMINGO_RELEASES)}); see recon.captioners.flamingo's docstring"
        )
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
        raise ValueError(
            f"{spec.lang_model} runs code from its own repository (no transformers class); recon does "
            "not trust remote code by default. Opt in with RECON_TRUST_REMOTE_CODE=1, or "
            '"trust_remote_code": true in the model folder\'s flamingo.json'
        )
    remote = dict(trust_remote_code=True) if trusted else {}
    if remote:
        log.warning(
            "loading %s with trust_remote_code=True (code from that repository runs)", spec.lang_model
        )
    tokenizer = AutoTokenizer.from_pretrained(tok_path, **remote)
    tokenizer.add_special_tokens({"additional_special_tokens": [EOC_TOKEN, MEDIA_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    lang_model = AutoModelForCausalLM.from_pretrained(lm_path, **remote)
    try:
        lang_model.get_input_embeddings()
    except (
        AttributeError,
        NotImplementedError,
    ):  # MosaicGPT (mpt-1b): patched as OpenFlamingo's factory does
        lang_model.get_input_embeddings = lambda: lang_model.transformer.wte
        lang_model.set_input_embeddings = lambda emb: setattr(lang_model.transformer, "wte", emb)
    if lang_model.get_input_embeddings().num_embeddings != len(tokenizer):
        lang_model.resize_token_embeddings(len(tokenizer))
    vision = str(spec.root / spec.vision) if spec.root and (spec.root / spec.vision).exists() else spec.vision
    if spec.vision_sha256:
        found = vision_weights_sha256(hub.resolve(vision, "Flamingo vision tower", "captioner.model"))
        if found != spec.vision_sha256:
            raise ValueError(
                f"vision tower {spec.vision} is not the one this Flamingo was trained with (weights "
                f"sha256 {found} != {spec.vision_sha256}); retrain the perceiver and cross-attention "
                "on it (shapes: recon shapes train --component flamingo)"
            )
    clip, preprocess_cfg, _ = hub.load_open_clip(
        vision, spec.vision_pretrained, torch.device("cpu"), field="captioner.model"
    )
    model = Flamingo(
        clip.visual,
        lang_model,
        tokenizer.convert_tokens_to_ids(MEDIA_TOKEN),
        tokenizer.convert_tokens_to_ids(EOC_TOKEN),
        spec.cross_attn_every_n_layers,
        spec.perceiver,
        spec.xattn,
        spec.decoder_layers_attr,
    )
    if spec.weights:
        path = spec.part(spec.weights, "Flamingo weights")
        load_openflamingo_state_dict(model, hub.load_safetensors_or_pt(path), where=path)
    else:
        log.warning(
            "%s: no weights file: perceiver and cross-attention are untrained (gates 0: the bare LM)",
            spec.lang_model,
        )
    return model.to(device=device, dtype=dtype).eval(), tokenizer, preprocess_cfg


def vision_weights_sha256(path: str | Path) -> str | None:
    """sha256 of an open_clip model folder's weights file (None if there is none)."""
    import hashlib

    for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        if (Path(path) / name).is_file():
            return hashlib.sha256((Path(path) / name).read_bytes()).hexdigest()
    return None


def save_flamingo(
    model: Flamingo,
    tokenizer,
    out: str | Path,
    vision: str,
    vision_pretrained: str | None = None,
    half: bool = False,
    vision_sha256: str | None = None,
) -> Path:
    """Write ``out/`` loadable as ``captioner.model``: ``lm/`` (the LM and tokenizer, Hugging Face layout),
    ``flamingo.safetensors`` (perceiver, cross-attention and LM embeddings under OpenFlamingo's keys) and
    ``flamingo.json``. ``vision`` is the hub.load_open_clip spec of the tower (an id, not copied)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if half else torch.float32
    lm_state = {k: v.detach().to(dtype).contiguous() for k, v in model.lang_model.state_dict().items()}
    model.lang_model.save_pretrained(out / "lm", state_dict=lm_state)
    tokenizer.save_pretrained(out / "lm")
    state = {k: v.detach().to(dtype).contiguous() for k, v in to_openflamingo_state_dict(model).items()}
    save_file(state, str(out / "flamingo.safetensors"))
    meta = dict(
        format="recon-flamingo",
        version=1,
        lang_model="lm",
        tokenizer="lm",
        vision=vision,
        vision_pretrained=vision_pretrained,
        cross_attn_every_n_layers=model.cross_attn_every_n_layers,
        perceiver=model.perceiver_cfg,
        xattn=model.xattn_cfg,
        decoder_layers_attr=model.decoder_layers_attr,
        weights="flamingo.safetensors",
        vision_sha256=vision_sha256,
    )
    (out / "flamingo.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


# ----------------------------------------------------------------------------------------------- OpenFlamingo keys
_GATES = {"attn_gate": "attn_gate.alpha", "ff_gate": "ff_gate.alpha"}
_DUPLICATES = ("lang_encoder.gated_cross_attn_layers.", "lang_encoder.old_decoder_blocks.")
_BUFFER_SUFFIXES = (
    ".inv_freq",
    ".masked_bias",
    "attention.bias",
    "attn.bias",
    "attn_bias",
)  # old transformers


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
        i, sub, rest = key[len(f"lang_encoder.{attr}.") :].split(".", 2)
        if sub == "gated_cross_attn_layer":
            return "trainable", f"gated_cross_attn.{i}.{_GATES.get(rest, rest)}"
        if sub == "decoder_layer":
            return "lm", f"{attr}.{i}.{rest}"
        return None
    if key.startswith("lang_encoder."):
        return "lm", key[len("lang_encoder.") :]
    if key.startswith("vision_encoder."):
        return "vision", key[len("vision_encoder.") :]
    return None


class CheckpointKeyError(KeyError):
    """An OpenFlamingo checkpoint does not fit the model; the message names the keys."""

    def __str__(self) -> str:
        return str(self.args[0])


def _names(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_openflamingo_state_dict(
    model: Flamingo, state: Mapping[str, torch.Tensor], where: str = "checkpoint"
) -> dict[str, list[str]]:
    """Load an OpenFlamingo ``checkpoint.pt`` state dict (or ours from :func:`to_openflamingo_state_dict`).

    Every perceiver / cross-attention weight and the LM input embeddings must be present; LM and vision weights are
    optional (OpenFlamingo's checkpoints omit the frozen ones). Raises :class:`CheckpointKeyError` naming missing,
    unexpected or mis-shaped keys. Returns ``{"loaded": [...], "ignored": [...]}`` (ignored: duplicate views and
    buffers old transformers versions saved).
    """
    if "model_state_dict" in state:
        state = state["model_state_dict"]
    state = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}
    ours = {
        "trainable": model.state_dict(),
        "lm": model.lang_model.state_dict(),
        "vision": model.vision_encoder.state_dict(),
    }
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
        hint = (
            f" -- the model has cross-attention before every {model.cross_attn_every_n_layers}. layer of "
            f"{len(get_path(model.lang_model, model.decoder_layers_attr))} ({model.decoder_layers_attr}); "
            "a different LM or cross_attn_every_n_layers than the checkpoint was trained with?"
        )
        raise CheckpointKeyError(f"{where} does not fit this Flamingo: " + "; ".join(problems) + hint)
    current = model.state_dict()
    with torch.no_grad():
        for k, v in updates.items():
            current[k].copy_(v.to(current[k].dtype))
    return {"loaded": sorted(updates), "ignored": sorted(ignored)}
