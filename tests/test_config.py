from pathlib import Path

import pytest

from pipeline_lib.config import ConfigError, PipelineConfig, build_config, flatten_config, load_config, merge_mappings

REPO = Path(__file__).resolve().parents[1]


def test_shipped_configs_load():
    default = load_config(REPO / "configs" / "default.yaml")
    assert default.train.model == "resnet50" and default.train.head_only_epochs == 5
    assert default.sources.search[0].keywords_file == REPO / "configs" / "keywords.txt", "paths resolve from the file"
    demo = load_config(REPO / "configs" / "demo.yaml")
    assert demo.train.model == "resnet18" and demo.train.weights == "none"


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"train\.epchs: unknown key"):
        build_config({"train": {"epchs": 3}})


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        build_config({"train": {"batch_size": "many"}})


def test_bad_label_is_named():
    with pytest.raises(ConfigError, match=r"sources\.folders\.0\.label"):
        build_config({"sources": {"folders": [{"path": "x", "label": "fake"}]}})


def test_threshold_bound_names_the_key():
    with pytest.raises(ConfigError, match=r"dedup.threshold must be 0..64"):
        build_config({}, ["dedup.threshold=80"])


def test_split_ratios_must_sum_to_one():
    with pytest.raises(ConfigError, match="must be 1.0"):
        build_config({"split": {"train": 0.8, "val": 0.1, "test": 0.2}})


def test_overrides_parse_yaml_values():
    config = build_config({}, ["train.epochs=3", "train.lr=0.5", "review.mode=off"])
    assert (config.train.epochs, config.train.lr, config.review.mode) == (3, 0.5, "off")


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="section.key=value"):
        build_config({}, ["train.epochs"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)


def test_flatten_and_merge_do_not_mutate():
    base = {"train": {"epochs": 1, "lr": 0.1}}
    merged = merge_mappings(base, {"train": {"epochs": 2}})
    assert merged == {"train": {"epochs": 2, "lr": 0.1}} and base["train"]["epochs"] == 1
    flat = flatten_config(PipelineConfig())
    assert flat["train.model"] == "resnet50" and "dedup.threshold" in flat


def test_train_schedule_and_augment_defaults_keep_the_recipe():
    train = PipelineConfig().train
    assert (train.schedule, train.step_size, train.gamma, train.label_smoothing, train.compile) == (
        "none",
        10,
        0.1,
        0.0,
        False,
    )
    augment = train.augment
    assert (augment.blur_p, augment.jpeg_p, augment.jpeg_quality_min, augment.jpeg_quality_max) == (0.0, 0.0, 60, 95)
    config = build_config({}, ["train.schedule=cosine", "train.label_smoothing=0.1", "train.augment.jpeg_p=0.5"])
    assert (config.train.schedule, config.train.label_smoothing, config.train.augment.jpeg_p) == ("cosine", 0.1, 0.5)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.schedule=linear", r"train\.schedule"),
        ("train.label_smoothing=0.6", r"train\.label_smoothing"),
        ("train.step_size=0", r"train\.step_size"),
        ("train.augment.blur_p=1.5", r"train\.augment\.blur_p"),
        ("train.augment.jpeg_quality_max=101", r"train\.augment\.jpeg_quality_max"),
    ],
)
def test_train_option_bounds_are_named(override, key):
    with pytest.raises(ConfigError, match=key):
        build_config({}, [override])


def test_jpeg_quality_range_must_be_ordered():
    with pytest.raises(ConfigError, match=r"jpeg_quality_min \(90\) must be <= jpeg_quality_max \(80\)"):
        build_config({}, ["train.augment.jpeg_quality_min=90", "train.augment.jpeg_quality_max=80"])
