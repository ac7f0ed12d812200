"""The compositional scenes world: sampling, rendering, held-out pairs, the caption parser and the exact scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recon.shapes import scenes as S
from recon.shapes import scenes_train

Obj = S.SceneObject


def scene(background: str, *objects: tuple[str, str, str, str], template: int = 0) -> S.Scene:
    """``objects`` as (size, colour, shape, cell), in any order; stored sorted by cell as sampling stores them."""
    objs = sorted(
        (Obj(shape, color, size, cell) for size, color, shape, cell in objects),
        key=lambda o: S.CELLS.index(o.cell),
    )
    return S.Scene(background, tuple(objs), template)


RED_CIRCLE_LEFT_OF_BLUE_SQUARE = scene(
    "white", ("small", "red", "circle", "top left"), ("small", "blue", "square", "top right")
)


# ----------------------------------------------------------------------------------------------- world
def test_sampling_and_rendering_are_deterministic_per_seed():
    a = S.render_batch(S.sample_scenes(24, seed=3))
    b = S.render_batch(S.sample_scenes(24, seed=3))
    c = S.render_batch(S.sample_scenes(24, seed=4))
    assert a.shape == (24, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert S.sample_scenes(5, 3, stream=1) != S.sample_scenes(5, 3, stream=2)
    assert [len(s.objects) for s in S.sample_scenes(50, 0, n_objects=2)] == [2] * 50


def test_objects_stay_inside_their_cells():
    """The judge reads cell by cell: a cell without an object is pure background, even at the largest jitter."""
    for dx, dy in ((1, 1), (-1, -1), (1, -1)):
        obj = Obj("cross", "red", "large", "top left", dx=dx * S.JITTER_PX, dy=dy * S.JITTER_PX, scale=1.06)
        img = S.render(S.Scene("black", (obj,)))
        rest = np.concatenate([img[:, 16:].reshape(-1, 3), img[16:, :16].reshape(-1, 3)])
        assert (rest == S.BACKGROUNDS["black"]).all()
        assert (img[:16, :16] != S.BACKGROUNDS["black"]).any(axis=-1).sum() > 50


def test_heldout_pairs_never_in_train_and_always_in_heldout():
    assert len(S.HELDOUT_PAIRS) == 21
    train = S.sample_scenes(3000, 0, "train") + S.sample_scenes(500, 0, "test")
    assert not any(s.is_heldout() for s in train)
    pairs = {p for s in train for p in S._type_pairs(s.objects)}
    assert pairs.isdisjoint(S.HELDOUT_PAIRS)
    assert {(o.color, o.shape) for s in train for o in s.objects} == set(S.TYPES)  # every type is seen
    held = S.sample_scenes(300, 0, "heldout")
    assert all(s.is_heldout() and len(s.objects) >= 2 for s in held)
    with pytest.raises(ValueError):
        S.sample_scenes(1, 0, "heldout", n_objects=1)


def test_relations():
    assert S.relation("top left", "top right") == "left of"
    assert S.relation("top right", "top left") == "right of"
    assert S.relation("top left", "bottom left") == "above"
    assert S.relation("bottom right", "top left") == "below right of"
    assert len(S.RELATIONS) == 8


def test_every_caption_word_is_one_bert_wordpiece_and_at_most_two_clip_bpe_tokens():
    import gzip
    import importlib.util
    from pathlib import Path

    from recon.tokenizers import make_blip_tokenizer

    bert = make_blip_tokenizer()  # the captioner's vocabulary
    # The generator's / CLIP's BPE vocabulary, read from open_clip's file (importing open_clip takes seconds).
    bpe = Path(importlib.util.find_spec("open_clip").origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = (
        {"".join(m.split()) for m in merges} | set(letters) | {c + "</w>" for c in letters}
    )  # + byte tokens
    for word in S.caption_vocabulary():
        assert bert.tokenize(word) == [word]
        assert word + "</w>" in tokens or any(
            word[:k] in tokens and word[k:] + "</w>" in tokens for k in range(1, len(word))
        ), word


# ----------------------------------------------------------------------------------------------- parser
@pytest.mark.parametrize("template", S.TEMPLATES)
def test_parser_round_trips_every_template(template):
    batch = S.sample_scenes(400, 5, "train", n_objects=(0, 1, 2, 3, 4)) + S.sample_scenes(100, 5, "heldout")
    for s in batch:
        caption = S.caption_for(s, template)
        claims = S.parse_caption(caption)
        assert claims == S.claims_of(s, template), caption
        assert S.exact_match(claims, s), caption
        scores = S.score_claims(claims, s)
        assert all(v in (None, 1.0) for v in scores.values()), (caption, scores)


def test_templates_read_as_intended():
    s = RED_CIRCLE_LEFT_OF_BLUE_SQUARE
    assert (
        S.caption_for(s, "relational")
        == "a small red circle left of a small blue square on a white background"
    )
    assert S.caption_for(s, "count") == "a small red circle and a small blue square on a white background"
    assert S.caption_for(s, "detailed") == (
        "in the top left a small red circle and in the top right a small blue square on a white background"
    )
    two = scene(
        "gray",
        ("large", "green", "triangle", "top left"),
        ("large", "green", "triangle", "bottom right"),
        ("small", "red", "cross", "top right"),
    )
    assert (
        S.caption_for(two, "count") == "two large green triangles and a small red cross on a gray background"
    )
    assert S.parse_caption(
        "Two large green triangles, and a small red cross; gray background."
    ) == S.claims_of(two, "count")


def test_parser_is_tolerant_of_model_output():
    c = S.parse_caption("a red circle left of a large square")
    assert c.background is None
    assert c.objects == (S.Claim(None, "red", "circle"), S.Claim("large", None, "square"))
    assert c.relations == ((0, "left of", 1),)
    assert S.parse_caption("").objects == ()
    # A cell names the object it follows, or else the next one.
    after = S.parse_caption("a red circle in the top left and two blue squares")
    before = S.parse_caption("in the top left a red circle and two blue squares")
    assert (
        after.objects
        == before.objects
        == (
            S.Claim(None, "red", "circle", "top left"),
            S.Claim(None, "blue", "square"),
            S.Claim(None, "blue", "square"),
        )
    )


def test_templates_can_be_chosen_and_weighted():
    assert {s.template for s in S.sample_scenes(60, 0, templates=("detailed",))} == {
        S.TEMPLATES.index("detailed")
    }
    mixed = [
        S.TEMPLATES[s.template] for s in S.sample_scenes(600, 0, templates=("detailed", "detailed", "count"))
    ]
    assert set(mixed) == {"detailed", "count"} and 0.6 < mixed.count("detailed") / 600 < 0.73
    with pytest.raises(ValueError, match="templates"):
        S.sample_scenes(1, 0, templates=("poem",))


# ----------------------------------------------------------------------------------------------- scores
def test_binding_swap_keeps_the_bag_of_words_and_fails_binding():
    s = RED_CIRCLE_LEFT_OF_BLUE_SQUARE
    swapped = S.parse_caption("a small blue circle left of a small red square on a white background")
    assert sorted(S.caption_for(s, 0).split()) == sorted(
        "a small blue circle left of a small red square on a white background".split()
    )
    scores = S.score_claims(swapped, s)
    assert scores["attribute_f1"] == 1.0 and scores["count"] == 0.0
    assert scores["object_f1"] == 0.0 and scores["binding"] == pytest.approx(
        4 / 6
    )  # colour-shape pairs wrong
    assert scores["relation"] == 0.0 and scores["exact"] == 0.0


def test_relation_swap_fails_only_the_relation():
    s = RED_CIRCLE_LEFT_OF_BLUE_SQUARE
    scores = S.score_claims(
        S.parse_caption("a small blue square left of a small red circle on a white background"), s
    )
    assert scores == {
        "exact": 0.0,
        "object_f1": 1.0,
        "attribute_f1": 1.0,
        "binding": 1.0,
        "relation": 0.0,
        "count": 1.0,
    }
    right = S.parse_caption("a small blue square right of a small red circle on a white background")
    assert S.score_claims(right, s)["exact"] == 1.0


def test_count_omission_hallucination_and_single_errors():
    s = RED_CIRCLE_LEFT_OF_BLUE_SQUARE
    two = S.parse_caption("two small red circles and a small blue square on a white background")
    assert S.count_accuracy(two, s) == 0.5 and S.object_f1(two, s) == pytest.approx(2 * 2 / 5)
    assert not S.exact_match(two, s)
    omitted = S.parse_caption("a white background with a small red circle in the top left")
    assert S.object_f1(omitted, s) == pytest.approx(2 / 3) and S.relation_accuracy(omitted, s) == 1.0
    assert not S.exact_match(omitted, s)
    extra = S.parse_caption(
        "a small red circle, a small blue square and a large green cross on a white background"
    )
    assert S.object_f1(extra, s) == pytest.approx(0.8) and S.count_accuracy(extra, s) == pytest.approx(2 / 3)
    wrong_cell = S.parse_caption(
        "a white background with a small red circle in the top left and a small blue "
        "square in the bottom right"
    )
    assert S.relation_accuracy(wrong_cell, s) == 0.5 and S.object_f1(wrong_cell, s) == 1.0
    wrong_bg = S.parse_caption("a small red circle left of a small blue square on a black background")
    assert S.score_claims(wrong_bg, s) == {**S.score_claims(S.claims_of(s, 0), s), "exact": 0.0}
    wrong_colour = S.parse_caption("a small green circle left of a small blue square on a white background")
    assert S.binding_accuracy(wrong_colour, s) == pytest.approx(4 / 6)
    assert S.attribute_f1(wrong_colour, s) == pytest.approx(5 / 6)


def test_exact_match_with_identical_objects_needs_a_consistent_assignment():
    s = scene(
        "white",
        ("small", "red", "circle", "top left"),
        ("small", "red", "circle", "bottom right"),
        ("large", "blue", "cross", "top right"),
    )
    ok = S.parse_caption(
        "a small red circle above left of a small red circle, which is below a large blue cross "
        "on a white background"
    )
    assert S.exact_match(ok, s)
    # Each relation holds for some pair of objects (relation accuracy 1), but no one assignment makes both hold.
    bad = S.parse_caption(
        "a small red circle above left of a small red circle, which is left of a large blue cross "
        "on a white background"
    )
    assert S.relation_accuracy(bad, s) == 1.0 and not S.exact_match(bad, s)


# ----------------------------------------------------------------------------------------------- judge
def test_cell_crops_are_in_reading_order():
    x = torch.zeros(2, 3, 32, 32)
    for i in range(len(S.CELLS)):
        r, c = divmod(i, 2)
        x[:, :, r * 16 : (r + 1) * 16, c * 16 : (c + 1) * 16] = i
    crops = scenes_train.cell_crops(x)
    assert crops.shape == (8, 3, 16, 16)
    assert [int(crops[k].mean()) for k in range(8)] == [0, 1, 2, 3] * 2


def test_judge_report_and_targets_agree_with_the_truth():
    batch = S.sample_scenes(20, 0, n_objects=(0, 1, 2, 3, 4))
    report = scenes_train.judge_report(batch, batch)
    assert all(v in (None, 1.0) for v in report.values())
    y = scenes_train.judge_targets(batch)
    assert (y["shape"] > 0).sum(1).tolist() == [len(s.objects) for s in batch]
    wrong = [S.Scene(s.background, s.objects[1:]) if s.objects else s for s in batch]
    assert scenes_train.judge_report(wrong, batch)["exact_scene"] < 1.0


# ----------------------------------------------------------------------------------------------- captioner
def test_captioner_token_set_covers_every_scenes_caption_word():
    from recon.shapes import models
    from recon.tokenizers import make_blip_tokenizer

    tok = make_blip_tokenizer()
    used = set(models.captioner_token_ids(tok, scenes_train.captioner_texts()))
    batch = [
        s for t in S.TEMPLATES for s in S.sample_scenes(200, 0, n_objects=(0, 1, 2, 3, 4), templates=(t,))
    ]
    for s in batch:
        assert set(tok(s.caption, add_special_tokens=False).input_ids) <= used, s.caption
        # [DEC] + caption + [SEP] fits the captioner's position embeddings
        assert len(tok(s.caption).input_ids) <= scenes_train.CAPTIONER_POSITIONS
    assert tok.sep_token_id in used


def test_scenes_captioner_trains_and_loads(tmp_path):
    import json

    from transformers import BlipForConditionalGeneration, BlipProcessor

    torch.set_num_threads(1)
    out, work = tmp_path / "bundle", tmp_path / "work"
    from recon.cli import main

    assert (
        main(
            [
                "scenes",
                "train",
                "--component",
                "captioner",
                "--out",
                str(out),
                "--work",
                str(work),
                "--objects",
                "1,2",
                "--templates",
                "detailed",
                "--steps",
                "2",
                "--batch",
                "4",
            ]
        )
        == 0
    )
    model = BlipForConditionalGeneration.from_pretrained(out / "captioner")
    processor = BlipProcessor.from_pretrained(out / "captioner")
    assert model.config.text_config.max_position_embeddings == scenes_train.CAPTIONER_POSITIONS
    record = json.loads((out / "training" / "captioner.json").read_text())
    assert record["steps"] == 2 and set(record["validation"]) == {"exact", "object_f1", "names_cells"}
    truth = S.sample_scenes(2, 0, "test", n_objects=(1, 2))
    captions = scenes_train.caption_scenes(model.eval(), processor, truth, max_new_tokens=5)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
