"""The generator's parts as training needs them (:class:`Diffusion`): latents in and out, noising, x0 estimates and
a sampler with gradient through its last steps. The objective (:mod:`recon.train.losses`) calls it."""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from recon.train.config import SamplerConfig


class Diffusion:
    """The generator's parts as training needs them: latents in and out, noising, x0 estimates, a sampler.

    ``pipe`` is a diffusers StableDiffusionPipeline whose UNet may carry LoRA layers. The noise schedule is the
    pipeline scheduler's betas; the training sampler is DDIM (deterministic, stateless between steps, so a
    checkpointed step recomputes exactly) with ``clip_sample`` off.
    """

    def __init__(self, pipe, gradient_checkpointing: bool = False):
        from diffusers import DDIMScheduler, DDPMScheduler

        self.unet, self.vae, self.text_encoder, self.tokenizer = (
            pipe.unet,
            pipe.vae,
            pipe.text_encoder,
            pipe.tokenizer,
        )
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.sampler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        self.scaling = float(self.vae.config.scaling_factor)
        self.shift = float(getattr(self.vae.config, "shift_factor", None) or 0.0)
        self.checkpointing = gradient_checkpointing
        self.vae_checkpointing = (
            False  # the VAE checkpoints each decoder block itself (less memory than the whole)
        )
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
        ids = self.tokenizer(
            list(captions),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        return self.text_encoder(ids)[0]

    def uncond_states(self, n: int) -> torch.Tensor:
        if self._uncond is None:
            self._uncond = self.text_states([""])
        return self._uncond.expand(n, -1, -1)

    # --- noising
    def noised(
        self, latents: torch.Tensor, generator: torch.Generator | None, max_timestep: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noisy latents, the UNet's regression target, timesteps ``[B]``) for uniformly drawn timesteps."""
        top = min(self.num_train_timesteps, max_timestep or self.num_train_timesteps)
        t = torch.randint(0, top, (latents.shape[0],), generator=generator, device=latents.device)
        noise = torch.randn(latents.shape, generator=generator, device=latents.device)
        return (*self.noised_with(latents, noise, t), t)

    def noised_with(
        self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(noisy latents, the UNet's regression target) for given noise and timesteps."""
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, t)
        else:
            target = latents
        return noisy, target

    def predict(self, noisy: torch.Tensor, t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        return self.unet(
            noisy.to(self.unet.dtype), t, encoder_hidden_states=states.to(self.unet.dtype)
        ).sample

    def predicted_original(
        self, noisy: torch.Tensor, model_output: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """x0 from one UNet output at per-sample timesteps: DDIM/DDPM ``step``'s ``pred_original_sample``."""
        a = self.noise_scheduler.alphas_cumprod.to(noisy.device)[t].float().view(-1, 1, 1, 1)
        x, out = noisy.float(), model_output.float()
        if self.prediction_type == "epsilon":
            return (x - (1 - a).sqrt() * out) / a.sqrt()
        if self.prediction_type == "v_prediction":
            return a.sqrt() * x - (1 - a).sqrt() * out
        return out

    # --- sampling with gradient
    def initial_noise(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        """The sampler's starting noise for ``n`` samples (before the scheduler's ``init_noise_sigma``)."""
        unet_cfg = self.unet.config
        h = w = unet_cfg.sample_size
        return torch.randn((n, unet_cfg.in_channels, h, w), generator=generator, device=self.device)

    def sample(
        self,
        states: torch.Tensor,
        generator: torch.Generator | None,
        cfg: SamplerConfig,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """DDIM sample of latents from ``states`` with gradient through the last ``cfg.grad_steps`` steps only
        (DRaFT-K / AlignProp); each of those steps is checkpointed under gradient checkpointing. ``noise``: the
        starting noise (default: drawn from ``generator``)."""
        sched = self.sampler
        sched.set_timesteps(cfg.num_steps, device=self.device)
        x = self.initial_noise(states.shape[0], generator) if noise is None else noise.to(self.device)
        x = x * sched.init_noise_sigma
        uncond = self.uncond_states(states.shape[0]) if cfg.guidance_scale > 1 else None

        def step(x, t, cond):
            if uncond is None:
                out = self.predict(x, t.expand(x.shape[0]), cond).float()
            else:
                both = self.predict(
                    torch.cat([x, x]), t.expand(2 * x.shape[0]), torch.cat([uncond, cond])
                ).float()
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
