import re

import pytest

from recon.config import Config, ConfigError, apply_override, list_presets, load_config


def test_every_preset_loads_and_validates():
    names = list_presets()
    assert {"tiny-random", "blip-sd14-paper", "blip-large-sd15", "blip2-sd21"} <= set(names)
    for name in names:
        cfg = load_config(name)
        assert isinstance(cfg, Config) and cfg.name == name


def test_paper_preset_settings():
    c = load_config("blip-sd14-paper")
    assert c.captioner.prompt == "a picture of "
    assert (c.captioner.decoding.method, c.captioner.decoding.num_beams) == ("beam", 3)
    assert (c.captioner.decoding.min_new_tokens, c.captioner.decoding.max_new_tokens) == (1, 16)  # see below
    assert c.generator.model == "CompVis/stable-diffusion-v1-4"
    assert (c.generator.guidance_scale, c.generator.num_inference_steps, c.generator.height) == (7.5, 50, 512)
    assert c.similarity.image[0].kind == "clip_pooler"


def test_dotted_overrides_parse_yaml_scalars_and_list_indices():
    c = load_config(
        "tiny-random",
        [
            "generator.guidance_scale=5",
            "similarity.image.0.kind=lpips",
            "similarity.select_by=lpips_distance",  # the clip metric it selected by is gone
            "captioner.prompt=",
            "run.threads=null",
            "generator.negative_prompt=ugly, blurry",
        ],
    )
    assert c.generator.guidance_scale == 5.0 and isinstance(c.generator.guidance_scale, float)
    assert c.similarity.image[0].kind == "lpips"
    assert c.captioner.prompt == "" and c.run.threads is None
    assert c.generator.negative_prompt == "ugly, blurry"


def test_float_fields_accept_exponents_without_a_dot():
    # PyYAML reads "1e-4" as a string (YAML 1.1 wants "1.0e-4"); a float field still takes it.
    c = load_config("tiny-random", ["generator.guidance_scale=1e-4"])
    assert c.generator.guidance_scale == 1e-4
    with pytest.raises(ConfigError, match=r"generator\.guidance_scale"):
        load_config("tiny-random", ["generator.guidance_scale=high"])


@pytest.mark.parametrize(
    "override, needle",
    [
        ("generator.guidance_scle=5", "guidance_scle"),
        ("run.seed=abc", "run.seed"),
        ("similarity.image.7.kind=x", "similarity.image.7"),
        ("nonsense", "dotted.key=value"),
        ("run.save_images=3", "run.save_images"),
    ],
)
def test_bad_overrides_name_the_field(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config("tiny-random", [override])


def test_yaml_path_and_base(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("base: tiny-random\ngenerator: {num_inference_steps: 2}\n")
    c = load_config(str(p))
    assert c.generator.num_inference_steps == 2 and c.captioner.model == "builtin:tiny-random/captioner"
    bad = tmp_path / "bad.yaml"
    bad.write_text("generator: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("no-such-preset")


def test_apply_override_appends_to_list():
    d = {"a": [1]}
    apply_override(d, "a.1=2")
    assert d == {"a": [1, 2]}


@pytest.mark.parametrize(
    "override,field",
    [
        ("generator.num_inference_steps=-3", "generator.num_inference_steps"),
        ("generator.num_inference_steps=0", "generator.num_inference_steps"),
        ("generator.images_per_caption=0", "generator.images_per_caption"),
        ("generator.height=7", "generator.height"),
        ("generator.guidance_scale=.nan", "generator.guidance_scale"),
        ("captioner.decoding.num_beams=0", "captioner.decoding.num_beams"),
        ("captioner.decoding.method=sample", "captioner.decoding.method"),
        ("captioner.num_candidates=0", "captioner.num_candidates"),
        ("run.batch_size=0", "run.batch_size"),
    ],
)
def test_out_of_range_values_stop_before_any_work(override, field):
    with pytest.raises(ConfigError, match=re.escape(field)):
        load_config("shapes", [override])


def test_base_cycle_is_a_config_error(tmp_path):
    (tmp_path / "a.yaml").write_text(f"base: {tmp_path / 'b.yaml'}\n")
    (tmp_path / "b.yaml").write_text(f"base: {tmp_path / 'a.yaml'}\n")
    with pytest.raises(ConfigError, match="base: chain loops"):
        load_config(str(tmp_path / "a.yaml"))


@pytest.mark.parametrize(
    "flag,value", [("--batch-size", "0"), ("--batch-size", "-1"), ("--limit", "-1"), ("--threads", "0")]
)
def test_run_flags_out_of_range_are_usage_errors(flag, value, capsys):
    import argparse

    from recon.run_args import add_run_args

    p = argparse.ArgumentParser(prog="recon reconstruct")
    add_run_args(p)
    with pytest.raises(SystemExit) as e:
        p.parse_args([flag, value])
    assert e.value.code == 2 and f"argument {flag}" in capsys.readouterr().err


def test_metric_kinds_and_select_by_are_checked_at_load():
    from recon.config import IMAGE_METRIC_NAMES, TEXT_METRIC_NAMES
    from recon.similarity import IMAGE_METRICS, TEXT_METRICS

    assert {k: c.name for k, c in IMAGE_METRICS.items()} == IMAGE_METRIC_NAMES
    assert {k: c.name for k, c in TEXT_METRICS.items()} == TEXT_METRIC_NAMES
    from recon import hub
    from recon.config import SIMILARITY_KINDS

    checks = [row[2] for rows in SIMILARITY_KINDS.values() for row in rows.values() if row[2] is not None]
    assert checks and all(
        callable(getattr(hub, name, None)) for name in checks
    )  # each row's preflight exists
    with pytest.raises(ConfigError, match=r"similarity\.image\.0\.kind='dino2'"):
        load_config("shapes", ["similarity.image.0.kind=dino2"])
    with pytest.raises(
        ConfigError, match=r"similarity\.image\.0\.kind='sbert'.*list it under similarity\.text"
    ):
        load_config("shapes", ["similarity.image.0.kind=sbert"])
    with pytest.raises(ConfigError, match=r"similarity\.select_by='lpips_distance'"):
        load_config("shapes", ["similarity.select_by=lpips_distance"])
    assert (
        load_config("shapes", ["similarity.select_by=clip_similarity"]).similarity.select_by
        == "clip_similarity"
    )


def test_set_errors_name_the_override_not_a_sound_preset():
    with pytest.raises(ConfigError) as e:
        load_config("tiny-random", ["generator.height=7"])
    assert str(e.value).startswith(
        "--set generator.height=7: generator.height=7"
    ) and "tiny-random.yaml" not in str(e.value)


def test_nan_config_values_compare_equal(tmp_path):
    from recon.runs import same_value

    assert same_value(float("nan"), float("nan")) and not same_value(float("nan"), 1.0) and same_value(1, 1.0)


def test_paper_preset_decodes_with_the_original_length_arithmetic():
    """BLIP's original generate gets min_length=5, max_length=20 with the decoder prompt as input ids: the lengths
    count the prompt ([DEC] + the prompt's tokens, its [SEP] dropped), counted here with the real BERT vocabulary."""
    from recon.captioners.base import generation_kwargs
    from recon.tokenizers import make_blip_tokenizer

    cfg = load_config("blip-sd14-paper")
    prompt_len = len(make_blip_tokenizer()(cfg.captioner.prompt).input_ids) - 1  # [CLS]->[DEC] a picture of
    assert prompt_len == 4
    kw = generation_kwargs(cfg.captioner.decoding, cfg.captioner.num_candidates)
    assert (kw["min_new_tokens"], kw["max_new_tokens"]) == (5 - prompt_len, 20 - prompt_len) == (1, 16)
    assert (kw["num_beams"], kw["do_sample"], kw["repetition_penalty"]) == (3, False, 1.0)
    assert [m.kind for m in cfg.similarity.text] == ["clip_text_pooler", "sbert"]
    assert [m.kind for m in cfg.similarity.image] == ["clip_pooler", "dino"]


def test_presets_resolve_from_the_package_not_the_checkout():
    """A wheel / `pip install .` carries recon/configs (package data); the checkout's configs/ only links there."""
    from pathlib import Path

    import recon
    from recon.config import CONFIG_DIR, preset_path

    package = Path(recon.__file__).resolve().parent
    assert CONFIG_DIR == package / "configs" and preset_path("shapes").resolve().parent == package / "configs"
    assert {"shapes", "tiny-random", "blip-sd14-paper"} <= {p.stem for p in CONFIG_DIR.glob("*.yaml")}
