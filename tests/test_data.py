"""recon.data and recon.captions_io: bad inputs are generated here, each must be a clear DataError or RGB."""

from __future__ import annotations

import io
import json
import os
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from recon import captions_io
from recon.data import (
    DataError,
    ImageItem,
    TextItem,
    image_to_tensor,
    list_images,
    load_image,
    load_texts,
    save_png,
    tensor_to_pil,
    to_rgb,
    validate_text,
    write_coco_results,
)


def _png_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _noise(size=(32, 24), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


# ------------------------------------------------------------------------------------------ bad images


def test_empty_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.png.*0 bytes"):
        load_image(tmp_path / "empty.png")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated(tmp_path, fmt):
    buf = io.BytesIO()
    _noise((64, 64)).save(buf, format=fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(DataError, match=rf"cut\.{fmt.lower()}.*truncated"):
        load_image(path)


def test_text_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n")
    with pytest.raises(DataError, match=r"notes\.png: not a recognised image"):
        load_image(path)


def test_missing_and_dangling_symlink(tmp_path):
    with pytest.raises(DataError, match=r"nope\.png: file not found"):
        load_image(tmp_path / "nope.png")
    link = tmp_path / "link.png"
    os.symlink(tmp_path / "gone.png", link)
    with pytest.raises(DataError, match=r"link\.png: dangling symlink"):
        load_image(link)
    with pytest.raises(DataError, match="is a directory"):
        load_image(tmp_path)


def _claim_size(png: bytes, width: int, height: int) -> bytes:
    """The PNG with its IHDR rewritten to claim another size (a decompression bomb's header)."""
    ihdr = png[12:16] + struct.pack(">II", width, height) + png[24:29]
    return png[:8] + png[8:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + png[33:]


def test_pixel_budget(tmp_path, monkeypatch):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_claim_size(_png_bytes(Image.new("RGB", (1, 1))), 9000, 9000))
    with pytest.raises(
        DataError, match=r"bomb\.png: 9000x9000 = 81\.0 MP is over the pixel budget of 67\.1 MP"
    ):
        load_image(bomb)
    bomb.write_bytes(_claim_size(_png_bytes(Image.new("RGB", (1, 1))), 20000, 20000))
    with pytest.raises(DataError, match=r"bomb\.png: .*exceeds limit"):  # Pillow's hard limit, as a DataError
        load_image(bomb, max_pixels=10**9)
    small = tmp_path / "small.png"
    small.write_bytes(_png_bytes(Image.new("RGB", (100, 100))))
    with pytest.raises(DataError, match="pixel budget"):
        load_image(small, max_pixels=5000)
    monkeypatch.setenv("RECON_MAX_PIXELS", "9999")
    with pytest.raises(DataError, match="pixel budget"):
        load_image(small)
    assert load_image(small, max_pixels=10000).size == (100, 100)


def test_large_image_under_budget_loads(tmp_path):
    path = tmp_path / "big.png"
    Image.new("L", (6000, 6000), 20).save(path, compress_level=1)  # 36 MP; grayscale keeps the test fast
    img = load_image(path)
    assert img.size == (6000, 6000) and img.mode == "RGB" and img.getpixel((5999, 5999)) == (20, 20, 20)


@pytest.mark.filterwarnings("error")
def test_pillow_warnings_never_raise(tmp_path, monkeypatch):
    path = tmp_path / "warn.png"
    Image.new("RGB", (12, 12), (1, 2, 3)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 144 px: a DecompressionBombWarning, not an error
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(path).getpixel((0, 0)) == (1, 2, 3)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # over twice Pillow's limit: its error, as ours
        with pytest.raises(DataError, match=r"warn\.png"):
            load_image(path)


# ------------------------------------------------------------------------------------------ modes


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=95)
    img = load_image(path)
    assert img.mode == "RGB"
    r, g, b = img.getpixel((8, 8))
    assert r > 240 and g < 15 and b < 15


@pytest.mark.parametrize("dtype", ["<u2", ">u2"])
def test_16_bit_scaled_not_clipped(tmp_path, dtype):
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    img16 = Image.fromarray(values.astype(dtype))
    assert img16.mode in ("I;16", "I;16B")
    expected = [0, 1, 128, 255]
    assert [p[0] for p in np.asarray(to_rgb(img16))[0]] == expected
    path = tmp_path / "deep.png"
    img16.save(path)
    loaded = np.asarray(load_image(path))
    assert loaded.shape == (1, 4, 3)
    assert np.abs(loaded[0, :, 0].astype(int) - expected).max() <= 1
    assert (loaded[..., 0] == loaded[..., 2]).all()


def test_32_bit_int_and_float_modes():
    as_int = Image.fromarray(np.array([[0, 65535]], dtype=np.int32))
    assert as_int.mode == "I" and np.asarray(to_rgb(as_int))[0, :, 0].tolist() == [0, 255]
    wide = Image.fromarray(np.array([[-10, 90]], dtype=np.int32))
    assert np.asarray(to_rgb(wide))[0, :, 0].tolist() == [0, 255]
    as_float = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert np.asarray(to_rgb(as_float))[0, :, 0].tolist() == [0, 128, 255]


def test_rgba_composited_on_white(tmp_path):
    arr = np.array([[[255, 0, 0, 0], [0, 0, 255, 255], [0, 0, 0, 128]]], dtype=np.uint8)
    path = tmp_path / "alpha.png"
    Image.fromarray(arr, "RGBA").save(path)
    px = np.asarray(load_image(path))[0].tolist()
    assert px[0] == [255, 255, 255] and px[1] == [0, 0, 255]
    assert all(abs(v - 127) <= 1 for v in px[2])


@pytest.mark.parametrize("fmt", ["png", "gif"])
def test_palette_with_transparency(tmp_path, fmt):
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    img.putpixel((1, 1), 1)
    path = tmp_path / f"pal.{fmt}"
    img.save(path, transparency=0)
    out = load_image(path)
    assert (
        out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1)) == (0, 200, 0)
    )


@pytest.mark.parametrize("mode,color", [("L", 77), ("LA", (77, 255)), ("1", 1)])
def test_grayscale_modes(tmp_path, mode, color):
    path = tmp_path / f"gray-{mode}.png"
    Image.new(mode, (3, 3), color).save(path)
    expected = (255,) * 3 if mode == "1" else (77,) * 3
    assert load_image(path).getpixel((1, 1)) == expected


@pytest.mark.parametrize("fmt", ["gif", "png", "webp"])
def test_animated_first_frame(tmp_path, fmt):
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    path = tmp_path / f"anim.{fmt}"
    extra = {"lossless": True} if fmt == "webp" else {}
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0, **extra)
    with Image.open(path) as check:
        assert getattr(check, "n_frames", 1) == 3
    r, g, b = load_image(path).getpixel((4, 4))
    assert r > 240 and g < 15 and b < 15


def test_one_pixel(tmp_path):
    path = tmp_path / "dot.bmp"
    Image.new("RGB", (1, 1), (9, 8, 7)).save(path)
    img = load_image(path)
    assert img.size == (1, 1) and img.getpixel((0, 0)) == (9, 8, 7)


def test_exif_orientation(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif, quality=95)
    out = load_image(path)
    assert out.size == (20, 40)
    top, bottom = out.getpixel((10, 5)), out.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 50 and bottom[2] > 200 and bottom[0] < 50


# ------------------------------------------------------------------------------------------ listing


def test_list_images(tmp_path):
    for rel in ["b.PNG", "a/c.jpeg", "a/d.TIFF", ".hidden/x.png", "a/.y.png", "notes.txt", "z/w.webp"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    os.symlink(tmp_path / "missing.png", tmp_path / "dangling.png")
    os.symlink(tmp_path / "a", tmp_path / "z" / "loop")  # a symlinked dir: followed once, no cycle
    items = list_images(tmp_path)
    assert [i.id for i in items] == ["a/c.jpeg", "a/d.TIFF", "b.PNG", "dangling.png", "z/w.webp"]
    assert items[0] == ImageItem("a/c.jpeg", tmp_path / "a" / "c.jpeg")
    assert list_images(tmp_path) == items
    assert list_images(tmp_path / "b.PNG") == [ImageItem("b.PNG", tmp_path / "b.PNG")]


def test_list_images_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".hidden.png").write_bytes(b"x")
    with pytest.raises(DataError, match="no images"):
        list_images(tmp_path / "empty")
    with pytest.raises(DataError, match="no such file"):
        list_images(tmp_path / "absent")
    (tmp_path / "captions.json").write_text("[]")
    with pytest.raises(DataError, match="not an image file"):
        list_images(tmp_path / "captions.json")


# ------------------------------------------------------------------------------------------ texts

LONG = "a" * 10_000
UNICODE = "a cat 🐱 on a mat — مرحبا بالعالم שלום"


def test_load_texts_txt(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(f"\ufefffirst\n\n   \n{LONG}\r\n  {UNICODE}  \n", encoding="utf-8")
    assert load_texts(path) == [
        TextItem("line-1", "first"),
        TextItem("line-4", LONG),
        TextItem("line-5", UNICODE),
    ]


def test_load_texts_json_shapes(tmp_path):
    cases = {
        "strings.json": (["a", "", None, UNICODE], [("0", "a"), ("1", ""), ("2", None), ("3", UNICODE)]),
        "objects.json": (
            [{"id": 7, "text": "x"}, {"image_id": "im", "caption": LONG}],
            [("7", "x"), ("im", LONG)],
        ),
        "mapping.json": ({"b": "x", "a": UNICODE}, [("b", "x"), ("a", UNICODE)]),
    }
    for name, (data, expected) in cases.items():
        (tmp_path / name).write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        assert [(t.id, t.text) for t in load_texts(tmp_path / name)] == expected, name
    lines = ['"plain"', "", json.dumps({"id": "k", "text": UNICODE}, ensure_ascii=False), '{"m": "mapped"}']
    (tmp_path / "t.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert [(t.id, t.text) for t in load_texts(tmp_path / "t.jsonl")] == [
        ("line-1", "plain"),
        ("k", UNICODE),
        ("m", "mapped"),
    ]


def test_validate_text():
    assert validate_text("a cat") is None and validate_text(LONG) is None
    assert "empty" in validate_text("")
    assert "whitespace" in validate_text(" \t\n")
    assert "null" in validate_text(None)
    assert "not a string" in validate_text(3)


def test_load_texts_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[\n  "ok",\n  "missing comma" "here"\n]')
    with pytest.raises(DataError, match=r"bad\.json: not valid JSON at line 3, column"):
        load_texts(bad)
    bad_lines = tmp_path / "bad.jsonl"
    bad_lines.write_text('"fine"\n\n{"id": 1, "text": }\n')
    with pytest.raises(DataError, match=r"bad\.jsonl: not valid JSON at line 3, column"):
        load_texts(bad_lines)
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps([{"id": "a", "text": "x"}, {"id": "b"}]))
    with pytest.raises(DataError, match=r"missing\.json: entry 1: missing key 'text' or 'caption'"):
        load_texts(missing)
    dup = tmp_path / "dup.json"
    dup.write_text(json.dumps([{"id": "a", "text": "x"}, {"id": "a", "text": "y"}]))
    with pytest.raises(DataError, match=r"dup\.json: entry 1: duplicate id 'a' \(first at entry 0\)"):
        load_texts(dup)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("ok\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.txt: line 2: not valid UTF-8"):
        load_texts(latin)
    with pytest.raises(DataError, match="unknown text file type"):
        load_texts(tmp_path / "texts.csv")


# ------------------------------------------------------------------------------------------ annotations


def test_coco_captions(tmp_path):
    data = {
        "images": [
            {"id": 1, "file_name": "a.jpg"},
            {"id": "2", "file_name": "b.jpg"},
            {"id": 1, "file_name": "dup.jpg"},
        ],
        "annotations": [
            {"image_id": 1, "caption": " A dog. "},
            {"image_id": 1, "caption": "A puppy"},
            {"image_id": 2, "caption": UNICODE},
            {"image_id": "007", "caption": "stray"},
            {"image_id": 2, "caption": None},
        ],
    }
    path = tmp_path / "captions_val.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    refs = captions_io.read_coco_captions(path)
    assert refs.refs == {1: ["A dog.", "A puppy"], 2: [UNICODE], "007": ["stray"]}
    assert refs.file_names == {1: "a.jpg", 2: "b.jpg"}
    messages = [p.message for p in refs.problems]
    assert len(messages) == 3 and "images[2]: duplicate id 1" in messages[0]
    assert "'007' is not in 'images'" in messages[1] and "annotations[4]: caption is null" in messages[2]
    data["annotations"].append({"image_id": 3})
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"captions_val\.json: annotations\[5\]: missing key 'caption'"):
        captions_io.read_coco_captions(path)
    path.write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match="missing top-level key 'annotations'"):
        captions_io.read_coco_captions(path)


def test_karpathy(tmp_path):
    def entry(name, split, cocoid=None, raws=("a", "b")):
        e = {"filename": name, "split": split, "sentences": [{"raw": r, "tokens": []} for r in raws]}
        if cocoid is not None:
            e.update(cocoid=cocoid, filepath="val2014")
        return e

    path = tmp_path / "dataset_coco.json"
    path.write_text(
        json.dumps(
            {
                "images": [
                    entry("x.jpg", "test", 5),
                    entry("y.jpg", "train", 6),
                    entry("123.jpg", "test"),
                    entry("z.jpg", "test", 5),
                ]
            }
        )
    )
    refs = captions_io.read_karpathy(path, split="test")
    assert refs.refs == {5: ["a", "b"], 123: ["a", "b"]}
    assert refs.file_names == {5: "val2014/x.jpg", 123: "123.jpg"}
    assert len(refs.problems) == 1 and "images[3]: duplicate id 5" in refs.problems[0].message
    assert set(captions_io.read_karpathy(path, ("train", "restval")).refs) == {6}
    assert set(captions_io.read_karpathy(path).refs) == {5, 6, 123}
    with pytest.raises(DataError, match=r"no images in split \['val'\]; the file has \['test', 'train'\]"):
        captions_io.read_karpathy(path, "val")
    path.write_text(
        json.dumps({"images": [{"filename": "a.jpg", "split": "test", "sentences": [{"tokens": []}]}]})
    )
    with pytest.raises(DataError, match=r"images\[0\]\.sentences\[0\]: missing key 'raw'"):
        captions_io.read_karpathy(path)


def test_caption_files_and_results(tmp_path):
    """One reader for caption files (recon.scoring.inputs.read_caption_set): clipscore-style objects and COCO
    results lists, bad entries kept as entries with an error, duplicates left for build_items to resolve."""
    from recon.scoring.inputs import read_caption_set

    path = tmp_path / "candidates.json"
    path.write_text('{"img1": "a cat", "img2": "x", "img1": "later", "003": null}')
    entries = read_caption_set(path, "s").entries
    assert [(e.key, e.caption) for e in entries] == [
        ("img1", "a cat"),
        ("img2", "x"),
        ("img1", "later"),
        ("003", None),
    ]
    assert [e.error is None for e in entries] == [True, True, True, False] and "text is null" in entries[
        3
    ].error
    refs_path = tmp_path / "refs.json"
    refs_path.write_text(json.dumps({"img1": ["a", "b"], "img2": "c"}))
    assert captions_io.read_clipscore_references(refs_path).refs == {"img1": ["a", "b"], "img2": ["c"]}
    with pytest.raises(DataError, match="references file"):
        read_caption_set(refs_path, "s")

    out = tmp_path / "sub" / "results.json"
    write_coco_results(out, [(42, UNICODE), ("43", "b"), ("im_7", "c")])
    assert os.listdir(out.parent) == ["results.json"]
    assert json.loads(out.read_text(encoding="utf-8"))[0] == {"image_id": 42, "caption": UNICODE}
    assert {e.key: e.caption for e in read_caption_set(out, "s").entries} == {
        "42": UNICODE,
        "43": "b",
        "im_7": "c",
    }
    with pytest.raises(ValueError, match="duplicate image_id 42"):
        write_coco_results(out, [(42, "a"), ("42", "b")])
    out.write_text(json.dumps([{"image_id": 1, "caption": "a"}, {"caption": "c"}]))
    assert "entry 1: missing key 'image_id'" in read_caption_set(out, "s").entries[1].error


# ------------------------------------------------------------------------------------------ tensors, PNG


def test_tensor_round_trip():
    img = _noise()
    t = image_to_tensor(img)
    assert t.shape == (3, 24, 32) and t.dtype == torch.float32 and 0 <= t.min() and t.max() <= 1
    assert tensor_to_pil(t).tobytes() == img.tobytes()
    assert tensor_to_pil(t[None]).size == (32, 24)
    odd = torch.tensor([[[-1.0, 2.0, float("nan")]]]).expand(3, 1, 3)
    assert list(tensor_to_pil(odd).getpixel((1, 0))) == [255] * 3
    assert image_to_tensor(Image.new("L", (2, 2), 255)).min() == 1.0
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        tensor_to_pil(torch.zeros(4, 2, 2))


def test_save_png_deterministic(tmp_path):
    img = _noise()
    img.info["icc_profile"] = b"not really a profile"
    a, b = save_png(img, tmp_path / "a.png"), save_png(image_to_tensor(img), tmp_path / "x" / "b.png")
    assert a.read_bytes() == b.read_bytes()
    for chunk in (b"tIME", b"tEXt", b"iCCP", b"eXIf"):
        assert chunk not in a.read_bytes()
    assert load_image(b).tobytes() == img.tobytes()
    assert sorted(os.listdir(tmp_path / "x")) == ["b.png"]
    with pytest.raises(ValueError, match="PNG only"):
        save_png(img, tmp_path / "a.jpg")


def test_an_unreadable_subfolder_is_named_not_skipped_silently(tmp_path, monkeypatch, caplog):
    """chmod 000 on a subfolder (simulated: the tests may run as root, whom permissions do not stop)."""
    from recon.data import list_images

    (tmp_path / "locked").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "locked" / "b.png")
    real = os.scandir

    def scandir(path="."):
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert [it.id for it in list_images(tmp_path)] == ["a.png"]
    assert f"{tmp_path / 'locked'} cannot be read (Permission denied); its images are left out" in caplog.text


def test_experiment_docstrings_name_presets_that_exist():
    import re
    from pathlib import Path

    from recon.config import preset_path

    scripts = sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.py"))
    named = {m for p in scripts for m in re.findall(r"--preset ([\w.-]+)", p.read_text())}
    assert named and all(preset_path(name).is_file() for name in named)
