"""recon.metrics.ReconstructionScore: the `recon score` numbers as a torchmetrics Metric, in a loop, and synced."""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from recon.config import load_config

OVER = ["run.cache_dir=''", "generator.num_inference_steps=2", "generator.images_per_caption=2"]
CAPTIONS = {"im0": "a red circle", "im1": "a blue square", "im2": "two green triangles", "im3": "a cat"}


def _images(folder, n=4):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    return folder


def _loaded(folder):
    from recon.data import load_image
    from recon.pipeline import to_tensor

    return [to_tensor(load_image(folder / f"{k}.png")) for k in CAPTIONS]


def test_equals_recon_score_and_works_in_a_plain_loop(tmp_path, tiny_models):
    from recon.metrics import ReconstructionScore
    from recon.scoring.run import score_caption_sets

    images = _images(tmp_path / "imgs")
    (tmp_path / "caps.json").write_text(json.dumps(CAPTIONS))
    cfg = load_config("tiny-random", OVER)
    run = score_caption_sets(
        cfg,
        [tmp_path / "caps.json"],
        images,
        tmp_path / "run",
        metrics="recon",
        progress=False,
        n_resamples=10,
    )
    expected = {
        m: np.mean([r["scores"][f"recon_{m}"] for r in run.records])
        for m in ("clip_similarity", "clip_pooler_similarity", "ssim_similarity")
    }

    metric = ReconstructionScore("tiny-random", OVER, all_metrics=True)
    tensors = _loaded(images)
    loader = [
        (torch.stack(tensors[:3]), list(CAPTIONS.values())[:3], list(CAPTIONS)[:3]),
        ([tensors[3]], [CAPTIONS["im3"]], ["im3"]),
    ]  # batches of different sizes, a list of tensors too
    for batch, captions, ids in loader:
        metric.update(batch, captions, ids=ids)
    got = metric.compute()
    assert set(got) == {f"recon_{m}" for m in expected}
    for m, value in expected.items():
        assert float(got[f"recon_{m}"]) == pytest.approx(value, abs=1e-6)
    single = ReconstructionScore("tiny-random", OVER)  # the select_by similarity as a scalar
    single.update(torch.stack(tensors), list(CAPTIONS.values()), ids=list(CAPTIONS))
    assert single.compute().ndim == 0 and float(single.compute()) == pytest.approx(
        expected["clip_similarity"], abs=1e-6
    )
    metric.reset()
    assert torch.isnan(metric.compute()["recon_clip_similarity"])
    with pytest.raises(ValueError, match="2 images, 1 captions"):
        metric.update(torch.stack(tensors[:2]), ["one"])
    with pytest.raises(ValueError, match="caption 0: text is whitespace only"):
        metric.update(torch.stack(tensors[:1]), [" "])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, folder: str, cache: str, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(RECON_CACHE=cache, HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from pathlib import Path

    from recon.metrics import ReconstructionScore

    tensors, ids = _loaded(Path(folder)), list(CAPTIONS)
    metric = ReconstructionScore("tiny-random", OVER)
    mine = slice(rank, None, world)
    metric.update(torch.stack(tensors[mine]), list(CAPTIONS.values())[mine], ids=ids[mine])
    value = float(metric.compute())  # synced over both processes
    Path(out, f"rank{rank}.json").write_text(json.dumps(value))
    dist.destroy_process_group()


def test_two_processes_sync_to_the_single_process_value(tmp_path, tiny_models, recon_cache):
    import torch.multiprocessing as mp

    from recon.metrics import ReconstructionScore

    images = _images(tmp_path / "imgs")
    mp.spawn(
        _worker, args=(2, _free_port(), str(images), str(recon_cache), str(tmp_path)), nprocs=2, join=True
    )
    alone = ReconstructionScore("tiny-random", OVER)
    alone.update(torch.stack(_loaded(images)), list(CAPTIONS.values()), ids=list(CAPTIONS))
    values = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert values[0] == values[1] == pytest.approx(float(alone.compute()), abs=1e-6)


# ------------------------------------------------------------------------------------------- what update accepts
def test_uint8_and_numpy_images_score_as_their_floats_and_out_of_range_images_are_refused(tiny_models):
    from recon.metrics import ReconstructionScore

    u8 = torch.from_numpy(np.random.default_rng(5).integers(0, 256, (3, 32, 32), dtype=np.uint8))
    floats = u8.float() / 255
    metric = ReconstructionScore("tiny-random", OVER)

    def score(images):
        metric.reset()
        metric.update(images, ["a red circle"], ids=["im"])
        return float(metric.compute())

    want = score([floats])
    assert score([u8]) == want  # uint8 is 0-255: divided by 255, not clamped to white
    assert score(u8.numpy()[None]) == want and score([floats.numpy()]) == want  # numpy: a batch or a list
    inf, nan = floats.clone(), floats.clone()
    inf[0, 0, 0], nan[1, 2, 3] = float("inf"), float("nan")
    for bad, message in [
        (floats * 255, r"image 0: values in \[0, 255\], expected floats in \[0, 1\]"),
        (floats - 0.5, r"values in \[-0\.5, 0\.5\]"),
        (inf, "non-finite"),
        (nan, "non-finite"),
        (floats.permute(1, 2, 0).numpy(), r"shape \(32, 32, 3\).*channels last"),
        (u8.int(), "dtype torch.int32"),
        (np.array([["a"]], dtype=object), "dtype object"),
    ]:
        with pytest.raises(ValueError, match=message):
            metric.update([bad], ["a red circle"])
    with pytest.raises(TypeError, match="got str"):
        metric.update(["im0.png"], ["a red circle"])


def test_a_nan_image_is_refused_before_it_can_poison_the_cache_of_recon_score(tmp_path, tiny_models):
    from recon.data import save_png
    from recon.metrics import ReconstructionScore
    from recon.scoring.run import score_caption_sets

    over = [f"run.cache_dir={tmp_path / 'cache'}", *OVER[1:]]
    metric = ReconstructionScore("tiny-random", over)
    black = torch.full((3, 32, 32), float("nan"))  # its PNG (NaN -> 0) is the all-black image's
    with pytest.raises(ValueError, match="image 0: holds non-finite values"):
        metric.update([black], ["a black square"], ids=["black"])
    assert not list((tmp_path / "cache").glob("scores/*/*.json"))
    save_png(torch.zeros(3, 32, 32), tmp_path / "imgs" / "black.png")
    (tmp_path / "caps.json").write_text(json.dumps({"black": "a black square"}))
    run = score_caption_sets(
        load_config("tiny-random", over),
        [tmp_path / "caps.json"],
        tmp_path / "imgs",
        tmp_path / "run",
        metrics="recon",
        progress=False,
        n_resamples=10,
    )
    (rec,) = run.records
    assert (
        rec["status"] == "ok" and len(rec["scores"]) == 3 and all(np.isfinite(list(rec["scores"].values())))
    )
