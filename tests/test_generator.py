import io

import torch
from PIL import Image

from recon.config import GeneratorConfig
from recon.generators import DiffusionGenerator, load_generator
from recon.pipeline import png_bytes


def _gen(tiny_models, batch_size=1, **kw):
    cfg = GeneratorConfig(
        model=str(tiny_models / "generator"), num_inference_steps=3, guidance_scale=5.0, **kw
    )
    return load_generator(cfg, torch.device("cpu"), batch_size=batch_size)


def test_image_equals_bare_pipeline_call_exactly(tiny_models):
    gen = _gen(tiny_models, batch_size=1, negative_prompt="blurry")
    out = gen.generate(["a red circle", "a blue square"], [7, 8])
    assert out.images.shape == (2, 3, 64, 64) and out.images.min() >= 0 and out.images.max() <= 1
    for i, (p, s) in enumerate([("a red circle", 7), ("a blue square", 8)]):
        bare = gen.pipe(
            p,
            negative_prompt="blurry",
            num_inference_steps=3,
            guidance_scale=5.0,
            generator=torch.Generator().manual_seed(s),
            output_type="pt",
        ).images[0]
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


# ------------------------------------------------------------------------------------------- long prompts
def _long_prompt(gen, n_tokens: int) -> str:
    words = ("red", "blue", "circle", "square", "small", "large", "left", "right", "above", "below")
    prompt = " ".join(words[i % len(words)] for i in range(n_tokens - 2))
    assert gen.prompt_tokens(prompt) == n_tokens  # one token per word, plus BOS and EOS
    return prompt


def _chunked(gen, **kw):
    """The same pipeline in another mode (loading is the slow part of these tests)."""
    from dataclasses import replace

    return DiffusionGenerator(
        gen.pipe, replace(gen.cfg, long_prompts="chunk", **kw), batch_size=gen.batch_size
    )


def test_chunk_mode_equals_truncate_mode_bit_for_bit_when_prompts_fit(tiny_models):
    prompts, seeds = ["a red circle", "a blue square " * 10, "x"], [3, 4, 5]
    gen = _gen(tiny_models, batch_size=2, negative_prompt="blurry")
    plain, chunk = gen.generate(prompts, seeds), _chunked(gen).generate(prompts, seeds)
    assert torch.equal(plain.images, chunk.images) and chunk.warnings == [[], [], []]


def test_one_chunk_of_the_encoder_equals_the_pipelines_own_prompt_encoding(tiny_models):
    from recon.generators.diffusion import chunk_token_ids, encode_long_prompts

    gen = _gen(tiny_models)
    pipe = gen.pipe
    ids, mask = chunk_token_ids(pipe.tokenizer, "a red circle above a blue square")
    assert (
        ids
        == [pipe.tokenizer("a red circle above a blue square", padding="max_length", max_length=77).input_ids]
        and sum(mask[0]) == 9
    )
    ours = encode_long_prompts(pipe.tokenizer, pipe.text_encoder, ["a red circle", "x"], 1, "cpu")
    theirs, _ = pipe.encode_prompt(["a red circle", "x"], "cpu", 1, False)
    assert torch.equal(ours, theirs)
    # through the pipeline: our embeddings give the bare call's image bit for bit
    with torch.inference_mode():
        empty = encode_long_prompts(pipe.tokenizer, pipe.text_encoder, [""], 1, "cpu")
        via_embeds = pipe(
            prompt_embeds=ours[:1],
            negative_prompt_embeds=empty,
            num_inference_steps=3,
            guidance_scale=5.0,
            generator=torch.Generator().manual_seed(1),
            output_type="pt",
        ).images
    bare = pipe(
        "a red circle",
        num_inference_steps=3,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(1),
        output_type="pt",
    ).images
    assert torch.equal(via_embeds, bare)


def test_a_150_token_prompt_is_chunked_and_changes_the_image_versus_truncation(tiny_models):
    from recon.generators.diffusion import chunk_token_ids

    truncated = _gen(tiny_models)
    chunked = _chunked(truncated)
    prompt = _long_prompt(chunked, 150)
    ids, _ = chunk_token_ids(chunked.pipe.tokenizer, prompt)
    assert (
        len(ids) == 2 and all(len(r) == 77 for r in ids) and ids[1][0] == chunked.pipe.tokenizer.bos_token_id
    )
    a, b = chunked.generate([prompt], [0]), truncated.generate([prompt], [0])
    assert not torch.equal(a.images, b.images)
    assert a.warnings == [
        ["caption of 150 tokens encoded in 2 chunks of 77 tokens (generator.long_prompts=chunk)"]
    ]
    assert (
        b.warnings[0][0].startswith("caption truncated from 150 to 77 tokens")
        and "long_prompts=truncate" in b.warnings[0][0]
    )
    # the tokens past the first chunk matter: a different second half gives a different image
    other = prompt.rsplit(" ", 10)[0] + " green" * 10
    assert not torch.equal(chunked.generate([other], [0]).images, a.images)
    # and truncation ignores them (the pipeline's own behaviour)
    assert torch.equal(truncated.generate([other], [0]).images, b.images)


def test_chunk_mode_batches_mixed_lengths_with_a_long_negative_prompt(tiny_models):
    gen = _chunked(_gen(tiny_models, batch_size=3))
    long = _long_prompt(gen, 150)
    out = gen.generate(["a red circle", long, "a blue square"], [1, 2, 3])
    assert out.images.shape == (3, 3, 64, 64) and out.warnings[0] == [] and "2 chunks" in out.warnings[1][0]
    alone = gen.generate(["a red circle", "a blue square"], [1, 3])  # the long prompt's neighbours: one batch
    assert torch.equal(alone.images, out.images[[0, 2]])
    neg = _chunked(gen, negative_prompt=long).generate(["a red circle"], [1])
    assert neg.images.shape == (1, 3, 64, 64) and not torch.equal(neg.images[0], out.images[0])


def test_long_prompts_mode_is_validated():
    import pytest

    from recon.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="generator.long_prompts='split'"):
        load_config(None, ["generator.long_prompts=split"])
    assert load_config(None, ["generator.long_prompts=chunk"]).generator.long_prompts == "chunk"


def test_loading_through_the_python_api_prints_no_library_progress_bars(tiny_models, capfd, monkeypatch):
    import transformers.utils.logging as tl

    from recon import hub
    from recon.config import load_config

    monkeypatch.delenv("RECON_VERBOSE", raising=False)
    cfg = load_config("tiny-random")
    hub.load_diffusion_pipeline(cfg.generator.model, torch.device("cpu"), torch.float32)
    hub.load_captioner_model(cfg.captioner.model, torch.device("cpu"), torch.float32)
    err = capfd.readouterr().err
    assert "Loading pipeline components" not in err and "Loading weights" not in err
    assert tl.is_progress_bar_enabled()  # the user's own setting is restored afterwards
