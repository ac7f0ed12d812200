"""Reconstruction runs end to end on tiny random models: records, seeds, resume, cache, failures, report."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from recon.config import load_config
from recon.jobs import reconstruct_images, reconstruct_texts
from recon.pipeline import Reconstructor
from recon.runs import Cache, read_jsonl


def _images(folder, n=3, size=40):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size + 8 * i, 3), dtype=np.uint8)).save(
            folder / f"img{i}.png"
        )
    return folder


def _cfg(*over):
    return load_config("tiny-random", ["run.cache_dir=''", "run.batch_size=2", *over])


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("pipe")
    src = _images(root / "src")
    recon = Reconstructor(_cfg())
    run = reconstruct_images(_cfg(), src, root / "run", progress=False, reconstructor=recon)
    return root, src, run, recon


def test_records_candidates_seeds_and_choice(first_run):
    root, src, run, recon = first_run
    records = read_jsonl(run.path / "results.jsonl")[0]
    assert [r["id"] for r in records] == ["img0.png", "img1.png", "img2.png"]
    names = ["clip_similarity", "clip_pooler_similarity", "ssim_similarity"]
    for r in records:
        assert r["status"] == "ok" and r["direction"] == "image-text-image"
        assert len(r["candidates"]) == 2 and all(len(c["images"]) == 2 for c in r["candidates"])
        # common random numbers: image k of every candidate shares its seed; the K seeds differ
        assert r["candidates"][0]["seeds"] == r["candidates"][1]["seeds"]
        assert len(set(r["candidates"][0]["seeds"])) == 2
        assert set(r["scores"]) == set(names)
        best = max(range(2), key=lambda c: r["candidates"][c]["scores"]["clip_similarity"])
        assert r["chosen"] == best and r["caption"] == r["candidates"][best]["caption"]
        for c in r["candidates"]:
            assert all((run.path / p).is_file() for p in c["images"])
            assert c["scores"]["ssim_similarity"] == pytest.approx(
                np.mean(c["scores_per_image"]["ssim_similarity"])
            )
    assert (run.path / "report.html").is_file() and (run.path / "config.yaml").is_file()


def test_one_item_regenerated_alone_gives_identical_png_bytes(first_run, tmp_path):
    root, src, run, _ = first_run
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(src / "img1.png", alone / "img1.png")
    run2 = reconstruct_images(_cfg(), alone, tmp_path / "run", progress=False)
    rec1 = {r["id"]: r for r in read_jsonl(run.path / "results.jsonl")[0]}["img1.png"]
    rec2 = read_jsonl(run2.path / "results.jsonl")[0][0]
    assert rec2["seeds"] == rec1["seeds"]
    for c1, c2 in zip(rec1["candidates"], rec2["candidates"]):
        assert c1["caption"] == c2["caption"]
        for p1, p2 in zip(c1["images"], c2["images"]):
            assert (run.path / p1).read_bytes() == (run2.path / p2).read_bytes()


def test_rerun_with_cache_loads_no_model_and_matches(tmp_path, tiny_models):
    src = _images(tmp_path / "src", n=2)
    cfg = load_config("tiny-random", [f"run.cache_dir={tmp_path / 'cache'}"])
    a = reconstruct_images(cfg, src, tmp_path / "a", progress=False)
    fresh = Reconstructor(cfg, cache=Cache(tmp_path / "cache"))
    b = reconstruct_images(cfg, src, tmp_path / "b", progress=False, reconstructor=fresh)
    assert fresh._captioner is None and fresh._generator is None and fresh._image_metrics is None
    ra, rb = read_jsonl(a.path / "results.jsonl")[0], read_jsonl(b.path / "results.jsonl")[0]
    assert [r["scores"] for r in ra] == [r["scores"] for r in rb]
    assert (a.path / ra[0]["candidates"][0]["images"][0]).read_bytes() == (
        b.path / rb[0]["candidates"][0]["images"][0]
    ).read_bytes()


def test_resume_skips_finished_items(first_run):
    root, src, run, _ = first_run
    before = (run.path / "results.jsonl").read_bytes()
    recon = Reconstructor(_cfg())
    reconstruct_images(_cfg(), src, run.path, progress=False, reconstructor=recon)
    assert (run.path / "results.jsonl").read_bytes() == before
    assert recon._captioner is None  # nothing left to do: no model was loaded


def test_bad_inputs_are_recorded_and_the_run_finishes(tmp_path, tiny_models):
    src = tmp_path / "bad"
    src.mkdir()
    (src / "empty.png").write_bytes(b"")
    (src / "text.png").write_text("not an image")
    good = Image.new("RGB", (20, 20), "red")
    good.save(src / "ok.png")
    (src / "truncated.png").write_bytes((src / "ok.png").read_bytes()[:40])
    (src / "dangling.png").symlink_to(src / "missing.png")
    Image.new("CMYK", (16, 16), (10, 20, 30, 0)).save(src / "cmyk.jpg")
    Image.fromarray(np.full((16, 16), 40000, dtype=np.uint16)).save(src / "deep16.png")
    Image.new("RGBA", (19, 19), (0, 0, 255, 100)).save(src / "rgba.png")
    Image.new("P", (15, 15)).save(src / "palette.png")
    frames = [Image.new("RGB", (16, 16), c) for c in ("red", "blue")]
    frames[0].save(src / "anim.gif", save_all=True, append_images=frames[1:])
    Image.new("RGB", (1, 1)).save(src / "pixel.png")
    run = reconstruct_images(
        _cfg("generator.images_per_caption=1", "captioner.num_candidates=1"),
        src,
        tmp_path / "run",
        progress=False,
    )
    recs = {r["id"]: r for r in read_jsonl(run.path / "results.jsonl")[0]}
    assert len(recs) == 11
    failed = {i for i, r in recs.items() if r["status"] == "failed"}
    assert failed == {"empty.png", "text.png", "truncated.png", "dangling.png", "pixel.png"}
    for i in failed - {"pixel.png"}:
        assert str(src / i) in recs[i]["error"]
    assert "at least" in recs["pixel.png"]["error"]  # 1x1: too small for SSIM, recorded, not raised
    assert "failed" in (run.path / "report.html").read_text()


def test_text_to_image_to_text_records_and_escaping(tmp_path, tiny_models):
    texts = tmp_path / "texts.json"
    texts.write_text(json.dumps(["<script>alert(1)</script>", "", "word " * 2000, "emoji 🙂 and مرحبا"]))
    run = reconstruct_texts(_cfg(), texts, tmp_path / "run", progress=False)
    recs = read_jsonl(run.path / "results.jsonl")[0]
    assert [r["status"] for r in recs] == ["ok", "failed", "ok", "ok"]
    assert "empty" in recs[1]["error"].lower()
    assert any("truncated" in w for w in recs[2]["warnings"])
    ok = recs[0]
    assert len(ok["images"]) == 2 and len(ok["captions"]) == 2 and "clip_text_similarity" in ok["scores"]
    html = (run.path / "report.html").read_text()
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_resume_redoes_an_input_whose_content_changed(tmp_path, tiny_models, caplog):
    src = _images(tmp_path / "src", n=2)
    cfg = _cfg("generator.images_per_caption=1", "captioner.num_candidates=1")
    run = reconstruct_images(cfg, src, tmp_path / "run", progress=False)
    first = {r["id"]: r for r in run.records()}
    assert (
        first["img0.png"]["input_sha256"]
        and first["img0.png"]["input_sha256"] != first["img1.png"]["input_sha256"]
    )
    Image.new("RGB", (40, 40), "blue").save(src / "img1.png")  # same name, other picture
    recon = Reconstructor(cfg)
    run = reconstruct_images(cfg, src, run.path, progress=False, reconstructor=recon)
    assert "img1.png changed since it was recorded; redoing it" in caplog.text
    again = {r["id"]: r for r in run.records()}
    assert len(run.records()) == 2 and again["img0.png"] == first["img0.png"]
    assert again["img1.png"]["input_sha256"] != first["img1.png"]["input_sha256"]
    assert len(read_jsonl(run.path / "results.jsonl")[0]) == 3  # the old record is kept, the new one counts


def test_changed_text_is_redone_on_resume(tmp_path, tiny_models):
    texts = tmp_path / "t.json"
    texts.write_text(json.dumps({"a": "a red circle", "b": "a blue square"}))
    cfg = _cfg("generator.images_per_caption=1")
    reconstruct_texts(cfg, texts, tmp_path / "run", progress=False)
    texts.write_text(json.dumps({"a": "a red circle", "b": "a green star"}))
    run = reconstruct_texts(cfg, texts, tmp_path / "run", progress=False)
    assert {r["id"]: r["text"] for r in run.records()} == {"a": "a red circle", "b": "a green star"}


def test_an_empty_image_metric_list_stops_before_any_work(tmp_path):
    from recon.config import ConfigError

    src = _images(tmp_path / "src", n=1)
    with pytest.raises(ConfigError, match="similarity.image is empty"):
        reconstruct_images(
            _cfg("similarity.image=[]", "similarity.select_by=null"), src, tmp_path / "run", progress=False
        )
    assert not (tmp_path / "run").exists()  # nothing written that would lock the --out


def test_reconstruct_text_without_a_text_metric_warns_at_start(tmp_path, caplog):
    texts = tmp_path / "t.txt"
    texts.write_text("a red circle\n")
    cfg = _cfg("similarity.text=[]", "run.batch_size=1")
    with pytest.raises(RuntimeError):  # stop at the first item: the warning must come before any work
        reconstruct_texts(cfg, texts, tmp_path / "run", progress=False, reconstructor=_Boom())
    assert "similarity.text is empty" in caplog.text


class _Boom:
    def preflight(self, stages):
        raise RuntimeError("preflight reached")


def test_caption_refuses_two_images_that_share_a_captions_json_id_before_any_work(tmp_path):
    from recon.data import DataError
    from recon.jobs import caption_images

    src = _images(tmp_path / "src", n=1)
    Image.new("RGB", (8, 8)).save(src / "img0.jpg")
    with pytest.raises(DataError, match=r"img0\.jpg and .*img0\.png would share the image_id 'img0'"):
        caption_images(_cfg(), src, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


class _Captioner:
    """Three fixed candidates per image; counts its calls."""

    calls = 0

    def caption(self, images, num_candidates, decoding, seeds=None):
        type(self).calls += 1
        return [["cap zero", "cap one", "cap two"][:num_candidates] for _ in images]


class _Generator:
    """Solid images whose grey level is the value the test wants the metric to read; some flagged."""

    VALUES = {"cap zero": [0.4, 0.4], "cap one": [0.0, 0.56], "cap two": [0.2, 0.4]}
    FLAGGED = {"cap one": [True, False]}

    def generate(self, prompts, seeds):
        import torch

        from recon.generators.base import Generation

        seen: dict[str, int] = {}
        images, flagged = [], []
        for p in prompts:
            k = seen[p] = seen.get(p, -1) + 1
            images.append(torch.full((3, 8, 8), self.VALUES[p][k]))
            flagged.append(self.FLAGGED.get(p, [False, False])[k])
        return Generation(images=torch.stack(images), flagged=flagged, warnings=[[] for _ in prompts])


class _GreyDistance(__import__("torch").nn.Module):
    def forward(self, original, recon):
        return recon.mean(dim=(1, 2, 3))


def test_a_distance_selects_the_lowest_candidate_with_flagged_images_left_out():
    cfg = _cfg(
        "similarity.image=[{kind: lpips, random_backbone: true}]",
        "similarity.select_by=lpips_distance",
        "captioner.num_candidates=3",
        "generator.images_per_caption=2",
        "generator.common_random_numbers=true",
    )
    recon = Reconstructor(
        cfg, captioner=_Captioner(), generator=_Generator(), image_metrics={"lpips_distance": _GreyDistance()}
    )
    (rec,) = recon.image_to_text_to_image([Image.new("RGB", (8, 8))], ["a.png"])
    means = [c["scores"]["lpips_distance"] for c in rec["candidates"]]
    # cap one averages 0.28 over both images but 0.56 over the unflagged one: cap two (0.3) is the least distant
    assert means == pytest.approx([0.4, 0.56, 0.3], abs=1 / 255)
    assert rec["chosen"] == 2 and rec["caption"] == "cap two" and rec["select_by"] == "lpips_distance"
    assert rec["candidates"][1]["flagged"] == [True, False]


def test_a_changed_model_file_invalidates_the_cached_captions(tmp_path):
    from recon import hub

    model = tmp_path / "captioner"
    model.mkdir()
    (model / "weights.safetensors").write_bytes(b"v1")
    cfg = load_config("tiny-random", [f"captioner.model={model}", f"run.cache_dir={tmp_path / 'cache'}"])
    image = Image.new("RGB", (8, 8), "red")

    def caption_once():
        hub.fingerprint.cache_clear()  # a new process: fingerprints are memoised per process
        return Reconstructor(cfg, cache=Cache(tmp_path / "cache"), captioner=_Captioner()).caption(
            [image], ["a.png"], ["sha-of-a"]
        )

    _Captioner.calls = 0
    caption_once()
    caption_once()
    assert _Captioner.calls == 1  # the second run is served by the cache
    (model / "weights.safetensors").write_bytes(b"v2, retrained")
    caption_once()
    assert _Captioner.calls == 2  # new files, new cache keys: captioned again


# ------------------------------------------------------------------------------------ a cache that lies
class _SeededGenerator:
    """A solid image per seed (so any one image can be regenerated alone); counts the images it makes."""

    made = 0

    def generate(self, prompts, seeds):
        import torch

        from recon.generators.base import Generation

        type(self).made += len(prompts)
        images = torch.stack([torch.full((3, 8, 8), (s % 251) / 250) for s in seeds])
        return Generation(images=images, flagged=[False] * len(prompts), warnings=[[] for _ in prompts])


class _NanForTheDarkest(__import__("torch").nn.Module):
    """A distance that is NaN for the darkest reconstruction of a batch (a metric that breaks on one input)."""

    def forward(self, original, recon):
        import torch

        values = recon.mean(dim=(1, 2, 3))
        return torch.where(values == values.min(), torch.tensor(float("nan")), values)


def _cached_reconstructor(tmp_path, **roles):
    cfg = _cfg(
        f"run.cache_dir={tmp_path / 'cache'}",
        "similarity.image=[{kind: lpips, random_backbone: true}]",
        "similarity.select_by=lpips_distance",
        "captioner.num_candidates=2",
        "generator.images_per_caption=2",
    )
    return Reconstructor(cfg, cache=Cache(tmp_path / "cache"), **roles)


def test_damaged_cache_entries_are_rebuilt_with_a_warning_naming_the_file(tmp_path, caplog):
    def run():
        recon = _cached_reconstructor(
            tmp_path,
            captioner=_Captioner(),
            generator=_SeededGenerator(),
            image_metrics={"lpips_distance": _GreyDistance()},
        )
        return recon.image_to_text_to_image([Image.new("RGB", (8, 8))], ["a.png"], ["sha-of-a"])[0]

    first = run()
    cache = tmp_path / "cache"
    png = sorted(cache.glob("images/*/*.png"))[0]
    meta = sorted(cache.glob("images-meta/*/*.json"))[1]
    captions = sorted(cache.glob("captions/*/*.json"))[0]
    score = sorted(cache.glob("scores/*/*.json"))[0]
    png.write_bytes(png.read_bytes()[:40])  # a torn PNG
    meta.write_bytes(b"\xff\xfe{not json")  # not even text
    captions.write_text('{"not": "a list"}')  # JSON, not what the stage writes
    score.write_text('"0.5"')  # a string where a score was
    _SeededGenerator.made = 0
    with caplog.at_level("WARNING", logger="recon.runs"):
        again = run()
    assert again == first
    assert _SeededGenerator.made > 0  # the images were made again, ...
    for damaged in (png, meta, captions, score):
        assert any(str(damaged) in m and "damaged" in m for m in caplog.messages), damaged
        assert damaged.is_file()  # ... and every damaged entry was written again
    assert Image.open(png).size == (8, 8) and json.loads(score.read_text()) != "0.5"


def test_an_oversized_png_in_the_cache_is_a_miss_like_an_oversized_input(tmp_path, caplog):
    recon = _cached_reconstructor(tmp_path, generator=_SeededGenerator())
    (first,) = recon.render(["a cat"], [7])
    (path,) = (tmp_path / "cache").glob("images/*/*.png")
    Image.new("1", (9000, 9000)).save(path)  # 81 MP: over the 67 MP budget of load_image
    with caplog.at_level("WARNING", logger="recon.runs"):
        (again,) = _cached_reconstructor(tmp_path, generator=_SeededGenerator()).render(["a cat"], [7])
    assert again.png == first.png
    assert str(path) in caplog.text and "pixel budget" in caplog.text
    with Image.open(path) as im:
        assert im.size == (8, 8)  # rebuilt


def test_a_non_finite_score_is_never_cached_and_left_out_of_the_mean(tmp_path, caplog):
    recon = _cached_reconstructor(
        tmp_path, generator=_SeededGenerator(), image_metrics={"lpips_distance": _NanForTheDarkest()}
    )
    rendered = recon.render(["a cat", "a cat"], [3, 200])
    scored = recon.score_reconstructions(Image.new("RGB", (8, 8)), "sha-of-a", rendered)
    assert scored["per_image"]["lpips_distance"][0] is None  # the darkest, seed 3
    assert scored["scores"]["lpips_distance"] == pytest.approx(200 / 250, abs=1 / 255)
    assert any("1 of 2 reconstruction score(s) not finite" in w for w in scored["warnings"])
    json.dumps(scored, allow_nan=False)  # a record of it can be written
    (cached,) = (tmp_path / "cache").glob("scores/*/*.json")  # the finite score only
    cached.write_text("NaN")  # as a version that cached NaN left it: a miss, recomputed
    with caplog.at_level("WARNING", logger="recon.runs"):
        again = recon.score_reconstructions(Image.new("RGB", (8, 8)), "sha-of-a", rendered)
    assert again == scored and str(cached) in caplog.text
    assert json.loads(cached.read_text()) == pytest.approx(200 / 250, abs=1 / 255)
