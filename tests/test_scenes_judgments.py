"""The scenes judgment set: categories whose errors are exactly what they say, in readable released formats."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from recon.scoring import metaeval_formats as mf
from recon.shapes import scenes as S
from recon.shapes import scenes_judgments as J


def _bag(caption: str) -> Counter:
    return Counter(caption.replace(",", "").split())


@pytest.fixture(scope="module")
def built():
    return J.build_scenes(120, seed=3)


def test_every_category_occurs_and_only_swaps_keep_the_bag_of_words(built):
    seen = Counter()
    for s in built:
        truth = {c["code"]: c["caption"] for c in s["candidates"]}
        for c in s["candidates"]:
            if c["category"] is None:
                continue
            seen[c["category"]] += 1
            true = truth["true-count" if c["category"] == "count-change" else "true-detailed"]
            assert c["caption"] != true
            assert (_bag(c["caption"]) == _bag(true)) == (c["category"] in J.SWAPS), (c, true)
    assert set(seen) == set(J.CATEGORIES) and min(seen.values()) > 40


def test_each_candidate_is_wrong_exactly_as_its_category_says(built):
    for s in built:
        scene = s["scene"]
        for c in s["candidates"]:
            claims = S.parse_caption(c["caption"])
            scores = S.score_claims(claims, scene)
            assert scores["exact"] == (c["category"] is None), c
            assert c["wrong"] == {None: 0, "binding-swap": 2, "relation-swap": 2}.get(c["category"], 1)
            if c["category"] == "binding-swap":
                assert scores["attribute_f1"] == 1.0 and scores["binding"] < 1.0
            if c["category"] == "relation-swap":
                assert scores["object_f1"] == 1.0 and scores["relation"] < 1.0
            if c["category"] == "count-change":
                assert scores["count"] < 1.0 and not any(o.cell for o in claims.objects)
            if c["category"] == "omission":
                assert len(claims.objects) == len(scene.objects) - 1 and scores["relation"] == 1.0
            if c["category"] == "hallucination":
                assert len(claims.objects) == len(scene.objects) + 1
        for ref in s["refs"]:
            assert S.exact_match(S.parse_caption(ref), scene)


def test_the_files_read_back_in_their_formats(tmp_path):
    paths = J.write_judgment_set(tmp_path, 8, seed=2)
    manifest = json.loads((tmp_path / J.MANIFEST).read_text())
    n_candidates = sum(len(s["candidates"]) for s in manifest["scenes"])
    refs = mf.read_references(paths["refs"])
    expert = mf.read_expert(paths["expert"], refs)
    assert len(expert.ratings) == 3 * n_candidates and not expert.notes  # no candidate is a reference
    assert {r.human for r in expert.ratings} == {4.0, 3.0, 2.0}
    pascal = mf.read_pascal50s(paths["pascal50s"])
    assert pascal.categories == list(J.CATEGORIES)
    assert len(pascal.pairs) == n_candidates - 2 * 8  # one pair per altered candidate
    for p in pascal.pairs:
        image = next(s for s in J.build_scenes(8, seed=2) if s["image"] == p.better.image)
        assert S.exact_match(S.parse_caption(p.better.caption), image["scene"])
        assert not S.exact_match(S.parse_caption(p.worse.caption), image["scene"])
    foil = mf.read_foil(paths["foil"])
    assert len(foil.pairs) == 8 and {p.category for p in foil.pairs} == {"foil"}
    assert J.write_judgment_set(tmp_path, 8, seed=2) == paths  # the same set is reused


def test_metaeval_scenes_end_to_end_on_tiny_models(tmp_path, tiny_models):
    from recon.cli import main

    out = tmp_path / "me"
    args = [
        "metaeval",
        "--scenes",
        "2",
        "--preset",
        "tiny-random",
        "--out",
        str(out),
        "--no-progress",
        "--resamples",
        "50",
        "--set",
        "generator.num_inference_steps=2",
        "--set",
        "run.batch_size=16",
        "--set",
        "generator.images_per_caption=1",
        "--set",
        "generator.height=32",
        "--set",
        "generator.width=32",
    ]
    assert main([*args, "--metrics", "recon,clipscore"]) == 0
    res = json.loads((out / "metaeval.json").read_text())
    assert list(res["sets"]) == ["expert", "pascal50s", "foil"]
    pascal = res["sets"]["pascal50s"]
    assert pascal["categories"] == list(J.CATEGORIES)
    judged = {
        c for c in J.CATEGORIES if c in pascal["rows"]["clipscore"]
    }  # two scenes need not allow all six
    assert len(judged) >= 3 and set(pascal["paired_by_category"]) == judged
    assert "reconstruction minus text-side score" in (out / "metaeval.md").read_text()
    with pytest.raises(SystemExit):  # one built-in set at a time
        main([*args, "--shapes", "2"])


# ---------------------------------------------------------------------------------------------- the shipped bundle
def test_the_shipped_judge_reads_rendered_scenes_exactly():
    from recon.hub import builtin_path
    from recon.shapes.scenes_train import load_judge, render_scenes

    judge = load_judge(builtin_path("builtin:scenes/judge"))
    truth, x = render_scenes(5, "test", 3, 200, n_objects=(0, 1, 2, 3, 4))
    judged = judge.predict(x)
    assert all(S.exact_match(S.claims_of(t, "detailed"), j) for t, j in zip(truth, judged))


def test_scenes_eval_command_reports_every_number(tmp_path, capsys):
    from recon.cli import main

    assert main(["scenes", "eval", "--n", "3", "--n-generate", "2", "--threads", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    for split in ("test", "heldout"):
        r = result[split]
        for key in (
            "captioner_exact",
            "generator_exact",
            "clip_single_attribute",
            "clip_binding_swap",
            "judge_exact_on_renders",
            "weak_captioner_exact",
        ):
            assert 0.0 <= r[key] <= 1.0, (split, key)
    assert set(result["bars"]) <= set(result["test"])


@pytest.mark.slow
def test_the_shipped_scenes_bundle_meets_its_bars(capsys):
    """`recon scenes eval` on 100 unseen scenes: the bars of recon.shapes.scenes_eval (a few CPU-minutes)."""
    from recon.cli import main
    from recon.shapes.scenes_eval import BARS

    assert main(["scenes", "eval", "--n", "100", "--seed", "7", "--threads", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {k: result["test"][k] for k in BARS if result["test"][k] < BARS[k]} == {}
