"""The finetune config: dataclasses mirroring ``configs/finetune-*.yaml``, with dotted ``key=value`` overrides.

Same machinery as :mod:`recon.config` (``from_dict`` validates every field by dotted name), own dataclasses:
``captioner`` and ``generator`` are recon's own role configs, so a finetune starts from any preset's models.
Each deviation from the original training code is named where its default is set (``# deviation:``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from recon.config import (
    CONFIG_DIR,
    CaptionerConfig,
    ConfigError,
    DecodingConfig,
    GeneratorConfig,
    MetricConfig,
    apply_override,
    check_decoding,
    find_config,
    from_dict,
    merge,
    read_yaml,
)
from recon.runs import flatten, same_value

# data.kind values rendered on the fly (recon.shapes.worlds.WORLDS; named here so validation imports no world)
GENERATED_WORLDS = ("shapes", "scenes")
# LoRA target presets: a name here, or any regex peft full-matches against module names.
CAPTIONER_TARGETS = {
    # BLIP text decoder cross-attention (image -> text): query/key/value and output projection
    "xattn_qkvo": r".*text_decoder\.bert\.encoder\.layer\.\d+\.crossattention\.(self\.(query|key|value)|output\.dense)",
    "xattn_q": r".*text_decoder\.bert\.encoder\.layer\.\d+\.crossattention\.self\.query",  # the paper's choice
    # cross-attention plus the vision encoder's self-attention: for a captioner whose image features are the limit
    "vision_xattn": r".*(vision_model\.encoder\.layers\.\d+\.self_attn\.(qkv|projection)"
    r"|text_decoder\.bert\.encoder\.layer\.\d+\.crossattention\.(self\.(query|key|value)|output\.dense))",
    "decoder_attn": r".*text_decoder\.bert\.encoder\.layer\.\d+\.(attention|crossattention)\."
    r"(self\.(query|key|value)|output\.dense)",
    # "flamingo": the Flamingo backend's perceiver and gated cross-attention projections
    # (recon.captioners.flamingo.LORA_TARGETS; its tanh gates stay frozen here)
}
UNET_TARGETS = {
    "attn2": r".*attn2\.(to_q|to_k|to_v|to_out\.0)",  # cross-attention (text -> image)
    "attn2_q": r".*attn2\.to_q",  # the paper's choice
    "all_attn": r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)",  # as diffusers' train_text_to_image_lora.py
}


@dataclass
class AdapterConfig:
    """LoRA (peft) on one model. ``targets``: a preset name (see CAPTIONER_TARGETS / UNET_TARGETS) or a regex;
    ``none`` freezes the model."""

    targets: str = ""
    rank: int = 8
    alpha: float | None = None  # None: alpha = rank (scale 1, as train_text_to_image_lora.py)
    dropout: float = 0.0
    # deviation: the original trained the full to_q / query matrices; LoRA (rank 8) is the default here.


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class BridgeConfig:
    """Captioner logits -> CLIP-vocabulary soft tokens (see recon.train.bridge)."""

    # The index is one-to-one (see recon.train.bridge.build_index): a WordPiece reaches one CLIP token, its
    # whole word "w</w>" first; with BERT's vocabulary 21748 WordPieces (71%) reach a CLIP token and 56% of the
    # 49408 CLIP ids stay unmapped. deviation: "##" continuation pieces map too (to "w</w>" or "w"), which the
    # original's exact-word index left out.
    variant: str = "prob"  # prob (the original) | logit | gumbel (straight-through)
    temperature: float = 1.0  # softmax(logits / T)
    # deviation: the original sent every CLIP id without a same-word WordPiece to [UNK], so p([UNK]) was copied
    # onto ~28k CLIP rows (58% of the vocabulary); "drop" gives those rows zero weight, "unk" is the original.
    unmapped: str = "drop"  # drop | unk
    gumbel_tau: float = 1.0


@dataclass
class SamplerConfig:
    """The truncated-backprop DDIM sampler (AlignProp / DRaFT-K): gradient through the last ``grad_steps``."""

    num_steps: int = 10
    grad_steps: int = 1
    guidance_scale: float = (
        1.0  # > 1: classifier-free guidance with the empty prompt (doubles the UNet batch)
    )


@dataclass
class ImageSimConfig:
    """Image -> soft caption -> sampled reconstruction (with grad) -> similarity to the original, as a loss."""

    clip: float = 1.0  # weight of (1 - CLIP cosine similarity)
    lpips: float = 0.0  # weight of the LPIPS distance
    clip_metric: MetricConfig = field(default_factory=lambda: MetricConfig(kind="clip"))
    lpips_metric: MetricConfig = field(default_factory=lambda: MetricConfig(kind="lpips"))


@dataclass
class LossConfig:
    """Weights of the terms; a weight of 0 skips the term's computation."""

    # alternate: micro-batch i runs the image direction (caption_nll, i2t2i, image_sim) when i is even and the
    # text direction (denoise, t2i2t) when odd, as the original (4 + 4 of its 8 micro-batches): train.grad_accum
    # must be even, so every optimizer step sees both directions and both models take every step; sum: every term
    # on every micro-batch.
    schedule: str = "alternate"
    caption_nll: float = 1.0  # captioner task loss on (image, reference caption)
    label_smoothing: float = 0.1
    denoise: float = 1.0  # generator task loss: UNet noise MSE on (image, reference caption)
    i2t2i: float = 1.0  # image -> soft caption -> UNet noise MSE on the ORIGINAL image's latents (lambda)
    t2i2t: float = (
        1.0  # text -> UNet -> x0 estimate / sample -> VAE decode -> captioner NLL of the ORIGINAL text
    )
    # deviation: the decoded image goes through BLIP's own resize + mean/std (preprocess_tensor); the original fed
    # the VAE output to the captioner unnormalised.
    # deviation: the UNet's captions are padded to the text encoder's 77 tokens, as SD was trained and samples;
    # the original padded to the longest caption of the batch.
    # one_step: x0 predicted from the noised latents of the denoise term, one UNet call, as the original;
    # sampler: a full DDIM sample with gradient through its last steps (see SamplerConfig).
    # deviation: the original gave scheduler.step the CLEAN latents, and decoded its prev_sample (still noisy);
    # here the x0 estimate comes from the noised latents the UNet saw, with per-sample timesteps (any batch size).
    t2i2t_form: str = "one_step"
    # one_step draws its timestep below this (x0 estimates from t near 1000 are blurs) in a UNet call of its own,
    # so the denoise task loss keeps the full range; None: the full range, sharing the task loss's UNet call.
    one_step_max_timestep: int | None = None
    image_sim: float = 0.0
    image_sim_terms: ImageSimConfig = field(default_factory=ImageSimConfig)
    # pseudo_label: captioner NLL on unlabelled images, each labelled by the generator: of the captioner's
    # pseudo_label_candidates sampled captions, the one under which the UNet denoises the image best (lowest noise
    # MSE over pseudo_label_draws noise draws shared by the candidates). The generator's knowledge used without a
    # gradient through it: the control for i2t2i. Needs data.unlabelled_images.
    pseudo_label: float = 0.0
    pseudo_label_candidates: int = 8
    pseudo_label_draws: int = 4
    pseudo_label_decoding: DecodingConfig = field(
        default_factory=lambda: DecodingConfig(
            method="nucleus", top_p=0.9, min_new_tokens=3, max_new_tokens=20
        )
    )
    # Rewards from the reconstruction signal, without a gradient through the generator. For each unlabelled image
    # (needs data.unlabelled_images) the captioner samples recon_reward_candidates captions (recon_reward_decoding);
    # the generator renders each (the training sampler, no gradient; every candidate of an image starts from the same
    # noise) and recon_reward_metric scores the render against the image. best_of_n_recon: captioner NLL on the best
    # caption (rejection sampling; the sibling of pseudo_label, which ranks by denoising error); dpo_recon: a
    # preference loss (preference_loss: DPO or IPO, strength preference_beta) on the best vs the worst caption,
    # against the captioner with its LoRA disabled as the frozen reference.
    best_of_n_recon: float = 0.0
    dpo_recon: float = 0.0
    recon_reward_candidates: int = 4
    recon_reward_decoding: DecodingConfig = field(
        default_factory=lambda: DecodingConfig(
            method="nucleus", top_p=0.9, min_new_tokens=3, max_new_tokens=20
        )
    )
    recon_reward_metric: MetricConfig = field(default_factory=lambda: MetricConfig(kind="clip"))
    preference_loss: str = "dpo"  # dpo (Rafailov et al. 2023, eq. 7) | ipo (Azar et al. 2023, eq. 17)
    preference_beta: float = 0.1  # DPO's beta; IPO's tau
    # diffusion_dpo: for each text (the unpaired texts, else the pairs' captions) two images sampled without gradient
    # (the training sampler, two noises), ranked by the captioner's log-likelihood of the text; Diffusion-DPO
    # (Wallace et al. 2023, eq. 14) on their latents against the UNet with its LoRA disabled. The errors are means
    # over latent elements, as in the authors' script, whose beta_dpo=5000 with its factor 0.5 is 2500 here.
    diffusion_dpo: float = 0.0
    diffusion_dpo_beta: float = 2500.0
    # The regularisers (i2t2i, t2i2t, image_sim) see only the first N pairs (or unpaired items, see DataConfig) of
    # each micro-batch; None: all.
    # They cost an extra UNet and captioner pass and a VAE decode; a part of the batch keeps a joint step cheap.
    regularizer_items: int | None = None


@dataclass
class DataConfig:
    """Training pairs. ``shapes`` / ``scenes`` (the procedural worlds, recon.shapes.worlds): rendered from
    (seed, step), nothing on disk; ``karpathy`` / ``coco``: files."""

    kind: str = "shapes"  # shapes | scenes | karpathy | coco
    annotations: str | None = None  # Karpathy dataset_coco.json or COCO captions_*.json
    images: str | None = None  # image root the annotation file names are relative to
    train_split: list[str] = field(default_factory=lambda: ["train", "restval"])  # karpathy only
    val_split: list[str] = field(default_factory=lambda: ["val"])
    val_annotations: str | None = None  # coco: a separate annotation file for validation
    resolution: int | None = None  # None: the generator's native resolution; BLIP resizes to its own size
    val_items: int = 16
    num_workers: int = 0
    # Semi-supervised data. The task losses (caption_nll, denoise) see only labelled pairs; when unlabelled images
    # are given, i2t2i and image_sim run on them (teacher-forced on the captioner's own caption, decoded with
    # captioner.decoding, no gradient through decoding), and when unpaired texts are given, t2i2t runs on them
    # (a sampled image: loss.t2i2t_form=sampler). Otherwise the regularisers use the labelled pairs.
    labelled_pairs: int | None = (
        None  # a fixed pool of N pairs (shapes: N scenes; files: N of a seeded shuffle)
    )
    unlabelled_images: str | None = None  # an image folder, or data.kind's world (fresh scenes, no captions)
    unpaired_texts: str | None = (
        None  # a .txt / .json / .jsonl texts file, or data.kind's world (fresh captions, no images)
    )
    unpaired_combos: str = (
        "seen"  # shapes: the combinations unpaired data is drawn from: seen | heldout_a | heldout_b
    )
    # Model selection: the last N pairs of the labelled pool are held out of training (recon.train.data.selection_batch
    # gives them to recon.train.selection, which picks a run's checkpoint by their validation loss); 0: none.
    selection_pairs: int = 0


@dataclass
class ValidationConfig:
    every: int = 500  # optimizer steps; 0: only at the end
    final: bool = True  # validate once more when training finishes
    num_inference_steps: int = 20
    guidance_scale: float = 5.0
    decoding: DecodingConfig = field(
        default_factory=lambda: DecodingConfig(
            method="greedy", num_beams=1, min_new_tokens=3, max_new_tokens=20
        )
    )
    metric: MetricConfig = field(default_factory=lambda: MetricConfig(kind="clip"))  # reconstruction score
    grid_items: int = 8


@dataclass
class TrainConfig:
    seed: int = 0
    steps: int = 1000  # optimizer steps
    batch_size: int = 1  # per process and micro-batch
    grad_accum: int = 8
    # deviation: the original ran batch 1 only (scheduler.step takes one timestep); any batch size works here.
    # auto: the launcher's fp16/bf16 if given, else bf16 on GPUs that have it, else fp16; fp32 on CPU | no | fp16 | bf16
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = True  # model layers, each sampled step and the VAE decode
    max_grad_norm: float = 1.0
    # per_model: each model's LoRA gradient clipped to max_grad_norm on its own (one model's large gradient does not
    # shrink the other's step); joint: one norm over both; generator: the UNet only, as the original code did.
    grad_clip: str = "per_model"
    lr_scheduler: str = "constant"  # any diffusers.optimization scheduler name
    warmup_steps: int = 0
    checkpoint_every: int = 500
    checkpoints_total_limit: int = 2
    log_every: int = 10
    report_to: str = "tensorboard"  # tensorboard | wandb | none
    cpu: bool = False  # force the CPU even where a GPU is present
    threads: int | None = None  # torch CPU threads per process (None: cores / processes)


@dataclass
class FinetuneConfig:
    name: str = "finetune"
    captioner: CaptionerConfig = field(default_factory=CaptionerConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    captioner_lora: AdapterConfig = field(default_factory=lambda: AdapterConfig(targets="xattn_qkvo"))
    unet_lora: AdapterConfig = field(default_factory=lambda: AdapterConfig(targets="attn2"))
    captioner_optim: OptimConfig = field(default_factory=OptimConfig)
    generator_optim: OptimConfig = field(default_factory=lambda: OptimConfig(weight_decay=1e-2))
    bridge: BridgeConfig = field(default_factory=BridgeConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


# Keys a resumed run may change: they do not change what a step computes.
RESUMABLE_KEYS = (
    "train.steps",
    "train.checkpoint_every",
    "train.checkpoints_total_limit",
    "train.log_every",
    "train.report_to",
    "train.threads",
    "data.num_workers",
    "validation.",
)

CHOICES = {
    "bridge.variant": ("prob", "logit", "gumbel"),
    "bridge.unmapped": ("drop", "unk"),
    "loss.schedule": ("alternate", "sum"),
    "loss.t2i2t_form": ("one_step", "sampler"),
    "loss.preference_loss": ("dpo", "ipo"),
    "data.kind": (*GENERATED_WORLDS, "karpathy", "coco"),
    "data.unpaired_combos": ("seen", "heldout_a", "heldout_b"),
    "train.grad_clip": ("per_model", "joint", "generator"),
    "train.mixed_precision": ("auto", "no", "fp16", "bf16"),
    "train.report_to": ("tensorboard", "wandb", "none"),
}


def finetune_config_path(name_or_path: str) -> Path:
    """A YAML path, or a name under configs/ (``shapes-smoke`` or ``finetune-shapes-smoke``)."""
    known = sorted(p.stem for p in CONFIG_DIR.glob("finetune-*.yaml"))
    return find_config(name_or_path, (name_or_path, f"finetune-{name_or_path}"), "finetune config", known)


def load_finetune_config(path_or_name: str, overrides: list[str] | tuple[str, ...] = ()) -> FinetuneConfig:
    """Read a finetune YAML over the defaults, apply ``key=value`` overrides, validate."""
    path = finetune_config_path(path_or_name)
    data = merge(FinetuneConfig().to_dict(), read_yaml(path))
    data.setdefault("name", path.stem)
    shipped = copy.deepcopy(data) if overrides else data
    for o in overrides:
        apply_override(data, o)
    try:
        cfg = from_dict(FinetuneConfig, data)
    except ConfigError as e:
        if overrides and _reads(shipped):  # the file is fine on its own: an override broke it
            raise ConfigError(f"--set {' '.join(overrides)}: {e}") from None
        raise ConfigError(f"{path}: {e}") from None
    check(cfg)
    return cfg


def _reads(data: dict) -> bool:
    try:
        from_dict(FinetuneConfig, data)
        return True
    except ConfigError:
        return False


def check(cfg: FinetuneConfig) -> None:
    """Choices and ranges that the types alone do not catch, named by dotted key."""
    flat = flatten(cfg.to_dict())
    for key, choices in CHOICES.items():
        if flat[key] not in choices:
            raise ConfigError(f"{key}={flat[key]!r}: expected one of {', '.join(choices)}")
    t = cfg.train
    for where, decoding in [
        ("captioner.decoding", cfg.captioner.decoding),
        ("validation.decoding", cfg.validation.decoding),
        ("loss.pseudo_label_decoding", cfg.loss.pseudo_label_decoding),
        ("loss.recon_reward_decoding", cfg.loss.recon_reward_decoding),
    ]:
        check_decoding(decoding, where)
    for key, value in [
        ("train.steps", t.steps),
        ("train.batch_size", t.batch_size),
        ("train.grad_accum", t.grad_accum),
        ("sampler.num_steps", cfg.sampler.num_steps),
        ("train.checkpoint_every", t.checkpoint_every),
        ("train.log_every", t.log_every),
        ("data.val_items", cfg.data.val_items),
        ("validation.num_inference_steps", cfg.validation.num_inference_steps),
        ("captioner_lora.rank", cfg.captioner_lora.rank),
        ("unet_lora.rank", cfg.unet_lora.rank),
    ]:
        if value < 1:
            raise ConfigError(f"{key}={value}: must be >= 1")
    for key, value in [
        ("train.max_grad_norm", t.max_grad_norm),
        ("captioner_optim.lr", cfg.captioner_optim.lr),
        ("generator_optim.lr", cfg.generator_optim.lr),
        ("bridge.temperature", cfg.bridge.temperature),
    ]:
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{key}={value}: must be a finite number > 0")
    for key, value in [("validation.every", cfg.validation.every), ("train.warmup_steps", t.warmup_steps)]:
        if value < 0:
            raise ConfigError(f"{key}={value}: must be >= 0")
    if not 0 <= cfg.sampler.grad_steps <= cfg.sampler.num_steps:
        raise ConfigError(f"sampler.grad_steps={cfg.sampler.grad_steps}: must be in 0..sampler.num_steps")
    for name in ("caption_nll", "denoise", "i2t2i", "t2i2t", "image_sim", "pseudo_label", *REWARD_TERMS):
        if getattr(cfg.loss, name) < 0:
            raise ConfigError(f"loss.{name}: weights must be >= 0")
    if cfg.data.kind not in GENERATED_WORLDS and not cfg.data.annotations:
        raise ConfigError(f"data.kind={cfg.data.kind}: set data.annotations (and data.images)")
    if cfg.loss.schedule == "alternate" and t.grad_accum % 2:
        raise ConfigError(
            f"train.grad_accum={t.grad_accum}: loss.schedule=alternate gives even micro-steps the image "
            "direction and odd ones the text direction; use an even grad_accum so every optimizer step "
            "sees both (or loss.schedule=sum)"
        )
    if cfg.data.labelled_pairs is not None and cfg.data.labelled_pairs < 1:
        raise ConfigError(f"data.labelled_pairs={cfg.data.labelled_pairs}: must be >= 1 (or null for all)")
    for key in ("unlabelled_images", "unpaired_texts"):
        value = getattr(cfg.data, key)
        if value in GENERATED_WORLDS and cfg.data.kind != value:
            raise ConfigError(
                f"data.{key}={value} needs data.kind={value}; give a path for data.kind={cfg.data.kind}"
            )
    if cfg.data.unpaired_combos != "seen" and cfg.data.kind != "shapes":
        raise ConfigError(
            f"data.unpaired_combos={cfg.data.unpaired_combos}: the held-out halves are the shapes world's; "
            f"use seen for data.kind={cfg.data.kind}"
        )
    if cfg.loss.pseudo_label and not cfg.data.unlabelled_images:
        raise ConfigError("loss.pseudo_label labels unlabelled images: set data.unlabelled_images")
    for key in ("pseudo_label_candidates", "pseudo_label_draws"):
        if getattr(cfg.loss, key) < 1:
            raise ConfigError(f"loss.{key}={getattr(cfg.loss, key)}: must be >= 1")
    if cfg.loss.pseudo_label_decoding.method == "greedy" and cfg.loss.pseudo_label_candidates > 1:
        raise ConfigError("loss.pseudo_label_decoding.method=greedy gives one candidate; use nucleus or beam")
    check_rewards(cfg)
    if cfg.data.unpaired_texts and cfg.loss.t2i2t and cfg.loss.t2i2t_form != "sampler":
        raise ConfigError(
            "loss.t2i2t_form=one_step needs the text's own image (its noised latents); with "
            "data.unpaired_texts set loss.t2i2t_form=sampler"
        )
    check_gradient_paths(cfg)


REWARD_TERMS = ("best_of_n_recon", "dpo_recon", "diffusion_dpo")


def check_rewards(cfg: FinetuneConfig) -> None:
    """The reward terms' data, candidate counts and strengths; the held-out selection slice."""
    loss, data = cfg.loss, cfg.data
    for term in ("best_of_n_recon", "dpo_recon"):
        if getattr(loss, term) and not data.unlabelled_images:
            raise ConfigError(
                f"loss.{term} ranks the captioner's captions of unlabelled images: set data.unlabelled_images"
            )
    least = 2 if loss.dpo_recon else 1
    if loss.recon_reward_candidates < least:
        raise ConfigError(
            f"loss.recon_reward_candidates={loss.recon_reward_candidates}: must be >= {least}"
            f"{' (a best and a worst caption)' if least == 2 else ''}"
        )
    if loss.recon_reward_decoding.method == "greedy" and loss.recon_reward_candidates > 1:
        raise ConfigError("loss.recon_reward_decoding.method=greedy gives one candidate; use nucleus or beam")
    for key in ("preference_beta", "diffusion_dpo_beta"):
        if not math.isfinite(getattr(loss, key)) or getattr(loss, key) <= 0:
            raise ConfigError(f"loss.{key}={getattr(loss, key)}: must be a finite number > 0")
    if (
        cfg.captioner.backend == "flamingo" and cfg.captioner.adapter
    ):  # its adapter is injected, not mergeable
        raise ConfigError(
            f"captioner.adapter={cfg.captioner.adapter}: starting a Flamingo finetune from an adapter is not "
            "supported yet; start from the base model (captioner.adapter=null)"
        )
    if data.selection_pairs < 0:
        raise ConfigError(f"data.selection_pairs={data.selection_pairs}: must be >= 0")
    if data.selection_pairs and (data.labelled_pairs is None or data.selection_pairs >= data.labelled_pairs):
        raise ConfigError(
            f"data.selection_pairs={data.selection_pairs}: holds out part of the labelled pool; set "
            "data.labelled_pairs to more than it"
        )


def check_gradient_paths(cfg: FinetuneConfig) -> None:
    """Every loss term with a weight > 0 must be able to move some trained LoRA: a term that cannot would cost
    its forward passes and train nothing, silently."""
    trained = {
        "captioner": cfg.captioner_lora.targets not in ("", "none"),
        "unet": cfg.unet_lora.targets not in ("", "none"),
    }
    through_sampler = cfg.sampler.grad_steps > 0
    reaches = {
        "caption_nll": {"captioner"},
        "denoise": {"unet"},
        "i2t2i": {"captioner", "unet"},
        # the captioner reads the sampled image even without gradient through the sampler (synthetic pairs)
        "t2i2t": {"captioner", "unet"}
        if cfg.loss.t2i2t_form == "one_step" or through_sampler
        else {"captioner"},
        "image_sim": {"captioner", "unet"} if through_sampler else set(),
        "pseudo_label": {"captioner"},
        "best_of_n_recon": {"captioner"},
        "dpo_recon": {"captioner"},
        "diffusion_dpo": {"unet"},
    }
    for term, models in reaches.items():
        if getattr(cfg.loss, term) > 0 and not any(trained[m] for m in models):
            why = (
                "sampler.grad_steps=0 stops every gradient through the sampled image"
                if not models
                else f"it reaches only {' and '.join(sorted(models))}, and {'/'.join(m + '_lora' for m in sorted(models))}"
                f".targets is none"
            )
            raise ConfigError(
                f"loss.{term}={getattr(cfg.loss, term)}: this term cannot carry a gradient ({why}); "
                f"set loss.{term}=0 or give it a path"
            )


def changed_keys(old: dict, new: dict) -> list[str]:
    """Dotted keys whose values differ, ignoring the volatile ones (a resumed run may change those). A key that an
    older recon did not write counts as unchanged when the new value is its default (a run started before a loss
    term existed resumes with that term off)."""
    return sorted(k for k, _, _ in _differences(old, new) if not _resumable(k))


def resumable_changes(old: dict, new: dict) -> list[str]:
    """``"key old -> new"`` for the keys in :data:`RESUMABLE_KEYS` that differ: a resume allows them and says so."""
    return [f"{k} {a!r} -> {b!r}" for k, a, b in _differences(old, new) if _resumable(k)]


def _resumable(key: str) -> bool:
    return any(key == v or (v.endswith(".") and key.startswith(v)) for v in RESUMABLE_KEYS)


def _differences(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    a, b, default = flatten(old), flatten(new), flatten(FinetuneConfig().to_dict())
    return [
        (k, a.get(k, default.get(k)), b.get(k))
        for k in sorted(set(a) | set(b))
        if not same_value(a.get(k, default.get(k)), b.get(k))
    ]
