"""The playground page as a file: self-contained, labelled, phone-ready. No browser needed (the
behaviour in a real browser is tested in tests/test_playground.py)."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parent.parent / "service" / "static" / "index.html"
FORM_CONTROLS = {"input", "textarea", "select"}


class PageOutline(HTMLParser):
    """Collects what the checks below need: tags with their attributes, label targets, and any
    reference to a resource the browser would fetch."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.label_targets: set[str] = set()
        self.fetched_urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {name: value or "" for name, value in attrs}
        self.elements.append((tag, attributes))
        if tag == "label" and "for" in attributes:
            self.label_targets.add(attributes["for"])
        for name in ("src", "href"):
            if name in attributes and tag in {"script", "link", "img", "iframe", "source", "audio", "video"}:
                self.fetched_urls.append(attributes[name])


@pytest.fixture(scope="module")
def page_text() -> str:
    return PAGE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def outline(page_text: str) -> PageOutline:
    parser = PageOutline()
    parser.feed(page_text)
    return parser


def test_page_fetches_nothing_from_elsewhere(outline: PageOutline, page_text: str) -> None:
    # Only inline data: URLs; scripts and styles are inline, so the page works offline and needs no build.
    assert all(url.startswith("data:") for url in outline.fetched_urls), outline.fetched_urls
    assert not re.search(r"""@import|url\(\s*['"]?(https?:)?//""", page_text)
    assert not any(tag == "script" and "src" in attributes for tag, attributes in outline.elements)


def test_page_is_laid_out_for_phones(outline: PageOutline, page_text: str) -> None:
    viewports = [attributes.get("content") for tag, attributes in outline.elements
                 if tag == "meta" and attributes.get("name") == "viewport"]
    assert viewports == ["width=device-width, initial-scale=1"]
    assert re.search(r"@media\s*\(max-width:", page_text), "no narrow-screen layout rule"


def test_every_form_control_has_a_label(outline: PageOutline) -> None:
    controls = [attributes for tag, attributes in outline.elements if tag in FORM_CONTROLS]
    assert len(controls) >= 8  # prompt, 5 sampling settings, stop strings, API key
    unlabelled = [a.get("id") for a in controls
                  if a.get("id") not in outline.label_targets and not a.get("aria-label")]
    assert unlabelled == []


def test_page_has_the_controls_the_playground_promises(outline: PageOutline) -> None:
    ids = {attributes.get("id") for _, attributes in outline.elements}
    expected = {"prompt", "max-new-tokens", "temperature", "top-k", "top-p", "seed", "stop-strings",
                "api-key", "generate", "score", "stop", "output", "model-card", "stat-ttfc", "stat-rate",
                "stat-bpc"}
    assert expected <= ids, expected - ids
