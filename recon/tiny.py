"""Tiny random models of the real classes, saved in their standard layouts (``builtin:tiny-random/...``).

They exercise every loading and inference path offline (BLIP, Stable Diffusion, open_clip, HF CLIP vision) with
the real BERT and CLIP vocabularies, in seconds. Their outputs are meaningless; the shapes bundle is the offline
default that knows something.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from recon.tokenizers import make_blip_tokenizer, write_clip_tokenizer

VERSION = 2  # 2: BLIP vision position embeddings initialised at std 0.02 (transformers' default is 1e-10)


def build_blip(out: Path, seed: int = 0, image_size: int = 32) -> Path:
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    torch.manual_seed(seed)
    tok = make_blip_tokenizer()
    cfg = BlipConfig(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=8,
            initializer_range=0.02,
        ),
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            encoder_hidden_size=32,
            max_position_embeddings=64,
            bos_token_id=tok.bos_token_id,
            pad_token_id=tok.pad_token_id,
            sep_token_id=tok.sep_token_id,
        ),
        projection_dim=32,
    )
    model = BlipForConditionalGeneration(cfg).eval()
    model.save_pretrained(out)
    ip = BlipImageProcessor(size={"height": image_size, "width": image_size})
    BlipProcessor(image_processor=ip, tokenizer=tok).save_pretrained(out)
    return out


def build_stable_diffusion(out: Path, seed: int = 0, sample_size: int = 32) -> Path:
    """A StableDiffusionPipeline folder: 2x-downsampling VAE, so images are ``2 * sample_size`` px."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        sample_size=2 * sample_size,
        norm_num_groups=32,
    )
    tok_dir = write_clip_tokenizer(out / "_tok")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out)
    shutil.rmtree(tok_dir)
    return out


def build_open_clip(out: Path, seed: int = 0, image_size: int = 32) -> Path:
    """An open_clip ViT in the hub layout (open_clip_config.json + open_clip_model.safetensors)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model_cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": image_size, "layers": 2, "width": 32, "patch_size": 8, "head_width": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
    }
    model = open_clip.CLIP(**model_cfg)
    out.mkdir(parents=True, exist_ok=True)
    preprocess = {
        "mean": list(open_clip.OPENAI_DATASET_MEAN),
        "std": list(open_clip.OPENAI_DATASET_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    (out / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}, indent=2)
    )
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors")
    )
    return out


def build_clip_vision(out: Path, seed: int = 0, image_size: int = 32) -> Path:
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=8,
        )
    ).save_pretrained(out)
    CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(out)
    return out


BUILDERS = {
    "captioner": build_blip,
    "generator": build_stable_diffusion,
    "clip": build_open_clip,
    "clip_vision": build_clip_vision,
}


def ensure_tiny_models(root: Path) -> Path:
    """Build every tiny part under ``root`` once; safe when several processes race (atomic rename)."""
    root = Path(root)
    if (root / ".complete").exists():
        return root
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for part, build in BUILDERS.items():
        build(tmp / part)
    (tmp / ".complete").write_text("ok\n")
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, root)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
        if not (root / ".complete").exists():
            raise
    return root
