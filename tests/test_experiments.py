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
TINY = ["--preset", "tiny-random", "--no-cache", "--no-progress", "--resamples", "50",
        "--set", "generator.num_inference_steps=1", "--set", "generator.batch_across_items=true"]


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
    assert _script("caption_selection").main(
        ["--images", str(images), "--refs", str(refs), "--n", "2", "--candidates", "3", "--k", "1",
         "--ref-metrics", "bleu", "--out", str(out), *TINY]) == 0
    details = json.loads((out / "selection.json").read_text())
    assert len(details) == 2
    for d in details:
        ch = d["choices"]
        assert ch["reconstruction"] == int(np.argmax(d["recon"])) and ch["first_beam"] == 0
        assert ch["likelihood"] == int(np.argmax(d["log_likelihood"]))
        assert ch["clipscore"] == int(np.argmax(d["clipscore"])) and 0 <= ch["random"] < 3
    table = (out / "table.md").read_text()
    for rule in ("**reconstruction**", "first_beam", "random", "likelihood", "clipscore", "bleu_4",
                 "reconstruction − random"):
        assert rule in table
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["table"]["rules"]) == {"reconstruction", "first_beam", "random", "likelihood", "clipscore"}
    assert (out / "report.html").is_file() and (out / "results.jsonl").is_file()


@pytest.mark.slow  # ~30-60 s on a shared 2-core machine: two runs of generation + captioning
def test_image_selection_and_text_reconstruction_scripts(tmp_path, tiny_models):
    texts = tmp_path / "texts.json"
    texts.write_text(json.dumps(["a red circle", "a <i>blue</i> square"]))
    out = tmp_path / "imsel"
    assert _script("image_selection").main(["--texts", str(texts), "--n", "2", "--k", "2", "--out", str(out),
                                            *TINY]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert {"by_sbert_similarity", "by_clip_text_similarity", "random"} <= set(summary["table"]["rules"])
    details = json.loads((out / "selection.json").read_text())
    recs = {r["id"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    for d in details:
        per = recs[d["id"]]["scores_per_image"]["sbert_similarity"]
        assert d["choices"]["by_sbert_similarity"] == int(np.argmax(per))
    out = tmp_path / "t2i2t"
    assert _script("text_reconstruction").main(["--texts", str(texts), "--n", "2", "--k", "2", "--out", str(out),
                                                "--ref-metrics", "bleu,cider", *TINY]) == 0
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
    wrong = texts["00000"].replace(truth["00000"]["shape"], "cross" if truth["00000"]["shape"] != "cross" else "square")
    assert attribute_scores(wrong, truth["00000"]) == {"exact": 0.0, "attributes": 0.8}
