"""SoftTokenBridge: the CLIP <- BERT index, its cache, the variants, and exactness against CLIPTextModel."""

from __future__ import annotations

import pytest
import torch

from recon.train.bridge import (
    UNMAPPED,
    SoftTokenBridge,
    TextEncoderFromEmbeddings,
    build_index,
    caption_positions,
    token_coverage,
    vocab_index,
)
from recon.train.config import BridgeConfig


@pytest.fixture(scope="module")
def clip_tokenizer(tiny_models):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(tiny_models / "generator" / "tokenizer")


@pytest.fixture(scope="module")
def bert_tokenizer(tiny_models):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_models / "captioner").tokenizer


@pytest.fixture(scope="module")
def text_encoder(tiny_models):
    from transformers import CLIPTextModel

    return CLIPTextModel.from_pretrained(tiny_models / "generator" / "text_encoder").eval()


@pytest.fixture(scope="module")
def bert_index(bert_tokenizer, clip_tokenizer, recon_cache):
    return vocab_index(bert_tokenizer, clip_tokenizer, recon_cache)


def one_hot_logits(tokenizer, captions: list[str], width: int = 14, offset: int = 2):
    """Logits that put all mass on each caption's token ids, at positions offset.. (a prompt precedes)."""
    logits = torch.zeros(len(captions), width, len(tokenizer))
    mask = torch.zeros(len(captions), width, dtype=torch.bool)
    for i, c in enumerate(captions):
        for j, tok in enumerate(tokenizer(c, add_special_tokens=False).input_ids):
            logits[i, offset + j, tok] = 1e4  # exp(-1e4) == 0 in float32: exactly one-hot after softmax
            mask[i, offset + j] = True
    return logits, mask


def test_index_maps_same_words_and_reports_coverage(bert_index, bert_tokenizer, clip_tokenizer):
    clip_vocab, bert_vocab = clip_tokenizer.get_vocab(), bert_tokenizer.get_vocab()
    index = bert_index.index
    assert index.shape == (len(clip_vocab),)
    for word in ("dog", "red", "circle", "background"):
        assert index[clip_vocab[word + "</w>"]] == bert_vocab[word]  # whole word
    assert index[clip_vocab["<|startoftext|>"]] == UNMAPPED and index[clip_vocab["<|endoftext|>"]] == UNMAPPED
    cov = bert_index.coverage
    assert cov["target_vocab"] == 49408 and 0.3 < cov["target_unmapped_fraction"] < 0.7
    assert cov["target_mapped"] + round(cov["target_unmapped_fraction"] * 49408) == pytest.approx(
        49408, abs=2
    )
    ids = bert_tokenizer(
        ["a small red circle at the top left on a white background"], add_special_tokens=False
    )
    assert token_coverage(bert_index, ids.input_ids) == 1.0


@pytest.fixture(scope="module")
def shapes_text_side():
    """The shipped shapes bundle's real BERT captioner tokenizer, CLIP tokenizer and text encoder."""
    from transformers import AutoProcessor, CLIPTextModel, CLIPTokenizer

    from recon.hub import SHAPES_BUNDLE

    bert = AutoProcessor.from_pretrained(SHAPES_BUNDLE / "captioner").tokenizer
    clip = CLIPTokenizer.from_pretrained(SHAPES_BUNDLE / "generator" / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(SHAPES_BUNDLE / "generator" / "text_encoder").eval()
    return bert, clip, encoder


def test_index_is_one_to_one(bert_index, bert_tokenizer, clip_tokenizer):
    index, clip_vocab, bert_vocab = bert_index.index, clip_tokenizer.get_vocab(), bert_tokenizer.get_vocab()
    assert int(torch.bincount(index[bert_index.mapped]).max()) == 1  # no WordPiece reaches two CLIP rows
    assert index[clip_vocab["circle"]] == UNMAPPED  # the word-start piece: "circle" took "circle</w>"
    # a continuation piece ends its word ("##ing" -> "ing</w>") unless a word-initial piece holds that form
    assert index[clip_vocab["ly</w>"]] == bert_vocab["##ly"] and index[clip_vocab["ly"]] == UNMAPPED
    assert (
        index[clip_vocab["ing</w>"]] == bert_vocab["ing"] and index[clip_vocab["ing"]] == bert_vocab["##ing"]
    )
    assert index[clip_vocab["s</w>"]] == bert_vocab["s"] and index[clip_vocab["s"]] == bert_vocab["##s"]


# Words that are one token in both vocabularies: inside the shapes world and well beyond it.
SINGLE_TOKEN_CAPTIONS = [
    "a small red circle at the top left on a white background",
    "a large blue square in the center on a black background",
    "two dogs on a couch in the living room",
    "a man riding a horse on the beach",
    "the old train station at night, with people waiting",
]


@pytest.mark.parametrize("variant", ["prob", "logit"])
def test_certain_captioner_reproduces_the_tokenized_caption(variant, shapes_text_side):
    bert, clip, encoder = shapes_text_side
    bridge = SoftTokenBridge(vocab_index(bert, clip, None), encoder, clip, BridgeConfig(variant=variant))
    for caption in SINGLE_TOKEN_CAPTIONS:
        words = caption.replace(",", " ,").split()
        assert all(len(bert.tokenize(w)) == 1 and len(clip.tokenize(w)) == 1 for w in words), caption
        logits, mask = one_hot_logits(bert, [caption], width=len(words) + 2)
        ids = clip([caption], padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            last, pooled = bridge(logits, mask)
            ref = encoder(ids)
        rel = (last - ref.last_hidden_state).norm() / ref.last_hidden_state.norm()
        assert rel <= 1e-3, (caption, float(rel))
        torch.testing.assert_close(pooled, ref.pooler_output, rtol=1e-4, atol=1e-4)


def test_index_is_cached_on_disk(bert_tokenizer, clip_tokenizer, tmp_path, monkeypatch):
    import recon.train.bridge as bridge_module

    first = vocab_index(bert_tokenizer, clip_tokenizer, tmp_path)
    assert list(tmp_path.glob("bridge/*/*.safetensors"))
    monkeypatch.setattr(
        bridge_module, "build_index", lambda *a, **k: pytest.fail("rebuilt despite the cache")
    )
    again = vocab_index(bert_tokenizer, clip_tokenizer, tmp_path)
    assert torch.equal(first.index, again.index) and first.coverage == again.coverage


def test_a_damaged_index_file_is_rebuilt_with_a_warning_naming_it(
    bert_tokenizer, clip_tokenizer, tmp_path, caplog
):
    from safetensors.torch import save as st_save

    first = vocab_index(bert_tokenizer, clip_tokenizer, tmp_path)
    (path,) = tmp_path.glob("bridge/*/*.safetensors")
    good = path.read_bytes()
    tampered = {
        "not safetensors": b"garbage",
        "torn": good[: len(good) // 2],
        "short": st_save({"index": first.index[:10].clone()}),
        "out of range": st_save({"index": first.index + 10**6}),
        "float": st_save({"index": first.index.float()}),
        "renamed": st_save({"other": first.index}),
    }
    for why, data in tampered.items():
        path.write_bytes(data)
        caplog.clear()
        with caplog.at_level("WARNING", logger="recon.runs"):
            again = vocab_index(bert_tokenizer, clip_tokenizer, tmp_path)
        assert torch.equal(again.index, first.index) and again.coverage == first.coverage, why
        assert str(path) in caplog.text and "damaged" in caplog.text, why
        assert path.read_bytes() == good, why  # rebuilt in place


def test_identical_vocabularies_map_to_themselves(clip_tokenizer):
    vocab = clip_tokenizer.get_vocab()
    index = build_index(vocab, vocab, {49406, 49407})
    mapped = index != UNMAPPED
    assert torch.equal(index[mapped], torch.arange(len(vocab))[mapped]) and int((~mapped).sum()) == 2


@pytest.mark.parametrize("variant", ["prob", "logit", "gumbel"])
def test_one_hot_bridge_equals_text_encoder_exactly(variant, clip_tokenizer, text_encoder):
    index = vocab_index(clip_tokenizer, clip_tokenizer, None)
    bridge = SoftTokenBridge(index, text_encoder, clip_tokenizer, BridgeConfig(variant=variant))
    captions = ["a red circle", "two dogs on a couch in the living room", ""]
    logits, mask = one_hot_logits(clip_tokenizer, captions)
    ids = clip_tokenizer(
        captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        last, pooled = bridge(logits, mask, torch.Generator().manual_seed(0))
        ref = text_encoder(ids)
    assert torch.equal(last, ref.last_hidden_state)
    assert torch.equal(pooled, ref.pooler_output)


def test_wrapper_pools_where_clip_does(clip_tokenizer, text_encoder):
    wrapper = TextEncoderFromEmbeddings(text_encoder)
    ids = clip_tokenizer(
        ["a photo of a cat", "a dog"], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        last, pooled = wrapper(wrapper.token_embedding()(ids), wrapper.pooled_positions(ids))
        ref = text_encoder(ids)
    assert torch.equal(last, ref.last_hidden_state) and torch.equal(pooled, ref.pooler_output)
    assert not list(wrapper.parameters())  # the text encoder is not a submodule: never saved or trained twice


def test_layout_bos_eos_padding_and_truncation(clip_tokenizer, text_encoder):
    index = vocab_index(clip_tokenizer, clip_tokenizer, None)
    bridge = SoftTokenBridge(index, text_encoder, clip_tokenizer)
    mask = torch.zeros(2, 100, dtype=torch.bool)
    mask[0, 3:6] = True  # 3 caption tokens
    mask[1, :] = True  # 100: truncated to 75
    ids, (b, t), slot, eos = bridge.layout(mask)
    assert ids.shape == (2, 77) and (ids[:, 0] == 49406).all()
    assert eos.tolist() == [4, 76] and ids[0, 4] == 49407 and ids[1, 76] == 49407
    assert (ids[0, 5:] == clip_tokenizer.pad_token_id).all()
    assert slot[b == 0].tolist() == [1, 2, 3] and t[b == 0].tolist() == [3, 4, 5]
    assert slot[b == 1].tolist() == list(range(1, 76))


def test_prob_logit_and_unk_variants(bert_index, bert_tokenizer, clip_tokenizer, text_encoder):
    torch.manual_seed(0)
    logits = torch.randn(5, len(bert_tokenizer))
    prob = SoftTokenBridge(bert_index, text_encoder, clip_tokenizer, BridgeConfig(variant="prob"))
    logit = SoftTokenBridge(bert_index, text_encoder, clip_tokenizer, BridgeConfig(variant="logit"))
    unk = SoftTokenBridge(
        bert_index, text_encoder, clip_tokenizer, BridgeConfig(variant="prob", unmapped="unk")
    )
    q_prob, q_logit, q_unk = (b.clip_distribution(logits) for b in (prob, logit, unk))
    mapped = bert_index.mapped
    assert (q_prob[:, ~mapped] == 0).all() and (q_logit[:, ~mapped] == 0).all()
    torch.testing.assert_close(q_logit, q_prob / q_prob.sum(-1, keepdim=True))  # logit == prob renormalised
    p_unk = torch.softmax(logits, -1)[:, bert_index.unk_id]
    torch.testing.assert_close(q_unk[:, ~mapped], p_unk[:, None].expand(-1, int((~mapped).sum())))


def test_gumbel_is_straight_through(bert_index, bert_tokenizer, clip_tokenizer, text_encoder):
    bridge = SoftTokenBridge(bert_index, text_encoder, clip_tokenizer, BridgeConfig(variant="gumbel"))
    logits = torch.randn(4, len(bert_tokenizer), requires_grad=True)
    emb = bridge.soft_embeddings(logits, torch.Generator().manual_seed(1))
    table = text_encoder.get_input_embeddings().weight
    hard = ((emb.detach()[:, None, :] == table[None]).all(-1)).any(-1)
    assert hard.all()  # every forward embedding is exactly one row of the table
    emb.pow(2).sum().backward()
    assert logits.grad.abs().sum() > 0


def test_caption_positions_excludes_end_token():
    labels = torch.tensor([[-100, -100, 5, 6, 102, -100]])
    assert caption_positions(labels, 102).tolist() == [[False, False, True, True, False, False]]


@pytest.mark.parametrize(
    "variant,unmapped", [("prob", "drop"), ("logit", "drop"), ("prob", "unk"), ("logit", "unk")]
)
def test_per_token_evaluation_equals_the_clip_vocabulary_definition(
    variant, unmapped, bert_index, bert_tokenizer, clip_tokenizer, text_encoder
):
    bridge = SoftTokenBridge(
        bert_index,
        text_encoder,
        clip_tokenizer,
        BridgeConfig(variant=variant, unmapped=unmapped, temperature=0.7),
    )
    torch.manual_seed(0)
    logits = torch.randn(6, len(bert_tokenizer)) * 3
    explicit = bridge.clip_distribution(logits) @ text_encoder.get_input_embeddings().weight
    torch.testing.assert_close(bridge.soft_embeddings(logits), explicit, rtol=1e-4, atol=1e-6)
