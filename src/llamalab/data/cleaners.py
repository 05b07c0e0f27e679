"""Per-source cleaners, as LLaMA's data section describes (Touvron et al., 2023, section 2.1).

``get_cleaner(kind, **options)`` returns a function ``Document -> CleanResult``. A dropped document has
``text=None`` and ``reason`` set to the name of the filter that dropped it (the manifest counts them):

- ``web``: C4/CCNet-style heuristics: keep lines that end in terminal punctuation and have enough words, drop
  boilerplate lines (cookie/privacy notices, "javascript", copyright lines), drop pages with "lorem ipsum" or too
  few sentences, and keep only pages whose language (``langid``) matches with enough confidence.
- ``code``: drop generated files, files with very long lines or a low alphanumeric share; strip license headers.
- ``wikipedia``: strip wikitext markup (links, templates, refs, tables, quotes, headings, categories).
- ``books``: strip Project Gutenberg headers and footers.
- ``arxiv``: keep LaTeX from the first ``\\section`` on, drop comments and the bibliography, expand user macros.
- ``stackexchange``: HTML to text, the question then its answers by score, highest first.
- ``none``: pass through (only empty documents are dropped).
"""

from __future__ import annotations

import functools
import hashlib
import html
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .readers import Document
from .text import answer_order, format_thread, html_to_text

KINDS = ("web", "code", "wikipedia", "books", "arxiv", "stackexchange", "none")


@dataclass
class CleanResult:
    text: str | None
    reason: str | None = None  # name of the filter that dropped the document; None when kept
    details: dict = field(default_factory=dict)  # e.g. lines dropped per line filter

    @property
    def kept(self) -> bool:
        return self.text is not None


def _finish(text: str, min_chars: int, details: dict | None = None) -> CleanResult:
    text = text.strip("\n")
    if len(text.strip()) < max(1, min_chars):
        return CleanResult(None, "empty" if not text.strip() else "too_short", details or {})
    return CleanResult(text, None, details or {})


def _text_of(doc: Document | str) -> str:
    return doc if isinstance(doc, str) else doc.text


# ----------------------------------------------------------------------------------------------- web

_TERMINAL = (".", "!", "?", '"', "\u201d", "'")
# C4's policy substrings plus a few more boilerplate markers; matched case-insensitively, drop the line
_BOILERPLATE = (
    "terms of use", "terms of service", "privacy policy", "privacy statement", "cookie policy", "uses cookies",
    "use of cookies", "use cookies", "accept cookies", "enable cookies", "all rights reserved",
    "©", "click here", "sign up for our newsletter", "log in to reply",
)
_SENTENCE_END = re.compile(r"[.!?][\"'\u201d)]*(?=\s|$)")


class WebCleaner:
    """C4 line heuristics (Raffel et al., 2020) with CCNet's language identification (threshold 0.5).

    Lines are kept when they end in terminal punctuation (not an ellipsis), have at least
    ``min_words_per_line`` words and carry no boilerplate marker. A page is dropped when it contains "lorem
    ipsum" or a curly bracket (C4's code filter, with ``drop_curly=True``), when fewer than ``min_sentences``
    sentences or ``min_words`` words remain, or when ``langid`` says it is not ``language`` with probability at
    least ``lang_threshold`` (``language=None`` disables the check)."""

    def __init__(self, language: str | None = "en", lang_threshold: float = 0.5, min_words_per_line: int = 3,
                 min_sentences: int = 3, min_words: int = 20, drop_curly: bool = False,
                 unescape_html: bool = True, min_chars: int = 1):
        self.language, self.lang_threshold = language, lang_threshold
        self.min_words_per_line, self.min_sentences, self.min_words = min_words_per_line, min_sentences, min_words
        self.drop_curly, self.unescape_html, self.min_chars = drop_curly, unescape_html, min_chars

    def line_reason(self, line: str) -> str | None:
        """Why a line is dropped, or None to keep it."""
        lower = line.lower()
        if "javascript" in lower:
            return "javascript"
        if any(marker in lower for marker in _BOILERPLATE):
            return "boilerplate"
        if not line.endswith(_TERMINAL) or line.endswith("...") or line.endswith("\u2026"):
            return "no_terminal_punctuation"
        if len(line.split()) < self.min_words_per_line:
            return "short_line"
        return None

    def language_of(self, text: str) -> tuple[str, float]:
        lang, prob = language_identifier().classify(text[:5000])
        return lang, float(prob)

    def __call__(self, doc: Document | str) -> CleanResult:
        text = _text_of(doc)
        if self.unescape_html:
            text = html.unescape(text)
        lower = text.lower()
        if "lorem ipsum" in lower:
            return CleanResult(None, "lorem_ipsum")
        if self.drop_curly and "{" in text:
            return CleanResult(None, "curly_bracket")
        kept, dropped = [], {}
        for line in text.splitlines():
            line = line.strip()
            if not line:
                continue
            reason = self.line_reason(line)
            if reason is None:
                kept.append(line)
            else:
                dropped[reason] = dropped.get(reason, 0) + 1
        details = {"lines_dropped": dropped}
        out = "\n".join(kept)
        if not out:
            return CleanResult(None, "empty", details)
        if len(_SENTENCE_END.findall(out)) < self.min_sentences:
            return CleanResult(None, "too_few_sentences", details)
        if len(out.split()) < self.min_words:
            return CleanResult(None, "too_few_words", details)
        if self.language:
            lang, prob = self.language_of(out)
            details["language"], details["language_prob"] = lang, prob
            if lang != self.language or prob < self.lang_threshold:
                return CleanResult(None, "language", details)
        return _finish(out, self.min_chars, details)


@functools.cache
def language_identifier():
    """langid's model with normalised probabilities, loaded once per process.

    langid ships its model as a bz2-compressed pickle that takes ~5-20 s to unpack; the unpacked arrays are
    cached as a plain ``.npz`` (no pickle) under ``$LLAMALAB_CACHE`` (default ``~/.cache/llamalab``)."""
    import array

    import langid
    import numpy as np
    from langid.langid import LanguageIdentifier, model

    cache_dir = Path(os.environ.get("LLAMALAB_CACHE", Path.home() / ".cache" / "llamalab"))
    version = getattr(langid, "__version__", "1")
    digest = hashlib.sha1(model[:4096] if isinstance(model, bytes) else model[:4096].encode()).hexdigest()[:12]
    cache = cache_dir / f"langid-{version}-{len(model)}-{digest}.npz"
    if cache.is_file():
        try:
            z = np.load(cache, allow_pickle=False)
            keys, lengths, flat = z["out_keys"], z["out_lengths"], z["out_values"].tolist()
            bounds = np.concatenate([[0], np.cumsum(lengths)]).tolist()
            tk_output = {int(k): tuple(flat[bounds[i]: bounds[i + 1]]) for i, k in enumerate(keys.tolist())}
            nb_ptc, nb_pc = z["nb_ptc"], z["nb_pc"]
            return LanguageIdentifier(nb_ptc, nb_pc, nb_ptc.shape[0], z["classes"].tolist(),
                                      array.array("l", z["nextmove"].tolist()), tk_output, norm_probs=True)
        except (OSError, KeyError, ValueError):
            pass  # a damaged cache is rebuilt below
    identifier = LanguageIdentifier.from_modelstring(model, norm_probs=True)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        keys = sorted(identifier.tk_output)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, nb_ptc=identifier.nb_ptc, nb_pc=identifier.nb_pc, classes=np.array(identifier.nb_classes),
                 nextmove=np.asarray(identifier.tk_nextmove, dtype=np.int64), out_keys=np.array(keys, np.int64),
                 out_lengths=np.array([len(identifier.tk_output[k]) for k in keys], np.int64),
                 out_values=np.array([v for k in keys for v in identifier.tk_output[k]], np.int64))
        os.replace(tmp, cache)
    except OSError:
        pass  # read-only home: keep working without the cache
    return identifier


# ---------------------------------------------------------------------------------------------- code

_GENERATED = re.compile(
    r"auto-?generated|automatically generated|generated by|do not edit|@generated|generated from", re.I
)
_LICENSE = re.compile(
    r"copyright|licen[cs]e|all rights reserved|permission is hereby granted|warrant|spdx-license-identifier", re.I
)
_ASCII_ALNUM = bytes(c for c in range(128) if chr(c).isalnum())


def alnum_count(text: str) -> int:
    """Number of alphanumeric characters (bytes.translate for ASCII text: ~50x faster than a Python loop)."""
    if text.isascii():
        data = text.encode("ascii")
        return len(data) - len(data.translate(None, _ASCII_ALNUM))
    return sum(map(str.isalnum, text))


# comment lines of common languages; C preprocessor lines (#include, #define, ...) are code
_LINE_COMMENT = re.compile(r"^\s*(#(?!\s*(?:include|define|if|ifdef|ifndef|pragma|import|endif|else|elif|undef)\b)"
                           r"|//|--|;|%|!)")


def strip_license_header(text: str) -> str:
    """Remove a leading comment block (after a shebang / encoding line) that carries a license or copyright."""
    lines = text.split("\n")
    start = 0
    while start < len(lines) and (lines[start].startswith("#!") or "coding" in lines[start][:40]
                                  and lines[start].startswith("#")):
        start += 1
    end = start
    if end < len(lines) and lines[end].lstrip().startswith("/*"):  # C-style block comment
        while end < len(lines) and "*/" not in lines[end]:
            end += 1
        end += 1
    else:
        while end < len(lines) and (not lines[end].strip() or _LINE_COMMENT.match(lines[end])):
            end += 1
    header = "\n".join(lines[start:end])
    if not _LICENSE.search(header):
        return text
    while end < len(lines) and not lines[end].strip():
        end += 1
    return "\n".join(lines[:start] + lines[end:])


class CodeCleaner:
    """Source files: heuristics of the Codex/RedPajama GitHub filters, and license headers removed."""

    def __init__(self, max_line_length: int = 1000, max_mean_line_length: float = 100.0,
                 min_alnum_fraction: float = 0.25, generated_lines: int = 5, strip_license: bool = True,
                 min_chars: int = 1):
        self.max_line_length, self.max_mean_line_length = max_line_length, max_mean_line_length
        self.min_alnum_fraction, self.generated_lines = min_alnum_fraction, generated_lines
        self.strip_license, self.min_chars = strip_license, min_chars

    def __call__(self, doc: Document | str) -> CleanResult:
        text = _text_of(doc)
        if not text.strip():
            return CleanResult(None, "empty")
        lines = text.splitlines()
        head = "\n".join(line for line in lines[: self.generated_lines * 3] if line.strip()).split("\n")
        if _GENERATED.search("\n".join(head[: self.generated_lines])):
            return CleanResult(None, "generated")
        lengths = [len(line) for line in lines]
        if max(lengths) > self.max_line_length or sum(lengths) / len(lengths) > self.max_mean_line_length:
            return CleanResult(None, "long_lines")
        if alnum_count(text) / len(text) < self.min_alnum_fraction:
            return CleanResult(None, "low_alnum")
        if self.strip_license:
            text = strip_license_header(text)
        return _finish(text, self.min_chars)


# ----------------------------------------------------------------------------------------- wikipedia

_DROP_LINK_NAMESPACES = ("file:", "image:", "category:", "media:")
_TAG_WITH_BODY = re.compile(r"<(ref|gallery|math|timeline|score|references)\b[^>/]*>.*?</\1\s*>", re.S | re.I)
_SELF_CLOSING_TAG = re.compile(r"<(ref|references)\b[^>]*/>", re.I)
_ANY_TAG = re.compile(r"</?[a-zA-Z][^>]*>")


def _strip_nested(text: str, open_: str, close: str, keep: Callable[[str], str] | None = None) -> str:
    """Remove (or, with ``keep``, replace) every balanced ``open_ ... close`` span, innermost first."""
    out: list[str] = []
    stack: list[int] = []  # positions in ``out`` where each open span starts
    i = 0
    while i < len(text):
        if text.startswith(open_, i):
            stack.append(len(out))
            out.append(open_)
            i += len(open_)
        elif stack and text.startswith(close, i):
            begin = stack.pop()
            inner = "".join(out[begin + 1:])
            del out[begin:]
            out.append(keep(inner) if keep else "")
            i += len(close)
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _render_link(inner: str) -> str:
    target, _, label = inner.partition("|")
    if target.strip().lower().startswith(_DROP_LINK_NAMESPACES):
        return ""
    if label:
        return label.rsplit("|", 1)[-1] if "|" in label else label
    return target.lstrip(":").split("#")[0] if not target.startswith("#") else target[1:]


_TEXT_TEMPLATES = {"lang", "nowrap", "nobr", "small", "big", "smallcaps", "transl", "ill", "noitalic", "nihongo"}


def _render_template(inner: str) -> str:
    """Inline templates that carry running text keep it ({{lang|fr|bonjour}} -> bonjour, {{convert|5|km}}
    -> 5 km); every other template (infoboxes, citations, navigation) is dropped."""
    name, *args = [a.strip() for a in inner.split("|")]
    name = name.lower().replace("_", " ")
    positional = [a for a in args if "=" not in a]
    if name in ("convert", "cvt") and len(positional) >= 2:
        return f"{positional[0]} {positional[1]}"
    if name in _TEXT_TEMPLATES and positional:
        return positional[0] if name in ("ill", "nihongo") else positional[-1]
    return ""


def strip_wikitext(text: str) -> str:
    """Plain text of a wikitext article; plain text passes through unchanged."""
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = _TAG_WITH_BODY.sub("", text)
    text = _SELF_CLOSING_TAG.sub("", text)
    text = re.sub(r"<br\s*/?>\n?", "\n", text, flags=re.I)
    text = _strip_nested(text, "{|", "|}")  # tables
    text = _strip_nested(text, "{{", "}}", keep=_render_template)  # templates, innermost first
    text = _strip_nested(text, "[[", "]]", keep=_render_link)
    text = re.sub(r"\[(?:https?:)?//[^\s\]]+\s+([^\]]+)\]", r"\1", text)  # [http://x label] -> label
    text = re.sub(r"\[(?:https?:)?//[^\s\]]+\]", "", text)
    text = _ANY_TAG.sub("", text)
    text = re.sub(r"'{2,5}", "", text)  # bold / italic
    text = re.sub(r"^(=+)\s*(.*?)\s*\1\s*$", r"\2", text, flags=re.M)  # headings
    text = re.sub(r"^[*#:;]+\s*", "", text, flags=re.M)  # list and indent markers
    text = re.sub(r"__[A-Z]+__", "", text)  # magic words such as __TOC__
    text = html.unescape(text) if "&" in text else text
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\(\s*[,;]?\s*\)", "", text)  # "( )" left behind by removed templates
    text = re.sub(r" {2,}", " ", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


class WikipediaCleaner:
    def __init__(self, min_words: int = 0, min_chars: int = 1):
        self.min_words, self.min_chars = min_words, min_chars

    def __call__(self, doc: Document | str) -> CleanResult:
        text = _text_of(doc)
        if any(marker in text for marker in ("[[", "{{", "''", "<ref", "{|", "\n==")):
            text = strip_wikitext(text)
        if len(text.split()) < self.min_words:
            return CleanResult(None, "too_few_words")
        return _finish(text, self.min_chars)


# --------------------------------------------------------------------------------------------- books

_PG_START = re.compile(
    r"^\s*\*{3}\s*START OF (?:THIS|THE) PROJECT GUTENBERG E-?BOOK.*$"
    r"|^\s*\*END\*THE SMALL PRINT!.*$"
    r"|^\s*\*{3}\s*START OF THE PROJECT GUTENBERG.*$",
    re.I | re.M,
)
_PG_END = re.compile(
    r"^\s*\*{3}\s*END OF (?:THIS|THE) PROJECT GUTENBERG E-?BOOK.*$"
    r"|^\s*End of (?:the )?Project Gutenberg(?:'s)?\b.*$"
    r"|^\s*End of this Project Gutenberg.*$",
    re.I | re.M,
)
_PG_PRODUCED = re.compile(r"^(?:Produced|Prepared|Transcribed|E-?text prepared) by\b", re.I)


def _strip_credits(text: str) -> str:
    """Drop the volunteers' credit ("Produced by ...") that follows the START marker: its paragraph when
    short, else only its first line (some texts have no blank lines at all)."""
    body = text.lstrip("\n")
    if not _PG_PRODUCED.match(body):
        return text
    paragraph = body.split("\n\n", 1)[0]
    cut = len(paragraph) if paragraph.count("\n") < 4 else body.find("\n")
    return body[cut:] if cut >= 0 else ""


def strip_gutenberg(text: str) -> str:
    """The book between Project Gutenberg's header and footer (both the current and the older markers)."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n")
    start = _PG_START.search(text)
    if start:
        text = text[start.end():]
        text = _strip_credits(text)
    end = _PG_END.search(text)
    if end:
        text = text[: end.start()]
    return text.strip()


class BooksCleaner:
    def __init__(self, min_chars: int = 1):
        self.min_chars = min_chars

    def __call__(self, doc: Document | str) -> CleanResult:
        return _finish(strip_gutenberg(_text_of(doc)), self.min_chars)


# --------------------------------------------------------------------------------------------- arxiv

_DEFINITION = re.compile(
    r"\\(?:renew|provide|new)command\*?\s*(?:\{\s*(?P<name>\\[a-zA-Z@]+)\s*\}|(?P<bare>\\[a-zA-Z@]+))"
    r"\s*(?:\[(?P<nargs>\d)\])?\s*(?:\[(?P<default>[^\]]*)\])?\s*\{"
    r"|\\def\s*(?P<defname>\\[a-zA-Z@]+)\s*(?P<params>(?:#\d)*)\s*\{"
    r"|\\DeclareMathOperator(?P<star>\*?)\s*(?:\{\s*(?P<opname>\\[a-zA-Z@]+)\s*\}|(?P<opbare>\\[a-zA-Z@]+))\s*\{"
)
_BIBLIOGRAPHY = re.compile(
    r"\\begin\{thebibliography\}.*?(?:\\end\{thebibliography\}|\Z)|\\bibliography\{[^}]*\}|\\printbibliography"
    r"|\\bibliographystyle\{[^}]*\}",
    re.S,
)


def _balanced(text: str, open_at: int) -> int:
    """Index just past the ``}`` matching the ``{`` at ``open_at`` (or len(text) when unbalanced)."""
    depth, i = 0, open_at
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return len(text)


def strip_latex_comments(text: str) -> str:
    """Remove ``%`` comments (not ``\\%``); lines that were only a comment disappear."""
    out = []
    for line in text.split("\n"):
        m = re.search(r"(?<!\\)(?:\\\\)*%", line)
        if m is None:
            out.append(line)
        elif line[: m.start()].strip() or m.start() > 0 and line[: m.end() - 1].endswith("\\\\"):
            out.append(line[: m.end() - 1].rstrip())
        # a whole-line comment is dropped
    return "\n".join(out)


def extract_macros(text: str) -> tuple[dict[str, tuple[int, str | None, str]], str]:
    """User macros ``{name: (n_args, default_first_arg, body)}`` defined by ``\\newcommand``,
    ``\\renewcommand``, ``\\providecommand``, ``\\def`` or ``\\DeclareMathOperator``, and the text with the
    definitions removed."""
    macros: dict[str, tuple[int, str | None, str]] = {}
    out, pos = [], 0
    for m in _DEFINITION.finditer(text):
        if m.start() < pos:
            continue  # inside a definition already consumed
        end = _balanced(text, m.end() - 1)
        body = text[m.end(): end - 1]
        if m.group("defname"):  # \def\name#1#2{...}
            name, nargs, default = m.group("defname"), m.group("params").count("#"), None
        elif m.group("opname") or m.group("opbare"):  # \DeclareMathOperator{\Tr}{Tr}
            name, nargs, default = m.group("opname") or m.group("opbare"), 0, None
            body = f"\\operatorname{m.group('star')}{{{body}}}"
        else:
            name = m.group("name") or m.group("bare")
            nargs, default = int(m.group("nargs") or 0), m.group("default")
        macros[name] = (nargs, default, body)
        out.append(text[pos: m.start()])
        pos = end
    out.append(text[pos:])
    return macros, "".join(out)


def _read_argument(text: str, i: int) -> tuple[str, int] | None:
    """One macro argument at ``text[i:]``: a braced group or a single token (after spaces)."""
    while i < len(text) and text[i] in " \t\n":
        i += 1
    if i >= len(text):
        return None
    if text[i] == "{":
        end = _balanced(text, i)
        return text[i + 1: end - 1], end
    if text[i] == "\\":
        m = re.match(r"\\(?:[a-zA-Z@]+|.)", text[i:])
        return m.group(0), i + m.end()
    return text[i], i + 1


def expand_macros(text: str, macros: dict[str, tuple[int, str | None, str]], max_passes: int = 10) -> str:
    """Inline-expand user macros (with arguments ``#1``..``#9``; an optional first argument in ``[...]``)."""
    if not macros:
        return text
    pattern = re.compile("|".join(re.escape(name) + r"(?![a-zA-Z@])" for name in
                                  sorted(macros, key=len, reverse=True)))
    for _ in range(max_passes):
        out, pos, changed = [], 0, False
        for m in pattern.finditer(text):
            if m.start() < pos:
                continue
            nargs, default, body = macros[m.group(0)]
            i, args = m.end(), []
            if default is not None:
                if i < len(text) and text[i] == "[":
                    close = text.find("]", i)
                    args.append(text[i + 1: close])
                    i = close + 1
                else:
                    args.append(default)
            while len(args) < nargs:
                arg = _read_argument(text, i)
                if arg is None:
                    break
                args.append(arg[0])
                i = arg[1]
            expansion = re.sub(r"#(\d)", lambda a, args=args: args[int(a.group(1)) - 1]
                               if int(a.group(1)) <= len(args) else a.group(0), body)
            out += [text[pos: m.start()], expansion]
            pos, changed = i, True
        out.append(text[pos:])
        text = "".join(out)
        if not changed:
            break
    return text


def clean_latex(text: str) -> str | None:
    """arXiv source as LLaMA kept it: from the first section on, no comments, no bibliography, macros inlined.

    Returns None when the document has no ``\\section``."""
    text = strip_latex_comments(text.replace("\r\n", "\n"))
    macros, text = extract_macros(text)
    first = re.search(r"\\section\*?\s*[\[{]", text)
    if first is None:
        return None
    text = text[first.start():]
    text = re.sub(r"\\end\{document\}.*", "", text, flags=re.S)
    text = _BIBLIOGRAPHY.sub("", text)
    text = expand_macros(text, macros)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


class ArxivCleaner:
    def __init__(self, min_chars: int = 1):
        self.min_chars = min_chars

    def __call__(self, doc: Document | str) -> CleanResult:
        text = clean_latex(_text_of(doc))
        if text is None:
            return CleanResult(None, "no_section")
        return _finish(text, self.min_chars)


# ------------------------------------------------------------------------------------- stackexchange

_LOOKS_HTML = re.compile(r"<(?:p|div|br|pre|code|a|ul|ol|li|blockquote|h\d|em|strong|b|i)\b[^>]*>", re.I)


def _plain(text: str) -> str:
    return html_to_text(text) if _LOOKS_HTML.search(text) else text.strip()


class StackExchangeCleaner:
    """A thread as text: title, question, then answers by score. Works on :mod:`readers` Posts.xml documents
    and on JSONL threads carrying ``title``/``question``/``answers`` fields; other text is HTML-stripped."""

    def __init__(self, min_answers: int = 0, min_chars: int = 1):
        self.min_answers, self.min_chars = min_answers, min_chars

    def __call__(self, doc: Document | str) -> CleanResult:
        meta = {} if isinstance(doc, str) else doc.meta
        answers = meta.get("answers")
        if isinstance(answers, list) and "question" in meta:
            if len(answers) < self.min_answers:
                return CleanResult(None, "too_few_answers")
            ordered = answer_order(answers)
            text = format_thread(_plain(meta.get("title", "")), _plain(meta["question"]),
                                 [_plain(a.get("text") or a.get("body") or "") for a in ordered])
        else:
            text = _plain(_text_of(doc))
        return _finish(text, self.min_chars)


class PassThrough:
    def __init__(self, min_chars: int = 1):
        self.min_chars = min_chars

    def __call__(self, doc: Document | str) -> CleanResult:
        return _finish(_text_of(doc), self.min_chars)


_CLEANERS = {
    "web": WebCleaner,
    "code": CodeCleaner,
    "wikipedia": WikipediaCleaner,
    "books": BooksCleaner,
    "arxiv": ArxivCleaner,
    "stackexchange": StackExchangeCleaner,
    "none": PassThrough,
}


def get_cleaner(kind: str, **options) -> Callable[[Document], CleanResult]:
    """The cleaner for a source ``kind`` (see :data:`KINDS`); ``options`` go to its constructor."""
    if kind not in _CLEANERS:
        raise ValueError(f"unknown cleaner {kind!r}; expected one of {', '.join(KINDS)}")
    try:
        return _CLEANERS[kind](**options)
    except TypeError as exc:
        raise ValueError(f"bad option for the {kind!r} cleaner: {exc}") from exc
