"""The experiment scripts and the selection code they share, on tiny random models (outputs are noise; the
shapes bundle gives the numbers)."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from recon.config import load_config
from recon.pipeline import Reconstructor
from recon.scoring.selection import CandidateReconstructor, candidate_config

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--preset",
    "tiny-random",
    "--no-cache",
    "--no-progress",
    "--resamples",
    "50",
    "--set",
    "generator.num_inference_steps=1",
    "--set",
    "generator.batch_across_items=true",
]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _images(folder, n=2):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    return folder


def test_candidates_are_the_beam_caption_then_seeded_samples(tiny_models):
    base = load_config("tiny-random", ["run.cache_dir=''"])
    cfg = candidate_config(base, 3, temperature=1.0, top_p=1.0)
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    recon = CandidateReconstructor(cfg)
    (caps,) = recon.caption([img], ["x.png"], ["h"])
    assert len(caps) == 3
    c = cfg.captioner
    beam = Reconstructor(candidate_config(cfg, 1, 1.0, 1.0), captioner=recon.captioner)
    beam.config.captioner.decoding.method = "beam"
    assert beam.caption([img], ["x.png"], ["h"])[0] == caps[:1]
    samples = Reconstructor(candidate_config(cfg, c.num_candidates - 1, 1.0, 1.0), captioner=recon.captioner)
    assert samples.caption([img], ["x.png"], ["h"])[0] == caps[1:]


def test_caption_selection_applies_every_rule(tmp_path, tiny_models):
    images = _images(tmp_path / "imgs")
    refs = tmp_path / "refs.json"
    refs.write_text(json.dumps({"im0": ["a red circle"], "im1": ["a blue square", "a square"]}))
    out = tmp_path / "run"
    assert (
        _script("caption_selection").main(
            [
                "--images",
                str(images),
                "--refs",
                str(refs),
                "--n",
                "2",
                "--candidates",
                "3",
                "--k",
                "1",
                "--ref-metrics",
                "bleu",
                "--out",
                str(out),
                *TINY,
            ]
        )
        == 0
    )
    details = json.loads((out / "selection.json").read_text())
    assert len(details) == 2
    for d in details:
        ch = d["choices"]
        assert ch["reconstruction"] == int(np.argmax(d["recon"])) and ch["first_beam"] == 0
        assert ch["likelihood"] == int(np.argmax(d["log_likelihood"]))
        assert ch["clipscore"] == int(np.argmax(d["clipscore"])) and 0 <= ch["random"] < 3
    table = (out / "table.md").read_text()
    for rule in (
        "**reconstruction**",
        "first_beam",
        "random",
        "likelihood",
        "clipscore",
        "bleu_4",
        "reconstruction − random",
    ):
        assert rule in table
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["table"]["rules"]) == {
        "reconstruction",
        "first_beam",
        "random",
        "likelihood",
        "clipscore",
    }
    assert (out / "report.html").is_file() and (out / "results.jsonl").is_file()


@pytest.mark.slow  # ~30-60 s on a shared 2-core machine: two runs of generation + captioning
def test_image_selection_and_text_reconstruction_scripts(tmp_path, tiny_models):
    texts = tmp_path / "texts.json"
    texts.write_text(json.dumps(["a red circle", "a <i>blue</i> square"]))
    out = tmp_path / "imsel"
    assert (
        _script("image_selection").main(
            ["--texts", str(texts), "--n", "2", "--k", "2", "--out", str(out), *TINY]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert {"by_sbert_similarity", "by_clip_text_similarity", "random"} <= set(summary["table"]["rules"])
    details = json.loads((out / "selection.json").read_text())
    recs = {r["id"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    for d in details:
        per = recs[d["id"]]["scores_per_image"]["sbert_similarity"]
        assert d["choices"]["by_sbert_similarity"] == int(np.argmax(per))
    out = tmp_path / "t2i2t"
    assert (
        _script("text_reconstruction").main(
            [
                "--texts",
                str(texts),
                "--n",
                "2",
                "--k",
                "2",
                "--out",
                str(out),
                "--ref-metrics",
                "bleu,cider",
                *TINY,
            ]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert {"clip_text_similarity", "sbert_similarity", "bleu_4", "cider"} <= set(summary["metrics"])
    assert summary["metrics"]["cider"]["pairs"] == 4 and (out / "plots" / "cider.png").is_file()


def test_shapes_data_and_attribute_scores(tmp_path):
    from recon.scoring.experiment_data import attribute_scores, write_shapes_data

    data = write_shapes_data(tmp_path / "data", 3, seed=0)
    truth = json.loads((data / "truth.json").read_text())
    refs = json.loads((data / "refs.json").read_text())
    texts = json.loads((data / "texts.json").read_text())
    assert sorted(p.stem for p in (data / "images").glob("*.png")) == sorted(truth) == sorted(refs)
    for key, t in truth.items():
        assert texts[key] in refs[key] and len(refs[key]) == 4
        assert attribute_scores(texts[key], t) == {"exact": 1.0, "attributes": 1.0}
    wrong = texts["00000"].replace(
        truth["00000"]["shape"], "cross" if truth["00000"]["shape"] != "cross" else "square"
    )
    assert attribute_scores(wrong, truth["00000"]) == {"exact": 0.0, "attributes": 0.8}


def test_scenes_data_and_exact_scene_scores(tmp_path):
    from recon.config import load_config
    from recon.scoring.experiment_data import attribute_scores, world_of, write_scenes_data

    assert world_of(load_config("scenes")) == "scenes" and world_of(load_config("tiny-random")) is None
    data = write_scenes_data(tmp_path / "data", 4, seed=0)
    truth = json.loads((data / "truth.json").read_text())
    refs = json.loads((data / "refs.json").read_text())
    texts = json.loads((data / "texts.json").read_text())
    assert sorted(p.stem for p in (data / "images").glob("*.png")) == sorted(truth) == sorted(texts)
    for key, t in truth.items():
        assert len(refs[key]) == 3 and all(attribute_scores(r, t)["exact"] == 1.0 for r in refs[key])
    first = truth["00000"]["objects"][0]
    other = "cross" if first["shape"] != "cross" else "square"
    wrong = texts["00000"].replace(f"{first['color']} {first['shape']}", f"{first['color']} {other}", 1)
    assert wrong != texts["00000"] and attribute_scores(wrong, truth["00000"])["exact"] == 0.0


# ------------------------------------------------- each script on its default data path (shapes), small
SHAPES = [
    "--no-cache",
    "--no-progress",
    "--resamples",
    "20",
    "--n",
    "3",
    "--threads",
    "1",
    "--set",
    "generator.num_inference_steps=4",
]


def _numbers(table_md: str) -> list[float]:
    """The decimal numbers in a markdown table's rows (a table of empty cells has none; headers have none)."""
    import re

    rows = [line for line in table_md.splitlines() if line.startswith("|") and "---" not in line]
    return [float(x) for row in rows for x in re.findall(r"(?<![\w.])-?\d+\.\d+", row)]


def test_caption_selection_on_its_rendered_scenes_measures_every_image(tmp_path):
    """The shapes path renders its scenes into OUT/data and runs in OUT: those inputs are read, not dropped as
    run outputs (the regression: "0 images (0 failed)" and a table of empty cells, exit 0)."""
    out = tmp_path / "sel"
    assert (
        _script("caption_selection").main(
            [
                "--out",
                str(out),
                "--ref-metrics",
                "",
                "--candidates",
                "2",
                "--k",
                "1",
                "--stream",
                "77",
                *SHAPES,
            ]
        )
        == 0
    )
    table = (out / "table.md").read_text()
    assert "3 images (0 failed)" in table and len(_numbers(table)) >= 6 * 4
    assert json.loads((out / "summary.json").read_text())["n"] == 3


@pytest.mark.parametrize("script", ["image_selection", "text_reconstruction"])
def test_text_experiments_on_their_rendered_scenes(tmp_path, script):
    out = tmp_path / script
    extra = ["--ref-metrics", "bleu"] if script == "text_reconstruction" else []
    assert _script(script).main(["--out", str(out), "--k", "2", *extra, *SHAPES]) == 0
    assert json.loads((out / "summary.json").read_text())["n"] == 3
    assert len(_numbers((out / "table.md").read_text())) >= 4


def test_a_job_over_zero_inputs_is_an_error_naming_the_folder(tmp_path):
    from recon.data import DataError
    from recon.jobs import input_images

    (tmp_path / "run" / "images" / "x-1234abcd").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "run" / "images" / "x-1234abcd" / "original.png")
    with pytest.raises(DataError, match=str(tmp_path / "run")):  # only the run's own outputs: no input
        input_images(tmp_path / "run", tmp_path / "run")
    (tmp_path / "run" / "data").mkdir()
    Image.new("RGB", (4, 4)).save(
        tmp_path / "run" / "data" / "a.png"
    )  # an input kept inside the run dir is read
    assert [it.id for it in input_images(tmp_path / "run", tmp_path / "run")] == ["data/a.png"]


def test_an_experiment_whose_every_item_failed_is_an_error_not_an_empty_table(
    tmp_path, tiny_models, monkeypatch
):
    images = _images(tmp_path / "imgs")
    monkeypatch.setenv("RECON_MAX_PIXELS", "1")  # every image fails to load, as an item
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"no item was measured \(2 item\(s\) failed; the first, im0.png: "):
        _script("caption_selection").main(
            [
                "--images",
                str(images),
                "--n",
                "2",
                "--candidates",
                "2",
                "--k",
                "1",
                "--ref-metrics",
                "",
                "--out",
                str(out),
                *TINY,
            ]
        )
    assert not (out / "table.md").exists()


def test_metaeval_breakdown_on_a_shapes_metaeval_run(tmp_path, capsys):
    """The breakdown's default data path: a `recon metaeval --shapes` folder; every table has numbers."""
    from recon.cli import main

    out = tmp_path / "me"
    assert (
        main(
            [
                "metaeval",
                "--shapes",
                "2",
                "--out",
                str(out),
                "--no-progress",
                "--no-cache",
                "--resamples",
                "20",
                "--metrics",
                "recon,clipscore",
                "--threads",
                "1",
                "--set",
                "generator.num_inference_steps=4",
            ]
        )
        == 0
    )
    capsys.readouterr()
    _script("metaeval_breakdown").breakdown(out)
    printed = capsys.readouterr().out
    for title in ("FOIL accuracy by foiled attribute", "Within-scene pairwise accuracy", "CF tau_b"):
        assert title in printed
    assert len(_numbers(printed.split("## Within-scene")[1])) >= 15 * 3


@pytest.mark.parametrize(
    "experiment, columns",
    [
        ("e1", ("test caption_tuple_acc", "heldout caption_attr_acc", "test judge_tuple_acc")),
        ("e4s", ("test caption_exact", "heldout caption_binding", "test judge_exact")),
    ],
)
def test_semi_supervised_on_its_rendered_scenes_reports_numbers(tmp_path, capsys, experiment, columns):
    """One arm, one step, four scenes per split: the table has the arm's scores (its default data path: scenes
    rendered from the experiment's world with its bundle, arms run as worker processes; e4s: the scenes world,
    with model selection)."""
    out = tmp_path / "semi"
    assert (
        _script("semi_supervised").main(
            [
                "--out",
                str(out),
                "--experiment",
                experiment,
                "--labelled",
                "8",
                "--seeds",
                "0",
                "--arms",
                "task",
                "--steps",
                "1",
                "--n",
                "4",
                "--jobs",
                "1",
            ]
        )
        == 0
    )
    md = (out / "results.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| task |"))
    assert len(_numbers(row)) >= 5
    assert all(f"{c} %" in md for c in columns)
    record = json.loads((out / "l8" / "task" / "seed0" / "eval.json").read_text())
    assert all(len(record[c.replace(" ", "/")]) == 4 for c in columns)  # per scene, paired across arms
    assert len(record["test/captions"]) == 4  # every caption kept beside its scores
    assert (out / f"{columns[0].replace(' ', '_')}.png").stat().st_size > 0  # the world's headline metric
    finished = (out / "l8" / "task" / "seed0" / "eval.json").read_bytes()
    capsys.readouterr()
    # a worker a second launcher started for the same arm finds it finished: no retraining, the record untouched
    one = ["--out", str(out), "--experiment", experiment, "--one", "task", "8", "0"]
    assert _script("semi_supervised").main(one) == 0
    assert "already finished" in capsys.readouterr().out
    assert (out / "l8" / "task" / "seed0" / "eval.json").read_bytes() == finished
    assert _script("semi_supervised").main(["--out", str(tmp_path / "empty"), "--report-only"]) == 2
    assert "no finished arm" in capsys.readouterr().err


def test_heldout_errors_remakes_a_selected_arms_captions_exactly(tmp_path, capsys):
    """E4 for one step on four scenes, then its held-out captions made again from the selected adapters: the
    re-made accuracy equals eval.json's, every attribute is read, a rerun does no work and a torn line is set
    aside, not lost."""
    out = tmp_path / "semi"
    args = ["--out", str(out), "--experiment", "e4", "--labelled", "8", "--seeds", "0", "--arms", "task"]
    assert _script("semi_supervised").main([*args, "--steps", "1", "--n", "4", "--jobs", "1"]) == 0
    errors = _script("heldout_errors")
    assert errors.main(["--out", str(out), "--labelled", "8", "--seeds", "0"]) == 0
    (row,) = [json.loads(line) for line in (out / errors.RECORDS).read_text().splitlines()]
    recorded = json.loads((out / "l8" / "task" / "seed0" / "eval.json").read_text())
    assert row["reproduced"] and row["correct"] == recorded["heldout/caption_tuple_acc"]
    assert all(len(row[f"wrong/{a}"]) == 4 for a in ("shape", "color", "size", "position", "background"))
    assert "| task | 1 | 1/1 |" in capsys.readouterr().out
    with (out / errors.RECORDS).open("a") as f:
        f.write('{"torn": \n')
    assert errors.main(["--out", str(out), "--labelled", "8", "--seeds", "0"]) == 0
    assert "reproduced=" not in capsys.readouterr().out  # nothing made again
    assert (out / (errors.RECORDS + ".corrupt")).read_text() == '{"torn": \n'
    with pytest.raises(SystemExit):  # the scenes world has no attribute tuples to read
        errors.main(["--out", str(out), "--experiment", "e4s"])
    assert "needs a shapes-world experiment" in capsys.readouterr().err


def test_semi_supervised_compute_cells_list_each_seeds_selected_step():
    """The compute column shows every seed's selected step (a mean would hide whether more steps changed a choice),
    and no parentheses where nothing was selected."""
    cells = _script("semi_supervised").compute_cells
    selected = [
        {"train_process_cpu_s": 60, "steps": 900, "selected_step": 50, "captioner_examples": 7200},
        {"train_process_cpu_s": 120, "steps": 900, "selected_step": 25, "captioner_examples": 7200},
    ]
    assert cells(selected).split(" | ")[:2] == ["1.5", "900 (50, 25)"]
    assert cells([{"train_process_cpu_s": 60, "steps": 300}]).split(" | ")[1] == "300"


def test_scenes_metaeval_pools_seeds_per_category_on_the_shipped_bundle(tmp_path):
    out = tmp_path / "sme"
    assert (
        _script("scenes_metaeval").main(
            ["--out", str(out), "--n", "2", "--seeds", "0,1", "--jobs", "1", "--resamples", "20"]
        )
        == 0
    )
    res = json.loads((out / "summary.json").read_text())
    rows = res["table"]["rows"]
    assert {
        "clipscore",
        "recon_clip_similarity",
        "recon_ssim_similarity",
        "recon_judge_similarity",
        "judge_ceiling",
    } <= set(rows)
    assert res["n_scenes"] == 4 and set(res["per_seed"]) == {"0", "1"}
    assert all(0.0 <= rows[m]["all"]["value"] <= 1.0 for m in rows)
    assert "Reconstruction minus clipscore" in (out / "summary.md").read_text()


def test_reward_ranking_scores_each_pick_and_never_beats_the_oracle(tmp_path, capsys):
    """Eight scenes of the shapes world: every ranking's pick is one of the candidates, so no ranking is ever right
    where the oracle (any candidate right) is not; the table names every ranking and the contrasts."""
    module = _script("reward_ranking")
    out = tmp_path / "rr.json"
    assert module.main(["--world", "shapes", "--n", "8", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert len(result["rows"]) == 8 and result["cpu_s"] > 0
    assert all(v > 0 for v in result["cpu_ms_per_image"].values())
    for row in result["rows"]:
        for name in (*module.RANKINGS, *(f"{r}_worst" for r in ("denoise", "recon_clip", "recon_ssim"))):
            assert row[name]["caption_tuple_acc"] <= row["oracle"]["caption_tuple_acc"]
        assert 1 <= row["distinct"] <= result["candidates"]
    printed = capsys.readouterr().out
    assert all(f"| {name} |" in printed for name in (*module.RANKINGS, "oracle"))
    assert "| recon_clip - denoise |" in printed
    with pytest.raises(SystemExit):
        module.main(["--world", "shapes", "--n", "1", "--out", str(out)])


def test_reward_ranking_renders_reads_both_renders_of_each_caption_with_the_judge(tmp_path, capsys):
    """E5's generator preference on eight captions with the bundle's full generator (judge 99.5%): both renders of
    nearly every caption are read right (the sampling, decoding and judge path is whole), each has a finite
    log-likelihood under the captioner, and the table names the quantities."""
    from recon import hub

    out = tmp_path / "renders.json"
    args = ["--n", "8", "--renders", str(hub.SHAPES_BUNDLE / "generator"), "--out", str(out)]
    assert _script("reward_ranking").main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 8 and all(len(r["right"]) == len(r["log_likelihood"]) == 2 for r in rows)
    assert sum(min(r["right"]) for r in rows) >= 6
    assert all(np.isfinite(x) and x < 0 for r in rows for x in r["log_likelihood"])
    printed = capsys.readouterr().out
    assert "| of those, the captioner chose the right one |" in printed and "chosen - random" in printed
