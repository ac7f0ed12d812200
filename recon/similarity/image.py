"""Image similarities: CLIP embeddings (open_clip, HF pooler), DINO, DreamSim, LPIPS, SSIM, PSNR.

Every module takes two float batches ``[B, 3, H, W]`` in [0, 1] (any size; a batch of 1 is broadcast against
the other) and returns ``[B]``. Model-based metrics resize and normalise inside, in torch, so gradients reach the
pixels; pixel metrics first bring both batches to a common size (:func:`recon.preprocess.match_sizes`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recon import hub
from recon.config import ConfigError, MetricConfig
from recon.hub import DEFAULT_DINO, DEFAULT_HF_CLIP_VISION, open_clip_source
from recon.preprocess import ImagePreprocess, broadcast_batch, match_sizes, resize
from recon.similarity.base import EmbeddingSimilarity, Similarity, as_device, freeze


def _model_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(module.parameters())
    return p.device, p.dtype


class ClipImageSimilarity(EmbeddingSimilarity):
    """Cosine similarity of open_clip image embeddings (any architecture); higher is more similar, in [-1, 1].

    Images ``[B, 3, H, W]`` in [0, 1], any size: shortest side resized (bicubic, antialiased) and center-cropped
    to the model's size, normalised with the mean/std of its ``preprocess_cfg``, exactly as open_clip's own
    transform does on tensors. ``encode(images) -> [B, D]`` unit-norm; ``similarity_to(ref_embeds, images)``.
    """

    name = "clip_similarity"
    higher_is_better = True

    def __init__(self, clip: nn.Module, preprocess: dict | ImagePreprocess, name: str | None = None):
        super().__init__(name)
        self.clip = clip
        self.preprocess = (
            preprocess
            if isinstance(preprocess, ImagePreprocess)
            else ImagePreprocess.from_open_clip(preprocess)
        )

    @classmethod
    def from_config(cls, cfg: MetricConfig, device: torch.device | str = "cpu", where: str = "metric"):
        model, pretrained = open_clip_source(cfg, where)
        clip, preprocess_cfg, _ = hub.load_open_clip(
            model, pretrained, as_device(device), field=f"{where}.model"
        )
        return cls(freeze(clip), preprocess_cfg, name=cfg.name)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        device, dtype = _model_dtype(self.clip)
        x = self.preprocess(images.to(device=device, dtype=dtype))
        return F.normalize(self.clip.encode_image(x), dim=-1)


class ClipVisionPoolerSimilarity(EmbeddingSimilarity):
    """The paper's CLIP score: cosine of transformers ``CLIPVisionModel`` ``pooler_output`` (no projection).

    Higher is more similar, in [-1, 1]. Images ``[B, 3, H, W]`` in [0, 1], any size, preprocessed like the
    model's CLIPImageProcessor (shortest edge, center crop, its mean/std), in torch.
    """

    name = "clip_pooler_similarity"
    higher_is_better = True

    def __init__(self, vision_model: nn.Module, processor, name: str | None = None):
        super().__init__(name)
        self.vision = vision_model
        self.preprocess = (
            processor
            if isinstance(processor, ImagePreprocess)
            else ImagePreprocess.from_hf_processor(processor)
        )

    @classmethod
    def from_config(cls, cfg: MetricConfig, device: torch.device | str = "cpu", where: str = "metric"):
        model, processor = hub.load_hf_clip_vision(
            cfg.model or DEFAULT_HF_CLIP_VISION, as_device(device), field=f"{where}.model"
        )
        return cls(freeze(model), processor, name=cfg.name)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        device, dtype = _model_dtype(self.vision)
        x = self.preprocess(images.to(device=device, dtype=dtype))
        return F.normalize(self.vision(pixel_values=x).pooler_output, dim=-1)


class DinoSimilarity(EmbeddingSimilarity):
    """Cosine of DINO / DINOv2 CLS-token features (transformers ``ViTModel`` / ``Dinov2Model``, the final layer's
    ``last_hidden_state[:, 0]``, as the image-similarity literature uses them). Higher is more similar, in [-1, 1].
    Images ``[B, 3, H, W]`` in [0, 1], any size, preprocessed like the model's image processor, in torch.
    ``model``: a hub id (default ``facebook/dino-vitb16``; e.g. ``facebook/dinov2-base``) or a local directory."""

    name = "dino_similarity"
    higher_is_better = True

    def __init__(self, backbone: nn.Module, processor, name: str | None = None):
        super().__init__(name)
        self.backbone = backbone
        self.preprocess = (
            processor
            if isinstance(processor, ImagePreprocess)
            else ImagePreprocess.from_hf_processor(processor)
        )

    @classmethod
    def from_config(cls, cfg: MetricConfig, device: torch.device | str = "cpu", where: str = "metric"):
        if cfg.pretrained is not None:
            raise ConfigError(f"{where}.pretrained: the dino metric takes its weights from {where}.model")
        model, processor = hub.load_dino(cfg.model or DEFAULT_DINO, as_device(device), field=f"{where}.model")
        return cls(freeze(model), processor, name=cfg.name)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        device, dtype = _model_dtype(self.backbone)
        x = self.preprocess(images.to(device=device, dtype=dtype))
        return F.normalize(self.backbone(pixel_values=x).last_hidden_state[:, 0], dim=-1)


class DreamSimDistance(Similarity):
    """DreamSim perceptual distance (Fu et al. 2023, the ``dreamsim`` package): ``1 - cos`` of its embeddings, in
    [0, 2], 0 for identical images, lower is more similar. An optional extra: ``pip install 'recon[dreamsim]'``.

    Images ``[B, 3, H, W]`` in [0, 1], any size: resized to 224 x 224 (bicubic, antialiased: its own PIL
    preprocessing) in torch, so gradients reach the pixels; each branch normalises inside the model. ``model``: the
    directory holding the weights dreamsim downloads (its ``cache_dir``; default ``$RECON_CACHE/dreamsim``),
    ``pretrained``: the variant (``ensemble`` by default: DINO + CLIP + OpenCLIP ViT-B/16; or ``dino_vitb16``,
    ``dinov2_vitb14``, ``clip_vitb32``, ``open_clip_vitb32``, ``synclr_vitb16``). ``encode(images) -> [B, D]``
    unit vectors and ``distance_to(ref_embeds, images)`` compare one original with many reconstructions.
    """

    name = "dreamsim_distance"
    higher_is_better = False
    image_size = 224

    def __init__(self, model: nn.Module, name: str | None = None):
        super().__init__(name)
        self.model = model

    @classmethod
    def from_config(cls, cfg: MetricConfig, device: torch.device | str = "cpu", where: str = "metric"):
        model = hub.load_dreamsim(cfg.model, cfg.pretrained, as_device(device), field=f"{where}.model")
        return cls(freeze(model), name=cfg.name)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        device, dtype = _model_dtype(self.model)
        x = resize(images.to(device=device, dtype=dtype), (self.image_size, self.image_size)).clamp(0, 1)
        return F.normalize(
            self.model.embed(x).float(), dim=-1
        )  # the package's embed: [B, D], centred per row

    def distance_to(self, ref_embeds: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """``1 - cos`` between precomputed ``encode`` output ``[B or 1, D]`` and ``images`` -> ``[B]``."""
        return 1 - EmbeddingSimilarity.cosine(ref_embeds.to(_model_dtype(self.model)[0]), self.encode(images))

    def forward(self, images_a: torch.Tensor, images_b: torch.Tensor) -> torch.Tensor:
        return 1 - EmbeddingSimilarity.cosine(self.encode(images_a), self.encode(images_b))


def _no_model(cfg: MetricConfig, where: str) -> None:
    for key in ("model", "pretrained"):
        if getattr(cfg, key) is not None:
            raise ConfigError(f"{where}.{key}: the {cfg.kind} metric takes no {key}")


LPIPS_MIN_SIZE = {"alex": 31, "vgg": 16, "squeeze": 17}  # smallest side the backbone's pooling accepts


class LpipsDistance(Similarity):
    """LPIPS perceptual distance (lpips.LPIPS, shipped linear heads); lower is more similar, 0 for identical.

    Images ``[B, 3, H, W]`` in [0, 1] (mapped to lpips' [-1, 1] here). If the two batches differ in size, the
    larger is resized (bicubic, antialiased) to ``(min H, min W)``. The backbones need a minimum size
    (``LPIPS_MIN_SIZE``: 31 px per side for alex); smaller images raise a ValueError.
    """

    name = "lpips_distance"
    higher_is_better = False

    def __init__(self, lpips_model: nn.Module, name: str | None = None):
        super().__init__(name)
        self.lpips = lpips_model

    @classmethod
    def from_config(cls, cfg: MetricConfig, device: torch.device | str = "cpu", where: str = "metric"):
        _no_model(cfg, where)
        with torch.random.fork_rng(devices=[]):  # a random backbone (tests) is the same one every time
            torch.manual_seed(0)
            model = hub.load_lpips(cfg.net, cfg.random_backbone, as_device(device))
        return cls(freeze(model), name=cfg.name)

    def forward(self, images_a: torch.Tensor, images_b: torch.Tensor) -> torch.Tensor:
        device, dtype = _model_dtype(self.lpips)
        a, b = match_sizes(images_a.to(device=device, dtype=dtype), images_b.to(device=device, dtype=dtype))
        a, b = broadcast_batch(a, b)
        net = getattr(self.lpips, "pnet_type", "alex")
        if min(a.shape[-2:]) < LPIPS_MIN_SIZE.get(net, 0):
            raise ValueError(
                f"LPIPS ({net}) needs images of at least {LPIPS_MIN_SIZE[net]} px per side, got "
                f"{tuple(a.shape[-2:])}"
            )
        return self.lpips(a * 2 - 1, b * 2 - 1).reshape(a.shape[0]).float()


# ----------------------------------------------------------------------------------------------- SSIM / PSNR
# Written out rather than taken from torchmetrics: it is not a dependency of recon (not installed here), and
# these are 30 lines, checked against a scipy reference in tests/test_similarity.py.
PSNR_CAP_DB = 100.0  # PSNR of identical images (MSE 0) is reported as this, so means stay finite


def _pixel_pair(images_a: torch.Tensor, images_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if images_a.ndim != 4 or images_b.ndim != 4:
        raise ValueError(
            f"expected images [B, C, H, W], got {tuple(images_a.shape)} and {tuple(images_b.shape)}"
        )
    dtype = torch.promote_types(torch.promote_types(images_a.dtype, images_b.dtype), torch.float32)
    a, b = match_sizes(images_a.to(dtype), images_b.to(device=images_a.device, dtype=dtype))
    return broadcast_batch(a, b)


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype=torch.float32, device=None) -> torch.Tensor:
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(
    images_a: torch.Tensor,
    images_b: torch.Tensor,
    data_range: float = 1.0,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Mean SSIM per sample ``[B]`` (Wang et al. 2004): gaussian window, 'valid' positions only, channels averaged.

    Equals skimage's ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``
    (to 1e-16 in float64; torchmetrics' default lands ~1e-3 away from both). Inputs are float in
    [0, data_range]; sizes are matched first (``match_sizes``).
    """
    a, b = _pixel_pair(images_a, images_b)
    if min(a.shape[-2:]) < window_size:
        raise ValueError(
            f"SSIM needs images of at least {window_size} px per side, got {tuple(a.shape[-2:])}"
        )
    channels = a.shape[1]
    g = gaussian_window(window_size, sigma, a.dtype, a.device)
    gh = g.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
    gv = g.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)
    stacked = torch.cat([a, b, a * a, b * b, a * b])  # one separable blur for all five moments
    blurred = F.conv2d(F.conv2d(stacked, gh, groups=channels), gv, groups=channels)
    mu_a, mu_b, e_aa, e_bb, e_ab = blurred.chunk(5)
    var_a, var_b, cov = e_aa - mu_a * mu_a, e_bb - mu_b * mu_b, e_ab - mu_a * mu_b
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ssim_map.mean(dim=(1, 2, 3))


def psnr(
    images_a: torch.Tensor, images_b: torch.Tensor, data_range: float = 1.0, cap_db: float = PSNR_CAP_DB
) -> torch.Tensor:
    """PSNR in dB per sample ``[B]``: ``10 log10(data_range^2 / MSE)``, capped at ``cap_db`` (MSE 0 included)."""
    a, b = _pixel_pair(images_a, images_b)
    mse = (a - b).pow(2).mean(dim=(1, 2, 3))
    # clamping the MSE (not the dB) keeps the gradient finite at identical images
    min_mse = data_range**2 * 10 ** (-cap_db / 10)
    return 10 * torch.log10(data_range**2 / mse.clamp_min(min_mse))


class SsimSimilarity(Similarity):
    """SSIM, higher is more similar, at most 1 (identical). Images ``[B, 3, H, W]`` in [0, 1]; see :func:`ssim`."""

    name = "ssim_similarity"
    higher_is_better = True

    @classmethod
    def from_config(cls, cfg: MetricConfig, device: torch.device | str = "cpu", where: str = "metric"):
        _no_model(cfg, where)
        return cls(name=cfg.name)

    def forward(self, images_a: torch.Tensor, images_b: torch.Tensor) -> torch.Tensor:
        return ssim(images_a, images_b)


class PsnrSimilarity(Similarity):
    """PSNR in dB, higher is more similar; identical images score ``PSNR_CAP_DB`` (100). See :func:`psnr`."""

    name = "psnr_similarity"
    higher_is_better = True
    cap_db = PSNR_CAP_DB

    @classmethod
    def from_config(cls, cfg: MetricConfig, device: torch.device | str = "cpu", where: str = "metric"):
        _no_model(cfg, where)
        return cls(name=cfg.name)

    def forward(self, images_a: torch.Tensor, images_b: torch.Tensor) -> torch.Tensor:
        return psnr(images_a, images_b, cap_db=self.cap_db)
