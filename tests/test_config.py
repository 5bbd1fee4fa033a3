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
