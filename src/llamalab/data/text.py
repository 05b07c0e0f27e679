"""Small text utilities shared by the readers and the cleaners: HTML to plain text, Stack Exchange threads."""

from __future__ import annotations

import re
from html.parser import HTMLParser

_BLOCK_TAGS = {
    "p", "div", "br", "hr", "ul", "ol", "li", "blockquote", "table", "tr", "h1", "h2", "h3", "h4", "h5", "h6",
    "pre", "dl", "dt", "dd", "section", "article", "header", "footer", "figure", "figcaption",
}
_SKIP_TAGS = {"script", "style", "head", "noscript", "template"}
_HTML_SPACE = re.compile(r"[ \t\r\n]+")
_FENCED = re.compile(r"(```\n.*?```)", re.S)
_LINE_EDGE_SPACE = re.compile(r"[ \t]*\n[ \t]*")
_BLANK_RUNS = re.compile(r"\n{3,}")


class _TextExtractor(HTMLParser):
    """Collects visible text; block tags become line breaks and ``<pre>`` blocks become fenced code."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip_depth = 0
        self.pre_depth = 0

    def handle_starttag(self, tag, attrs):
        if tag in _SKIP_TAGS:
            self.skip_depth += 1
        elif tag == "pre":
            self.pre_depth += 1
            self.parts.append("\n\n```\n")
        elif tag == "li":
            self.parts.append("\n- ")
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n" if tag == "br" else "\n\n")

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag in _SKIP_TAGS:  # <script/> opens nothing
            self.skip_depth -= 1

    def handle_endtag(self, tag):
        if tag in _SKIP_TAGS:
            self.skip_depth = max(0, self.skip_depth - 1)
        elif tag == "pre":
            self.pre_depth = max(0, self.pre_depth - 1)
            if self.parts and not self.parts[-1].endswith("\n"):
                self.parts.append("\n")
            self.parts.append("```\n\n")
        elif tag in _BLOCK_TAGS and tag not in ("br", "li"):
            self.parts.append("\n\n")

    def handle_data(self, data):
        if self.skip_depth:
            return
        if not self.pre_depth:  # HTML collapses source whitespace outside <pre>
            data = _HTML_SPACE.sub(" ", data)
        self.parts.append(data)


def html_to_text(html: str) -> str:
    """Visible text of an HTML fragment: paragraphs separated by blank lines, entities decoded,
    ``<pre>`` code kept verbatim in triple-backtick fences, lists as ``- item`` lines."""
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    text = "".join(parser.parts)
    # Tidy outside code fences only: strip line-edge spaces, at most one blank line in a row.
    chunks = _FENCED.split(text)
    for i in range(0, len(chunks), 2):
        chunks[i] = _BLANK_RUNS.sub("\n\n", _LINE_EDGE_SPACE.sub("\n", chunks[i]))
    return _BLANK_RUNS.sub("\n\n", "".join(chunks)).strip()


def answer_order(answers: list[dict]) -> list[dict]:
    """Answers by score, highest first; ties keep the older (lower id) answer first."""
    return sorted(answers, key=lambda a: (-int(a.get("score") or 0), int(a.get("answer_id") or 0)))


def format_thread(title: str, question: str, answers: list[str]) -> str:
    """One Stack Exchange thread as a document: the title and question, then each answer."""
    parts = [f"Title: {title}".rstrip() if title else "", question]
    parts += [f"Answer:\n{a}" for a in answers]
    return "\n\n".join(p for p in parts if p)
