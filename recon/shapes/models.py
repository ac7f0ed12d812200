"""Architectures of the shapes bundle as plain data, and how each part is saved in its standard layout.

Every model is the real class of its role (transformers BLIP, diffusers AutoencoderKL / UNet2DConditionModel /
CLIPTextModel, open_clip CLIP with a ModifiedResNet image tower), only small. The real vocabularies are kept:
BLIP's BERT WordPiece (30524 rows) and CLIP's BPE (49408 rows). Weights are stored as fp16 safetensors with the
configs saying fp32, so a plain ``from_pretrained(dir)`` loads fp32 models.

The judge (:class:`AttributeJudge`) is our own small CNN that reads the five attributes off an image; it is used
only to score generated images, never inside recon's pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from recon.hub import load_safetensors_or_pt
from recon.shapes import world

# Weight init std. BLIP's 0.02 suits width 768; at width 128 the attention logits start ~30x too flat, and the v1
# captioner, trained from 0.02, never learned position in 1000 steps (a ViT of this size with a position head alone:
# 29% after 200 steps at 0.02, 98% at 0.1). Also sets the position embeddings (BlipVisionConfig's default: 1e-10).
CAPTIONER_INIT = 0.1
CAPTIONER_VISION = dict(
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=world.IMAGE_SIZE,
    patch_size=4,
    initializer_range=CAPTIONER_INIT,
)
CAPTIONER_TEXT = dict(
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    encoder_hidden_size=128,
    max_position_embeddings=40,
    initializer_range=CAPTIONER_INIT,
)
# Tokens the world never uses get this output bias, so full-vocabulary decoding equals the restricted softmax the
# captioner is trained with (see train.py: the 30524-way softmax would more than double a CPU training step).
UNUSED_TOKEN_BIAS = -30.0

VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=[16, 32],
    layers_per_block=1,
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    norm_num_groups=8,
    sample_size=world.IMAGE_SIZE,
)
UNET = dict(
    sample_size=world.IMAGE_SIZE // 2,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=8,
    norm_num_groups=16,
)
TEXT_ENCODER = dict(
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    projection_dim=64,
)
# Zero terminal SNR (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed") with
# "trailing" spacing, so sampling starts at t = T from pure noise. SD's scaled_linear schedule leaves
# sqrt(alpha_bar_T) = 0.068 of the image in x_T, enough on 16x16 latents to read where the object is; the v1 UNet
# placed the object where the starting noise suggested (97.5% of seeds: one position for all five position
# captions). Measured: this schedule alone did not fix that (97.5% again at step ~1350; after the full 2400 steps
# the position words still moved the x0 prediction at t = T by only 0.004 RMS); with the init scales below,
# position followed the caption at every seed by step 1055.
NOISE_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="v_prediction",
    rescale_betas_zero_snr=True,
    timestep_spacing="trailing",
)

CLIP_CONTEXT = 32
CLIP_MODEL_CFG = {
    "embed_dim": 64,
    # `layers` as a list selects open_clip's ModifiedResNet: a CNN tower learned shape far faster than a ViT at
    # patch 4 on 32 px images.
    "vision_cfg": {"image_size": world.IMAGE_SIZE, "layers": [1, 1, 1, 1], "width": 16, "head_width": 32},
    "text_cfg": {"context_length": CLIP_CONTEXT, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}

JUDGE = dict(widths=[32, 64, 128], hidden=256)


# ----------------------------------------------------------------------------------------------- captioner
def build_captioner(tokenizer, seed: int = 0, max_position_embeddings: int | None = None):
    """``max_position_embeddings``: the text decoder's longest sequence ([DEC] + caption + [SEP]); None:
    :data:`CAPTIONER_TEXT`'s 40, enough for the shapes world (the scenes world needs more)."""
    from transformers import BlipConfig, BlipForConditionalGeneration

    torch.manual_seed(seed)
    text = dict(CAPTIONER_TEXT)
    if max_position_embeddings is not None:
        text["max_position_embeddings"] = max_position_embeddings
    cfg = BlipConfig(
        vision_config=CAPTIONER_VISION,
        text_config=dict(
            text,
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            sep_token_id=tokenizer.sep_token_id,
        ),
        projection_dim=128,
        initializer_range=CAPTIONER_INIT,
    )
    return BlipForConditionalGeneration(cfg)


def captioner_token_ids(tokenizer, texts: list[str] | None = None) -> list[int]:
    """Ids of every token of ``texts`` (words or whole captions; default: every caption of the shapes world), plus
    [SEP] (end of caption)."""
    ids = {tokenizer.sep_token_id}
    for text in world.caption_vocabulary() if texts is None else texts:
        ids.update(tokenizer(text, add_special_tokens=False).input_ids)
    return sorted(ids)


def image_processor():
    from transformers import BlipImageProcessor

    return BlipImageProcessor(size={"height": world.IMAGE_SIZE, "width": world.IMAGE_SIZE})


def _save_half(model, out: Path) -> None:
    """fp16 safetensors, config dtype fp32: small on disk, fp32 from a plain from_pretrained."""
    model.to(torch.float16).save_pretrained(out)
    model.to(torch.float32)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for key in ("torch_dtype", "dtype"):
        if key in cfg:
            cfg[key] = "float32"
    cfg["dtype"] = "float32"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def save_captioner(model, tokenizer, out: Path) -> Path:
    from transformers import BlipProcessor

    out.mkdir(parents=True, exist_ok=True)
    _save_half(model, out)
    BlipProcessor(image_processor=image_processor(), tokenizer=tokenizer).save_pretrained(out)
    return out


# ----------------------------------------------------------------------------------------------- generator
def build_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**VAE)


# Init scales that let the text reach the UNet. v1 trained from the libraries' defaults: its text encoder outputs
# for "top left" vs "bottom right" differed by ~0.9 (norm, at the word) while colour, size and background words
# differed by ~10-13, and the x0 prediction at t = T moved 0.004 (RMS) when the position words changed vs 0.4 for
# the colour word: the prompt set colour, size and background, never position or shape. Word embeddings start at
# std 1 (nn.Embedding's default, not CLIP's 0.02) so every word stays distinct, and the cross-attention query/key
# weights start 3x larger (logits ~0.3 at the default init: flat attention over the 77 tokens).
TEXT_TOKEN_INIT_STD = 1.0
UNET_XATTN_QK_GAIN = 3.0


def build_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET)
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith("attn2"):
                module.to_q.weight.mul_(UNET_XATTN_QK_GAIN)
                module.to_k.weight.mul_(UNET_XATTN_QK_GAIN)
    return unet


def build_text_encoder(tokenizer, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    model = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=tokenizer.pad_token_id,
            **TEXT_ENCODER,
        )
    )
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, TEXT_TOKEN_INIT_STD)
    return model


def inference_scheduler():
    """DDIM with v-prediction: the intended sampler (20 steps, guidance 5)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**NOISE_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def training_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**NOISE_SCHEDULE, clip_sample=False)


def save_generator(vae, text_encoder, tokenizer, unet, out: Path) -> Path:
    """A full StableDiffusionPipeline folder (no safety checker)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=inference_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(torch.float16).save_pretrained(out, safe_serialization=True)
    pipe.to(torch.float32)
    te_cfg = out / "text_encoder" / "config.json"
    cfg = json.loads(te_cfg.read_text())
    cfg["dtype"] = "float32"
    cfg.pop("torch_dtype", None)
    te_cfg.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out


# ----------------------------------------------------------------------------------------------- CLIP
def clip_model_cfg(context_length: int = CLIP_CONTEXT) -> dict:
    """The CLIP architecture with a text context of ``context_length`` tokens (the scenes world's captions need
    more than the shapes world's 32)."""
    return {**CLIP_MODEL_CFG, "text_cfg": {**CLIP_MODEL_CFG["text_cfg"], "context_length": context_length}}


def build_clip(seed: int = 0, context_length: int = CLIP_CONTEXT):
    import open_clip

    torch.manual_seed(seed)
    return open_clip.CLIP(**clip_model_cfg(context_length))


def clip_tokenizer(context_length: int = CLIP_CONTEXT):
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


def clip_preprocess_cfg() -> dict:
    import open_clip

    return {
        "size": world.IMAGE_SIZE,
        "mean": list(open_clip.OPENAI_DATASET_MEAN),
        "std": list(open_clip.OPENAI_DATASET_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }


def save_clip(model, out: Path, context_length: int = CLIP_CONTEXT) -> Path:
    """Hub layout: open_clip_config.json + open_clip_model.safetensors (fp16; open_clip loads into fp32)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    (out / "open_clip_config.json").write_text(
        json.dumps(
            {"model_cfg": clip_model_cfg(context_length), "preprocess_cfg": clip_preprocess_cfg()}, indent=2
        )
        + "\n"
    )
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "open_clip_model.safetensors"))
    return out


# ----------------------------------------------------------------------------------------------- judge
class AttributeJudge(nn.Module):
    """Reads (shape, color, size, position, background) off an image.

    Input ``(B, 3, 32, 32)`` floats in [0, 1]; output a dict attribute -> logits ``(B, len(world.VALUES[attr]))``.
    """

    def __init__(self, widths: list[int] | None = None, hidden: int = 256):
        super().__init__()
        widths = widths or JUDGE["widths"]
        layers, c = [], 3
        for w in widths:
            layers += [
                nn.Conv2d(c, w, 3, padding=1),
                nn.GroupNorm(8, w),
                nn.SiLU(),
                nn.Conv2d(w, w, 3, padding=1, stride=2),
                nn.GroupNorm(8, w),
                nn.SiLU(),
            ]
            c = w
        self.features = nn.Sequential(*layers, nn.Flatten())
        side = world.IMAGE_SIZE // 2 ** len(widths)
        self.trunk = nn.Sequential(nn.Linear(c * side * side, hidden), nn.SiLU())
        self.heads = nn.ModuleDict({a: nn.Linear(hidden, len(world.VALUES[a])) for a in world.ATTRIBUTES})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(self.features(images * 2 - 1))
        return {a: head(h) for a, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> list[dict[str, str]]:
        logits = self(images)
        idx = {a: logits[a].argmax(-1).tolist() for a in world.ATTRIBUTES}
        return [{a: world.VALUES[a][idx[a][i]] for a in world.ATTRIBUTES} for i in range(images.shape[0])]


def save_judge(model: AttributeJudge, out: Path) -> Path:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(
        json.dumps(
            {
                "class": "recon.shapes.models.AttributeJudge",
                **JUDGE,
                "attributes": {a: list(world.VALUES[a]) for a in world.ATTRIBUTES},
                "input": "RGB float [0, 1], 32x32",
            },
            indent=2,
        )
        + "\n"
    )
    save_file(
        {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()},
        str(out / "model.safetensors"),
    )
    return out


def load_judge(path: str | Path, device: torch.device | str = "cpu") -> AttributeJudge:
    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    if cfg.get("attributes") != {a: list(world.VALUES[a]) for a in world.ATTRIBUTES}:
        raise ValueError(f"{path}: the judge was trained on different attribute values than this world's")
    model = AttributeJudge(cfg["widths"], cfg["hidden"])
    state = {k: v.float() for k, v in load_safetensors_or_pt(path / "model.safetensors").items()}
    model.load_state_dict(state)
    return model.to(device).eval()
