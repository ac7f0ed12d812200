"""Reconstructor: image -> text -> image and text -> image -> text, with candidate ranking.

Roles are loaded lazily, so a rerun whose every stage hits the content-keyed cache loads no model at all.
Every reconstruction is scored as the PNG that is saved (uint8), so cached and fresh results are identical.
A cache entry is used only when it is what this stage writes (captions: a list of strings; a PNG that decodes
within the input pixel budget; a finite score): anything else is a miss that is rebuilt, with a warning naming the
file. A non-finite score is never cached, and is left out of a caption's mean with a warning in its record.
"""

from __future__ import annotations

import hashlib
import io
import math
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from PIL import Image

from recon import hub
from recon.config import IMAGE_METRIC_NAMES, TEXT_METRIC_NAMES, Config, best_index
from recon.data import encode_png, image_to_tensor, load_image
from recon.runs import Cache, derive_seed

if TYPE_CHECKING:  # torch loads on the first model run: a rerun served by the cache never imports it
    import torch


def png_bytes(image: torch.Tensor | Image.Image) -> bytes:
    """Deterministic PNG bytes of a ``[3, H, W]`` tensor in [0, 1] or a PIL image."""
    return encode_png(image)


def to_tensor(image: Image.Image | bytes) -> torch.Tensor:
    """``[3, H, W]`` float32 in [0, 1] from a PIL image or PNG bytes."""
    return image_to_tensor(Image.open(io.BytesIO(image)) if isinstance(image, bytes) else image)


@dataclass
class Rendered:
    png: bytes
    flagged: bool = False
    warnings: list[str] = field(default_factory=list)


@dataclass
class Timer:
    """Exclusive seconds per stage (``generation``, ``clipscore``, ``model_loading``, ...), summed over calls:
    a stage entered inside another (a model loaded on first use) pauses the outer one."""

    seconds: dict[str, float] = field(default_factory=dict)
    _stack: list = field(default_factory=list)

    def _charge(self, now: float) -> None:
        if self._stack:
            stage, since = self._stack[-1]
            self.seconds[stage] = self.seconds.get(stage, 0.0) + now - since

    @contextmanager
    def __call__(self, stage: str):
        now = time.perf_counter()
        self._charge(now)
        self._stack.append((stage, now))
        try:
            yield
        finally:
            now = time.perf_counter()
            self._charge(now)
            self._stack.pop()
            if self._stack:
                self._stack[-1] = (self._stack[-1][0], now)


class Reconstructor:
    """Runs the roles of ``config`` on ``device``; models load on first use.

    ``image_to_text_to_image(images, ids)`` returns one record per image with N candidate captions, K
    reconstructions per candidate and their similarity to the original; the chosen candidate maximises the
    ``select_by`` similarity (minimises a distance), averaged over the K images. Image k of every candidate of an
    item uses the same seed (common random numbers) unless ``generator.common_random_numbers`` is false.
    """

    def __init__(
        self,
        config: Config,
        device: torch.device | str | None = None,
        cache: Cache | None = None,
        captioner=None,
        generator=None,
        image_metrics=None,
        text_metrics=None,
    ):
        self.config = config
        self._device_spec = str(device) if device is not None else config.run.device
        self._device: torch.device | None = None
        self.cache = cache or Cache(None)
        self._captioner, self._generator = captioner, generator
        self._image_metrics, self._text_metrics = image_metrics, text_metrics
        # called with the images' worth of generation done (fractions while sampling): a job's progress bar
        self.on_progress: Callable[[float], None] | None = None

    # ------------------------------------------------------------------ lazily loaded roles
    @property
    def device(self) -> torch.device:
        if self._device is None:
            self._device = hub.resolve_device(self._device_spec)
        return self._device

    @property
    def captioner(self):
        if self._captioner is None:
            from recon.captioners import load_captioner

            self._captioner = load_captioner(
                self.config.captioner, self.device, batch_size=self.config.run.batch_size
            )
        return self._captioner

    @property
    def generator(self):
        if self._generator is None:
            from recon.generators import load_generator

            self._generator = load_generator(
                self.config.generator, self.device, batch_size=self.config.run.batch_size
            )
        return self._generator

    @property
    def image_metrics(self) -> dict[str, torch.nn.Module]:
        if self._image_metrics is None:
            from recon.similarity import load_image_metrics

            self._image_metrics = load_image_metrics(self.config.similarity, self.device)
        return self._image_metrics

    @property
    def text_metrics(self) -> dict[str, torch.nn.Module]:
        if self._text_metrics is None:
            from recon.similarity import load_text_metrics

            self._text_metrics = load_text_metrics(self.config.similarity, self.device)
        return self._text_metrics

    def metric_names(self, kind: str = "image") -> list[str]:
        """Result keys of the configured metrics, known without loading any model (or importing torch)."""
        loaded = self._image_metrics if kind == "image" else self._text_metrics
        table, metrics = (
            (IMAGE_METRIC_NAMES, self.config.similarity.image)
            if kind == "image"
            else (TEXT_METRIC_NAMES, self.config.similarity.text)
        )
        if loaded is None and all(m.kind in table for m in metrics):
            return [m.name or table[m.kind] for m in metrics]
        return list(self.image_metrics if kind == "image" else self.text_metrics)  # loading names bad kinds

    def preflight(self, stages: Sequence[str] = ("captioner", "generator", "image", "text")) -> None:
        """Resolve every model id the stages need, before any work: offline failures surface here, once."""
        c, g, sim = self.config.captioner, self.config.generator, self.config.similarity
        if "captioner" in stages and self._captioner is None:
            hub.resolve(c.model, "captioner", "captioner.model")
            if c.adapter:
                hub.resolve(c.adapter, "captioner adapter", "captioner.adapter")
            if c.checkpoint:
                hub.resolve(c.checkpoint, "captioner checkpoint", "captioner.checkpoint")
        if "generator" in stages and self._generator is None:
            hub.resolve(g.model, "generator", "generator.model")
            if g.lora:
                hub.resolve(g.lora, "generator LoRA", "generator.lora")
        for kind in ("image", "text"):
            if (
                kind not in stages
                or (self._image_metrics if kind == "image" else self._text_metrics) is not None
            ):
                continue
            for n, m in enumerate(
                sim.image if kind == "image" else sim.text
            ):  # each kind's row names its check
                hub.preflight_metric(m, kind, f"similarity.{kind}.{n}")

    # ------------------------------------------------------------------ cached stages
    def caption(
        self, images: Sequence[Image.Image], ids: Sequence[str], hashes: Sequence[str]
    ) -> list[list[str]]:
        c = self.config.captioner
        seeds = [derive_seed(self.config.run.seed, i, -1, 0) for i in ids]
        models = [hub.fingerprint(m) for m in (c.model, c.checkpoint, c.adapter)]
        keys = [
            self.cache.key(
                stage="caption",
                image=h,
                model=c.model,
                files=models,
                checkpoint=c.checkpoint,
                adapter=c.adapter,
                backend=c.backend,
                prompt=c.prompt,
                n=c.num_candidates,
                decoding=c.decoding.__dict__,
                seed=s if c.decoding.method == "nucleus" else None,
            )
            for h, s in zip(hashes, seeds)
        ]
        out: list[list[str] | None] = [self.cache.get_json("captions", k, _is_captions) for k in keys]
        miss = [i for i, o in enumerate(out) if o is None]
        if miss:
            fresh = self.captioner.caption(
                [images[i] for i in miss],
                num_candidates=c.num_candidates,
                decoding=c.decoding,
                seeds=[seeds[i] for i in miss],
            )
            for i, caps in zip(miss, fresh):
                out[i] = list(caps)
                self.cache.put_json("captions", keys[i], out[i])
        return out  # type: ignore[return-value]

    def render(
        self, prompts: Sequence[str], seeds: Sequence[int], groups: Sequence[str] | None = None
    ) -> list[Rendered]:
        """PNG per (prompt, seed), cached. Misses of one group (item) are generated in their own batches unless
        ``generator.batch_across_items``: the batch layout of an item never depends on the other items."""
        g = self.config.generator
        files = [hub.fingerprint(g.model), hub.fingerprint(g.lora)]
        keys = [
            self.cache.key(
                stage="generate",
                model=g.model,
                files=files,
                lora=g.lora,
                scheduler=g.scheduler,
                steps=g.num_inference_steps,
                guidance=g.guidance_scale,
                h=g.height,
                w=g.width,
                negative=g.negative_prompt,
                safety=g.safety_checker,
                prompt=p,
                seed=s,
                # only chunk mode joins the key: truncate-mode keys (and caches) stay as they were
                **({"long_prompts": g.long_prompts} if g.long_prompts != "truncate" else {}),
            )
            for p, s in zip(prompts, seeds)
        ]
        out: list[Rendered | None] = []
        for k in keys:
            # a cached PNG passes the checks of an input image (decodes whole, within the pixel budget)
            png = self.cache.get_bytes("images", k, ".png", check=load_image)
            meta = self.cache.get_json("images-meta", k, _is_render_meta)
            out.append(Rendered(png, meta["flagged"], meta["warnings"]) if png is not None and meta else None)
        misses = [i for i, o in enumerate(out) if o is None]
        if groups is None or g.batch_across_items:
            batches = [misses] if misses else []
        else:
            by_group: dict[str, list[int]] = {}
            for i in misses:
                by_group.setdefault(groups[i], []).append(i)
            batches = list(by_group.values())
        for miss in batches:
            progress = (
                {"on_progress": self.on_progress} if self.on_progress else {}
            )  # a generator of the older protocol takes none
            gen = self.generator.generate([prompts[i] for i in miss], [seeds[i] for i in miss], **progress)
            for j, i in enumerate(miss):
                r = Rendered(
                    png_bytes(gen.images[j]),
                    gen.flagged[j] if gen.flagged else False,
                    gen.warnings[j] if gen.warnings else [],
                )
                self.cache.put_bytes("images", keys[i], r.png, ".png")
                self.cache.put_json("images-meta", keys[i], {"flagged": r.flagged, "warnings": r.warnings})
                out[i] = r
        return out  # type: ignore[return-value]

    def score_images(
        self, original: torch.Tensor | Image.Image, original_hash: str, pngs: Sequence[bytes]
    ) -> dict[str, list[float]]:
        """Similarity of one original (``[3, H, W]`` tensor, or a PIL image made one only on a cache miss) to each
        reconstruction, per metric (cached per pair)."""
        names = self.metric_names("image")
        specs = {
            n: {**m.__dict__, "files": hub.fingerprint(m.model)}
            for n, m in zip(names, self.config.similarity.image)
        }
        scores: dict[str, list[float]] = {}
        for n in names:
            keys = [
                self.cache.key(stage="score", metric=specs.get(n, n), a=original_hash, b=_sha(p))
                for p in pngs
            ]
            vals = [self.cache.get_json("scores", k, _is_finite) for k in keys]
            miss = [i for i, v in enumerate(vals) if v is None]
            if miss:
                import torch

                metric = self.image_metrics[n]
                if isinstance(original, Image.Image):
                    original = to_tensor(original)
                recon = torch.stack([to_tensor(pngs[i]) for i in miss]).to(self.device)
                with torch.inference_mode():
                    fresh = (
                        metric(original.unsqueeze(0).to(self.device), recon).float().cpu().tolist()
                    )  # 1 vs K
                for i, v in zip(miss, fresh):
                    vals[i] = v
                    if math.isfinite(v):  # a NaN is recomputed next time, never served from the cache
                        self.cache.put_json("scores", keys[i], v)
            scores[n] = [float(v) for v in vals]
        return scores

    def score_texts(self, texts: Sequence[str], others: Sequence[str]) -> dict[str, list[float]]:
        import torch

        with torch.inference_mode():
            return {
                n: m(list(texts), list(others)).float().cpu().tolist() for n, m in self.text_metrics.items()
            }

    def score_reconstructions(self, original, original_hash: str, rendered: Sequence[Rendered]) -> dict:
        """One caption's K reconstructions against its original: ``per_image`` scores per metric, ``scores`` (mean
        over the images the safety checker did not flag; None when all were), ``std`` (their sample std, None
        for fewer than 2), ``flagged`` and ``warnings``. A non-finite per-image score is None in ``per_image``
        and left out like a flagged image, with a warning. The one place both directions' candidate scores and
        ``recon score`` come from."""
        scored = self.score_images(original, original_hash, [r.png for r in rendered])
        warnings = {w for r in rendered for w in r.warnings}
        per_image: dict[str, list[float | None]] = {}
        for m, vs in scored.items():
            per_image[m] = [v if math.isfinite(v) else None for v in vs]
            if bad := per_image[m].count(None):
                warnings.add(
                    f"{m}: {bad} of {len(vs)} reconstruction score(s) not finite, left out of the mean"
                )
        kept = {
            m: [v for v, r in zip(vs, rendered) if not r.flagged and v is not None]
            for m, vs in per_image.items()
        }
        std = {m: float(statistics.stdev(vs)) if len(vs) > 1 else None for m, vs in kept.items()}
        return {
            "scores": {m: _mean(vs) for m, vs in kept.items()},
            "std": std,
            "per_image": per_image,
            "flagged": [r.flagged for r in rendered],
            "warnings": sorted(warnings),
        }

    # ------------------------------------------------------------------ the two directions
    def select_metric(self) -> str:
        names = self.metric_names("image")
        key = self.config.similarity.select_by or (names[0] if names else None)
        if key not in names:
            raise ValueError(f"similarity.select_by={key!r} is not one of the image metrics {names}")
        return key

    def reconstruct_captions(
        self, requests: Sequence[tuple], timer: Timer | None = None, prefix: str = ""
    ) -> list[dict]:
        """The one reconstruction-scoring step: K images per caption, each compared with its original.

        ``requests = [(group, image key, original, original hash, caption)]`` or with a sixth element, the
        candidate index ``c`` of the seed (default 0). Image k uses ``derive_seed(run.seed, image key, c, k)``: with
        ``c = 0`` every caption of one image is rendered from the same K noises (common random numbers). ``group``
        (an item id) keeps an item's images in their own generation batches unless ``generator.batch_across_items``.
        Returns per request ``scores`` (mean over the non-flagged images), ``std`` (sample std, None for K = 1),
        ``per_image``, ``seeds``, ``png``, ``flagged``, ``warnings``; metric keys get ``prefix``."""
        timer = timer or (lambda stage: nullcontext())
        K = self.config.generator.images_per_caption
        seeds = [
            [derive_seed(self.config.run.seed, req[1], req[5] if len(req) > 5 else 0, k) for k in range(K)]
            for req in requests
        ]
        with timer("generation"):
            rendered = self.render(
                [req[4] for req in requests for _ in range(K)],
                [s for ss in seeds for s in ss],
                [req[0] for req in requests for _ in range(K)],
            )
        out = []
        for n, req in enumerate(requests):
            chunk = rendered[n * K : (n + 1) * K]
            with timer("recon_similarity"):
                scored = self.score_reconstructions(req[2], req[3], chunk)
            out.append(
                {
                    **{
                        part: {f"{prefix}{m}": v for m, v in scored[part].items()}
                        for part in ("scores", "std", "per_image")
                    },
                    "seeds": seeds[n],
                    "png": [r.png for r in chunk],
                    "flagged": scored["flagged"],
                    "warnings": scored["warnings"],
                }
            )
        return out

    def image_to_text_to_image(
        self, images: Sequence[Image.Image], ids: Sequence[str], hashes: Sequence[str] | None = None
    ) -> list[dict]:
        """Records (see module runs / report) with reconstructions as PNG bytes under ``candidates[*]['png']``."""
        hashes = list(hashes) if hashes is not None else [_sha(png_bytes(im)) for im in images]
        crn = self.config.generator.common_random_numbers
        select = self.select_metric()
        captions = self.caption(images, ids, hashes)
        # the original stays a PIL image: made a tensor only if a score is not cached
        scored_all = iter(
            self.reconstruct_captions(
                [
                    (item_id, item_id, image, h, cap, 0 if crn else c)
                    for item_id, image, h, caps in zip(ids, images, hashes, captions)
                    for c, cap in enumerate(caps)
                ]
            )
        )
        records = []
        for item_id, caps in zip(ids, captions):
            candidates, warnings = [], []
            for cap in caps:
                scored = next(scored_all)
                warnings += [w for w in scored["warnings"] if w not in warnings]
                if not cap.strip():
                    warnings.append("captioner returned an empty caption")
                candidates.append(
                    {
                        "caption": cap,
                        "scores": scored["scores"],
                        "scores_per_image": scored["per_image"],
                        "seeds": scored["seeds"],
                        "flagged": scored["flagged"],
                        "png": scored["png"],
                    }
                )
            chosen = self._choose([c["scores"][select] for c in candidates], select)
            records.append(
                {
                    "id": item_id,
                    "status": "ok",
                    "direction": "image-text-image",
                    "candidates": candidates,
                    "chosen": chosen,
                    "caption": candidates[chosen]["caption"],
                    "scores": dict(candidates[chosen]["scores"]),
                    "seeds": candidates[chosen]["seeds"],
                    "select_by": select,
                    "warnings": warnings,
                }
            )
        return records

    def text_to_image_to_text(self, texts: Sequence[str], ids: Sequence[str]) -> list[dict]:
        """Per text: K images, each captioned, each caption compared with the text by every text metric."""
        K = self.config.generator.images_per_caption
        prompts = [t for t in texts for _ in range(K)]
        seeds = [derive_seed(self.config.run.seed, i, 0, k) for i in ids for k in range(K)]
        rendered = self.render(prompts, seeds, [i for i in ids for _ in range(K)])
        images = [Image.open(io.BytesIO(r.png)).convert("RGB") for r in rendered]
        image_ids = [f"{i}#{k}" for i in ids for k in range(K)]
        captions = self.caption(images, image_ids, [_sha(r.png) for r in rendered])
        records = []
        for n, (item_id, text) in enumerate(zip(ids, texts)):
            sl = slice(n * K, (n + 1) * K)
            caps = [c[0] if c else "" for c in captions[sl]]
            per_image = self.score_texts([text] * K, caps) if self.config.similarity.text else {}
            keep = [not r.flagged for r in rendered[sl]]
            scores = {m: _mean([v for v, ok in zip(vals, keep) if ok]) for m, vals in per_image.items()}
            first = next(iter(per_image), None)
            chosen = self._choose(per_image[first], first) if first else 0
            warnings = sorted({w for r in rendered[sl] for w in r.warnings})
            # text metrics that saw only a prefix of the original text (their long_text policy: truncate)
            cut = (
                [
                    m
                    for m, metric in self.text_metrics.items()
                    if hasattr(metric, "truncated") and metric.truncated([text])[0]
                ]
                if per_image
                else []
            )
            records.append(
                {
                    "id": item_id,
                    "status": "ok",
                    "direction": "text-image-text",
                    "text": text,
                    "seeds": seeds[sl],
                    "captions": caps,
                    "scores_per_image": per_image,
                    "scores": scores,
                    "chosen": chosen,
                    "flagged": [r.flagged for r in rendered[sl]],
                    "png": [r.png for r in rendered[sl]],
                    "warnings": warnings,
                    **({"truncated": cut} if cut else {}),
                }
            )
        return records

    @staticmethod
    def _choose(values: Sequence[float | None], metric: str) -> int:
        return best_index(values, metric)


def _is_captions(value) -> bool:
    return isinstance(value, list) and all(isinstance(c, str) for c in value)


def _is_render_meta(value) -> bool:
    return (
        isinstance(value, dict)
        and isinstance(value.get("flagged"), bool)
        and isinstance(value.get("warnings"), list)
        and all(isinstance(w, str) for w in value["warnings"])
    )


def _is_finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _mean(values: Sequence[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
