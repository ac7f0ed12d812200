"""Similarity role: identity, direction, batching, sizes, gradients, and agreement with the bare libraries."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recon import hub
from recon.config import ConfigError, MetricConfig, SimilarityConfig
from recon.similarity import (
    IMAGE_METRICS,
    PSNR_CAP_DB,
    TEXT_METRICS,
    ClipImageSimilarity,
    LpipsDistance,
    load_image_metrics,
    load_similarity,
    load_text_metrics,
    psnr,
    ssim,
)
from recon.similarity.preprocess import ImagePreprocess

CPU = torch.device("cpu")


def images(seed: int, n: int = 3, h: int = 40, w: int = 48) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def image_metrics(tiny_models):
    cfg = SimilarityConfig(image=[
        MetricConfig(kind="clip", model=str(tiny_models / "clip")),
        MetricConfig(kind="clip_pooler", model=str(tiny_models / "clip_vision")),
        MetricConfig(kind="lpips", random_backbone=True),
        MetricConfig(kind="ssim"),
        MetricConfig(kind="psnr"),
    ])
    return load_image_metrics(cfg, CPU)


@pytest.fixture(scope="module")
def sbert():
    return load_similarity(MetricConfig(kind="sbert"), CPU)


def test_keys_names_and_direction(image_metrics):
    assert list(image_metrics) == ["clip_similarity", "clip_pooler_similarity", "lpips_distance",
                                   "ssim_similarity", "psnr_similarity"]
    for name, metric in image_metrics.items():
        assert metric.name == name
        assert metric.higher_is_better == name.endswith("_similarity")
        assert name.endswith(("_similarity", "_distance"))
    assert image_metrics["lpips_distance"].higher_is_better is False
    assert set(IMAGE_METRICS) == {"clip", "clip_pooler", "lpips", "ssim", "psnr", "dino"}
    assert set(TEXT_METRICS) == {"clip_text", "clip_text_pooler", "sbert"}


@pytest.mark.parametrize("key", ["clip_similarity", "clip_pooler_similarity", "lpips_distance", "ssim_similarity",
                                 "psnr_similarity"])
def test_identity_is_the_best_score(image_metrics, key):
    metric = image_metrics[key]
    x = images(0)
    with torch.no_grad():
        same, other = metric(x, x), metric(x, images(1))
    assert same.shape == (3,) and same.dtype == torch.float32
    best = {"clip_similarity": 1.0, "clip_pooler_similarity": 1.0, "lpips_distance": 0.0, "ssim_similarity": 1.0,
            "psnr_similarity": PSNR_CAP_DB}[key]
    torch.testing.assert_close(same, torch.full((3,), best), atol=1e-5, rtol=0)
    assert bool(((other < same) if metric.higher_is_better else (other > same)).all())


@pytest.mark.parametrize("key", ["clip_similarity", "clip_pooler_similarity", "lpips_distance", "ssim_similarity",
                                 "psnr_similarity"])
def test_batched_equals_per_sample_and_sizes_may_differ(image_metrics, key):
    metric = image_metrics[key]
    x, y = images(2), images(3, h=64, w=64)  # a non-square original against square reconstructions
    with torch.no_grad():
        batched = metric(x, y)
        looped = torch.cat([metric(x[i:i + 1], y[i:i + 1]) for i in range(3)])
        one_vs_many = metric(x[:1], y)  # a batch of 1 is broadcast
        expanded = metric(x[:1].expand(3, -1, -1, -1), y)
        swapped = metric(y, x)
    assert batched.shape == (3,)
    torch.testing.assert_close(batched, looped, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one_vs_many, expanded, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(swapped, batched, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("key", ["clip_similarity", "clip_pooler_similarity", "lpips_distance", "ssim_similarity",
                                 "psnr_similarity"])
def test_gradients_reach_the_input_images(image_metrics, key):
    x = images(4).requires_grad_(True)
    image_metrics[key](x, images(5, h=64, w=64)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in image_metrics[key].parameters())  # metric weights stay frozen


def test_metrics_stay_in_eval_mode(image_metrics):
    metric = image_metrics["lpips_distance"]
    metric.train()
    assert not metric.training and not any(m.training for m in metric.modules())


def test_clip_matches_bare_open_clip(tiny_models):
    import open_clip

    clip, preprocess_cfg, _ = hub.load_open_clip(str(tiny_models / "clip"), None, CPU)
    metric = ClipImageSimilarity(clip, preprocess_cfg)
    transform = open_clip.image_transform(preprocess_cfg["size"], is_train=False, mean=preprocess_cfg["mean"],
                                          std=preprocess_cfg["std"], resize_mode=preprocess_cfg["resize_mode"],
                                          interpolation=preprocess_cfg["interpolation"])
    x, y = images(6), images(7, h=64, w=64)
    with torch.no_grad():
        ex = clip.encode_image(torch.stack([transform(i) for i in x]), normalize=True)
        ey = clip.encode_image(torch.stack([transform(i) for i in y]), normalize=True)
        expected = (ex * ey).sum(-1)
        torch.testing.assert_close(metric(x, y), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(metric.encode(x), ex, atol=1e-5, rtol=1e-5)
        ref = metric.encode(x[:1])  # embed the original once, compare with many reconstructions
        torch.testing.assert_close(metric.similarity_to(ref, y), (ex[:1] * ey).sum(-1), atol=1e-5, rtol=1e-5)


def test_clip_pooler_matches_hf_processor_and_model(tiny_models, image_metrics):
    model, processor = hub.load_hf_clip_vision(str(tiny_models / "clip_vision"), CPU)
    x, y = images(8, h=45, w=37), images(9, h=64, w=64)

    def embed(batch):
        pixels = processor(images=list(batch), do_rescale=False, return_tensors="pt")["pixel_values"]
        return torch.nn.functional.normalize(model(pixel_values=pixels).pooler_output, dim=-1)

    with torch.no_grad():
        expected = (embed(x) * embed(y)).sum(-1)
        torch.testing.assert_close(image_metrics["clip_pooler_similarity"](x, y), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("resize_mode", ["shortest", "squash"])
@pytest.mark.parametrize("hw", [(32, 32), (45, 37), (37, 64), (20, 28), (100, 33)])
def test_preprocess_matches_open_clip_transform(resize_mode, hw):
    import open_clip

    cfg = {"size": (32, 32), "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.3, 0.25], "interpolation": "bicubic",
           "resize_mode": resize_mode}
    transform = open_clip.image_transform(32, is_train=False, mean=cfg["mean"], std=cfg["std"],
                                          resize_mode=resize_mode, interpolation="bicubic")
    x = images(10, n=2, h=hw[0], w=hw[1])
    ours = ImagePreprocess.from_open_clip(cfg)(x)
    torch.testing.assert_close(ours, torch.stack([transform(i) for i in x]), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- SSIM / PSNR
def _ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al. with scipy's gaussian filter (sigma 1.5, radius 5 = an 11 window), valid region only."""
    from scipy.ndimage import gaussian_filter

    def blur(z):
        return gaussian_filter(z, sigma=1.5, truncate=3.5)[5:-5, 5:-5]

    c1, c2 = 0.01**2, 0.03**2
    scores = []
    for ch_a, ch_b in zip(a, b):
        mu_a, mu_b = blur(ch_a), blur(ch_b)
        var_a, var_b = blur(ch_a * ch_a) - mu_a**2, blur(ch_b * ch_b) - mu_b**2
        cov = blur(ch_a * ch_b) - mu_a * mu_b
        s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
        scores.append(s.mean())
    return float(np.mean(scores))


def test_ssim_and_psnr_match_a_numpy_reference():
    x = images(11, n=2, h=24, w=30).double()
    noisy = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(12), dtype=x.dtype)).clamp(0, 1)
    expected_ssim = [_ssim_reference(a.numpy(), b.numpy()) for a, b in zip(x, noisy)]
    torch.testing.assert_close(ssim(x, noisy), torch.tensor(expected_ssim, dtype=x.dtype), atol=1e-10, rtol=0)
    mse = ((x - noisy) ** 2).mean(dim=(1, 2, 3)).numpy()
    torch.testing.assert_close(psnr(x, noisy), torch.tensor(10 * np.log10(1 / mse)), atol=1e-10, rtol=0)


def test_noisier_images_score_lower(image_metrics):
    x = images(13, n=2, h=48, w=48)
    gen = torch.Generator().manual_seed(14)
    noise = torch.randn(x.shape, generator=gen)
    slightly, badly = (x * 0.5 + 0.25 + 0.02 * noise).clamp(0, 1), (x * 0.5 + 0.25 + 0.2 * noise).clamp(0, 1)
    base = x * 0.5 + 0.25
    for key in ("ssim_similarity", "psnr_similarity"):
        assert bool((image_metrics[key](base, slightly) > image_metrics[key](base, badly)).all())


def test_psnr_cap_keeps_gradient_finite():
    x = images(15).requires_grad_(True)
    psnr(x, x.detach()).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_ssim_rejects_images_smaller_than_the_window():
    with pytest.raises(ValueError, match="at least 11 px"):
        ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))


# ----------------------------------------------------------------------------------------------- LPIPS
def test_lpips_without_backbone_weights_names_the_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    with pytest.raises(hub.ModelNotAvailableError) as err:
        load_similarity(MetricConfig(kind="lpips"), CPU)
    assert str(tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth") in str(err.value)


def test_lpips_random_backbone_is_deterministic(image_metrics):
    again = load_similarity(MetricConfig(kind="lpips", random_backbone=True), CPU)
    x, y = images(16, h=32, w=32), images(17, h=32, w=32)
    with torch.no_grad():
        torch.testing.assert_close(again(x, y), image_metrics["lpips_distance"](x, y))


def test_lpips_rejects_images_too_small_for_the_backbone(image_metrics):
    assert isinstance(image_metrics["lpips_distance"], LpipsDistance)
    with pytest.raises(ValueError, match="at least 31 px"):
        image_metrics["lpips_distance"](torch.rand(1, 3, 24, 24), torch.rand(1, 3, 24, 24))


# ----------------------------------------------------------------------------------------------- text
def test_sbert_real_minilm_offline(sbert):
    assert sbert.name == "sbert_similarity" and sbert.higher_is_better
    with torch.no_grad():
        s = sbert(["a red circle", "a red circle", "a red circle"],
                  ["a red circle", "a crimson round shape", "stock market report"])
    assert s.shape == (3,)
    assert abs(float(s[0]) - 1.0) < 1e-5
    assert float(s[1]) > float(s[2])


def test_clip_text_on_tiny_clip_is_symmetric(tiny_models):
    cfg = SimilarityConfig(text=[MetricConfig(kind="clip_text", model=str(tiny_models / "clip"))])
    metrics = load_text_metrics(cfg, CPU)
    metric = metrics["clip_text_similarity"]
    a = ["a red circle", "two blue squares", "word " * 200]  # the last is past the context: truncated
    b = ["a green triangle", "a red circle", "one yellow star"]
    with torch.no_grad():
        ab, ba, aa = metric(a, b), metric(b, a), metric(a, a)
        one_vs_many = metric(a[:1], b)
    assert ab.shape == (3,)
    torch.testing.assert_close(ab, ba)
    torch.testing.assert_close(aa, torch.ones(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(one_vs_many, metric([a[0]] * 3, b), atol=1e-6, rtol=0)
    with pytest.raises(TypeError):
        metric("a red circle", "a blue circle")


# ----------------------------------------------------------------------------------------------- configs
def test_unknown_kind_names_the_field_and_the_valid_kinds():
    cfg = SimilarityConfig(image=[MetricConfig(kind="ssim"), MetricConfig(kind="bogus")])
    with pytest.raises(ConfigError,
                       match=r"similarity\.image\.1\.kind.*'bogus'.*clip, clip_pooler, lpips, ssim, psnr, dino"):
        load_image_metrics(cfg, CPU)
    with pytest.raises(ConfigError, match=r"similarity\.image\.0\.kind.*text similarity"):
        load_image_metrics(SimilarityConfig(image=[MetricConfig(kind="sbert")]), CPU)
    with pytest.raises(ConfigError, match=r"similarity\.text\.0\.kind.*'psnr' is an image similarity.*clip_text, clip_text_pooler, sbert"):
        load_text_metrics(SimilarityConfig(text=[MetricConfig(kind="psnr")]), CPU)


def test_name_overrides_the_result_key_and_duplicates_are_refused():
    cfg = SimilarityConfig(image=[MetricConfig(kind="ssim"), MetricConfig(kind="ssim", name="ssim_again")])
    metrics = load_image_metrics(cfg, CPU)
    assert list(metrics) == ["ssim_similarity", "ssim_again"] and metrics["ssim_again"].name == "ssim_again"
    with pytest.raises(ConfigError, match=r"similarity\.image\.1\.name.*similarity\.image\.0"):
        load_image_metrics(SimilarityConfig(image=[MetricConfig(kind="psnr"), MetricConfig(kind="psnr")]), CPU)


def test_config_errors_before_loading_anything():
    with pytest.raises(ConfigError, match=r"similarity\.image\.0\.pretrained.*random weights"):
        load_image_metrics(SimilarityConfig(image=[MetricConfig(kind="clip", model="ViT-B-32")]), CPU)
    with pytest.raises(ConfigError, match=r"similarity\.image\.0\.model.*ssim"):
        load_image_metrics(SimilarityConfig(image=[MetricConfig(kind="ssim", model="x")]), CPU)
    with pytest.raises(hub.ModelNotAvailableError, match="does not exist"):
        load_similarity(MetricConfig(kind="clip", model="/nonexistent/clip"), CPU)


@pytest.fixture(scope="module")
def tiny_dino(tmp_path_factory):
    """A DINO ViT and a DINOv2 of random weights, saved as transformers saves the real ones."""
    from transformers import (
        BitImageProcessor,
        Dinov2Config,
        Dinov2Model,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    root = tmp_path_factory.mktemp("dino")
    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, patch_size=8)
    ViTModel(ViTConfig(image_size=32, **small), add_pooling_layer=False).save_pretrained(root / "dino")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "dino")
    Dinov2Model(Dinov2Config(image_size=32, **small)).save_pretrained(root / "dinov2")
    BitImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}, do_convert_rgb=True,
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(root / "dinov2")
    return root


@pytest.mark.parametrize("variant", ["dino", "dinov2"])
def test_dino_is_the_cls_token_cosine_of_the_hf_model(tiny_dino, variant):
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel

    metric = load_similarity(MetricConfig(kind="dino", model=str(tiny_dino / variant)), CPU, role="image")
    assert metric.name == "dino_similarity" and metric.higher_is_better
    x, y = images(1, 2), images(2, 2)
    assert torch.allclose(metric(x, x), torch.ones(2), atol=1e-5)
    model, processor = AutoModel.from_pretrained(tiny_dino / variant).eval(), \
        AutoImageProcessor.from_pretrained(tiny_dino / variant)

    def cls(batch):  # PIL path: uint8 images through the model's own processor
        pil = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for im in batch]
        with torch.no_grad():
            out = model(**processor(images=pil, return_tensors="pt")).last_hidden_state[:, 0]
        return torch.nn.functional.normalize(out, dim=-1)

    expected = (cls(x) * cls(y)).sum(-1)
    torch.testing.assert_close(metric(x, y), expected, atol=0.03, rtol=0)  # torch vs PIL resampling only


def test_dino_offline_names_the_id_and_a_wrong_model_type(tiny_models, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.hub_reachable.cache_clear()
    with pytest.raises(hub.ModelNotAvailableError, match="facebook/dino-vitb16.*similarity.image.0.model"):
        load_image_metrics(SimilarityConfig(image=[MetricConfig(kind="dino")]), CPU)
    with pytest.raises(ValueError, match="clip_vision_model.*dino metric takes a DINO ViT"):
        load_image_metrics(SimilarityConfig(image=[MetricConfig(kind="dino", model=str(tiny_models / "clip_vision"))]),
                           CPU)


def test_clip_text_pooler_is_the_pooler_cosine_of_hf_clip_text(tiny_models):
    from transformers import CLIPTextModel, CLIPTokenizer

    root = tiny_models / "generator"  # a diffusers layout: its text_encoder and tokenizer
    metric = load_similarity(MetricConfig(kind="clip_text_pooler", model=str(root)), CPU, role="text")
    a, b = ["a red circle", "two blue squares on the left"], ["a red circle", "a green star"]
    model = CLIPTextModel.from_pretrained(root, subfolder="text_encoder").eval()
    tok = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer")

    def pooled(texts):
        with torch.no_grad():
            out = model(**tok(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")).pooler_output
        return torch.nn.functional.normalize(out, dim=-1)

    got = metric(a, b)
    torch.testing.assert_close(got, (pooled(a) * pooled(b)).sum(-1), atol=1e-5, rtol=1e-5)
    assert float(got[0]) == pytest.approx(1.0, abs=1e-5) and metric.name == "clip_text_pooler_similarity"
