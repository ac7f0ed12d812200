"""The scenes world's models, trained with the shapes world's loop (``recon scenes train``): :func:`train` feeds
:func:`recon.shapes.train.train_vae` / ``train_unet`` / ``train_captioner`` / ``train_clip`` (same architectures,
same recipe) with this world's batches; the judge (:class:`CellJudge`, reads each cell) is this world's own.
``recon scenes eval`` (:mod:`recon.shapes.scenes_eval`) measures the result."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recon.shapes import scenes
from recon.shapes import train as shapes_train
from recon.shapes.metrics import to_tensor
from recon.shapes.train import augment, run_loop, write_record
from recon.shapes.train import train_captioner as train_blip

JUDGE_WIDTHS = (32, 64)
JUDGE_HIDDEN = 128
EMPTY = "empty"
CELL_SHAPES = (EMPTY, *scenes.SHAPES)
CLIP_CONTEXT = 48  # the longest caption (four objects, detailed) is 39 BPE tokens + start and end


def render_scenes(
    seed: int,
    split: str,
    stream: int,
    n: int,
    device: str | torch.device = "cpu",
    n_objects: int | tuple[int, ...] = (1, 2, 3, 4),
    templates: tuple[str, ...] = scenes.TEMPLATES,
) -> tuple[list[scenes.Scene], torch.Tensor]:
    """Scenes and their images as ``(n, 3, 32, 32)`` float in [0, 1] (the shapes trainers' ``render``)."""
    batch = scenes.sample_scenes(n, seed, split, stream, n_objects=n_objects, templates=templates)
    return batch, to_tensor(scenes.render_batch(batch)).to(device)


# ----------------------------------------------------------------------------------------------- judge
def cell_crops(images: torch.Tensor) -> torch.Tensor:
    """``(B, 3, 32, 32)`` -> ``(B * 4, 3, 16, 16)``, the cells of each image in reading order."""
    b, c, _, _ = images.shape
    s, g = scenes.CELL_SIDE, scenes.GRID
    return images.view(b, c, g, s, g, s).permute(0, 2, 4, 1, 3, 5).reshape(b * g * g, c, s, s)


class CellJudge(nn.Module):
    """Reads a scene off an image, cell by cell: a small CNN on each 16x16 cell predicts the shape (or empty), colour
    and size of the cell's object and the background; the background logits are averaged over the cells.

    Input ``(B, 3, 32, 32)`` floats in [0, 1]; output dict name -> logits, ``(B, 4, k)`` per cell, ``(B, 3)`` for the
    background. Used only to score images, never inside recon's pipeline.
    """

    def __init__(self, widths: tuple[int, ...] = JUDGE_WIDTHS, hidden: int = JUDGE_HIDDEN):
        super().__init__()
        layers, c = [], 3
        for w in widths:
            layers += [
                nn.Conv2d(c, w, 3, padding=1),
                nn.GroupNorm(8, w),
                nn.SiLU(),
                nn.Conv2d(w, w, 3, padding=1, stride=2),
                nn.GroupNorm(8, w),
                nn.SiLU(),
            ]
            c = w
        side = scenes.CELL_SIDE // 2 ** len(widths)
        self.features = nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * side * side, hidden), nn.SiLU())
        self.heads = nn.ModuleDict(
            {
                "shape": nn.Linear(hidden, len(CELL_SHAPES)),
                "color": nn.Linear(hidden, len(scenes.COLORS)),
                "size": nn.Linear(hidden, len(scenes.SIZES)),
                "background": nn.Linear(hidden, len(scenes.BACKGROUNDS)),
            }
        )

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        b = images.shape[0]
        h = self.features(cell_crops(images) * 2 - 1)
        out = {k: head(h).view(b, len(scenes.CELLS), -1) for k, head in self.heads.items()}
        out["background"] = out["background"].mean(1)
        return out

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> list[scenes.Scene]:
        logits = self(images)
        idx = {k: v.argmax(-1).tolist() for k, v in logits.items()}
        out = []
        for i in range(images.shape[0]):
            objs = tuple(
                scenes.SceneObject(
                    CELL_SHAPES[idx["shape"][i][c]],
                    scenes.VALUES["color"][idx["color"][i][c]],
                    scenes.VALUES["size"][idx["size"][i][c]],
                    cell,
                )
                for c, cell in enumerate(scenes.CELLS)
                if CELL_SHAPES[idx["shape"][i][c]] != EMPTY
            )
            out.append(scenes.Scene(scenes.VALUES["background"][idx["background"][i]], objs))
        return out


def judge_targets(batch: list[scenes.Scene]) -> dict[str, torch.Tensor]:
    """Per-cell class indices (colour and size -100 in empty cells: not scored) and the background's."""
    shape = torch.zeros(len(batch), len(scenes.CELLS), dtype=torch.long)
    color = torch.full_like(shape, -100)
    size = torch.full_like(shape, -100)
    for i, s in enumerate(batch):
        for o in s.objects:
            c = scenes.CELLS.index(o.cell)
            shape[i, c] = CELL_SHAPES.index(o.shape)
            color[i, c] = scenes.VALUES["color"].index(o.color)
            size[i, c] = scenes.VALUES["size"].index(o.size)
    bg = torch.tensor([scenes.VALUES["background"].index(s.background) for s in batch])
    return {"shape": shape, "color": color, "size": size, "background": bg}


def shift(x: torch.Tensor, g: torch.Generator, max_px: int = 2) -> torch.Tensor:
    """Each image moved by up to ``max_px`` pixels (edge-replicated): generated objects sit a little off-centre."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_px,) * 4, mode="replicate")
    off = torch.randint(0, 2 * max_px + 1, (n, 2), generator=g).tolist()
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(off)])


def judge_report(pred: list[scenes.Scene], truth: list[scenes.Scene]) -> dict:
    """Exact-scene accuracy and per-attribute accuracy of judged scenes vs. the true scenes (per true object's cell;
    ``empty``: cells without an object read as empty)."""
    acc: dict[str, list[bool]] = {"shape": [], "color": [], "size": [], "object": [], "empty": []}
    for p, t in zip(pred, truth):
        pl = dict(zip(scenes.CELLS, p.layout))
        for cell, kind in zip(scenes.CELLS, t.layout):
            got = pl[cell]
            if kind is None:
                acc["empty"].append(got is None)
                continue
            for j, a in enumerate(scenes.OBJECT_ATTRIBUTES):
                acc[a].append(got is not None and got[j] == kind[j])
            acc["object"].append(got == kind)
    return {
        "exact_scene": float(
            np.mean([p.layout == t.layout and p.background == t.background for p, t in zip(pred, truth)])
        ),
        "background": float(np.mean([p.background == t.background for p, t in zip(pred, truth)])),
        "object_count": float(np.mean([len(p.objects) == len(t.objects) for p, t in zip(pred, truth)])),
        **{k: float(np.mean(v)) if v else None for k, v in acc.items()},
    }


def train_judge(args) -> dict:
    torch.manual_seed(args.seed)
    judge = CellJudge()

    def step_fn(step: int) -> float:
        batch, x = render_scenes(args.seed, "train", step, args.batch or 128, n_objects=(0, 1, 2, 3, 4))
        g = torch.Generator().manual_seed(args.seed * 7919 + step)
        x = shift(augment(x, g), g)
        logits, y = judge(x), judge_targets(batch)
        loss = F.cross_entropy(logits["background"], y["background"])
        for k in ("shape", "color", "size"):
            loss = loss + F.cross_entropy(logits[k].flatten(0, 1), y[k].flatten(), ignore_index=-100)
        loss.backward()
        return loss.item()

    def validate(step: int) -> dict:
        batch, x = render_scenes(args.seed, "test", 0, 512)
        return judge_report(judge.predict(x), batch)

    record = run_loop(args, "judge", {"judge": judge}, list(judge.parameters()), step_fn, validate)
    out = args.out / "judge"
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    (out / "config.json").write_text(
        json.dumps(
            {
                "class": "recon.shapes.scenes_train.CellJudge",
                "widths": list(JUDGE_WIDTHS),
                "hidden": JUDGE_HIDDEN,
            },
            indent=2,
        )
    )
    save_file(
        {k: v.detach().contiguous() for k, v in judge.state_dict().items()}, str(out / "model.safetensors")
    )
    write_record(args, "judge", record)
    return record


def load_judge(path: Path) -> CellJudge:
    from safetensors.torch import load_file

    cfg = json.loads((Path(path) / "config.json").read_text())
    judge = CellJudge(tuple(cfg["widths"]), cfg["hidden"])
    judge.load_state_dict(load_file(str(Path(path) / "model.safetensors")))
    return judge.eval()


# ----------------------------------------------------------------------------------------------- captioner
# The shapes world's BLIP captioner (recon.shapes.train.train_captioner) with this world's batches. The longest
# caption (four objects, detailed) is 39 BERT wordpieces + [DEC] and [SEP]: 41 > the shapes captioner's 40 positions.
CAPTIONER_POSITIONS = 48
CAPTIONER_MAX_NEW_TOKENS = (
    CAPTIONER_POSITIONS - 4
)  # generation starts from [DEC]; 40 tokens end the longest caption
CAPTIONER_VALIDATION_N = 128
CAPTIONER_WEAK_EXACT = 0.3
# Auxiliary heads on the ViT's [CLS] (discarded after training): per cell the shape (or empty), colour and size of its
# object, and the background; the targets are the judge's (judge_targets).
CAPTIONER_AUX_HEADS = {
    "shape": (len(scenes.CELLS), len(CELL_SHAPES)),
    "color": (len(scenes.CELLS), len(scenes.COLORS)),
    "size": (len(scenes.CELLS), len(scenes.SIZES)),
    "background": (1, len(scenes.BACKGROUNDS)),
}


def captioner_texts() -> list[str]:
    """What the captioner's softmax covers: every caption word, plus the comma of the relational and count
    templates ("..., which is above ...", "a ..., a ... and a ...") that :func:`scenes.caption_vocabulary` omits."""
    return [*scenes.caption_vocabulary(), ","]


@torch.no_grad()
def caption_scenes(model, processor, batch: list[scenes.Scene], chunk: int = 128, **gen) -> list[str]:
    """Greedy (or ``gen``) captions of the rendered scenes."""
    gen = {"max_new_tokens": CAPTIONER_MAX_NEW_TOKENS, **gen}
    captions = []
    for i in range(0, len(batch), chunk):
        pix = processor(
            images=list(scenes.render_batch(batch[i : i + chunk])), return_tensors="pt"
        ).pixel_values.to(model.device)
        captions += processor.batch_decode(model.generate(pixel_values=pix, **gen), skip_special_tokens=True)
    return captions


def captioner_report(captions: list[str], truth: list[scenes.Scene]) -> dict:
    """Exact-scene accuracy of parsed captions vs. the true scenes, mean object F1, and the fraction of captions
    that name cells (detailed form; the rest are count-like, exact without places)."""
    claims = [scenes.parse_caption(c) for c in captions]
    return {
        "exact": float(np.mean([scenes.exact_match(c, t) for c, t in zip(claims, truth)])),
        "object_f1": float(np.mean([scenes.object_f1(c, t) for c, t in zip(claims, truth)])),
        "names_cells": float(np.mean([any(o.cell for o in c.objects) for c in claims])),
    }


def captioner_validation(n_objects: tuple[int, ...]) -> Callable[..., dict]:
    """``train_captioner``'s ``validation``: greedy captions of 128 ``test`` scenes."""

    def validate(model, processor, seed: int) -> dict:
        truth = scenes.sample_scenes(CAPTIONER_VALIDATION_N, seed, "test", n_objects=n_objects)
        return captioner_report(caption_scenes(model, processor, truth), truth)

    return validate


def train_captioner(args, render, n_objects: tuple[int, ...]) -> dict:
    return train_blip(
        args,
        render=render,
        aux_heads=CAPTIONER_AUX_HEADS,
        aux_targets=judge_targets,
        texts=captioner_texts(),
        validation=captioner_validation(n_objects),
        weak_rule=("exact", CAPTIONER_WEAK_EXACT, "exact-scene accuracy"),
        max_positions=CAPTIONER_POSITIONS,
    )


# ----------------------------------------------------------------------------------------------- generation
@torch.no_grad()
def generate(
    pipe, prompts: list[str], seeds: list[int], steps: int = 20, guidance: float = 5.0
) -> torch.Tensor:
    """``(n, 3, 32, 32)`` in [0, 1]; image i from ``seeds[i]``'s starting noise (as recon.shapes.evaluate)."""
    lat = torch.stack(
        [
            torch.randn(
                (4, scenes.IMAGE_SIZE // 2, scenes.IMAGE_SIZE // 2),
                generator=torch.Generator().manual_seed(s),
            )
            for s in seeds
        ]
    )
    out = pipe(
        prompt=prompts, latents=lat, output_type="np", num_inference_steps=steps, guidance_scale=guidance
    ).images
    return to_tensor((np.asarray(out) * 255).round().clip(0, 255).astype(np.uint8))


# ----------------------------------------------------------------------------------------------- training
def train(
    args, n_objects: tuple[int, ...] = (1, 2, 3, 4), templates: tuple[str, ...] = scenes.TEMPLATES
) -> dict:
    """Train one component (``args.component``) of the scenes bundle on scenes of ``n_objects`` objects captioned
    with ``templates`` (``recon scenes train``): the shapes world's trainers with this world's batches, the judge
    this world's own. The CLIP's positives are identical captions; every other caption in the batch is a
    negative."""
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    render = functools.partial(render_scenes, n_objects=n_objects, templates=templates)
    if args.component == "judge":
        return train_judge(args)
    if args.component == "captioner":
        return train_captioner(args, render, n_objects)
    if args.component == "clip":
        return shapes_train.train_clip(
            args, render=render, key=lambda s: s.caption, context_length=CLIP_CONTEXT, validated=False
        )
    if args.component in ("vae", "unet"):
        return {"vae": shapes_train.train_vae, "unet": shapes_train.train_unet}[args.component](
            args, render=render
        )
    raise ValueError(f"component {args.component!r}: expected vae, unet, captioner, clip or judge")
