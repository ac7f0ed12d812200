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

Rewards from the reconstruction signal (no gradient through the ranking; ``JointObjective.recon_reward_terms``,
``JointObjective.diffusion_preference``)::

    best_of_n_recon  unlabelled image -> N sampled captions -> each rendered by the generator and scored against the
                     image (loss.recon_reward_metric) -> captioner NLL of the best (rejection sampling)
    dpo_recon        the same ranking -> DPO / IPO on the best vs the worst caption's sequence log-probabilities,
                     the reference being the captioner with its LoRA disabled
    diffusion_dpo    text -> two sampled images -> ranked by the captioner's log-likelihood of the text ->
                     Diffusion-DPO on their latents against the UNet with its LoRA disabled

The regularisers (i2t2i, image_sim, t2i2t) may use only the first ``loss.regularizer_items`` pairs of a
micro-batch; the task losses always use all of it. Given unlabelled images, i2t2i and image_sim run on them
instead, teacher-forced on the captioner's own caption (decoded without gradient, ``captioner.decoding``); given
unpaired texts, t2i2t runs on them through a sampled image (there is no image to noise). All images are float
``[B, 3, H, W]`` in [0, 1].
Randomness (noise, timesteps, VAE posterior samples, Gumbel noise) comes only from the ``torch.Generator``
passed in, so a step is a pure function of its seed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from recon.captioners.base import IGNORE_INDEX, sequence_log_prob
from recon.data import tensor_to_pil
from recon.train.bridge import SoftTokenBridge, caption_positions
from recon.train.config import LossConfig, SamplerConfig
from recon.train.diffusion import Diffusion


def captioning_nll(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean token cross-entropy over scored positions (BLIP's captioning loss), in float32."""
    return F.cross_entropy(
        logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing
    )


def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
    form: str = "dpo",
) -> torch.Tensor:
    """Per-pair preference loss from sequence log-probabilities ``[B]`` (summed over each caption's tokens).

    With ``h = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))``:
    DPO (Rafailov et al. 2023, "Direct Preference Optimization", eq. 7): ``-log sigmoid(beta * h)``;
    IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences",
    eq. 17, its empirical loss): ``(h - 1 / (2 tau))^2`` with ``tau = beta``.
    """
    h = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    if form == "dpo":
        return -F.logsigmoid(beta * h)
    if form == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    raise ValueError(f"preference form {form!r}: expected dpo or ipo")


def diffusion_preference_loss(
    error_chosen: torch.Tensor,
    reference_error_chosen: torch.Tensor,
    error_rejected: torch.Tensor,
    reference_error_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Per-pair Diffusion-DPO loss (Wallace et al. 2023, "Diffusion Model Alignment Using Direct Preference
    Optimization", eq. 14, the weighting folded into ``beta`` = beta * T * omega(lambda_t)) from denoising errors ``[B]``
    ``||eps - eps_theta(x_t, t)||^2`` of the policy and of the reference on the chosen (w) and rejected (l) image,
    both noised with the same ``eps`` and ``t``:
    ``-log sigmoid(-beta * ((err_w - ref_err_w) - (err_l - ref_err_l)))``."""
    inside = (error_chosen - reference_error_chosen) - (error_rejected - reference_error_rejected)
    return -F.logsigmoid(-beta * inside)


@contextlib.contextmanager
def adapters_disabled(module: torch.nn.Module):
    """The frozen reference of a preference loss: ``module`` with its LoRA switched off inside the block (peft's
    ``disable_adapter()`` on a ``PeftModel``; diffusers' ``disable_adapters()`` on a UNet)."""
    if callable(getattr(module, "disable_adapter", None)) and hasattr(module, "peft_config"):
        with module.disable_adapter():
            yield
    elif getattr(module, "peft_config", None) and callable(getattr(module, "disable_adapters", None)):
        module.disable_adapters()
        try:
            yield
        finally:
            module.enable_adapters()
    else:
        raise ValueError(
            f"{type(module).__name__} carries no LoRA: a preference loss needs one (its reference is "
            "the model with the LoRA disabled); give it targets (captioner_lora / unet_lora)"
        )


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module):
    """Dropout off inside the block (the mode is restored after): rankings and preference log-probs are exact."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


@dataclass
class Terms:
    """Unweighted loss values (detached floats) and the weighted total to backpropagate; ``captioner_examples``:
    the (image, text) pairs the captioner read with gradient (a compute measure: one per caption it was trained on
    or through, whatever the term)."""

    total: torch.Tensor
    values: dict[str, float]
    captioner_examples: int = 0


class JointObjective:
    """The weighted sum of the configured terms for one direction (``image``, ``text`` or ``both``).

    ``captioner``: a :class:`recon.captioners.base.TrainableCaptioner` (BLIP or Flamingo; ``.model`` may carry
    LoRA);
    ``image_sim_metrics``: ``{"clip": ClipImageSimilarity, "lpips": LpipsDistance}`` for the weights > 0, and
    ``"recon_reward"`` (``loss.recon_reward_metric``) for the reconstruction-ranked terms.
    """

    def __init__(
        self,
        captioner,
        diffusion: Diffusion,
        bridge: SoftTokenBridge,
        loss: LossConfig,
        sampler: SamplerConfig,
        image_sim_metrics: dict | None = None,
    ):
        self.captioner, self.diffusion, self.bridge = captioner, diffusion, bridge
        self.loss, self.sampler = loss, sampler
        self.metrics = image_sim_metrics or {}
        self.end_token_id = captioner.end_token_id
        self.examples = 0  # captioner examples read with gradient in the current call

    def direction(self, micro_step: int) -> str:
        if self.loss.schedule == "sum":
            return "both"
        return "image" if micro_step % 2 == 0 else "text"

    def __call__(
        self,
        images: torch.Tensor,
        captions: list[str],
        direction: str,
        generator: torch.Generator | None = None,
        unlabelled: torch.Tensor | None = None,
        texts: list[str] | None = None,
    ) -> Terms:
        terms: dict[str, torch.Tensor] = {}
        self.examples = 0
        latents = _Lazy(
            lambda: self.diffusion.encode(images, generator)
        )  # one VAE encode for both directions
        if direction in ("image", "both"):
            terms.update(self.image_terms(images, captions, generator, latents, unlabelled))
        if direction in ("text", "both"):
            terms.update(self.text_terms(images, captions, generator, latents, texts))
        if not terms:
            raise ValueError(f"direction {direction!r}: every loss weight of it is 0")
        total = sum(getattr(self.loss, k) * v for k, v in terms.items())
        return Terms(
            total=total,
            values={k: float(v.detach()) for k, v in terms.items()},
            captioner_examples=self.examples,
        )

    def regularized(self, batch_size: int) -> slice:
        """The pairs of a micro-batch the regularisers use (``loss.regularizer_items``; all by default)."""
        return slice(0, min(batch_size, self.loss.regularizer_items or batch_size))

    def caption_logits(self, images: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        pixel_values = self.captioner.preprocess_tensor(images.to(self.captioner.device))
        if torch.is_grad_enabled():
            self.examples += len(captions)
        return self.captioner.teacher_forced_logits(pixel_values, list(captions))

    @torch.no_grad()
    def captions_of(self, images: torch.Tensor, k: int = 1, decoding=None, seeds=None) -> list[list[str]]:
        """The captioner's ``k`` captions of each image (eval mode, no gradient; ``decoding`` None: its own)."""
        model = self.captioner.model
        was_training = model.training
        model.eval()
        try:
            return self.captioner.caption(
                [tensor_to_pil(x) for x in images.float().cpu()], k, decoding, seeds=seeds
            )
        finally:
            model.train(was_training)

    def own_captions(self, images: torch.Tensor) -> list[str]:
        """The captioner's caption of each image (its configured decoding): the i2t2i target of unlabelled images."""
        return [c[0] for c in self.captions_of(images)]

    @torch.no_grad()
    def pseudo_labels(self, images: torch.Tensor, generator) -> list[str]:
        """Per image, the captioner's sampled candidate under which the UNet denoises the image best."""
        w = self.loss
        seeds = torch.randint(
            0,
            2**31 - 1,
            (images.shape[0],),
            generator=generator,
            device=generator.device if generator else None,
        )
        candidates = self.captions_of(
            images, w.pseudo_label_candidates, w.pseudo_label_decoding, seeds.tolist()
        )
        errors = self.denoising_errors(images, candidates, generator)
        return [c[int(j)] for c, j in zip(candidates, errors.argmin(1))]

    @torch.no_grad()
    def denoising_errors(self, images: torch.Tensor, candidates: list[list[str]], generator) -> torch.Tensor:
        """``[B, K]`` UNet noise MSE (lower is better) of each image under each of its ``K`` candidate captions, a
        mean over ``loss.pseudo_label_draws`` noise / timestep draws shared by the candidates of an image."""
        d, m, n, k = self.diffusion, self.loss.pseudo_label_draws, images.shape[0], len(candidates[0])
        noisy, target, t = d.noised(d.encode(images, generator).repeat_interleave(m, 0), generator)
        return torch.stack(
            [
                (
                    d.predict(
                        noisy, t, d.text_states([c[j] for c in candidates]).repeat_interleave(m, 0)
                    ).float()
                    - target.float()
                )
                .pow(2)
                .mean(dim=(1, 2, 3))
                .view(n, m)
                .mean(1)
                for j in range(k)
            ],
            dim=1,
        ).cpu()

    def image_terms(
        self,
        images: torch.Tensor,
        captions: list[str],
        generator,
        latents=None,
        unlabelled: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        w, d = self.loss, self.diffusion
        if not (
            w.caption_nll or w.i2t2i or w.image_sim or w.pseudo_label or w.best_of_n_recon or w.dpo_recon
        ):
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
        if (w.best_of_n_recon or w.dpo_recon) and unlabelled is not None:
            out.update(self.recon_reward_terms(unlabelled[self.regularized(unlabelled.shape[0])], generator))
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

    # --- rewards from the reconstruction signal
    @torch.no_grad()
    def reconstruction_scores(
        self, images: torch.Tensor, candidates: list[list[str]], generator
    ) -> torch.Tensor:
        """``[B, K]`` similarity (higher is better) of each candidate caption's render to its image.

        Each distinct caption of an image is rendered once (a sampled caption often repeats: its score is reused),
        by the training sampler without gradient, every caption of an image from the same starting noise (common
        random numbers: the ranking compares captions, not noises); ``loss.recon_reward_metric`` scores it
        (a distance is negated)."""
        d, metric = self.diffusion, self.metrics.get("recon_reward")
        if metric is None:
            raise ValueError(
                "the reconstruction-ranked terms need metrics['recon_reward'] (loss.recon_reward_metric; "
                "recon.train.joint.image_sim_metrics builds it)"
            )
        noise = d.initial_noise(images.shape[0], generator)
        rows = [(i, c) for i, caps in enumerate(candidates) for c in dict.fromkeys(caps)]
        index = torch.tensor([i for i, _ in rows], device=noise.device)
        with eval_mode(d.unet):
            z0 = d.sample(d.text_states([c for _, c in rows]), None, self.sampler, noise=noise[index])
        renders = d.decode(z0)
        sims = (
            metric(images.to(renders.device, renders.dtype)[index.to(renders.device)], renders).float().cpu()
        )
        sims = sims if getattr(metric, "higher_is_better", True) else -sims
        score = {row: float(v) for row, v in zip(rows, sims)}
        return torch.tensor([[score[(i, c)] for c in caps] for i, caps in enumerate(candidates)])

    @torch.no_grad()
    def recon_ranked(self, images: torch.Tensor, generator) -> tuple[list[str], list[str]]:
        """Per image, the best and the worst of the captioner's ``loss.recon_reward_candidates`` sampled captions by
        reconstruction similarity (equal when every candidate is the same caption)."""
        w = self.loss
        seeds = torch.randint(
            0,
            2**31 - 1,
            (images.shape[0],),
            generator=generator,
            device=generator.device if generator else None,
        )
        candidates = self.captions_of(
            images, w.recon_reward_candidates, w.recon_reward_decoding, seeds.tolist()
        )
        scores = self.reconstruction_scores(images, candidates, generator)
        return (
            [c[int(j)] for c, j in zip(candidates, scores.argmax(1))],
            [c[int(j)] for c, j in zip(candidates, scores.argmin(1))],
        )

    def recon_reward_terms(self, images: torch.Tensor, generator) -> dict[str, torch.Tensor]:
        """best_of_n_recon (NLL of the best caption) and dpo_recon (best vs worst) on unlabelled ``images``."""
        w = self.loss
        chosen, rejected = self.recon_ranked(images, generator)
        out: dict[str, torch.Tensor] = {}
        if not w.dpo_recon:
            logits, labels = self.caption_logits(images, chosen)
            out["best_of_n_recon"] = captioning_nll(logits, labels, w.label_smoothing)
            return out
        n, model = images.shape[0], self.captioner.model
        both_images, both_texts = torch.cat([images, images]), chosen + rejected
        with eval_mode(model):  # policy and reference alike without dropout: at the start they are equal
            logits, labels = self.caption_logits(both_images, both_texts)
            with torch.no_grad(), adapters_disabled(model):
                ref_logits, ref_labels = self.caption_logits(both_images, both_texts)
        policy, reference = sequence_log_prob(logits, labels), sequence_log_prob(ref_logits, ref_labels)
        valid = torch.tensor(
            [a != b for a, b in zip(chosen, rejected)], device=policy.device, dtype=policy.dtype
        )
        per_pair = preference_loss(
            policy[:n], policy[n:], reference[:n], reference[n:], w.preference_beta, w.preference_loss
        )
        out["dpo_recon"] = (per_pair * valid).sum() / valid.sum().clamp(min=1)  # a tie has nothing to prefer
        if w.best_of_n_recon:  # the chosen captions' logits are the first half of the policy pass
            out["best_of_n_recon"] = captioning_nll(logits[:n], labels[:n], w.label_smoothing)
        return out

    @torch.no_grad()
    def text_log_likelihood(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """The captioner's ``log p(text | image)`` per pair ``[B]`` (eval mode, no gradient)."""
        with eval_mode(self.captioner.model):
            return sequence_log_prob(*self.caption_logits(images, texts)).float()

    @torch.no_grad()
    def render_pairs(self, states: torch.Tensor, texts: list[str], generator):
        """Two sampled renders per text (latents and images, rows i and n + i: text i) and the captioner's
        log-likelihood of the text for each: what diffusion_preference ranks."""
        d = self.diffusion
        with eval_mode(d.unet):
            z0 = d.sample(states.repeat(2, 1, 1), generator, self.sampler)
        images = d.decode(z0)
        return z0, images, self.text_log_likelihood(images, list(texts) * 2)

    def diffusion_preference(self, texts: list[str], generator) -> torch.Tensor:
        """Diffusion-DPO on two sampled images per text, the one whose caption likelihood of the text is higher
        chosen; both noised with one noise and timestep per text (as the authors' script), the reference being the
        UNet with its LoRA disabled. Errors are means over latent elements."""
        d, n = self.diffusion, len(texts)
        states = d.text_states(list(texts))
        z0, _, ll = self.render_pairs(states, texts, generator)
        with torch.no_grad():
            first = (ll[:n] >= ll[n:]).view(-1, 1, 1, 1).to(z0.device)
            chosen, rejected = torch.where(first, z0[:n], z0[n:]), torch.where(first, z0[n:], z0[:n])
            valid = (ll[:n] != ll[n:]).to(z0.device, torch.float32)
        t = torch.randint(0, d.num_train_timesteps, (n,), generator=generator, device=z0.device).repeat(2)
        noise = torch.randn(chosen.shape, generator=generator, device=z0.device).repeat(2, 1, 1, 1)
        noisy, target = d.noised_with(torch.cat([chosen, rejected]), noise, t)
        cond = states.repeat(2, 1, 1)
        error = (d.predict(noisy, t, cond).float() - target.float()).pow(2).mean(dim=(1, 2, 3))
        with torch.no_grad(), adapters_disabled(d.unet):
            ref = (d.predict(noisy, t, cond).float() - target.float()).pow(2).mean(dim=(1, 2, 3))
        per_pair = diffusion_preference_loss(
            error[:n], ref[:n], error[n:], ref[n:], self.loss.diffusion_dpo_beta
        )
        return (per_pair * valid).sum() / valid.sum().clamp(min=1)

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

    def text_terms(
        self,
        images: torch.Tensor,
        captions: list[str],
        generator,
        latents=None,
        texts: list[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """denoise on the pairs; t2i2t on the pairs' captions, or on ``texts`` (unpaired: a sampled image)."""
        w, d = self.loss, self.diffusion
        if not (w.denoise or w.t2i2t or w.diffusion_dpo):
            return {}
        latents = latents or _Lazy(lambda: d.encode(images, generator))
        out: dict[str, torch.Tensor] = {}
        reg = self.regularized(images.shape[0])
        if w.diffusion_dpo:
            out["diffusion_dpo"] = self.diffusion_preference(
                texts[self.regularized(len(texts))] if texts is not None else captions[reg], generator
            )
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
