"""Interleaved few-shot prompts (OpenFlamingo's captioning format) and the demonstrations they draw from."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from recon.captions_io import read_coco_captions
from recon.data import load_image

MEDIA_TOKEN, EOC_TOKEN, PAD_TOKEN = "<image>", "<|endofchunk|>", "<PAD>"


CHUNK_SEPARATOR = "\n"  # OpenFlamingo's captioning evaluation joins demonstrations with a newline
TEXT_ONLY_ZERO_SHOT = 2


def chunk(caption: str | None, prompt: str = "Output:", image: bool = True) -> str:
    """One interleaved chunk: ``<image>Output:{caption}<|endofchunk|>``; ``caption=None`` leaves it open."""
    head = (MEDIA_TOKEN if image else "") + prompt
    return head if caption is None else f"{head}{caption.strip()}{EOC_TOKEN}"


def few_shot_prompt(
    demo_captions: Sequence[str],
    prompt: str = "Output:",
    demo_images: bool = True,
    separator: str = CHUNK_SEPARATOR,
) -> str:
    """Demonstrations then the open query chunk (the query always has its image)."""
    return "".join(chunk(c, prompt, demo_images) + separator for c in demo_captions) + chunk(None, prompt)


class Demonstrations:
    """A pool of (image, caption) pairs to draw in-context examples from; images as PIL or paths (loaded on use).

    ``select(k, seed)``: ``k`` distinct pairs drawn by ``numpy.random.default_rng(seed)``; ``rank(k, query)``: the
    ``k`` most CLIP-similar to a query embedding (RICES), ordered so the most similar comes last.
    """

    def __init__(self, images: Sequence[Image.Image | str | Path], captions: Sequence[str]):
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} demonstration images but {len(captions)} captions")
        self._images, self.captions = list(images), [" ".join(c.split()) for c in captions]
        self._embeddings: torch.Tensor | None = None

    @classmethod
    def from_coco(
        cls, captions_file: str | Path, image_dir: str | Path, limit: int | None = 2048, seed: int = 0
    ) -> Demonstrations:
        """A COCO captions json + its image folder; ``limit`` images drawn with ``seed`` (OpenFlamingo samples
        random demonstrations from 2048 training images), one of each image's captions drawn likewise."""
        refs = read_coco_captions(captions_file)
        ids = sorted(refs.refs, key=str)
        missing = [i for i in ids if i not in refs.file_names]
        if missing:
            raise ValueError(f"{captions_file}: no file_name for image id(s) {missing[:5]} in 'images'")
        rng = np.random.default_rng(int(seed))
        if limit and len(ids) > limit:
            ids = [ids[i] for i in sorted(rng.choice(len(ids), size=limit, replace=False))]
        captions = [refs.refs[i][int(rng.integers(len(refs.refs[i])))] for i in ids]
        return cls([Path(image_dir) / refs.file_names[i] for i in ids], captions)

    def image(self, i: int) -> Image.Image:
        im = self._images[i]
        if isinstance(im, Image.Image):
            return im

        return load_image(im)

    def images(self, indices: Sequence[int]) -> list[Image.Image]:
        return [self.image(i) for i in indices]

    def __len__(self) -> int:
        return len(self.captions)

    def _check(self, k: int) -> None:
        if k > len(self):
            raise ValueError(f"{k} demonstrations asked for but the pool has {len(self)}")

    def select(self, k: int, seed: int) -> list[int]:
        self._check(k)
        return [int(i) for i in np.random.default_rng(int(seed)).choice(len(self), size=k, replace=False)]

    def rank(self, k: int, query: torch.Tensor, embed) -> list[int]:
        self._check(k)
        if self._embeddings is None:
            self._embeddings = torch.nn.functional.normalize(
                torch.cat(
                    [
                        embed(self.images(range(s, min(s + 64, len(self))))).float()
                        for s in range(0, len(self), 64)
                    ]
                ),
                dim=-1,
            )
        sim = self._embeddings.to(query.device) @ torch.nn.functional.normalize(query.float(), dim=-1)
        return [int(i) for i in reversed(sim.topk(k).indices.tolist())]
