import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline_lib.core.catalog import new_rows
from pipeline_lib.curate.split import (
    SplitError,
    assign_splits,
    check_no_leak,
    class_ratios,
    describe_ratios,
    label_shortfalls,
    leave_generator_out,
    left_out_images,
    shortfall_message,
    split_report,
    split_units,
    training_set,
)

RATIOS = {"train": 0.6, "val": 0.2, "test": 0.2}


def _catalog(groups: list[tuple[str, str, int]], clusters: dict[str, str] | None = None) -> pd.DataFrame:
    """groups: (group, label, n_images); clusters: sha -> cluster id."""
    rows = []
    for group, label, n in groups:
        for i in range(n):
            sha = f"{group}-{i}"
            rows.append({"sha256": sha, "label": label, "group": group, "status": "ok",
                         "cluster": (clusters or {}).get(sha, "")})
    return new_rows(rows)


def test_groups_sharing_a_cluster_are_one_unit():
    catalog = _catalog([("a", "real", 2), ("b", "real", 2), ("c", "real", 1)], {"a-0": "k", "b-1": "k"})
    units = split_units(catalog)
    assert units["a"] == units["b"] != units["c"]


def test_ratios_roughly_met_and_every_split_has_both_labels():
    groups = [(f"r{i}", "real", 3) for i in range(10)] + [(f"a{i}", "ai", 3) for i in range(10)]
    plan = assign_splits(_catalog(groups), RATIOS, seed=0)
    table, warnings = split_report(plan.catalog, RATIOS, min_groups=1)
    assert not warnings, warnings
    for row in table.itertuples():
        assert abs(row.share - RATIOS[row.split]) <= 0.15, f"{row.split}/{row.label} share {row.share}"


def test_too_few_groups_warns():
    plan = assign_splits(_catalog([("r0", "real", 3), ("a0", "ai", 3)]), RATIOS, seed=0)
    _, warnings = split_report(plan.catalog, RATIOS, min_groups=2)
    assert any("split test" in w for w in warnings)


def test_a_missing_label_is_warned_about_and_named_with_how_to_add_images(tmp_path):
    plan = assign_splits(_catalog([(f"r{i}", "real", 2) for i in range(6)]), RATIOS, seed=0)
    table, warnings = split_report(plan.catalog, RATIOS, min_groups=2)
    assert "label ai has no usable image: a detector cannot be trained without it" in warnings, warnings
    assert "split train has 0 group(s) of label ai (minimum 2)" in warnings, warnings
    rows = table.to_dict("records")
    shortfalls = label_shortfalls(rows, RATIOS, min_groups=1)
    assert [(s.label, dict(s.groups)) for s in shortfalls] == [("ai", {"train": 0, "val": 0, "test": 0})]
    message = shortfall_message(shortfalls, {"ai": [tmp_path / "ai_images"]}, tmp_path / "ws")
    assert f"put ai images into {tmp_path / 'ai_images'}" in message
    assert f"`aidetect import FOLDER --label ai --workspace {tmp_path / 'ws'}`" in message
    assert message.endswith("Nothing was trained or registered."), message


def test_label_shortfalls_count_only_splits_with_a_ratio():
    rows = [
        {"split": "train", "label": "real", "groups": 3},
        {"split": "test", "label": "real", "groups": 1},
        {"split": "train", "label": "ai", "groups": 2},
        {"split": "test", "label": "ai", "groups": 2},
    ]
    no_val = {"train": 0.8, "val": 0.0, "test": 0.2}
    assert [s.label for s in label_shortfalls(rows, no_val, min_groups=2)] == ["real"]
    assert label_shortfalls(rows, no_val, min_groups=1) == []
    assert [s.label for s in label_shortfalls(rows, RATIOS, min_groups=1)] == ["real", "ai"], "val is empty"


def test_training_set_keeps_only_what_training_depends_on():
    groups = [(f"r{i}", "real", 2) for i in range(5)] + [(f"a{i}", "ai", 2) for i in range(5)]
    plan = assign_splits(_catalog(groups), RATIOS, 0)
    table = plan.catalog.assign(url="http://a/", fetched_at=pd.Timestamp("2024-01-01", tz="UTC"))
    moved = table.assign(url="http://b/", fetched_at=pd.Timestamp("2025-01-01", tz="UTC")).iloc[::-1]
    pd.testing.assert_frame_equal(training_set(table), training_set(moved))
    assert set(training_set(table)["split"]) == {"train", "val"}, "test images never key the training"
    assert list(training_set(table).columns) == ["sha256", "path", "label", "group", "split", "status"]


def test_leak_check_catches_a_group_in_two_splits():
    catalog = _catalog([("a", "real", 2)]).assign(split=["train", "test"])
    with pytest.raises(SplitError, match="group 'a' appears in 2 splits"):
        check_no_leak(catalog)


def test_input_not_mutated():
    catalog = _catalog([("a", "real", 2), ("b", "ai", 2)])
    before = catalog.copy()
    assign_splits(catalog, RATIOS, seed=1)
    pd.testing.assert_frame_equal(catalog, before)


group_lists = st.lists(
    st.tuples(st.sampled_from(["real", "ai"]), st.integers(min_value=1, max_value=5)), min_size=2, max_size=25
)


@settings(max_examples=60, deadline=None)
@given(groups=group_lists, seed=st.integers(0, 5), links=st.lists(st.tuples(st.integers(0, 24), st.integers(0, 24))))
def test_properties_no_leak_deterministic_sticky(groups, seed, links):
    named = [(f"g{i}", label, n) for i, (label, n) in enumerate(groups)]
    clusters = {}
    for k, (x, y) in enumerate(links):
        if x < len(named) and y < len(named):
            clusters[f"g{x}-0"] = clusters[f"g{y}-0"] = f"c{k}"
    catalog = _catalog(named, clusters)
    plan = assign_splits(catalog, RATIOS, seed)
    check_no_leak(plan.catalog)
    again = assign_splits(catalog, RATIOS, seed)
    pd.testing.assert_frame_equal(plan.catalog, again.catalog)
    # Sticky: adding groups never moves an existing group.
    grown = pd.concat([catalog, _catalog([("new1", "real", 2), ("new2", "ai", 3)])], ignore_index=True)
    later = assign_splits(grown, RATIOS, seed + 1, registry=plan.registry)
    old = plan.catalog.drop_duplicates("group").set_index("group")["split"]
    new = later.catalog.drop_duplicates("group").set_index("group")["split"]
    assert (new[old.index] == old).all(), "an existing group moved when new groups arrived"
    # Sticky: removing images never moves a group.
    shrunk = catalog.iloc[::2]
    after = assign_splits(shrunk, RATIOS, seed, registry=plan.registry)
    kept = after.catalog.drop_duplicates("group").set_index("group")["split"]
    assert (kept == old[kept.index]).all(), "a group moved when images were removed"


@settings(max_examples=60, deadline=None)
@given(groups=group_lists, seed=st.integers(0, 5))
def test_properties_ratios_within_group_size_tolerance(groups, seed):
    """Without cross-group clusters, each split's count per label is within two largest groups of its target."""
    named = [(f"g{i}", label, n) for i, (label, n) in enumerate(groups)]
    plan = assign_splits(_catalog(named), RATIOS, seed)
    assigned = plan.catalog
    for label in set(assigned["label"]):
        rows = assigned[assigned["label"] == label]
        biggest = max(n for _, lab, n in named if lab == label)
        for split, ratio in RATIOS.items():
            count = int((rows["split"] == split).sum())
            assert abs(count - ratio * len(rows)) <= 2 * biggest, (label, split, count, len(rows))


def _registry_workspace(tmp_path):
    from pipeline_lib.core.workspace import Workspace

    return Workspace.create(tmp_path / "ws")


def test_the_registry_version_a_split_uses(tmp_path):
    from pipeline_lib.core.workspace import Workspace
    from pipeline_lib.curate.split import registry_version_for, write_registry, write_registry_meta

    workspace = Workspace.create(tmp_path / "ws")
    assert registry_version_for(workspace, reshuffle=True) == 1, "nothing to reshuffle before the first split"
    plan = assign_splits(_catalog([("r0", "real", 2), ("a0", "ai", 2)]), RATIOS, seed=0)
    write_registry(workspace, plan.registry)
    write_registry_meta(workspace, 3, RATIOS, 0)
    assert registry_version_for(workspace, reshuffle=False) == 3
    assert registry_version_for(workspace, reshuffle=True) == 4


def test_changed_ratios_need_reshuffle_which_starts_a_new_version(tmp_path):
    from pipeline_lib.curate.split import prepare_registry, write_registry, write_registry_meta

    workspace = _registry_workspace(tmp_path)
    catalog = _catalog([(f"r{i}", "real", 2) for i in range(6)] + [(f"a{i}", "ai", 2) for i in range(6)])
    state = prepare_registry(workspace, RATIOS, 0, reshuffle=False)
    assert state.registry is None and state.version == 1
    plan = assign_splits(catalog, RATIOS, 0, state.registry, state.version)
    write_registry(workspace, plan.registry)
    write_registry_meta(workspace, state.version, RATIOS, 0)
    assert prepare_registry(workspace, RATIOS, 0, reshuffle=False).registry is not None
    other = {"train": 0.5, "val": 0.25, "test": 0.25}
    with pytest.raises(SplitError, match=r"split.train changed from 0.6 to 0.5.*--reshuffle"):
        prepare_registry(workspace, other, 0, reshuffle=False)
    with pytest.raises(SplitError, match="split.seed changed from 0 to 3"):
        prepare_registry(workspace, RATIOS, 3, reshuffle=False)
    fresh = prepare_registry(workspace, other, 3, reshuffle=True)
    assert fresh.registry is None and fresh.version == 2 and "version 2" in fresh.note
    assert (workspace.splits / "registry-v1.csv").is_file()
    plan2 = assign_splits(catalog, other, 3, fresh.registry, fresh.version)
    assert set(plan2.registry["registry_version"]) == {2}


def _with_generators(groups: list[tuple[str, str, int, str]], clusters: dict[str, str] | None = None) -> pd.DataFrame:
    """groups: (group, label, n_images, generator)."""
    catalog = _catalog([(g, label, n) for g, label, n, _ in groups], clusters)
    generator_of = {g: gen for g, _, _, gen in groups}
    return catalog.assign(generator=catalog["group"].map(generator_of).astype("string"))


def _generator_catalog() -> pd.DataFrame:
    groups = [(f"r{i}", "real", 2, "camera") for i in range(8)]
    groups += [(f"mj{i}", "ai", 2, "midjourney") for i in range(4)]
    groups += [(f"sd{i}", "ai", 2, "stable-diffusion") for i in range(6)]
    # A mixed group: one midjourney image inside an otherwise stable-diffusion folder.
    mixed = _with_generators([("mixed", "ai", 3, "stable-diffusion")])
    mixed.loc[0, "generator"] = "midjourney"
    # r0 shares a duplicate cluster with mj0, so they are one unit and must move together.
    return pd.concat([_with_generators(groups, {"r0-0": "k", "mj0-1": "k"}), mixed], ignore_index=True)


def test_leave_generator_out_moves_exactly_that_generators_units_to_test():
    plan = assign_splits(_generator_catalog(), RATIOS, seed=0)
    assert (plan.catalog.loc[plan.catalog["generator"] == "midjourney", "split"] != "test").any()
    before = plan.catalog.copy()
    out = leave_generator_out(plan.catalog, "midjourney")
    pd.testing.assert_frame_equal(plan.catalog, before)
    check_no_leak(out)
    assert set(out.loc[out["generator"] == "midjourney", "split"]) == {"test"}
    moving = {f"mj{i}" for i in range(4)} | {"mixed", "r0"}
    moved = out["split"] != before["split"]
    assert set(out.loc[moved, "group"]) <= moving
    assert set(out.loc[out["group"].isin(moving), "split"]) == {"test"}
    untouched = ~out["group"].isin(moving)
    assert (out.loc[untouched, "split"] == before.loc[untouched, "split"]).all()
    assert left_out_images(out, "midjourney") == 4 * 2 + 1
    assert (out.loc[out["split"] == "train", "label"] == "ai").any()


def test_leave_generator_out_ignores_unusable_rows():
    plan = assign_splits(_generator_catalog(), RATIOS, seed=0)
    catalog = plan.catalog.copy()
    catalog.loc[catalog["group"] == "mj1", ["status", "split"]] = ["invalid:truncated", ""]
    out = leave_generator_out(catalog, "midjourney")
    assert set(out.loc[out["group"] == "mj1", "split"]) == {""}
    assert left_out_images(out, "midjourney") == 3 * 2 + 1


def test_leave_generator_out_unknown_generator_names_the_known_ones():
    plan = assign_splits(_generator_catalog(), RATIOS, seed=0)
    with pytest.raises(SplitError, match=r"'dalle'.*known generators: midjourney, stable-diffusion$"):
        leave_generator_out(plan.catalog, "dalle")
    with pytest.raises(SplitError, match="'camera' matches no usable AI image"):
        leave_generator_out(plan.catalog, "camera")


def test_leave_generator_out_refuses_to_leave_no_ai_image_in_train():
    catalog = _with_generators(
        [(f"r{i}", "real", 2, "camera") for i in range(4)] + [(f"mj{i}", "ai", 2, "midjourney") for i in range(4)]
    )
    plan = assign_splits(catalog, RATIOS, seed=0)
    with pytest.raises(SplitError, match="leaves no AI image in train"):
        leave_generator_out(plan.catalog, "midjourney")


@settings(max_examples=40, deadline=None)
@given(
    groups=st.lists(
        st.tuples(st.sampled_from(["camera", "mj", "sd", "dalle"]), st.integers(1, 4)), min_size=4, max_size=20
    ),
    seed=st.integers(0, 5),
    links=st.lists(st.tuples(st.integers(0, 19), st.integers(0, 19)), max_size=6),
)
def test_properties_leave_generator_out(groups, seed, links):
    named = [(f"g{i}", "real" if gen == "camera" else "ai", n, gen) for i, (gen, n) in enumerate(groups)]
    named += [("anchor", "ai", 2, "sd")]
    clusters = {}
    for k, (x, y) in enumerate(links):
        if x < len(groups) and y < len(groups):
            clusters[f"g{x}-0"] = clusters[f"g{y}-0"] = f"c{k}"
    plan = assign_splits(_with_generators(named, clusters), RATIOS, seed)
    for generator in ("mj", "dalle"):
        if not ((plan.catalog["generator"] == generator) & (plan.catalog["split"] != "")).any():
            continue
        try:
            out = leave_generator_out(plan.catalog, generator)
        except SplitError as error:
            assert "leaves no AI image in train" in str(error)
            continue
        check_no_leak(out)
        assert set(out.loc[out["generator"] == generator, "split"]) == {"test"}
        moved = out["split"] != plan.catalog["split"]
        assert set(out.loc[moved, "split"]) <= {"test"}
        assert left_out_images(out, generator) == int((out["generator"] == generator).sum())


def test_report_shows_the_class_ratio_of_each_split():
    groups = [(f"r{i}", "real", 4) for i in range(10)] + [(f"a{i}", "ai", 1) for i in range(10)]
    plan = assign_splits(_catalog(groups), RATIOS, seed=0)
    table, _ = split_report(plan.catalog, RATIOS, min_groups=1)
    train = table[table["split"] == "train"].set_index("label")
    assert train["split_share"].to_dict() == pytest.approx({"real": 0.8, "ai": 0.2})
    ratios = class_ratios(table).set_index("split")
    assert list(ratios.index) == ["train", "val", "test"]
    assert (ratios["real_per_ai"] == 4.0).all(), ratios
    assert describe_ratios(class_ratios(table)).startswith("class ratio real:ai per split: train 24:6 (4.00:1)")
    only_real = class_ratios(table[table["label"] == "real"])
    assert (only_real["ai"] == 0).all() and (only_real["real_per_ai"] == float("inf")).all()
