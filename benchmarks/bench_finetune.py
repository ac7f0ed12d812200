"""Joint finetuning step vs. a captioner LoRA step plus an SD LoRA step done separately (same batch).

Each variant runs in a fresh process (so peak memory is its own): load the roles with LoRA, warm up, time
``--steps`` optimizer steps (forward + backward + AdamW) and report the median step time and the peak memory
above the loaded models (CUDA: max_memory_allocated; CPU: peak RSS over the RSS before the first step, with
the kernel's peak mark reset there). On the CPU the step time
is the process's CPU time (``time.process_time``; run with 1 thread): wall time on a shared machine measures the
neighbours. Variants:

  captioner      caption_nll only (BLIP teacher-forced NLL)                     the bare captioner LoRA step
  sd             denoise only (UNet noise MSE)                                  the bare SD LoRA step
  joint_sum      caption_nll + i2t2i + denoise + t2i2t (one_step), one step     loss.schedule=sum
  joint_sum_q    the same, the regularisers on part of the batch                 loss.regularizer_items=B/4
  joint_alt      an image step (caption_nll + i2t2i) then a text step (denoise + t2i2t): two optimizer
                 steps, as the original alternates (each model's task loss once, like captioner + sd)
  image_sim      caption_nll + image_sim (sampler, gradient through the last of N steps)

and prints ratios to (captioner + sd), with and without gradient checkpointing (goal: joint <= 1.3x).

The floor: every forward + backward pass the enabled terms need, each timed alone on the same batch (``floor``
runs them one by one: VAE encode, caption text encoding, captioner teacher-forced pass, bridge + text encoder,
a UNet pass, VAE decode, captioner pass on decoded pixels) and summed per variant; the table prints
step / floor (goal for the joint steps: <= 1.15x). What is left above the floor is the objective's own overhead.

    python benchmarks/bench_finetune.py                                   # tiny random models (seconds)
    python benchmarks/bench_finetune.py --config finetune-shapes          # the shapes bundle
    python benchmarks/bench_finetune.py --config finetune-blip-sd14-paper --device cuda   # real models, a GPU
    python benchmarks/bench_finetune.py --real-arch --threads 1    # SD v1.5 + BLIP base architectures, random

``--real-arch`` builds Stable Diffusion v1.5's architecture and BLIP base with random weights (saved once under
$RECON_CACHE/bench-real-arch) and times one joint step per configuration at the real resolutions (512 px images,
384 px captioner input), batch ``--batch-size`` (default 1): REAL_VARIANTS below, each with gradient checkpointing
off and on. On the CPU the child's data segment is capped (``--memory-cap-gb``) so a configuration that does not
fit fails alone ("> cap") instead of waking the OOM killer.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import queue as queue_mod
import resource
import statistics
import sys
import time

VARIANTS = {
    "captioner": dict(weights=dict(caption_nll=1.0), directions=["image"]),
    "sd": dict(weights=dict(denoise=1.0), directions=["text"]),
    "joint_sum": dict(weights=dict(caption_nll=1.0, i2t2i=1.0, denoise=1.0, t2i2t=1.0), directions=["both"]),
    "joint_sum_q": dict(
        weights=dict(caption_nll=1.0, i2t2i=1.0, denoise=1.0, t2i2t=1.0), directions=["both"], quarter=True
    ),
    "joint_alt": dict(
        weights=dict(caption_nll=1.0, i2t2i=1.0, denoise=1.0, t2i2t=1.0), directions=["image", "text"]
    ),
    "image_sim": dict(weights=dict(caption_nll=1.0, image_sim=1.0), directions=["image"]),
    "floor": dict(
        weights=dict(caption_nll=1.0, i2t2i=1.0, denoise=1.0, t2i2t=1.0), directions=[]
    ),  # see FLOOR
}
ALL_OFF = dict(caption_nll=0.0, denoise=0.0, i2t2i=0.0, t2i2t=0.0, image_sim=0.0)
REAL_VARIANTS = {
    "i2t2i+denoise": dict(weights=dict(caption_nll=1.0, i2t2i=1.0, denoise=1.0), directions=["both"]),
    "+t2i2t_one_step": dict(
        weights=dict(caption_nll=1.0, i2t2i=1.0, denoise=1.0, t2i2t=1.0), directions=["both"]
    ),
    "+image_sim": dict(
        weights=dict(caption_nll=1.0, i2t2i=1.0, denoise=1.0, t2i2t=1.0, image_sim=1.0), directions=["both"]
    ),
}
VARIANTS.update(REAL_VARIANTS)


def real_arch_models(root) -> list[str]:
    """SD v1.5 (UNet, VAE, CLIP ViT-L/14 text encoder) and BLIP base with random weights, saved under ``root``
    once; returns the config overrides that point a finetune config at them (512 px, batch of real size)."""
    from pathlib import Path

    root = Path(root)
    if not (root / ".complete").exists():
        import torch

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_reconstruct import sd15_random_components

        pipe, blip, proc, _ = sd15_random_components(torch.device("cpu"), torch.float32, 512)
        pipe.save_pretrained(root / "sd15")
        blip.save_pretrained(root / "blip")
        proc.save_pretrained(root / "blip")
        (root / ".complete").write_text("1\n")
    return [
        f"captioner.model={root / 'blip'}",
        f"generator.model={root / 'sd15'}",
        "data.resolution=512",
        "loss.image_sim_terms.clip_metric.model=builtin:shapes/clip",
        "loss.image_sim_terms.lpips=0",
        "loss.one_step_max_timestep=500",
        "sampler.num_steps=10",
        "sampler.grad_steps=1",
        "captioner_lora.targets=xattn_q",
        "unet_lora.targets=attn2_q",
    ]


def reset_peak_rss() -> float:
    """Reset the kernel's peak-RSS mark (Linux: VmHWM) to the current RSS; returns the current RSS in MB."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # elsewhere the peak is ru_maxrss since the start: steps below the loading peak then show 0
    return proc_status("VmRSS")


def peak_rss() -> float:
    return proc_status("VmHWM")


def proc_status(key: str) -> float:
    """MB of a /proc/self/status field, or ru_maxrss where /proc is missing."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# The passes each variant needs (see floor_components): t2i2t one_step reuses the denoise UNet call unless
# loss.one_step_max_timestep gives it timesteps of its own (one more UNet pass); B/4 sub-batches are not modelled.
FLOOR = {
    "captioner": ["captioner"],
    "sd": ["vae_encode", "text_states", "unet"],
    "joint_sum": [
        "vae_encode",
        "captioner",
        "bridge",
        "unet",
        "text_states",
        "unet",
        "vae_decode",
        "captioner_on_pixels",
    ],
    "joint_alt": [
        "vae_encode",
        "captioner",
        "bridge",
        "unet",
        "text_states",
        "unet",
        "vae_decode",
        "captioner_on_pixels",
    ],
}


def floor_components(objective, images, captions, generator, torch) -> dict:
    """One call per pass the losses need, each alone, with the backward it needs; returns the callables."""
    from recon.train.bridge import caption_positions
    from recon.train.losses import captioning_nll

    d = objective.diffusion
    latents = d.encode(images, generator)
    logits0, labels0 = objective.caption_logits(images, captions)
    logits0, positions = logits0.detach(), caption_positions(labels0, objective.end_token_id)
    states0 = d.text_states(captions)
    noisy, target, t = d.noised(latents, generator)

    def captioner():
        logits, labels = objective.caption_logits(images, captions)
        captioning_nll(logits, labels).backward()

    def bridge():
        x = logits0.clone().requires_grad_(True)
        states, _ = objective.bridge(x, positions, generator)
        states.float().pow(2).mean().backward()

    def unet():
        s = states0.clone().requires_grad_(True)
        torch.nn.functional.mse_loss(d.predict(noisy, t, s).float(), target.float()).backward()

    def vae_decode():
        z = latents.clone().requires_grad_(True)
        d.decode(z).mean().backward()

    def captioner_on_pixels():
        x = images.clone().float().requires_grad_(True)
        logits, labels = objective.caption_logits(x, captions)
        captioning_nll(logits, labels).backward()

    return {
        "vae_encode": lambda: d.encode(images, generator),
        "text_states": lambda: d.text_states(captions),
        "captioner": captioner,
        "bridge": bridge,
        "unet": unet,
        "vae_decode": vae_decode,
        "captioner_on_pixels": captioner_on_pixels,
    }


def run_variant(args: dict, variant: str, checkpointing: bool, queue) -> None:

    if args.get("memory_cap_gb") and args["device"] == "cpu":
        cap = int(args["memory_cap_gb"] * 2**30)
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    try:
        _run_variant(args, variant, checkpointing, queue)
    except (MemoryError, RuntimeError) as e:
        if "memory" not in str(e).lower():
            raise
        queue.put(
            {"variant": variant, "checkpointing": checkpointing, "error": f"> {args['memory_cap_gb']} GB"}
        )


def _run_variant(args: dict, variant: str, checkpointing: bool, queue) -> None:
    import dataclasses

    import torch

    from recon import hub
    from recon.train.adapters import trainable
    from recon.train.bridge import SoftTokenBridge, vocab_index
    from recon.train.config import load_finetune_config
    from recon.train.data import make_pairs
    from recon.train.diffusion import Diffusion
    from recon.train.joint import enable_checkpointing, image_sim_metrics, load_roles
    from recon.train.losses import JointObjective

    torch.set_num_threads(args["threads"])
    device = torch.device(args["device"])
    cfg = load_finetune_config(args["config"], args["overrides"])
    spec = VARIANTS[variant]
    loss = dataclasses.replace(
        cfg.loss,
        **{**ALL_OFF, **spec["weights"]},
        regularizer_items=args["reg_items"] if spec.get("quarter") else None,
    )
    cfg = dataclasses.replace(cfg, loss=loss)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    captioner, pipe = load_roles(cfg, device, dtype)
    params = [p for m in (captioner.model, pipe.unet) for p in trainable(m).values()]
    for p in params:
        p.data = p.data.float()
    if checkpointing:
        enable_checkpointing(captioner.model.get_base_model())
        pipe.unet.enable_gradient_checkpointing()
    captioner.model.train()
    pipe.unet.train()
    bridge = SoftTokenBridge(
        vocab_index(captioner.tokenizer, pipe.tokenizer, hub.cache_root()),
        pipe.text_encoder,
        pipe.tokenizer,
        cfg.bridge,
    ).to(device)
    objective = JointObjective(
        captioner,
        Diffusion(pipe, checkpointing),
        bridge,
        cfg.loss,
        cfg.sampler,
        image_sim_metrics(cfg, device),
    )
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    resolution = int(pipe.unet.config.sample_size * pipe.vae_scale_factor)
    batch = make_pairs(cfg.data, cfg.data.resolution or resolution, 0).train_batch(0, n=args["batch_size"])
    images = batch.images.to(device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda")

    def step(i: int) -> None:
        for direction in spec["directions"]:
            g = torch.Generator(device).manual_seed(i)
            with autocast:
                terms = objective(images, batch.captions, direction, g)
            terms.total.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    if variant == "floor":
        clock = time.perf_counter if device.type == "cuda" else time.process_time
        parts = floor_components(
            objective, images, batch.captions, torch.Generator(device).manual_seed(0), torch
        )
        seconds = {}
        for name, fn in parts.items():
            times = []
            for i in range(args["warmup"] + args["steps"]):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = clock()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i >= args["warmup"]:
                    times.append(clock() - t0)
                optimizer.zero_grad(set_to_none=True)
            seconds[name] = statistics.median(times)
        queue.put({"variant": "floor", "checkpointing": checkpointing, "components": seconds})
        return

    base_rss = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    for i in range(args["warmup"]):
        step(i)
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    times, walls = [], []
    for i in range(args["steps"]):
        sync()
        t0, w0 = clock(), time.perf_counter()
        step(args["warmup"] + i)
        sync()
        times.append(clock() - t0)
        walls.append(time.perf_counter() - w0)
    peak = (
        (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
        if device.type == "cuda"
        else peak_rss() - base_rss
    )
    queue.put(
        {
            "variant": variant,
            "checkpointing": checkpointing,
            "step_s": statistics.median(times),
            "wall_s": statistics.median(walls),
            "peak_mb": peak,
            "params": sum(p.numel() for p in params),
        }
    )


def measure(args: dict, variant: str, checkpointing: bool) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=run_variant, args=(args, variant, checkpointing, queue))
    proc.start()
    while True:  # a child that dies (an error in the variant) must not leave the parent waiting forever
        try:
            result = queue.get(timeout=5)
            break
        except queue_mod.Empty:
            if not proc.is_alive():
                raise RuntimeError(
                    f"variant {variant} failed (exit code {proc.exitcode}); see its traceback above"
                ) from None
    proc.join()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="finetune-shapes-smoke")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's train.batch_size")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument(
        "--reg-items", type=int, default=None, help="joint_sum_q's loss.regularizer_items (B/4)"
    )
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument(
        "--real-arch", action="store_true", help="SD v1.5 + BLIP base architectures, random weights"
    )
    parser.add_argument(
        "--memory-cap-gb", type=float, default=None, help="CPU: cap each variant's data segment"
    )
    a = parser.parse_args(argv)
    if a.real_arch:
        return real_arch(a)
    from recon.train.config import load_finetune_config

    cfg = load_finetune_config(a.config, a.overrides)
    args = dict(
        config=a.config,
        overrides=a.overrides,
        batch_size=a.batch_size or cfg.train.batch_size,
        steps=a.steps,
        warmup=a.warmup,
        device=a.device,
        threads=a.threads,
    )
    args["reg_items"] = a.reg_items or max(1, args["batch_size"] // 4)
    clock = "wall" if a.device.startswith("cuda") else "CPU"
    print(
        f"config {a.config}, batch {args['batch_size']}, device {a.device}, threads {a.threads}, {clock} time, "
        f"median of {a.steps} steps after {a.warmup} warm-up; sampler {cfg.sampler.num_steps} steps "
        f"(grad through {cfg.sampler.grad_steps})",
        flush=True,
    )
    results = []
    for checkpointing in (False, True):
        rows = {v: measure(args, v, checkpointing) for v in a.variants.split(",")}
        results += rows.values()
        parts = measure(args, "floor", checkpointing)["components"]
        results.append({"floor_components": parts, "checkpointing": checkpointing})
        own_call = (
            ["unet"] if cfg.loss.one_step_max_timestep else []
        )  # t2i2t's own timesteps: a UNet pass of its own
        floors = {
            v: sum(parts[c] for c in FLOOR[v] + (own_call if v.startswith("joint") else []))
            for v in rows
            if v in FLOOR
        }
        print(f"\ngradient checkpointing {'on' if checkpointing else 'off'}")
        print("floor passes (s): " + ", ".join(f"{k} {v:.3f}" for k, v in parts.items()))
        print(
            f"{'variant':<12} {'step s':>8} {'peak MB':>9} {'time x':>7} {'mem x':>7} {'wall s':>8} {'floor s':>8} "
            f"{'/floor':>7}"
        )
        base_t = (
            rows["captioner"]["step_s"] + rows["sd"]["step_s"] if {"captioner", "sd"} <= rows.keys() else None
        )
        base_m = max(rows["captioner"]["peak_mb"], rows["sd"]["peak_mb"]) if base_t else None
        for v, r in rows.items():
            tx = f"{r['step_s'] / base_t:.2f}" if base_t else ""
            mx = f"{r['peak_mb'] / base_m:.2f}" if base_m and base_m > 0 else ""
            fl = floors.get(v)
            # joint_alt takes two optimizer steps: its floor is the same passes, its step time both steps
            fx = f"{fl:>8.3f} {r['step_s'] / fl:>7.2f}" if fl else ""
            print(
                f"{v:<12} {r['step_s']:>8.3f} {r['peak_mb']:>9.1f} {tx:>7} {mx:>7} {r['wall_s']:>8.3f} {fx}",
                flush=True,
            )
        if base_t:
            print(f"(time x: / (captioner + sd) = {base_t:.3f} s; mem x: / max(captioner, sd) peak)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": args, "results": results}, f, indent=2)
    return 0


def real_arch(a) -> int:
    """One joint step per REAL_VARIANTS configuration, checkpointing off and on: step time and peak memory."""
    import os
    from pathlib import Path

    from recon.hub import cache_root

    overrides = real_arch_models(cache_root() / "bench-real-arch-v1") + list(a.overrides)
    args = dict(
        config="finetune-shapes",
        overrides=overrides,
        batch_size=a.batch_size or 1,
        steps=a.steps,
        warmup=a.warmup,
        device=a.device,
        threads=a.threads,
        reg_items=None,
        memory_cap_gb=a.memory_cap_gb or (18 if a.device == "cpu" else None),
    )
    clock = "wall" if a.device.startswith("cuda") else "CPU"
    print(
        f"real architectures (SD v1.5 UNet/VAE/text encoder, BLIP base; random weights), batch "
        f"{args['batch_size']}, 512 px, device {a.device}, threads {a.threads}, {clock} seconds, median of "
        f"{a.steps} step(s) after {a.warmup} warm-up; image_sim: 10 DDIM steps, gradient through the last",
        flush=True,
    )
    print(f"{'configuration':<18} {'ckpt':>5} {'step s':>9} {'peak MB':>9}")
    results = []
    for variant in REAL_VARIANTS:
        for checkpointing in (False, True):
            r = measure(args, variant, checkpointing)
            results.append(r)
            if "error" in r:
                print(
                    f"{variant:<18} {'on' if checkpointing else 'off':>5} {'–':>9} {r['error']:>9}",
                    flush=True,
                )
            else:
                print(
                    f"{variant:<18} {'on' if checkpointing else 'off':>5} {r['step_s']:>9.2f} {r['peak_mb']:>9.0f}",
                    flush=True,
                )
    if a.json:
        Path(a.json).write_text(json.dumps({"args": args, "results": results, "pid": os.getpid()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
