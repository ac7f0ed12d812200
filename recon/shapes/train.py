"""Train the shapes bundle on CPU: ``recon shapes train --component {captioner,vae,unet,clip,judge,weak,all}``.

Reads top to bottom: shared helpers (data, budget, the checkpointed loop), then one ``train_<component>`` per part
(over 400 lines: six short trainers that share the loop read best side by side).
Data is rendered on the fly from ``(seed, step)``, so every batch is fresh, the run is reproducible, and resuming
needs only the step counter. A checkpoint goes to ``<work>/<component>.ckpt.pt`` every few minutes and a killed run
resumes from it. Each component writes its part of the bundle plus ``training/<component>.json`` (steps, wall and
CPU minutes, final validation numbers) that the model card is built from.

Order: ``vae`` before ``unet`` (the UNet learns in the VAE's latent space); the rest are independent.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from recon.shapes import models, world
from recon.shapes.card import COMPONENTS, DEFAULT_STEPS
from recon.shapes.metrics import (
    captioner_accuracy,
    clip_zero_shot,
    judge_accuracy,
    normalize,
    render_batch,
    vae_round_trip,
)
from recon.tokenizers import make_blip_tokenizer, write_clip_tokenizer

BATCH = {"vae": 16, "unet": 32, "captioner": 64, "weak": 64, "clip": 128, "judge": 128}
LR = {"vae": 2e-3, "unet": 1e-3, "captioner": 1e-3, "weak": 1e-3, "clip": 1e-3, "judge": 2e-3}
CAPTION_DROPOUT = 0.1  # empty prompt 10% of the time: the unconditional branch of classifier-free guidance
AUX_WEIGHT = 1.0  # captioner: weight of the attribute heads on the ViT's [CLS] (see train_captioner)


@dataclass
class TrainArgs:
    component: str
    out: Path
    work: Path
    seed: int = 0
    steps: int | None = None
    minutes: float | None = None
    threads: int = 1
    device: str = "cpu"
    init_from: Path | None = (
        None  # unet / captioner: start from this bundle's weights (continue a finished run)
    )
    batch: int | None = None  # None: the recipe's BATCH
    lr: float | None = None  # None: the recipe's LR
    eval_every: int = 250
    world: str = "shapes"  # the `recon WORLD train` command the records name
    checkpoint_seconds: float = 180.0


def bs(args: TrainArgs, name: str) -> int:
    return args.batch or BATCH[name]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------- the loop
def lr_lambda(plan: dict) -> Callable[[int], float]:
    """Linear warmup then cosine to 10%; reads ``plan['total']`` late so a minutes budget can set it."""

    def f(step: int) -> float:
        warm = min(200, max(1, plan["total"] // 20))
        if step < warm:
            return (step + 1) / warm
        p = min(1.0, (step - warm) / max(1, plan["total"] - warm))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))

    return f


def run_loop(
    args: TrainArgs,
    name: str,
    modules: dict[str, torch.nn.Module],
    params: list,
    step_fn: Callable[[int], float],
    validate: Callable[[int], dict] | None = None,
    ema=None,
    weight_decay: float = 0.01,
    clip_norm: float | None = None,
) -> dict:
    """Optimise ``params`` (tensors or AdamW param groups) with AdamW for the budget; checkpoint ``modules``,
    resume, log progress. ``clip_norm``: clip the gradient norm before each step. Returns a record."""
    plan = {"total": args.steps or DEFAULT_STEPS[name]}
    lr = args.lr or LR[name]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(plan))
    ckpt = args.work / f"{name}.ckpt.pt"
    step, wall0, cpu0, metrics = 0, 0.0, 0.0, {}
    if ckpt.exists():
        try:  # tensors, numbers and lists only: a work directory is never unpickled beyond that
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(
                f"{ckpt}: cannot resume from it ({type(e).__name__}: {str(e)[:300]}); delete it to "
                "train from the start"
            ) from None
        for k, m in modules.items():
            m.load_state_dict(state["modules"][k])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        step, wall0, cpu0 = state["step"], state["wall"], state["cpu"]
        plan["total"] = args.steps or state["total"]  # an explicit --steps extends (or ends) the resumed run
        log(f"{name}: resumed from {ckpt} at step {step}/{plan['total']}")

    def save_ckpt() -> None:
        tmp = ckpt.with_suffix(".tmp")
        torch.save(
            {
                "modules": {k: m.state_dict() for k, m in modules.items()},
                "opt": opt.state_dict(),
                "sched": sched.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "step": step,
                "total": plan["total"],
                "wall": wall_now(),
                "cpu": cpu_now(),
            },
            tmp,
        )
        os.replace(tmp, ckpt)

    t_wall, t_cpu = time.time(), time.process_time()
    wall_now = lambda: wall0 + time.time() - t_wall  # noqa: E731
    cpu_now = lambda: cpu0 + time.process_time() - t_cpu  # noqa: E731
    last_ckpt, losses, first_step = time.time(), [], step
    for m in modules.values():
        m.train()
    flat = [p for g in opt.param_groups for p in g["params"]]
    while step < plan["total"]:
        loss = step_fn(step)
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(flat, clip_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(params)
        losses.append(loss)
        step += 1
        if args.minutes and not args.steps and step - first_step == 20 and first_step == 0:
            plan["total"] = max(step + 1, int(args.minutes * 60 / (wall_now() / step)))
            log(f"{name}: {args.minutes} min budget -> {plan['total']} steps")
        if step % 50 == 0 or step == plan["total"]:
            rate = wall_now() / step if first_step == 0 else (time.time() - t_wall) / (step - first_step)
            log(
                f"{name} step {step}/{plan['total']} loss {np.mean(losses):.4f} lr {sched.get_last_lr()[0]:.2e} "
                f"{rate:.2f}s/step eta {rate * (plan['total'] - step) / 60:.1f} min"
            )
            losses = []
        if validate is not None and (step % args.eval_every == 0 or step == plan["total"]):
            for m in modules.values():
                m.eval()
            metrics = validate(step)
            for m in modules.values():
                m.train()
            log(f"{name} step {step} validation {json.dumps(metrics)}")
        if time.time() - last_ckpt > args.checkpoint_seconds:
            save_ckpt()
            last_ckpt = time.time()
    save_ckpt()
    for m in modules.values():
        m.eval()
    return {
        "steps": step,
        "batch_size": bs(args, name),
        "lr": lr,
        "wall_minutes": round(wall_now() / 60, 2),
        "cpu_minutes": round(cpu_now() / 60, 2),
        "threads": args.threads,
        "validation": metrics,
    }


def write_record(args: TrainArgs, name: str, record: dict) -> None:
    path = args.out / "training" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    argv = sys.argv[sys.argv.index("train") :] if "train" in sys.argv else sys.argv
    record = {
        "component": name,
        "seed": args.seed,
        "device": args.device,
        "command": f"recon {args.world} " + " ".join(argv),
        "torch": torch.__version__,
        **record,
    }
    path.write_text(json.dumps(record, indent=2) + "\n")
    log(f"{name}: wrote {path}")


# ----------------------------------------------------------------------------------------------- VAE
# A world's batches: ``render(seed, split, stream, n, device) -> (scenes, images (n, 3, H, W) in [0, 1])``; scenes
# have a ``caption``. The default is the shapes world; the scenes world passes its own (recon.shapes.scenes_train).
Render = Callable[..., tuple[list, torch.Tensor]]


def train_vae(args: TrainArgs, render: Render = render_batch) -> dict:
    dev = torch.device(args.device)
    vae = models.build_vae(args.seed).to(dev)

    def step_fn(step: int) -> float:
        _, x = render(args.seed, "train", step, bs(args, "vae"), dev)
        x = x * 2 - 1
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        loss.backward()
        return loss.item()

    @torch.no_grad()
    def validate(step: int) -> dict:
        _, x = render(args.seed, "test", 0, 256, dev)
        mse = F.mse_loss(vae_round_trip(vae, x), x).item()
        return {"psnr_db": round(10 * math.log10(1 / mse), 2)}

    record = run_loop(args, "vae", {"vae": vae}, list(vae.parameters()), step_fn, validate)
    with torch.no_grad():  # SD convention: latents * scaling_factor have unit variance
        _, x = render(args.seed, "train", 10**6, 1024, dev)
        std = vae.encode(x * 2 - 1).latent_dist.mode().std().item()
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    record["scaling_factor"] = vae.config.scaling_factor
    out = args.out / "generator" / "vae"
    vae.to("cpu", torch.float16).save_pretrained(out)
    write_record(args, "vae", record)
    return record


# ----------------------------------------------------------------------------------------------- UNet + text encoder
def train_unet(args: TrainArgs, render: Render = render_batch) -> dict:
    from diffusers import AutoencoderKL
    from diffusers.training_utils import EMAModel
    from transformers import CLIPTokenizer

    vae_dir = args.out / "generator" / "vae"
    if not (vae_dir / "config.json").exists():
        raise FileNotFoundError(f"{vae_dir}: train the VAE first (`recon shapes train --component vae`)")
    dev = torch.device(args.device)
    vae = (
        AutoencoderKL.from_pretrained(vae_dir, torch_dtype=torch.float32).eval().requires_grad_(False).to(dev)
    )
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(args.work / "clip_tokenizer"))
    if args.init_from:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        src = Path(args.init_from) / "generator"
        text_encoder = CLIPTextModel.from_pretrained(src / "text_encoder", dtype=torch.float32).to(dev)
        unet = UNet2DConditionModel.from_pretrained(src / "unet", torch_dtype=torch.float32).to(dev)
        log(f"unet: initialised from {src}")
    else:
        text_encoder = models.build_text_encoder(tokenizer, args.seed).to(dev)
        unet = models.build_unet(args.seed).to(dev)
    noise_sched = models.training_scheduler()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = EMAModel(params, decay=0.999, use_ema_warmup=True, power=0.75)
    sf = vae.config.scaling_factor

    def step_fn(step: int) -> float:
        scenes, x = render(args.seed, "train", step, bs(args, "unet"), dev)
        g = torch.Generator().manual_seed(
            args.seed * 1_000_003 + step
        )  # CPU streams: same numbers on any device
        with torch.no_grad():
            dist = vae.encode(x * 2 - 1).latent_dist
            latents = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g).to(dev)) * sf
        drop = torch.rand(len(scenes), generator=g) < CAPTION_DROPOUT
        texts = ["" if d else s.caption for s, d in zip(scenes, drop.tolist())]
        ids = tokenizer(
            texts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(dev)
        noise = torch.randn(latents.shape, generator=g).to(dev)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(scenes),), generator=g).to(dev)
        noisy = noise_sched.add_noise(latents, noise, t)
        target = noise_sched.get_velocity(
            latents, noise, t
        )  # plain v-prediction, unweighted: learned position
        pred = unet(noisy, t, encoder_hidden_states=text_encoder(ids)[0]).sample
        loss = F.mse_loss(pred, target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        return loss.item()

    record = run_loop(args, "unet", {"unet": unet, "text_encoder": text_encoder}, params, step_fn, ema=ema)
    ema.copy_to(params)  # ship the EMA weights
    vae, text_encoder, unet = vae.cpu(), text_encoder.cpu(), unet.cpu()
    models.save_generator(vae, text_encoder, tokenizer, unet, args.out / "generator")
    if args.init_from:
        record["initialised_from"] = str(args.init_from)
    write_record(args, "unet", record)
    return record


# ----------------------------------------------------------------------------------------------- captioner
# Auxiliary heads (see train_captioner): name -> (slots, classes), a linear head on the ViT's [CLS] token with
# ``classes`` logits for each of ``slots`` slots; ``targets(scenes)`` gives each name's class indices, ``(n,)`` for one
# slot or ``(n, slots)``, -100 where not scored. The default reads the shapes world's five attributes.
AUX_HEADS: dict[str, tuple[int, int]] = {a: (1, len(world.VALUES[a])) for a in world.ATTRIBUTES}


def shapes_aux_targets(scenes: list[world.Scene]) -> dict[str, torch.Tensor]:
    return {
        a: torch.tensor([world.VALUES[a].index(s.attributes[a]) for s in scenes]) for a in world.ATTRIBUTES
    }


def shapes_caption_validation(model, processor, seed: int) -> dict:
    return captioner_accuracy(model, processor, world.sample_scenes(256, seed, "test"))


def train_captioner(
    args: TrainArgs,
    name: str = "captioner",
    render: Render = render_batch,
    aux_heads: dict[str, tuple[int, int]] = AUX_HEADS,
    aux_targets: Callable[[list], dict[str, torch.Tensor]] = shapes_aux_targets,
    texts: list[str] | None = None,
    validation: Callable[..., dict] = shapes_caption_validation,
    weak_rule: tuple[str, float, str] = ("tuple_acc", 0.5, "tuple accuracy"),
    max_positions: int | None = None,
) -> dict:
    """The BLIP captioner of a world; the defaults are the shapes world's. ``render``: the world's batches;
    ``aux_heads`` / ``aux_targets``: the auxiliary heads (above); ``texts``: the words (or captions) whose tokens the
    softmax is restricted to (None: the shapes world's, :func:`models.captioner_token_ids`);
    ``validation(model, processor, seed) -> metrics``; ``weak_rule`` (metric, threshold, its name in the record):
    the ``captioner_weak`` snapshot is saved at the first validation with ``metric >= threshold``;
    ``max_positions``: the text decoder's position embeddings (None: :data:`models.CAPTIONER_TEXT`'s)."""
    tok = make_blip_tokenizer()
    dev = torch.device(args.device)
    if args.init_from:
        from transformers import BlipForConditionalGeneration

        model = BlipForConditionalGeneration.from_pretrained(
            Path(args.init_from) / "captioner", dtype=torch.float32
        ).to(dev)
        log(f"{name}: initialised from {args.init_from}")
    else:
        model = models.build_captioner(tok, args.seed, max_positions).to(dev)
    processor_mean, processor_std = models.image_processor().image_mean, models.image_processor().image_std
    used = torch.tensor(models.captioner_token_ids(tok, texts), device=dev)
    to_used = torch.full((len(tok),), -100, dtype=torch.long, device=dev)
    to_used[used] = torch.arange(len(used), device=dev)
    head = model.text_decoder.cls.predictions
    with torch.no_grad():
        unused = torch.ones(len(tok), dtype=torch.bool, device=dev)
        unused[used] = False
        head.decoder.bias[unused] = models.UNUSED_TOKEN_BIAS
    from transformers import BlipProcessor

    processor = BlipProcessor(image_processor=models.image_processor(), tokenizer=tok)
    weak_saved = {"done": (args.out / "captioner_weak" / "config.json").exists() or name == "weak"}
    # Real BLIP starts from an ImageNet-trained ViT. Ours starts from scratch, and the captioning loss alone taught it
    # colour, size and background but not where the object is or its shape (chance after 1000 steps: the decoder's
    # cross-attention needs object-aware patch features first). Linear attribute heads on the [CLS] token, trained
    # with the captioning loss and then discarded, play the part of that pretraining.
    aux = torch.nn.ModuleDict(
        {
            a: torch.nn.Linear(models.CAPTIONER_VISION["hidden_size"], slots * classes)
            for a, (slots, classes) in aux_heads.items()
        }
    ).to(dev)

    def aux_loss(cls: torch.Tensor, y: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(
            F.cross_entropy(aux[a](cls).view(-1, classes), y[a].to(dev).reshape(-1))
            for a, (_, classes) in aux_heads.items()
        ) / len(aux)

    def step_fn(step: int) -> float:
        scenes, x = render(args.seed, "train", step, bs(args, name), dev)
        enc = tok([s.caption for s in scenes], padding="longest", return_tensors="pt").to(dev)
        ids = enc.input_ids.clone()
        ids[:, 0] = tok.bos_token_id  # [CLS] -> [DEC], as BLIP's captioning loss does
        image_embeds = model.vision_model(pixel_values=normalize(x, processor_mean, processor_std))[0]
        hidden = model.text_decoder.bert(
            input_ids=ids,
            attention_mask=enc.attention_mask,
            encoder_hidden_states=image_embeds,
            is_decoder=True,
        ).last_hidden_state
        # Softmax over the world's tokens only (32 in the shapes world): a fraction of the 30524-way head's cost.
        h = head.transform(hidden[:, :-1])
        logits = h @ head.decoder.weight[used].T + head.decoder.bias[used]
        target = to_used[ids[:, 1:]].masked_fill(enc.attention_mask[:, 1:] == 0, -100)
        loss = F.cross_entropy(logits.reshape(-1, len(used)), target.reshape(-1), label_smoothing=0.1)
        loss = loss + AUX_WEIGHT * aux_loss(image_embeds[:, 0], aux_targets(scenes))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        return loss.item()

    def validate(step: int) -> dict:
        metrics = validation(model, processor, args.seed)
        key, threshold, what = weak_rule
        if not weak_saved["done"] and metrics[key] >= threshold:
            # A deliberately weak snapshot for the candidate-ranking experiment (prototype: 62% -> 90% ranked).
            models.save_captioner(model.cpu(), tok, args.out / "captioner_weak")
            model.to(dev)
            write_record(
                args,
                "captioner_weak",
                {
                    "steps": step,
                    "validation": metrics,
                    "note": "snapshot of the captioner run at the first validation "
                    f"with {what} >= {threshold}",
                },
            )
            weak_saved["done"] = True
        return metrics

    params = list(model.parameters()) + list(aux.parameters())
    record = run_loop(args, name, {"model": model, "aux": aux}, params, step_fn, validate)
    with (
        torch.no_grad()
    ):  # AdamW's decay never touches unused rows' bias (no grad), but keep the invariant exact
        head.decoder.bias[unused] = models.UNUSED_TOKEN_BIAS
    if args.init_from:
        record["initialised_from"] = str(args.init_from)
    out = args.out / ("captioner_weak" if name == "weak" else "captioner")
    models.save_captioner(model.cpu(), tok, out)
    write_record(args, "captioner_weak" if name == "weak" else name, record)
    return record


# ----------------------------------------------------------------------------------------------- CLIP
def train_clip(
    args: TrainArgs,
    render: Render = render_batch,
    key: Callable = lambda s: s.combo,
    context_length: int = models.CLIP_CONTEXT,
    validated: bool = True,
) -> dict:
    """Contrastive, ordinary in-batch negatives (no hard negatives). ``key(scene)``: scenes with equal keys are
    each other's positives (the shapes world: the same combination under any template). ``validated``: the shapes
    world's zero-shot validation (another world validates afterwards)."""
    dev = torch.device(args.device)
    model = models.build_clip(args.seed, context_length).to(dev)
    tokenizer = models.clip_tokenizer(context_length)
    pre = models.clip_preprocess_cfg()

    def step_fn(step: int) -> float:
        scenes, x = render(args.seed, "train", step, bs(args, "clip"), dev)
        img = model.encode_image(normalize(x, pre["mean"], pre["std"]), normalize=True)
        txt = model.encode_text(tokenizer([s.caption for s in scenes]).to(dev), normalize=True)
        logits = model.logit_scale.exp() * img @ txt.T
        # Many captions in a batch describe the same thing: all of them are positives.
        combos = [key(s) for s in scenes]
        same = torch.tensor([[a == b for b in combos] for a in combos], dtype=torch.float32, device=dev)
        target = same / same.sum(1, keepdim=True)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        loss.backward()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return loss.item()

    def validate(step: int) -> dict:
        scenes, x = render_batch(args.seed, "test", 0, 512, dev)
        return clip_zero_shot(model, tokenizer, x, scenes, pre["mean"], pre["std"])

    record = run_loop(
        args, "clip", {"clip": model}, list(model.parameters()), step_fn, validate if validated else None
    )
    models.save_clip(model.cpu(), args.out / "clip", context_length)
    write_record(args, "clip", record)
    return record


# ----------------------------------------------------------------------------------------------- judge
def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Noise, blur and contrast changes, so the judge reads generated images, not only clean renders."""
    n = x.shape[0]
    sigma = torch.rand(n, 1, 1, 1, generator=g) * 0.08
    x = x + sigma * torch.randn(x.shape, generator=g)
    blur = torch.rand(n, generator=g) < 0.5
    if blur.any():
        k = torch.tensor([1.0, 2.0, 1.0])
        k = (k[:, None] * k[None, :] / 16).expand(3, 1, 3, 3)
        x[blur] = F.conv2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), k, groups=3)
    scale = 1 + 0.15 * (torch.rand(n, 1, 1, 1, generator=g) * 2 - 1)
    return ((x - 0.5) * scale + 0.5).clamp(0, 1)


def train_judge(args: TrainArgs) -> dict:
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    judge = models.AttributeJudge().to(dev)

    def step_fn(step: int) -> float:
        scenes, x = render_batch(args.seed, "train", step, bs(args, "judge"))
        x = augment(x, torch.Generator().manual_seed(args.seed * 7919 + step)).to(dev)
        logits = judge(x)
        loss = sum(
            F.cross_entropy(
                logits[a], torch.tensor([world.VALUES[a].index(s.attributes[a]) for s in scenes], device=dev)
            )
            for a in world.ATTRIBUTES
        )
        loss.backward()
        return loss.item()

    def validate(step: int) -> dict:
        scenes, x = render_batch(args.seed, "test", 0, 512, dev)
        return judge_accuracy(judge, x, scenes)

    record = run_loop(args, "judge", {"judge": judge}, list(judge.parameters()), step_fn, validate)
    models.save_judge(judge.cpu(), args.out / "judge")
    write_record(args, "judge", record)
    return record


TRAINERS: dict[str, Callable[[TrainArgs], dict]] = {
    "vae": train_vae,
    "unet": train_unet,
    "captioner": train_captioner,
    "weak": lambda a: train_captioner(a, "weak"),
    "clip": train_clip,
    "judge": train_judge,
}


def train(args: TrainArgs) -> dict:
    """Train one component (or ``all``, in dependency order) into ``args.out``; returns the records."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    names = [c for c in COMPONENTS if c != "weak"] if args.component == "all" else [args.component]
    log(f"training {names} into {args.out} ({json.dumps({k: str(v) for k, v in asdict(args).items()})})")
    return {n: TRAINERS[n](args) for n in names}
