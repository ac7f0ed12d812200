"""Train and measure the scenes world's models with the shapes world's loop: the feasibility gate of issue 22.

``python -m recon.shapes.scenes_train train --component {vae,unet,judge} --out DIR --work DIR [--objects 2]``
reuses :func:`recon.shapes.train.train_vae` / :func:`~recon.shapes.train.train_unet` (same architectures, same
recipe) with this world's batches; the judge (:class:`CellJudge`, reads each cell) is this world's own.
``python -m recon.shapes.scenes_train gate --bundle DIR --n 200`` generates from the ``detailed`` and
``relational`` captions of an unseen seed and scores the judged images (see :func:`gate`).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recon.shapes import scenes
from recon.shapes.metrics import to_tensor

JUDGE_WIDTHS = (32, 64)
JUDGE_HIDDEN = 128
EMPTY = "empty"
CELL_SHAPES = (EMPTY, *scenes.SHAPES)


def render_scenes(seed: int, split: str, stream: int, n: int, device: str | torch.device = "cpu",
                  n_objects: int | tuple[int, ...] = (1, 2, 3, 4)) -> tuple[list[scenes.Scene], torch.Tensor]:
    """Scenes and their images as ``(n, 3, 32, 32)`` float in [0, 1] (the shapes trainers' ``render``)."""
    batch = scenes.sample_scenes(n, seed, split, stream, n_objects=n_objects)
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
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU(),
                       nn.Conv2d(w, w, 3, padding=1, stride=2), nn.GroupNorm(8, w), nn.SiLU()]
            c = w
        side = scenes.CELL_SIDE // 2 ** len(widths)
        self.features = nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * side * side, hidden), nn.SiLU())
        self.heads = nn.ModuleDict({"shape": nn.Linear(hidden, len(CELL_SHAPES)),
                                    "color": nn.Linear(hidden, len(scenes.COLORS)),
                                    "size": nn.Linear(hidden, len(scenes.SIZES)),
                                    "background": nn.Linear(hidden, len(scenes.BACKGROUNDS))})

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
            objs = tuple(scenes.SceneObject(CELL_SHAPES[idx["shape"][i][c]], scenes.VALUES["color"][idx["color"][i][c]],
                                            scenes.VALUES["size"][idx["size"][i][c]], cell)
                         for c, cell in enumerate(scenes.CELLS) if CELL_SHAPES[idx["shape"][i][c]] != EMPTY)
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
    return {"exact_scene": float(np.mean([p.layout == t.layout and p.background == t.background
                                          for p, t in zip(pred, truth)])),
            "background": float(np.mean([p.background == t.background for p, t in zip(pred, truth)])),
            "object_count": float(np.mean([len(p.objects) == len(t.objects) for p, t in zip(pred, truth)])),
            **{k: float(np.mean(v)) if v else None for k, v in acc.items()}}


def train_judge(args) -> dict:
    from recon.shapes.train import augment, run_loop, write_record

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

    (out / "config.json").write_text(json.dumps({"class": "recon.shapes.scenes_train.CellJudge",
                                                 "widths": list(JUDGE_WIDTHS), "hidden": JUDGE_HIDDEN}, indent=2))
    save_file({k: v.detach().contiguous() for k, v in judge.state_dict().items()}, str(out / "model.safetensors"))
    write_record(args, "judge", record)
    return record


def load_judge(path: Path) -> CellJudge:
    from safetensors.torch import load_file

    cfg = json.loads((Path(path) / "config.json").read_text())
    judge = CellJudge(tuple(cfg["widths"]), cfg["hidden"])
    judge.load_state_dict(load_file(str(Path(path) / "model.safetensors")))
    return judge.eval()


# ----------------------------------------------------------------------------------------------- the gate
def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], steps: int = 20, guidance: float = 5.0) -> torch.Tensor:
    """``(n, 3, 32, 32)`` in [0, 1]; image i from ``seeds[i]``'s starting noise (as recon.shapes.evaluate)."""
    lat = torch.stack([torch.randn((4, scenes.IMAGE_SIZE // 2, scenes.IMAGE_SIZE // 2),
                                   generator=torch.Generator().manual_seed(s)) for s in seeds])
    out = pipe(prompt=prompts, latents=lat, output_type="np", num_inference_steps=steps,
               guidance_scale=guidance).images
    return to_tensor((np.asarray(out) * 255).round().clip(0, 255).astype(np.uint8))


def pipeline_from_checkpoint(bundle: Path, checkpoint: Path):
    """The generator of an unfinished ``train --component unet`` run: the VAE from ``bundle``, the UNet and text
    encoder from ``checkpoint`` (``<work>/unet.ckpt.pt``) with its EMA weights, as the finished run would ship."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline
    from diffusers.training_utils import EMAModel
    from transformers import CLIPTokenizer

    from recon.shapes import models
    from recon.tokenizers import write_clip_tokenizer

    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(checkpoint.parent / "clip_tokenizer"))
    text_encoder, unet = models.build_text_encoder(tokenizer), models.build_unet()
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    unet.load_state_dict(state["modules"]["unet"])
    text_encoder.load_state_dict(state["modules"]["text_encoder"])
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = EMAModel(params, decay=0.999, use_ema_warmup=True, power=0.75)
    ema.load_state_dict(state["ema"])
    ema.copy_to(params)
    vae = AutoencoderKL.from_pretrained(bundle / "generator" / "vae", torch_dtype=torch.float32)
    log(f"generator from {checkpoint} at step {state['step']}")
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
                                   scheduler=models.inference_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def gate(bundle: Path, n: int, seed: int, n_objects: int, split: str = "test", batch: int = 50,
         steps: int = 20, guidance: float = 5.0, checkpoint: Path | None = None, tag: str = "") -> dict:
    """Generator feasibility on ``n`` scenes of (``seed``, ``split``, stream 1): each scene generated from its
    ``detailed`` caption (judged scene vs. the true one) and from its ``relational`` caption (is the judged scene
    what the caption claims?), plus the judge's own accuracy on the renders and on VAE round trips."""
    from diffusers import StableDiffusionPipeline

    from recon.shapes.metrics import vae_round_trip

    judge = load_judge(bundle / "judge")
    if checkpoint is None:
        pipe = StableDiffusionPipeline.from_pretrained(bundle / "generator", torch_dtype=torch.float32)
    else:
        pipe = pipeline_from_checkpoint(bundle, checkpoint)
    pipe.set_progress_bar_config(disable=True)
    truth, x = render_scenes(seed, split, 1, n, n_objects=n_objects)
    result: dict = {"n": n, "seed": seed, "split": split, "n_objects": n_objects, "steps": steps,
                    "guidance": guidance, "checkpoint": str(checkpoint) if checkpoint else None}
    result["judge_on_renders"] = judge_report(judge.predict(x), truth)
    result["judge_on_vae_round_trip"] = judge_report(judge.predict(vae_round_trip(pipe.vae, x)), truth)
    log(f"judge on renders {result['judge_on_renders']}")
    for template in ("detailed", "relational"):
        prompts = [scenes.caption_for(s, template) for s in truth]
        images = torch.cat([generate(pipe, prompts[i : i + batch], list(range(i, min(n, i + batch))), steps, guidance)
                            for i in range(0, n, batch)])
        judged = judge.predict(images)
        claims = [scenes.parse_caption(p) for p in prompts]
        # What the true scene's detailed caption claims, checked on the judged image.
        scores = [scenes.score_claims(scenes.claims_of(t, "detailed"), j) for j, t in zip(judged, truth)]
        bag_right = [s["object_f1"] == 1.0 for s in scores if s["attribute_f1"] == 1.0]
        r = {"caption_holds": float(np.mean([scenes.exact_match(c, j) for c, j in zip(claims, judged)])),
             **{f"judged_vs_truth_{k}": float(np.mean([s[k] for s in scores if s[k] is not None]))
                for k in ("object_f1", "attribute_f1", "binding")},
             # Of the images whose attribute words are all right (the bag), how many also bind them right.
             "bag_right": len(bag_right) / n, "binding_given_bag_right": float(np.mean(bag_right)) if bag_right else None,
             # Copies aside: are the distinct objects drawn exactly the distinct objects named (bound right)?
             "kinds_right": float(np.mean([{o.kind for o in j.objects} == {o.kind for o in t.objects}
                                           for j, t in zip(judged, truth)])),
             "mean_objects_drawn": float(np.mean([len(j.objects) for j in judged]))}
        if template == "detailed":
            r["per_cell"] = judge_report(judged, truth)
        result[f"from_{template}"] = r
        log(f"{template}: {json.dumps(r)}")
        np.save(bundle / f"gate_{template}_{split}_{seed}_g{guidance:g}{tag}.npy",
                (images.numpy() * 255).round().astype(np.uint8))
    return result


# ----------------------------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    from recon.shapes import train as shapes_train

    p = argparse.ArgumentParser(prog="python -m recon.shapes.scenes_train")
    sub = p.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train")
    tr.add_argument("--component", required=True, choices=["vae", "unet", "judge"])
    tr.add_argument("--out", type=Path, required=True)
    tr.add_argument("--work", type=Path, required=True)
    tr.add_argument("--objects", default="1,2,3,4", help="objects per training scene, e.g. 2 or 1,2,3,4")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--steps", type=int, default=None)
    tr.add_argument("--batch", type=int, default=None)
    tr.add_argument("--lr", type=float, default=None)
    tr.add_argument("--threads", type=int, default=1)
    ga = sub.add_parser("gate")
    ga.add_argument("--bundle", type=Path, required=True)
    ga.add_argument("--n", type=int, default=200)
    ga.add_argument("--seed", type=int, default=1)
    ga.add_argument("--objects", type=int, default=2)
    ga.add_argument("--split", default="test")
    ga.add_argument("--guidance", type=float, default=5.0)
    ga.add_argument("--threads", type=int, default=1)
    ga.add_argument("--checkpoint", type=Path, default=None, help="score an unfinished unet run's checkpoint")
    ga.add_argument("--tag", default="", help="suffix of the result's file name")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.command == "gate":
        result = gate(args.bundle, args.n, args.seed, args.objects, args.split, guidance=args.guidance,
                      checkpoint=args.checkpoint, tag=args.tag)
        name = f"gate_{args.split}_{args.seed}_g{args.guidance:g}{args.tag}.json"
        (args.bundle / name).write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
        return 0
    objects = tuple(int(v) for v in args.objects.split(","))
    targs = shapes_train.TrainArgs(component=args.component, out=args.out, work=args.work, seed=args.seed,
                                   steps=args.steps, threads=args.threads, batch=args.batch, lr=args.lr)
    targs.out.mkdir(parents=True, exist_ok=True)
    targs.work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    render = functools.partial(render_scenes, n_objects=objects)
    if args.component == "judge":
        train_judge(targs)
    else:
        {"vae": shapes_train.train_vae, "unet": shapes_train.train_unet}[args.component](targs, render=render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
