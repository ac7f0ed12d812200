"""Shared fixtures: offline, single-threaded, tiny random models built once per session in a temp cache."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def recon_cache(tmp_path_factory):
    """Point recon's cache (and the tiny-random builtins) at a session temp dir: tests never touch ~/.cache."""
    path = tmp_path_factory.mktemp("recon_cache")
    old = os.environ.get("RECON_CACHE")
    os.environ["RECON_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("RECON_CACHE", None)
    else:
        os.environ["RECON_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_models(recon_cache):
    """Directory with tiny random captioner/, generator/, clip/, clip_vision/ in their standard layouts."""
    from recon import hub

    return hub.builtin_path("builtin:tiny-random")
