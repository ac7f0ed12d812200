"""Similarity role: identity, direction, batching, sizes, gradients, and agreement with the bare libraries."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recon import hub
from recon.config import ConfigError, MetricConfig, SimilarityConfig
from recon.preprocess import ImagePreprocess
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

CPU = torch.device("cpu")


def images(seed: int, n: int = 3, h: int = 40, w: int = 48) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def image_metrics(tiny_models):
    cfg = SimilarityConfig(
        image=[
            MetricConfig(kind="clip", model=str(tiny_models / "clip")),
            MetricConfig(kind="clip_pooler", model=str(tiny_models / "clip_vision")),
            MetricConfig(kind="lpips", random_backbone=True),
            MetricConfig(kind="ssim"),
            MetricConfig(kind="psnr"),
        ]
    )
    return load_image_metrics(cfg, CPU)


@pytest.fixture(scope="module")
def sbert():
    return load_similarity(MetricConfig(kind="sbert"), CPU)


def test_keys_names_and_direction(image_metrics):
    assert list(image_metrics) == [
        "clip_similarity",
        "clip_pooler_similarity",
        "lpips_distance",
        "ssim_similarity",
        "psnr_similarity",
    ]
    for name, metric in image_metrics.items():
        assert metric.name == name
        assert metric.higher_is_better == name.endswith("_similarity")
        assert name.endswith(("_similarity", "_distance"))
    assert image_metrics["lpips_distance"].higher_is_better is False
    assert set(IMAGE_METRICS) == {"clip", "clip_pooler", "lpips", "ssim", "psnr", "dino", "dreamsim"}
    assert set(TEXT_METRICS) == {"clip_text", "clip_text_pooler", "sbert"}


@pytest.mark.parametrize(
    "key",
    ["clip_similarity", "clip_pooler_similarity", "lpips_distance", "ssim_similarity", "psnr_similarity"],
)
def test_identity_is_the_best_score(image_metrics, key):
    metric = image_metrics[key]
    x = images(0)
    with torch.no_grad():
        same, other = metric(x, x), metric(x, images(1))
    assert same.shape == (3,) and same.dtype == torch.float32
    best = {
        "clip_similarity": 1.0,
        "clip_pooler_similarity": 1.0,
        "lpips_distance": 0.0,
        "ssim_similarity": 1.0,
        "psnr_similarity": PSNR_CAP_DB,
    }[key]
    torch.testing.assert_close(same, torch.full((3,), best), atol=1e-5, rtol=0)
    assert bool(((other < same) if metric.higher_is_better else (other > same)).all())


@pytest.mark.parametrize(
    "key",
    ["clip_similarity", "clip_pooler_similarity", "lpips_distance", "ssim_similarity", "psnr_similarity"],
)
def test_batched_equals_per_sample_and_sizes_may_differ(image_metrics, key):
    metric = image_metrics[key]
    x, y = images(2), images(3, h=64, w=64)  # a non-square original against square reconstructions
    with torch.no_grad():
        batched = metric(x, y)
        looped = torch.cat([metric(x[i : i + 1], y[i : i + 1]) for i in range(3)])
        one_vs_many = metric(x[:1], y)  # a batch of 1 is broadcast
        expanded = metric(x[:1].expand(3, -1, -1, -1), y)
        swapped = metric(y, x)
    assert batched.shape == (3,)
    torch.testing.assert_close(batched, looped, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one_vs_many, expanded, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(swapped, batched, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "key",
    ["clip_similarity", "clip_pooler_similarity", "lpips_distance", "ssim_similarity", "psnr_similarity"],
)
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
    transform = open_clip.image_transform(
        preprocess_cfg["size"],
        is_train=False,
        mean=preprocess_cfg["mean"],
        std=preprocess_cfg["std"],
        resize_mode=preprocess_cfg["resize_mode"],
        interpolation=preprocess_cfg["interpolation"],
    )
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
        torch.testing.assert_close(
            image_metrics["clip_pooler_similarity"](x, y), expected, atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("resize_mode", ["shortest", "squash"])
@pytest.mark.parametrize("hw", [(32, 32), (45, 37), (37, 64), (20, 28), (100, 33)])
def test_preprocess_matches_open_clip_transform(resize_mode, hw):
    import open_clip

    cfg = {
        "size": (32, 32),
        "mean": [0.4, 0.5, 0.6],
        "std": [0.2, 0.3, 0.25],
        "interpolation": "bicubic",
        "resize_mode": resize_mode,
    }
    transform = open_clip.image_transform(
        32, is_train=False, mean=cfg["mean"], std=cfg["std"], resize_mode=resize_mode, interpolation="bicubic"
    )
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
    noisy = (
        x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(12), dtype=x.dtype)
    ).clamp(0, 1)
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
        s = sbert(
            ["a red circle", "a red circle", "a red circle"],
            ["a red circle", "a crimson round shape", "stock market report"],
        )
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
    with pytest.raises(
        ConfigError, match=r"similarity\.image\.1\.kind.*'bogus'.*clip, clip_pooler, lpips, ssim, psnr, dino"
    ):
        load_image_metrics(cfg, CPU)
    with pytest.raises(ConfigError, match=r"similarity\.image\.0\.kind.*text similarity"):
        load_image_metrics(SimilarityConfig(image=[MetricConfig(kind="sbert")]), CPU)
    with pytest.raises(
        ConfigError,
        match=r"similarity\.text\.0\.kind.*'psnr' is an image similarity.*clip_text, clip_text_pooler, sbert",
    ):
        load_text_metrics(SimilarityConfig(text=[MetricConfig(kind="psnr")]), CPU)


def test_name_overrides_the_result_key_and_duplicates_are_refused():
    cfg = SimilarityConfig(image=[MetricConfig(kind="ssim"), MetricConfig(kind="ssim", name="ssim_again")])
    metrics = load_image_metrics(cfg, CPU)
    assert list(metrics) == ["ssim_similarity", "ssim_again"] and metrics["ssim_again"].name == "ssim_again"
    with pytest.raises(ConfigError, match=r"similarity\.image\.1\.name.*similarity\.image\.0"):
        load_image_metrics(
            SimilarityConfig(image=[MetricConfig(kind="psnr"), MetricConfig(kind="psnr")]), CPU
        )


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
    small = dict(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, patch_size=8
    )
    ViTModel(ViTConfig(image_size=32, **small), add_pooling_layer=False).save_pretrained(root / "dino")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "dino")
    Dinov2Model(Dinov2Config(image_size=32, **small)).save_pretrained(root / "dinov2")
    BitImageProcessor(
        size={"shortest_edge": 36},
        crop_size={"height": 32, "width": 32},
        do_convert_rgb=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(root / "dinov2")
    return root


@pytest.mark.parametrize("variant", ["dino", "dinov2"])
def test_dino_is_the_cls_token_cosine_of_the_hf_model(tiny_dino, variant):
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel

    metric = load_similarity(MetricConfig(kind="dino", model=str(tiny_dino / variant)), CPU, role="image")
    assert metric.name == "dino_similarity" and metric.higher_is_better
    x, y = images(1, 2), images(2, 2)
    assert torch.allclose(metric(x, x), torch.ones(2), atol=1e-5)
    model, processor = (
        AutoModel.from_pretrained(tiny_dino / variant).eval(),
        AutoImageProcessor.from_pretrained(tiny_dino / variant),
    )

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
        load_image_metrics(
            SimilarityConfig(image=[MetricConfig(kind="dino", model=str(tiny_models / "clip_vision"))]), CPU
        )


def test_clip_text_pooler_is_the_pooler_cosine_of_hf_clip_text(tiny_models):
    from transformers import CLIPTextModel, CLIPTokenizer

    root = tiny_models / "generator"  # a diffusers layout: its text_encoder and tokenizer
    metric = load_similarity(MetricConfig(kind="clip_text_pooler", model=str(root)), CPU, role="text")
    a, b = ["a red circle", "two blue squares on the left"], ["a red circle", "a green star"]
    model = CLIPTextModel.from_pretrained(root, subfolder="text_encoder").eval()
    tok = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer")

    def pooled(texts):
        with torch.no_grad():
            out = model(
                **tok(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
            ).pooler_output
        return torch.nn.functional.normalize(out, dim=-1)

    got = metric(a, b)
    torch.testing.assert_close(got, (pooled(a) * pooled(b)).sum(-1), atol=1e-5, rtol=1e-5)
    assert float(got[0]) == pytest.approx(1.0, abs=1e-5) and metric.name == "clip_text_pooler_similarity"


# ------------------------------------------------------------------------------------------- long texts
LONG_TEXT = " ".join(["a small red circle above a large blue square on the left"] * 20)  # ~220 tokens


@pytest.mark.parametrize("kind", ["clip_text", "clip_text_pooler", "sbert"])
def test_long_text_policy_truncate_records_and_chunk_mean_uses_the_whole_text(tiny_models, kind):
    model = {
        "clip_text": str(tiny_models / "clip"),
        "clip_text_pooler": str(tiny_models / "generator"),
        "sbert": None,
    }[kind]
    truncate = load_similarity(MetricConfig(kind=kind, model=model), CPU, role="text")
    chunked = load_similarity(MetricConfig(kind=kind, model=model, long_text="chunk_mean"), CPU, role="text")
    assert truncate.long_text == "truncate" and chunked.long_text == "chunk_mean"
    long = LONG_TEXT if kind != "sbert" else " ".join([LONG_TEXT] * 2)  # past MiniLM's 256 word pieces too
    tail = long + " and a green star"  # differs only after the context
    short = ["a red circle", "two blue squares"]
    assert truncate.count_tokens(long) > truncate.context_tokens
    assert truncate.truncated([*short, long]) == [False, False, True]
    assert chunked.truncated([*short, long]) == [False, False, False]
    with torch.no_grad():
        # texts that fit: both policies are the encoder's own path, bit for bit
        assert torch.equal(truncate.encode(short), chunked.encode(short))
        # truncation cannot see past the context; chunk_mean can
        assert float(truncate([long], [tail])) == pytest.approx(1.0, abs=1e-6)
        assert float(chunked([long], [tail])) < 1.0 - 1e-6
        # chunk_mean = normalised mean of the pieces' unit embeddings
        from recon.similarity.text import split_to_fit

        pieces = split_to_fit(long, truncate.count_tokens, truncate.context_tokens)
        assert len(pieces) >= 2 and " ".join(pieces) == " ".join(long.split())
        assert all(truncate.count_tokens(p) <= truncate.context_tokens for p in pieces)
        expected = torch.nn.functional.normalize(truncate.encode(pieces).mean(0, keepdim=True), dim=-1)
        torch.testing.assert_close(chunked.encode([long]), expected, atol=1e-6, rtol=0)


def test_split_to_fit_packs_words_greedily():
    from recon.similarity.text import split_to_fit

    count = lambda text: len(text.split()) + 2  # noqa: E731 - one token per word, BOS and EOS
    assert split_to_fit("a b c", count, 5) == ["a b c"]
    assert split_to_fit("a b c d e f g", count, 5) == ["a b c", "d e f", "g"]
    assert split_to_fit("", count, 5) == [""]


def test_long_text_policy_is_validated():
    from recon.config import load_config

    with pytest.raises(ConfigError, match="similarity.text.0.long_text='mean'"):
        load_config(None, ["similarity.text.0={kind: sbert, long_text: mean}"])


def test_clipscore_records_truncation_and_follows_the_clip_metric_policy(tiny_models):
    from recon.config import Config
    from recon.scoring import caption_metrics as cm

    def scorer(policy):
        cfg = Config()
        cfg.similarity = SimilarityConfig(
            image=[MetricConfig(kind="clip", model=str(tiny_models / "clip"), long_text=policy)]
        )
        return cm.ClipScore.from_config(cfg, "cpu")

    image = [torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))] * 2
    caps = [LONG_TEXT, LONG_TEXT + " and a green star"]
    t, c = (
        scorer("truncate").scores(image, caps, [["a red circle"]] * 2),
        scorer("chunk_mean").scores(image, caps),
    )
    assert t["truncated"] == [True, True] and c["truncated"] == [False, False]
    assert t["clipscore"][0] == pytest.approx(t["clipscore"][1], abs=1e-6)  # the tails are cut off
    assert c["clipscore"][0] != pytest.approx(c["clipscore"][1], abs=1e-6)
    assert scorer("truncate").scores(image[:1], ["a red circle"])["truncated"] == [False]


# ------------------------------------------------------------------------------------------- DreamSim
class _EmbedStandIn(torch.nn.Module):
    """The surface recon uses of dreamsim's PerceptualModel: ``embed([B, 3, 224, 224] in [0, 1]) -> [B, D]``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 8, stride=8)
        self.fc = torch.nn.Linear(8 * 28 * 28, 16)

    def embed(self, x):
        assert x.shape[-2:] == (224, 224) and 0 <= float(x.detach().min()) and float(x.detach().max()) <= 1
        e = self.fc(torch.relu(self.conv(x)).flatten(1))
        return torch.nn.functional.normalize(e - e.mean(1, keepdim=True), dim=-1)


def _check_dreamsim_contract(metric):
    from recon.config import IMAGE_METRIC_NAMES

    assert (
        metric.name == "dreamsim_distance" == IMAGE_METRIC_NAMES["dreamsim"]
        and metric.higher_is_better is False
    )
    x, y = images(10), images(11, h=64, w=64)
    with torch.no_grad():
        same, other = metric(x, x), metric(x, y)
        one_vs_many = metric(x[:1], y)
        per_sample = torch.cat([metric(x[i : i + 1], y[i : i + 1]) for i in range(3)])
        reused = metric.distance_to(metric.encode(x[:1]), y)
    assert same.shape == (3,) and same.dtype == torch.float32
    torch.testing.assert_close(same, torch.zeros(3), atol=1e-5, rtol=0)
    assert bool((other > same).all()) and bool((other <= 2).all())
    torch.testing.assert_close(per_sample, other, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reused, one_vs_many, atol=1e-6, rtol=0)
    recon = y.clone().requires_grad_(True)
    metric(x, recon).sum().backward()  # a loss: gradients reach the pixels, the weights stay frozen
    assert recon.grad is not None and recon.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in metric.parameters())
    metric.train()
    assert not metric.training


def test_dreamsim_distance_contract_around_a_stand_in_embedder():
    from recon.similarity import DreamSimDistance

    _check_dreamsim_contract(DreamSimDistance(_EmbedStandIn().requires_grad_(False)))


@pytest.fixture(scope="module")
def tiny_dreamsim(tmp_path_factory):
    """A dreamsim weights dir for the ``dino_vitb16`` variant holding a LoRA adapter saved from a tiny ViT (12 blocks
    of width 24: the package reads block 11), built by the package's own classes. Yields (dir, patch): while
    ``patch`` is active the package builds that tiny ViT instead of loading DINO through torch.hub."""
    pytest.importorskip("dreamsim", reason="the dreamsim extra is not installed")
    from dreamsim.feature_extraction.extractor import ViTExtractor
    from dreamsim.feature_extraction.vision_transformer import VisionTransformer
    from dreamsim.model import PerceptualModel
    from peft import LoraConfig, get_peft_model

    def tiny_vit(model_type, load_dir):
        assert model_type == "dino_vitb16"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return VisionTransformer(
                patch_size=16, embed_dim=24, depth=12, num_heads=2, mlp_ratio=2, qkv_bias=True
            )

    root = tmp_path_factory.mktemp("dreamsim")
    patch = pytest.MonkeyPatch()
    patch.setattr(ViTExtractor, "create_model", staticmethod(tiny_vit))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        base = PerceptualModel(
            model_type="dino_vitb16", feat_type="cls", stride="16", lora=True, device="cpu"
        )
        peft_model = get_peft_model(
            base,
            LoraConfig(
                r=2,
                lora_alpha=4,
                lora_dropout=0.0,
                bias="none",
                target_modules=["qkv"],
                init_lora_weights=False,
            ),
        )
        peft_model.save_pretrained(str(root / "dino_vitb16_single_lora"))
    patch.undo()
    for placeholder in hub.DREAMSIM_FILES[
        "dino_vitb16"
    ]:  # read only by the DINO loader the stand-in replaces
        if not (root / placeholder).exists():
            (root / placeholder).parent.mkdir(parents=True, exist_ok=True)
            (root / placeholder).write_bytes(b"")
    patch.setattr(ViTExtractor, "create_model", staticmethod(tiny_vit))
    yield root, patch
    patch.undo()


def test_dreamsim_stand_in_through_the_dreamsim_package(tiny_dreamsim, monkeypatch):
    root, _ = tiny_dreamsim
    hub_dir = getattr(torch.hub, "_hub_dir", None)
    cfg = MetricConfig(kind="dreamsim", model=str(root), pretrained="dino_vitb16")
    metric = load_similarity(cfg, CPU, where="similarity.image.0", role="image")
    assert getattr(torch.hub, "_hub_dir", None) == hub_dir  # dreamsim's torch.hub.set_dir is undone
    assert type(metric.model).__name__ == "PeftModel"  # the adapter on disk was loaded by the package
    _check_dreamsim_contract(metric)
    # the package's own distance (PerceptualModel.forward) on the 224 px images recon feeds it
    x, y = images(12, n=2, h=224, w=224), images(13, n=2, h=224, w=224)
    with torch.no_grad():
        torch.testing.assert_close(metric(x, y), metric.model(x, y).float(), atol=1e-5, rtol=1e-5)


def test_dreamsim_is_a_distance_term_of_the_finetune_loss(tiny_dreamsim):
    from recon.train.config import FinetuneConfig
    from recon.train.joint import image_sim_metrics

    root, _ = tiny_dreamsim
    cfg = FinetuneConfig()
    cfg.loss.image_sim, cfg.loss.image_sim_terms.clip, cfg.loss.image_sim_terms.lpips = 1.0, 0.0, 1.0
    cfg.loss.image_sim_terms.lpips_metric = MetricConfig(
        kind="dreamsim", model=str(root), pretrained="dino_vitb16"
    )
    metrics = image_sim_metrics(cfg, CPU)
    assert metrics["lpips"].name == "dreamsim_distance"


def test_dreamsim_without_weights_fails_before_work_naming_what_to_supply(tmp_path, monkeypatch):
    import importlib.util

    from recon.config import load_config
    from recon.pipeline import Reconstructor

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "dreamsim" else real_find_spec(name, *a)
    )
    with pytest.raises(hub.ModelNotAvailableError, match=r"pip install 'recon\[dreamsim\]'"):
        hub.check_dreamsim(str(tmp_path), None, "similarity.image.0.model")
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "dreamsim" else real_find_spec(name, *a),
    )
    (tmp_path / "ensemble_lora").mkdir()
    with pytest.raises(hub.ModelNotAvailableError) as err:
        hub.check_dreamsim(str(tmp_path), None, "similarity.image.1.model")
    msg = str(err.value)
    assert (
        f"DreamSim 'ensemble' weights are not in {tmp_path}" in msg
        and "ensemble_lora/adapter_config.json" in msg
    )
    assert "--set similarity.image.1.model=" in msg and "dreamsim_type='ensemble'" in msg
    with pytest.raises(ConfigError, match=r"similarity.image.0.pretrained='vit'.*ensemble, dino_vitb16"):
        hub.check_dreamsim(str(tmp_path), "vit", "similarity.image.0.model")
    # the Reconstructor's preflight, before any model loads or image is generated
    monkeypatch.setenv("RECON_CACHE", str(tmp_path / "empty-cache"))
    config = load_config(None, ["similarity.image.1={kind: dreamsim}"])
    with pytest.raises(hub.ModelNotAvailableError, match=r"empty-cache/dreamsim \(missing"):
        Reconstructor(config).preflight(("image",))


def _dreamsim_weights_missing() -> str | None:
    import os

    try:
        hub.check_dreamsim(os.environ.get("RECON_DREAMSIM_DIR"), os.environ.get("RECON_DREAMSIM_VARIANT"))
    except (hub.ModelNotAvailableError, ConfigError) as e:
        return f"real DreamSim weights absent (set RECON_DREAMSIM_DIR): {str(e)[:160]}"
    return None


@pytest.mark.skipif(_dreamsim_weights_missing() is not None, reason=str(_dreamsim_weights_missing()))
def test_dreamsim_real_weights_rank_a_perturbed_image_closer_than_another_image():
    import os

    cfg = MetricConfig(
        kind="dreamsim",
        model=os.environ.get("RECON_DREAMSIM_DIR"),
        pretrained=os.environ.get("RECON_DREAMSIM_VARIANT"),
    )
    metric = load_similarity(cfg, CPU, role="image")
    x = images(20, n=1, h=224, w=224)
    smooth = torch.nn.functional.avg_pool2d(x, 5, stride=1, padding=2)  # a blurred copy of the same image
    with torch.no_grad():
        near, far, same = metric(x, smooth), metric(x, images(21, n=1, h=224, w=224)), metric(x, x)
    assert float(same) == pytest.approx(0.0, abs=1e-5) and float(near) < float(far)
    model, _ = __import__("dreamsim").dreamsim(
        pretrained=True,
        device="cpu",
        cache_dir=str(hub.check_dreamsim(cfg.model, cfg.pretrained)[0]),
        dreamsim_type=cfg.pretrained or "ensemble",
    )
    with torch.no_grad():
        torch.testing.assert_close(metric(x, smooth), model(x, smooth).float(), atol=1e-5, rtol=1e-4)


def test_a_150_token_caption_is_reconstructed_and_scored_and_truncation_shows_in_the_leaderboard(
    tmp_path, tiny_models
):
    import json

    from PIL import Image

    from recon.config import load_config
    from recon.scoring.run import score_caption_sets

    (tmp_path / "imgs").mkdir()
    for i in range(2):
        Image.fromarray((np.random.default_rng(i).random((32, 32, 3)) * 255).astype(np.uint8)).save(
            tmp_path / "imgs" / f"im{i}.png"
        )
    long = " ".join(["red circle above blue square"] * 30)  # 150 words: past 77 CLIP tokens
    (tmp_path / "detailed.json").write_text(json.dumps({"im0": long, "im1": "a red circle"}))
    (tmp_path / "short.json").write_text(json.dumps({"im0": "a circle", "im1": "a square"}))
    (tmp_path / "refs.json").write_text(json.dumps({"im0": ["a red circle"], "im1": ["a blue square"]}))

    from recon.generators import DiffusionGenerator
    from recon.pipeline import Reconstructor

    shared = {}  # one pipeline and CLIP for both runs: only the policies differ

    def run(name, *over):
        config = load_config(
            "tiny-random",
            [
                "run.cache_dir=''",
                "generator.num_inference_steps=2",
                "generator.images_per_caption=1",
                "generator.height=32",
                "generator.width=32",
                *over,
            ],
        )
        recon = Reconstructor(config, **shared)
        if not shared:
            shared.update(image_metrics=recon.image_metrics, generator=recon.generator)
        else:
            recon._generator = DiffusionGenerator(
                shared["generator"].pipe, config.generator, batch_size=config.run.batch_size
            )
        return score_caption_sets(
            config,
            [tmp_path / "detailed.json", tmp_path / "short.json"],
            tmp_path / "imgs",
            tmp_path / name,
            refs=tmp_path / "refs.json",
            metrics="recon,clipscore,sbert",
            progress=False,
            n_resamples=50,
            reconstructor=recon,
        )

    default = run("truncate")
    rec = {r["id"]: r for r in default.records}
    assert rec["detailed/im0"]["truncated"] == ["clipscore"]  # SBERT's 256 word pieces hold 150 words
    assert any(w.startswith("caption truncated from") for w in rec["detailed/im0"]["warnings"])
    assert "truncated" not in rec["detailed/im1"] and "truncated" not in rec["short/im0"]
    board = (default.path / "leaderboard.md").read_text()
    row = next(line for line in board.splitlines() if line.startswith("| n truncated"))
    assert "| 1 (clipscore 1, generator 1) |" in row and row.endswith("| 0 |")
    assert "n truncated" in (default.path / "report.html").read_text()

    chunked = run("chunked", "generator.long_prompts=chunk", "similarity.image.0.long_text=chunk_mean")
    rec = {r["id"]: r for r in chunked.records}
    assert "truncated" not in rec["detailed/im0"]
    assert any("generator.long_prompts=chunk" in w for w in rec["detailed/im0"]["warnings"])
    assert "| 0 | 0 |" in (chunked.path / "leaderboard.md").read_text()
    assert {r["id"]: r["scores"] for r in chunked.records}["short/im0"] == {
        r["id"]: r["scores"] for r in default.records
    }["short/im0"]  # captions that fit score the same


def test_text_direction_records_which_text_metrics_truncated_the_text(tiny_models):
    from recon.config import load_config
    from recon.pipeline import Reconstructor

    over = [
        "run.cache_dir=''",
        "generator.num_inference_steps=1",
        "generator.images_per_caption=1",
        "generator.height=32",
        "generator.width=32",
    ]
    recon = Reconstructor(load_config("tiny-random", over))
    long, short = recon.text_to_image_to_text([LONG_TEXT, "a red circle"], ["long", "short"])
    assert long["truncated"] == ["clip_text_similarity"] and "truncated" not in short
    assert any(w.startswith("caption truncated from") for w in long["warnings"])
    chunked = Reconstructor(
        load_config("tiny-random", [*over, "similarity.text.0.long_text=chunk_mean"]),
        generator=recon.generator,
    )
    assert "truncated" not in chunked.text_to_image_to_text([LONG_TEXT], ["long"])[0]
