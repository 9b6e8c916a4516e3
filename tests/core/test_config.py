from pathlib import Path

import pytest

from pipeline_lib.core.config import ConfigError, PipelineConfig, flatten_config
from pipeline_lib.core.config_loader import build_config, load_config, merge_mappings

REPO = Path(__file__).resolve().parents[2]


def test_bad_label_is_named():
    with pytest.raises(ConfigError, match=r"sources\.folders\.0\.label"):
        build_config({"sources": {"folders": [{"path": "x", "label": "fake"}]}})


def test_threshold_bound_names_the_key():
    with pytest.raises(ConfigError, match=r"dedup.threshold must be 0..64"):
        build_config({}, ["dedup.threshold=80"])


def test_split_ratios_must_sum_to_one():
    with pytest.raises(ConfigError, match="must be 1.0"):
        build_config({"split": {"train": 0.8, "val": 0.1, "test": 0.2}})


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


def test_reference_config_is_the_published_method():
    reference = load_config(REPO / "configs" / "reference.yaml")
    search = reference.sources.search[0]
    assert (search.engine, search.max_num) == ("google", 10)
    assert search.filters == {"type": "photo", "color": "color", "size": ">4mp"}  # icrawler's Google vocabulary
    assert search.keywords_file == REPO / "configs" / "keywords.txt"
    folder = reference.sources.folders[0]
    assert folder.path == REPO / "configs" / "midjourney" and folder.path.is_dir() and folder.generator == "midjourney"
    train = reference.train
    assert (train.model, train.weights, train.batch_size, train.head_only_epochs) == ("resnet50", "imagenet", 64, 5)
    assert train.backbone_lr is None and train.momentum == 0.9 and train.patience == 5
    assert round(reference.split.test * 900) == 200
    assert reference.report.cam_target == "predicted"


def _leaf_lines(node, prefix: str = "") -> dict[str, int]:
    """'a.b.0.c' -> line (0-based) of every leaf of a composed YAML node."""
    import yaml

    if isinstance(node, yaml.MappingNode):
        found = {}
        for key, value in node.value:
            name = f"{prefix}.{key.value}" if prefix else key.value
            found |= _leaf_lines(value, name) if not isinstance(value, yaml.ScalarNode) else {name: key.start_mark.line}
        return found
    if isinstance(node, yaml.SequenceNode):
        return {k: v for i, item in enumerate(node.value) for k, v in _leaf_lines(item, f"{prefix}.{i}").items()}
    return {prefix: node.start_mark.line}


def _flat(value, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict):
        named = {(f"{prefix}.{key}" if prefix else key): child for key, child in value.items()}
        return {k: v for name, child in named.items() for k, v in _flat(child, name).items()}
    if isinstance(value, list):
        return {k: v for i, child in enumerate(value) for k, v in _flat(child, f"{prefix}.{i}").items()}
    return {prefix: value}


def test_reference_config_comments_every_line_where_default_differs():
    import yaml

    from pipeline_lib.core.config_loader import read_yaml_mapping

    text = (REPO / "configs" / "reference.yaml").read_text(encoding="utf-8")
    lines = text.splitlines()
    where = _leaf_lines(yaml.compose(text))
    reference = _flat(build_config(read_yaml_mapping(REPO / "configs" / "reference.yaml")).model_dump(mode="json"))
    default = _flat(build_config(read_yaml_mapping(REPO / "configs" / "default.yaml")).model_dump(mode="json"))
    differing = sorted(key for key in reference.keys() | default.keys() if reference.get(key) != default.get(key))
    assert "sources.search.0.engine" in differing and "train.backbone_lr" in differing
    for key in differing:
        assert key in where, f"{key} differs from default.yaml but is not written in reference.yaml"
        line = lines[where[key]]
        assert "# " in line and "default.yaml:" in line.split("#", 1)[1], f"no 'default.yaml:' comment on {line!r}"
    commented = {number for number in where.values() if "default.yaml:" in lines[number]}
    needed = {where[key] for key in differing}
    assert commented <= needed, f"'default.yaml:' where nothing differs: {[lines[n] for n in commented - needed]}"


def test_foundation_config_is_the_clip_probe_recipe_and_comments_what_differs_from_default():
    import yaml

    from pipeline_lib.core.config_loader import read_yaml_mapping
    from tests.network_guard import no_remote_connections

    path = REPO / "configs" / "foundation.yaml"
    with no_remote_connections() as attempts:  # validation alone: nothing is downloaded
        foundation = load_config(path)
    assert not attempts, attempts
    train = foundation.train
    assert (train.model, train.resolved_mode, train.weights) == ("clip_vit_l14", "probe", "pretrained")
    assert train.image_size == 224, "CLIP ViT-L/14 takes 224 x 224 only"
    assert train.probe.head == "linear" and foundation.tracking.registered_model == "aidetect"
    text = path.read_text(encoding="utf-8")
    for cited in ("99.9%", "54.9%", "Ojha et al.", "CVPR 2023", "Brought a Gun to a Knife Fight", "2025"):
        assert cited in text, f"foundation.yaml must cite {cited}"
    lines, where = text.splitlines(), _leaf_lines(yaml.compose(text))
    mine = _flat(build_config(read_yaml_mapping(path)).model_dump(mode="json"))
    default = _flat(build_config(read_yaml_mapping(REPO / "configs" / "default.yaml")).model_dump(mode="json"))
    differing = sorted(key for key in mine.keys() | default.keys() if mine.get(key) != default.get(key))
    assert {"train.model", "train.mode", "train.weights"} <= set(differing), differing
    for key in differing:
        assert key in where, f"{key} differs from default.yaml but is not written in foundation.yaml"
        line = lines[where[key]]
        assert "# " in line and "default.yaml:" in line.split("#", 1)[1], f"no 'default.yaml:' comment on {line!r}"
