"""Main-content text of a Sphinx HTML page, the way web extraction yields it for RefinedWeb.

RefinedWeb documents are the readable text of a page without navigation or
markup, one line per paragraph.  Sphinx themes put the readable part of a page
in one element (``<div role="main">`` in the default theme); everything outside
it (menus, sidebars, footers) and the "¶" permalink anchors are dropped.  Code blocks keep their line breaks;
elsewhere whitespace is collapsed as a browser would.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

_BLOCK_TAGS = frozenset(
    "address article aside blockquote br caption dd div dl dt figcaption figure footer h1 h2 h3 h4 h5 h6 "
    "header hr li main nav ol p pre section table tbody td th thead tr ul".split()
)
_SKIPPED_TAGS = frozenset({"script", "style", "template", "button"})
_VOID_TAGS = frozenset({"br", "hr", "img", "input", "meta", "link", "wbr", "source", "col", "area", "base", "embed"})


def extract_main_text(html: str, main: tuple[str, str] = ("role", "main")) -> str:
    """Readable text of the first element whose attribute ``main[0]`` equals ``main[1]`` ('' if none)."""
    parser = _MainTextParser(main)
    parser.feed(html)
    parser.close()
    return parser.text()


class _MainTextParser(HTMLParser):
    def __init__(self, main: tuple[str, str]) -> None:
        super().__init__(convert_charrefs=True)
        self._main_attr, self._main_value = main
        self._depth = 0  # open elements inside the main element (0: outside)
        self._skip_depth = 0  # >0 while inside an element whose text is dropped
        self._pre_depth = 0
        self._lines: list[str] = []
        self._current: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if self._depth == 0:
            if attributes.get(self._main_attr) == self._main_value and tag not in _VOID_TAGS:
                self._depth = 1
            return
        if tag in _VOID_TAGS:
            if tag in ("br", "hr"):
                self._break()
            return
        self._depth += 1
        if self._skip_depth or tag in _SKIPPED_TAGS or "headerlink" in (attributes.get("class") or "").split():
            self._skip_depth += 1
            return
        if tag == "pre":
            self._pre_depth += 1
        if tag in _BLOCK_TAGS:
            self._break()

    def handle_endtag(self, tag: str) -> None:
        if self._depth == 0 or tag in _VOID_TAGS:
            return
        self._depth -= 1
        if self._skip_depth:
            self._skip_depth -= 1
            return
        if tag == "pre":
            self._pre_depth -= 1
        if tag in _BLOCK_TAGS:
            self._break()

    def handle_data(self, data: str) -> None:
        if self._depth == 0 or self._skip_depth:
            return
        if self._pre_depth:
            lines = data.split("\n")
            self._current.append(lines[0])
            for line in lines[1:]:
                self._break(keep_blank=True)
                self._current.append(line)
        else:
            self._current.append(re.sub(r"\s+", " ", data))

    def _break(self, keep_blank: bool = False) -> None:
        line = "".join(self._current)
        self._current = []
        line = line.rstrip() if self._pre_depth else line.strip()
        if line or (keep_blank and self._lines and self._lines[-1]):
            self._lines.append(line)

    def text(self) -> str:
        self._break()
        return "\n".join(self._lines).strip("\n")
