"""Training pairs (image, reference caption) as a pure function of the micro-step: resuming needs no data state.

* :class:`WorldPairs`: scenes of a procedural world (``data.kind``: shapes | scenes, recon.shapes.worlds)
  rendered from ``(seed, stream)``; validation scores captions exactly against the scenes and generated images with
  the world bundle's judge when it is present.
* :class:`CaptionFilePairs`: a Karpathy split file or COCO caption annotations plus an image root (read with
  recon.captions_io). Sample ``k`` of the run is item ``perm_epoch[k mod N]`` with a seeded permutation per
  epoch and one of its references chosen by a seeded draw.

``train_batch(micro_step, rank, world_size, n)``: process ``rank``'s ``n`` pairs of that micro-step: items
``rank * n .. rank * n + n - 1`` of the micro-step's global batch of ``n * world_size``, so one process with
batch ``2n`` sees what two with ``n`` see together. Images are float ``[n, 3, R, R]`` in [0, 1] at the
generator's resolution ``R`` (shortest side resized, bicubic antialiased, center crop).

Semi-supervised data (``data.labelled_pairs``, ``data.unlabelled_images``, ``data.unpaired_texts``): a fixed pool of
labelled pairs, drawn in seeded epochs, and per micro-step ``n`` unlabelled images and ``n`` unpaired texts
(:class:`Unpaired`) on ``Batch.unlabelled`` / ``Batch.texts``. Shapes streams: labelled pool, unlabelled images and
unpaired texts each have their own stream of the ``train`` split; evaluation draws from ``test`` / ``heldout``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recon import captions_io
from recon.data import (
    DataError,
    atomic_write_text,
    image_to_tensor,
    list_images,
    load_image,
    load_texts,
    validate_text,
)
from recon.preprocess import center_crop_or_pad, resize
from recon.runs import RunError, sha256_file
from recon.shapes.worlds import WORLDS, World
from recon.train.config import DataConfig

log = logging.getLogger(__name__)

VAL_STREAM = 1_000_003  # shapes validation renders: a stream no training step reaches in practice
# Shapes training streams of the semi-supervised sources (the train split; plain pairs use stream = micro-step).
LABELLED_STREAM = 3_000_017
UNLABELLED_STREAM = 4_000_000_000  # + micro-step
UNPAIRED_TEXT_STREAM = 5_000_000_000  # + micro-step


@dataclass
class Batch:
    images: torch.Tensor  # [n, 3, R, R] float in [0, 1]
    captions: list[str]
    meta: list[Any] = field(default_factory=list)  # per item: the world's Scene, or the image id
    unlabelled: torch.Tensor | None = None  # [n, 3, R, R] images without captions (data.unlabelled_images)
    texts: list[str] | None = None  # texts without images (data.unpaired_texts)


def epoch_pick(k: int, total: int, seed: int, *salt: int) -> int:
    """Item of global sample ``k`` when ``total`` items are drawn in seeded epochs (a permutation per epoch)."""
    epoch, pos = divmod(k, total)
    return int(np.random.default_rng([seed, *salt, epoch]).permutation(total)[pos])


def fit(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """``[n, 3, H, W]`` -> ``[n, 3, R, R]``: shortest side to R (bicubic, antialiased), center crop, clamp."""
    h, w = images.shape[-2:]
    if (h, w) == (resolution, resolution):
        return images
    scale = resolution / min(h, w)
    size = (max(resolution, round(h * scale)), max(resolution, round(w * scale)))
    return center_crop_or_pad(resize(images, size), (resolution, resolution)).clamp(0, 1)


def render_scenes(scenes, resolution: int, world: World = WORLDS["shapes"]) -> torch.Tensor:
    """A world's scenes -> ``[n, 3, R, R]`` float images in [0, 1]."""

    return fit(
        torch.from_numpy(world.render_batch(scenes)).permute(0, 3, 1, 2).float().div(255.0), resolution
    )


class WorldPairs:
    """A procedural world (``data.kind``: shapes | scenes, recon.shapes.worlds): a fresh rendered batch per
    micro-step drawn as the world's bundle was trained, exact ground truth for validation."""

    def __init__(
        self,
        resolution: int,
        seed: int = 0,
        judge_dir: str | Path | None = None,
        cfg: DataConfig | None = None,
    ):

        self.cfg = cfg or DataConfig()
        self.world = WORLDS[self.cfg.kind]
        self.resolution, self.seed = int(resolution), int(seed)
        self.judge_dir = Path(judge_dir) if judge_dir and Path(judge_dir).is_dir() else None
        self._judge = None
        n = self.cfg.labelled_pairs
        self.pool = self.world.sample(n, self.seed, "train", LABELLED_STREAM) if n else None
        self.selection, self.pool = held_out(self.pool, self.cfg.selection_pairs)
        self.unpaired = Unpaired(self.cfg, self.resolution, self.seed)

    def _batch(self, scenes) -> Batch:
        return Batch(
            render_scenes(scenes, self.resolution, self.world), [s.caption for s in scenes], list(scenes)
        )

    def train_batch(self, micro_step: int, rank: int = 0, world_size: int = 1, n: int = 1) -> Batch:

        mine = slice(rank * n, rank * n + n)
        if self.pool is None:
            scenes = self.world.sample(n * world_size, self.seed, "train", micro_step)[mine]
        else:
            first = micro_step * n * world_size
            scenes = [
                self.pool[epoch_pick(first + k, len(self.pool), self.seed)]
                for k in range(mine.start, mine.stop)
            ]
        return self.unpaired.fill(self._batch(scenes), micro_step, rank, world_size, n)

    def val_batch(self, n: int) -> Batch:

        return self._batch(self.world.sample(n, self.seed, "test", VAL_STREAM))

    def selection_batch(self) -> Batch:
        """The labelled pool's held-out slice (``data.selection_pairs``), for model selection."""
        return self._batch(self.selection)

    def caption_texts(self, n: int = 256) -> list[str]:

        return [s.caption for s in (self.pool or self.world.sample(n, self.seed, "train", 0))[:n]]

    def score_captions(self, captions: list[str], batch: Batch) -> dict[str, float]:
        """The world's exact caption scores against the scenes (recon.shapes.worlds), means over the batch."""
        return self.world.score_captions(captions, batch.meta)

    def score_images(self, images: torch.Tensor, batch: Batch) -> dict[str, float]:
        """The judge's reading of images generated from the reference captions, scored against the scenes
        (``generator_judge_...``)."""
        if self.judge_dir is None:
            return {}

        if self._judge is None:
            self._judge = self.world.load_judge(self.judge_dir)
        readings = self._judge.predict(fit(images.float().cpu(), self.world.image_size))
        return {f"generator_{k}": v for k, v in self.world.score_judged(readings, batch.meta).items()}


class CaptionFilePairs:
    """Karpathy / COCO caption files over an image root."""

    def __init__(self, cfg: DataConfig, resolution: int, seed: int = 0):
        self.cfg, self.resolution, self.seed = cfg, int(resolution), int(seed)
        self.train_items = self._items(cfg.annotations, cfg.train_split)
        val_file = cfg.val_annotations or cfg.annotations
        self.val_items = self._items(val_file, cfg.val_split)
        if not self.train_items:
            raise ValueError(f"data: no training pairs in {cfg.annotations}")
        if cfg.labelled_pairs is not None:  # a seeded subset, the same for every run with this seed
            keep = np.random.default_rng([self.seed, 2]).permutation(len(self.train_items))[
                : cfg.labelled_pairs
            ]
            self.train_items = [self.train_items[int(i)] for i in sorted(keep)]
        self.selection, self.train_items = held_out(self.train_items, cfg.selection_pairs)
        self.unpaired = Unpaired(cfg, self.resolution, self.seed)

    def _items(self, annotations: str | None, split: list[str]) -> list[tuple[str, list[str]]]:

        if annotations is None:
            return []
        if self.cfg.kind == "karpathy":
            refs = captions_io.read_karpathy(annotations, split)
        else:
            refs = captions_io.read_coco_captions(annotations)
        root = Path(self.cfg.images or Path(annotations).parent)
        return [
            (str(root / refs.file_names[i]), caps)
            for i, caps in refs.refs.items()
            if caps and i in refs.file_names
        ]

    def _load(self, items: list[tuple[str, str]]) -> Batch:

        images = [fit(image_to_tensor(load_image(p))[None], self.resolution)[0] for p, _ in items]
        return Batch(torch.stack(images), [c for _, c in items], [p for p, _ in items])

    def train_batch(self, micro_step: int, rank: int = 0, world_size: int = 1, n: int = 1) -> Batch:
        picked = []
        for j in range(n):
            k = (micro_step * world_size + rank) * n + j
            path, caps = self.train_items[epoch_pick(k, len(self.train_items), self.seed)]
            picked.append((path, caps[int(np.random.default_rng([self.seed, k, 1]).integers(len(caps)))]))
        return self.unpaired.fill(self._load(picked), micro_step, rank, world_size, n)

    def val_batch(self, n: int) -> Batch:
        return self._load([(p, caps[0]) for p, caps in self.val_items[:n]])

    def selection_batch(self) -> Batch:
        """The labelled pool's held-out slice (``data.selection_pairs``; each item's first reference)."""
        return self._load([(p, caps[0]) for p, caps in self.selection])

    def caption_texts(self, n: int = 256) -> list[str]:
        return [caps[0] for _, caps in self.train_items[:n]]

    def score_captions(self, captions: list[str], batch: Batch) -> dict[str, float]:
        return {}

    def score_images(self, images: torch.Tensor, batch: Batch) -> dict[str, float]:
        return {}


def held_out(pool: list | None, n: int) -> tuple[list, list | None]:
    """(the last ``n`` items of a labelled pool, the rest): the held-out slice for model selection is taken from the
    pool itself, so an arm with selection trains on ``len(pool) - n`` pairs, every arm alike."""
    if not n or pool is None:
        return [], pool
    if n >= len(pool):
        raise ValueError(f"data.selection_pairs={n}: the labelled pool has only {len(pool)} pairs")
    return list(pool[len(pool) - n :]), list(pool[: len(pool) - n])


def usable_images(folder: str | Path) -> list[Path]:
    """The images of ``folder`` that decode, checked once before training (a truncated file found at step 5,000
    would stop the run there). The others are left out -- so every step draws from the same list -- counted and
    named in a warning; none usable is an error naming the folder."""

    try:
        items = list_images(folder)
    except DataError as e:
        raise ValueError(f"data.unlabelled_images: {e}") from None
    good, bad = [], []
    for it in items:
        try:
            load_image(it.path)
            good.append(it.path)
        except (DataError, OSError) as e:
            bad.append(str(e))
    if bad:
        log.warning(
            "data.unlabelled_images: %d of %d images cannot be read and are left out: %s%s",
            len(bad),
            len(items),
            "; ".join(bad[:3]),
            " ..." if len(bad) > 3 else "",
        )
    if not good:
        raise ValueError(f"data.unlabelled_images: no image in {folder} can be read")
    return good


class Unpaired:
    """Unlabelled images and unpaired texts for a micro-step's global batch (``data.unlabelled_images``,
    ``data.unpaired_texts``): a folder / texts file drawn in seeded epochs, or fresh scenes of data.kind's world
    (the value ``shapes`` / ``scenes``)."""

    def __init__(self, cfg: DataConfig, resolution: int, seed: int):

        self.cfg, self.resolution, self.seed = cfg, resolution, seed
        self.images = self.texts = None
        self.world = WORLDS.get(cfg.kind)  # the world "shapes" / "scenes" sources draw from (data.kind)
        if cfg.unlabelled_images and cfg.unlabelled_images not in WORLDS:
            self.images = usable_images(cfg.unlabelled_images)
        if cfg.unpaired_texts and cfg.unpaired_texts not in WORLDS:
            try:
                items = load_texts(cfg.unpaired_texts)
            except DataError as e:
                raise ValueError(f"data.unpaired_texts: {e}") from None
            self.texts = [t.text for t in items if validate_text(t.text) is None]
            if not self.texts:
                raise ValueError(f"data.unpaired_texts: {cfg.unpaired_texts} holds no usable text")

    def _scenes(self, base: int, micro_step: int, mine: slice, size: int):

        split = "train" if self.cfg.unpaired_combos == "seen" else self.cfg.unpaired_combos
        return self.world.sample(size, self.seed, split, base + micro_step)[mine]

    def fill(self, batch: Batch, micro_step: int, rank: int, world_size: int, n: int) -> Batch:
        """``batch`` with process ``rank``'s ``n`` unlabelled images and unpaired texts of the micro-step."""

        mine, size = slice(rank * n, rank * n + n), n * world_size
        first = micro_step * size  # global sample index of the micro-step's first item
        if self.cfg.unlabelled_images in WORLDS:
            batch.unlabelled = render_scenes(
                self._scenes(UNLABELLED_STREAM, micro_step, mine, size), self.resolution, self.world
            )
        elif self.images is not None:
            paths = [
                self.images[epoch_pick(first + k, len(self.images), self.seed, 3)]
                for k in range(mine.start, mine.stop)
            ]
            batch.unlabelled = torch.stack(
                [fit(image_to_tensor(load_image(p))[None], self.resolution)[0] for p in paths]
            )
        if self.cfg.unpaired_texts in WORLDS:
            batch.texts = [s.caption for s in self._scenes(UNPAIRED_TEXT_STREAM, micro_step, mine, size)]
        elif self.texts is not None:
            batch.texts = [
                self.texts[epoch_pick(first + k, len(self.texts), self.seed, 4)]
                for k in range(mine.start, mine.stop)
            ]
        return batch


INPUTS_FILE = "finetune_inputs.json"  # what the run's data files held when it started (see check_inputs)


def check_inputs(path: Path, fingerprints: dict[str, str]) -> None:
    """Record the data files' fingerprints at a run's start; a resume over changed files (other unpaired texts,
    images added to a folder) is refused naming the field, since the resumed steps would draw other data."""

    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise RunError(f"{path} is damaged; restore it, or pass a new --out") from None
        changed = sorted(k for k in set(old) | set(fingerprints) if old.get(k) != fingerprints.get(k))
        if changed:
            raise ValueError(
                f"{path.parent}: the data of {', '.join(changed)} changed since this run started; "
                "restore it, or pass a new --out to train on the new data"
            )
        return
    atomic_write_text(path, json.dumps(fingerprints, indent=1) + "\n")


def input_fingerprints(cfg: DataConfig) -> dict[str, str]:
    """A fingerprint per data file or folder the config names: SHA-256 of a file's bytes; of a folder, SHA-256 of
    its image listing with each file's size and modification time (hashing every image of a large folder would
    cost minutes at each start). A world's data (shapes, scenes) is rendered, nothing on disk."""

    out = {}
    for key in ("annotations", "val_annotations", "images", "unlabelled_images", "unpaired_texts"):
        value = getattr(cfg, key)
        if not value or value in WORLDS or not Path(value).exists():
            continue
        if Path(value).is_file():
            out[f"data.{key}"] = sha256_file(value)
        elif (
            key != "images"
        ):  # the caption files name the images they use; a folder of unlabelled images is read whole
            listing = [(it.id, (st := it.path.stat()).st_size, st.st_mtime_ns) for it in list_images(value)]
            out[f"data.{key}"] = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    return out


def make_pairs(cfg: DataConfig, resolution: int, seed: int, judge_dir: str | Path | None = None):
    if cfg.kind in WORLDS:
        return WorldPairs(resolution, seed, judge_dir, cfg)
    return CaptionFilePairs(cfg, resolution, seed)


class StepBatches(torch.utils.data.Dataset):
    """Micro-steps ``start, start+1, ...`` as a dataset, so a DataLoader's workers can prefetch them."""

    def __init__(self, pairs, start: int, stop: int, rank: int, world_size: int, n: int):
        self.pairs, self.start, self.stop = pairs, start, stop
        self.rank, self.world_size, self.n = rank, world_size, n

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __getitem__(self, i: int) -> Batch:
        return self.pairs.train_batch(self.start + i, self.rank, self.world_size, self.n)


def batches(pairs, start: int, stop: int, rank: int, world_size: int, n: int, num_workers: int = 0):
    """An iterator over the training batches of micro-steps ``start..stop-1`` (prefetched by workers if > 0)."""
    data = StepBatches(pairs, start, stop, rank, world_size, n)
    if num_workers <= 0:
        return (data[i] for i in range(len(data)))
    return iter(
        torch.utils.data.DataLoader(
            data,
            batch_size=None,
            shuffle=False,
            num_workers=num_workers,
            persistent_workers=False,
            prefetch_factor=2,
        )
    )
