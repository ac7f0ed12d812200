"""The joint objective: task losses of both models and the reconstruction regularisers, in both directions.

Image direction (``JointObjective.image_terms``), from ``(image, reference caption)``::

    caption_nll  captioner teacher-forced NLL of the reference (label smoothing)
    i2t2i        the same logits -> SoftTokenBridge -> text encoder -> UNet noise MSE on the ORIGINAL image's
                 noised latents (gradient reaches the captioner through the frozen text encoder)
    image_sim    the same soft caption -> DDIM sample with gradient through its last k steps -> VAE decode
                 -> w_clip * (1 - CLIP cosine) + w_lpips * LPIPS against the original (recon's similarity modules)

Text direction (``JointObjective.text_terms``)::

    denoise      UNet noise MSE on the reference image conditioned on the caption (SD's LoRA loss)
    t2i2t        x0 estimate of that same UNet call (one_step; a call of its own when its timesteps are
                 restricted) or a truncated-backprop sample (sampler) -> VAE decode (frozen, with grad)
                 -> BLIP preprocessing -> captioner NLL of the ORIGINAL caption

The regularisers (i2t2i, image_sim, t2i2t) may use only the first ``loss.regularizer_items`` pairs of a
micro-batch; the task losses always use all of it. Given unlabelled images, i2t2i and image_sim run on them
instead, teacher-forced on the captioner's own caption (decoded without gradient, ``captioner.decoding``); given
unpaired texts, t2i2t runs on them through a sampled image (there is no image to noise). All images are float
``[B, 3, H, W]`` in [0, 1].
Randomness (noise, timesteps, VAE posterior samples, Gumbel noise) comes only from the ``torch.Generator``
passed in, so a step is a pure function of its seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from recon.captioners.blip import IGNORE_INDEX
from recon.train.bridge import SoftTokenBridge, caption_positions
from recon.train.config import LossConfig, SamplerConfig


def captioning_nll(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean token cross-entropy over scored positions (BLIP's captioning loss), in float32."""
    return F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX,
                           label_smoothing=label_smoothing)


class Diffusion:
    """The generator's parts as training needs them: latents in and out, noising, x0 estimates, a sampler.

    ``pipe`` is a diffusers StableDiffusionPipeline whose UNet may carry LoRA layers. The noise schedule is the
    pipeline scheduler's betas; the training sampler is DDIM (deterministic, stateless between steps, so a
    checkpointed step recomputes exactly) with ``clip_sample`` off.
    """

    def __init__(self, pipe, gradient_checkpointing: bool = False):
        from diffusers import DDIMScheduler, DDPMScheduler

        self.unet, self.vae, self.text_encoder, self.tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.sampler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        self.scaling = float(self.vae.config.scaling_factor)
        self.shift = float(getattr(self.vae.config, "shift_factor", None) or 0.0)
        self.checkpointing = gradient_checkpointing
        self.vae_checkpointing = False  # the VAE checkpoints each decoder block itself (less memory than the whole)
        if gradient_checkpointing and getattr(self.vae, "_supports_gradient_checkpointing", False):
            self.vae.enable_gradient_checkpointing()
            self.vae_checkpointing = True
        self._uncond: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def num_train_timesteps(self) -> int:
        return int(self.noise_scheduler.config.num_train_timesteps)

    # --- latents
    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        x = images.to(self.device, self.vae.dtype) * 2 - 1
        z = self.vae.encode(x).latent_dist.sample(generator=generator)
        return ((z - self.shift) * self.scaling).float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1], differentiable (checkpointed when gradient checkpointing is on)."""
        def run(z):
            return self.vae.decode((z / self.scaling + self.shift).to(self.vae.dtype)).sample

        whole = self.checkpointing and latents.requires_grad and not self.vae_checkpointing
        x = checkpoint(run, latents, use_reentrant=False) if whole else run(latents)
        return (x.float() / 2 + 0.5).clamp(0, 1)

    # --- text conditioning
    @torch.no_grad()
    def text_states(self, captions: list[str]) -> torch.Tensor:
        """Hidden states of the captions padded to the encoder's full length (77), as the pipeline encodes them.

        deviation: the original padded to the longest caption; SD was trained (and samples) with 77 tokens.
        """
        ids = self.tokenizer(list(captions), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        return self.text_encoder(ids)[0]

    def uncond_states(self, n: int) -> torch.Tensor:
        if self._uncond is None:
            self._uncond = self.text_states([""])
        return self._uncond.expand(n, -1, -1)

    # --- noising
    def noised(self, latents: torch.Tensor, generator: torch.Generator | None, max_timestep: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noisy latents, the UNet's regression target, timesteps ``[B]``) for uniformly drawn timesteps."""
        top = min(self.num_train_timesteps, max_timestep or self.num_train_timesteps)
        t = torch.randint(0, top, (latents.shape[0],), generator=generator, device=latents.device)
        noise = torch.randn(latents.shape, generator=generator, device=latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, t)
        else:
            target = latents
        return noisy, target, t

    def predict(self, noisy: torch.Tensor, t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        return self.unet(noisy.to(self.unet.dtype), t, encoder_hidden_states=states.to(self.unet.dtype)).sample

    def predicted_original(self, noisy: torch.Tensor, model_output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0 from one UNet output at per-sample timesteps: DDIM/DDPM ``step``'s ``pred_original_sample``."""
        a = self.noise_scheduler.alphas_cumprod.to(noisy.device)[t].float().view(-1, 1, 1, 1)
        x, out = noisy.float(), model_output.float()
        if self.prediction_type == "epsilon":
            return (x - (1 - a).sqrt() * out) / a.sqrt()
        if self.prediction_type == "v_prediction":
            return a.sqrt() * x - (1 - a).sqrt() * out
        return out

    # --- sampling with gradient
    def sample(self, states: torch.Tensor, generator: torch.Generator | None, cfg: SamplerConfig) -> torch.Tensor:
        """DDIM sample of latents from ``states`` with gradient through the last ``cfg.grad_steps`` steps only
        (DRaFT-K / AlignProp); each of those steps is checkpointed under gradient checkpointing."""
        sched = self.sampler
        sched.set_timesteps(cfg.num_steps, device=self.device)
        unet_cfg = self.unet.config
        h = w = unet_cfg.sample_size
        x = torch.randn((states.shape[0], unet_cfg.in_channels, h, w), generator=generator, device=self.device)
        x = x * sched.init_noise_sigma
        uncond = self.uncond_states(states.shape[0]) if cfg.guidance_scale > 1 else None

        def step(x, t, cond):
            if uncond is None:
                out = self.predict(x, t.expand(x.shape[0]), cond).float()
            else:
                both = self.predict(torch.cat([x, x]), t.expand(2 * x.shape[0]), torch.cat([uncond, cond])).float()
                out_u, out_c = both.chunk(2)
                out = out_u + cfg.guidance_scale * (out_c - out_u)
            return sched.step(out, t, x).prev_sample

        first_grad = cfg.num_steps - cfg.grad_steps
        for i, t in enumerate(sched.timesteps):
            if i < first_grad or not torch.is_grad_enabled():
                with torch.no_grad():
                    x = step(x, t, states)
            elif self.checkpointing:
                x = checkpoint(step, x, t, states, use_reentrant=False)
            else:
                x = step(x, t, states)
        return x


@dataclass
class Terms:
    """Unweighted loss values (detached floats) and the weighted total to backpropagate."""

    total: torch.Tensor
    values: dict[str, float]


class JointObjective:
    """The weighted sum of the configured terms for one direction (``image``, ``text`` or ``both``).

    ``captioner``: a :class:`recon.captioners.base.TrainableCaptioner` (BLIP or Flamingo; ``.model`` may carry
    LoRA);
    ``image_sim_metrics``: ``{"clip": ClipImageSimilarity, "lpips": LpipsDistance}`` for the weights > 0.
    """

    def __init__(self, captioner, diffusion: Diffusion, bridge: SoftTokenBridge, loss: LossConfig,
                 sampler: SamplerConfig, image_sim_metrics: dict | None = None):
        self.captioner, self.diffusion, self.bridge = captioner, diffusion, bridge
        self.loss, self.sampler = loss, sampler
        self.metrics = image_sim_metrics or {}
        self.end_token_id = captioner.end_token_id

    def direction(self, micro_step: int) -> str:
        if self.loss.schedule == "sum":
            return "both"
        return "image" if micro_step % 2 == 0 else "text"

    def __call__(self, images: torch.Tensor, captions: list[str], direction: str,
                 generator: torch.Generator | None = None, unlabelled: torch.Tensor | None = None,
                 texts: list[str] | None = None) -> Terms:
        terms: dict[str, torch.Tensor] = {}
        latents = _Lazy(lambda: self.diffusion.encode(images, generator))  # one VAE encode for both directions
        if direction in ("image", "both"):
            terms.update(self.image_terms(images, captions, generator, latents, unlabelled))
        if direction in ("text", "both"):
            terms.update(self.text_terms(images, captions, generator, latents, texts))
        if not terms:
            raise ValueError(f"direction {direction!r}: every loss weight of it is 0")
        total = sum(getattr(self.loss, k) * v for k, v in terms.items())
        return Terms(total=total, values={k: float(v.detach()) for k, v in terms.items()})

    def regularized(self, batch_size: int) -> slice:
        """The pairs of a micro-batch the regularisers use (``loss.regularizer_items``; all by default)."""
        return slice(0, min(batch_size, self.loss.regularizer_items or batch_size))

    def caption_logits(self, images: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        pixel_values = self.captioner.preprocess_tensor(images.to(self.captioner.device))
        return self.captioner.teacher_forced_logits(pixel_values, list(captions))

    @torch.no_grad()
    def captions_of(self, images: torch.Tensor, k: int = 1, decoding=None, seeds=None) -> list[list[str]]:
        """The captioner's ``k`` captions of each image (eval mode, no gradient; ``decoding`` None: its own)."""
        from recon.data import tensor_to_pil

        model = self.captioner.model
        was_training = model.training
        model.eval()
        try:
            return self.captioner.caption([tensor_to_pil(x) for x in images.float().cpu()], k, decoding, seeds=seeds)
        finally:
            model.train(was_training)

    def own_captions(self, images: torch.Tensor) -> list[str]:
        """The captioner's caption of each image (its configured decoding): the i2t2i target of unlabelled images."""
        return [c[0] for c in self.captions_of(images)]

    @torch.no_grad()
    def pseudo_labels(self, images: torch.Tensor, generator) -> list[str]:
        """Per image, the captioner's sampled candidate under which the UNet denoises the image best."""
        w, d = self.loss, self.diffusion
        k, m, n = w.pseudo_label_candidates, w.pseudo_label_draws, images.shape[0]
        seeds = torch.randint(0, 2**31 - 1, (n,), generator=generator, device=generator.device if generator else None)
        candidates = self.captions_of(images, k, w.pseudo_label_decoding, seeds.tolist())
        noisy, target, t = d.noised(d.encode(images, generator).repeat_interleave(m, 0), generator)
        errors = torch.stack([
            (d.predict(noisy, t, d.text_states([c[j] for c in candidates]).repeat_interleave(m, 0)).float()
             - target.float()).pow(2).mean(dim=(1, 2, 3)).view(n, m).mean(1) for j in range(k)], dim=1)
        return [c[int(j)] for c, j in zip(candidates, errors.argmin(1))]

    def image_terms(self, images: torch.Tensor, captions: list[str], generator, latents=None,
                    unlabelled: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        w, d = self.loss, self.diffusion
        if not (w.caption_nll or w.i2t2i or w.image_sim or w.pseudo_label):
            return {}
        latents = latents or _Lazy(lambda: d.encode(images, generator))
        out: dict[str, torch.Tensor] = {}
        reg = self.regularized(images.shape[0])
        if w.caption_nll:
            logits, labels = self.caption_logits(images, captions)
            out["caption_nll"] = captioning_nll(logits, labels, w.label_smoothing)
        if w.pseudo_label and unlabelled is not None:
            chosen = unlabelled[self.regularized(unlabelled.shape[0])]
            logits_pl, labels_pl = self.caption_logits(chosen, self.pseudo_labels(chosen, generator))
            out["pseudo_label"] = captioning_nll(logits_pl, labels_pl, w.label_smoothing)
        if not (w.i2t2i or w.image_sim):
            return out
        if unlabelled is not None:  # the captioner's own caption of each unlabelled image is its target
            reg_images = unlabelled[self.regularized(unlabelled.shape[0])]
            logits, labels = self.caption_logits(reg_images, self.own_captions(reg_images))
            reg_latents = _Lazy(lambda: d.encode(reg_images, generator))
        else:
            reg_images = images[reg]
            if w.caption_nll:
                logits, labels = logits[reg], labels[reg]
            else:
                logits, labels = self.caption_logits(images[reg], captions[reg])
            reg_latents = _Lazy(lambda: latents()[reg])
        states, _ = self.bridge(logits, caption_positions(labels, self.end_token_id), generator)
        if w.i2t2i:
            noisy, target, t = d.noised(reg_latents(), generator)
            out["i2t2i"] = F.mse_loss(d.predict(noisy, t, states).float(), target.float())
        if w.image_sim:
            out["image_sim"] = self.image_similarity_loss(reg_images, states, generator)
        return out

    def image_similarity_loss(self, images: torch.Tensor, states: torch.Tensor, generator) -> torch.Tensor:
        d, cfg = self.diffusion, self.loss.image_sim_terms
        recon = d.decode(d.sample(states, generator, self.sampler))
        originals = images.to(recon.device, recon.dtype)
        loss = recon.new_zeros(())
        if cfg.clip:
            clip = self.metrics["clip"]
            with torch.no_grad():
                ref = clip.encode(originals)
            loss = loss + cfg.clip * (1 - clip.similarity_to(ref, recon)).mean()
        if cfg.lpips:
            loss = loss + cfg.lpips * self.metrics["lpips"](recon, originals).mean()
        return loss

    def text_terms(self, images: torch.Tensor, captions: list[str], generator, latents=None,
                   texts: list[str] | None = None) -> dict[str, torch.Tensor]:
        """denoise on the pairs; t2i2t on the pairs' captions, or on ``texts`` (unpaired: a sampled image)."""
        w, d = self.loss, self.diffusion
        if not (w.denoise or w.t2i2t):
            return {}
        latents = latents or _Lazy(lambda: d.encode(images, generator))
        out: dict[str, torch.Tensor] = {}
        reg = self.regularized(images.shape[0])
        on_pairs = w.t2i2t and texts is None
        rows = slice(None) if w.denoise else reg
        states = d.text_states(captions[rows]) if w.denoise or on_pairs else None
        if w.denoise:
            noisy, target, t = d.noised(latents()[rows], generator)
            pred = d.predict(noisy, t, states)
            out["denoise"] = F.mse_loss(pred.float(), target.float())
        if not w.t2i2t:
            return out
        if not on_pairs:
            target_texts = texts[self.regularized(len(texts))]
            z0 = d.sample(d.text_states(target_texts), generator, self.sampler)
        elif w.t2i2t_form == "one_step":
            target_texts = captions[reg]
            if w.denoise and not w.one_step_max_timestep:  # the original: the x0 of the task loss's UNet call
                noisy, pred, t = noisy[reg], pred[reg], t[reg]
            else:  # its own draw, so restricting the timesteps does not bias the task loss
                noisy, _, t = d.noised(latents()[reg], generator, w.one_step_max_timestep)
                pred = d.predict(noisy, t, states[reg])
            z0 = d.predicted_original(noisy, pred, t)
        else:
            target_texts = captions[reg]
            z0 = d.sample(states[reg], generator, self.sampler)
        logits, labels = self.caption_logits(d.decode(z0), target_texts)
        out["t2i2t"] = captioning_nll(logits, labels, w.label_smoothing)
        return out


class _Lazy:
    """A value computed on first call and kept (the VAE latents, shared by the two directions of a step)."""

    def __init__(self, make):
        self._make, self._value = make, None

    def __call__(self):
        if self._value is None:
            self._value = self._make()
        return self._value
