"""`recon finetune` end to end on tiny models: config, CLI wiring, resume equivalence, atomic checkpoints, exports."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from recon.config import ConfigError
from recon.train.config import FinetuneConfig, changed_keys, load_finetune_config

# Fast settings of the smoke config: one pair per step, alternating directions, no sampled image loss.
FAST = [
    "train.steps=3",
    "train.batch_size=1",
    "train.grad_accum=2",
    "train.checkpoint_every=1",
    "train.report_to=none",
    "loss.schedule=alternate",
    "loss.image_sim=0",
    "validation.final=false",
]


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def lora_state(out) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from recon.train.checkpoints import LORA_FILE, latest_checkpoint

    return load_file(latest_checkpoint(out / "checkpoints") / LORA_FILE)


# ----------------------------------------------------------------------------------------------- config / CLI
def test_config_loads_presets_and_overrides():
    cfg = load_finetune_config("finetune-shapes-smoke", ["loss.i2t2i=0.5", "bridge.variant=logit"])
    assert isinstance(cfg, FinetuneConfig) and cfg.loss.i2t2i == 0.5 and cfg.bridge.variant == "logit"
    assert load_finetune_config("shapes-smoke").name == "finetune-shapes-smoke"
    paper = load_finetune_config("finetune-blip-sd14-paper")
    assert paper.captioner_lora.targets == "xattn_q" and paper.unet_lora.targets == "attn2_q"
    assert (paper.train.batch_size, paper.train.grad_accum, paper.loss.label_smoothing) == (1, 8, 0.1)
    with pytest.raises(ConfigError, match="i2t2j"):
        load_finetune_config("finetune-shapes-smoke", ["loss.i2t2j=1"])
    with pytest.raises(ConfigError, match="bridge.variant"):
        load_finetune_config("finetune-shapes-smoke", ["bridge.variant=dense"])
    with pytest.raises(ConfigError, match="grad_steps"):
        load_finetune_config("finetune-shapes-smoke", ["sampler.grad_steps=9"])
    for bad, field in [
        ("train.checkpoint_every=0", "train.checkpoint_every"),
        ("data.val_items=0", "data.val_items"),
        ("captioner_optim.lr=nan", "captioner_optim.lr"),
        ("train.max_grad_norm=0", "max_grad_norm"),
    ]:
        with pytest.raises(ConfigError, match=field):
            load_finetune_config("finetune-shapes-smoke", [bad])


def test_changed_keys_ignores_volatile_settings():
    a = FinetuneConfig().to_dict()
    b = FinetuneConfig().to_dict()
    b["train"]["steps"] = 99
    b["validation"]["every"] = 3
    assert changed_keys(a, b) == []
    b["loss"]["i2t2i"] = 0.0
    assert changed_keys(a, b) == ["loss.i2t2i"]
    older = FinetuneConfig().to_dict()  # written by a recon before loss.pseudo_label existed
    del older["loss"]["pseudo_label"]
    assert changed_keys(older, FinetuneConfig().to_dict()) == []
    new = FinetuneConfig().to_dict()
    new["loss"]["pseudo_label"] = 1.0
    assert changed_keys(older, new) == ["loss.pseudo_label"]


def test_register_adds_the_finetune_command():
    from recon.train import commands

    parser = argparse.ArgumentParser(prog="recon")
    commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["finetune", "finetune-shapes-smoke", "--out", "x", "--set", "a.b=1", "--set", "c=2"]
    )
    assert args.handler is commands.run_finetune and args.overrides == ["a.b=1", "c=2"] and args.out == "x"


def test_a_run_directory_refuses_another_config(tmp_path):
    from recon.train.joint import write_or_check_config

    cfg = load_finetune_config("finetune-shapes-smoke")
    write_or_check_config(tmp_path, cfg)
    write_or_check_config(
        tmp_path, load_finetune_config("finetune-shapes-smoke", ["train.steps=10"])
    )  # resumable
    with pytest.raises(ValueError, match="loss.i2t2i"):
        write_or_check_config(tmp_path, load_finetune_config("finetune-shapes-smoke", ["loss.i2t2i=0"]))


# ----------------------------------------------------------------------------------------------- resume
@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, recon_cache):
    from recon.train import commands

    out = tmp_path_factory.mktemp("uninterrupted")
    argv = ["finetune", "finetune-shapes-smoke", "--out", str(out)]
    assert commands.main(argv + [x for o in FAST for x in ("--set", o)]) == 0
    return out


def test_resumed_run_repeats_the_uninterrupted_one(uninterrupted, tmp_path, monkeypatch):
    """Stop after step 1; kill the save of step 2 midway; resume twice: identical losses and LoRA weights."""
    from accelerate import Accelerator

    from recon.train.checkpoints import latest_checkpoint
    from recon.train.joint import finetune

    cfg = load_finetune_config("finetune-shapes-smoke", FAST)
    summary = finetune(cfg, tmp_path, stop_after=1)
    assert summary["step"] == 1 and not summary["finished"]
    assert latest_checkpoint(tmp_path / "checkpoints").name == "checkpoint-00000001"

    real_save = Accelerator.save_state

    def killed_save(self, output_dir=None, **kw):
        real_save(self, output_dir, **kw)
        (tmp_path / "checkpoints").joinpath("marker").write_text("the save ran")
        raise KeyboardInterrupt  # as if killed after the files were written, before the rename

    monkeypatch.setattr(Accelerator, "save_state", killed_save)
    with pytest.raises(KeyboardInterrupt):
        finetune(cfg, tmp_path)
    monkeypatch.undo()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert "checkpoint-00000001" in names and ".checkpoint-00000002.tmp" in names
    assert "checkpoint-00000002" not in names
    assert latest_checkpoint(tmp_path / "checkpoints").name == "checkpoint-00000001"
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2]  # step 2 was logged, then lost with the kill

    summary = finetune(cfg, tmp_path)
    assert summary["finished"] and summary["step"] == 3
    ours, ref = metrics(tmp_path), metrics(uninterrupted)
    assert [r["step"] for r in ours] == [1, 2, 3]
    assert ours == ref  # every logged loss term, grad norm and lr, bit for bit
    a, b = lora_state(tmp_path), lora_state(uninterrupted)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["checkpoint-00000002", "checkpoint-00000003", "marker"]  # rotation kept the newest 2


# ----------------------------------------------------------------------------------------------- exports
@pytest.fixture(scope="module")
def trained(tmp_path_factory, recon_cache):
    """A short run with a large learning rate, so the LoRA weights visibly change both models."""
    from recon.train.joint import finetune

    out = tmp_path_factory.mktemp("trained")
    cfg = load_finetune_config(
        "finetune-shapes-smoke",
        FAST
        + ["train.steps=2", "captioner_optim.lr=0.05", "generator_optim.lr=0.05", "validation.final=true"],
    )
    summary = finetune(cfg, out)
    return cfg, out, summary


def ours(cfg, out):
    """Fresh LoRA-wrapped roles with the run's final LoRA weights (from its last checkpoint)."""
    from recon.train.adapters import TrainState
    from recon.train.joint import load_roles

    captioner, pipe = load_roles(cfg, torch.device("cpu"), torch.float32)
    TrainState({"captioner": captioner.model, "unet": pipe.unet}).load_state_dict(
        {"step": 0, **lora_state(out)}
    )
    return captioner, pipe


@pytest.fixture(scope="module")
def randomised(tmp_path_factory, recon_cache):
    """Roles whose LoRA weights are all far from zero, exported: every adapter weight must reach the outputs.

    The tiny random BLIP's vision tower is initialised with std 1e-10 (BlipVisionConfig's initializer_range), so
    its cross-attention sees ~0 and LoRA there cannot change its logits; self-attention is targeted as well here.
    """
    from recon.train.adapters import export_captioner_adapter, export_sd_lora
    from recon.train.joint import load_roles

    cfg = load_finetune_config("finetune-shapes-smoke", ["captioner_lora.targets=decoder_attn"])
    captioner, pipe = load_roles(cfg, torch.device("cpu"), torch.float32)
    torch.manual_seed(1)
    with torch.no_grad():
        for module in (captioner.model, pipe.unet):
            for p in module.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.3)
    out = tmp_path_factory.mktemp("exported")
    export_captioner_adapter(captioner.model, out)
    export_sd_lora(pipe.unet, out)
    return cfg, out, captioner, pipe


def captioner_inputs():
    torch.manual_seed(0)
    return torch.randn(2, 3, 32, 32), ["a red circle", "a blue square on a white background"]


def unet_inputs(pipe):
    torch.manual_seed(0)
    ids = pipe.tokenizer(["a red circle"] * 2, padding="max_length", return_tensors="pt").input_ids
    return torch.randn(2, 4, 32, 32), torch.tensor([10, 500]), pipe.text_encoder(ids)[0]


def check_captioner_adapter(cfg, out, captioner, tiny_models, must_differ: bool) -> None:
    """Plain transformers + peft, and recon's preset path (CaptionerConfig.adapter), give our logits."""
    from peft import PeftModel
    from transformers import BlipForConditionalGeneration

    from recon.captioners import BlipCaptioner
    from recon.config import CaptionerConfig

    pixels, texts = captioner_inputs()
    with torch.no_grad():
        ref = captioner.teacher_forced_logits(pixels, texts)[0]
        base = BlipForConditionalGeneration.from_pretrained(tiny_models / "captioner").eval()
        before = BlipCaptioner(base, captioner.processor, cfg.captioner).teacher_forced_logits(pixels, texts)[
            0
        ]
        plain = BlipCaptioner(
            PeftModel.from_pretrained(base, out / "captioner_adapter").eval(),
            captioner.processor,
            cfg.captioner,
        )
        preset = BlipCaptioner.from_config(
            CaptionerConfig(
                model=str(tiny_models / "captioner"),
                prompt=cfg.captioner.prompt,
                adapter=str(out / "captioner_adapter"),
            ),
            "cpu",
        )
        if must_differ:
            assert (ref - before).abs().max() > 1e-2  # the adapter matters
        torch.testing.assert_close(plain.teacher_forced_logits(pixels, texts)[0], ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(preset.teacher_forced_logits(pixels, texts)[0], ref, rtol=0, atol=1e-5)


def check_sd_lora(out, pipe, tiny_models) -> None:
    """Plain diffusers load_lora_weights, and recon's preset path (GeneratorConfig.lora), give our UNet output."""
    from diffusers import StableDiffusionPipeline

    from recon import hub

    latents, t, states = unet_inputs(pipe)
    with torch.no_grad():
        ref = pipe.unet(latents, t, encoder_hidden_states=states).sample
        plain = StableDiffusionPipeline.from_pretrained(
            tiny_models / "generator", safety_checker=None, requires_safety_checker=False
        )
        before = plain.unet(latents, t, encoder_hidden_states=states).sample
        plain.load_lora_weights(out / "sd_lora")
        preset = hub.load_diffusion_pipeline(
            "builtin:tiny-random/generator", torch.device("cpu"), torch.float32, lora=str(out / "sd_lora")
        )
        assert (ref - before).abs().max() > 1e-2
        torch.testing.assert_close(
            plain.unet(latents, t, encoder_hidden_states=states).sample, ref, rtol=0, atol=1e-5
        )
        torch.testing.assert_close(
            preset.unet(latents, t, encoder_hidden_states=states).sample, ref, rtol=0, atol=1e-5
        )


def test_exports_load_in_plain_peft_diffusers_and_recon(randomised, tiny_models):
    cfg, out, captioner, pipe = randomised
    assert json.loads((out / "captioner_adapter" / "adapter_config.json").read_text())["r"] == 4
    check_captioner_adapter(cfg, out, captioner, tiny_models, must_differ=True)
    check_sd_lora(out, pipe, tiny_models)


def test_trained_run_exports_reproduce_its_checkpoint(trained, tiny_models):
    cfg, out, _ = trained
    captioner, pipe = ours(cfg, out)
    check_captioner_adapter(cfg, out, captioner, tiny_models, must_differ=False)
    check_sd_lora(out, pipe, tiny_models)


def test_run_writes_its_directory(trained):
    cfg, out, summary = trained
    assert summary["finished"]
    for name in (
        "finetune.yaml",
        "bridge.json",
        "metrics.jsonl",
        "validation.jsonl",
        "summary.json",
        "captioner_adapter/adapter_config.json",
        "captioner_adapter/adapter_model.safetensors",
        "sd_lora/pytorch_lora_weights.safetensors",
        "samples/step-00000002.png",
    ):
        assert (out / name).is_file(), name
    val = json.loads((out / "validation.jsonl").read_text().splitlines()[-1])
    assert {"val/ref_log_likelihood", "val/recon_clip_similarity", "val/caption_tuple_acc"} <= set(val)
    assert json.loads((out / "bridge.json").read_text())["caption_token_coverage"] == 1.0


# ----------------------------------------------------------------------------------------------- data
def test_caption_file_pairs_are_a_function_of_the_step(tmp_path):
    import numpy as np
    from PIL import Image

    from recon.train.config import DataConfig
    from recon.train.data import CaptionFilePairs, WorldPairs

    images = []
    for i in range(5):
        Image.fromarray(np.full((40, 60, 3), 40 * i, np.uint8)).save(tmp_path / f"im{i}.png")
        split = "val" if i == 4 else "train"
        images.append(
            {
                "filename": f"im{i}.png",
                "split": split,
                "cocoid": i,
                "sentences": [{"raw": f"image {i} caption {j}"} for j in range(2)],
            }
        )
    (tmp_path / "karpathy.json").write_text(json.dumps({"images": images}))
    cfg = DataConfig(
        kind="karpathy",
        annotations=str(tmp_path / "karpathy.json"),
        images=str(tmp_path),
        train_split=["train"],
        val_split=["val"],
    )
    pairs = CaptionFilePairs(cfg, resolution=16, seed=0)
    b = pairs.train_batch(3, rank=1, world_size=2, n=2)
    assert b.images.shape == (2, 3, 16, 16) and 0 <= b.images.min() and b.images.max() <= 1
    again = pairs.train_batch(3, rank=1, world_size=2, n=2)
    assert b.captions == again.captions and torch.equal(b.images, again.images)
    other_rank = pairs.train_batch(3, rank=0, world_size=2, n=2)
    seen = {c.split()[1] for s in range(2) for c in pairs.train_batch(s, n=2).captions}
    assert (
        seen == {"0", "1", "2", "3"} and b.captions != other_rank.captions
    )  # one epoch covers every item once
    assert pairs.val_batch(8).captions == ["image 4 caption 0"]
    shapes = WorldPairs(resolution=64, seed=0)
    s0, s1 = shapes.train_batch(0, 0, 2, 3), shapes.train_batch(0, 1, 2, 3)
    assert s0.images.shape == (3, 3, 64, 64) and s0.captions != s1.captions


# ----------------------------------------------------------------------------------------------- semi-supervised
SEMI = [
    "data.labelled_pairs=3",
    "data.unlabelled_images=shapes",
    "data.unpaired_texts=shapes",
    "loss.t2i2t_form=sampler",
    "loss.image_sim=0",
    "train.steps=2",
    "train.batch_size=1",
    "train.grad_accum=2",
    "loss.schedule=alternate",
    "train.report_to=none",
    "validation.final=false",
    "train.checkpoint_every=2",
]


def test_config_rejects_terms_that_cannot_carry_a_gradient():
    with pytest.raises(ConfigError, match=r"loss\.image_sim=0\.5.*sampler\.grad_steps=0"):
        load_finetune_config("finetune-shapes-smoke", ["sampler.grad_steps=0"])
    with pytest.raises(ConfigError, match=r"loss\.caption_nll=1\.0.*captioner_lora\.targets is none"):
        load_finetune_config("finetune-shapes-smoke", ["captioner_lora.targets=none"])
    with pytest.raises(ConfigError, match=r"loss\.denoise"):
        load_finetune_config("finetune-shapes-smoke", ["unet_lora.targets=none"])
    # the synthetic-pairs control: no gradient through the sampler, but the captioner still reads the sample
    cfg = load_finetune_config(
        "finetune-shapes-smoke", ["sampler.grad_steps=0", "loss.image_sim=0", "loss.t2i2t_form=sampler"]
    )
    assert cfg.sampler.grad_steps == 0 and cfg.loss.t2i2t == 1.0
    with pytest.raises(ConfigError, match=r"train\.grad_accum=3.*alternate"):
        load_finetune_config("finetune-shapes-smoke", ["loss.schedule=alternate", "train.grad_accum=3"])
    with pytest.raises(ConfigError, match=r"loss\.t2i2t_form=one_step.*unpaired_texts"):
        load_finetune_config("finetune-shapes-smoke", ["data.unpaired_texts=shapes"])
    with pytest.raises(ConfigError, match=r"loss\.pseudo_label.*data\.unlabelled_images"):
        load_finetune_config("finetune-shapes-smoke", ["loss.pseudo_label=1"])
    with pytest.raises(ConfigError, match=r"data\.unlabelled_images=shapes needs data\.kind=shapes"):
        load_finetune_config("finetune-blip-sd14-paper", ["data.unlabelled_images=shapes"])


def test_semi_supervised_run_trains_every_term_on_its_own_data(tmp_path):
    from recon.train.joint import finetune

    cfg = load_finetune_config("finetune-shapes-smoke", SEMI + ["loss.i2t2i=1", "loss.t2i2t=1"])
    assert finetune(cfg, tmp_path)["finished"]
    records = metrics(tmp_path)
    assert len(records) == 2
    for r in records:  # every optimizer step saw both directions
        assert (
            {"caption_nll", "i2t2i", "denoise", "t2i2t"} <= set(r)
            and r["grad_norm_captioner"] > 0
            and r["grad_norm_unet"] > 0
        )


def test_labelled_pool_and_unpaired_streams_stay_out_of_evaluation():
    from recon.shapes import world
    from recon.train.data import UNLABELLED_STREAM, UNPAIRED_TEXT_STREAM, WorldPairs

    cfg = load_finetune_config("finetune-shapes-smoke", SEMI + ["data.labelled_pairs=50"]).data
    pairs = WorldPairs(32, 0, None, cfg)
    train_scenes = set(pairs.pool)
    for step in range(20):
        b = pairs.train_batch(step, 0, 1, 4)
        assert set(b.meta) <= train_scenes and b.unlabelled.shape == (4, 3, 32, 32) and len(b.texts) == 4
        train_scenes |= set(pairs.unpaired._scenes(UNLABELLED_STREAM, step, slice(0, 4), 4))
        train_scenes |= set(pairs.unpaired._scenes(UNPAIRED_TEXT_STREAM, step, slice(0, 4), 4))
    evaluated = (
        set(pairs.val_batch(64).meta)
        | set(world.sample_scenes(256, 0, "test", 2_000_003))
        | set(world.sample_scenes(256, 0, "heldout", 2_000_003))
    )
    assert not train_scenes & evaluated
    assert len(pairs.pool) == 50
    b2 = WorldPairs(32, 0, None, cfg).train_batch(7, 0, 1, 4)  # a pure function of the step
    assert b2.captions == pairs.train_batch(7, 0, 1, 4).captions


def test_scenes_world_trains_on_its_scenes_and_scores_them_exactly():
    """data.kind=scenes: the labelled pool, unlabelled images and unpaired texts are scenes of 1-4 objects drawn as
    the scenes bundle was trained; a caption is scored against its scene (a binding swap fails exact and binding),
    and the bundle's cell judge reads the renders of the references."""
    from recon import hub
    from recon.shapes import scenes
    from recon.shapes.worlds import WORLDS
    from recon.train.config import GENERATED_WORLDS
    from recon.train.data import WorldPairs

    assert tuple(WORLDS) == GENERATED_WORLDS
    cfg = load_finetune_config(
        "finetune-scenes",
        [
            "data.labelled_pairs=20",
            "data.unlabelled_images=scenes",
            "data.unpaired_texts=scenes",
            "loss.t2i2t_form=sampler",
        ],
    ).data
    pairs = WorldPairs(32, 0, hub.SCENES_BUNDLE / "judge", cfg)
    b = pairs.train_batch(0, 0, 1, 16)
    assert all(isinstance(x, scenes.Scene) for x in b.meta) and set(b.meta) <= set(pairs.pool)
    assert b.images.shape == b.unlabelled.shape == (16, 3, 32, 32) and len(b.texts) == 16
    assert {len(x.objects) for x in pairs.pool} == {1, 2, 3, 4}
    assert pairs.score_captions(b.captions, b) == {
        "caption_exact": 1.0,
        "caption_object_f1": 1.0,
        "caption_binding": 1.0,
    }
    assert pairs.score_images(b.images, b) == {"generator_judge_exact": 1.0}
    two = next(x for x in pairs.pool if len({o.color for o in x.objects}) == len(x.objects) == 2)
    swapped = scenes.caption_for(two, "detailed")
    first, second = (two.objects[i].color for i in two.mention_order)
    swapped = swapped.replace(first, "@").replace(second, first).replace("@", second)
    scores = WORLDS["scenes"].caption_scores(swapped, two)
    assert scores["caption_exact"] == 0.0 and scores["caption_binding"] < 1.0
    assert (
        scores["caption_object_f1"] < 1.0
    )  # the objects are (size, colour, shape): a swap changes two of them
    with pytest.raises(ConfigError, match=r"data\.unlabelled_images=scenes needs data\.kind=scenes"):
        load_finetune_config("finetune-shapes", ["data.unlabelled_images=scenes"])
    with pytest.raises(ConfigError, match=r"data\.unpaired_combos=heldout_a.*shapes world"):
        load_finetune_config("finetune-scenes", ["data.unpaired_combos=heldout_a"])


def test_heldout_halves_restrict_unpaired_data():
    from recon.shapes import world
    from recon.train.data import WorldPairs

    cfg = load_finetune_config("finetune-shapes-smoke", SEMI + ["data.unpaired_combos=heldout_a"]).data
    b = WorldPairs(32, 0, None, cfg).train_batch(3, 0, 1, 8)
    assert all(
        world.parse_caption(t)
        and tuple(world.parse_caption(t)[a] for a in world.ATTRIBUTES) in world.HELDOUT_A
        for t in b.texts
    )
    assert (
        set(world.HELDOUT_A).isdisjoint(world.HELDOUT_B)
        and len(world.HELDOUT_A) == len(world.HELDOUT_B) == 30
    )


# ----------------------------------------------------------------------------------------------- processes
def test_two_processes_equal_one_with_the_same_global_batch(tmp_path, recon_cache):
    """torchrun with 2 CPU processes x batch 1 == 1 process x batch 2: the same pairs, averaged gradients, and no
    update of a model no process had a gradient for (the UNet here: caption_nll only)."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    sets = [
        "train.steps=2",
        "train.grad_accum=1",
        "loss.schedule=sum",
        "loss.denoise=0",
        "loss.i2t2i=0",
        "loss.t2i2t=0",
        "loss.image_sim=0",
        "data.labelled_pairs=1",
        "train.report_to=none",
        "validation.final=false",
        "train.checkpoint_every=2",
    ]
    env = dict(os.environ, RECON_CACHE=str(recon_cache), CUDA_VISIBLE_DEVICES="")
    outs = {}
    for procs, batch in ((1, 2), (2, 1)):
        out = tmp_path / f"p{procs}"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={procs}",
            "-m",
            "recon",
            "finetune",
            "finetune-shapes-smoke",
            "--out",
            str(out),
        ]
        cmd += [x for s in sets + [f"train.batch_size={batch}"] for x in ("--set", s)]
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        assert json.loads((out / "summary.json").read_text())["processes"] == procs
        outs[procs] = out
    unet = [load_file(outs[p] / "sd_lora" / "pytorch_lora_weights.safetensors") for p in (1, 2)]
    assert unet[0].keys() == unet[1].keys() and all(torch.equal(unet[0][k], unet[1][k]) for k in unet[0])
    cap = [load_file(outs[p] / "captioner_adapter" / "adapter_model.safetensors") for p in (1, 2)]
    for k in cap[0]:
        torch.testing.assert_close(cap[0][k], cap[1][k], rtol=0, atol=1e-6)
    assert metrics(outs[1])[-1]["caption_nll"] == pytest.approx(metrics(outs[2])[-1]["caption_nll"], abs=1e-5)


def test_flamingo_finetune_runs_and_its_adapter_loads(tmp_path):
    import dataclasses

    from recon.captioners.flamingo import FlamingoCaptioner
    from recon.shapes import world
    from recon.train.joint import finetune

    cfg = load_finetune_config(
        "finetune-flamingo-shapes-smoke", ["train.report_to=none", "validation.final=false"]
    )
    summary = finetune(cfg, tmp_path)
    assert summary["finished"] and {"caption_nll", "i2t2i", "denoise", "t2i2t"} <= set(metrics(tmp_path)[-1])
    adapted = FlamingoCaptioner.from_config(
        dataclasses.replace(cfg.captioner, adapter=summary["captioner_adapter"]), "cpu"
    )
    assert any("lora_A" in n for n, _ in adapted.model.named_parameters())
    caption = adapted.caption([world.render_pil(world.sample_scenes(1, 0, "test", 3)[0])])[0][0]
    assert world.is_parseable(world.parse_caption(caption))


def test_unpaired_folder_and_texts_file(tmp_path):
    from PIL import Image

    from recon.train.config import DataConfig
    from recon.train.data import Batch, Unpaired

    folder = tmp_path / "unlabelled"
    folder.mkdir()
    for i, color in enumerate(("red", "blue", "green")):
        Image.new("RGB", (40, 24), color).save(folder / f"{i}.png")
    texts = tmp_path / "texts.txt"
    texts.write_text("a red circle\n\n   \na blue square\n")
    unpaired = Unpaired(DataConfig(unlabelled_images=str(folder), unpaired_texts=str(texts)), 16, 0)
    seen_texts, seen_pixels = set(), set()
    for step in range(3):  # 2 processes x 1 item: one epoch of 3 images spans the steps
        for rank in (0, 1):
            b = unpaired.fill(Batch(torch.zeros(1, 3, 16, 16), ["x"]), step, rank, 2, 1)
            assert b.unlabelled.shape == (1, 3, 16, 16) and len(b.texts) == 1
            seen_texts.add(b.texts[0])
            seen_pixels.add(tuple(b.unlabelled[0, :, 8, 8].mul(255).round().int().tolist()))
    assert seen_texts == {"a red circle", "a blue square"} and len(seen_pixels) == 3  # blank lines skipped
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(ValueError, match="unpaired_texts.*empty.txt"):
        Unpaired(DataConfig(unpaired_texts=str(empty)), 16, 0)


class _Planted:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_resuming_never_unpickles_a_planted_file(tmp_path):
    """Each pickle-format file a resume could read is replaced by (or added as) a malicious pickle: nothing runs,
    and the resume either ignores the file or stops with a message naming the checkpoint."""
    import pickle

    from recon.train.checkpoints import latest_checkpoint
    from recon.train.joint import finetune

    cfg = load_finetune_config("finetune-shapes-smoke", FAST)
    finetune(cfg, tmp_path, stop_after=1)
    ckpt = latest_checkpoint(tmp_path / "checkpoints")
    marker = tmp_path / "pwned"
    outcomes = {}
    for name in (
        "custom_checkpoint_0.pkl",
        "scheduler.bin",
        "scaler.pt",
        "random_states_0.pkl",
        "optimizer.bin",
    ):
        original = (ckpt / name).read_bytes() if (ckpt / name).exists() else None
        (ckpt / name).write_bytes(pickle.dumps(_Planted(marker)))
        try:
            outcomes[name] = finetune(cfg, tmp_path, stop_after=1)["step"]  # resumed and stopped at once
        except ValueError as e:
            assert "cannot resume from this checkpoint" in str(e) and str(ckpt) in str(e)
            outcomes[name] = "refused"
            ckpt.with_name(f".damaged-{ckpt.name}").rename(ckpt)  # set aside, kept whole
        assert not marker.exists(), name
        if original is None:
            (ckpt / name).unlink()
        else:
            (ckpt / name).write_bytes(original)
    assert outcomes == {
        "custom_checkpoint_0.pkl": "refused",
        "scheduler.bin": 1,
        "scaler.pt": 1,
        "random_states_0.pkl": 1,
        "optimizer.bin": "refused",
    }  # accelerate skips bad RNG states
    assert finetune(cfg, tmp_path)["finished"] and not marker.exists()


def test_one_finetune_per_run_directory(tmp_path):
    from recon.runs import RunError
    from recon.train.joint import finetune, write_or_check_config

    cfg = load_finetune_config("finetune-shapes-smoke", FAST)
    held = write_or_check_config(tmp_path, cfg)  # as a running finetune holds it
    with pytest.raises(RunError, match="in use by recon pid"):
        finetune(cfg, tmp_path)
    held.close()
    assert finetune(cfg, tmp_path, stop_after=1)["step"] == 1


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    from recon.train.joint import finetune

    cfg = load_finetune_config("finetune-shapes-smoke", FAST)
    finetune(cfg, tmp_path, stop_after=2)
    newest = tmp_path / "checkpoints" / "checkpoint-00000002"
    optimizer = newest / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:100])  # truncated
    assert finetune(cfg, tmp_path, stop_after=1)["step"] == 1  # resumed from checkpoint 1
    assert "checkpoint-00000002" in caplog.text and "trying the previous checkpoint" in caplog.text
    assert (tmp_path / "checkpoints" / ".damaged-checkpoint-00000002" / "optimizer.bin").stat().st_size == 100
    assert finetune(cfg, tmp_path)["finished"]


# ------------------------------------------------------------------------ resume over changed inputs, set-asides
def test_a_resume_over_changed_data_files_is_refused_naming_the_field(tmp_path):
    import numpy as np
    from PIL import Image

    from recon.train.joint import write_or_check_config

    texts, images = tmp_path / "texts.txt", tmp_path / "unlabelled"
    texts.write_text("a red circle at the center on a white background\n")
    images.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(images / "a.png")
    cfg = load_finetune_config(
        "finetune-shapes-smoke",
        [*SEMI[:1], f"data.unlabelled_images={images}", f"data.unpaired_texts={texts}", *SEMI[3:]],
    )
    write_or_check_config(tmp_path / "ft", cfg).close()
    write_or_check_config(tmp_path / "ft", cfg).close()  # unchanged: resumes
    texts.write_text("a blue square at the center on a white background\n")
    with pytest.raises(ValueError, match=r"the data of data\.unpaired_texts changed since this run started"):
        write_or_check_config(tmp_path / "ft", cfg)
    texts.write_text("a red circle at the center on a white background\n")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(images / "b.png")  # an image added to the folder
    with pytest.raises(ValueError, match=r"the data of data\.unlabelled_images changed"):
        write_or_check_config(tmp_path / "ft", cfg)
    (images / "b.png").unlink()
    write_or_check_config(
        tmp_path / "ft", cfg
    ).close()  # restored: resumes (and the lock was released each time)


def test_a_truncated_unlabelled_image_is_left_out_before_training(tmp_path, caplog):
    import numpy as np
    from PIL import Image

    from recon.train.data import Unpaired

    images = tmp_path / "unlabelled"
    images.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(images / name)
    (images / "c.png").write_bytes((images / "a.png").read_bytes()[:60])
    cfg = load_finetune_config(
        "finetune-shapes-smoke", [*SEMI[:1], f"data.unlabelled_images={images}", *SEMI[2:]]
    ).data
    unpaired = Unpaired(cfg, 32, 0)
    assert [p.name for p in unpaired.images] == ["a.png", "b.png"]
    assert "1 of 3 images cannot be read and are left out" in caplog.text and "c.png" in caplog.text
    (images / "a.png").write_bytes(b"")
    (images / "b.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=rf"no image in {images} can be read"):
        Unpaired(cfg, 32, 0)


def test_finetune_and_job_directories_refuse_each_other(tmp_path):
    from recon.config import load_config
    from recon.runs import RunDir, RunError
    from recon.train.joint import write_or_check_config

    cfg = load_finetune_config("finetune-shapes-smoke", FAST)
    write_or_check_config(tmp_path / "ft", cfg).close()
    with pytest.raises(
        RunError, match=r"holds a `recon finetune` run; `recon reconstruct` needs its own --out"
    ):
        RunDir(tmp_path / "ft", load_config("tiny-random"), command="reconstruct")
    assert not (tmp_path / "ft" / "config.yaml").exists()  # refused before anything was written
    RunDir(tmp_path / "job", load_config("tiny-random"), command="reconstruct").close()
    with pytest.raises(
        RunError, match=r"holds a `recon reconstruct` run; `recon finetune` needs its own --out"
    ):
        write_or_check_config(tmp_path / "job", cfg)
    assert not (tmp_path / "job" / "finetune.yaml").exists()


def test_a_checkpoint_damaged_twice_is_set_aside_twice(tmp_path):
    from recon.train.joint import finetune

    cfg = load_finetune_config("finetune-shapes-smoke", FAST)
    finetune(cfg, tmp_path, stop_after=2)
    newest = tmp_path / "checkpoints" / "checkpoint-00000002"
    for _ in range(2):  # the resumed run saves step 2 again; it is damaged again
        (newest / "optimizer.bin").write_bytes((newest / "optimizer.bin").read_bytes()[:100])
        assert finetune(cfg, tmp_path, stop_after=2)["step"] == 2
    aside = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".damaged"))
    assert aside == [".damaged-checkpoint-00000002", ".damaged-checkpoint-00000002.2"]


def test_an_override_that_breaks_a_good_config_is_blamed_on_the_override():
    with pytest.raises(ConfigError, match=r"^--set train\.steps=nan: train\.steps: expected an integer"):
        load_finetune_config("finetune-shapes-smoke", ["train.steps=nan"])


def test_a_stopped_finetune_leaves_usable_adapters_and_a_true_summary(tmp_path, caplog):
    import logging

    from recon.train.joint import finetune

    cfg = load_finetune_config("finetune-shapes-smoke", FAST)
    summary = finetune(cfg, tmp_path, stop_after=1)
    assert not summary["finished"]
    for name in ("captioner_adapter/adapter_config.json", "sd_lora/pytorch_lora_weights.safetensors"):
        assert (tmp_path / name).is_file(), name  # exported at the checkpoint, before the run's end
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["step"] == 1 and written["seconds"] >= written["loop_seconds"] > 0
    caplog.set_level(logging.WARNING)
    more = load_finetune_config(
        "finetune-shapes-smoke",
        [*FAST[:0], *[o for o in FAST if not o.startswith("train.steps")], "train.steps=4"],
    )
    assert finetune(more, tmp_path, stop_after=2)["step"] == 2
    assert "with train.steps 3 -> 4 (allowed" in caplog.text


def test_the_exported_adapter_names_its_base_by_the_config_id(tmp_path):
    from recon.train.joint import finetune

    cfg = load_finetune_config("finetune-shapes-smoke", FAST)
    finetune(cfg, tmp_path, stop_after=1)
    base = json.loads((tmp_path / "captioner_adapter" / "adapter_config.json").read_text())[
        "base_model_name_or_path"
    ]
    assert base == cfg.captioner.model == "builtin:tiny-random/captioner"
