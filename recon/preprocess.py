"""Differentiable image preprocessing in torch: resize, center crop or pad, normalise.

The reference pipelines (open_clip's torchvision transforms, transformers' CLIPImageProcessor) work one image
at a time, outside autograd. Here the same steps run batched on ``[B, 3, H, W]`` float tensors in [0, 1], so
gradients reach the input pixels and a reconstruction loss can go through any image similarity. Sizes, modes
and rounding follow those pipelines' tensor paths, so scores match the bare libraries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

INTERPOLATIONS = ("bicubic", "bilinear")
# PIL resampling codes (transformers' ``resample``) -> torch interpolate modes; nearest/lanczos etc. fall back to
# bicubic, which is what CLIP models were trained with.
PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def resize(images: torch.Tensor, size: tuple[int, int], interpolation: str = "bicubic") -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, C, *size]``, antialiased (like torchvision's tensor resize); identity if same."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=tuple(size), mode=interpolation, align_corners=False, antialias=True)


def center_crop_or_pad(
    images: torch.Tensor, size: tuple[int, int], fill: float = 0.0, offset_rounding: str = "round"
) -> torch.Tensor:
    """Crop the center ``size``; sides smaller than ``size`` are padded with ``fill`` first.

    ``offset_rounding``: ``round`` (torchvision / open_clip) or ``floor`` (transformers) for odd margins.
    """
    h, w = images.shape[-2:]
    th, tw = size
    if th > h or tw > w:
        pad_w, pad_h = max(tw - w, 0), max(th - h, 0)
        images = F.pad(images, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2), value=fill)
        h, w = images.shape[-2:]
    rnd = round if offset_rounding == "round" else int
    top, left = int(rnd((h - th) / 2.0)), int(rnd((w - tw) / 2.0))
    return images[..., top : top + th, left : left + tw]


@dataclass(frozen=True)
class ImagePreprocess:
    """Resize + crop + normalise exactly like a model's own preprocessing, on batched tensors.

    ``resize_mode``: ``shortest`` (shortest side to the target, then center crop), ``longest`` (longest side to
    the target, then pad with ``fill``), ``squash`` (straight to the target size).
    """

    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"
    fill: float = 0.0  # in [0, 1] pixel units, before normalisation
    offset_rounding: str = "round"
    crop: tuple[int, int] | None = None  # transformers: a crop size separate from the resize size

    def __post_init__(self):
        if self.resize_mode not in ("shortest", "longest", "squash"):
            raise ValueError(f"resize_mode {self.resize_mode!r}: expected shortest, longest or squash")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation {self.interpolation!r}: expected one of {INTERPOLATIONS}")

    @classmethod
    def from_open_clip(cls, cfg: dict) -> ImagePreprocess:
        """From ``model.visual.preprocess_cfg`` (open_clip keeps it with the weights' tag)."""
        size = cfg.get("size", 224)
        size = (size, size) if isinstance(size, int) else tuple(size)
        interpolation = "bilinear" if cfg.get("interpolation") == "bilinear" else "bicubic"
        return cls(
            size=size,
            mean=tuple(cfg.get("mean", OPENAI_MEAN)),
            std=tuple(cfg.get("std", OPENAI_STD)),
            resize_mode=cfg.get("resize_mode") or "shortest",
            interpolation=interpolation,
            fill=float(cfg.get("fill_color", 0)) / 255.0,
        )

    @classmethod
    def from_hf_processor(cls, processor) -> ImagePreprocess:
        """From a transformers image processor (CLIPImageProcessor and alike)."""

        def present(sizes) -> dict:  # transformers' SizeDict may carry unset keys as None
            return {k: v for k, v in dict(sizes or {}).items() if v is not None}

        size = present(processor.size) if getattr(processor, "do_resize", True) else {}
        crop = present(processor.crop_size) if getattr(processor, "do_center_crop", False) else {}
        crop_hw = (crop["height"], crop["width"]) if crop else None
        if "shortest_edge" in size:
            mode, hw = "shortest", (size["shortest_edge"],) * 2
        elif "height" in size:
            mode, hw = "squash", (size["height"], size["width"])
        elif crop_hw:
            mode, hw = "shortest", crop_hw
        else:
            raise ValueError(f"{type(processor).__name__}: unsupported size {processor.size!r}")
        normalize = getattr(processor, "do_normalize", True)
        mean = tuple(processor.image_mean) if normalize else (0.0, 0.0, 0.0)
        std = tuple(processor.image_std) if normalize else (1.0, 1.0, 1.0)
        resample = getattr(processor, "resample", 3)
        return cls(
            size=hw,
            mean=mean,
            std=std,
            resize_mode=mode,
            interpolation=PIL_RESAMPLE.get(int(resample), "bicubic"),
            offset_rounding="floor",
            crop=crop_hw,
        )

    def resized_size(self, h: int, w: int) -> tuple[int, int]:
        th, tw = self.size
        if self.resize_mode == "squash":
            return th, tw
        if self.resize_mode == "shortest" and th == tw:
            # torchvision Resize(int): the long side is truncated, not rounded
            short, long = min(h, w), max(h, w)
            new_long = int(th * long / short)
            return (th, new_long) if h <= w else (new_long, th)
        ratio_h, ratio_w = h / th, w / tw
        ratio = max(ratio_h, ratio_w) if self.resize_mode == "longest" else min(ratio_h, ratio_w)
        return round(h / ratio), round(w / ratio)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [0, 1] -> ``[B, 3, *crop or size]``, normalised with the model's mean/std."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
        x = resize(images, self.resized_size(*images.shape[-2:]), self.interpolation)
        x = center_crop_or_pad(x, self.crop or self.size, self.fill, self.offset_rounding)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std


def match_sizes(a: torch.Tensor, b: torch.Tensor, clamp: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring two image batches to a common ``(min H, min W)``: the smaller image's size when aspect ratios agree.

    Only the larger one is resized (bicubic, antialiased), so comparing a 512 px original with a 64 px
    reconstruction measures at 64 px and never invents detail by upsampling. With ``clamp`` the resized values
    are clipped to [0, 1], as an 8-bit resize would do (bicubic overshoots at edges).
    """
    if a.shape[-2:] == b.shape[-2:]:
        return a, b
    size = (min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1]))

    def fit(x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) == size:
            return x
        x = resize(x, size)
        return x.clamp(0.0, 1.0) if clamp else x

    return fit(a), fit(b)


def broadcast_batch(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Check batch sizes agree; a batch of 1 is expanded to the other (one original vs K reconstructions)."""
    if a.shape[0] == b.shape[0]:
        return a, b
    if a.shape[0] == 1:
        return a.expand(b.shape[0], *a.shape[1:]), b
    if b.shape[0] == 1:
        return a, b.expand(a.shape[0], *b.shape[1:])
    raise ValueError(f"batch sizes differ: {a.shape[0]} vs {b.shape[0]} (each must match, or one be 1)")
