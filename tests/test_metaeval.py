"""recon metaeval: the readers of the released judgment formats, the statistics (against SciPy and by hand), clear
errors for malformed rows, the exact shapes judgment set, and the command end to end on tiny random models."""

import json

import numpy as np
import pytest
import scipy.io
import scipy.stats

from recon.data import DataError
from recon.scoring import metaeval_formats as mf
from recon.scoring.metaeval import pair_table, prepare, rating_table
from recon.scoring.metaeval_report import metaeval_html, metaeval_markdown

TOKENS = (
    "a.jpg#0\ta dog runs\n"
    "a.jpg#1\ta brown dog  running on grass\n"
    "b.jpg#0\ta man on a horse\n"
    "b.jpg#1\ta person rides\n"
    "c.jpg#0\ta cat sleeps\n"
)


@pytest.fixture()
def flickr(tmp_path):
    (tmp_path / "Flickr8k.token.txt").write_text(TOKENS)
    return tmp_path, mf.read_references(tmp_path / "Flickr8k.token.txt")


# ------------------------------------------------------------------------------------------------ readers
def test_expert_reader_gives_three_rows_per_caption_and_skips_references(flickr):
    root, refs = flickr
    (root / "ExpertAnnotations.txt").write_text(
        "a.jpg\tb.jpg#0\t1\t2\t1\n"
        "a.jpg\ta.jpg#0\t4\t4\t4\n"  # its own reference: left out
        "\n"
        "b.jpg\tc.jpg#0\t1\t1\t2\n"
    )
    j = mf.read_expert(root / "ExpertAnnotations.txt", refs)
    assert [r.human for r in j.ratings] == [1, 2, 1, 1, 1, 2]
    assert {r.candidate.caption for r in j.ratings} == {"a man on a horse", "a cat sleeps"}
    assert j.ratings[0].candidate.refs == (
        "a dog runs",
        "a brown dog running on grass",
    )  # whitespace normalised
    assert j.ratings[-1].where.endswith("ExpertAnnotations.txt:4") and "1 candidates" in j.notes[0]


def test_crowdflower_reader_removes_judged_captions_from_references(flickr):
    root, refs = flickr
    (root / "CrowdFlowerAnnotations.txt").write_text(
        "a.jpg\ta.jpg#1\t0.666667\t2\t1\na.jpg\tc.jpg#0\t0\t0\t3\n"
    )
    j = mf.read_crowdflower(root / "CrowdFlowerAnnotations.txt", refs)
    assert [r.human for r in j.ratings] == pytest.approx([2 / 3, 0.0], abs=1e-6)
    assert all(r.candidate.refs == ("a dog runs",) for r in j.ratings)  # a.jpg#1 was judged: not a reference


def test_composite_reader_reads_mechanical_turk_rows(tmp_path, flickr):
    _, refs = flickr
    head = ";".join(
        [f"col{i}" for i in range(27)]
        + [
            "Input.image_url",
            "Input.text1",
            "Input.text2",
            "Input.text3",
            "Answer.1",
            "Answer.2",
            "Answer.3",
            "Approve",
        ]
    )
    junk = ";".join(["x, with a comma"] + ["3"] * 26)  # AMT columns before the image: numbers, commas
    path = tmp_path / "8k_correctness.csv"
    path.write_text(
        f"{head}\n{junk};http://host/img/a.jpg;a cat sleeps;a dog runs;a red bus;1;5;2;\n\n"
        f'{junk};http://host/img/c.jpg;"two dogs; one ball";a cat;4;3;\n'
    )
    j = mf.read_composite(path, refs)
    got = [(r.candidate.image, r.candidate.caption, r.human) for r in j.ratings]
    assert got == [
        ("a.jpg", "a cat sleeps", 1.0),
        ("a.jpg", "a dog runs", 5.0),
        ("a.jpg", "a red bus", 2.0),
        ("c.jpg", "two dogs; one ball", 4.0),
        ("c.jpg", "a cat", 3.0),
    ]
    assert j.ratings[0].candidate.refs == ("a brown dog running on grass",)  # the judged "a dog runs" removed
    assert j.ratings[0].where.endswith(":2") and j.ratings[-1].where.endswith(":4")


def _struct(rows, names):
    out = np.empty((1, len(rows)), dtype=[(n, object) for n in names])
    for i, r in enumerate(rows):
        out[0, i] = r
    return out


def _cell(x):  # a MATLAB 1x1 cell holding x, as consensus_pascal.mat stores its sentences
    c = np.empty((1, 1), dtype=object)
    c[0, 0] = x
    return c


def _write_pascal(folder, pairs, categories, triplets):
    folder.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(
        folder / "pair_pascal.mat",
        {
            "new_input": _struct(pairs, ("a", "b", "c")),
            "category": np.array([categories], float),
            "new_data": np.array([[6, 6]] * len(pairs), float),
        },
    )
    rows = [(_cell(r), _cell(a), _cell(b), float(w)) for r, a, b, w in triplets]
    scipy.io.savemat(folder / "consensus_pascal.mat", {"triplets": _struct(rows, ("A", "B", "C", "winner"))})
    return folder / "pair_pascal.mat"


def test_pascal50s_reader_takes_the_majority_and_samples_references(tmp_path):
    pairs = [("1.jpg", "cap one", "cap two"), ("2.jpg", "x y", "z w")]
    triplets = [
        ("r1", "cap one", "cap two", -1),
        ("r2", "cap two", "cap one", 1),
        ("r3", "cap one", "cap two", 1),
        ("s1", "x y", "z w", 1),
        ("s2", "x y", "z w", -1),
        ("s3", "z w", "x y", -1),
    ]
    path = _write_pascal(tmp_path / "p", pairs, [1, 3], triplets)
    j = mf.read_pascal50s(path.with_name("consensus_pascal.mat"), n_refs=0)
    assert [p.category for p in j.pairs] == ["HC", "HM"] and j.categories == ["HC", "HI", "HM", "MM"]
    assert (j.pairs[0].better.caption, j.pairs[0].worse.caption) == (
        "cap two",
        "cap one",
    )  # two votes of three
    assert j.pairs[0].better.refs == ("r1", "r2", "r3") and j.pairs[1].better.image == "2.jpg"
    assert (j.pairs[1].better.caption, j.pairs[1].worse.caption) == (
        "x y",
        "z w",
    )  # 2 of 3 (A in s3 is "z w")
    assert not j.notes
    sampled = mf.read_pascal50s(path, n_refs=2, seed=3).pairs[0].better.refs
    assert len(sampled) == 2 and set(sampled) <= {"r1", "r2", "r3"} and sampled == tuple(sorted(sampled))


def test_pascal50s_ties_are_broken_at_random_with_a_note(tmp_path):
    path = _write_pascal(
        tmp_path / "p", [("1.jpg", "a", "b")], [2], [("r1", "a", "b", 1), ("r2", "a", "b", -1)]
    )
    winners = {mf.read_pascal50s(path, seed=s).pairs[0].better.caption for s in range(12)}
    assert winners == {"a", "b"} and "1 pairs with tied human votes" in mf.read_pascal50s(path).notes[0]


def test_foil_reader_pairs_foils_with_their_original(tmp_path):
    data = {
        "images": [{"id": 7, "file_name": "COCO_7.jpg"}, {"id": 8, "file_name": "COCO_8.jpg"}],
        "annotations": [
            {"image_id": 7, "id": 1, "caption": "a dog on a sofa", "foil": False},
            {"image_id": 7, "id": 2, "caption": "a puppy resting", "foil": False},
            {"image_id": 7, "id": 1, "caption": "a cat on a sofa", "foil": True},
            {"image_id": 8, "id": 5, "caption": "a bus", "foil": True},
        ],
    }  # no original: left out
    (tmp_path / "foil.json").write_text(json.dumps(data))
    j = mf.read_foil(tmp_path / "foil.json")
    assert len(j.pairs) == 1
    p = j.pairs[0]
    assert (p.better.caption, p.worse.caption, p.better.image) == (
        "a dog on a sofa",
        "a cat on a sofa",
        "COCO_7.jpg",
    )
    assert p.better.refs == ("a puppy resting",) and "1 foils without an original" in j.notes[0]


@pytest.mark.parametrize(
    "name, text, where",
    [
        ("ExpertAnnotations.txt", "a.jpg\tb.jpg#0\t1\t2\t1\na.jpg\tb.jpg#0\t1\t2\n", "line 2"),
        ("ExpertAnnotations.txt", "a.jpg\tb.jpg#0\t1\t2\t1\n\na.jpg\tb.jpg#0\t1\tx\t1\n", "line 3"),
        ("ExpertAnnotations.txt", "a.jpg\tq.jpg#9\t1\t2\t1\n", "line 1"),
        ("CrowdFlowerAnnotations.txt", "a.jpg\tb.jpg#0\t1\t3\t0\na.jpg\tb.jpg#0\t0.5\t1\t2\n", "line 2"),
        ("8k_correctness.csv", "h;h\nx;http://h/a.jpg;a cat;a dog;5\n", "line 2"),
        ("8k_correctness.csv", "h;h\nx;y;z\n", "line 2"),
        (
            "foil.json",
            json.dumps(
                {
                    "annotations": [
                        {"image_id": 1, "id": 1, "caption": "a", "foil": False},
                        {"image_id": 1, "id": 1, "caption": "b"},
                    ]
                }
            ),
            "annotations[1]",
        ),
    ],
)
def test_a_malformed_row_names_the_file_and_the_line(flickr, name, text, where):
    root, refs = flickr
    (root / name).write_text(text)
    with pytest.raises(DataError) as e:
        mf.read_judgments(root / name, mf.detect_format(root / name), refs)
    assert str(root / name) in str(e.value) and where in str(e.value)


def test_malformed_token_file_and_pascal_triplet_name_file_and_place(tmp_path):
    (tmp_path / "t.txt").write_text("a.jpg#0\tok\nno tab here\n")
    with pytest.raises(DataError, match=r"t\.txt: line 2"):
        mf.read_references(tmp_path / "t.txt")
    path = _write_pascal(
        tmp_path / "p", [("1.jpg", "a", "b")], [1], [("r1", "a", "b", 1), ("r2", "a", "b", 0)]
    )
    with pytest.raises(DataError, match=r"consensus_pascal\.mat: triplet 1: winner"):
        mf.read_pascal50s(path)


# ---------------------------------------------------------------------------------------------- statistics
def test_kendall_taus_equal_scipy_and_the_hand_computed_values():
    x, human = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 2.0, 2.0, 3.0])
    # 6 pairs: 5 concordant, 1 tied in human only, none discordant; m = min(4, 3) distinct values
    tau_c = 2 * 5 / (4**2 * (3 - 1) / 3)
    tau_b = 5 / np.sqrt(6 * (6 - 1))
    for variant, hand in (("c", tau_c), ("b", tau_b)):
        t = rating_table({"m": x, "neg": -x}, human, np.array(["p", "q", "r", "s"]), variant, 200, 0)
        assert t["rows"]["m"]["value"] == pytest.approx(hand, abs=1e-12)
        assert t["rows"]["m"]["value"] == pytest.approx(
            scipy.stats.kendalltau(x, human, variant=variant).statistic
        )
        assert t["rows"]["neg"]["value"] == pytest.approx(-hand)
        assert t["paired"][0]["diff"] == pytest.approx(2 * hand) and t["paired"][0]["low"] > 0


def test_rating_bootstrap_resamples_whole_images_and_is_seeded():
    rng = np.random.default_rng(0)
    truth = rng.integers(1, 5, 40).astype(float)
    human = np.repeat(truth, 3)  # three judgments of each image's caption, as Expert's three scores
    x = np.repeat(truth + rng.normal(0, 1.5, 40), 3)
    clusters = np.repeat(np.arange(40), 3)
    a = rating_table({"m": x}, human, clusters, "c", 300, 1)
    assert a == rating_table({"m": x}, human, clusters, "c", 300, 1)
    both = rating_table({"m": x, "neg": -x}, human, clusters, "c", 300, 1)
    assert both["paired"][0]["p_value"] == pytest.approx(2 / 301)  # every resample above 0: the add-one p
    assert a["rows"]["m"]["low"] < a["rows"]["m"]["value"] < a["rows"]["m"]["high"]
    rows = rating_table({"m": x}, human, np.arange(120), "c", 300, 1)["rows"]["m"]  # rows as independent
    assert rows["high"] - rows["low"] < a["rows"]["m"]["high"] - a["rows"]["m"]["low"]


def test_pair_accuracy_counts_ties_half_and_pools_unequal_images():
    correct = {"m": np.array([1.0, 0.5, 0.0, 1.0, 1.0]), "n": np.array([0.0, 0.0, 1.0, 1.0, 0.0])}
    cats = np.array(["HC", "HC", "HI", "HI", "HI"])
    clusters = np.array(["i1", "i1", "i1", "i2", "i3"])
    t = pair_table(correct, cats, clusters, ["HC", "HI"], 200, 0)
    assert t["rows"]["m"]["all"]["value"] == pytest.approx(3.5 / 5)
    assert t["rows"]["m"]["HC"]["value"] == pytest.approx(0.75)
    assert t["rows"]["m"]["HI"]["value"] == pytest.approx(2 / 3)
    assert t["rows"]["m"]["all"]["n"] == 5 and t["rows"]["m"]["HC"]["n"] == 2
    assert t["paired"][0]["diff"] == pytest.approx(3.5 / 5 - 2 / 5)


def test_units_keep_an_image_per_reference_list_and_map_to_its_file(tmp_path):
    from PIL import Image

    from recon.scoring.inputs import build_items, read_caption_set, read_references

    images = tmp_path / "imgs"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "a.jpg")
    c = [
        mf.Candidate("a.jpg", "one", ("r",)),
        mf.Candidate("a.jpg", "two", ("r",)),
        mf.Candidate("a.jpg", "one", ("s",)),
    ]
    j = mf.Judgments(
        "pascal50s",
        tmp_path / "p.mat",
        pairs=[mf.Pair(c[0], c[1], "HC", "a", "x"), mf.Pair(c[2], c[1], "HC", "a", "y")],
    )
    prep = prepare("p", None, j, tmp_path / "in")
    assert prep.slot_of[c[0]] == ("c00", "a.jpg") and prep.slot_of[c[1]] == ("c01", "a.jpg")
    assert prep.slot_of[c[2]] == ("c00", "a.jpg#1") and prep.systems == ["c00", "c01"]
    refs = read_references(prep.refs)
    assert refs.refs == {"a.jpg": ["r"], "a.jpg#1": ["s"]}
    sets = [read_caption_set(p, s) for p, s in zip(prep.captions, prep.systems)]
    items = build_items(sets, images, refs)
    assert {(i.system, i.key, i.caption) for i in items} == {
        ("c00", "a.jpg", "one"),
        ("c00", "a.jpg#1", "one"),
        ("c01", "a.jpg", "two"),
    }
    assert all(i.error is None and i.path == images / "a.jpg" for i in items)


def test_reports_escape_file_names_and_notes():
    est = {"value": 0.5, "low": 0.4, "high": 0.6, "n": 3, "p_value": 0.1}
    s = {
        "format": "expert",
        "statistic": "kendall_tau_c",
        "files": ["<script>x</script>.txt"],
        "n": 3,
        "n_images": 1,
        "notes": ["caption <b>bold</b>"],
        "order": ["m|<i>", "k"],
        "categories": [],
        "rows": {"m|<i>": est, "k": est},
        "headline": {},
        "paired": [
            {"a": "m|<i>", "b": "k", "diff": 0.0, "low": 0.0, "high": 0.0, "p_value": 1.0, "p_holm": 1.0}
        ],
    }
    result = {
        "config": "c",
        "seed": 0,
        "confidence": 0.95,
        "n_resamples": 10,
        "notes": [],
        "sets": {"expert": s},
    }
    for text in (metaeval_markdown(result), metaeval_html(result)):
        assert "<script>" not in text and "<b>" not in text and "<i>" not in text and "&lt;script&gt;" in text


# ---------------------------------------------------------------------------------------------- shapes set
def test_the_shapes_judgment_set_is_exact(tmp_path):
    from recon.shapes.judgments import EXPERT_SCORE, PAIR_CATEGORIES, write_judgment_set
    from recon.shapes.world import ATTRIBUTES, parse_caption

    paths = write_judgment_set(tmp_path, 6, seed=1)
    truth = {
        s["image"]: s["attributes"] for s in json.loads((tmp_path / "judgments.json").read_text())["scenes"]
    }

    def wrong(c: mf.Candidate) -> int:
        parsed = parse_caption(c.caption)
        return sum(parsed[a] != truth[c.image][a] for a in ATTRIBUTES)

    refs = mf.read_references(paths["refs"])
    expert = mf.read_expert(paths["expert"], refs)
    assert len(expert.ratings) == 6 * 6 * 3 and not expert.notes  # no candidate is a reference
    assert sorted({wrong(r.candidate) for r in expert.ratings}) == [0, 1, 2, 3, 4, 5]
    assert all(r.human == EXPERT_SCORE[wrong(r.candidate)] for r in expert.ratings)
    crowd = mf.read_crowdflower(paths["crowdflower"], refs)
    assert all(r.human == pytest.approx(1 - wrong(r.candidate) / 5) for r in crowd.ratings)
    assert all(
        len(r.candidate.refs) == 3 and wrong(mf.Candidate(r.candidate.image, ref)) == 0
        for r in crowd.ratings
        for ref in r.candidate.refs
    )
    pascal = mf.read_pascal50s(paths["pascal50s"])
    assert pascal.categories == [c[0] for c in PAIR_CATEGORIES] and len(pascal.pairs) == 6 * 4
    for p in pascal.pairs:
        _, better, worse = next(c for c in PAIR_CATEGORIES if c[0] == p.category)
        assert (wrong(p.better), wrong(p.worse)) == (better, worse)
    foil = mf.read_foil(paths["foil"])
    assert len(foil.pairs) == 6 and all(wrong(p.better) == 0 and wrong(p.worse) == 1 for p in foil.pairs)
    assert all(p.better.refs == crowd.ratings[0].candidate.refs for p in foil.pairs[:1])


def test_metaeval_cli_end_to_end_on_tiny_models(tmp_path, tiny_models):
    from recon.cli import main
    from recon.runs import read_jsonl

    out = tmp_path / "me"
    args = [
        "metaeval",
        "--shapes",
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
        "run.batch_size=12",
        "--set",
        "generator.images_per_caption=1",
        "--set",
        "generator.height=32",
        "--set",
        "generator.width=32",
    ]
    assert main([*args, "--metrics", "recon,bleu"]) == 0
    res = json.loads((out / "metaeval.json").read_text())
    assert list(res["sets"]) == ["expert", "crowdflower", "pascal50s", "foil"]
    # the statistic recomputed from the score runs' records and the judgment file, with SciPy
    slots = {}
    for f in sorted((out / "inputs" / "ExpertAnnotations").glob("c*.json")):
        slots.update({(f.stem, u): cap for u, cap in json.loads(f.read_text()).items()})
    recs = read_jsonl(out / "runs" / "ExpertAnnotations" / "recon" / "results.jsonl")[0]
    score_of = {
        (slots[(r["system"], r["image_id"])], r["image_id"]): r["scores"]["recon_clip_similarity"]
        for r in recs
    }
    token = dict(
        line.split("\t") for line in (out / "judgments" / "Shapes.token.txt").read_text().splitlines()
    )
    x, human = [], []
    for line in (out / "judgments" / "ExpertAnnotations.txt").read_text().splitlines():
        image, cid, *scores = line.split("\t")
        for s in scores:
            x.append(score_of[(token[cid], image)])
            human.append(float(s))
    expected = scipy.stats.kendalltau(x, human, variant="c").statistic
    assert res["sets"]["expert"]["rows"]["recon_clip_similarity"]["value"] == pytest.approx(
        expected, abs=1e-12
    )
    assert res["sets"]["expert"]["n"] == 2 * 6 * 3 and res["sets"]["pascal50s"]["n"] == 2 * 4
    for name in ("metaeval.md", "metaeval.html"):
        assert "recon_clip_similarity" in (out / name).read_text()

    # adding a metric scores only it: the reconstruction runs resume without generating
    before = (out / "runs" / "ExpertAnnotations" / "recon" / "results.jsonl").read_bytes()
    assert main([*args, "--metrics", "recon,bleu,clipscore"]) == 0
    assert (out / "runs" / "ExpertAnnotations" / "recon" / "results.jsonl").read_bytes() == before
    timing = json.loads((out / "runs" / "ExpertAnnotations" / "recon" / "timing.json").read_text())["seconds"]
    assert "generation" not in timing
    assert "clipscore" in json.loads((out / "metaeval.json").read_text())["sets"]["foil"]["rows"]

    # another shapes set into this --out: refused before its judgment files are rewritten
    manifest = (out / "judgments" / "judgments.json").read_bytes()
    assert main([*args[:2], "3", *args[3:], "--metrics", "clipscore"]) == 2
    assert (out / "judgments" / "judgments.json").read_bytes() == manifest


def test_cli_reports_a_malformed_row_as_one_line(flickr, capsys):
    from recon.cli import main

    root, _ = flickr
    (root / "ExpertAnnotations.txt").write_text("a.jpg\tb.jpg#0\t1\t2\t1\na.jpg\tb.jpg#0\t1\n")
    rc = main(
        [
            "metaeval",
            str(root / "ExpertAnnotations.txt"),
            "--images",
            str(root),
            "--refs",
            str(root / "Flickr8k.token.txt"),
            "--out",
            str(root / "out"),
            "--preset",
            "tiny-random",
        ]
    )
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert rc == 2 and len(err) == 1 and f"{root / 'ExpertAnnotations.txt'}: line 2" in err[0]
    assert main(["metaeval", "x.txt", "y.txt", "--images", "a", "--images", "b", "--images", "c"]) == 2
    assert "--images is given 3 times for 2 judgment files" in capsys.readouterr().err


# ------------------------------------------------------------------- issue 21: judgment readers' rules
def test_composite_splits_by_position_so_a_numeric_caption_stays_a_caption(tmp_path, flickr):
    _, refs = flickr
    path = tmp_path / "8k_correctness.csv"
    path.write_text("h;h\nx;http://h/a.jpg;a cat;42;a red bus;1;5;2;;\n")
    got = [(r.candidate.caption, r.human) for r in mf.read_composite(path, refs).ratings]
    assert got == [("a cat", 1.0), ("42", 5.0), ("a red bus", 2.0)]


@pytest.mark.parametrize(
    "row, message",
    [
        (
            "x;http://h/a.jpg;a cat;a dog;5;4;3",
            "found 5 fields after the image",
        ),  # one rating more than captions
        (
            "x;http://h/a.jpg;a cat;a dog;5;4;3;2",
            "caption '5' is a rating on the scale 1-5",
        ),  # 2 captions, 4 ratings
        ("x;http://h/a.jpg;a cat;a dog;5;6", "rating 6 is outside the set's scale 1-5"),
        ("x;http://h/a.jpg;a cat;a dog;0;3", "rating 0 is outside the set's scale 1-5"),
    ],
)
def test_composite_rows_with_extra_or_off_scale_ratings_are_errors(tmp_path, flickr, row, message):
    _, refs = flickr
    path = tmp_path / "8k_correctness.csv"
    path.write_text(f"h;h\n{row}\n")
    with pytest.raises(DataError, match=f"{path}: line 2: .*") as e:
        mf.read_composite(path, refs)
    assert message in str(e.value)


def test_expert_scores_off_the_scale_are_errors(flickr):
    root, refs = flickr
    (root / "ExpertAnnotations.txt").write_text("a.jpg\tb.jpg#0\t1\t2\t1\nb.jpg\tc.jpg#0\t1\t5\t2\n")
    with pytest.raises(
        DataError, match=r"ExpertAnnotations\.txt: line 2: expert score 5 is outside the set's scale 1-4"
    ):
        mf.read_expert(root / "ExpertAnnotations.txt", refs)


def test_pascal50s_without_triplets_is_an_error_not_coin_flips(tmp_path):
    path = _write_pascal(tmp_path / "p", [("1.jpg", "a", "b")], [1], [])
    with pytest.raises(DataError, match=r"consensus_pascal\.mat: no triplets"):
        mf.read_pascal50s(path)


# Repeated keys: an exact repeat is read once and counted in the notes; a repeat with other values is an error naming
# the file and both lines.
def test_a_repeated_expert_row_is_read_once_and_a_conflicting_one_is_an_error(flickr):
    root, refs = flickr
    path = root / "ExpertAnnotations.txt"
    path.write_text("a.jpg\tb.jpg#0\t1\t2\t1\nb.jpg\tc.jpg#0\t1\t1\t2\na.jpg\tb.jpg#0\t1\t2\t1\n")
    j = mf.read_expert(path, refs)
    assert (
        len(j.ratings) == 6 and "1 exact repeats of an earlier image and caption id read once" in j.notes[0]
    )
    path.write_text("a.jpg\tb.jpg#0\t1\t2\t1\na.jpg\tb.jpg#0\t4\t4\t4\n")
    with pytest.raises(DataError, match=r"ExpertAnnotations\.txt: line 2: .*other values than at line 1"):
        mf.read_expert(path, refs)
    (root / "CrowdFlowerAnnotations.txt").write_text("a.jpg\tb.jpg#0\t1\t3\t0\na.jpg\tb.jpg#0\t0\t0\t3\n")
    with pytest.raises(DataError, match=r"CrowdFlowerAnnotations\.txt: line 2: .*line 1"):
        mf.read_crowdflower(root / "CrowdFlowerAnnotations.txt", refs)


def test_a_token_file_with_repeated_caption_ids(tmp_path):
    (tmp_path / "t.txt").write_text(TOKENS + "a.jpg#0\ta dog  runs\n")  # the same caption again
    refs = mf.read_references(tmp_path / "t.txt")
    assert (
        refs.of("a.jpg") == ["a dog runs", "a brown dog running on grass"]
        and "1 exact repeats" in refs.notes[0]
    )
    (tmp_path / "t.txt").write_text(TOKENS + "a.jpg#0\ta cat\n")
    with pytest.raises(
        DataError,
        match=r"t\.txt: line 6: caption id 'a.jpg#0' again, with other values than at "
        r"line 1",
    ):
        mf.read_references(tmp_path / "t.txt")


def test_foil_repeated_image_ids(tmp_path):
    anns = [
        {"image_id": 7, "id": 1, "caption": "a dog on a sofa", "foil": False},
        {"image_id": 7, "id": 1, "caption": "a cat on a sofa", "foil": True},
    ]
    images = [{"id": 7, "file_name": "COCO_7.jpg"}, {"id": 7, "file_name": "COCO_7.jpg"}]
    (tmp_path / "foil.json").write_text(json.dumps({"images": images, "annotations": anns + anns[:1]}))
    j = mf.read_foil(tmp_path / "foil.json")
    assert (
        len(j.pairs) == 1 and j.pairs[0].better.refs == ()
    )  # the repeated original is not its own reference
    assert any("image id read once" in n for n in j.notes) and any("original caption" in n for n in j.notes)
    images[1]["file_name"] = "COCO_8.jpg"
    (tmp_path / "foil.json").write_text(json.dumps({"images": images, "annotations": anns}))
    with pytest.raises(
        DataError,
        match=r"foil\.json: images\[1\]: image id '7' again, with other values than at "
        r"images\[0\]",
    ):
        mf.read_foil(tmp_path / "foil.json")


# -------------------------------------------------------------- issue 21: clear errors naming the file
def test_deep_json_and_huge_ids_are_errors_naming_the_file(tmp_path):
    deep, huge = tmp_path / "deep_foil.json", tmp_path / "huge_foil.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    huge.write_text(
        json.dumps({"annotations": []})[:-2]
        + '[{"image_id": '
        + "1" * 5000
        + ', "id": 1, "caption": "a", "foil": false}]}'
    )
    with pytest.raises(DataError, match=f"{deep}: JSON nested too deeply"):
        mf.read_foil(deep)
    with pytest.raises(
        DataError, match=f"{huge}: cannot read a number .*4300 digits.*write long ids as strings"
    ):
        mf.read_foil(huge)


def test_a_matlab_v73_file_is_named_with_how_to_convert_it(tmp_path):
    # the 128-byte MAT header of an HDF5-based v7.3 file: version 0x0200 at byte 124
    header = (
        b"MATLAB 7.3 MAT-file, Platform: GLNXA64, HDF5 schema 1.00 .".ljust(116, b" ")
        + bytes(8)
        + b"\x00\x02IM"
    )
    (tmp_path / "pair_pascal.mat").write_bytes(header + bytes(512))
    with pytest.raises(
        DataError, match=r"pair_pascal\.mat: a MATLAB v7\.3 \(HDF5\) file.*save\(\.\.\., '-v7'\)"
    ):
        mf.read_pascal50s(tmp_path / "pair_pascal.mat")


# ---------------------------------------------------------- issue 21: one output directory, one set of inputs
TINY = ["--preset", "tiny-random", "--no-progress", "--resamples", "20", "--metrics", "clipscore"]


@pytest.fixture()
def judged(flickr):
    """An image folder, the token file, an Expert file and a Composite file over the same two images."""
    from PIL import Image

    root, _ = flickr
    for name, color in (("a.jpg", "red"), ("b.jpg", "blue")):
        Image.new("RGB", (32, 32), color).save(root / name)
    (root / "ExpertAnnotations.txt").write_text("a.jpg\tb.jpg#0\t1\t2\t1\nb.jpg\tc.jpg#0\t1\t1\t2\n")
    (root / "8k_correctness.csv").write_text(
        "h;h\nx;http://h/a.jpg;a cat;a dog runs;1;5\nx;http://h/b.jpg;a horse;a bus;4;1\n"
    )
    return root


def _tree(folder) -> dict:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_metaeval_out_holding_other_inputs_is_refused_up_front_naming_the_file(judged, tiny_models, capsys):
    from recon.cli import main

    root, out = judged, judged / "out"
    expert = [
        "metaeval",
        str(root / "ExpertAnnotations.txt"),
        "--images",
        str(root),
        "--refs",
        str(root / "Flickr8k.token.txt"),
        "--out",
        str(out),
        *TINY,
    ]
    assert main(expert) == 0
    capsys.readouterr()
    before = _tree(out)
    # another judgment set into the same --out: refused, metaeval.* of the first set kept
    assert (
        main(["metaeval", str(root / "8k_correctness.csv"), "--images", str(root), "--out", str(out), *TINY])
        == 2
    )
    err = capsys.readouterr().err
    assert (
        f"{out} holds the metaeval of other inputs: other judgment files: {root / '8k_correctness.csv'}"
        in err
    )
    assert _tree(out) == before
    # the same file changed: refused naming it, and its inputs/ untouched
    (root / "ExpertAnnotations.txt").write_text("a.jpg\tb.jpg#0\t4\t4\t4\nb.jpg\tc.jpg#0\t1\t1\t2\n")
    assert main(expert) == 2
    err = capsys.readouterr().err
    assert (
        f"{root / 'ExpertAnnotations.txt'} has changed since it was evaluated there" in err
        and "runs/" not in err
    )
    assert _tree(out) == before
    assert (
        main([*expert, "--limit", "1"]) == 2
        and "--limit 1 (it was made with no --limit)" in capsys.readouterr().err
    )
    assert _tree(out) == before


def test_metaeval_refuses_a_folder_a_running_job_holds_or_another_command_made(judged, capsys):
    from recon.cli import main
    from recon.runs import lock_run_dir

    root, out = judged, judged / "held"
    args = [
        "metaeval",
        str(root / "ExpertAnnotations.txt"),
        "--images",
        str(root),
        "--refs",
        str(root / "Flickr8k.token.txt"),
        "--out",
        str(out),
        *TINY,
    ]
    out.mkdir()
    lock = lock_run_dir(out)  # as a running `recon reconstruct --out held` holds it
    try:
        assert main(args) == 2
    finally:
        lock.close()
    assert f"{out} is in use by recon pid" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [".lock"]
    (out / "run.json").write_text(json.dumps({"command": "reconstruct"}))
    assert main(args) == 2
    assert (
        f"{out} holds a `recon reconstruct` run; `recon metaeval` needs its own --out"
        in capsys.readouterr().err
    )
    assert sorted(p.name for p in out.iterdir()) == [".lock", "run.json"]


def test_metaeval_reads_a_hidden_judgment_file_it_is_given(judged, tiny_models):
    from recon.cli import main

    root = judged
    (root / "8k_correctness.csv").rename(root / ".hidden_correctness.csv")
    assert (
        main(
            [
                "metaeval",
                str(root / ".hidden_correctness.csv"),
                "--images",
                str(root),
                "--out",
                str(root / "out"),
                *TINY,
            ]
        )
        == 0
    )
    res = json.loads((root / "out" / "metaeval.json").read_text())
    assert res["sets"]["composite"]["files"] == [str(root / ".hidden_correctness.csv")]
    assert res["sets"]["composite"]["n"] == 4
