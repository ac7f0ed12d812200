"""Similarities between originals and reconstructions, as ``nn.Module``s returning ``[B]``.

A config names a metric by ``kind`` (a key of ``IMAGE_METRICS`` or ``TEXT_METRICS``); the module's ``name`` (or
``MetricConfig.name``) is its result key, and says the direction: ``*_similarity`` higher is more similar,
``*_distance`` lower is more similar (``module.higher_is_better`` too).
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from recon.config import SIMILARITY_KINDS, ConfigError, MetricConfig, SimilarityConfig
from recon.similarity.base import EmbeddingSimilarity, Similarity
from recon.similarity.image import (
    PSNR_CAP_DB,
    ClipImageSimilarity,
    ClipVisionPoolerSimilarity,
    DinoSimilarity,
    DreamSimDistance,
    LpipsDistance,
    PsnrSimilarity,
    SsimSimilarity,
    psnr,
    ssim,
)
from recon.similarity.text import ClipTextPoolerSimilarity, ClipTextSimilarity, SbertSimilarity


def _classes(role: str) -> dict[str, type[Similarity]]:
    """``{kind: class}`` of a role, from :data:`recon.config.SIMILARITY_KINDS` (the one list of kinds)."""
    out = {}
    for kind, (_, path, _check) in SIMILARITY_KINDS[role].items():
        module, name = path.split(":")
        out[kind] = getattr(importlib.import_module(module), name)
    return out


IMAGE_METRICS: dict[str, type[Similarity]] = _classes("image")
TEXT_METRICS: dict[str, type[Similarity]] = _classes("text")


def metric_class(cfg: MetricConfig, where: str = "metric", role: str | None = None) -> type[Similarity]:
    """The class of ``cfg.kind``; ``role`` ("image" / "text") restricts the valid kinds. An unknown kind is a
    :class:`ConfigError` naming ``where`` and the valid kinds."""
    tables = {"image": IMAGE_METRICS, "text": TEXT_METRICS}
    table = tables[role] if role else {**IMAGE_METRICS, **TEXT_METRICS}
    cls = table.get(cfg.kind)
    if cls is None:
        hint = ""
        for other, other_table in tables.items():
            if other != role and cfg.kind in other_table:
                hint = f" ('{cfg.kind}' is {'an' if other == 'image' else 'a'} {other} similarity: list it under similarity.{other})"
        what = f"{role} similarity" if role else "similarity"
        raise ConfigError(
            f"{where}.kind: unknown {what} kind {cfg.kind!r}{hint}; valid kinds: {', '.join(table)}"
        )
    return cls


def load_similarity(
    cfg: MetricConfig, device: torch.device | str = "cpu", where: str = "metric", role: str | None = None
) -> nn.Module:
    """Build one metric from its config; ``role`` ("image" / "text") restricts the valid kinds."""
    return metric_class(cfg, where, role).from_config(cfg, device, where=where)


def _load_all(cfgs: list[MetricConfig], device, role: str) -> dict[str, nn.Module]:
    metrics: dict[str, nn.Module] = {}
    first_at: dict[str, int] = {}
    for i, cfg in enumerate(cfgs):
        metric = load_similarity(cfg, device, where=f"similarity.{role}.{i}", role=role)
        if metric.name in metrics:
            raise ConfigError(
                f"similarity.{role}.{i}.name: result key {metric.name!r} is already used by "
                f"similarity.{role}.{first_at[metric.name]}; give one of them a distinct name"
            )
        metrics[metric.name] = metric
        first_at[metric.name] = i
    return metrics


def load_image_metrics(cfg: SimilarityConfig, device: torch.device | str = "cpu") -> dict[str, nn.Module]:
    """``{result key: module}`` for ``cfg.image``, in config order."""
    return _load_all(cfg.image, device, "image")


def load_text_metrics(cfg: SimilarityConfig, device: torch.device | str = "cpu") -> dict[str, nn.Module]:
    """``{result key: module}`` for ``cfg.text``, in config order."""
    return _load_all(cfg.text, device, "text")


__all__ = [
    "IMAGE_METRICS",
    "TEXT_METRICS",
    "PSNR_CAP_DB",
    "ClipImageSimilarity",
    "ClipTextPoolerSimilarity",
    "ClipTextSimilarity",
    "ClipVisionPoolerSimilarity",
    "DinoSimilarity",
    "DreamSimDistance",
    "EmbeddingSimilarity",
    "LpipsDistance",
    "PsnrSimilarity",
    "SbertSimilarity",
    "Similarity",
    "SsimSimilarity",
    "load_image_metrics",
    "load_similarity",
    "load_text_metrics",
    "metric_class",
    "psnr",
    "ssim",
]
