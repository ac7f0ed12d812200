"""Caption-set scoring: reference metrics equal pycocoevalcap's, CLIPScore equals its formula, per-item problems are
recorded, runs resume, reports escape captions, and the CLI gives one-line errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from recon.config import load_config
from recon.pipeline import Reconstructor
from recon.runs import RunError, read_jsonl
from recon.scoring import caption_metrics as cm
from recon.scoring.run import parse_metrics, score_caption_sets

CANDS = {
    "1": "A red circle, on a white background.",
    "2": "two dogs play in the park",
    "3": "a man riding a horse on the beach",
}
REFS = {
    "1": ["a red circle on white", "A small red circle.", "red round shape on a white background"],
    "2": ["Two dogs are playing in a park.", "dogs running on grass"],
    "3": [
        "a person rides a horse along the beach",
        "a man on a horse near the sea",
        "horse riding at the shore",
    ],
}


def _direct(metrics, tokenize=True):
    """The pycocoevalcap calls COCOEvalCap.evaluate makes, on the toy set."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts = {k: [{"caption": c} for c in v] for k, v in REFS.items()}
    res = {k: [{"caption": c}] for k, c in CANDS.items()}
    if tokenize:
        gts, res = PTBTokenizer().tokenize(gts), PTBTokenizer().tokenize(res)
    else:
        gts = {k: [d["caption"] for d in v] for k, v in gts.items()}
        res = {k: [d["caption"] for d in v] for k, v in res.items()}
    out = {}
    for m in metrics:
        if m == "bleu":
            score, scores = Bleu(4).compute_score(gts, res, verbose=0)
            for n in range(4):
                out[f"bleu_{n + 1}"] = (score[n], scores[n])
        elif m == "meteor":
            from pycocoevalcap.meteor.meteor import Meteor

            out["meteor"] = Meteor().compute_score(gts, res)
        else:
            out[{"rouge": "rouge_l", "cider": "cider"}[m]] = {"rouge": Rouge, "cider": Cider}[
                m
            ]().compute_score(gts, res)
    return out


def _assert_same(ours: cm.ReferenceScores, direct: dict):
    for name, (corpus, per) in direct.items():
        assert ours.corpus[name] == pytest.approx(float(corpus), abs=1e-12), name
        assert [ours.per_item[k][name] for k in CANDS] == pytest.approx([float(v) for v in per], abs=1e-12), (
            name
        )


def test_bleu_rouge_cider_equal_pycocoevalcap_on_pretokenized_text():
    ours = cm.reference_metrics({"sys": CANDS}, REFS, ("bleu", "rouge", "cider"), tokenized=True)["sys"]
    _assert_same(ours, _direct(("bleu", "rouge", "cider"), tokenize=False))


def test_bleu_rouge_cider_equal_pycocoevalcap_with_its_ptb_tokenizer():
    # two caption sets at once: each is scored as its own COCO evaluation (CIDEr statistics per set)
    other = {"1": "a circle", "2": "a park", "3": "a horse"}
    ours = cm.reference_metrics({"sys": CANDS, "other": other}, REFS, ("bleu", "rouge", "cider"))
    _assert_same(ours["sys"], _direct(("bleu", "rouge", "cider")))
    assert ours["other"].corpus["cider"] != ours["sys"].corpus["cider"]


def test_corpus_bleu_from_per_item_statistics_equals_pycocoevalcap_on_every_subset():
    from pycocoevalcap.bleu.bleu import Bleu

    ours = cm.reference_metrics({"sys": CANDS}, REFS, ("bleu",), tokenized=True)["sys"]
    keys = list(CANDS)
    for subset in (
        keys,
        keys[:1],
        keys[1:],
        [keys[0], keys[0], keys[2]],
    ):  # a bootstrap resample repeats items
        got = cm.corpus_bleu([ours.bleu_stats[k] for k in subset])
        gts = {f"{n}": REFS[k] for n, k in enumerate(subset)}
        res = {f"{n}": [CANDS[k]] for n, k in enumerate(subset)}
        expected, _ = Bleu(4).compute_score(gts, res, verbose=0)
        assert got == pytest.approx(expected, abs=1e-12), subset
    assert [ours.corpus[f"bleu_{n}"] for n in range(1, 5)] == pytest.approx(
        cm.corpus_bleu(list(ours.bleu_stats.values())), abs=1e-12
    )
    resamples = [[ours.bleu_stats[k] for k in keys], [ours.bleu_stats[k] for k in (keys[0],) * 3]]
    batch = cm.corpus_bleu(resamples)  # [R, n, 10] -> [R, 4], each row the corpus BLEU of its resample
    assert batch == [pytest.approx(cm.corpus_bleu(r), abs=1e-12) for r in resamples]


@pytest.mark.slow  # METEOR's jar takes ~25 s to load its paraphrase tables
def test_meteor_equals_pycocoevalcap():
    ours = cm.reference_metrics({"sys": CANDS}, REFS, ("meteor",))["sys"]
    _assert_same(ours, _direct(("meteor",)))
    with_ci = cm.reference_metrics({"sys": CANDS}, REFS, ("meteor",), meteor_resamples=40)["sys"]
    _assert_same(
        with_ci, _direct(("meteor",))
    )  # the same corpus and per-item scores through the kept statistics
    lo, hi = with_ci.corpus_ci["meteor"]
    per = [with_ci.per_item[k]["meteor"] for k in CANDS]
    assert min(per) - 1e-9 <= lo <= with_ci.corpus["meteor"] <= hi <= max(per) + 1e-9 and lo < hi


def test_line_breaks_in_captions_do_not_shift_the_ptb_tokenizer():
    cands = {"1": "a red\rcircle\u2028on white", "2": "two\ndogs", "3": "a man"}
    ours = cm.reference_metrics({"s": cands}, REFS, ("bleu",))["s"]
    assert set(ours.per_item) == {"1", "2", "3"}
    assert ours.per_item["3"]["bleu_1"] < 1 and ours.per_item["1"]["bleu_1"] > 0.5


def test_spice_missing_names_the_jars_and_the_folder():
    msg = cm.spice_missing()
    if msg is not None:
        assert "stanford-corenlp-3.6.0" in msg and "spice/lib" in msg and "\n" not in msg


def test_clipscore_and_refclipscore_equal_the_formula_by_hand(tiny_models):
    import open_clip

    cfg = load_config("tiny-random")
    scorer = cm.ClipScore.from_config(cfg, "cpu")
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tiny_models / 'clip'}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tiny_models / 'clip'}")
    model.eval()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    captions = ["a red circle", "a dog", "zebra"]
    refs = [["a circle", "red thing"], ["a cat"], ["a striped horse", "zebra on grass", "animal"]]
    with torch.no_grad():
        img = torch.nn.functional.normalize(
            model.encode_image(torch.stack([preprocess(i) for i in images])), dim=-1
        )
        txt = torch.nn.functional.normalize(model.encode_text(tokenizer(captions)), dim=-1)
    cos = (img * txt).sum(-1)
    expected = [2.5 * max(float(c), 0.0) for c in cos]
    expected_ref = []
    for c, cap_emb, rs in zip(expected, txt, refs):
        with torch.no_grad():
            r = torch.nn.functional.normalize(model.encode_text(tokenizer(rs)), dim=-1)
        best = max(float((r @ cap_emb).max()), 0.0)
        expected_ref.append(2 * c * best / (c + best) if c + best > 0 else 0.0)
    tensors = [torch.from_numpy(np.array(i)).permute(2, 0, 1).float() / 255 for i in images]
    got = scorer.scores(tensors, captions, refs)
    assert got["clipscore"] == pytest.approx(expected, abs=1e-5)
    assert got["refclipscore"] == pytest.approx(expected_ref, abs=1e-5)


def test_parse_metrics():
    assert parse_metrics(None, have_refs=False) == ["recon", "clipscore"]
    assert "cider" in parse_metrics(None, have_refs=True)
    assert parse_metrics("recon, bleu,recon", True) == ["recon", "bleu"]
    with pytest.raises(ValueError, match="--refs"):
        parse_metrics("bleu", have_refs=False)
    with pytest.raises(ValueError, match="unknown"):
        parse_metrics("bleu,blue", have_refs=True)


# ------------------------------------------------------------------------------------------- score runs
def _images(folder, n=3):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    return folder


def _cfg(*over):
    return load_config(
        "tiny-random",
        [
            "run.cache_dir=''",
            "run.batch_size=4",
            "generator.num_inference_steps=2",
            "generator.batch_across_items=true",
            *over,
        ],
    )


@pytest.fixture(scope="module")
def score_run(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("score")
    images = _images(root / "imgs")
    (root / "sysA.json").write_text(
        json.dumps(
            [
                {"image_id": "im0", "caption": "a <script>alert(1)</script> circle"},
                {"image_id": "im1", "caption": "a blue square"},
                {"image_id": "im2", "caption": ""},
                {"image_id": "im0", "caption": "a later duplicate"},
                {"image_id": "missing", "caption": "no such image"},
                {"caption": "no id"},
                {"image_id": "im1"},
                "just a string",
            ]
        )
    )
    (root / "sysB.json").write_text(json.dumps({"im0": "a circle", "im1": "a square", "im2": None}))
    (root / "refs.json").write_text(
        json.dumps({"im0": ["a red circle"], "im1": ["a blue square", "a square"]})
    )
    recon = Reconstructor(_cfg())
    run = score_caption_sets(
        _cfg(),
        [root / "sysA.json", root / "sysB.json"],
        images,
        root / "run",
        refs=root / "refs.json",
        metrics="recon,clipscore,refclipscore,bleu,cider",
        progress=False,
        reconstructor=recon,
        n_resamples=200,
    )
    return root, run


def test_per_item_problems_are_recorded_failures_with_clear_messages(score_run):
    root, run = score_run
    recs = {r["id"]: r for r in read_jsonl(run.path / "results.jsonl")[0]}
    ok = {i for i, r in recs.items() if r["status"] == "ok"}
    assert ok == {"sysA/im0", "sysA/im1", "sysB/im0", "sysB/im1"}
    errors = {i: r["error"] for i, r in recs.items() if r["status"] == "failed"}
    assert "caption: text is empty" in errors["sysA/im2"]
    assert "caption: text is null" in errors["sysB/im2"]
    assert (
        "duplicate image_id 'im0'" in errors["sysA/im0#entry-3"] and "entry 0" in errors["sysA/im0#entry-3"]
    )
    assert recs["sysA/im0"]["caption"].startswith("a <script>")  # the first caption is kept
    assert "matches no image" in errors["sysA/missing"]
    assert "missing key 'image_id'" in errors["sysA/@entry-5"]
    assert "duplicate image_id 'im1'" in errors["sysA/im1#entry-6"]  # a duplicate, even without a caption
    assert "expected an object" in errors["sysA/@entry-7"]
    assert all(str(root / "sysA.json") in e for i, e in errors.items() if i.startswith("sysA"))


def test_records_scores_seeds_and_outputs(score_run):
    root, run = score_run
    recs = {r["id"]: r for r in read_jsonl(run.path / "results.jsonl")[0]}
    a, b = recs["sysA/im0"], recs["sysB/im0"]
    assert a["seeds"] == b["seeds"] and len(a["seeds"]) == 2  # common random numbers across systems
    assert {
        "recon_clip_similarity",
        "recon_ssim_similarity",
        "clipscore",
        "refclipscore",
        "bleu_4",
        "cider",
    } <= set(a["scores"])
    assert a["scores"]["recon_clip_similarity"] == pytest.approx(
        np.mean(a["scores_per_image"]["recon_clip_similarity"])
    )
    assert a["recon_std"]["recon_clip_similarity"] == pytest.approx(
        np.std(a["scores_per_image"]["recon_clip_similarity"], ddof=1)
    )
    assert all((run.path / p).is_file() for p in a["images"]) and (run.path / a["original"]).is_file()
    aggregate = json.loads((run.path / "aggregate.json").read_text())
    assert aggregate["sysB"]["cider"] == pytest.approx(
        np.mean([recs[f"sysB/im{i}"]["scores"]["cider"] for i in (0, 1)])
    )
    corpus = json.loads((run.path / "corpus.json").read_text())
    assert set(corpus) == {"sysA", "sysB"} and "bleu_4" in corpus["sysA"]
    for name in ("leaderboard.md", "leaderboard.html", "leaderboard.json", "report.html", "timing.json"):
        assert (run.path / name).is_file()
    assert (
        "sysA − sysB" in (run.path / "leaderboard.md").read_text()
        or "sysB − sysA" in (run.path / "leaderboard.md").read_text()
    )
    from importlib import metadata  # the footer says what decided these numbers (fingerprint.json)

    assert (
        f"numbers from recon {metadata.version('recon')}, torch {metadata.version('torch')}"
        in (run.path / "leaderboard.md").read_text()
    )


def test_captions_are_escaped_in_reports(score_run):
    _, run = score_run
    for name in ("report.html",):
        html = (run.path / name).read_text()
        assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_resume_skips_finished_items_and_refuses_other_inputs(score_run, tmp_path):
    root, run = score_run
    before = (run.path / "results.jsonl").read_bytes()
    recon = Reconstructor(_cfg())
    again = score_caption_sets(
        _cfg(),
        [root / "sysA.json", root / "sysB.json"],
        root / "imgs",
        run.path,
        refs=root / "refs.json",
        metrics="recon,clipscore,refclipscore,bleu,cider",
        progress=False,
        reconstructor=recon,
        n_resamples=200,
    )
    assert (run.path / "results.jsonl").read_bytes() == before
    assert recon._generator is None and recon._image_metrics is None  # nothing left to do: no model loaded
    assert again.aggregate == run.aggregate
    with pytest.raises(RunError, match="different inputs"):
        score_caption_sets(
            _cfg(),
            [root / "sysA.json"],
            root / "imgs",
            run.path,
            refs=root / "refs.json",
            metrics="recon,clipscore,refclipscore,bleu,cider",
            progress=False,
        )


def test_analyze_writes_correlations_and_scatter_plots(score_run):
    from recon.scoring.analyze import analyze_run

    _, run = score_run
    res = analyze_run(run.path, n_resamples=50)
    assert res["recon_metric"] == "recon_clip_similarity"
    assert set(res["item"]) >= {"clipscore", "bleu_4", "cider"}
    assert (run.path / "analysis.md").is_file() and json.loads((run.path / "analysis.json").read_text())
    html = (run.path / "report.html").read_text()
    assert "Correlation with recon_clip_similarity" in html and "one point per caption" in html


# -------------------------------------------------------------------------------------------------- CLI
def _cli(args, recon_cache):
    import os

    env = dict(os.environ, RECON_CACHE=str(recon_cache), HF_HUB_OFFLINE="1", RECON_THREADS="1")
    env.pop("RECON_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "recon", *args], env=env, capture_output=True, text=True, timeout=600
    )


def test_malformed_json_is_one_error_line_and_nonzero_exit(tmp_path, recon_cache):
    images = _images(tmp_path / "imgs", 1)
    bad = tmp_path / "bad.json"
    bad.write_text('[{"image_id": "im0", "caption": "a cat"},')
    r = _cli(
        [
            "score",
            str(bad),
            "--images",
            str(images),
            "--preset",
            "tiny-random",
            "--out",
            str(tmp_path / "run"),
            "--metrics",
            "clipscore",
        ],
        recon_cache,
    )
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and str(bad) in lines[0] and "not valid JSON" in lines[0]


def test_references_file_given_as_captions_is_a_clear_error(tmp_path, recon_cache):
    images = _images(tmp_path / "imgs", 1)
    refs = tmp_path / "refs.json"
    refs.write_text(json.dumps({"im0": ["a", "b"]}))
    r = _cli(
        [
            "score",
            str(refs),
            "--images",
            str(images),
            "--preset",
            "tiny-random",
            "--metrics",
            "bleu",
            "--out",
            str(tmp_path / "run"),
        ],
        recon_cache,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--refs" in r.stderr


def test_cli_scores_clipscore_only_without_generation(tmp_path, recon_cache, tiny_models):
    images = _images(tmp_path / "imgs", 2)
    caps = tmp_path / "caps.json"
    caps.write_text(json.dumps({"im0": "a cat", "im1": "a dog"}))
    r = _cli(
        [
            "score",
            str(caps),
            "--images",
            str(images),
            "--preset",
            "tiny-random",
            "--metrics",
            "clipscore",
            "--out",
            str(tmp_path / "run"),
            "--no-progress",
            "--resamples",
            "50",
        ],
        recon_cache,
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["ok"] == 2 and set(summary["aggregate"]["caps"]) == {"clipscore"}
    assert not (tmp_path / "run" / "images" / "caps").exists()  # no reconstruction was asked for


def test_items_follow_the_folder_order_map_coco_file_names_and_respect_limit(tmp_path):
    from recon.scoring.inputs import build_items, read_caption_set, read_references, system_names

    images = tmp_path / "imgs"
    (images / "sub").mkdir(parents=True)
    for name in ("COCO_val_000042.jpg", "b.png", "sub/c.png"):
        Image.new("RGB", (8, 8)).save(images / name)
    ann = tmp_path / "ann.json"
    ann.write_text(
        json.dumps(
            {
                "images": [{"id": 42, "file_name": "COCO_val_000042.jpg"}],
                "annotations": [{"image_id": 42, "caption": "a cat"}],
            }
        )
    )
    caps = tmp_path / "run1" / "captions.json"
    caps.parent.mkdir()
    caps.write_text(
        json.dumps(
            [
                {"image_id": "sub/c", "caption": "c"},
                {"image_id": 42, "caption": "x"},
                {"image_id": "b", "caption": "b"},
            ]
        )
    )
    other = tmp_path / "run2" / "captions.json"
    other.parent.mkdir()
    other.write_text(json.dumps({"b": "bb", "42": "xx"}))
    names = system_names([caps, other])
    assert names == ["run1-captions", "run2-captions"]
    refs = read_references(ann)
    assert refs.refs == {"42": ["a cat"]}
    sets = [read_caption_set(p, n) for p, n in zip([caps, other], names)]
    items = build_items(sets, images, refs)
    assert [(i.system, i.key) for i in items] == [
        ("run1-captions", "42"),
        ("run2-captions", "42"),
        ("run1-captions", "b"),
        ("run2-captions", "b"),
        ("run1-captions", "sub/c"),
    ]
    assert items[0].path.name == "COCO_val_000042.jpg" and all(i.error is None for i in items)
    assert [i.key for i in build_items(sets, images, refs, limit=1)] == ["42", "42"]
    with pytest.raises(ValueError, match="unique"):
        system_names([caps, other], ["same", "same"])


def _wired() -> bool:
    import argparse

    from recon.cli import build_parser

    return any(
        isinstance(a, argparse._SubParsersAction) and "score" in a.choices for a in build_parser()._actions
    )


@pytest.mark.skipif(not _wired(), reason="recon.cli does not register the score command yet")
def test_recon_score_through_the_main_cli_is_one_error_line(tmp_path, recon_cache):
    import os

    images = _images(tmp_path / "imgs", 1)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    env = dict(os.environ, RECON_CACHE=str(recon_cache), HF_HUB_OFFLINE="1", RECON_THREADS="1")
    env.pop("RECON_DEBUG", None)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "recon",
            "score",
            str(bad),
            "--images",
            str(images),
            "--preset",
            "tiny-random",
            "--metrics",
            "clipscore",
            "--out",
            str(tmp_path / "run"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert [x for x in r.stderr.splitlines() if x.strip()] == [
        x for x in r.stderr.splitlines() if "not valid JSON" in x
    ]


def test_timer_stages_are_exclusive():
    import time as _time

    from recon.pipeline import Timer

    t = Timer()
    with t("outer"):
        _time.sleep(0.01)
        with t("inner"):
            _time.sleep(0.25)
        _time.sleep(0.01)
    assert t.seconds["inner"] >= 0.25 and 0.02 <= t.seconds["outer"] < 0.2  # inclusive would be >= 0.27


def test_an_id_that_matches_two_files_is_an_error_naming_both(tmp_path):
    from recon.data import DataError
    from recon.scoring.inputs import build_items, read_caption_set

    images = tmp_path / "imgs"
    images.mkdir()
    for name in ("a.png", "a.jpg", "b.png"):
        Image.new("RGB", (8, 8)).save(images / name)
    caps = tmp_path / "caps.json"
    caps.write_text(json.dumps({"a": "x", "b": "y"}))
    with pytest.raises(DataError, match=r"image_id 'a' matches several files .*a\.jpg, .*a\.png"):
        build_items([read_caption_set(caps, "caps")], images)
    caps.write_text(json.dumps({"a.png": "x", "b": "y"}))  # an exact id is not ambiguous
    items = build_items([read_caption_set(caps, "caps")], images)
    assert [(i.key, i.path.name) for i in items] == [("a.png", "a.png"), ("b", "b.png")]


def test_partial_coverage_is_shown_and_markdown_escapes_names():
    from recon.scoring.tables import coverage_notes, leaderboard, leaderboard_markdown

    system = "<img src=x onerror=alert(1)>"
    records = [
        {
            "id": f"{system}/im{i}",
            "system": system,
            "image_id": f"im{i}",
            "status": "ok",
            "scores": {"clipscore": 0.5 + i / 10, **({"bleu_4": 0.2} if i < 2 else {})},
        }
        for i in range(8)
    ]
    board = leaderboard(records, [system], n_resamples=20)
    notes = coverage_notes(board)
    assert notes == [f"bleu_4 covers only part of the ok items ({system} 2/8): its mean is over those"]
    md = leaderboard_markdown(board, notes)
    assert "(n=2/8)" in md and "<img" not in md and "&lt;img src=x onerror=alert(1)&gt;" in md
    assert md.count("(n=") == 1  # clipscore covers every item: no count shown


def test_leaderboard_headlines_corpus_bleu_as_pycocoevalcap_computes_it(score_run):
    _, run = score_run
    board = json.loads((run.path / "leaderboard.json").read_text())
    corpus = json.loads((run.path / "corpus.json").read_text())
    for system in ("sysA", "sysB"):
        est = board["corpus"][system]["bleu_4"]
        assert est["value"] == pytest.approx(corpus[system]["bleu_4"], abs=1e-12) and est["n"] == 2
        assert est["low"] <= est["value"] <= est["high"]
    md = (run.path / "leaderboard.md").read_text()
    assert "**bleu_4 (corpus)**" in md and "bleu_4 (mean of per-image)" in md
    assert "bleu_4 (corpus)" in (run.path / "leaderboard.html").read_text()


def test_corpus_meteor_rows_label_the_per_image_mean():
    from recon.scoring.tables import leaderboard, leaderboard_markdown

    records = [
        {
            "id": f"s/im{i}",
            "system": "s",
            "image_id": f"im{i}",
            "status": "ok",
            "scores": {"meteor": 0.2 + i / 10},
        }
        for i in range(3)
    ]
    board = leaderboard(records, ["s"], n_resamples=20)
    assert board["corpus"] == {}  # no BLEU statistics in these records
    board["corpus"]["s"] = {"meteor": {"value": 0.31, "low": 0.25, "high": 0.36, "n": 3}}
    md = leaderboard_markdown(board)
    assert (
        "| **meteor (corpus)** (higher) | 0.310 [0.250, 0.360] |" in md and "meteor (mean of per-image)" in md
    )


# ------------------------------------------------------------------------------------- ids of invented records
def test_an_image_named_like_an_invented_id_keeps_its_score(tmp_path, tiny_models):
    from recon.scoring.inputs import build_items, read_caption_set

    images = tmp_path / "imgs"
    images.mkdir()
    for name in ("@entry-0.png", "a.png", "a#entry-2.png"):
        Image.new("RGB", (16, 16), "red").save(images / name)
    caps = tmp_path / "caps.json"
    caps.write_text(
        json.dumps(
            [
                {"caption": "an entry without an id"},  # invented id caps/@entry-0
                {"image_id": "a", "caption": "a red square"},
                {"image_id": "a", "caption": "a duplicate"},  # invented id caps/a#entry-2
                {"image_id": "@entry-0", "caption": "a red square"},
                {"image_id": "a#entry-2", "caption": "a red square"},
            ]
        )
    )
    items = build_items([read_caption_set(caps, "caps")], images)
    ids = [it.id for it in items]
    assert len(set(ids)) == len(ids) == 5
    assert {it.id for it in items if it.error is None} == {"caps/@entry-0", "caps/a", "caps/a#entry-2"}
    assert {it.id for it in items if it.error} == {"caps/@entry-0~2", "caps/a#entry-2~2"}
    # one item per batch: before, the failed record of an invented id replaced the image's ok record
    run = score_caption_sets(
        _cfg("run.batch_size=1"),
        [caps],
        images,
        tmp_path / "run",
        metrics="clipscore",
        progress=False,
        n_resamples=20,
    )
    recs = {r["id"]: r for r in run.records}
    assert len(run.records) == 5
    assert all(recs[i]["status"] == "ok" for i in ("caps/@entry-0", "caps/a", "caps/a#entry-2"))
    assert "missing key 'image_id'" in recs["caps/@entry-0~2"]["error"]
    assert "duplicate image_id 'a'" in recs["caps/a#entry-2~2"]["error"]
    board = json.loads((run.path / "leaderboard.json").read_text())
    assert board["counts"]["caps"] == {"ok": 3, "failed": 2}
