"""The reconstruction score as a ``torchmetrics.Metric``, for use inside one's own evaluation loop.

    from recon.metrics import ReconstructionScore

    metric = ReconstructionScore("shapes")                     # a preset name, a YAML path, or a Config
    for images, captions in loader:                            # images [B, 3, H, W] in [0, 1] (or PIL), captions str
        metric.update(images, captions)
    metric.compute()                                           # mean over captions of the configured similarity

Each caption is rendered ``generator.images_per_caption`` times with the configured generator and compared with
its image by every configured image similarity, exactly as ``recon score`` computes its ``recon_*`` keys: the same
seeds (``derive_seed(run seed, image key, 0, k)``), the same content-keyed cache (a caption already scored there is
not generated again) and the same flagged-image handling. The image key is the ``ids`` given to ``update`` (use the
image ids of a ``recon score`` run to reproduce its numbers), else the SHA-256 of the image's PNG bytes.
Images are float ``[3, H, W]`` in [0, 1], uint8 ``[3, H, W]`` (divided by 255), as tensors or numpy arrays, or PIL
images. Floats outside [0, 1], NaN and inf are refused, never clamped: a 0-255 float image clamped to [0, 1] is
all white, and a NaN image all black, and either would score (and be cached) as that.
Sums and counts are metric states with ``dist_reduce_fx="sum"``, so torchmetrics' distributed sync applies.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torchmetrics import Metric

from recon.config import Config, load_config, metric_direction
from recon.data import image_to_tensor, validate_text
from recon.jobs import make_cache
from recon.pipeline import Reconstructor, png_bytes
from recon.runs import Cache


class ReconstructionScore(Metric):
    """Mean reconstruction similarity of (image, caption) pairs; see the module docstring.

    ``compute()`` returns a scalar tensor (the ``select_by`` similarity, or the only one configured) or, with
    ``all_metrics=True``, ``{recon_<metric key>: tensor}`` for every configured image similarity.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None  # depends on the configured similarity: see ``better`` ("higher" or "lower")

    def __init__(
        self,
        config: str | Config | None = None,
        overrides: Sequence[str] = (),
        device: str | None = None,
        use_cache: bool = True,
        all_metrics: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)

        self.config = config if isinstance(config, Config) else load_config(config, list(overrides))
        if not self.config.similarity.image:
            raise ValueError("similarity.image is empty: the reconstruction score needs an image similarity")
        self._recon = Reconstructor(
            self.config, device=device, cache=make_cache(self.config) if use_cache else Cache(None)
        )
        self.keys = [f"recon_{n}" for n in self._recon.metric_names("image")]
        self.selected = f"recon_{self._recon.select_metric()}"
        self.better = metric_direction(self.selected)
        self.all_metrics = all_metrics
        for key in self.keys:
            self.add_state(f"{key}_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{key}_n", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self,
        images: torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray | Image.Image],
        captions: Sequence[str],
        ids: Sequence[str] | None = None,
    ) -> None:
        """Score each ``(image, caption)``: images ``[B, 3, H, W]`` floats in [0, 1] or uint8, or a list of
        ``[3, H, W]`` tensors / numpy arrays / PIL images; ``ids`` (optional) name the images as a ``recon score``
        run does. An image out of range (see the module docstring) is a ValueError naming its index."""
        originals = [image_tensor(im, f"update: image {i}") for i, im in enumerate(images)]
        captions = list(captions)
        if len(originals) != len(captions) or (ids is not None and len(ids) != len(captions)):
            raise ValueError(
                f"update: {len(originals)} images, {len(captions)} captions"
                f"{'' if ids is None else f', {len(ids)} ids'}: give one of each per pair"
            )
        for i, caption in enumerate(captions):
            if (err := validate_text(caption)) is not None:
                raise ValueError(f"update: caption {i}: {err}")
        hashes = [hashlib.sha256(png_bytes(x)).hexdigest() for x in originals]
        keys = [str(i) for i in ids] if ids is not None else hashes
        requests = [(key, key, x, h, c.strip()) for key, x, h, c in zip(keys, originals, hashes, captions)]
        for result in self._recon.reconstruct_captions(requests, prefix="recon_"):
            for key in self.keys:
                value = result["scores"].get(key)
                if value is not None:  # every reconstruction of the caption flagged: nothing to average
                    setattr(self, f"{key}_sum", getattr(self, f"{key}_sum") + value)
                    setattr(self, f"{key}_n", getattr(self, f"{key}_n") + 1)

    def compute(self) -> torch.Tensor | dict[str, torch.Tensor]:
        means = {
            key: (getattr(self, f"{key}_sum") / getattr(self, f"{key}_n").clamp(min=1)).float()
            if getattr(self, f"{key}_n") > 0
            else torch.tensor(float("nan"))
            for key in self.keys
        }
        return means if self.all_metrics else means[self.selected]


def image_tensor(image: torch.Tensor | np.ndarray | Image.Image, where: str = "image") -> torch.Tensor:
    """``[3, H, W]`` float32 in [0, 1] from a PIL image, or a ``[3, H, W]`` tensor / numpy array: uint8 is divided
    by 255, floats are kept as they are. Anything else -- another shape or dtype, NaN or inf, floats outside
    [0, 1] -- is a ValueError (TypeError for other objects) that starts with ``where`` and says what to pass."""
    if isinstance(image, Image.Image):
        return image_to_tensor(image)
    if isinstance(image, np.ndarray):
        try:
            image = torch.from_numpy(np.ascontiguousarray(image))
        except TypeError:
            raise ValueError(
                f"{where}: a numpy array of dtype {image.dtype}; pass uint8 (0-255) or floats in [0, 1]"
            ) from None
    if not isinstance(image, torch.Tensor):
        raise TypeError(
            f"{where}: got {type(image).__name__}; pass a [3, H, W] tensor or numpy array, or a PIL image"
        )
    x = image.detach().cpu()
    if x.ndim != 3 or x.shape[0] != 3 or x.shape[1] == 0 or x.shape[2] == 0:
        hint = (
            "; channels last? pass x.permute(2, 0, 1) (numpy: x.transpose(2, 0, 1))"
            if x.ndim == 3 and x.shape[-1] == 3
            else ""
        )
        raise ValueError(
            f"{where}: shape {tuple(x.shape)}, expected [3, H, W] (a batch is [B, 3, H, W]){hint}"
        )
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    if not x.is_floating_point():
        raise ValueError(f"{where}: dtype {x.dtype}; pass uint8 (0-255) or floats in [0, 1]")
    if not torch.isfinite(x).all():
        raise ValueError(f"{where}: holds non-finite values (NaN or inf); pass floats in [0, 1]")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        raise ValueError(
            f"{where}: values in [{lo:.4g}, {hi:.4g}], expected floats in [0, 1] (divide a 0-255 "
            "image by 255, or pass it as uint8); nothing is clamped"
        )
    return x.float()
