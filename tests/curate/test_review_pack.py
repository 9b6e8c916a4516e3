"""Tests for pipeline_lib.curate.review_pack: thumbnails, hints and the review pack page."""

import re

from pipeline_lib.core.catalog import new_rows
from pipeline_lib.curate.review_pack import faces_path, review_hints, write_review_pack
from tests.conftest import make_image
from tests.curate.test_review import _catalog


def test_review_pack_escapes_crawled_text(workspace):
    index = write_review_pack(workspace, _catalog(workspace))
    page = index.read_text()
    assert "<script>x</script>" not in page and "&lt;script&gt;" in page
    assert "\"'><b>" not in page
    assert (index.parent / "thumbs" / ("s0".ljust(64, "0") + ".jpg")).is_file()


def _cluster_catalog(workspace, groups=("people", "people")):
    keeper, other = "k".ljust(64, "0"), "d".ljust(64, "0")
    rows = []
    # The duplicate comes first in the catalog: the pack must still show the keeper first.
    for i, (sha, status, group) in enumerate([(other, "duplicate_of:" + keeper, groups[1]), (keeper, "ok", groups[0])]):
        path = make_image(workspace.store / sha[:2] / f"{sha}.jpg", seed=i)
        rows.append(
            {
                "sha256": sha,
                "path": workspace.relative(path),
                "label": "real",
                "group": group,
                "url": "http://e.x/a",
                "status": status,
                "width": 48,
                "height": 40,
                "cluster": keeper,
            }
        )
    alone = "a".ljust(64, "0")
    path = make_image(workspace.store / "aa" / f"{alone}.jpg", seed=9)
    rows.append(
        {
            "sha256": alone,
            "path": workspace.relative(path),
            "label": "ai",
            "group": "g2",
            "url": "u",
            "status": "ok",
            "width": 48,
            "height": 40,
            "cluster": "",
        }
    )
    return new_rows(rows), keeper, other


def _cluster_blocks(page):
    return re.findall(r"<div class='cluster[^']*'.*?</div>", page, flags=re.S)


def test_review_pack_shows_each_cluster_keeper_first(workspace):
    catalog, keeper, other = _cluster_catalog(workspace)
    page = write_review_pack(workspace, catalog).read_text()
    blocks = _cluster_blocks(page)
    assert len(blocks) == 1
    thumbs = re.findall(r"thumbs/([0-9a-z]+)\.jpg", blocks[0])
    assert thumbs == [keeper, other], "keeper first, then the duplicate"
    figures = blocks[0].split("<figure")[1:]
    assert "keeper" in figures[0] and "keeper" not in figures[1].split("duplicate_of:")[0]
    assert "duplicate_of:" + keeper in figures[1]
    assert "cross-group" not in blocks[0]
    assert ("a".ljust(64, "0") + ".jpg") not in blocks[0]
    for sha in (keeper, other):
        assert (workspace.review / "pack" / "thumbs" / f"{sha}.jpg").is_file()


def test_review_pack_flags_cross_group_clusters_and_escapes_group_names(workspace):
    catalog, keeper, other = _cluster_catalog(workspace, groups=("<script>alert(1)</script>", "people"))
    page = write_review_pack(workspace, catalog).read_text()
    (block,) = _cluster_blocks(page)
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in block
    assert "cross-group" in block and "people" in block


def test_hints_flag_tiny_images_cross_group_duplicates_and_faces(workspace):
    from pipeline_lib.curate import faces

    catalog, keeper, other = _cluster_catalog(workspace, groups=("anna", "bob"))
    catalog.loc[catalog["sha256"] == keeper, "status"] = "pending_review"
    hints = review_hints(workspace, catalog, catalog[catalog["status"] == "pending_review"], tiny_side=64)
    texts = {sha: [h.text for h in hs if h.flagged] for sha, hs in hints.items()}
    assert "tiny: 48×40" in texts[keeper] and "cross-group duplicate: anna, bob" in texts[other]
    face = hints[keeper][0]
    if faces.available():
        assert face.text == "no face found" and face.flagged, "random noise has no face"
        assert keeper in faces_path(workspace).read_text(), "face counts are remembered"
    else:
        assert face.text == "face count unavailable"
    page = write_review_pack(workspace, catalog, tiny_side=64).read_text()
    assert "tiny: 48×40" in page and "cross-group duplicate" in page
