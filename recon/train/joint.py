"""``recon finetune``: joint LoRA finetuning of the captioner and the generator, with reconstruction regularisers.

Reads top to bottom, like diffusers' train_text_to_image_lora.py: config -> Accelerator -> load the two roles
-> LoRA on both (fp32 under mixed precision) -> bridge and objective -> optimizer -> resume -> the loop
(micro-batches, one optimizer step, log, checkpoint, validate) -> exports.

Run directory ``OUT``::

    finetune.yaml              the resolved config (a rerun with the same OUT resumes; see train.config.RESUMABLE_KEYS)
    bridge.json                the vocabulary index's coverage
    metrics.jsonl              one record per optimizer step (unweighted loss terms, total, lr, grad norm)
    validation.jsonl           one record per validation; samples/step-N.png the grids
    checkpoints/checkpoint-N/  accelerate save_state (LoRA weights, optimizer, scheduler, RNG), written to a
                               temporary name and renamed, so a kill mid-save leaves the previous one loadable
    captioner_adapter/         peft adapter -> CaptionerConfig.adapter
    sd_lora/                   pytorch_lora_weights.safetensors -> GeneratorConfig.lora
    logs/                      TensorBoard (or wandb)

Design notes. The models are not wrapped in DDP: a step may call the UNet k + 2 times before one backward,
which DDP's reducer does not support; instead the LoRA gradients (a few MB) are averaged with one all-reduce
before clipping. Each micro-step draws its noise, timesteps and data from its own seed
(``derive_seed(seed, "train", micro_step, rank)``), so a resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from pathlib import Path

import torch

from recon import fingerprint, hub
from recon.captioners import BACKENDS
from recon.data import atomic_write_text, save_png
from recon.runs import (
    RunError,
    append_jsonl,
    claim_run_dir,
    derive_seed,
    flatten,
    lock_run_dir,
    read_run_config,
    set_aside_bad_lines,
)
from recon.similarity import load_similarity
from recon.train import adapters
from recon.train.bridge import SoftTokenBridge, coverage_line, token_coverage, vocab_index
from recon.train.checkpoints import resume, save_checkpoint
from recon.train.config import FinetuneConfig, changed_keys, resumable_changes
from recon.train.data import INPUTS_FILE, batches, check_inputs, input_fingerprints, make_pairs
from recon.train.diffusion import Diffusion
from recon.train.losses import JointObjective
from recon.train.validation import validate

log = logging.getLogger(__name__)


def finetune(cfg: FinetuneConfig, out: str | Path, stop_after: int | None = None) -> dict:
    """Train (or resume) the run in ``out``; returns the summary. ``stop_after``: stop after that many optimizer
    steps in total, as if killed after its checkpoint (tests, time-boxed jobs)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    out = Path(out)
    t = cfg.train
    started = time.time()
    accelerator = Accelerator(
        mixed_precision=mixed_precision(t.mixed_precision, t.cpu),
        cpu=t.cpu or hub.processes_on_cpu(),
        log_with=None if t.report_to == "none" else t.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    if t.threads is not None or accelerator.num_processes > 1:
        hub.configure_threads(t.threads)
    lock = (
        write_or_check_config(out, cfg) if accelerator.is_main_process else None
    )  # held until training returns (or the process ends)
    try:
        return _train(cfg, out, stop_after, accelerator, started)
    finally:
        if lock is not None:
            lock.close()


def _train(cfg: FinetuneConfig, out: Path, stop_after: int | None, accelerator, started: float) -> dict:
    from accelerate.utils import set_seed

    t = cfg.train
    main, device, rank, world = (
        accelerator.is_main_process,
        accelerator.device,
        accelerator.process_index,
        accelerator.num_processes,
    )
    accelerator.wait_for_everyone()
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )

    # --- the two roles, frozen, with LoRA on the targets (trainable params in fp32; their init is seeded)
    set_seed(t.seed)
    captioner, pipe = load_roles(cfg, device, weight_dtype, seed=t.seed)
    from diffusers.training_utils import cast_training_params

    cast_training_params([captioner.model, pipe.unet], dtype=torch.float32)
    if t.gradient_checkpointing:
        enable_checkpointing(captioner_base(captioner.model))
        pipe.unet.enable_gradient_checkpointing()
    captioner.model.train()
    pipe.unet.train()

    # --- bridge, objective, data
    index = vocab_index(captioner.tokenizer, pipe.tokenizer, hub.cache_root())
    bridge = SoftTokenBridge(index, pipe.text_encoder, pipe.tokenizer, cfg.bridge).to(device)
    diffusion = Diffusion(pipe, gradient_checkpointing=t.gradient_checkpointing)
    objective = JointObjective(
        captioner, diffusion, bridge, cfg.loss, cfg.sampler, image_sim_metrics(cfg, device)
    )
    resolution = int(pipe.unet.config.sample_size * pipe.vae_scale_factor)
    pairs = make_pairs(cfg.data, cfg.data.resolution or resolution, t.seed, judge_dir=judge_dir(cfg))
    if main:
        texts = pairs.caption_texts()
        ids = captioner.tokenizer(texts, add_special_tokens=False).input_ids
        report = dict(
            index.coverage,
            caption_token_coverage=round(token_coverage(index, ids), 4),
            variant=cfg.bridge.variant,
            unmapped=cfg.bridge.unmapped,
        )
        (out / "bridge.json").write_text(json.dumps(report, indent=2) + "\n")
        accelerator.print(
            coverage_line(index.coverage) + f"; {100 * report['caption_token_coverage']:.1f}% of "
            "the training captions' tokens"
        )

    # --- optimizer, schedule, checkpointed state
    from diffusers.optimization import get_scheduler

    groups, model_params = [], {}
    for name, module, opt in (
        ("captioner", captioner.model, cfg.captioner_optim),
        ("unet", pipe.unet, cfg.generator_optim),
    ):
        model_params[name] = list(adapters.trainable(module).values())
        if model_params[name]:
            groups.append(
                {
                    "params": model_params[name],
                    "lr": opt.lr,
                    "weight_decay": opt.weight_decay,
                    "betas": tuple(opt.betas),
                }
            )
    if not groups:
        raise ValueError("nothing to train: captioner_lora.targets and unet_lora.targets are both 'none'")
    params = [p for g in groups for p in g["params"]]
    optimizer = accelerator.prepare(torch.optim.AdamW(groups))
    # not prepared: accelerate would step a prepared scheduler once per process
    lr_scheduler = get_scheduler(
        t.lr_scheduler, optimizer=optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=t.steps
    )
    state = adapters.TrainState({"captioner": captioner.model, "unet": pipe.unet})
    resumed = resume(accelerator, out / "checkpoints", state, lr_scheduler)
    if resumed is not None:
        accelerator.print(f"resumed from {resumed} at step {state.step}")
    if main:
        truncate_records(out, state.step)
    if t.report_to != "none":
        accelerator.init_trackers("recon-finetune", config=tracker_config(cfg))

    # --- validation set (fixed), metric
    val_batch = pairs.val_batch(cfg.data.val_items) if main else None
    val_metric = None

    def run_validation(step: int) -> None:
        nonlocal val_metric
        if not main:
            return

        val_metric = val_metric or load_similarity(
            cfg.validation.metric, device, "validation.metric", role="image"
        )
        with accelerator.autocast():
            v = validate(captioner, pipe, cfg.generator, val_batch, pairs, cfg.validation, val_metric, t.seed)
        save_png(v.grid, out / "samples" / f"step-{step:08d}.png")
        append_jsonl(
            out / "validation.jsonl", {"step": step, **v.metrics, "captions": v.captions[:8]}, allow_nan=True
        )
        accelerator.log(v.metrics, step=step)
        log_grid(accelerator, v.grid, step)
        accelerator.print(
            f"validation step {step}: " + " ".join(f"{k[4:]} {x:.4f}" for k, x in v.metrics.items())
        )

    # --- the loop
    accum, micro_total = t.grad_accum, t.steps * t.grad_accum
    data = batches(pairs, state.step * accum, micro_total, rank, world, t.batch_size, cfg.data.num_workers)
    last_stop = min(t.steps, stop_after) if stop_after is not None else t.steps
    t0, first = time.time(), state.step
    while state.step < last_stop:
        sums, counts, total, examples = defaultdict(float), defaultdict(int), 0.0, 0
        for micro in range(accum):
            micro_step = state.step * accum + micro
            batch = next(data)
            g = torch.Generator(device).manual_seed(derive_seed(t.seed, "train", micro_step, rank))
            with accelerator.autocast():
                terms = objective(
                    batch.images.to(device),
                    batch.captions,
                    objective.direction(micro_step),
                    g,
                    unlabelled=None if batch.unlabelled is None else batch.unlabelled.to(device),
                    texts=batch.texts,
                )
            accelerator.backward(terms.total / accum)
            total += float(terms.total.detach()) / accum
            examples += terms.captioner_examples
            for k, v in terms.values.items():
                sums[k] += v
                counts[k] += 1
        average_gradients(accelerator, params)
        norms = clip_gradients(accelerator, model_params, t.max_grad_norm, t.grad_clip)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1

        record = {
            "step": state.step,
            "loss": total,
            **{k: sums[k] / counts[k] for k in sums},
            **norms,
            "lr": lr_scheduler.get_last_lr()[0],
            "captioner_examples": examples,
        }
        record = reduce_record(accelerator, record)
        if main:
            append_jsonl(out / "metrics.jsonl", record, allow_nan=True)
        accelerator.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=state.step)
        if state.step % t.log_every == 0 or state.step == last_stop:
            rate = (time.time() - t0) / (state.step - first)
            accelerator.print(
                f"step {state.step}/{t.steps} "
                + " ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "step")
                + f" {rate:.2f}s/step"
            )
        if state.step % t.checkpoint_every == 0 or state.step == last_stop:
            save_checkpoint(accelerator, out / "checkpoints", t.checkpoints_total_limit, state, lr_scheduler)
            if main:  # usable adapters at every checkpoint, not only at the end (a stopped run has them too)
                export_adapters(captioner.model, pipe.unet, out, cfg.captioner.model)
        if cfg.validation.every and state.step % cfg.validation.every == 0 and state.step < t.steps:
            run_validation(state.step)
        accelerator.wait_for_everyone()

    summary = {
        "step": state.step,
        "finished": state.step >= t.steps,
        "processes": world,
        "out": str(out),
        "loop_seconds": round(time.time() - t0, 1),
    }
    if main:
        if summary["finished"] and cfg.validation.final:
            run_validation(state.step)
        for name in (adapters.CAPTIONER_ADAPTER_DIR, adapters.SD_LORA_DIR):  # exported at the last checkpoint
            if (out / name).is_dir():
                summary[name] = str(out / name)
        summary["seconds"] = round(time.time() - started, 1)  # this call's wall time: loading, steps, exports
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


# ----------------------------------------------------------------------------------------------- helpers
def export_adapters(captioner_model, unet, out: Path, base_model: str) -> dict[str, Path]:
    """``captioner_adapter/`` and ``sd_lora/`` of the current weights (each swapped in whole)."""
    found = {
        "captioner_adapter": adapters.export_captioner_adapter(captioner_model, out, base_model),
        "sd_lora": adapters.export_sd_lora(unet, out),
    }
    return {k: v for k, v in found.items() if v is not None}


def mixed_precision(setting: str, cpu: bool) -> str:
    """``auto``: fp16 / bf16 if ``accelerate launch --mixed_precision`` (or ``accelerate config``) chose one, else
    bf16 on a GPU that has it, fp16 on other GPUs, fp32 ("no") on the CPU. The launcher's "no" is its default,
    not a choice, so it does not count: ask for fp32 on a GPU with ``train.mixed_precision=no``."""
    if setting != "auto":
        return setting
    if os.environ.get("ACCELERATE_MIXED_PRECISION", "no") in ("fp16", "bf16"):
        return os.environ["ACCELERATE_MIXED_PRECISION"]
    if cpu or not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def captioner_base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def enable_checkpointing(model) -> None:
    """transformers' activation checkpointing (non-reentrant: LoRA inputs need no requires_grad trick)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    text_config = getattr(model.config, "text_config", None)
    if text_config is not None:  # the KV cache is off under checkpointing anyway; say so once, not per call
        text_config.use_cache = False


def load_roles(cfg: FinetuneConfig, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """The captioner (BLIP, or Flamingo with ``captioner.backend=flamingo``, with LoRA) and the diffusers pipeline
    (UNet with LoRA), frozen elsewhere.

    A starting adapter (``captioner.adapter`` / ``generator.lora``) is merged into the base weights first, so
    the new LoRA trains on top of it (BLIP only). The LoRA initialisation draws from ``torch.manual_seed(seed)``, whatever
    ran before (building the tiny builtins, for one, draws from the global generator).
    """
    captioner = BACKENDS[cfg.captioner.backend].from_config(cfg.captioner, device, dtype=dtype)
    torch.manual_seed(seed)
    captioner = captioner.with_lora(lambda model: adapters.add_captioner_lora(model, cfg.captioner_lora))
    g = cfg.generator
    pipe = hub.load_diffusion_pipeline(
        g.model, device, dtype, scheduler=g.scheduler, lora=g.lora, field="generator.model"
    )
    if g.lora:
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    torch.manual_seed(seed + 1)
    adapters.add_unet_lora(pipe.unet, cfg.unet_lora)
    return captioner, pipe


def image_sim_metrics(cfg: FinetuneConfig, device: torch.device) -> dict:
    import warnings

    terms, metrics = cfg.loss.image_sim_terms, {}
    with warnings.catch_warnings():  # lpips builds torchvision backbones with long-deprecated arguments
        warnings.simplefilter("ignore", UserWarning)
        if cfg.loss.image_sim and terms.clip:
            metrics["clip"] = load_similarity(
                terms.clip_metric, device, "loss.image_sim_terms.clip_metric", "image"
            )
        if cfg.loss.image_sim and terms.lpips:
            metrics["lpips"] = load_similarity(
                terms.lpips_metric, device, "loss.image_sim_terms.lpips_metric", "image"
            )
        if cfg.loss.best_of_n_recon or cfg.loss.dpo_recon:  # the reconstruction-ranked reward terms
            metrics["recon_reward"] = load_similarity(
                cfg.loss.recon_reward_metric, device, "loss.recon_reward_metric", "image"
            )
    return metrics


def judge_dir(cfg: FinetuneConfig) -> Path | None:
    """The world bundle's judge scores generated images when the data is a procedural world's."""
    bundle = {"shapes": hub.SHAPES_BUNDLE, "scenes": hub.SCENES_BUNDLE}.get(cfg.data.kind)
    return bundle / "judge" if bundle else None


def write_or_check_config(out: Path, cfg: FinetuneConfig):
    """Create ``out``, lock it (one process per run directory; returns the lock file) and write its config, or
    refuse a different config."""

    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file, not a directory; pass a new or existing directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = lock_run_dir(out)
    except OSError as e:
        raise RunError(
            f"--out {out} cannot be written ({e.strerror or e}); pass a writable directory"
        ) from None
    try:
        claim_run_dir(out, "finetune")
        path = out / "finetune.yaml"
        if path.exists():
            old = read_run_config(path)
            diff = changed_keys(old, cfg.to_dict())
            if diff:
                raise ValueError(
                    f"{out} holds a finetune run with a different config ({', '.join(diff[:6])}"
                    f"{' ...' if len(diff) > 6 else ''}); pass a new --out, or the same settings to "
                    "resume"
                )
            if changed := resumable_changes(old, cfg.to_dict()):
                log.warning(
                    "resuming %s with %s (allowed: no step already taken changes; train.steps also "
                    "rescales the learning-rate schedule from here on)",
                    out,
                    "; ".join(changed),
                )
        check_inputs(out / INPUTS_FILE, input_fingerprints(cfg.data))
        atomic_write_text(path, cfg.to_yaml())
        fingerprint.write(out, cfg.to_dict())
    except BaseException:
        lock.close()
        raise
    return lock


def tracker_config(cfg: FinetuneConfig) -> dict:
    """TensorBoard's hparams take scalars only."""

    return {
        k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flatten(cfg.to_dict()).items()
    }


def truncate_records(out: Path, step: int) -> None:
    """On (re)start, drop records past the checkpoint the run resumes from (a killed run may have logged them;
    the resumed run logs those steps again, identically); unreadable lines are set aside, not dropped."""

    for name in ("metrics.jsonl", "validation.jsonl"):
        path = out / name
        records = set_aside_bad_lines(path)
        kept = [r for r in records if r.get("step", 0) <= step]
        if len(kept) != len(records):
            atomic_write_text(path, "".join(json.dumps(r, allow_nan=True) + "\n" for r in kept))


def average_gradients(accelerator, params: list[torch.nn.Parameter]) -> None:
    """Mean of the LoRA gradients over processes, in one all-reduce (the models are not DDP-wrapped).

    A parameter no process computed a gradient for keeps ``grad = None``, as in a single process, so AdamW skips
    it (a zero gradient would still move it: weight decay, and momentum from earlier steps)."""
    if accelerator.num_processes == 1:
        return
    had = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=accelerator.device)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = accelerator.reduce(torch.cat([g.reshape(-1).float() for g in grads] + [had]), reduction="sum")
    any_grad = flat[-len(params) :] > 0
    offset = 0
    for p, g, keep in zip(params, grads, any_grad.tolist()):
        p.grad = (
            (flat[offset : offset + p.numel()].view_as(p) / accelerator.num_processes).to(g.dtype)
            if keep
            else None
        )
        offset += p.numel()


def clip_gradients(
    accelerator, model_params: dict[str, list[torch.nn.Parameter]], max_norm: float, mode: str
) -> dict[str, float]:
    """Clip the LoRA gradients as ``train.grad_clip`` says (per_model | joint | generator); returns the norms
    before clipping: ``grad_norm`` (both models) and ``grad_norm_<model>`` per model."""
    accelerator.unscale_gradients()  # fp16: the grad scaler's unscale, once per step
    grads = {name: [p.grad for p in ps if p.grad is not None] for name, ps in model_params.items()}
    norms = {name: torch.nn.utils.get_total_norm(g) if g else torch.zeros(()) for name, g in grads.items()}
    total = torch.linalg.vector_norm(torch.stack([n.float().cpu() for n in norms.values()]))
    for name, g in grads.items():
        if not g:
            continue
        if mode == "per_model" or (mode == "generator" and name == "unet"):
            torch.nn.utils.clip_grads_with_norm_(g, max_norm, norms[name])
        elif mode == "joint":
            torch.nn.utils.clip_grads_with_norm_(g, max_norm, total.to(g[0].device))
    return {"grad_norm": float(total), **{f"grad_norm_{name}": float(n) for name, n in norms.items()}}


def reduce_record(accelerator, record: dict) -> dict:
    """Loss terms averaged over processes (each logs its own micro-batches' values)."""
    if accelerator.num_processes == 1:
        return record
    keys = [k for k in record if k not in ("step", "lr")]
    values = accelerator.reduce(torch.tensor([record[k] for k in keys], device=accelerator.device), "mean")
    return record | dict(zip(keys, values.tolist()))


def log_grid(accelerator, grid: torch.Tensor, step: int) -> None:
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("val/samples", grid, step)
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"val/samples": wandb.Image(grid.permute(1, 2, 0).numpy())}, step=step)
