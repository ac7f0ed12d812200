"""Cost of issue 24's additions, each printed against the path it extends in the same run (CPU seconds, medians):

* prompt encoding: ``generator.long_prompts=chunk`` (:func:`recon.generators.diffusion.encode_long_prompts`) vs the
  pipeline's own truncating ``encode_prompt``, for a 150-token prompt, on SD v1.5's text encoder architecture
  (CLIP ViT-L/14 text tower, random weights); and one UNet pass (SD v1.5 architecture, random weights, 64 x 64
  latents) with the 154-token context chunking gives vs the 77-token one;
* text similarity: ``long_text=chunk_mean`` vs ``truncate`` on 150-token captions (open_clip ViT-B/32 text tower);
* image similarity per image: DreamSim (the ``dreamsim`` package's PerceptualModel: the ensemble of three ViT-B/16
  branches, and the single ``dino_vitb16`` branch) vs CLIP ViT-B/32 (recon's default ``clip`` metric), through
  recon's modules. Random weights in the real architectures: the cost is the architecture's, not the weights'
  (no weights are downloaded; DreamSim needs ``pip install dreamsim``).

  OMP_NUM_THREADS=1 python benchmarks/bench_long_captions.py [--repeats 5] [--batch 8] [--skip-unet]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recon.generators.diffusion import chunk_token_ids, encode_long_prompts  # noqa: E402

WORDS = ("red", "blue", "circle", "square", "small", "large", "left", "right", "above", "below")


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def report(name: str, base_name: str, base: float, new_name: str, new: float, **extra) -> None:
    print(
        json.dumps(
            {
                "bench": name,
                base_name: round(base, 4),
                new_name: round(new, 4),
                "ratio": round(new / base, 2),
                **extra,
            }
        ),
        flush=True,
    )


def clip_tokenizer():
    """A CLIP BPE tokenizer with SD's 77 tokens: the tiny-random generator's (the full CLIP vocabulary)."""
    from transformers import CLIPTokenizer

    from recon import hub

    return CLIPTokenizer.from_pretrained(hub.builtin_path("builtin:tiny-random/generator") / "tokenizer")


def bench_prompt_encoding(repeats: int, batch: int, unet: bool) -> None:
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers import CLIPTextConfig, CLIPTextModel

    diffusers_logging.set_verbosity_error()  # its truncation warning, once per call

    tok = clip_tokenizer()
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            projection_dim=768,
            hidden_act="quick_gelu",
        )
    ).eval()
    prompt = " ".join(WORDS[i % len(WORDS)] for i in range(148))
    assert len(tok(prompt).input_ids) == 150 and len(chunk_token_ids(tok, prompt)[0]) == 2
    prompts = [prompt] * batch

    pipe = types.SimpleNamespace(tokenizer=tok, text_encoder=text_encoder)  # all encode_prompt reads

    def truncated():
        with torch.inference_mode():
            StableDiffusionPipeline.encode_prompt(pipe, prompts, "cpu", 1, False)

    def chunked():
        with torch.inference_mode():
            encode_long_prompts(tok, text_encoder, prompts, 2, "cpu")

    report(
        "prompt encoding, 150-token prompt, SD1.5 text encoder",
        "truncate_s",
        median_seconds(truncated, repeats),
        "chunk_s",
        median_seconds(chunked, repeats),
        batch=batch,
    )
    if not unet:
        return
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet_model = UNet2DConditionModel(sample_size=64, cross_attention_dim=768).eval()  # SD v1.5's UNet config
    latents, t = torch.randn(2, 4, 64, 64), torch.tensor(500)  # one image with classifier-free guidance

    def step(tokens: int):
        ctx = torch.randn(2, tokens, 768)

        def run():
            with torch.inference_mode():
                unet_model(latents, t, encoder_hidden_states=ctx)

        return run

    report(
        "one UNet pass (SD1.5, 64x64 latents, CFG batch 2)",
        "context77_s",
        median_seconds(step(77), repeats),
        "context154_s",
        median_seconds(step(154), repeats),
    )


def bench_text_similarity(repeats: int, batch: int) -> None:
    import open_clip

    from recon.similarity import ClipTextSimilarity

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32").eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    texts = [" ".join(WORDS[(i + j) % len(WORDS)] for i in range(148)) for j in range(batch)]
    truncate, chunk = (
        ClipTextSimilarity(model, tokenizer),
        ClipTextSimilarity(model, tokenizer, long_text="chunk_mean"),
    )

    def enc(metric):
        def run():
            with torch.inference_mode():
                metric.encode(texts)

        return run

    report(
        "CLIP text embedding, 150-token captions (ViT-B/32)",
        "truncate_s",
        median_seconds(enc(truncate), repeats),
        "chunk_mean_s",
        median_seconds(enc(chunk), repeats),
        batch=batch,
    )


def dreamsim_architecture(variant: str):
    """dreamsim's PerceptualModel for ``variant`` with random ViT-B/16 branches (its loaders need the weights)."""
    from dreamsim.config import dreamsim_args
    from dreamsim.feature_extraction.extractor import ViTExtractor
    from dreamsim.feature_extraction.vision_transformer import vit_base
    from dreamsim.model import PerceptualModel

    def random_branch(model_type, load_dir):
        vit = vit_base(patch_size=16)
        return vit if model_type.startswith("dino") else (vit, torch.randn(768, 512))

    original = ViTExtractor.create_model
    ViTExtractor.create_model = staticmethod(random_branch)
    try:
        torch.manual_seed(0)
        return PerceptualModel(
            **dreamsim_args["model_config"][variant], device="cpu", normalize_embeds=True
        ).eval()
    finally:
        ViTExtractor.create_model = original


def bench_image_similarity(repeats: int, batch: int) -> None:
    import open_clip

    from recon.similarity import ClipImageSimilarity, DreamSimDistance
    from recon.similarity.base import freeze

    torch.manual_seed(0)
    clip_model, _, _ = open_clip.create_model_and_transforms("ViT-B-32")
    clip = ClipImageSimilarity(freeze(clip_model), dict(clip_model.visual.preprocess_cfg))
    a, b = torch.rand(batch, 3, 512, 512), torch.rand(batch, 3, 512, 512)  # SD-sized reconstructions

    def per_image(metric):
        def run():
            with torch.inference_mode():
                metric(a, b)

        return lambda: run()

    base = median_seconds(per_image(clip), repeats) / batch
    try:
        import dreamsim  # noqa: F401
    except ImportError:
        print(json.dumps({"bench": "DreamSim vs CLIP", "skipped": "pip install dreamsim"}))
        return
    for variant in ("dino_vitb16", "ensemble"):
        metric = DreamSimDistance(freeze(dreamsim_architecture(variant)))
        report(
            f"image similarity per image pair (512 px in): DreamSim {variant} vs CLIP ViT-B/32",
            "clip_s",
            base,
            "dreamsim_s",
            median_seconds(per_image(metric), repeats) / batch,
            batch=batch,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--skip-unet", action="store_true")
    ap.add_argument("--only", choices=("prompt", "text", "image"))
    args = ap.parse_args()
    print(json.dumps({"threads": torch.get_num_threads()}))
    if args.only in (None, "prompt"):
        bench_prompt_encoding(args.repeats, args.batch, not args.skip_unet)
    if args.only in (None, "text"):
        bench_text_similarity(args.repeats, args.batch)
    if args.only in (None, "image"):
        bench_image_similarity(args.repeats, args.batch)


if __name__ == "__main__":
    main()
