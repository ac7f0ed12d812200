"""Inputs and outputs on disk: robust image decoding, image folders, text files, PNG and COCO results files.
(Over 400 lines on purpose: one home for every file format recon reads or writes, so each failure reads the same.)

Every failure a user can cause with a file (empty, truncated, not an image, malformed JSON, a missing key)
is a :class:`DataError` whose message names the file (and the line or entry) and says what to do. A run
records it as a per-item failure instead of stopping.

Dataset annotation files (COCO, Karpathy, clipscore-style, COCO results) are read by :mod:`recon.captions_io`.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import secrets
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps

if TYPE_CHECKING:  # torch loads where a tensor is made: `recon report` and `recon presets` never import it
    import torch

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Largest image decoded, in pixels (8k x 8k). A larger header is refused before decoding: a tiny file can
# claim billions of pixels. Raise it per call (``max_pixels=``) or with $RECON_MAX_PIXELS. Pillow's own hard
# limit (2 x Image.MAX_IMAGE_PIXELS, ~179 MP) still applies above that; we never change Pillow's globals.
MAX_PIXELS = 8192 * 8192


class DataError(ValueError):
    """A file cannot be used as input; the message names the file (and line / entry) and what to do."""


# ----------------------------------------------------------------------------------------------- images


def _max_pixels(max_pixels: int | None) -> int:
    if max_pixels is not None:
        return max_pixels
    env = os.environ.get("RECON_MAX_PIXELS")
    try:
        return int(env) if env else MAX_PIXELS
    except ValueError:
        raise DataError(f"$RECON_MAX_PIXELS={env!r} is not an integer number of pixels") from None


def _check_file(path: Path) -> None:
    if not os.path.lexists(path):
        raise DataError(f"{path}: file not found")
    if not path.exists():
        raise DataError(f"{path}: dangling symlink to {os.readlink(path)}; fix or remove the link")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file (0 bytes); re-export or remove it")


def load_image(path: str | Path, max_pixels: int | None = None) -> Image.Image:
    """Decode ``path`` fully into an 8-bit RGB image.

    Applies the EXIF orientation; animated files (GIF, APNG, WebP) give their first frame; every mode is
    normalised by :func:`to_rgb` (transparency is composited on white, 16-bit is rescaled, not clipped).
    Raises :class:`DataError` naming the path for missing, empty, truncated or non-image files and for images
    over ``max_pixels`` (default :data:`MAX_PIXELS`). Pillow's warnings are logged at debug level, never
    raised (``catch_warnings`` is process-global: decode from one thread at a time if warnings matter).
    """
    path = Path(path)
    _check_file(path)
    budget = _max_pixels(max_pixels)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with Image.open(path) as im:
                width, height = im.size
                if width * height > budget:
                    raise DataError(
                        f"{path}: {width}x{height} = {width * height / 1e6:.1f} MP is over the pixel budget of "
                        f"{budget / 1e6:.1f} MP; downscale it or raise max_pixels / $RECON_MAX_PIXELS"
                    )
                im.seek(0)  # animated: the first frame
                im.load()
                ImageOps.exif_transpose(im, in_place=True)
                rgb = to_rgb(im)  # a copy: closing the file invalidates ``im``
        except DataError:
            raise
        except Image.DecompressionBombError as e:
            raise DataError(f"{path}: {e}; downscale it") from None
        except Exception as e:  # Pillow's decoders raise OSError, SyntaxError, ValueError, EOFError, ...
            kind = (
                "not a recognised image" if isinstance(e, Image.UnidentifiedImageError) else "cannot decode"
            )
            raise DataError(
                f"{path}: {kind} ({type(e).__name__}: {e}); re-export it as PNG or remove it"
            ) from None
    for w in caught:
        log.debug("%s: %s", path, w.message)
    return rgb


def to_rgb(img: Image.Image) -> Image.Image:
    """Return an 8-bit RGB copy of ``img`` (any Pillow mode).

    - alpha (RGBA, LA, PA, palette or colour-key transparency): composited on white, because generated and
      displayed images are opaque and white is what a viewer shows behind most transparent images;
    - 16-bit (I;16, I;16B, I;16L): ``round(v * 255 / 65535)``, so 65535 -> 255 and 32768 -> 128;
    - I (32-bit int): treated as 16-bit when its values fit in [0, 65535] (how Pillow reads 16-bit files),
      otherwise min-max normalised; F (float): [0, 1] scaled by 255 when it fits, otherwise min-max;
    - CMYK, YCbCr, grayscale, 1-bit, palette: Pillow's conversion.
    """
    if img.mode.startswith("I") or img.mode == "F":
        gray = _scale_to_uint8(np.asarray(img), img.mode)
        return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode == "RGB":
        return img.copy()
    return img.convert("RGB")


def _scale_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    a = a.astype(np.float64)
    if mode.startswith("I;16") or (mode == "I" and a.size and a.min() >= 0 and a.max() <= 65535):
        return np.floor(a * 255.0 / 65535.0 + 0.5).astype(np.uint8)
    if mode == "F" and a.size and np.isfinite(a).all() and a.min() >= 0 and a.max() <= 1:
        return np.floor(a * 255.0 + 0.5).astype(np.uint8)
    a = np.nan_to_num(a)
    lo, hi = (a.min(), a.max()) if a.size else (0.0, 0.0)
    return np.floor((a - lo) * (255.0 / (hi - lo) if hi > lo else 0.0) + 0.5).astype(np.uint8)


@dataclass(frozen=True)
class ImageItem:
    """One image of a folder: ``id`` is its path relative to the root, with forward slashes."""

    id: str
    path: Path


def list_images(root: str | Path) -> list[ImageItem]:
    """Image files under ``root`` (recursive, sorted by id), or ``root`` itself when it is an image file.

    Extensions (any case): png, jpg, jpeg, webp, bmp, gif, tif, tiff. Hidden files and directories (a name
    starting with ".") are skipped. Dangling symlinks are listed: they fail when loaded, per item.
    Symlinked directories are followed once each (cycles are skipped).
    """
    root = Path(root)
    if not os.path.lexists(root):
        raise DataError(f"{root}: no such file or directory")
    if not root.is_dir():
        if root.suffix.lower() not in IMAGE_EXTENSIONS:
            raise DataError(f"{root}: not an image file (expected one of {', '.join(IMAGE_EXTENSIONS)})")
        return [ImageItem(root.name, root)]
    items = []
    seen_dirs = {root.resolve()}

    def unreadable(e: OSError) -> None:  # a folder without read permission: said, not silently skipped
        log.warning("%s cannot be read (%s); its images are left out", e.filename, e.strerror or e)

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable, followlinks=True):
        keep = []
        for d in sorted(dirnames):
            real = (Path(dirpath) / d).resolve()
            if not d.startswith(".") and real not in seen_dirs:
                seen_dirs.add(real)
                keep.append(d)
        dirnames[:] = keep
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                path = Path(dirpath) / name
                items.append(ImageItem(path.relative_to(root).as_posix(), path))
    if not items:
        raise DataError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) found; hidden files are skipped")
    return sorted(items, key=lambda item: item.id)


# ------------------------------------------------------------------------------------------------ texts


@dataclass(frozen=True)
class TextItem:
    """One input text. ``text`` is kept as read (possibly empty or None): check it with :func:`validate_text`."""

    id: str
    text: str | None


def validate_text(text: Any) -> str | None:
    """An error message when ``text`` cannot be used as a prompt or reference, else None."""
    if text is None:
        return "text is null"
    if not isinstance(text, str):
        return f"text is a {type(text).__name__}, not a string"
    if not text:
        return "text is empty"
    if not text.strip():
        return "text is whitespace only"
    return None


class _JsonObject(dict):
    """A JSON object that remembers its (key, value) pairs in order, duplicates included."""

    def __init__(self, pairs: list[tuple[str, Any]]):
        super().__init__()
        for key, value in pairs:
            self.setdefault(key, value)  # the first occurrence wins in the dict view
        self.pairs = pairs


def read_text_file(path: str | Path) -> str:
    """The UTF-8 text of ``path`` (a leading BOM is dropped), with a :class:`DataError` for unreadable files."""
    path = Path(path)
    _check_file(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}: line {line}: not valid UTF-8 (byte {e.start}); save the file as UTF-8"
        ) from None


def parse_json(text: str, path: Path, line: int | None = None) -> Any:
    """Parse JSON; objects come back as dicts keeping the first of duplicate keys (``.pairs`` has all)."""
    try:
        return json.loads(text, object_pairs_hook=_JsonObject)
    except json.JSONDecodeError as e:
        where = f"line {line}, column {e.colno}" if line is not None else f"line {e.lineno}, column {e.colno}"
        raise DataError(f"{path}: not valid JSON at {where}: {e.msg}; fix the file") from None
    except RecursionError:
        raise DataError(
            f"{path}{f': line {line}' if line is not None else ''}: JSON nested too deeply to read "
            "(over Python's recursion limit); flatten the file"
        ) from None
    except ValueError as e:  # an integer literal over Python's int conversion limit (4300 digits)
        raise DataError(
            f"{path}{f': line {line}' if line is not None else ''}: cannot read a number ({e}); write "
            "long ids as strings"
        ) from None


def read_json(path: str | Path) -> Any:
    return parse_json(read_text_file(path), Path(path))


def read_jsonl(path: str | Path) -> list[tuple[int, Any]]:
    """``(line number, value)`` for each non-blank line of a JSON-lines file."""
    path = Path(path)
    return [
        (n, parse_json(line, path, n))
        for n, line in enumerate(read_text_file(path).split("\n"), 1)
        if line.strip()
    ]


def entry_field(entry: Any, keys: tuple[str, ...], path: Path, where: str) -> Any:
    """The value of the first of ``keys`` present in the JSON object ``entry``, else a DataError."""
    if not isinstance(entry, dict):
        raise DataError(f"{path}: {where}: expected an object with {keys[0]!r}, got {type(entry).__name__}")
    for key in keys:
        if key in entry:
            return entry[key]
    alternatives = " or ".join(repr(k) for k in keys)
    raise DataError(f"{path}: {where}: missing key {alternatives}")


def _text_items(value: Any, path: Path, where: str, default_id: str) -> list[tuple[str, Any, str]]:
    """(id, text, where) triples of one JSON value: a string, an {id, text} object, or an {id: text} map."""
    if value is None or isinstance(value, str):
        return [(default_id, value, where)]
    if isinstance(value, dict) and any(k in value for k in ("text", "caption", "id", "image_id")):
        text = entry_field(value, ("text", "caption"), path, where)
        return [(str(entry_field(value, ("id", "image_id"), path, where)), text, where)]
    if isinstance(value, dict):
        return [(str(k), v, f"{where}, key {k!r}") for k, v in value.pairs]
    raise DataError(
        f"{path}: {where}: expected a string or an object with 'id' and 'text', got {type(value).__name__}"
    )


def load_texts(path: str | Path) -> list[TextItem]:
    """Read input texts.

    - ``.txt``: one text per line, stripped; blank lines skipped; id ``line-{n}`` (1-based line number).
    - ``.json``: a list of strings (id = list index), a list of ``{"id", "text"}`` (or ``{"image_id",
      "caption"}``) objects, or an ``{id: text}`` object.
    - ``.jsonl``: one such value per line; a bare string gets id ``line-{n}``.

    Empty and null texts are kept (see :func:`validate_text`); ids are strings. Duplicate ids raise a
    :class:`DataError`: an id names the item's outputs, so two different texts may not share one.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".txt":
        lines = read_text_file(path).split("\n")
        triples = [
            (f"line-{n}", line.strip(), f"line {n}") for n, line in enumerate(lines, 1) if line.strip()
        ]
    elif suffix == ".json":
        data = read_json(path)
        if isinstance(data, list):
            triples = [t for i, v in enumerate(data) for t in _text_items(v, path, f"entry {i}", str(i))]
        elif isinstance(data, dict):
            triples = _text_items(data, path, "top level", "0")
        else:
            raise DataError(f"{path}: expected a JSON list or object of texts, got {type(data).__name__}")
    elif suffix == ".jsonl":
        triples = [t for n, v in read_jsonl(path) for t in _text_items(v, path, f"line {n}", f"line-{n}")]
    else:
        raise DataError(f"{path}: unknown text file type {path.suffix!r}; use .txt, .json or .jsonl")
    first: dict[str, str] = {}
    items = []
    for item_id, text, where in triples:
        if text is not None and not isinstance(text, str):
            raise DataError(f"{path}: {where}: text must be a string, got {type(text).__name__}")
        if item_id in first:
            raise DataError(
                f"{path}: {where}: duplicate id {item_id!r} (first at {first[item_id]}); make the ids unique"
            )
        first[item_id] = where
        items.append(TextItem(item_id, text))
    if not items:
        raise DataError(
            f"{path}: holds no texts (only blank lines, or an empty list); give one text per line"
        )
    return items


# ---------------------------------------------------------------------------------------- tensors, PNG


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """float32 ``[3, H, W]`` in [0, 1] from an image of any mode (normalised by :func:`to_rgb`)."""
    import torch

    rgb = img if img.mode == "RGB" else to_rgb(img)
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)


def tensor_to_pil(t: torch.Tensor) -> Image.Image:
    """RGB image from ``[3, H, W]`` (or ``[1, 3, H, W]``, or ``[1, H, W]`` gray) floats in [0, 1].

    Values are clamped to [0, 1] (NaN -> 0) and rounded to the nearest 8-bit level, so
    ``tensor_to_pil(image_to_tensor(img))`` reproduces ``img`` exactly.
    """
    import torch

    if t.dim() == 4 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 3 or t.shape[0] not in (1, 3):
        raise ValueError(f"expected an image tensor [3, H, W] in [0, 1], got shape {tuple(t.shape)}")
    t = torch.nan_to_num(t.detach().float().cpu(), nan=0.0).clamp_(0.0, 1.0)
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    arr = t.mul(255.0).round_().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(arr, "RGB")


def encode_png(img: torch.Tensor | Image.Image) -> bytes:
    """PNG bytes of an RGB image; deterministic: no timestamp, text, ICC or EXIF chunks are written."""
    pil = to_rgb(img) if isinstance(img, Image.Image) else tensor_to_pil(img)
    clean = Image.frombytes("RGB", pil.size, pil.tobytes())  # drops info (icc_profile, exif, dpi, ...)
    buf = io.BytesIO()
    clean.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def save_png(img: torch.Tensor | Image.Image, path: str | Path) -> Path:
    """Write ``img`` (tensor ``[3, H, W]`` in [0, 1], or PIL) as an RGB PNG at ``path``, atomically.

    PNG only: measured images must not pass through a lossy codec.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: save_png writes PNG only; use a .png path")
    return atomic_write_bytes(path, encode_png(img))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to a temporary file next to ``path``, fsync it, then ``os.replace`` it into place:
    readers see the old file or the new one, never a partial one. Parent directories are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 & ~umask, like open()
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


# ------------------------------------------------------------------------------------------ COCO results

ImageId = int | str
_CANONICAL_INT = re.compile(r"-?(0|[1-9][0-9]*)")


def coco_image_id(value: Any, path: Path, where: str) -> ImageId:
    """COCO-family image id: an int for integers and canonical integer strings ("42", not "042"), as the COCO
    evaluation tools expect; any other string stays a string. Other types raise a DataError."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise DataError(f"{path}: {where}: image id must be an integer or a string, got {value!r}")
    if isinstance(value, str) and _CANONICAL_INT.fullmatch(value):
        return int(value)
    return value


def write_coco_results(path: str | Path, pairs: Iterable[tuple[ImageId, str]]) -> Path:
    """Write a COCO results file ``[{"image_id", "caption"}]`` in the given order, atomically (UTF-8).

    Ids are normalised by :func:`coco_image_id`. A duplicate id raises ``ValueError``: the COCO evaluation
    tools reject such files. Read it back with :func:`recon.scoring.inputs.read_caption_set`.
    """
    path = Path(path)
    entries, seen = [], set()
    for i, (raw_id, caption) in enumerate(pairs):
        image_id = coco_image_id(raw_id, path, f"pair {i}")
        if image_id in seen:
            raise ValueError(f"{path}: pair {i}: duplicate image_id {image_id!r}")
        if not isinstance(caption, str):
            raise ValueError(f"{path}: pair {i}: caption must be a string, got {type(caption).__name__}")
        seen.add(image_id)
        entries.append({"image_id": image_id, "caption": caption})
    return atomic_write_text(path, json.dumps(entries, ensure_ascii=False, indent=1) + "\n")
