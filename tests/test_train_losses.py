"""The joint objective on tiny models: x0 estimates, the truncated sampler, and where each term's gradient goes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from recon.train.config import LossConfig, SamplerConfig, load_finetune_config

ALL_OFF = dict(caption_nll=0.0, denoise=0.0, i2t2i=0.0, t2i2t=0.0, image_sim=0.0)


def build_parts(config: str) -> dict:
    """A finetune config's roles with LoRA on both models, the bridge, the diffusion helper, the metrics."""
    from recon import hub
    from recon.train.bridge import SoftTokenBridge, vocab_index
    from recon.train.joint import image_sim_metrics, load_roles
    from recon.train.losses import Diffusion

    cfg = load_finetune_config(config)
    captioner, pipe = load_roles(cfg, torch.device("cpu"), torch.float32)
    with torch.no_grad():  # LoRA B starts at zero; give every LoRA weight a value so all gradients can flow
        for module in (captioner.model, pipe.unet):
            for name, p in module.named_parameters():
                if p.requires_grad and "lora_B" in name:
                    p.normal_(0, 0.02)
    bridge = SoftTokenBridge(vocab_index(captioner.tokenizer, pipe.tokenizer, hub.cache_root()), pipe.text_encoder,
                             pipe.tokenizer, cfg.bridge)
    return dict(cfg=cfg, captioner=captioner, pipe=pipe, bridge=bridge, diffusion=Diffusion(pipe),
                metrics=image_sim_metrics(cfg, torch.device("cpu")))


@pytest.fixture(scope="module")
def parts(recon_cache):
    """Smoke-config roles (tiny random models)."""
    return build_parts("finetune-shapes-smoke")


def objective(parts, checkpointing=False, sampler=None, **weights):
    from recon.train.losses import JointObjective

    parts["diffusion"].checkpointing = checkpointing
    loss = dataclasses.replace(parts["cfg"].loss, **{**ALL_OFF, **weights})
    return JointObjective(parts["captioner"], parts["diffusion"], parts["bridge"], loss,
                          sampler or parts["cfg"].sampler, parts["metrics"])


def batch(n=2, seed=0):
    from recon.train.data import ShapesPairs

    b = ShapesPairs(resolution=64, seed=seed).train_batch(0, n=n)
    return b.images, b.captions


def lora_grads(module) -> dict[str, torch.Tensor | None]:
    return {n: p.grad for n, p in module.named_parameters() if p.requires_grad}


def zero(parts):
    for module in (parts["captioner"].model, parts["pipe"].unet):
        module.zero_grad(set_to_none=True)


def nonzero(grads) -> bool:
    return bool(grads) and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def none_or_zero(grads) -> bool:
    return all(g is None or g.abs().sum() == 0 for g in grads.values())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_predicted_original_inverts_the_noising(parts, prediction_type):
    from diffusers import DDPMScheduler

    d = parts["diffusion"]
    saved = d.noise_scheduler, d.prediction_type
    d.noise_scheduler = DDPMScheduler.from_config(d.noise_scheduler.config, prediction_type=prediction_type)
    d.prediction_type = prediction_type
    try:
        latents = torch.randn(4, 4, 8, 8)
        noisy, target, t = d.noised(latents, torch.Generator().manual_seed(0))
        torch.testing.assert_close(d.predicted_original(noisy, target, t), latents, atol=2e-3, rtol=1e-3)
        _, _, t_low = d.noised(latents.repeat(50, 1, 1, 1), torch.Generator().manual_seed(1), max_timestep=100)
        assert t_low.max() < 100
    finally:
        d.noise_scheduler, d.prediction_type = saved


def test_unet_loss_reaches_the_captioner_lora(parts):
    """i2t2i alone (an UNet noise MSE): every captioner LoRA weight gets a gradient through bridge + text encoder,
    also after an optimizer step (LoRA B starts at 0 in real runs; after one step A's gradients are non-zero)."""
    cap, unet = parts["captioner"].model, parts["pipe"].unet
    saved = {n: p.detach().clone() for n, p in cap.named_parameters() if p.requires_grad}
    with torch.no_grad():  # the real start: B = 0
        for n, p in cap.named_parameters():
            if "lora_B" in n:
                p.zero_()
    try:
        obj = objective(parts, i2t2i=1.0)
        params = [p for m in (cap, unet) for p in m.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3)
        zero(parts)
        obj(*batch(), "image", torch.Generator().manual_seed(0)).total.backward()
        grads = lora_grads(cap)
        assert nonzero({n: g for n, g in grads.items() if "lora_B" in n})
        assert nonzero(lora_grads(unet))
        opt.step()
        zero(parts)
        obj(*batch(seed=1), "image", torch.Generator().manual_seed(1)).total.backward()
        assert nonzero(lora_grads(cap)), "every captioner LoRA param (A and B) has a gradient after one step"
    finally:
        with torch.no_grad():
            for n, p in cap.named_parameters():
                if n in saved:
                    p.copy_(saved[n])
        zero(parts)


@pytest.mark.parametrize("form", ["one_step", "sampler"])
def test_text_to_image_to_text_reaches_both_models(parts, form):
    obj = objective(parts, t2i2t=1.0, sampler=SamplerConfig(num_steps=2, grad_steps=1))
    obj.loss.t2i2t_form = form
    zero(parts)
    terms = obj(*batch(), "text", torch.Generator().manual_seed(0))
    assert set(terms.values) == {"t2i2t"} and torch.isfinite(terms.total)
    terms.total.backward()
    assert nonzero(lora_grads(parts["pipe"].unet)) and nonzero(lora_grads(parts["captioner"].model))
    zero(parts)


def test_task_losses_stay_in_their_own_model(parts):
    obj = objective(parts, caption_nll=1.0, denoise=1.0)
    zero(parts)
    obj(*batch(), "image", torch.Generator().manual_seed(0)).total.backward()
    assert nonzero(lora_grads(parts["captioner"].model)) and none_or_zero(lora_grads(parts["pipe"].unet))
    zero(parts)
    obj(*batch(), "text", torch.Generator().manual_seed(0)).total.backward()
    assert none_or_zero(lora_grads(parts["captioner"].model)) and nonzero(lora_grads(parts["pipe"].unet))
    zero(parts)


def test_image_similarity_loss_reaches_both_models(parts):
    obj = objective(parts, image_sim=1.0, sampler=SamplerConfig(num_steps=2, grad_steps=1))
    zero(parts)
    terms = obj(*batch(), "image", torch.Generator().manual_seed(0))
    assert set(terms.values) == {"image_sim"} and 0 <= terms.values["image_sim"] < 3
    terms.total.backward()
    assert nonzero(lora_grads(parts["pipe"].unet)) and nonzero(lora_grads(parts["captioner"].model))
    zero(parts)


def test_sampler_truncation_and_checkpointing(parts):
    d, unet = parts["diffusion"], parts["pipe"].unet
    states = d.text_states(["a red circle", "a blue square"])
    d.checkpointing = False
    frozen = d.sample(states, torch.Generator().manual_seed(0), SamplerConfig(num_steps=3, grad_steps=0))
    assert not frozen.requires_grad

    def grads(checkpointing: bool):
        d.checkpointing = checkpointing
        zero(parts)
        x = d.sample(states, torch.Generator().manual_seed(0), SamplerConfig(num_steps=3, grad_steps=2))
        d.decode(x).mean().backward()
        return x.detach(), {n: g.clone() for n, g in lora_grads(unet).items()}

    x_plain, g_plain = grads(False)
    x_ckpt, g_ckpt = grads(True)  # each sampled step and the whole decode checkpointed by us
    d.vae.enable_gradient_checkpointing()  # the VAE checkpointing its decoder blocks itself instead
    d.vae_checkpointing = True
    try:
        _, g_vae = grads(True)
    finally:
        d.vae.disable_gradient_checkpointing()
        d.vae_checkpointing = d.checkpointing = False
    zero(parts)
    torch.testing.assert_close(x_plain, frozen)  # same seed, same sample, with or without gradient
    assert torch.equal(x_plain, x_ckpt)
    for n in g_plain:
        torch.testing.assert_close(g_ckpt[n], g_plain[n], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(g_vae[n], g_plain[n], rtol=1e-4, atol=1e-7)


def test_sum_schedule_computes_every_term(parts):
    obj = objective(parts, caption_nll=1.0, denoise=1.0, i2t2i=1.0, t2i2t=1.0, schedule="alternate")
    assert obj.direction(0) == "image" and obj.direction(1) == "text"
    obj.loss.schedule = "sum"
    assert obj.direction(1) == "both"
    with torch.no_grad():
        terms = obj(*batch(), "both", torch.Generator().manual_seed(0))
    assert set(terms.values) == {"caption_nll", "denoise", "i2t2i", "t2i2t"}
    assert terms.total == pytest.approx(sum(terms.values.values()), rel=1e-5)


def test_loss_config_defaults_are_the_original():
    loss = LossConfig()
    assert (loss.schedule, loss.label_smoothing, loss.i2t2i, loss.t2i2t, loss.t2i2t_form) == \
        ("alternate", 0.1, 1.0, 1.0, "one_step")


def test_unlabelled_images_train_both_models_on_the_captioners_own_caption(parts, monkeypatch):
    obj = objective(parts, i2t2i=1.0)
    images, captions = batch()
    unlabelled, _ = batch(n=2, seed=5)
    seen = []
    real = obj.own_captions
    monkeypatch.setattr(obj, "own_captions", lambda x: seen.append(x) or real(x))
    zero(parts)
    terms = obj(images, captions, "image", torch.Generator().manual_seed(0), unlabelled=unlabelled)
    # the smoke config regularises the first loss.regularizer_items=1 item of each micro-batch
    assert set(terms.values) == {"i2t2i"} and len(seen) == 1 and torch.equal(seen[0], unlabelled[:1])
    assert parts["captioner"].model.training  # decoding switched to eval mode and back
    terms.total.backward()
    assert nonzero(lora_grads(parts["captioner"].model)) and nonzero(lora_grads(parts["pipe"].unet))
    zero(parts)


@pytest.mark.parametrize("grad_steps", [1, 0])
def test_unpaired_texts_go_through_a_sampled_image(parts, grad_steps):
    """t2i2t on texts without images; with no gradient through the sampler only the captioner learns (the
    synthetic-pairs control)."""
    obj = objective(parts, t2i2t=1.0, sampler=SamplerConfig(num_steps=2, grad_steps=grad_steps))
    obj.loss.t2i2t_form = "sampler"
    images, captions = batch()
    zero(parts)
    terms = obj(images, captions, "text", torch.Generator().manual_seed(0), texts=["a red circle", "a blue square"])
    assert set(terms.values) == {"t2i2t"}
    terms.total.backward()
    assert nonzero(lora_grads(parts["captioner"].model))
    unet = lora_grads(parts["pipe"].unet)
    assert nonzero(unet) if grad_steps else none_or_zero(unet)
    zero(parts)


# ----------------------------------------------------------------------------------------------- Flamingo
@pytest.fixture(scope="module")
def flamingo_parts(recon_cache):
    """The shapes bundle's Flamingo captioner and generator with LoRA, as `recon finetune` loads them."""
    return build_parts("finetune-flamingo-shapes-smoke")


@pytest.mark.parametrize("term", ["i2t2i", "t2i2t"])
def test_flamingo_trains_jointly_through_a_reconstruction_term(flamingo_parts, term):
    from recon.captioners.base import TrainableCaptioner

    parts = flamingo_parts
    assert isinstance(parts["captioner"], TrainableCaptioner)
    obj = objective(parts, **{term: 1.0})
    images, captions = batch(n=2)
    zero(parts)
    terms = obj(images[:, :, ::2, ::2], captions, "both", torch.Generator().manual_seed(0))  # 32 px: the shapes UNet
    assert set(terms.values) == {term}
    terms.total.backward()
    grads = lora_grads(parts["captioner"].model)
    for block in ("perceiver", "gated_cross_attn"):
        mine = {n: g for n, g in grads.items() if block in n}
        assert mine and nonzero(mine), block
    assert nonzero(lora_grads(parts["pipe"].unet))
    zero(parts)


def test_flamingo_bridge_is_exact_for_its_words(flamingo_parts):
    """The shapes LM's byte-level word tokens ("Ġcircle") map one-to-one onto CLIP's whole words."""
    parts = flamingo_parts
    cap, pipe = parts["captioner"], parts["pipe"]
    text = "a small red circle at the top left on a white background"
    ids = cap.tokenizer(" " + text, add_special_tokens=False).input_ids
    logits = torch.zeros(1, len(ids), len(cap.tokenizer))
    logits[0, range(len(ids)), ids] = 1e4
    with torch.no_grad():
        last, _ = parts["bridge"](logits, torch.ones(1, len(ids), dtype=torch.bool))
        ref = pipe.text_encoder(pipe.tokenizer([text], padding="max_length", max_length=77,
                                               return_tensors="pt").input_ids).last_hidden_state
    assert float((last - ref).norm() / ref.norm()) <= 1e-3


def test_pseudo_labels_pick_the_caption_the_generator_denoises_best(flamingo_parts, monkeypatch):
    """The shapes UNet's denoising error, used as a classifier, prefers the true caption over a wrong shape."""
    from recon.shapes import world

    parts = flamingo_parts
    obj = objective(parts, pseudo_label=1.0)
    obj.loss.pseudo_label_candidates, obj.loss.pseudo_label_draws = 2, 8
    scenes = world.sample_scenes(6, 0, "test", 11)
    wrong = [s.with_attribute("shape", next(x for x in world.SHAPES if x != s.attributes["shape"])) for s in scenes]
    offered = [[w.caption, s.caption] if i % 2 else [s.caption, w.caption]
               for i, (s, w) in enumerate(zip(scenes, wrong))]
    monkeypatch.setattr(parts["captioner"], "caption", lambda images, k, decoding, seeds: offered)
    images = torch.from_numpy(world.render_batch(scenes)).permute(0, 3, 1, 2).float() / 255
    chosen = obj.pseudo_labels(images, torch.Generator().manual_seed(0))
    assert sum(c == s.caption for c, s in zip(chosen, scenes)) >= 5
    terms = obj(images, [s.caption for s in scenes], "image", torch.Generator().manual_seed(0), unlabelled=images)
    assert set(terms.values) == {"pseudo_label"}
    zero(parts)
    terms.total.backward()
    assert nonzero(lora_grads(parts["captioner"].model)) and none_or_zero(lora_grads(parts["pipe"].unet))
    zero(parts)
