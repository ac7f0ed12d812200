"""What decides a run's numbers, recorded beside them: library versions, each model's id and a content hash of its
weight files, and the config's seeds, prompt prefix, preprocessing, device and dtype.

Published caption-metric numbers often fail to reproduce over a prompt prefix, a Pillow version or a checkpoint;
every run directory holds ``fingerprint.json`` (written when the run starts), ``recon env`` prints the environment
part for bug reports (as ``diffusers-cli env`` does), and :func:`differences` names what differs between runs that a
table compares. Versions come from package metadata, so nothing heavy is imported to read them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

from recon import hub
from recon.data import atomic_write_text
from recon.runs import flatten, sha256_file

FILE = "fingerprint.json"
# The distributions whose versions change numbers (Java: pycocoevalcap's tokenizer and METEOR).
PACKAGES = (
    "recon",
    "torch",
    "torchvision",
    "diffusers",
    "transformers",
    "open_clip_torch",
    "peft",
    "accelerate",
    "Pillow",
    "numpy",
    "scipy",
    "pycocoevalcap",
    "torchmetrics",
    "lpips",
    "dreamsim",
    "safetensors",
)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".tar")
MODEL_FIELDS = ("model", "checkpoint", "adapter", "lora")  # config fields that name weights


def package_versions() -> dict[str, str | None]:
    """``{distribution: version}``; None where it is not installed."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


@functools.lru_cache(maxsize=1)
def java_version() -> str | None:
    """``java -version``'s first line, or None without Java (METEOR and the PTB tokenizer need it)."""
    try:
        r = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (r.stderr or r.stdout).strip().splitlines()
    return lines[0].strip() if lines else None


def environment(devices: bool = False) -> dict[str, Any]:
    """Python, platform, library versions and Java; ``devices``: also torch's view of CUDA (imports torch)."""
    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "java": java_version(),
    }
    if devices:
        import torch

        env["cuda"] = torch.version.cuda if torch.cuda.is_available() else None
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        env["torch_threads"] = torch.get_num_threads()
    return env


def weights_sha256(model_id: str | None) -> str | None:
    """SHA-256 over a model's weight files (names and contents, sorted), or None when it cannot be resolved here.
    Each file's hash is remembered per (path, size, mtime) in the cache directory, so a multi-GB checkpoint is
    read once, not at every run."""
    if not model_id:
        return None
    path = local_path(model_id)
    if path is None:
        return None
    files = (
        sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
        if path.is_dir()
        else [path]
    )
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(path) if path.is_dir() else f.name}\x1f{_file_sha256(f)}\n".encode())
    return h.hexdigest()


def local_path(model_id: str) -> Path | None:
    """Where ``model_id``'s files already are (builtin, a local path, the Hugging Face cache), or None. Never
    downloads and never probes the network: a fingerprint only reads what a run already loaded."""
    if model_id.startswith("builtin:"):
        return hub.builtin_path(model_id)
    if Path(model_id).expanduser().exists():
        return Path(model_id).expanduser()
    if model_id.count("/") != 1:
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - not in the cache: nothing to hash
        return None


def _file_sha256(path: Path) -> str:
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}\x1f{st.st_size}\x1f{st.st_mtime_ns}".encode()).hexdigest()
    memo = hub.cache_root() / "weights-sha256" / f"{key}.txt"
    try:
        return memo.read_text().strip()
    except OSError:
        pass
    digest = sha256_file(path)
    try:
        atomic_write_text(memo, digest + "\n")
    except OSError:  # a read-only cache only costs the hash again next time
        pass
    return digest


def model_ids(config: dict) -> dict[str, str]:
    """``{dotted field: model id}`` for every model a resolved config (run or finetune, as a dict) names."""
    out = {}

    def walk(d: Any, prefix: str) -> None:
        if isinstance(d, dict):
            for k, v in d.items():
                walk(v, f"{prefix}{k}.")
        elif isinstance(d, list):
            for i, v in enumerate(d):
                walk(v, f"{prefix}{i}.")
        elif isinstance(d, str) and d and prefix.rstrip(".").rsplit(".", 1)[-1] in MODEL_FIELDS:
            out[prefix.rstrip(".")] = d

    walk(config, "")
    return out


def run_fingerprint(config: dict, extra: dict | None = None) -> dict[str, Any]:
    """Everything that decides a run's numbers: the environment, each model with its weights' hash, and the
    config, recorded whole (seeds, prompt prefix, decoding, sizes, device and dtype as configured; the image
    preprocessing travels with each model's files, so its hash covers it)."""
    models = {
        field: {"id": mid, "weights_sha256": weights_sha256(mid)} for field, mid in model_ids(config).items()
    }
    return {"environment": environment(), "models": models, "config": config, **(extra or {})}


def write(run_dir: str | Path, config: dict, extra: dict | None = None) -> dict[str, Any]:
    """``run_dir/fingerprint.json`` for this start of the run (a resumed run records the environment it resumed
    in: the last start's is the one on disk)."""
    fp = run_fingerprint(config, extra)
    atomic_write_text(Path(run_dir) / FILE, json.dumps(fp, indent=1, default=str) + "\n")
    return fp


def differences(run_dirs: Iterable[str | Path], keys: Iterable[str] | None = None) -> dict[str, list]:
    """``{dotted key: [value per run]}`` for the fingerprint entries that differ between ``run_dirs`` (runs without
    a fingerprint are left out); ``keys``: only keys starting with one of these."""
    prints = []
    for d in run_dirs:
        try:
            prints.append(flatten(json.loads((Path(d) / FILE).read_text(encoding="utf-8"))))
        except (OSError, ValueError):
            continue
    if len(prints) < 2:
        return {}
    wanted = tuple(keys) if keys is not None else None
    out = {}
    for k in sorted(set().union(*prints)):
        if wanted is not None and not k.startswith(wanted):
            continue
        values = [p.get(k) for p in prints]
        if any(v != values[0] for v in values[1:]):
            out[k] = values
    return out


def format_environment(env: dict[str, Any]) -> str:
    """``recon env``'s text: one ``- name: value`` line each, as ``diffusers-cli env`` prints."""
    lines = [
        f"- recon: {env['packages'].get('recon')}",
        f"- Python: {env['python']}",
        f"- Platform: {env['platform']}",
        f"- Java (METEOR, PTB tokenizer): {env['java'] or 'not found'}",
    ]
    lines += [
        f"- {name}: {version or 'not installed'}"
        for name, version in env["packages"].items()
        if name != "recon"
    ]
    if "cuda" in env:
        lines += [
            f"- CUDA: {env['cuda'] or 'not available'}",
            f"- GPUs: {', '.join(env['gpus']) or 'none'}",
            f"- torch threads: {env['torch_threads']}",
        ]
    lines += [
        f"- {k}: {os.environ[k]}"
        for k in ("RECON_CACHE", "HF_HOME", "TORCH_HOME", "HF_HUB_OFFLINE")
        if k in os.environ
    ]
    return "\n".join(lines)


def differences_note(run_dirs: Iterable[str | Path]) -> str | None:
    """A table's footer: which recorded environment / model entries differ between the runs it compares."""
    diff = differences(
        run_dirs, keys=("environment.packages", "environment.java", "environment.python", "models")
    )
    if not diff:
        return None
    return "the compared runs differ in what decides their numbers (fingerprint.json): " + "; ".join(
        f"{k.removeprefix('environment.packages.')} {' / '.join(str(v) for v in values)}"
        for k, values in diff.items()
    )


def summary_note(run_dir: str | Path) -> str | None:
    """A table's footer: the versions and weights behind its numbers, from ``run_dir/fingerprint.json``."""
    try:
        fp = json.loads((Path(run_dir) / FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    packages = fp.get("environment", {}).get("packages", {})
    shown = [
        f"{k} {packages[k]}"
        for k in ("recon", "torch", "diffusers", "transformers", "open_clip_torch", "Pillow", "pycocoevalcap")
        if packages.get(k)
    ]
    models = list(
        dict.fromkeys(
            f"{m['id']} ({(m.get('weights_sha256') or 'unhashed')[:12]})"
            for m in fp.get("models", {}).values()
        )
    )
    return (
        "numbers from "
        + ", ".join(shown)
        + (f"; models {', '.join(models)}" if models else "")
        + f"; Java {fp.get('environment', {}).get('java') or 'absent'} (fingerprint.json has the rest)"
    )
