"""Captioner role: BLIP / BLIP-2 through transformers, original-BLIP checkpoint conversion, the backend factory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from recon.captioners import BACKENDS, BlipCaptioner, load_captioner
from recon.captioners.base import IGNORE_INDEX, sequence_log_prob
from recon.captioners.lavis import (
    CheckpointMismatchError,
    convert_blip_state_dict,
    load_original_blip_checkpoint,
    resize_pos_embed,
    to_original_blip_state_dict,
)
from recon.config import CaptionerConfig, ConfigError, DecodingConfig

PROMPT = "a picture of "


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)) for _ in range(3)]


@pytest.fixture(scope="module")
def blip_dir(tiny_models):
    return tiny_models / "captioner"


@pytest.fixture(scope="module")
def blip(blip_dir):
    return load_captioner(CaptionerConfig(model=str(blip_dir), prompt=PROMPT), "cpu", batch_size=2)


def bare_captions(model, processor, images, prompt, n, **settings):
    """What a user gets from transformers alone: generate, cut the prompt's tokens, decode."""
    inputs = processor(images=images, text=[prompt] * len(images), return_tensors="pt")
    n_prompt = inputs["input_ids"].shape[1] - (1 if model.config.model_type == "blip" else 0)
    prompt_ids = inputs["input_ids"][0, :n_prompt].clone()
    ids = model.generate(**inputs, num_return_sequences=n, **settings)
    if model.config.model_type == "blip":
        prompt_ids[0] = model.config.text_config.bos_token_id
    if model.config.model_type == "blip" or model.config.use_decoder_only_language_model:
        assert all(torch.equal(row[:n_prompt], prompt_ids) for row in ids)  # the prompt is the decoder prefix
        ids = ids[:, n_prompt:]
    texts = [" ".join(t.split()) for t in processor.tokenizer.batch_decode(ids, skip_special_tokens=True)]
    return [texts[i * n : (i + 1) * n] for i in range(len(images))]


@pytest.mark.parametrize("method,n,beams", [("greedy", 1, 1), ("beam", 3, 3), ("beam", 4, 2)])
def test_captions_equal_bare_generate(blip, images, method, n, beams):
    decoding = DecodingConfig(method=method, num_beams=beams, min_new_tokens=2, max_new_tokens=6)
    ours = blip.caption(images, num_candidates=n, decoding=decoding)
    bare = bare_captions(
        blip.model,
        blip.processor,
        images,
        PROMPT,
        n,
        do_sample=False,
        num_beams=max(beams, n),
        min_new_tokens=2,
        max_new_tokens=6,
        repetition_penalty=1.0,
    )
    assert ours == bare
    assert all(len(c) == n and all(s and not s.startswith("a picture of") for s in c) for c in ours)
    assert blip.caption(images[1:2], num_candidates=n, decoding=decoding) == ours[1:2]


def test_decoding_errors_say_what_to_pass(blip, images):
    with pytest.raises(ValueError, match="beam or nucleus"):
        blip.caption(images, num_candidates=2, decoding=DecodingConfig(method="greedy"))
    with pytest.raises(ValueError, match="min_new_tokens=9 exceeds"):
        blip.caption(images, decoding=DecodingConfig(min_new_tokens=9, max_new_tokens=4))
    with pytest.raises(ValueError, match="greedy, beam or nucleus"):
        blip.caption(images, decoding=DecodingConfig(method="topk"))


def test_nucleus_is_seeded_per_image(blip, images):
    decoding = DecodingConfig(method="nucleus", top_p=0.9, min_new_tokens=2, max_new_tokens=6)
    state = torch.get_rng_state()
    first = blip.caption(images, num_candidates=2, decoding=decoding, seeds=[1, 2, 3])
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    assert blip.caption(images, num_candidates=2, decoding=decoding, seeds=[1, 2, 3]) == first
    assert blip.caption(images[1:2], num_candidates=2, decoding=decoding, seeds=[2]) == first[1:2]
    assert blip.caption(images[1:2], num_candidates=2, decoding=decoding, seeds=[5]) != first[1:2]
    assert first[0][0] != first[0][1]


def test_log_likelihood_is_the_models_own(blip, images):
    tok = blip.tokenizer
    text = "a dog on a couch"
    ids = tok(PROMPT + text, return_tensors="pt").input_ids
    ids[0, 0] = blip.model.config.text_config.bos_token_id
    n_prompt = len(tok(PROMPT).input_ids) - 1  # [DEC] a picture of
    pixels = blip.processor(images=images[:1], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = blip.model(pixel_values=pixels, input_ids=ids).logits[0]
    logp = torch.log_softmax(logits[:-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
    expected = logp[n_prompt - 1 :].sum()  # the caption's tokens and [SEP]
    got = blip.log_likelihood(images[:1], [text])
    assert got.shape == (1,) and torch.allclose(got[0], expected, atol=1e-4)

    texts = [text, "two cats", "a red bus parked next to a tree"]
    batched = blip.log_likelihood(images, texts, batch_size=3)  # padded to the longest text
    alone = torch.cat([blip.log_likelihood([im], [t]) for im, t in zip(images, texts)])
    assert torch.allclose(batched, alone, atol=1e-4)
    assert batched[0] != batched[1]


def test_differentiable_entry_points(blip, images):
    x = torch.from_numpy(np.array(images[0])).permute(2, 0, 1)[None].float().div(255).requires_grad_(True)
    pixels = blip.preprocess_tensor(x)
    reference = blip.processor(images=images[:1], return_tensors="pt")["pixel_values"]
    assert pixels.shape == reference.shape
    assert (pixels - reference).abs().mean() < 0.05  # PIL (uint8) and torch resampling differ slightly
    logits, labels = blip.teacher_forced_logits(pixels, ["a dog"])
    assert logits.shape[:2] == labels.shape and (labels != IGNORE_INDEX).sum() == 3  # a, dog, [SEP]
    (-sequence_log_prob(logits, labels)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def _save_tiny_blip2(out, language_model: str):
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor

    from recon.tokenizers import make_blip_tokenizer

    tok = make_blip_tokenizer()
    processor = Blip2Processor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
        tokenizer=tok,
        num_query_tokens=4,
    )  # adds the <image> token to the tokenizer
    small = dict(
        num_attention_heads=4,
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.sep_token_id,
    )
    if language_model == "opt":
        text = dict(
            model_type="opt",
            hidden_size=32,
            word_embed_proj_dim=32,
            ffn_dim=37,
            num_hidden_layers=1,
            max_position_embeddings=64,
            bos_token_id=tok.cls_token_id,
            **small,
        )
    else:
        text = dict(
            model_type="t5",
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=1,
            num_decoder_layers=1,
            decoder_start_token_id=tok.pad_token_id,
            **small,
        )
    cfg = Blip2Config(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        qformer_config=dict(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=37,
            encoder_hidden_size=32,
            max_position_embeddings=32,
        ),
        text_config=text,
        num_query_tokens=4,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(0)
    Blip2ForConditionalGeneration(cfg).eval().save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.mark.parametrize("language_model", ["opt", "t5"])
def test_blip2_captions_through_the_hub(tmp_path, images, language_model):
    path = _save_tiny_blip2(tmp_path / "blip2", language_model)
    cap = load_captioner(CaptionerConfig(model=str(path), prompt=PROMPT), "cpu", batch_size=3)
    assert isinstance(cap, BlipCaptioner) and cap.is_blip2
    decoding = DecodingConfig(method="beam", num_beams=2, min_new_tokens=2, max_new_tokens=5)
    ours = cap.caption(images, num_candidates=2, decoding=decoding)
    assert ours == bare_captions(
        cap.model,
        cap.processor,
        images,
        PROMPT,
        2,
        do_sample=False,
        num_beams=2,
        min_new_tokens=2,
        max_new_tokens=5,
        repetition_penalty=1.0,
    )
    sampled = cap.caption(images[:1], decoding=DecodingConfig(method="nucleus", max_new_tokens=5), seeds=[3])
    assert len(sampled) == 1 and isinstance(sampled[0][0], str)
    ll = cap.log_likelihood(images[:2], ["a dog", "a cat on a mat"])
    assert ll.shape == (2,) and torch.isfinite(ll).all() and (ll < 0).all()


def test_original_blip_checkpoint_round_trip(tmp_path, blip_dir, blip, images):
    from transformers import BlipForConditionalGeneration

    source = blip.model
    original = to_original_blip_state_dict(source.state_dict())
    for key in [
        "visual_encoder.cls_token",
        "visual_encoder.pos_embed",
        "visual_encoder.patch_embed.proj.weight",
        "visual_encoder.blocks.0.attn.qkv.weight",
        "visual_encoder.blocks.1.attn.proj.bias",
        "visual_encoder.norm.weight",
        "text_decoder.bert.embeddings.word_embeddings.weight",
        "text_decoder.bert.encoder.layer.1.crossattention.self.key.weight",
        "text_decoder.cls.predictions.transform.dense.weight",
        "text_decoder.bert.embeddings.position_ids",
    ]:
        assert key in original
    assert not any(k.startswith("vision_model.") for k in original)
    assert convert_blip_state_dict(original).keys() == source.state_dict().keys()
    path = tmp_path / "model_base_caption.pth"
    torch.save({"model": original, "epoch": 3}, path)

    torch.manual_seed(123)
    target = BlipForConditionalGeneration(source.config).eval()  # different random weights
    report = load_original_blip_checkpoint(target, path)
    assert report.unexpected == [] and report.loaded == len(source.state_dict())
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k
    inputs = blip.processor(images=images, text=[PROMPT + "a dog"] * 3, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(target(**inputs).logits, source(**inputs).logits)

    # the same file through the config: captioner.checkpoint is converted onto captioner.model
    via_cfg = load_captioner(CaptionerConfig(model=str(blip_dir), checkpoint=str(path), prompt=PROMPT), "cpu")
    greedy = DecodingConfig(method="greedy", max_new_tokens=5)
    assert via_cfg.caption(images, decoding=greedy) == blip.caption(images, decoding=greedy)
    assert "checkpoint" in via_cfg.model_id


def test_original_blip_checkpoint_names_missing_and_unexpected_keys(tmp_path, blip):
    from transformers import BlipForConditionalGeneration

    original = to_original_blip_state_dict(blip.model.state_dict())
    del original["visual_encoder.blocks.0.attn.qkv.weight"]
    original["text_encoder.bert.pooler.dense.weight"] = torch.zeros(2, 2)
    path = tmp_path / "broken.pth"
    torch.save({"model": original}, path)
    target = BlipForConditionalGeneration(blip.model.config)
    with pytest.raises(CheckpointMismatchError, match=r"visual_encoder\.blocks\.0\.attn\.qkv\.weight"):
        load_original_blip_checkpoint(target, path)

    original["visual_encoder.blocks.0.attn.qkv.weight"] = blip.model.state_dict()[
        "vision_model.encoder.layers.0.self_attn.qkv.weight"
    ]
    torch.save({"model": original}, path)
    report = load_original_blip_checkpoint(target, path)  # BLIP's own loader ignores unused keys too
    assert report.unexpected == ["text_encoder.bert.pooler.dense.weight"]
    with pytest.raises(CheckpointMismatchError, match=r"text_encoder\.bert\.pooler\.dense\.weight"):
        load_original_blip_checkpoint(target, path, strict=True)


def test_resize_pos_embed_keeps_class_token():
    pos = torch.randn(1, 1 + 4 * 4, 8)
    assert torch.allclose(resize_pos_embed(pos, 17), pos)
    bigger = resize_pos_embed(pos, 1 + 6 * 6)
    assert bigger.shape == (1, 37, 8) and torch.equal(bigger[:, 0], pos[:, 0])


def test_peft_adapter_from_config(tmp_path, blip_dir, blip, images):
    from peft import LoraConfig, get_peft_model
    from transformers import BlipForConditionalGeneration

    base = BlipForConditionalGeneration.from_pretrained(blip_dir)
    lora = get_peft_model(base, LoraConfig(r=2, target_modules=["query", "value"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    cap = load_captioner(
        CaptionerConfig(model=str(blip_dir), adapter=str(tmp_path / "adapter"), prompt=PROMPT), "cpu"
    )
    assert "adapter" in cap.model_id
    texts = ["a dog"]
    with_adapter, without = cap.log_likelihood(images[:1], texts), blip.log_likelihood(images[:1], texts)
    assert not torch.allclose(with_adapter, without)
    greedy = DecodingConfig(method="greedy", min_new_tokens=1, max_new_tokens=4)
    assert len(cap.caption(images[:1], decoding=greedy)[0]) == 1


def test_unknown_backend_names_the_field_and_choices():
    with pytest.raises(ConfigError, match=r"captioner\.backend='flamingo-xl'.*blip"):
        load_captioner(CaptionerConfig(backend="flamingo-xl", model="x"), "cpu")
    assert BACKENDS["blip"] is BlipCaptioner


def test_an_adapter_trained_on_another_captioner_is_warned_about(tmp_path, caplog):
    import json

    from recon import hub
    from recon.captioners.base import warn_if_other_base

    def adapter(base):
        (tmp_path / "a").mkdir(exist_ok=True)
        (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base}))
        return str(tmp_path / "a")

    warn_if_other_base(adapter("builtin:shapes/captioner_weak"), "builtin:shapes/captioner_weak")
    warn_if_other_base(adapter(hub.resolve("builtin:shapes/captioner_weak")), "builtin:shapes/captioner_weak")
    assert "was trained on" not in caplog.text  # the same base, by id or by its resolved path
    warn_if_other_base(adapter("builtin:shapes/captioner_weak"), "builtin:shapes/captioner")
    assert (
        "was trained on builtin:shapes/captioner_weak, but captioner.model is builtin:shapes/captioner"
        in caplog.text
        and "--set captioner.model=builtin:shapes/captioner_weak" in caplog.text
    )
