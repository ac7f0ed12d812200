"""Checkpoints of ``recon finetune``: atomic saves (a kill at any point leaves the previous checkpoint complete), and
resume from the newest one that loads. Nothing in a checkpoint needs unpickling (see :func:`save_checkpoint`)."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from recon.runs import swap_dir
from recon.train import adapters

log = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def load_checkpoint(accelerator, path: Path, state: adapters.TrainState, lr_scheduler) -> None:
    """Resume from ``path`` (see :func:`save_checkpoint`); stops with a clear error on a file it cannot trust."""
    from safetensors.torch import load_file

    for name in (LORA_FILE, TRAINER_FILE):
        if not (path / name).is_file():
            raise ValueError(
                f"{path}: no {name} (a checkpoint of an older recon, or damaged); start a new --out"
            )
    try:
        accelerator.load_state(str(path))
        trainer = json.loads((path / TRAINER_FILE).read_text())
        tensors = load_file(str(path / LORA_FILE))
    except Exception as e:  # a damaged file, or a planted pickle that weights_only=True refused to run
        raise ValueError(
            f"{path}: cannot resume from this checkpoint ({type(e).__name__}: {str(e)[:300]}); start a new "
            "--out if no earlier checkpoint loads"
        ) from None
    state.load_state_dict({"step": trainer["step"], **tensors})
    lr_scheduler.load_state_dict(trainer["lr_scheduler"])


def resume(accelerator, root: Path, state: adapters.TrainState, lr_scheduler) -> Path | None:
    """Load the newest checkpoint that loads; a damaged one (a truncated optimizer file, a planted pickle) is
    renamed ``.damaged-checkpoint-N`` (kept, never deleted) with a warning, and the previous one is tried. None:
    no checkpoint (a fresh start); every checkpoint damaged: the error of the newest, after setting them aside."""
    found = (
        sorted(
            (
                (int(m.group(1)), p)
                for p in root.iterdir()
                if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))
            ),
            reverse=True,
        )
        if root.is_dir()
        else []
    )
    errors = []
    for _, path in found:
        try:
            load_checkpoint(accelerator, path, state, lr_scheduler)
            return path
        except ValueError as e:
            errors.append(e)
            log.warning("%s; trying the previous checkpoint", e)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                set_aside(path)
            accelerator.wait_for_everyone()
    if errors:
        raise ValueError(
            f"{errors[0]} (no earlier checkpoint loads either; each was renamed .damaged-*: restore "
            "one, or rerun to train from step 0)"
        )
    return None


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint ``.damaged-<name>`` (``.damaged-<name>.2``, ... when the same step was damaged
    before: nothing set aside is overwritten)."""
    target, n = path.with_name(f".damaged-{path.name}"), 1
    while os.path.lexists(target):
        n += 1
        target = path.with_name(f".damaged-{path.name}.{n}")
    path.rename(target)
    return target


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint (temporary names of an interrupted save are ignored)."""
    if not root.is_dir():
        return None
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))
    ]
    return max(found)[1] if found else None


LORA_FILE, TRAINER_FILE = "lora.safetensors", "trainer_state.json"


def save_checkpoint(accelerator, root: Path, keep: int, state: adapters.TrainState, lr_scheduler) -> Path:
    """``accelerator.save_state`` into ``.checkpoint-N.tmp``, fsync, rename to ``checkpoint-N``, drop the oldest
    beyond ``keep``. A kill at any point leaves the previous checkpoint complete and the newest one loadable.

    Nothing in it needs unpickling: accelerate writes the optimizer and RNG states (loaded back with
    ``weights_only=True``); the LoRA weights go to ``lora.safetensors`` and the step and LR-scheduler state to
    ``trainer_state.json`` (accelerate's ``register_for_checkpointing`` would pickle them and load the pickle with
    ``weights_only=False``: resuming a shared run directory could run code)."""
    from safetensors.torch import save_file

    step = state.step
    final, tmp = root / f"checkpoint-{step:08d}", root / f".checkpoint-{step:08d}.tmp"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tensors = {k: v.contiguous() for k, v in state.state_dict().items() if k != "step"}
        save_file(tensors, str(tmp / LORA_FILE))
        trainer = {"step": step, "lr_scheduler": lr_scheduler.state_dict()}
        (tmp / TRAINER_FILE).write_text(json.dumps(trainer))
    if accelerator.is_main_process:
        adapters.fsync_tree(tmp)
        swap_dir(tmp, final)  # the same step saved again (a rerun after a kill) is swapped out first
        for stale in root.glob(".checkpoint-*.tmp"):  # leftovers of interrupted saves
            shutil.rmtree(stale, ignore_errors=True)
        found = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_RE.match(p.name)))
        for _, old in found[:-keep] if keep > 0 else []:
            trash = old.with_name(
                f".{old.name}.tmp"
            )  # renamed first: a kill mid-delete leaves no half checkpoint
            os.rename(old, trash)
            shutil.rmtree(trash, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
