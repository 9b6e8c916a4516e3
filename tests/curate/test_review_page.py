"""The review page's HTML (pipeline_lib.curate.review_page), as the app serves it."""

from __future__ import annotations

from fastapi.testclient import TestClient

from pipeline_lib.curate.review_server import create_app
from tests.curate.test_review_server import _catalog


def test_crawled_text_is_escaped(workspace):
    page = TestClient(create_app(workspace, _catalog(workspace))).get("/").text
    assert "<script>alert" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&quot;&#x27;" in page
    assert "href='javascript:" not in page, "crawled javascript: URLs never become links"
    assert page.count("<script>") == 1, "only the page's own script"
