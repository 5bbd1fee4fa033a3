import pytest

from onereward.config import ConfigError, load_config


def test_profiles_load():
    tiny = load_config("tiny")
    assert tiny.image_size == 32 and tiny.generator.kind == "tiny_unet"
    flux = load_config("flux")
    assert flux.generator.kind == "flux_fill" and flux.artifact_root.startswith("s3://")


def test_overrides_apply_with_yaml_types():
    s = load_config("tiny", ["pretrain.steps=7", "masks.task_mix={fill: 1.0}", "curate.min_std=0.5"])
    assert s.pretrain.steps == 7 and s.masks.task_mix == {"fill": 1.0} and s.curate.min_std == 0.5


@pytest.mark.parametrize(
    ("override", "path"),
    [
        ("pretrain.stepz=3", "pretrain.stepz"),
        ("pretrain.steps=-1", "pretrain.steps"),
        ("masks.task_mix={paint: 1.0}", "masks.task_mix.paint"),
        ("curate.sources=[{kind: ftp}]", "curate.sources.0"),
        ("generator.kind=sdxl", "generator.kind"),
        ("distill.report_steps=[2, 0]", "distill.report_steps.1"),
    ],
)
def test_bad_keys_and_values_name_their_path(override, path):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [override])
    assert path in str(e.value)


def test_unknown_profile_and_malformed_override():
    with pytest.raises(ConfigError, match="no configuration file"):
        load_config("nope")
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config("tiny", ["pretrain.steps"])


def test_judge_options_added_later_key_the_stages_only_when_set():
    """The pretrained judge's fields came after the tiny judges were keyed: at their defaults they leave the keys
    as they were (no rerun in an existing home); set, they change them."""
    from onereward.config import key_fields

    tiny = key_fields(load_config("tiny"))["reward"]["judge"]
    assert sorted(tiny) == ["arch", "model_name", "split_seed"]
    s = load_config("tiny", ["reward.vision_warmup_steps=0", "reward.judge.arch=qwen2_5_vl",
                             "reward.audit.arch=qwen2_vl", "reward.judge.base_uri=/m", "reward.judge.lora_rank=8"])
    assert key_fields(s)["reward"]["judge"] | {"base_uri": "/m", "lora_rank": 8} == key_fields(s)["reward"]["judge"]


@pytest.mark.parametrize(("overrides", "message"), [
    (["reward.judge.base_uri=/m"], "trains a LoRA adapter; set its lora_rank"),
    (["reward.judge.base_uri=/m", "reward.judge.lora_rank=8"], "set reward.vision_warmup_steps to 0"),
])
def test_a_pretrained_judge_without_an_adapter_or_with_a_vision_warm_up_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", overrides)
