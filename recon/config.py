"""Typed configuration: dataclasses, YAML presets from configs/, dotted ``key=value`` overrides.

A preset is a YAML file whose keys mirror :class:`Config`. ``load_config("shapes", ["generator.guidance_scale=5"])``
reads ``configs/shapes.yaml``, applies the overrides (values parsed as YAML scalars) and validates every field,
so a typo fails early with the dotted name of the field instead of deep inside a model call.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# Presets ship inside the package (a wheel or `pip install .` has them); the checkout's top-level configs/ is a
# symlink to this folder, so the presets keep their familiar place.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_PRESET = "shapes"  # the shipped bundle (recon/shapes/bundle)


class ConfigError(ValueError):
    """A config file or override is malformed; the message names the file or the dotted field."""


@dataclass
class DecodingConfig:
    method: str = "beam"  # greedy | beam | nucleus
    num_beams: int = 3
    min_new_tokens: int = 5
    max_new_tokens: int = 20
    top_p: float = 0.9
    top_k: int = 0
    temperature: float = 1.0
    repetition_penalty: float = 1.0


@dataclass
class CaptionerConfig:
    backend: str = "blip"  # key of recon.captioners.BACKENDS
    model: str = ""  # HF id, local dir, or builtin:NAME
    checkpoint: str | None = None  # original BLIP/LAVIS .pth converted onto `model`'s architecture
    adapter: str | None = None  # peft adapter dir (from `recon finetune`)
    prompt: str = "a picture of "
    num_candidates: int = 1
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    dtype: str = "auto"


@dataclass
class GeneratorConfig:
    backend: str = "diffusion"  # key of recon.generators.BACKENDS
    model: str = ""
    lora: str | None = None  # diffusers LoRA weights (dir or .safetensors)
    scheduler: str | None = None  # diffusers scheduler class name, e.g. DDIMScheduler; None keeps the model's
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    height: int | None = None  # None: the model's native size
    width: int | None = None
    images_per_caption: int = 1
    negative_prompt: str = ""
    safety_checker: bool = False
    # Image k of every candidate of one item shares a seed, so candidates are compared under identical noise.
    common_random_numbers: bool = True
    # false: each item's images are generated in their own batches, so an item regenerated alone gives the same
    # PNG bytes as in the full run; true: batches span items (faster when an item has few images; images then
    # depend on their batch neighbours at the 1e-6 level).
    batch_across_items: bool = False
    dtype: str = "auto"
    # Prompts past the text encoder's context (77 tokens): "truncate" (the pipeline's own behaviour, so results stay
    # comparable) or "chunk" (encoded in 77-token chunks, hidden states concatenated; prompts that fit are unchanged).
    long_prompts: str = "truncate"


@dataclass
class MetricConfig:
    """One similarity. ``kind`` is a key of recon.similarity.IMAGE_METRICS or TEXT_METRICS."""

    kind: str = "clip"
    model: str | None = None  # open_clip architecture / HF id / local dir (per kind)
    pretrained: str | None = None  # open_clip pretrained tag or weights file
    net: str = "alex"  # lpips backbone
    random_backbone: bool = False  # lpips: allow an untrained backbone (testing only)
    name: str | None = None  # result key; default: the module's own name
    # text metrics, texts past the encoder's context: "truncate" (as the published CLIPScore does) or "chunk_mean"
    # (mean of the unit embeddings of context-sized chunks); either way each text's truncation is recorded
    long_text: str = "truncate"


@dataclass
class SimilarityConfig:
    image: list[MetricConfig] = field(default_factory=lambda: [MetricConfig(kind="clip")])
    text: list[MetricConfig] = field(default_factory=list)
    select_by: str | None = None  # metric key used to rank candidates; None: the first image metric


@dataclass
class RunConfig:
    seed: int = 0
    batch_size: int = 4
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int | None = None  # torch CPU threads; None: physical cores (oversubscription is very slow)
    cache_dir: str | None = None  # content-keyed cache; None: $RECON_CACHE or ~/.cache/recon; "" disables
    save_images: bool = True
    max_report_items: int = 200


@dataclass
class Config:
    name: str = "custom"
    captioner: CaptionerConfig = field(default_factory=CaptionerConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    similarity: SimilarityConfig = field(default_factory=SimilarityConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _is_optional(tp) -> tuple[bool, Any]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return True, args[0]
    return False, tp


def _coerce(value: Any, tp: Any, where: str) -> Any:
    optional, tp = _is_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: may not be null")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return [_coerce(v, item_tp, f"{where}.{i}") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e-4 as a string: it wants 1.0e-4
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls, data: Any, where: str = "config"):
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types by dotted name."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where != "config" else k) for k, v in data.items()}
    return cls(**kwargs)


def find_config(name_or_path: str, stems: tuple[str, ...], what: str, available: list[str]) -> Path:
    """A YAML path as given, or ``<stem>.yaml`` for the first of ``stems`` found in ``$RECON_CONFIGS`` or the
    package's presets; otherwise an error listing ``available``. Run presets and finetune configs alike."""
    p = Path(name_or_path).expanduser()
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"{what} file not found: {p}")
        return p
    for base in [os.environ.get("RECON_CONFIGS"), CONFIG_DIR]:
        for stem in stems:
            if base and (Path(base) / f"{stem}.yaml").is_file():
                return Path(base) / f"{stem}.yaml"
    raise ConfigError(
        f"unknown {what} {name_or_path!r}; available: {', '.join(available)} (or pass a YAML path)"
    )


def preset_path(name_or_path: str) -> Path:
    return find_config(name_or_path, (name_or_path,), "preset", list_presets())


def list_presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if not p.stem.startswith("finetune"))


def read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def apply_override(data: dict, override: str) -> None:
    """Apply ``a.b.c=value`` to nested dict ``data`` (list items by index: ``similarity.image.0.kind=lpips``)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected dotted.key=value")
    key, raw = override.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    parts = key.strip().split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override {key}: {'.'.join(parts[: i + 1])} is not a valid list index")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"override {key}: {'.'.join(parts[: i + 1])} is not a section")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) > len(node):
            raise ConfigError(f"override {key}: {last} is not a valid list index")
        if int(last) == len(node):
            node.append(value)
        else:
            node[int(last)] = value
    else:
        node[last] = value


def load_config(preset: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a preset name or YAML path (None: the embedded default), then apply dotted overrides."""
    path = preset_path(preset or DEFAULT_PRESET)
    data = _preset_dict(path)
    data.setdefault("name", path.stem)
    preset = copy.deepcopy(data) if overrides else data
    for o in overrides:
        apply_override(data, o)
    try:
        return _validated(data)
    except ConfigError as e:
        if overrides and _is_valid(preset):  # the preset is fine on its own: an override broke it
            raise ConfigError(f"--set {' '.join(overrides)}: {e}") from None
        raise ConfigError(f"{path}: {e}") from None


def _validated(data: dict) -> Config:
    cfg = from_dict(Config, data)
    check(cfg)
    return cfg


def _is_valid(data: dict) -> bool:
    try:
        _validated(data)
        return True
    except ConfigError:
        return False


DECODING_METHODS = ("greedy", "beam", "nucleus")
# Every similarity kind, per role: its result key, the class that computes it (``module:Class``; recon.similarity
# imports the classes from here, a test checks each class's ``name`` against its key) and the recon.hub function that
# checks, before any work and without importing a model library, that its files are there (``hub.preflight_metric``;
# None: ``model`` if one is set). Kinds and select_by are checked at load from this table. A new similarity: its
# class, and one row here.
SIMILARITY_KINDS: dict[str, dict[str, tuple[str, str, str | None]]] = {
    "image": {
        "clip": ("clip_similarity", "recon.similarity.image:ClipImageSimilarity", "check_open_clip"),
        "clip_pooler": (
            "clip_pooler_similarity",
            "recon.similarity.image:ClipVisionPoolerSimilarity",
            "check_hf_clip",
        ),
        "lpips": ("lpips_distance", "recon.similarity.image:LpipsDistance", "check_lpips_metric"),
        "ssim": ("ssim_similarity", "recon.similarity.image:SsimSimilarity", None),
        "psnr": ("psnr_similarity", "recon.similarity.image:PsnrSimilarity", None),
        "dino": ("dino_similarity", "recon.similarity.image:DinoSimilarity", "check_dino"),
        "dreamsim": ("dreamsim_distance", "recon.similarity.image:DreamSimDistance", "check_dreamsim_metric"),
    },
    "text": {
        "clip_text": ("clip_text_similarity", "recon.similarity.text:ClipTextSimilarity", "check_open_clip"),
        "clip_text_pooler": (
            "clip_text_pooler_similarity",
            "recon.similarity.text:ClipTextPoolerSimilarity",
            "check_hf_clip",
        ),
        "sbert": ("sbert_similarity", "recon.similarity.text:SbertSimilarity", None),
    },
}
IMAGE_METRIC_NAMES = {kind: row[0] for kind, row in SIMILARITY_KINDS["image"].items()}
TEXT_METRIC_NAMES = {kind: row[0] for kind, row in SIMILARITY_KINDS["text"].items()}


LONG_PROMPT_MODES = ("truncate", "chunk")
LONG_TEXT_POLICIES = ("truncate", "chunk_mean")


def truncation_warning(n_tokens: int, limit: int, why: str) -> str:
    """The one wording of a per-caption truncation note (the generator's record warnings; tables count them)."""
    return f"caption truncated from {n_tokens} to {limit} tokens ({why})"


def is_truncation_warning(warning: str) -> bool:
    return str(warning).startswith("caption truncated from ")


def metric_direction(name: str) -> str:
    """The one rule for every score key: ``"lower"`` is better for a name ending in ``_distance``, else
    ``"higher"`` (similarities, CLIPScore, BLEU, ...)."""
    return "lower" if str(name).endswith("_distance") else "higher"


def best_index(values, metric: str) -> int:
    """Index of the best value for ``metric`` (its direction), skipping None / NaN; ties go to the earliest (the
    first candidate: the beam's best); 0 when no value is usable."""
    lower = metric_direction(metric) == "lower"
    best, best_i = None, 0
    for i, v in enumerate(values):
        if v is None or v != v:
            continue
        if best is None or (v < best if lower else v > best):
            best, best_i = v, i
    return best_i


def check_decoding(d: DecodingConfig, where: str) -> None:
    """Ranges of a decoding config, named by dotted key (``where`` is its prefix)."""
    if d.method not in DECODING_METHODS:
        raise ConfigError(f"{where}.method={d.method!r}: expected one of {', '.join(DECODING_METHODS)}")
    for key in ("num_beams", "max_new_tokens"):
        if getattr(d, key) < 1:
            raise ConfigError(f"{where}.{key}={getattr(d, key)}: must be >= 1")
    if not 0 <= d.min_new_tokens <= d.max_new_tokens:
        raise ConfigError(
            f"{where}.min_new_tokens={d.min_new_tokens}: must be in 0..{where}.max_new_tokens "
            f"({d.max_new_tokens})"
        )
    if not (0 < d.top_p <= 1) or d.top_k < 0:
        raise ConfigError(f"{where}.top_p={d.top_p} / top_k={d.top_k}: top_p in (0, 1], top_k >= 0")
    for key in ("temperature", "repetition_penalty"):
        value = getattr(d, key)
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{where}.{key}={value}: must be a finite number > 0")


def check(cfg: Config) -> None:
    """Ranges the types alone do not catch, checked before any work and named by dotted key."""
    c, g, r = cfg.captioner, cfg.generator, cfg.run
    check_decoding(c.decoding, "captioner.decoding")
    for key, value in [
        ("captioner.num_candidates", c.num_candidates),
        ("generator.num_inference_steps", g.num_inference_steps),
        ("generator.images_per_caption", g.images_per_caption),
        ("run.batch_size", r.batch_size),
    ]:
        if value < 1:
            raise ConfigError(f"{key}={value}: must be >= 1")
    if not math.isfinite(g.guidance_scale) or g.guidance_scale < 0:
        raise ConfigError(f"generator.guidance_scale={g.guidance_scale}: must be a finite number >= 0")
    for key, value in [("generator.height", g.height), ("generator.width", g.width)]:
        if value is not None and (value < 8 or value % 8):
            raise ConfigError(
                f"{key}={value}: must be a multiple of 8 (the VAE's downsampling), >= 8, or null"
            )
    if g.long_prompts not in LONG_PROMPT_MODES:
        raise ConfigError(
            f"generator.long_prompts={g.long_prompts!r}: expected one of {', '.join(LONG_PROMPT_MODES)}"
        )
    if r.threads is not None and r.threads < 1:
        raise ConfigError(f"run.threads={r.threads}: must be >= 1 (or null for the physical cores)")
    if r.max_report_items < 0:
        raise ConfigError(f"run.max_report_items={r.max_report_items}: must be >= 0")
    image_keys = []
    for role, table in (("image", IMAGE_METRIC_NAMES), ("text", TEXT_METRIC_NAMES)):
        for i, m in enumerate(getattr(cfg.similarity, role)):
            if m.kind not in table:
                other = "text" if role == "image" else "image"
                hint = (
                    f" ({'an' if other == 'image' else 'a'} {other} similarity: list it under similarity.{other})"
                    if m.kind in {**IMAGE_METRIC_NAMES, **TEXT_METRIC_NAMES}
                    else ""
                )
                raise ConfigError(
                    f"similarity.{role}.{i}.kind={m.kind!r}: unknown {role} similarity{hint}; "
                    f"valid kinds: {', '.join(table)}"
                )
            if m.long_text not in LONG_TEXT_POLICIES:
                raise ConfigError(
                    f"similarity.{role}.{i}.long_text={m.long_text!r}: expected one of "
                    f"{', '.join(LONG_TEXT_POLICIES)}"
                )
            if role == "image":
                image_keys.append(m.name or table[m.kind])
    select = cfg.similarity.select_by
    if select is not None and select not in image_keys:
        raise ConfigError(
            f"similarity.select_by={select!r}: not one of the image metrics' keys "
            f"({', '.join(image_keys) or 'none configured'})"
        )


def _preset_dict(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A preset's values over its ``base:`` chain (a preset may extend another one) over the defaults."""
    if path.resolve() in seen:
        chain = " -> ".join(str(p) for p in (*seen, path.resolve()))
        raise ConfigError(f"{path}: its base: chain loops ({chain}); break the cycle")
    data = read_yaml(path)
    base = data.pop("base", None)
    if not base or base == "none":
        return merge(Config().to_dict(), data)
    parent = _preset_dict(preset_path(base), (*seen, path.resolve()))
    parent.setdefault("name", preset_path(base).stem)
    return merge(parent, data)


def merge(base: dict, over: dict) -> dict:
    """``over`` deep-merged onto ``base`` (run presets and finetune configs alike)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
