"""The reproducibility fingerprint: what decides a run's numbers, recorded beside them; `recon env`."""

import hashlib
import json
import subprocess
import sys
from importlib import metadata

import numpy as np
from PIL import Image

from recon import fingerprint
from recon.config import load_config


def test_a_run_records_versions_and_the_hash_of_every_models_weights(tmp_path, tiny_models):
    from recon import hub
    from recon.jobs import reconstruct_images

    (tmp_path / "src").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "src" / "a.png")
    cfg = load_config(
        "tiny-random",
        [
            "run.cache_dir=''",
            "generator.num_inference_steps=1",
            "generator.images_per_caption=1",
            "captioner.num_candidates=1",
        ],
    )
    run = reconstruct_images(cfg, tmp_path / "src", tmp_path / "run", progress=False)
    fp = json.loads((run.path / fingerprint.FILE).read_text())
    assert fp["environment"]["packages"]["torch"] == metadata.version("torch")
    assert fp["environment"]["packages"]["Pillow"] == metadata.version("Pillow")
    assert fp["config"] == cfg.to_dict()
    models = fp["models"]
    assert models["captioner.model"]["id"] == cfg.captioner.model
    root = hub.builtin_path(cfg.captioner.model)  # recomputed by hand: sha256 over (name, file sha256) lines
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in fingerprint.WEIGHT_SUFFIXES):
        h.update(f"{f.relative_to(root)}\x1f{hashlib.sha256(f.read_bytes()).hexdigest()}\n".encode())
    assert models["captioner.model"]["weights_sha256"] == h.hexdigest()
    assert set(models) >= {"captioner.model", "generator.model", "similarity.image.0.model"}


def test_differences_between_compared_runs_are_named(tmp_path):
    for name, torch_version in (("a", "2.14.1"), ("b", "2.13.0"), ("c", "2.14.1")):
        (tmp_path / name).mkdir()
        (tmp_path / name / fingerprint.FILE).write_text(
            json.dumps(
                {
                    "environment": {"packages": {"torch": torch_version, "Pillow": "13.0.0"}, "java": "17"},
                    "models": {"captioner.model": {"id": "m", "weights_sha256": "x"}},
                }
            )
        )
    note = fingerprint.differences_note([tmp_path / n for n in "abc"])
    assert note.endswith("torch 2.14.1 / 2.13.0 / 2.14.1") and "Pillow" not in note
    assert fingerprint.differences_note([tmp_path / "a", tmp_path / "c"]) is None
    assert "torch 2.14.1" in fingerprint.summary_note(tmp_path / "a")


def test_recon_env_prints_the_versions_for_a_bug_report():
    r = subprocess.run(
        [sys.executable, "-m", "recon", "env", "--json"], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    env = json.loads(r.stdout)
    assert env["packages"]["transformers"] == metadata.version("transformers") and "cuda" in env
    r = subprocess.run([sys.executable, "-m", "recon", "env"], capture_output=True, text=True, timeout=300)
    assert f"- diffusers: {metadata.version('diffusers')}" in r.stdout


def test_a_fingerprint_never_downloads_or_probes_the_network(monkeypatch):
    import socket

    def no_network(*a, **k):
        raise AssertionError("the fingerprint touched the network")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", no_network)
    assert fingerprint.weights_sha256("Salesforce/blip-image-captioning-large") is None  # not cached here
    assert fingerprint.weights_sha256("ViT-B-32") is None  # an open_clip architecture name, not a path
