"""MODEL_CARD.md and VERSION of the shapes bundle, written from the training records and an evaluation result."""

from __future__ import annotations

import json
import re
from pathlib import Path

from recon.shapes import scenes, world

BUNDLE_VERSION = "3"
# The parts `recon shapes train --component` trains, in order (here, not in train.py, so `--help` needs no torch).
COMPONENTS = ("vae", "unet", "captioner", "weak", "clip", "judge")
# Steps of the shipped bundle; each fits the 90 CPU-minute budget of the whole bundle (see MODEL_CARD.md).
DEFAULT_STEPS = {"vae": 1800, "unet": 3200, "captioner": 1600, "weak": 300, "clip": 600, "judge": 300}
PARTS = {
    "captioner": "BlipForConditionalGeneration + BlipProcessor (transformers)",
    "captioner_weak": "a weak captioner for candidate-ranking experiments (see training/captioner_weak.json)",
    "generator": "StableDiffusionPipeline folder: AutoencoderKL, CLIPTextModel + CLIPTokenizer, "
    "UNet2DConditionModel, DDIMScheduler (v-prediction)",
    "clip": "open_clip CLIP, ModifiedResNet image tower, hub layout (open_clip_config.json + safetensors)",
    "judge": "AttributeJudge CNN (recon.shapes.models), evaluation only",
}


PLACEHOLDERS = {"out": "BUNDLE", "work": "WORK"}


def portable_command(command: str) -> str:
    """A training record's command without this machine's paths (``--out BUNDLE --work WORK``)."""
    return re.sub(r"--(out|work)[ =]\S+", lambda m: f"--{m.group(1)} {PLACEHOLDERS[m.group(1)]}", command)


def _params(path: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in path.rglob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                total += _prod(st.get_slice(k).get_shape())
    return total


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def parts_rows(bundle: Path, parts: dict[str, str]) -> list[str]:
    """One markdown row per part folder present in ``bundle``: what it is, parameters, MB."""
    return [
        f"| `{part}/` | {what} | {_params(bundle / part) / 1e6:.2f}M | {_mb(bundle / part):.1f} |"
        for part, what in parts.items()
        if (bundle / part).is_dir()
    ]


def training_rows(records: dict[str, dict], device: bool) -> list[str]:
    """One markdown row per training record: steps, batch, wall / CPU minutes, (device,) validation, command."""
    rows = []
    for name, r in records.items():
        val = json.dumps(r.get("validation", {}))[:160]
        cells = [
            name,
            r.get("steps", ""),
            r.get("batch_size", ""),
            r.get("wall_minutes", ""),
            r.get("cpu_minutes", ""),
            *([r.get("device", "cpu")] if device else []),
            f"`{val}`",
            f"`{portable_command(r.get('command', ''))}`",
        ]
        rows.append("| " + " | ".join(str(c) for c in cells) + " |")
    return rows


def write_model_card(bundle: Path, result: dict, extra: str = "") -> Path:
    """Write ``MODEL_CARD.md``, ``VERSION`` and ``eval.json`` into ``bundle``."""
    bundle = Path(bundle)
    records = {p.stem: json.loads(p.read_text()) for p in sorted((bundle / "training").glob("*.json"))}
    (bundle / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    (bundle / "VERSION").write_text(BUNDLE_VERSION + "\n")
    lines = [
        "# recon shapes bundle",
        "",
        "Small models of the real architecture classes, trained by `recon shapes train` on procedurally rendered "
        f"32x32 scenes ({len(world.ALL_COMBOS)} attribute combinations: {len(world.SHAPES)} shapes x "
        f"{len(world.COLORS)} colours x {len(world.SIZES)} sizes x {len(world.POSITIONS)} positions x "
        f"{len(world.BACKGROUNDS)} backgrounds; {len(world.HELDOUT_COMBOS)} combinations held out of training), "
        f"{len(world.TEMPLATES)} caption templates. Vocabularies are the real ones: BERT uncased WordPiece "
        "(30524 rows, [DEC]/[ENC] added) for the captioner, CLIP BPE (49408 rows) for the generator and CLIP.",
        "",
        f"Bundle version {BUNDLE_VERSION}; weights fp16 safetensors (configs say fp32: a plain "
        "`from_pretrained(dir)` loads fp32).",
        "",
        "## Parts",
        "",
        "| part | what | parameters | MB |",
        "| --- | --- | ---: | ---: |",
    ]
    lines += parts_rows(bundle, PARTS)
    lines += [
        "",
        f"Total size: {_mb(bundle):.1f} MB.",
        "",
        "## Training",
        "",
        "Each part: `recon shapes train --component NAME` (seed 0, 1 thread; data rendered on the fly from "
        "(seed, step)). Recipe steps: " + ", ".join(f"{k} {v}" for k, v in _default_steps().items()) + ".",
        "",
        "| component | steps | batch | wall min | CPU min | device | final validation | command |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- | --- |",
    ]
    lines += training_rows(records, device=True)
    lines += [
        "",
        "## Measured quality",
        "",
        f"`recon shapes eval --n {result.get('test', {}).get('n')} --seed {result.get('seed')}` "
        f"(device {result.get('device')}; DDIM {result['sampling']['num_inference_steps']} steps, guidance "
        f"{result['sampling']['guidance_scale']}; captioner beam {result['decoding']['num_beams']}):",
        "",
        "| metric | bar | test (seen combinations) | held-out combinations |",
        "| --- | ---: | ---: | ---: |",
    ]
    for key in (
        "captioner_tuple_acc",
        "generator_judge_tuple_acc",
        "clip_zero_shot_tuple_acc",
        "recon_discrimination",
        "captioner_unparseable",
        "judge_tuple_acc_on_renders",
    ):
        bar = result["bars"].get(key)
        lines.append(
            f"| {key} | {_pct(bar) if bar else ''} | {_pct(result['test'][key])} | "
            f"{_pct(result['heldout'][key])} |"
        )
    for key in ("captioner_attr_acc", "generator_judge_attr_acc", "clip_zero_shot_attr_acc"):
        t, h = result["test"][key], result["heldout"][key]
        lines.append(
            f"| {key} | | {', '.join(f'{a} {_pct(v)}' for a, v in t.items())} | "
            f"{', '.join(f'{a} {_pct(v)}' for a, v in h.items())} |"
        )
    if "weak_rerank" in result:
        w = result["weak_rerank"]
        lines += [
            "",
            f"Weak captioner, {w['k']} sampled captions per image, {w['n']} images: greedy "
            f"{_pct(w['weak_greedy_tuple_acc'])}, a random sample {_pct(w['random_sample_tuple_acc'])}, the "
            f"sample whose reconstruction is most CLIP-similar to the image {_pct(w['reranked_tuple_acc'])}, "
            f"best possible {_pct(w['oracle_tuple_acc'])}.",
        ]
    lines += [
        "",
        "The full numbers are in `eval.json`. The judge is a classifier trained on renders; generated images "
        "it misreads count as wrong, so generator accuracy is a lower bound up to the judge's own errors.",
        "",
        "Joint finetuning of these parts (the reconstruction losses as regularisers, with few labels and "
        "unpaired data): `experiments/RESULTS.md`.",
        "",
    ]
    if extra:
        lines += [extra.strip(), ""]
    path = bundle / "MODEL_CARD.md"
    path.write_text("\n".join(lines))
    return path


def _default_steps() -> dict:
    return {k: v for k, v in DEFAULT_STEPS.items() if k != "weak"}


SCENES_PARTS = {
    "captioner": PARTS["captioner"],
    "captioner_weak": "a weak snapshot of the captioner run (first "
    "validation with exact-scene accuracy >= 0.3), for caption-selection experiments",
    "generator": PARTS["generator"],
    "clip": PARTS["clip"] + "; text context 48 tokens",
    "judge": "CellJudge CNN (recon.shapes.scenes_train): reads each cell's object and the background; "
    "evaluation only",
}


def write_scenes_card(bundle: Path, result: dict, extra: str = "") -> Path:
    """``MODEL_CARD.md`` and ``eval.json`` of the scenes bundle, from its training records and ``recon scenes eval``."""
    bundle = Path(bundle)
    records = {p.stem: json.loads(p.read_text()) for p in sorted((bundle / "training").glob("*.json"))}
    (bundle / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# recon scenes bundle",
        "",
        "The compositional world's models (`recon/shapes/scenes.py`): 32x32 scenes of 1-4 objects on a 2x2 grid, "
        f"each object one of {len(scenes.SHAPES)} shapes x {len(scenes.COLORS)} colours x {len(scenes.SIZES)} sizes, "
        f"{len(scenes.BACKGROUNDS)} backgrounds; {len(scenes.HELDOUT_PAIRS)} of the {len(scenes._ALL_PAIRS)} pairs of "
        "object types never occur together in training. The architecture classes and vocabularies are the shapes "
        "bundle's (BERT WordPiece for the captioner, CLIP BPE for the generator and CLIP).",
        "",
        "The CLIP is trained contrastively with ordinary in-batch negatives, as real CLIP is: every other caption "
        "in the batch is a negative, identical captions are positives, and no hard negatives (no swapped or "
        "altered captions) are ever shown. The generator learns from `detailed` (cell named first) and `count` "
        "captions; the captioner writes them.",
        "",
        "## Parts",
        "",
        "| part | what | parameters | MB |",
        "| --- | --- | ---: | ---: |",
    ]
    lines += parts_rows(bundle, SCENES_PARTS)
    lines += [
        "",
        f"Total size: {_mb(bundle):.1f} MB.",
        "",
        "## Training",
        "",
        "Each part: `recon scenes train --component NAME` (seed 0, 1 thread, data rendered on the fly from "
        "(seed, step)). The VAE comes before the UNet, which trains in two stages (`unet_stage1`: 2-object "
        "scenes; `unet`: 1-4 objects with `--init-from` the first stage's bundle and a fresh `--work`); the "
        "captioner (its weak snapshot on the way), CLIP and judge are independent. The commands in order are "
        "under *Rebuild* below.",
        "",
        "| record | steps | batch | wall min | CPU min | final validation | command |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    lines += training_rows(records, device=False)
    lines += [
        "",
        "## Measured quality",
        "",
        f"`recon scenes eval --n {result['n']} --seed {result['seed']}` (DDIM "
        f"{result['sampling']['num_inference_steps']} steps, guidance {result['sampling']['guidance_scale']}; "
        f"captioner beam {result['decoding']['num_beams']}):",
        "",
        "| metric | bar | test (1-4 objects) | held-out type pairs (2-4 objects) |",
        "| --- | ---: | ---: | ---: |",
    ]
    keys = [k for k in result["test"] if isinstance(result["test"][k], float)]
    for key in keys:
        bar = result["bars"].get(key)
        lines.append(
            f"| {key} | {_pct(bar) if bar else ''} | {_pct(result['test'][key])} | "
            f"{_pct(result['heldout'][key]) if key in result['heldout'] else ''} |"
        )
    by = result["test"].get("generator_exact_by_objects", {})
    lines += [
        "",
        "Generator exact scenes by number of objects (test): "
        + ", ".join(f"{k}: {_pct(v)}" for k, v in by.items())
        + ".",
        "",
        "The judge is a classifier trained on renders; a generated image it misreads counts as wrong, so the "
        "generator's numbers are lower bounds up to the judge's own errors.",
        "",
    ]
    if extra:
        lines += [extra.strip(), ""]
    path = bundle / "MODEL_CARD.md"
    path.write_text("\n".join(lines))
    return path
