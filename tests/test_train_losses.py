"""The joint objective on tiny models: x0 estimates, the truncated sampler, and where each term's gradient goes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from recon.train.config import LossConfig, SamplerConfig, load_finetune_config

ALL_OFF = dict(
    caption_nll=0.0,
    denoise=0.0,
    i2t2i=0.0,
    t2i2t=0.0,
    image_sim=0.0,
    pseudo_label=0.0,
    best_of_n_recon=0.0,
    dpo_recon=0.0,
    diffusion_dpo=0.0,
)


def build_parts(config: str) -> dict:
    """A finetune config's roles with LoRA on both models, the bridge, the diffusion helper, the metrics."""
    from recon import hub
    from recon.train.bridge import SoftTokenBridge, vocab_index
    from recon.train.diffusion import Diffusion
    from recon.train.joint import image_sim_metrics, load_roles

    cfg = load_finetune_config(config)
    captioner, pipe = load_roles(cfg, torch.device("cpu"), torch.float32)
    with torch.no_grad():  # LoRA B starts at zero; give every LoRA weight a value so all gradients can flow
        for module in (captioner.model, pipe.unet):
            for name, p in module.named_parameters():
                if p.requires_grad and "lora_B" in name:
                    p.normal_(0, 0.02)
    bridge = SoftTokenBridge(
        vocab_index(captioner.tokenizer, pipe.tokenizer, hub.cache_root()),
        pipe.text_encoder,
        pipe.tokenizer,
        cfg.bridge,
    )
    return dict(
        cfg=cfg,
        captioner=captioner,
        pipe=pipe,
        bridge=bridge,
        diffusion=Diffusion(pipe),
        metrics=image_sim_metrics(cfg, torch.device("cpu")),
    )


@pytest.fixture(scope="module")
def parts(recon_cache):
    """Smoke-config roles (tiny random models)."""
    return build_parts("finetune-shapes-smoke")


def objective(parts, checkpointing=False, sampler=None, **weights):
    from recon.train.losses import JointObjective

    parts["diffusion"].checkpointing = checkpointing
    loss = dataclasses.replace(parts["cfg"].loss, **{**ALL_OFF, **weights})
    return JointObjective(
        parts["captioner"],
        parts["diffusion"],
        parts["bridge"],
        loss,
        sampler or parts["cfg"].sampler,
        parts["metrics"],
    )


def batch(n=2, seed=0):
    from recon.train.data import WorldPairs

    b = WorldPairs(resolution=64, seed=seed).train_batch(0, n=n)
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
        _, _, t_low = d.noised(
            latents.repeat(50, 1, 1, 1), torch.Generator().manual_seed(1), max_timestep=100
        )
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
    assert (loss.schedule, loss.label_smoothing, loss.i2t2i, loss.t2i2t, loss.t2i2t_form) == (
        "alternate",
        0.1,
        1.0,
        1.0,
        "one_step",
    )


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
    terms = obj(
        images, captions, "text", torch.Generator().manual_seed(0), texts=["a red circle", "a blue square"]
    )
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
    terms = obj(
        images[:, :, ::2, ::2], captions, "both", torch.Generator().manual_seed(0)
    )  # 32 px: the shapes UNet
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
        ref = pipe.text_encoder(
            pipe.tokenizer([text], padding="max_length", max_length=77, return_tensors="pt").input_ids
        ).last_hidden_state
    assert float((last - ref).norm() / ref.norm()) <= 1e-3


def offer_true_and_wrong_captions(parts, monkeypatch):
    """Six test scenes and their images; the captioner offers each scene's true caption and one with a wrong shape
    (in alternating order), so a ranking can be checked against the truth."""
    from recon.shapes import world

    scenes = world.sample_scenes(6, 0, "test", 11)
    wrong = [
        s.with_attribute("shape", next(x for x in world.SHAPES if x != s.attributes["shape"])) for s in scenes
    ]
    offered = [
        [w.caption, s.caption] if i % 2 else [s.caption, w.caption]
        for i, (s, w) in enumerate(zip(scenes, wrong))
    ]
    monkeypatch.setattr(parts["captioner"], "caption", lambda images, k, decoding, seeds: offered)
    return scenes, torch.from_numpy(world.render_batch(scenes)).permute(0, 3, 1, 2).float() / 255


def test_pseudo_labels_pick_the_caption_the_generator_denoises_best(flamingo_parts, monkeypatch):
    """The shapes UNet's denoising error, used as a classifier, prefers the true caption over a wrong shape."""

    parts = flamingo_parts
    obj = objective(parts, pseudo_label=1.0)
    obj.loss.pseudo_label_candidates, obj.loss.pseudo_label_draws = 2, 8
    scenes, images = offer_true_and_wrong_captions(parts, monkeypatch)
    chosen = obj.pseudo_labels(images, torch.Generator().manual_seed(0))
    assert sum(c == s.caption for c, s in zip(chosen, scenes)) >= 5
    terms = obj(
        images, [s.caption for s in scenes], "image", torch.Generator().manual_seed(0), unlabelled=images
    )
    assert set(terms.values) == {"pseudo_label"}
    zero(parts)
    terms.total.backward()
    assert nonzero(lora_grads(parts["captioner"].model)) and none_or_zero(lora_grads(parts["pipe"].unet))
    zero(parts)


# ----------------------------------------------------------------------------------------------- rewards (issue 23)
def test_preference_losses_equal_the_papers_formulas_on_hand_computed_numbers():
    from recon.train.losses import diffusion_preference_loss, preference_loss

    # h = (logpi_w - logref_w) - (logpi_l - logref_l) = (-1 - -2) - (-3 - -2.5) = 1.5
    pw = torch.tensor([-1.0], requires_grad=True)
    args = (pw, torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.5]))
    dpo = preference_loss(*args, beta=0.5)
    assert float(dpo.detach()) == pytest.approx(0.386871, abs=1e-6)  # -log sigmoid(0.75) = log(1 + e^-0.75)
    dpo.sum().backward()
    assert float(pw.grad) == pytest.approx(-0.160411, abs=1e-6)  # -beta * sigmoid(-beta h) = -0.5 * 0.320821
    assert float(preference_loss(*args, beta=0.5, form="ipo").detach()) == pytest.approx(
        0.25
    )  # (1.5 - 1 / (2 * 0.5))^2
    # Diffusion-DPO: (err_w - ref_w) - (err_l - ref_l) = (0.10 - 0.12) - (0.20 - 0.15) = -0.07; -beta * it = 0.7
    loss = diffusion_preference_loss(
        torch.tensor([0.10]), torch.tensor([0.12]), torch.tensor([0.20]), torch.tensor([0.15]), beta=10.0
    )
    assert float(loss) == pytest.approx(0.403186, abs=1e-6)  # -log sigmoid(0.7)
    with pytest.raises(ValueError, match="ipo"):
        preference_loss(*args, beta=0.5, form="kto")


def with_reward_metric(obj, parts):
    obj.metrics = {**obj.metrics, "recon_reward": parts["metrics"]["clip"]}
    return obj


def zero_lora_b(module) -> dict[str, torch.Tensor]:
    """Set every LoRA B to 0 (the policy equals its reference); returns the old values."""
    saved = {n: p.detach().clone() for n, p in module.named_parameters() if "lora_B" in n}
    with torch.no_grad():
        for n, p in module.named_parameters():
            if n in saved:
                p.zero_()
    return saved


def restore(module, saved):
    with torch.no_grad():
        for n, p in module.named_parameters():
            if n in saved:
                p.copy_(saved[n])


def test_dpo_recon_starts_at_log_2_against_the_disabled_lora_and_trains_the_captioner_only(
    parts, monkeypatch
):
    """At LoRA B = 0 the policy is its reference (peft's disable_adapter), so DPO = log 2 whatever the pair; its
    gradient reaches the captioner's LoRA, never the UNet; best_of_n_recon rides on the same policy pass."""
    cap = parts["captioner"].model
    offered = [["a red circle", "a blue square", "a green triangle"]]
    monkeypatch.setattr(
        parts["captioner"], "caption", lambda images, k, decoding, seeds: offered * len(images)
    )
    saved = zero_lora_b(cap)
    try:
        obj = with_reward_metric(objective(parts, dpo_recon=1.0, best_of_n_recon=1.0), parts)
        obj.loss.recon_reward_candidates = 3
        images, captions = batch()
        unlabelled, _ = batch(n=2, seed=5)
        zero(parts)
        terms = obj(images, captions, "image", torch.Generator().manual_seed(0), unlabelled=unlabelled)
        assert set(terms.values) == {"dpo_recon", "best_of_n_recon"}
        assert terms.values["dpo_recon"] == pytest.approx(float(torch.log(torch.tensor(2.0))), abs=1e-5)
        assert terms.captioner_examples == 2  # regularizer_items=1 image: its chosen and rejected caption
        assert cap.training  # ranked and scored in eval mode, restored
        terms.total.backward()
        assert nonzero({n: g for n, g in lora_grads(cap).items() if "lora_B" in n})
        assert none_or_zero(lora_grads(parts["pipe"].unet))
    finally:
        restore(cap, saved)
        zero(parts)


def test_reconstruction_ranking_renders_each_distinct_caption_once_from_shared_noise(parts, monkeypatch):
    obj = with_reward_metric(objective(parts, best_of_n_recon=1.0), parts)
    d = parts["diffusion"]
    rendered = []
    real = d.sample
    monkeypatch.setattr(
        d,
        "sample",
        lambda states, g, cfg, noise=None: rendered.append(noise) or real(states, g, cfg, noise=noise),
    )
    images, _ = batch(n=2)
    candidates = [["a red circle", "a red circle", "a blue square"], ["a blue square"] * 3]
    scores = obj.reconstruction_scores(images, candidates, torch.Generator().manual_seed(0))
    (noise,) = rendered
    assert scores.shape == (2, 3) and noise.shape[0] == 3  # 2 distinct captions of image 0, 1 of image 1
    assert torch.equal(noise[0], noise[1]) and not torch.equal(noise[0], noise[2])  # one noise per image
    assert scores[0, 0] == scores[0, 1] and len(set(scores[1].tolist())) == 1


def test_diffusion_dpo_starts_at_log_2_and_swaps_with_the_captioners_ranking(parts, monkeypatch):
    """At UNet LoRA B = 0 Diffusion-DPO is log 2; with LoRA on, reversing the captioner's preference gives the
    mirrored loss (sigmoid(z) + sigmoid(-z) = 1); the gradient reaches the UNet only."""
    unet = parts["pipe"].unet
    obj = objective(parts, diffusion_dpo=1.0)
    images, captions = batch(n=1)

    def loss_with(likelihoods):
        monkeypatch.setattr(obj, "text_log_likelihood", lambda images, texts: torch.tensor(likelihoods))
        return obj(images, captions, "text", torch.Generator().manual_seed(0), texts=["a red circle"])

    saved = zero_lora_b(unet)
    try:
        assert loss_with([0.0, 1.0]).values["diffusion_dpo"] == pytest.approx(0.693147, abs=1e-5)
    finally:
        restore(unet, saved)
    first, second = loss_with([1.0, 0.0]), loss_with([0.0, 1.0])
    assert first.values["diffusion_dpo"] != pytest.approx(0.693147, abs=1e-4)
    assert float(torch.exp(-first.total.detach()) + torch.exp(-second.total.detach())) == pytest.approx(
        1.0, abs=1e-4
    )
    assert loss_with([0.5, 0.5]).values["diffusion_dpo"] == 0.0  # a tie: nothing to prefer
    zero(parts)
    first = loss_with([1.0, 0.0])
    first.total.backward()
    assert nonzero(lora_grads(unet)) and none_or_zero(lora_grads(parts["captioner"].model))
    assert first.captioner_examples == 0  # the captioner only ranked, without gradient
    zero(parts)


def test_best_of_n_recon_picks_the_caption_whose_reconstruction_looks_like_the_image(
    flamingo_parts, monkeypatch
):
    """The shapes generator renders each candidate; the bundle's CLIP prefers the true caption's render over a
    wrong shape's (the best-of-N target), and the NLL on it trains the captioner only."""
    from recon.config import MetricConfig
    from recon.similarity import load_similarity

    parts = flamingo_parts
    obj = objective(parts, best_of_n_recon=1.0, sampler=SamplerConfig(num_steps=10, grad_steps=0))
    obj.metrics = {"recon_reward": load_similarity(MetricConfig(kind="clip", model="builtin:shapes/clip"))}
    obj.loss.recon_reward_candidates = 2
    scenes, images = offer_true_and_wrong_captions(parts, monkeypatch)
    best, worst = obj.recon_ranked(images, torch.Generator().manual_seed(0))
    assert sum(b == s.caption for b, s in zip(best, scenes)) >= 5
    assert all(b != w for b, w in zip(best, worst))
    terms = obj(
        images, [s.caption for s in scenes], "image", torch.Generator().manual_seed(0), unlabelled=images
    )
    assert set(terms.values) == {"best_of_n_recon"} and terms.captioner_examples == len(scenes)
    zero(parts)
    terms.total.backward()
    assert nonzero(lora_grads(parts["captioner"].model)) and none_or_zero(lora_grads(parts["pipe"].unet))
    zero(parts)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["loss.dpo_recon=1"], "data.unlabelled_images"),
        (["loss.best_of_n_recon=1"], "data.unlabelled_images"),
        (
            ["loss.dpo_recon=1", "data.unlabelled_images=shapes", "loss.recon_reward_candidates=1"],
            "recon_reward_candidates",
        ),
        (["loss.preference_loss=kto"], "loss.preference_loss"),
        (["loss.preference_beta=0"], "loss.preference_beta"),
        (["loss.diffusion_dpo=-1"], "loss.diffusion_dpo"),
        (["loss.diffusion_dpo=1", "loss.denoise=0", "unet_lora.targets=none"], "loss.diffusion_dpo"),
        (
            [
                "loss.dpo_recon=1",
                "loss.caption_nll=0",
                "data.unlabelled_images=shapes",
                "captioner_lora.targets=none",
            ],
            "loss.dpo_recon",
        ),
        (
            [
                "loss.best_of_n_recon=1",
                "data.unlabelled_images=shapes",
                "loss.recon_reward_decoding.method=greedy",
            ],
            "recon_reward_decoding",
        ),
        (["captioner.backend=flamingo", "captioner.adapter=runs/x/adapter"], "captioner.adapter"),
        (["data.selection_pairs=4"], "data.selection_pairs"),
        (["data.labelled_pairs=4", "data.selection_pairs=4"], "data.selection_pairs"),
    ],
)
def test_reward_and_selection_settings_are_validated(overrides, field):
    from recon.config import ConfigError

    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_finetune_config("finetune-shapes-smoke", overrides)
    load_finetune_config(
        "finetune-shapes-smoke",
        [
            "loss.dpo_recon=1",
            "loss.best_of_n_recon=0.5",
            "data.unlabelled_images=shapes",
            "loss.diffusion_dpo=1",
            "loss.preference_loss=ipo",
            "data.labelled_pairs=8",
            "data.selection_pairs=2",
        ],
    )


def test_model_selection_holds_out_the_pool_and_keeps_the_best_checkpoint(tmp_path):
    """A tiny run with a held-out slice: the slice never reaches training, every checkpoint (and the start) is
    scored, the best one's adapters are exported, and each step logs the captioner examples it read."""
    import json

    from recon.train.data import WorldPairs
    from recon.train.joint import finetune
    from recon.train.selection import SELECTED_DIR, select_checkpoint

    cfg = load_finetune_config(
        "finetune-shapes-smoke",
        [
            "train.steps=2",
            "train.checkpoint_every=1",
            "train.checkpoints_total_limit=10",
            "train.report_to=none",
            "validation.final=false",
            "loss.image_sim=0",
            "data.labelled_pairs=6",
            "data.selection_pairs=2",
        ],
    )
    pairs = WorldPairs(32, 0, cfg=cfg.data)
    held = {s.caption for s in pairs.selection}
    assert len(pairs.selection) == 2 and len(pairs.pool) == 4 and not held & {s.caption for s in pairs.pool}
    assert [s.caption for s in pairs.selection_batch().meta] == [s.caption for s in pairs.selection]
    finetune(cfg, tmp_path)
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["captioner_examples"] > 0 for r in steps)
    record = select_checkpoint(cfg, tmp_path, "caption_nll")
    assert set(record["losses"]) == {"0", "1", "2"} and record["best_step"] in (0, 1, 2)
    assert record["losses"][str(record["best_step"])] == min(record["losses"].values())
    assert (tmp_path / SELECTED_DIR / "captioner_adapter").is_dir() and (
        tmp_path / SELECTED_DIR / "sd_lora"
    ).is_dir()
    assert select_checkpoint(cfg, tmp_path, "caption_nll") == record  # done once
    (tmp_path / "selection.json").unlink()
    by_denoising = select_checkpoint(cfg, tmp_path, "denoise")
    assert by_denoising["criterion"] == "denoise" and set(by_denoising["losses"]) == {"0", "1", "2"}
