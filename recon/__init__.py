"""recon: image -> caption -> regenerate reconstruction; similarity as caption metric and training regulariser.

Public API (nothing here loads a model or touches the network at import time)::

    from recon import load_config, Reconstructor, load_captioner, load_generator, load_similarity
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "load_config": ("recon.config", "load_config"),
    "Config": ("recon.config", "Config"),
    "Reconstructor": ("recon.pipeline", "Reconstructor"),
    "load_captioner": ("recon.captioners", "load_captioner"),
    "load_generator": ("recon.generators", "load_generator"),
    "load_similarity": ("recon.similarity", "load_similarity"),
    "reconstruct_images": ("recon.jobs", "reconstruct_images"),
    "reconstruct_texts": ("recon.jobs", "reconstruct_texts"),
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    # Lazy so that `import recon` stays cheap: torch/diffusers load only when a role is used.
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'recon' has no attribute {name!r}")
