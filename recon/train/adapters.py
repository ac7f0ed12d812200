"""LoRA (peft) on the captioner and the UNet, their trainable state, and the exports recon's presets load.

* captioner: ``peft.get_peft_model`` on the BLIP model -> ``OUT/captioner_adapter/`` (adapter_config.json +
  adapter_model.safetensors), loaded by ``CaptionerConfig.adapter`` (``PeftModel.from_pretrained``);
* UNet: ``unet.add_adapter`` (diffusers' peft integration, as train_text_to_image_lora.py) ->
  ``OUT/sd_lora/pytorch_lora_weights.safetensors``, loaded by ``GeneratorConfig.lora``
  (``StableDiffusionPipeline.load_lora_weights``); rank and alpha travel in the file's metadata.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from recon.captioners.flamingo import LORA_TARGETS
from recon.config import ConfigError
from recon.runs import swap_dir
from recon.train.config import CAPTIONER_TARGETS, UNET_TARGETS, AdapterConfig

CAPTIONER_ADAPTER_DIR = "captioner_adapter"
SD_LORA_DIR = "sd_lora"
SD_LORA_FILE = "pytorch_lora_weights.safetensors"


def target_regex(targets: str, presets: dict[str, str]) -> str | None:
    """A preset name or a regex -> the regex peft full-matches against module names; ``none`` -> None."""
    if targets in ("", "none"):
        return None
    return presets.get(targets, targets)


def _lora_config(cfg: AdapterConfig, regex: str, init="gaussian"):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha if cfg.alpha is not None else cfg.rank,
        lora_dropout=cfg.dropout,
        target_modules=regex,
        init_lora_weights=init,
    )


def _check_matched(model: nn.Module, regex: str, where: str) -> None:
    import re

    if not any(re.fullmatch(regex, name) for name, _ in model.named_modules()):
        raise ConfigError(
            f"{where}.targets={regex!r} matches no module of the model; name a preset "
            f"or a regex over names such as {next(n for n, _ in model.named_modules() if n)!r}"
        )


def add_captioner_lora(model: nn.Module, cfg: AdapterConfig) -> nn.Module:
    """Freeze the captioner; return a peft ``PeftModel`` with LoRA on the targets (or the frozen model)."""
    model.requires_grad_(False)
    regex = target_regex(cfg.targets, {**CAPTIONER_TARGETS, "flamingo": LORA_TARGETS})
    if regex is None:
        return model
    from peft import get_peft_model

    _check_matched(model, regex, "captioner_lora")
    return get_peft_model(model, _lora_config(cfg, regex, init=True))


def add_unet_lora(unet: nn.Module, cfg: AdapterConfig) -> None:
    """Freeze the UNet and add LoRA layers on the targets in place (diffusers ``add_adapter``)."""
    unet.requires_grad_(False)
    regex = target_regex(cfg.targets, UNET_TARGETS)
    if regex is not None:
        _check_matched(unet, regex, "unet_lora")
        unet.add_adapter(_lora_config(cfg, regex))


def trainable(module: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


class TrainState:
    """What a checkpoint holds besides optimizer / scheduler / RNG: the step and the LoRA weights only.

    Registered with ``accelerator.register_for_checkpointing``; a checkpoint is a few MB, not the base models.
    """

    def __init__(self, modules: dict[str, nn.Module]):
        self.step = 0
        self.modules = modules

    def state_dict(self) -> dict:
        state: dict = {"step": self.step}
        for key, module in self.modules.items():
            state.update({f"{key}/{n}": p.detach().cpu().clone() for n, p in trainable(module).items()})
        return state

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        for key, module in self.modules.items():
            params = trainable(module)
            missing = [n for n in params if f"{key}/{n}" not in state]
            if missing:
                raise RuntimeError(
                    f"checkpoint lacks {len(missing)} {key} LoRA weights (e.g. {missing[0]}): "
                    "it was written with other LoRA settings; start a new --out"
                )
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(state[f"{key}/{n}"])


# ----------------------------------------------------------------------------------------------- exports
def replace_dir(write: Callable[[Path], None], final: Path) -> Path:
    """Write a directory under a temporary name, then swap it in: readers see the old one or the new one."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    fsync_tree(tmp)
    return swap_dir(tmp, final)


def fsync_tree(root: Path) -> None:
    """fsync every file (written by libraries, some through 0600 temp files: made readable like open() would)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in sorted(Path(root).rglob("*")):
        if path.is_file():
            os.chmod(path, 0o666 & ~umask)
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def export_captioner_adapter(
    peft_model: nn.Module, out_dir: Path, base_model: str | None = None
) -> Path | None:
    """``out_dir/captioner_adapter`` in peft's layout; None when the captioner was not adapted. ``base_model``: the
    ``captioner.model`` it was trained on, recorded as ``base_model_name_or_path`` (portable, unlike the resolved
    local path peft would write) so that loading it onto another captioner is warned about."""
    if not hasattr(peft_model, "peft_config"):
        return None
    if base_model is not None:
        for config in peft_model.peft_config.values():
            config.base_model_name_or_path = base_model
    return replace_dir(
        lambda d: peft_model.save_pretrained(str(d), safe_serialization=True),
        Path(out_dir) / CAPTIONER_ADAPTER_DIR,
    )


def export_sd_lora(unet: nn.Module, out_dir: Path) -> Path | None:
    """``out_dir/sd_lora/pytorch_lora_weights.safetensors`` as diffusers' LoRA scripts write it."""
    if not getattr(unet, "peft_config", None):
        return None
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    layers = {k: v.detach().float().cpu().contiguous() for k, v in layers.items()}
    metadata = unet.peft_config["default"].to_dict()

    def write(d: Path) -> None:
        StableDiffusionPipeline.save_lora_weights(
            save_directory=str(d),
            unet_lora_layers=layers,
            safe_serialization=True,
            unet_lora_adapter_metadata=metadata,
        )

    return replace_dir(write, Path(out_dir) / SD_LORA_DIR)
