"""Flamingo captioner: architecture invariants, OpenFlamingo key map and package equivalence, decoding, backend."""

from __future__ import annotations

import copy

import pytest
import torch

from recon.captioners.flamingo import (
    CheckpointKeyError,
    Flamingo,
    generate,
    load_openflamingo_state_dict,
    to_openflamingo_state_dict,
)

SMALL = dict(
    perceiver=dict(depth=2, dim_head=8, heads=2, num_latents=4, ff_mult=2),
    xattn=dict(dim_head=8, heads=2, ff_mult=2),
)


def tiny_llama(vocab: int = 64, layers: int = 4, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            pad_token_id=0,
        )
    ).eval()


def tiny_visual(seed: int = 0):
    import open_clip

    torch.manual_seed(seed)
    return open_clip.CLIP(
        embed_dim=32,
        vision_cfg={"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 8},
        text_cfg={"context_length": 16, "vocab_size": 100, "width": 32, "heads": 4, "layers": 1},
    ).eval()


MEDIA, EOC = 62, 63


def randomize_gates(model, value: float = 0.7) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("attn_gate.alpha", "ff_gate.alpha", "attn_gate", "ff_gate")):
                p.fill_(value)


@pytest.fixture(scope="module")
def flamingo():
    torch.manual_seed(1)
    model = Flamingo(
        tiny_visual().visual, tiny_llama(), MEDIA, EOC, cross_attn_every_n_layers=2, **SMALL
    ).eval()
    randomize_gates(model)
    return model


def test_gates_at_zero_equal_the_bare_lm():
    lm = tiny_llama()
    bare = copy.deepcopy(lm)
    model = Flamingo(tiny_visual().visual, lm, MEDIA, EOC, cross_attn_every_n_layers=1, **SMALL).eval()
    ids = torch.tensor([[MEDIA, 5, 6, 7, EOC, MEDIA, 8, 9]])
    with torch.no_grad():
        media = model.encode_images(torch.randn(1, 2, 3, 32, 32))
        assert media.abs().sum() > 0
        torch.testing.assert_close(model(ids, media).logits, bare(ids).logits, rtol=0, atol=0)
        randomize_gates(model)  # and the images do matter once the gates open
        assert not torch.allclose(model(ids, media).logits, bare(ids).logits)


def test_refuses_lm_activation_checkpointing():
    lm = tiny_llama(layers=2)
    model = Flamingo(tiny_visual().visual, lm, MEDIA, EOC, **SMALL).train()
    enable = getattr(lm, "activation_checkpointing_enable", None) or lm.gradient_checkpointing_enable
    enable()
    with pytest.raises(RuntimeError, match="checkpointing"):
        model(torch.tensor([[MEDIA, 5]]), model.encode_images(torch.randn(1, 1, 3, 32, 32)))


def test_cross_attention_sees_only_the_latest_image(flamingo):
    block = flamingo.gated_cross_attn["1"].attn
    ids = torch.tensor([[3, MEDIA, 5, 6, EOC, MEDIA, 8, 9, 10]])
    text_time = (ids == MEDIA).cumsum(-1)
    x = torch.randn(1, ids.shape[1], 32)
    with torch.no_grad():
        a = flamingo.encode_images(torch.randn(1, 2, 3, 32, 32))
        b = flamingo.encode_images(torch.randn(1, 2, 3, 32, 32))
        changed_first = torch.cat([b[:, :1], a[:, 1:]], dim=1)
        out_a, out_b = block(x, a, text_time), block(x, changed_first, text_time)
    after_second = text_time[0] == 2
    torch.testing.assert_close(out_a[0, after_second], out_b[0, after_second], rtol=0, atol=0)
    assert not torch.allclose(out_a[0, text_time[0] == 1], out_b[0, text_time[0] == 1])
    assert out_a[0, 0].abs().max() == 0  # text before any image gets no visual input


def test_openflamingo_key_map_round_trip(flamingo):
    state = to_openflamingo_state_dict(flamingo)
    assert "lang_encoder.model.layers.1.gated_cross_attn_layer.attn_gate" in state
    assert "lang_encoder.model.layers.0.gated_cross_attn_layer.attn_gate" not in state  # every 2nd layer
    assert "perceiver.layers.1.0.to_kv.weight" in state and "lang_encoder.model.embed_tokens.weight" in state
    torch.manual_seed(5)
    fresh = Flamingo(tiny_visual().visual, tiny_llama(), MEDIA, EOC, cross_attn_every_n_layers=2, **SMALL)
    info = load_openflamingo_state_dict(fresh, state)
    assert not info["ignored"]
    again = to_openflamingo_state_dict(fresh)
    assert again.keys() == state.keys()
    for k in state:
        torch.testing.assert_close(again[k], state[k], rtol=0, atol=0)


def test_checkpoint_errors_name_the_keys(flamingo):
    state = to_openflamingo_state_dict(flamingo)
    missing = {k: v for k, v in state.items() if "layers.3.gated_cross_attn_layer.ff_gate" not in k}
    with pytest.raises(
        CheckpointKeyError, match=r"missing trainable keys.*gated_cross_attn\.3\.ff_gate\.alpha"
    ):
        load_openflamingo_state_dict(copy.deepcopy(flamingo), missing)
    with pytest.raises(
        CheckpointKeyError, match=r"unexpected keys: lang_encoder\.model\.layers\.0\.gated_cross"
    ):
        every_layer = dict(
            state, **{"lang_encoder.model.layers.0.gated_cross_attn_layer.attn_gate": torch.zeros(1)}
        )
        load_openflamingo_state_dict(copy.deepcopy(flamingo), every_layer)
    wrapped = {"model_state_dict": {"module." + k: v for k, v in state.items()}}  # a DDP training checkpoint
    load_openflamingo_state_dict(copy.deepcopy(flamingo), wrapped)


def _open_flamingo_v2():
    """open-flamingo 2.x, installed with ``pip install --no-deps open-flamingo==2.0.1`` (its metadata pins
    torch==2.0.1, so a plain install either downgrades torch or backtracks to the unrelated 0.0.2)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        if int(version("open-flamingo").split(".")[0]) < 2:
            pytest.skip(
                "open-flamingo < 2 installed; the comparison needs 2.x (pip install --no-deps "
                "open-flamingo==2.0.1)"
            )
    except PackageNotFoundError:
        pytest.skip("open-flamingo not installed (pip install --no-deps open-flamingo==2.0.1)")
    pytest.importorskip("einops_exts")
    return pytest.importorskip("open_flamingo.src.flamingo")


def test_equals_the_open_flamingo_package():
    of_flamingo = _open_flamingo_v2()
    from open_flamingo.src.flamingo_lm import FlamingoLMMixin
    from open_flamingo.src.utils import extend_instance

    lm, clip = tiny_llama(), tiny_visual()
    their_lm, their_clip = copy.deepcopy(lm), copy.deepcopy(clip)
    extend_instance(their_lm, FlamingoLMMixin)
    their_lm.set_decoder_layers_attr_name("model.layers")
    their_clip.visual.output_tokens = True
    torch.manual_seed(3)
    theirs = of_flamingo.Flamingo(
        their_clip, their_lm, EOC, MEDIA, vis_dim=32, cross_attn_every_n_layers=2
    ).eval()
    randomize_gates(theirs)
    ours = Flamingo(
        clip.visual, lm, MEDIA, EOC, cross_attn_every_n_layers=2
    ).eval()  # OpenFlamingo's defaults
    load_openflamingo_state_dict(ours, theirs.state_dict())  # the full state dict: every key rule
    ids = torch.tensor(
        [[1, MEDIA, 5, 6, 7, EOC, MEDIA, 8, 9, 10, 11], [2, 3, MEDIA, 4, 5, EOC, 9, MEDIA, 8, 9, 10]]
    )
    pixels = torch.randn(2, 2, 3, 32, 32)
    with torch.no_grad():
        expected = theirs(pixels[:, :, None], ids, attention_mask=torch.ones_like(ids)).logits
        got = ours(ids, ours.encode_images(pixels), attention_mask=torch.ones_like(ids)).logits
        swapped = ours(ids, ours.encode_images(pixels.flip(1)), attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(swapped, expected, atol=1e-4)  # the comparison does depend on the images
    # and OpenFlamingo's own checkpoint filter (trainable + embeddings) loads too
    trainable = {
        k: v
        for k, v in theirs.state_dict().items()
        if k.startswith("perceiver.") or "gated_cross_attn_layer" in k or "embed" in k
    }
    fresh = Flamingo(tiny_visual().visual, tiny_llama(), MEDIA, EOC, cross_attn_every_n_layers=2)
    load_openflamingo_state_dict(
        fresh, {k: v for k, v in trainable.items() if "gated_cross_attn_layers" not in k}
    )
    with torch.no_grad():
        torch.testing.assert_close(
            fresh.eval()(ids, fresh.encode_images(pixels)).logits, expected, rtol=1e-5, atol=1e-6
        )


def _prompts():
    rows = [
        [MEDIA, 5, 6, EOC, MEDIA, 7],
        [9, 9, MEDIA, 11, 12, 13, EOC, MEDIA, 7, 8, 10],
        [MEDIA, 20, EOC, MEDIA],
    ]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = torch.tensor(r), 1
    return rows, ids, mask


@pytest.mark.parametrize("method,beams,n", [("greedy", 1, 1), ("beam", 3, 2)])
def test_batched_generation_equals_unbatched(flamingo, method, beams, n):
    rows, ids, mask = _prompts()
    torch.manual_seed(7)
    pixels = torch.randn(len(rows), 2, 3, 32, 32)
    with torch.no_grad():
        media = flamingo.encode_images(pixels)
    kw = dict(
        max_new_tokens=6,
        min_new_tokens=2,
        method=method,
        num_beams=beams,
        num_return_sequences=n,
        banned_token_ids=(0,),
    )
    batched = generate(flamingo, ids, mask, media, **kw)
    for i, r in enumerate(rows):
        alone = generate(
            flamingo, torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long), media[i : i + 1], **kw
        )
        assert [s for s, _ in batched[i]] == [s for s, _ in alone[0]]
        for (_, a), (_, b) in zip(batched[i], alone[0]):
            assert a == pytest.approx(b, abs=1e-4)
    assert all(len(c) == n and len(c[0][0]) >= 2 for c in batched)


def test_decoding_with_cache_equals_full_forward(flamingo):
    """Greedy tokens from the KV-cached loop are the argmax of a full (uncached) forward over prompt + prefix."""
    rows, ids, mask = _prompts()
    with torch.no_grad():
        media = flamingo.encode_images(torch.randn(len(rows), 2, 3, 32, 32))
        out = generate(flamingo, ids, mask, media, max_new_tokens=5, method="greedy", banned_token_ids=(0,))
        for i, r in enumerate(rows):
            seq = r + out[i][0][0]
            logits = flamingo(torch.tensor([seq]), media[i : i + 1]).logits[0, len(r) - 1 : -1].float()
            logits[:, [0, MEDIA]] = -float("inf")
            assert logits.argmax(-1).tolist() == out[i][0][0][: logits.shape[0]]


def test_beam_search_one_beam_equals_greedy(flamingo):
    rows, ids, mask = _prompts()
    with torch.no_grad():
        media = flamingo.encode_images(torch.randn(len(rows), 2, 3, 32, 32))
    greedy = generate(flamingo, ids, mask, media, max_new_tokens=5, method="greedy")
    beam = generate(
        flamingo, ids, mask, media, max_new_tokens=5, method="beam", num_beams=1, length_penalty=0.0
    )
    assert [g[0][0] for g in greedy] == [b[0][0] for b in beam]


def test_modified_resnet_tower_gives_one_token_per_position():
    import open_clip

    torch.manual_seed(0)
    clip = open_clip.CLIP(
        embed_dim=16,
        vision_cfg={"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 16},
        text_cfg={"context_length": 8, "vocab_size": 50, "width": 16, "heads": 2, "layers": 1},
    )
    model = Flamingo(clip.visual, tiny_llama(), MEDIA, EOC, **SMALL)
    assert model.vis_dim == 8 * 32  # ModifiedResNet: layer4 has width * 8 planes, expansion 4
    with torch.no_grad():
        assert model.encode_images(torch.randn(2, 3, 3, 32, 32)).shape == (2, 3, 4, 256)


# ----------------------------------------------------------------------------------------------- the backend
@pytest.fixture(scope="module")
def flamingo_dir(tmp_path_factory, tiny_models):
    """A tiny random Flamingo in our saved layout: word-level tokenizer, Llama LM, the tiny open_clip ViT."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from recon import hub
    from recon.captioners.flamingo import save_flamingo
    from recon.shapes.flamingo import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    lm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=512,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    )
    vision = str(tiny_models / "clip")
    clip, _, _ = hub.load_open_clip(vision, None, torch.device("cpu"))
    media, eoc = tok.convert_tokens_to_ids("<image>"), tok.convert_tokens_to_ids("<|endofchunk|>")
    model = Flamingo(clip.visual, lm, media, eoc, **SMALL)
    randomize_gates(model, 1.5)
    return save_flamingo(model, tok, tmp_path_factory.mktemp("flamingo") / "tiny", vision=vision)


def _images(n: int, seed: int = 0):
    from recon.shapes import world

    return [world.render_pil(s) for s in world.sample_scenes(n, seed, "test")]


def _captioner(path, **kwargs):
    from recon.captioners import load_captioner
    from recon.captioners.flamingo import Demonstrations, FlamingoCaptioner
    from recon.config import CaptionerConfig, DecodingConfig
    from recon.shapes import world

    cfg = CaptionerConfig(
        backend="flamingo",
        model=str(path),
        prompt="Output:",
        decoding=DecodingConfig(method="beam", num_beams=2, min_new_tokens=1, max_new_tokens=6),
    )
    scenes = world.sample_scenes(6, 1, "train")
    if kwargs:
        demos = Demonstrations([world.render_pil(s) for s in scenes], [s.caption for s in scenes])
        return FlamingoCaptioner.from_config(cfg, "cpu", batch_size=2, demos=demos, **kwargs)
    return load_captioner(cfg, "cpu", batch_size=2)


def test_backend_captions_in_batches_like_one_by_one(flamingo_dir):
    from recon.captioners.base import Captioner
    from recon.config import DecodingConfig

    cap = _captioner(flamingo_dir, num_shots=2)
    assert isinstance(cap, Captioner)
    images, seeds = _images(3), [4, 5, 6]
    batched = cap.caption(images, num_candidates=2, seeds=seeds)
    assert len(batched) == 3 and all(len(c) == 2 for c in batched)
    assert batched == [cap.caption([im], num_candidates=2, seeds=[s])[0] for im, s in zip(images, seeds)]
    nucleus = DecodingConfig(method="nucleus", top_p=0.9, min_new_tokens=1, max_new_tokens=6)
    first = cap.caption(images[:2], num_candidates=3, decoding=nucleus, seeds=[1, 2])
    assert first == cap.caption(images[:2], num_candidates=3, decoding=nucleus, seeds=[1, 2])
    assert first[1] == cap.caption(images[1:2], num_candidates=3, decoding=nucleus, seeds=[2])[0]


def test_likelihood_uses_the_caption_prompt(flamingo_dir):
    """Teacher forcing sees the prompt decoding saw: its first scored position predicts the greedy first token.
    (One token: a random model's multi-token output need not survive decode -> encode.)"""
    from recon.captioners.flamingo import MEDIA_TOKEN, few_shot_prompt
    from recon.config import DecodingConfig

    cap = _captioner(flamingo_dir, num_shots=1)
    images = _images(2)
    greedy = DecodingConfig(method="greedy", min_new_tokens=1, max_new_tokens=1)
    captions = [c[0] for c in cap.caption(images, decoding=greedy, seeds=[3, 4])]
    with torch.no_grad():
        logits, labels = cap.teacher_forced_logits(cap.pixel_values(images), captions, seeds=[3, 4])
    banned = [cap.pad_id, cap.tokenizer.convert_tokens_to_ids(MEDIA_TOKEN), cap.model.eoc_token_id]
    logits[..., banned] = -float("inf")
    for i, caption in enumerate(captions):
        scored = labels[i] != -100
        assert (
            int(scored.sum()) == len(cap.tokenizer(caption).input_ids) + 1
        )  # the caption and <|endofchunk|>
        assert int(logits[i][scored][0].argmax()) == int(labels[i][scored][0])
    ll = cap.log_likelihood(images, captions, seeds=[3, 4])
    assert ll.shape == (2,) and ll.dtype == torch.float32 and bool((ll < 0).all())
    assert few_shot_prompt(["a b"], "Output:") == "<image>Output:a b<|endofchunk|>\n<image>Output:"
    assert (
        few_shot_prompt(["a b"], "Output:", demo_images=False) == "Output:a b<|endofchunk|>\n<image>Output:"
    )


def test_demonstration_selection(flamingo_dir, tmp_path):
    import json

    from recon.captioners.flamingo import Demonstrations

    cap = _captioner(flamingo_dir, num_shots=2, selection="rices")
    images = _images(4, seed=9)
    cap.demos = Demonstrations(images, [f"caption {i}" for i in range(4)])
    picks = cap._demos_for(cap.pixel_values(images), seeds=[0] * 4)
    assert [idx[-1] for _, idx in picks] == [0, 1, 2, 3]  # the query itself is the most similar: placed last
    pool = Demonstrations(images, ["x"] * 4)
    assert pool.select(3, seed=1) == pool.select(3, seed=1) and len(set(pool.select(3, seed=1))) == 3
    with pytest.raises(ValueError, match="pool has 4"):
        pool.select(5, seed=0)
    zero = _captioner(flamingo_dir, num_shots=0)
    ((captions, idx),) = zero._demos_for(cap.pixel_values(images[:1]), seeds=[0])
    assert len(captions) == 2 and idx == []  # zero-shot: two text-only demonstrations
    for i, im in enumerate(images):  # a COCO-style pool: captions json + image folder, images loaded on use
        im.save(tmp_path / f"{i}.png")
    (tmp_path / "captions.json").write_text(
        json.dumps(
            {
                "images": [{"id": i, "file_name": f"{i}.png"} for i in range(4)],
                "annotations": [{"image_id": i, "caption": f" image  {i} "} for i in range(4)],
            }
        )
    )
    coco = Demonstrations.from_coco(tmp_path / "captions.json", tmp_path, limit=3, seed=1)
    assert len(coco) == 3 and all(c.startswith("image ") for c in coco.captions)
    k = int(coco.captions[0].split()[1])
    assert list(coco.image(0).getdata()) == list(images[k].getdata())


def test_lora_adapter_round_trip(flamingo_dir, tmp_path):
    peft = pytest.importorskip("peft")
    from recon.config import CaptionerConfig

    cap = _captioner(flamingo_dir)
    model = peft.get_peft_model(cap.model, cap.lora_config(r=2))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "_gate" in n for n in trainable)
    assert any("gated_cross_attn" in n for n in trainable) and any("perceiver" in n for n in trainable)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    model.save_pretrained(tmp_path / "adapter")
    images, texts = _images(2), ["a small red circle", "a large blue square"]
    expected = cap.log_likelihood(images, texts)
    cfg = CaptionerConfig(
        backend="flamingo", model=str(flamingo_dir), prompt="Output:", adapter=str(tmp_path / "adapter")
    )
    from recon.captioners.flamingo import FlamingoCaptioner

    loaded = FlamingoCaptioner.from_config(cfg, "cpu")
    assert loaded.model_id.endswith(f"+adapter:{tmp_path / 'adapter'}")
    torch.testing.assert_close(loaded.log_likelihood(images, texts), expected)
    assert not torch.allclose(_captioner(flamingo_dir).log_likelihood(images, texts), expected)


def test_presets_validate_and_need_their_weights():
    from recon.config import load_config
    from recon.hub import ModelNotAvailableError

    for name, every in [
        ("openflamingo-3b-vitl-mpt1b", 1),
        ("openflamingo-4b-vitl-rpj3b", 2),
        ("openflamingo-9b-vitl-mpt7b", 4),
    ]:
        cfg = load_config(name)
        assert cfg.captioner.backend == "flamingo" and cfg.captioner.prompt == "Output:"
        from recon.captioners.flamingo import OPENFLAMINGO_RELEASES

        assert OPENFLAMINGO_RELEASES[cfg.captioner.model]["cross_attn_every_n_layers"] == every
        assert cfg.captioner.decoding.num_beams == 3 and cfg.captioner.decoding.max_new_tokens == 20
    from recon.captioners.flamingo import flamingo_spec

    with pytest.raises(ModelNotAvailableError, match="OpenFlamingo-3B-vitl-mpt1b"):
        flamingo_spec("openflamingo/OpenFlamingo-3B-vitl-mpt1b")
    spec = flamingo_spec("openflamingo/OpenFlamingo-4B-vitl-rpj3b", checkpoint="/data/checkpoint.pt")
    assert (
        spec.weights == "/data/checkpoint.pt"
        and spec.lang_model == "togethercomputer/RedPajama-INCITE-Base-3B-v1"
    )


# ----------------------------------------------------------------------------------------------- shapes few-shot demo
def test_shapes_formats_and_tokenizer():
    import numpy as np

    from recon.shapes import flamingo as sf
    from recon.shapes import world

    tok = sf.build_tokenizer()
    rng = np.random.default_rng(0)
    attrs = world.sample_scenes(1, 0, "test")[0].attributes
    novel = sf.NOVEL_FORMAT.render(attrs)
    assert novel.startswith(f"colour: {attrs['color']}; shape: {attrs['shape']}")
    assert sf.NOVEL_FORMAT.pattern().fullmatch(novel) and world.parse_caption(novel) == attrs
    seen_pairs = set()
    for _ in range(300):
        fmt = sf.sample_format(rng)
        text = sf.document([fmt.render(sf.random_attributes(rng), 1) for _ in range(2)])
        ids = tok(text).input_ids
        assert tok.unk_token_id not in ids and tok.decode(ids) == text  # exact round trip
        if fmt.kind == "kv":
            seen_pairs.add((fmt.kv_sep, fmt.item_sep))
            assert world.parse_caption(fmt.render(attrs)) == attrs
    assert sf.NOVEL_PAIR not in seen_pairs and len(seen_pairs) == 11  # every other pairing is trained on


def test_shapes_scoring_and_closed_gates(flamingo):
    from recon.shapes import flamingo as sf

    truth = {
        "shape": "circle",
        "color": "red",
        "size": "small",
        "position": "top left",
        "background": "white",
    }
    scores = sf.score_outputs(
        [
            sf.NOVEL_FORMAT.render(truth),
            "a small red square at the top left on a white background",
            "colour: red; shape: cross",
        ],
        [truth] * 3,
    )
    assert scores["format_following"] == pytest.approx(1 / 3) and scores["exact"] == pytest.approx(1 / 3)
    assert scores["attr_acc"] == pytest.approx((1 + 0.8 + 0.2) / 3) and scores["tuple_acc"] == pytest.approx(
        1 / 3
    )
    ids = torch.tensor([[MEDIA, 5, 6, 7, EOC, MEDIA, 8, 9]])
    with torch.no_grad():
        media = flamingo.encode_images(torch.randn(1, 2, 3, 32, 32))
        with sf.closed_gates(flamingo):
            blind = flamingo(ids, media).logits
        torch.testing.assert_close(blind, flamingo.lang_model(ids).logits, rtol=0, atol=0)
        assert not torch.allclose(flamingo(ids, media).logits, blind)  # gates restored


def test_shipped_shapes_flamingo_learns_the_format_from_one_example():
    from recon import hub
    from recon.shapes import flamingo as sf

    if not (hub.SHAPES_BUNDLE / "flamingo" / "flamingo.json").is_file():
        pytest.skip("bundle/flamingo not trained (recon shapes train --component flamingo)")
    result = sf.fewshot_eval([0, 1], n=8, seed=0)
    assert (
        result["0"]["format_following"] == 0 and result["0"]["attr_acc"] >= 0.8
    )  # its own wording, right values
    assert result["1"]["format_following"] >= 0.75 and result["1"]["attr_acc"] >= 0.8
    assert (
        result["1"]["lm_only_format_following"] >= 0.75 and result["1"]["lm_only_attr_acc"] < 0.6
    )  # LM: no eyes


def test_shapes_flamingo_training_two_step_smoke(tmp_path):
    """Both stages of `recon shapes train --component flamingo`, two steps each: a loadable captioner comes out."""
    from recon.captioners.flamingo import FlamingoCaptioner, flamingo_spec, load_flamingo
    from recon.config import CaptionerConfig, DecodingConfig
    from recon.shapes import world
    from recon.shapes.flamingo import PROMPT, train

    record = train(tmp_path / "flamingo", tmp_path / "work", lm_steps=2, flamingo_steps=2)
    assert record["stage2"]["steps"] == 2 and (tmp_path / "flamingo" / "flamingo.json").is_file()
    model, tokenizer, pre = load_flamingo(flamingo_spec(str(tmp_path / "flamingo")), torch.device("cpu"))
    cfg = CaptionerConfig(
        backend="flamingo",
        model=str(tmp_path / "flamingo"),
        prompt=PROMPT,
        decoding=DecodingConfig(method="greedy", min_new_tokens=1, max_new_tokens=4),
    )
    (caps,) = FlamingoCaptioner(model, tokenizer, pre, cfg).caption(
        [world.render_pil(world.sample_scenes(1, 0)[0])]
    )
    assert len(caps) == 1 and isinstance(caps[0], str)
    # the same checkpointed loop as every other part: a rerun resumes (stage 1 done, stage 2 from its checkpoint)
    again = train(tmp_path / "flamingo", tmp_path / "work", lm_steps=2, flamingo_steps=3)
    assert again["stage1"] == record["stage1"] and again["stage2"]["steps"] == 3
    assert (tmp_path / "work" / "stage2" / "flamingo.ckpt.pt").is_file()


def test_beam_step_by_hand():
    import math

    from recon.captioners.flamingo.decoding import beam_step

    logp = torch.tensor([[0.5, 0.2, 0.3], [0.1, 0.1, 0.8]]).log()  # beams of one row; token 2 is eos
    scores, generated = torch.tensor([0.0, -float("inf")]), torch.zeros(2, 0, dtype=torch.long)
    finished, done = [[]], [False]
    select, tokens, new = beam_step(
        logp, scores, generated, finished, done, k=2, eos=2, length=1, length_penalty=1.0
    )
    # only beam 0 is live at step 0: its token 0 and token 1 continue, its eos (ranked 2nd) finishes
    assert select.tolist() == [0, 0] and tokens.tolist() == [0, 1]
    assert new.tolist() == pytest.approx([math.log(0.5), math.log(0.2)])
    assert finished == [[([], pytest.approx(math.log(0.3)))]] and done == [False]
    # next step: both beams end best with eos; two finished beat every running beam: the row is done
    generated = torch.tensor([[0], [1]])
    logp = torch.tensor([[0.05, 0.05, 0.9], [0.05, 0.05, 0.9]]).log()
    beam_step(logp, new, generated, finished, done, k=2, eos=2, length=2, length_penalty=1.0)
    assert [h[0] for h in finished[0]] == [[0], [1]] and done == [True]  # the step-0 hypothesis falls out
