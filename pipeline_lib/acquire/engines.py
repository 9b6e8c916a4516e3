"""Search engines through icrawler: Bing, Google, Baidu and Flickr feeders and parsers, each engine's settings
(endpoint, filters, api key) checked, and the feeder and parser arguments of one keyword.

A new engine is its name in core/config.py (SearchSource.engine), a feeder/parser pair in ENGINES, its checks in
check_search_source and its arguments in search_kwargs. Parsers never crash a worker: a page that fails or cannot
be read becomes a note on the keyword.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import quote, urlsplit

import requests
from icrawler.builtin.baidu import BaiduFeeder, BaiduParser
from icrawler.builtin.bing import BingFeeder, BingParser
from icrawler.builtin.flickr import FlickrFeeder, FlickrParser
from icrawler.builtin.google import GoogleFeeder, GoogleParser

from pipeline_lib.acquire.safety import UnsafeUrlError
from pipeline_lib.core.config import SearchSource

log = logging.getLogger(__name__)

BING_ENDPOINT = "https://www.bing.com/images/async?q={keyword}&first={offset}"
BING_PAGE_STEP = 20
GOOGLE_PAGE_STEP = 100
BAIDU_ENDPOINT = "http://image.baidu.com/search/acjson?tn=resultjson_com&ipn=rj&word={keyword}&pn={offset}&rn=30"
BAIDU_PAGE_STEP = 30
FLICKR_API = "https://api.flickr.com/services/rest/"  # what icrawler's FlickrFeeder and FlickrParser call
# The search parameters icrawler's FlickrFeeder passes on to flickr.photos.search (it ignores any other key).
FLICKR_SEARCH_PARAMS = frozenset(
    {
        "user_id", "tags", "tag_mode", "text", "license", "sort", "privacy_filter", "accuracy", "safe_search",
        "content_type", "machine_tags", "machine_tag_mode", "group_id", "contacts", "woe_id", "place_id", "has_geo",
        "geo_context", "lat", "lon", "radius", "radius_units", "is_commons", "in_gallery", "is_getty", "extras",
        "per_page", "page", "color_codes", "styles", "orientation", "min_upload_date", "max_upload_date",
        "min_taken_date", "max_taken_date",
    }
)  # fmt: skip
FLICKR_SIZES = ["original", "large 2048", "large 1600", "large", "medium 800", "medium 640", "medium"]


class _PageSession:
    """Wraps the crawler's session for parsers: page failures become notes; URLs under rewrite[0] are sent to
    rewrite[1] instead (an API mirror, e.g. a loopback Flickr for tests)."""

    def __init__(self, session: requests.Session, notes: list[str], rewrite: tuple[str, str] | None = None) -> None:
        self._session, self._notes, self._rewrite = session, notes, rewrite

    def get(self, url: str, **kwargs: Any) -> requests.Response:
        if self._rewrite is not None and url.startswith(self._rewrite[0]):
            url = self._rewrite[1] + url[len(self._rewrite[0]) :]
        try:
            return self._session.get(url, **kwargs)  # through the PinnedAdapter: checked and pinned, every hop
        except UnsafeUrlError as error:
            self._notes.append(f"search page refused: {error}")
            raise
        except Exception as error:
            self._notes.append(f"search page failed ({urlsplit(url).netloc}): {type(error).__name__}")
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


class _GuardedParse:
    """Parser mixin: a parse that returns None or raises yields no tasks (and a note) instead of killing a worker."""

    def __init__(
        self,
        thread_num: int,
        signal: Any,
        session: Any,
        notes: list[str] | None = None,
        rewrite: tuple[str, str] | None = None,
    ) -> None:
        super().__init__(thread_num, signal, session)  # type: ignore[call-arg]
        self.notes: list[str] = notes if notes is not None else []
        self.session = _PageSession(session, self.notes, rewrite)

    def parse(self, response: requests.Response, **kwargs: Any) -> list[dict[str, Any]]:
        if response.status_code != 200:
            self.notes.append(f"search page http {response.status_code}")
            return []
        try:
            tasks = super().parse(response, **kwargs)  # type: ignore[misc]
            if tasks is None:  # e.g. GoogleParser when no <script> holds image URLs (changed markup)
                log.warning("search page %s holds nothing %s can read", response.url, type(self).__name__)
                self.notes.append(f"search page unparsable: no image URLs found by {_engine_name(self)} parser")
                return []
            return list(tasks)
        except Exception as error:  # engines change their HTML; never crash the worker
            log.warning("could not parse search page %s: %s", response.url, error)
            self.notes.append(f"search page unparsable: {type(error).__name__}")
            return []


def _engine_name(parser: object) -> str:
    """'google' for _GoogleParser, etc."""
    return type(parser).__name__.strip("_").removesuffix("Parser").lower()


class _BingParser(_GuardedParse, BingParser):
    pass


class _GoogleParser(_GuardedParse, GoogleParser):
    pass


class _BaiduParser(_GuardedParse, BaiduParser):
    pass


class _FlickrParser(_GuardedParse, FlickrParser):
    pass


class EndpointBingFeeder(BingFeeder):
    """BingFeeder that formats a configurable endpoint (keyword URL-quoted) instead of the hard-coded bing.com."""

    def feed(
        self,
        keyword: str,
        offset: int,
        max_num: int,
        filters: dict[str, str] | None = None,
        endpoint: str = BING_ENDPOINT,
    ) -> None:
        filter_str = self.get_filter().apply(filters)
        suffix = "&qft=" + filter_str if filter_str else ""
        for first in range(offset, offset + max_num, BING_PAGE_STEP):
            self.out_queue.put(endpoint.format(keyword=quote(keyword, safe=""), offset=first) + suffix)


class EndpointGoogleFeeder(GoogleFeeder):
    """GoogleFeeder that, given an endpoint, formats it (keyword URL-quoted, filters as &tbs=) instead of google.com."""

    def feed(
        self,
        keyword: str,
        offset: int,
        max_num: int,
        language: str | None = None,
        filters: dict[str, str] | None = None,
        endpoint: str | None = None,
    ) -> None:
        if endpoint is None:  # the real site, with icrawler's own parameters and filters
            super().feed(keyword, offset, max_num, language=language, filters=filters)
            return
        filter_str = self.get_filter().apply(filters, sep=",")
        suffix = "&tbs=" + quote(filter_str, safe=":,") if filter_str else ""
        for start in range(offset, offset + max_num, GOOGLE_PAGE_STEP):
            self.out_queue.put(endpoint.format(keyword=quote(keyword, safe=""), offset=start) + suffix)


class EndpointBaiduFeeder(BaiduFeeder):
    """BaiduFeeder that formats a configurable endpoint (keyword URL-quoted) with Baidu's filters appended."""

    def feed(
        self, keyword: str, offset: int, max_num: int, filters: dict[str, str] | None = None, endpoint: str = ""
    ) -> None:
        filter_str = self.get_filter().apply(filters, sep="&")
        suffix = "&" + filter_str if filter_str else ""
        template = endpoint or BAIDU_ENDPOINT
        for start in range(offset, offset + max_num, BAIDU_PAGE_STEP):
            self.out_queue.put(template.format(keyword=quote(keyword, safe=""), offset=start) + suffix)


ENGINES: dict[str, tuple[type, type]] = {
    "bing": (EndpointBingFeeder, _BingParser),
    "google": (EndpointGoogleFeeder, _GoogleParser),
    "baidu": (EndpointBaiduFeeder, _BaiduParser),
    "flickr": (FlickrFeeder, _FlickrParser),
}
TEMPLATE_ENGINES: tuple[str, ...] = ("bing", "google", "baidu")  # endpoint: a search-page URL template
ENDPOINT_ENGINES: tuple[str, ...] = (*TEMPLATE_ENGINES, "flickr")  # flickr's endpoint: its REST API URL


def _check_endpoint(engine: str, endpoint: str, where: str) -> None:
    """A search-page template with {keyword} and {offset} (bing, google, baidu) or an http(s) API URL (flickr)."""
    if engine == "flickr":
        if urlsplit(endpoint).scheme not in ("http", "https") or "{" in endpoint:
            raise ValueError(f"{where} for flickr must be the http(s) URL of its REST API, got {endpoint!r}")
        return
    try:
        probe = endpoint.format(keyword="k", offset=0)
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(f"{where} must use only {{keyword}} and {{offset}}: {error!r}") from None
    if "{keyword}" not in endpoint or "{offset}" not in endpoint:
        raise ValueError(f"{where} must contain {{keyword}} and {{offset}}, got {endpoint!r}")
    if urlsplit(probe).scheme not in ("http", "https"):
        raise ValueError(f"{where} must be an http(s) URL, got {endpoint!r}")


def _filter_error(engine: str, filters: dict[str, str]) -> str:
    """Why the engine refuses these filters ("" when it takes them all): icrawler's vocabulary per engine."""
    if engine == "flickr":
        unknown = sorted(set(filters) - FLICKR_SEARCH_PARAMS)
        return f"unsupported flickr search parameter(s) {', '.join(unknown)}" if unknown else ""
    try:
        ENGINES[engine][0].get_filter(None).apply(filters or None)
    except (KeyError, ValueError, TypeError, AssertionError) as error:
        return str(error) or f"{type(error).__name__} for {filters}"
    return ""


def portable_filters(filters: dict[str, str], engine: str) -> tuple[dict[str, str], dict[str, str]]:
    """(the filters engine supports, the ones it does not): each filter is tried alone in engine's vocabulary."""
    kept = {name: value for name, value in filters.items() if not _filter_error(engine, {name: value})}
    return kept, {name: value for name, value in filters.items() if name not in kept}


def check_search_source(source: SearchSource, index: int) -> None:
    """Engine-specific settings: endpoint form per engine, api_key for flickr, filters the engine knows."""
    where = f"sources.search[{index}]"
    if source.endpoint is not None:
        _check_endpoint(source.engine, source.endpoint, f"{where}.endpoint")
    if source.fallback_endpoint is not None and source.fallback_engine is not None:
        _check_endpoint(source.fallback_engine, source.fallback_endpoint, f"{where}.fallback_endpoint")
    if source.engine == "flickr" and not source.api_key:
        raise ValueError(f"{where}.api_key is required for engine flickr")
    error = _filter_error(source.engine, dict(source.filters))
    if error:
        raise ValueError(f"{where}.filters: {error}")


def search_kwargs(source: SearchSource, keyword: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """feeder and parser kwargs of one keyword for the source's engine."""
    filters = dict(source.filters) or None
    if source.engine == "bing":
        feeder = {"keyword": keyword, "offset": 0, "max_num": source.max_num, "filters": filters}
        return feeder | {"endpoint": source.endpoint or BING_ENDPOINT}, {}
    if source.engine == "google":
        feeder = {"keyword": keyword, "offset": 0, "max_num": source.max_num, "language": None, "filters": filters}
        return feeder | {"endpoint": source.endpoint}, {}
    if source.engine == "baidu":
        feeder = {"keyword": keyword, "offset": 0, "max_num": source.max_num, "filters": filters}
        return feeder | {"endpoint": source.endpoint or BAIDU_ENDPOINT}, {}
    feeder = {"apikey": source.api_key, "max_num": source.max_num, "text": keyword, **source.filters}
    return feeder, {"apikey": source.api_key, "size_preference": FLICKR_SIZES}
