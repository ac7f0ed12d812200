import io

import torch
from PIL import Image

from recon.config import GeneratorConfig
from recon.generators import DiffusionGenerator, load_generator
from recon.pipeline import png_bytes


def _gen(tiny_models, batch_size=1, **kw):
    cfg = GeneratorConfig(model=str(tiny_models / "generator"), num_inference_steps=3, guidance_scale=5.0, **kw)
    return load_generator(cfg, torch.device("cpu"), batch_size=batch_size)


def test_image_equals_bare_pipeline_call_exactly(tiny_models):
    gen = _gen(tiny_models, batch_size=1, negative_prompt="blurry")
    out = gen.generate(["a red circle", "a blue square"], [7, 8])
    assert out.images.shape == (2, 3, 64, 64) and out.images.min() >= 0 and out.images.max() <= 1
    for i, (p, s) in enumerate([("a red circle", 7), ("a blue square", 8)]):
        bare = gen.pipe(p, negative_prompt="blurry", num_inference_steps=3, guidance_scale=5.0,
                        generator=torch.Generator().manual_seed(s), output_type="pt").images[0]
        assert torch.equal(bare, out.images[i])


def test_chunks_of_batch_size(tiny_models):
    gen = _gen(tiny_models, batch_size=2)
    out = gen.generate(["a", "b", "c"], [1, 2, 3])
    assert out.images.shape[0] == 3 and len(out.flagged) == 3 and len(out.warnings) == 3
    assert not torch.equal(out.images[0], out.images[1])


def test_long_caption_truncation_is_recorded(tiny_models):
    gen = _gen(tiny_models)
    out = gen.generate(["word " * 2000, "short"], [0, 1])
    assert "truncated" in out.warnings[0][0] and out.warnings[1] == []
    assert out.flagged == [False, False]


def test_png_bytes_deterministic(tiny_models):
    x = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert png_bytes(x) == png_bytes(x.clone())
    assert Image.open(io.BytesIO(png_bytes(x))).size == (8, 8)


def test_unknown_backend_message():
    import pytest

    with pytest.raises(ValueError, match="generator.backend"):
        load_generator(GeneratorConfig(backend="dalle"), torch.device("cpu"))
    assert DiffusionGenerator
