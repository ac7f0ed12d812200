import errno
import json
import os

import pytest

from recon.config import load_config
from recon.runs import Cache, RunDir, RunError, derive_seed, read_jsonl


def test_derive_seed_is_stable_and_distinct():
    assert derive_seed(0, "a.png", 0, 0) == derive_seed(0, "a.png", 0, 0)
    seeds = {derive_seed(s, i, c, k) for s in (0, 1) for i in ("a", "b") for c in (0, 1) for k in (0, 1)}
    assert len(seeds) == 16 and all(0 <= s < 2**63 for s in seeds)


def test_append_resume_and_torn_tail(tmp_path):
    cfg = load_config("tiny-random")
    run = RunDir(tmp_path, cfg)
    run.append({"id": "a", "status": "ok"})
    run.append({"id": "b", "status": "failed", "error": "x"})
    with open(run.results_path, "ab") as f:  # a kill mid-write leaves a torn line
        f.write(b'{"id": "c", "sta')
    with pytest.raises(RunError, match="in use by recon pid"):  # one process per run directory at a time
        RunDir(tmp_path, cfg)
    run.close()
    again = RunDir(tmp_path, cfg)
    assert again.done("a") and again.done("b") and not again.done("c")
    assert not again.done("b", retry_failed=True)
    again.append({"id": "c", "status": "ok"})
    lines = run.results_path.read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == ["a", "b", "c"]


def test_config_change_refused_but_volatile_keys_allowed(tmp_path):
    run = RunDir(tmp_path, load_config("tiny-random"))
    run.append({"id": "a", "status": "ok"})
    run.close()
    RunDir(tmp_path, load_config("tiny-random", ["run.batch_size=1", "run.device=cpu"])).close()
    with pytest.raises(RunError, match="generator.guidance_scale"):
        RunDir(tmp_path, load_config("tiny-random", ["generator.guidance_scale=2"]))


def test_a_run_stopped_before_its_first_record_takes_a_fixed_config(tmp_path):
    """A preset that fails its preflight (an empty preset: no model ids) leaves a config.yaml but no record: the
    rerun with the fixed config proceeds instead of being refused as a different run."""
    RunDir(tmp_path, load_config("tiny-random", ["generator.guidance_scale=2"])).close()
    run = RunDir(tmp_path, load_config("tiny-random"))
    assert "guidance_scale: 5.0" in (tmp_path / "config.yaml").read_text()
    run.close()


def test_shards_merge_in_item_order(tmp_path):
    cfg = load_config("tiny-random")
    r0, r1 = RunDir(tmp_path, cfg, 0, 2), RunDir(tmp_path, cfg, 1, 2)
    r1.append({"id": "b", "status": "ok"})
    r0.append({"id": "a", "status": "ok"})
    r0.append({"id": "c", "status": "ok"})
    merged = r0.merge_shards(["a", "b", "c"])
    assert [r["id"] for r in merged] == ["a", "b", "c"]
    assert not list(tmp_path.glob("results.rank*.jsonl"))
    assert [r["id"] for r in read_jsonl(tmp_path / "results.jsonl")[0]] == ["a", "b", "c"]


def test_cache_roundtrip_and_disabled(tmp_path):
    c = Cache(tmp_path)
    k = c.key(stage="x", seed=1)
    assert k != c.key(stage="x", seed=2)
    assert c.get_json("ns", k) is None
    c.put_json("ns", k, [1, "a"])
    c.put_bytes("img", k, b"\x89PNG", ".png")
    assert c.get_json("ns", k) == [1, "a"] and c.get_bytes("img", k, ".png") == b"\x89PNG"
    off = Cache(None)
    off.put_json("ns", k, 1)
    assert off.get_json("ns", k) is None


def test_resume_sets_corrupt_lines_aside_and_keeps_every_record(tmp_path):
    cfg = load_config("tiny-random")
    run = RunDir(tmp_path, cfg)
    for i in range(3):
        run.append({"id": f"a{i}", "status": "ok"})
    run.close()
    path = tmp_path / "results.jsonl"
    valid = path.read_bytes()
    lines = valid.splitlines(keepends=True)
    # a corrupt line in the middle, then 12 more valid records, then a line torn by a kill
    more = b"".join(b'{"id": "b%d", "status": "ok"}\n' % i for i in range(12))
    path.write_bytes(lines[0] + b'{"id": "x", "sta\n' + b"".join(lines[1:]) + more + b'{"id": "torn"')
    resumed = RunDir(tmp_path, cfg)
    kept = read_jsonl(path)[0]
    assert [r["id"] for r in kept] == ["a0", "a1", "a2"] + [f"b{i}" for i in range(12)]
    assert all(resumed.done(r["id"]) for r in kept)
    assert (tmp_path / "results.jsonl.corrupt").read_bytes() == b'{"id": "x", "sta\n{"id": "torn"\n'
    assert read_jsonl(path)[1] == []  # the file is clean again; a second resume moves nothing
    resumed.close()
    RunDir(tmp_path, cfg)
    assert (tmp_path / "results.jsonl.corrupt").read_bytes().count(b"\n") == 2


def test_out_that_is_a_file_or_a_damaged_config_is_a_clear_error(tmp_path):
    cfg = load_config("tiny-random")
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(RunError, match="is a file, not a directory"):
        RunDir(afile, cfg)
    RunDir(tmp_path / "run", cfg).append({"id": "a", "status": "ok"})
    (tmp_path / "run" / "config.yaml").write_text("run: [unclosed\n")
    with pytest.raises(RunError, match="config.yaml is damaged"):
        RunDir(tmp_path / "run", cfg)


def test_finetune_out_checks(tmp_path):
    from recon.train.config import load_finetune_config
    from recon.train.joint import write_or_check_config

    cfg = load_finetune_config("finetune-shapes-smoke")
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(RunError, match="is a file"):
        write_or_check_config(afile, cfg)
    write_or_check_config(tmp_path / "ft", cfg)
    (tmp_path / "ft" / "finetune.yaml").write_bytes(b"\xff\xfe: [")
    with pytest.raises(RunError, match="finetune.yaml is damaged"):
        write_or_check_config(tmp_path / "ft", cfg)


def test_item_folders_never_collide(tmp_path):
    run = RunDir(tmp_path, load_config("tiny-random"))
    ids = [
        "a..b.png",
        "a__b.png",
        ".",
        "",
        "../etc/passwd",
        "sub/dir/x.png",
        "sub_dir_x.png",
        "<img src=x>.png",
    ]
    folders = [run.image_path(i, "original.png").parent for i in ids]
    assert len(set(folders)) == len(ids)
    for f in folders:  # one flat folder under images/, never outside it
        assert f.parent == run.images_dir and f.name.isprintable() and "/" not in f.name
    assert run.image_path("cat.png", "k0.png") == run.image_path("cat.png", "k0.png")  # stable across calls


def test_a_run_inside_its_input_folder_never_reads_its_outputs(tmp_path):
    from PIL import Image

    from recon.jobs import input_images

    for name in ("a.png", "b.png", "out/images/a-1234abcd/original.png", "out/images/a-1234abcd/c0_k0.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    assert [it.id for it in input_images(tmp_path, tmp_path / "out")] == ["a.png", "b.png"]
    assert len(input_images(tmp_path, tmp_path.parent / "elsewhere")) == 4


def test_one_command_per_run_directory(tmp_path):
    cfg = load_config("tiny-random")
    run = RunDir(tmp_path, cfg)
    run.claim("caption")
    run.claim("caption")  # the same command resumes
    with pytest.raises(
        RunError, match="holds a `recon caption` run; `recon reconstruct` needs its own --out"
    ):
        run.claim("reconstruct")


def test_a_cache_path_that_is_a_file_stops_before_any_work(tmp_path):
    afile = tmp_path / "cachefile"
    afile.write_text("x")
    with pytest.raises(RunError, match="cache directory .*cachefile.* cannot be used"):
        Cache(afile)
    with pytest.raises(RunError, match="cannot be used"):
        Cache(afile / "sub")


# ------------------------------------------------------- the machine's fault is not an item's failure
def _tiny_images(folder, n):
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
            folder / f"im{i}.png"
        )
    return folder


def _tiny_cfg():
    return load_config(
        "tiny-random",
        [
            "run.cache_dir=''",
            "run.batch_size=2",
            "generator.num_inference_steps=1",
            "generator.images_per_caption=1",
            "captioner.num_candidates=1",
        ],
    )


def test_a_full_or_read_only_disk_stops_the_run_and_fails_no_item(tmp_path, tiny_models, monkeypatch):
    import recon.jobs as jobs

    code = errno.ENOSPC
    for other in (errno.EROFS, errno.EDQUOT):  # the same rule, without another run
        wrapped = ValueError("while saving")
        wrapped.__cause__ = OSError(other, os.strerror(other))
        assert jobs.environment_error(wrapped).errno == other
    assert (
        jobs.environment_error(OSError(errno.ENOENT, "gone")) is None
    )  # an item's own missing file fails it

    src = _tiny_images(tmp_path / "src", 3)
    real, calls = jobs.atomic_write_bytes, []

    def write(path, data):  # the disk fills up after the first batch's images (2 items x 2 images)
        calls.append(path)
        if len(calls) > 4:
            raise OSError(code, os.strerror(code), str(path))
        return real(path, data)

    monkeypatch.setattr(jobs, "atomic_write_bytes", write)
    with pytest.raises(RunError, match=rf"stopped: {os.strerror(code)} writing .*records so far are kept"):
        jobs.reconstruct_images(_tiny_cfg(), src, tmp_path / "run", progress=False)
    kept = read_jsonl(tmp_path / "run" / "results.jsonl")[0]
    assert [r["status"] for r in kept] == [
        "ok",
        "ok",
    ]  # the finished batch is kept; no item is recorded failed
    monkeypatch.setattr(jobs, "atomic_write_bytes", real)  # space freed: a plain rerun finishes every item
    run = jobs.reconstruct_images(_tiny_cfg(), src, tmp_path / "run", progress=False)
    assert [r["status"] for r in run.records()] == ["ok"] * 3


def test_an_unwritable_out_or_cache_is_one_clear_error_before_any_work(tmp_path, monkeypatch):
    import tempfile

    import recon.runs as runs
    from recon.jobs import make_cache

    def read_only(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(runs, "lock_run_dir", read_only)
    with pytest.raises(RunError, match=r"--out .*out cannot be written \(Read-only file system\)"):
        RunDir(tmp_path / "out", load_config("tiny-random"))
    monkeypatch.undo()
    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    with pytest.raises(RunError, match=r"cache directory .*cache cannot be used \(Read-only file system\)"):
        make_cache(load_config("tiny-random", [f"run.cache_dir={tmp_path / 'cache'}"]))


def test_a_resumed_run_counts_only_its_current_inputs(tmp_path, tiny_models):
    from recon.jobs import reconstruct_images
    from recon.runs import read_records

    src = _tiny_images(tmp_path / "src", 4)
    run = reconstruct_images(_tiny_cfg(), src, tmp_path / "run", progress=False)
    assert len(run.records()) == 4
    (src / "im0.png").unlink()
    (src / "im1.png").rename(src / "renamed.png")
    run = reconstruct_images(_tiny_cfg(), src, tmp_path / "run", progress=False)
    assert sorted(r["id"] for r in run.records()) == ["im2.png", "im3.png", "renamed.png"]
    assert len(read_jsonl(run.path / "results.jsonl")[0]) == 5  # the old records stay on disk
    assert sorted(r["id"] for r in read_records(run.path / "results.jsonl")) == [
        "im2.png",
        "im3.png",
        "renamed.png",
    ]
    assert ": 3 records," in (run.path / "report.html").read_text()


def test_the_progress_bar_moves_per_item_inside_a_batch(tmp_path, tiny_models, monkeypatch):
    """One batch of 4 items: the bar counts items as their images are generated, not 0/4 until the batch ends."""
    import recon.jobs as jobs

    seen = []

    class Bar(jobs.tqdm):
        def refresh(self, *a, **k):
            seen.append(self.n)
            return super().refresh(*a, **k)

    monkeypatch.setattr(jobs, "tqdm", Bar)
    src = _tiny_images(tmp_path / "src", 4)
    cfg = load_config(
        "tiny-random",
        [
            "run.cache_dir=''",
            "run.batch_size=4",
            "generator.num_inference_steps=2",
            "generator.images_per_caption=2",
            "captioner.num_candidates=1",
        ],
    )
    jobs.reconstruct_images(cfg, src, tmp_path / "run", progress=True)
    assert [n for n in seen if 0 < n < 4] == [1, 2, 3] and seen[-1] == 4  # counted while the batch generates
