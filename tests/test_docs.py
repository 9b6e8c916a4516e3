"""The README stays short, and every relative link of README.md and docs/*.md reaches a file and heading that exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 250
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _prose_lines(path: Path) -> list[str]:
    """The lines of a Markdown file outside fenced code blocks."""
    lines, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    """Every anchor the headings of a Markdown file give (a repeated slug gets -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    anchors = set()
    for line in _prose_lines(path):
        match = HEADING.match(line)
        if match:
            slug = _slug(match.group(1))
            anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def _broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """The relative links of a page whose file or heading does not exist, as 'page: target (why)'."""
    broken = []
    for line in _prose_lines(page):
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
                continue
            file_part, _, anchor = target.partition("#")
            linked = (page.parent / file_part).resolve() if file_part else page
            name = f"{page.relative_to(root)}: {target}"
            if not linked.exists():
                broken.append(f"{name} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                broken.append(f"{name} (no heading gives #{anchor})")
    return broken


def test_readme_is_short() -> None:
    lines = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert lines < README_MAX_LINES, f"README.md has {lines} lines; move details to docs/ (limit {README_MAX_LINES})"


def test_relative_links_resolve() -> None:
    broken = [item for page in _pages() for item in _broken_links(page)]
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_every_docs_page_is_linked_from_the_readme() -> None:
    linked = {Path(target.partition("#")[0]).name for target in LINK.findall((ROOT / "README.md").read_text())}
    missing = [page.name for page in sorted((ROOT / "docs").glob("*.md")) if page.name not in linked]
    assert not missing, f"docs pages the README does not link: {missing}"


def test_slug_follows_github() -> None:
    assert _slug("Real use: deploy/team.yaml") == "real-use-deployteamyaml"
    assert _slug("Install (`make setup`)") == "install-make-setup"
    assert _slug("Results you can trust: the checks") == "results-you-can-trust-the-checks"


def test_broken_links_are_found(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "a.md"
    page.write_text(
        "# A b\n[x](b.md) [y](#a-b) [z](#nope) [w](a.md#a-b) [u](https://e.org/x.md)\n```\n[q](q.md)\n```\n"
    )
    expected = ["docs/a.md: b.md (no such file)", "docs/a.md: #nope (no heading gives #nope)"]
    assert _broken_links(page, tmp_path) == expected
