"""Model selection for a finished ``recon finetune`` run: of its checkpoints (and the untrained start), the one
whose adapters do best on the labelled pool's held-out slice (``data.selection_pairs``), exported to
``OUT/selected/``; ``OUT/selection.json`` records every candidate's loss.

The rule is the same for every arm of an experiment, so a baseline that overfits its few labelled pairs is stopped
where its held-out loss is lowest, as a practitioner would stop it. Criteria (lower is better):

  caption_nll  the captioner's mean token NLL of the held-out pairs' captions (eval mode, no label smoothing)
  denoise      the UNet's noise MSE on the held-out pairs, under fixed noise and timesteps (``draws`` per pair),
               the same draws for every candidate

Keep every checkpoint the rule should see: ``train.checkpoint_every`` K and ``train.checkpoints_total_limit`` at
least ``steps / K``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from recon.data import atomic_write_text
from recon.train import adapters
from recon.train.checkpoints import CHECKPOINT_RE, LORA_FILE
from recon.train.data import make_pairs
from recon.train.diffusion import Diffusion
from recon.train.joint import export_adapters, load_roles
from recon.train.losses import captioning_nll, eval_mode

CRITERIA = ("caption_nll", "denoise")
SELECTED_DIR = "selected"
SELECTION_FILE = "selection.json"


def checkpoints(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    return sorted(
        (int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))
    )


@torch.no_grad()
def selection_loss(
    criterion: str, captioner, diffusion, batch, seed: int, draws: int = 4, chunk: int = 32
) -> float:
    """The held-out loss of the current adapters (lower is better)."""
    n = batch.images.shape[0]
    if criterion == "caption_nll":
        total, tokens = 0.0, 0
        with eval_mode(captioner.model):
            for start in range(0, n, chunk):
                pixels = captioner.preprocess_tensor(batch.images[start : start + chunk].to(captioner.device))
                logits, labels = captioner.teacher_forced_logits(
                    pixels, batch.captions[start : start + chunk]
                )
                k = int((labels != -100).sum())
                total += float(captioning_nll(logits, labels)) * k
                tokens += k
        return total / max(tokens, 1)
    if criterion == "denoise":
        g = torch.Generator(diffusion.device).manual_seed(seed)
        latents = diffusion.encode(batch.images, g).repeat_interleave(draws, 0)
        noisy, target, t = diffusion.noised(latents, g)
        states = diffusion.text_states(batch.captions).repeat_interleave(draws, 0)
        with eval_mode(diffusion.unet):
            errors = [
                (
                    diffusion.predict(noisy[i : i + chunk], t[i : i + chunk], states[i : i + chunk]).float()
                    - target[i : i + chunk].float()
                )
                .pow(2)
                .mean()
                * len(t[i : i + chunk])
                for i in range(0, len(t), chunk)
            ]
        return float(sum(errors) / len(t))
    raise ValueError(f"selection criterion {criterion!r}: expected one of {', '.join(CRITERIA)}")


def select_checkpoint(cfg, out: str | Path, criterion: str = "caption_nll") -> dict:
    """Score the start (step 0) and every checkpoint of the run in ``out`` on the held-out slice; export the
    best one's adapters to ``out/selected`` and write ``out/selection.json`` (returned). Ties go to the earlier
    step. Done once: a run with ``selection.json`` and its export returns the record."""
    out = Path(out)
    record_path = out / SELECTION_FILE
    if record_path.is_file() and (out / SELECTED_DIR).is_dir():
        return json.loads(record_path.read_text())
    if not cfg.data.selection_pairs:
        raise ValueError("model selection needs a held-out slice: set data.selection_pairs")
    from safetensors.torch import load_file

    device, seed = torch.device("cpu"), cfg.train.seed
    captioner, pipe = load_roles(cfg, device, torch.float32, seed=seed)
    resolution = int(pipe.unet.config.sample_size * pipe.vae_scale_factor)
    batch = make_pairs(cfg.data, cfg.data.resolution or resolution, seed).selection_batch()
    diffusion = Diffusion(pipe)
    state = adapters.TrainState({"captioner": captioner.model, "unet": pipe.unet})
    start = {k: v.clone() for k, v in state.state_dict().items() if k != "step"}
    candidates = [(0, start)] + [(step, path) for step, path in checkpoints(out / "checkpoints")]
    losses = {}
    for step, source in candidates:
        state.load_state_dict(
            {
                "step": step,
                **(source if isinstance(source, dict) else load_file(str(Path(source) / LORA_FILE))),
            }
        )
        losses[step] = selection_loss(criterion, captioner, diffusion, batch, seed)
    best = min(losses, key=lambda s: (losses[s], s))
    source = dict(candidates)[best]
    state.load_state_dict(
        {"step": best, **(source if isinstance(source, dict) else load_file(str(Path(source) / LORA_FILE)))}
    )
    export_adapters(captioner.model, pipe.unet, out / SELECTED_DIR, cfg.captioner.model)
    record = {
        "criterion": criterion,
        "selection_pairs": len(batch.captions),
        "best_step": best,
        "losses": {str(k): round(v, 6) for k, v in losses.items()},
    }
    atomic_write_text(record_path, json.dumps(record, indent=1) + "\n")
    return record
