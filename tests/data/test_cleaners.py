"""Cleaners on the real raw inputs in ../shared/data/raw and on hand-made LaTeX and wikitext."""

from __future__ import annotations

import json

import pytest

from llamalab.data.cleaners import get_cleaner
from llamalab.data.readers import Document, read_documents


def _doc(text: str, **meta) -> Document:
    return Document(text, "test", "d", "test:1", meta)


# --------------------------------------------------------------------------------------------- books


def test_gutenberg_header_and_footer_removed_from_pride_and_prejudice(shared):
    (doc,) = read_documents([str(shared("raw", "books", "pg1342_pride_and_prejudice.txt"))], "gutenberg",
                            source="books")
    text = get_cleaner("books")(doc).text
    assert text.startswith("PRIDE AND PREJUDICE\n\nBy Jane Austen\n\n")
    assert "It is a truth universally acknowledged" in text[:200]
    assert text.rstrip().endswith("had been the means of uniting them.")
    assert "gutenberg" not in text.lower() and "Produced by" not in text
    assert len(text) > 0.9 * len(doc.text) - 25000  # only the header and the ~20 kB license are gone


def test_gutenberg_without_blank_lines_botchan(shared):
    (doc,) = read_documents([str(shared("raw", "books", "botchan.txt"))], "gutenberg", source="books")
    text = get_cleaner("books")(doc).text
    assert text.startswith("BOTCHAN (MASTER DARLING)\nBy The Late Mr. Kin-nosuke Natsume\n")
    assert "gutenberg" not in text.lower() and text.rstrip().endswith("[R: Rad]")


def test_older_gutenberg_markers_and_headerless_books(shared):
    old = ("The Project Gutenberg Etext of Old Book\nlegal small print\n"
           "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n\n"
           "Chapter I\n\nOnce there was a book.\n\nEnd of the Project Gutenberg Etext of Old Book\nmore legal\n")
    assert get_cleaner("books")(_doc(old)).text == "Chapter I\n\nOnce there was a book."
    (emma,) = read_documents([str(shared("raw", "books", "nltk_gutenberg", "austen-emma.txt"))], "gutenberg",
                             source="books")
    assert get_cleaner("books")(emma).text == emma.text.strip()  # NLTK already removed the header


# ----------------------------------------------------------------------------------------------- web


@pytest.fixture(scope="module")
def web():
    return get_cleaner("web")


@pytest.mark.slow  # the first use of langid unpacks its model (5-20 s, then cached in ~/.cache/llamalab)
def test_web_filter_on_noisy_crawl(shared, web):
    (doc,) = read_documents([str(shared("raw", "web", "corpus.en.txt"))], "text", source="web")
    result = web(doc)
    kept = result.text.splitlines()
    raw_lines = doc.text.splitlines()
    assert 850 < len(kept) < len(raw_lines) - 70  # most sentences stay, the truncated blurbs go
    assert all(line.endswith((".", "!", "?", '"', "'")) and not line.endswith("...") for line in kept)
    for boilerplate in ("privacy statement", "©", "click here", "javascript"):
        assert not any(boilerplate in line for line in kept), boilerplate
    assert "iron cement protects the ingot against the hot , abrasive steel casting process ." in kept
    assert "construction and repair of highways and ..." not in kept
    assert "world 's longest @-@ established" in result.text and "&apos;" not in result.text  # entities decoded
    assert result.details["language"] == "en"
    assert result.details["lines_dropped"]["no_terminal_punctuation"] >= 60


def test_web_page_level_filters(web):
    english = " ".join(f"The river flows past the old mill number {i} every single day." for i in range(6))
    assert web(_doc(english)).text == english
    lines = [english, "Please enable JavaScript to view this site.", "We use cookies to improve your visit.",
             "Home", "Terms of Use and conditions apply here."]
    assert web(_doc("\n".join(lines))).text == english
    assert web(_doc(english + "\nLorem ipsum dolor sit amet, consectetur.")).reason == "lorem_ipsum"
    assert web(_doc("Short page here. Only two sentences.")).reason == "too_few_sentences"
    german = " ".join(f"Der Fluss fliesst jeden Tag an der alten Muehle Nummer {i} vorbei." for i in range(6))
    result = web(_doc(german))
    assert result.reason == "language" and result.details["language"] == "de"
    assert get_cleaner("web", language="de")(_doc(german)).text == german
    assert get_cleaner("web", language=None)(_doc(german)).text == german
    assert get_cleaner("web", lang_threshold=1.01)(_doc(english)).reason == "language"  # nothing is that sure


# ---------------------------------------------------------------------------------------------- code


def test_code_cleaner_on_cpython(shared):
    cleaner = get_cleaner("code")
    docs = {d.meta["path"]: d for d in read_documents([str(shared("raw", "code", "cpython311_stdlib_toplevel.jsonl"))], "jsonl",
                                                       source="code")}
    results = {path: cleaner(doc) for path, doc in docs.items()}
    dropped = {path for path, r in results.items() if not r.kept}
    assert dropped == {"Lib/keyword.py", "Lib/stringprep.py", "Lib/token.py"}  # "generated" banners
    assert {results[p].reason for p in dropped} == {"generated"}
    abc = results["Lib/abc.py"].text
    assert abc.startswith('"""Abstract Base Classes (ABCs) according to PEP 3119."""')
    assert docs["Lib/abc.py"].text.startswith("# Copyright 2007 Google")
    uu = results["Lib/uu.py"].text
    assert uu.startswith('#! /usr/bin/env python3\n"""Implementation of the UUencode')  # shebang kept
    assert "Permission to use, copy, modify" not in uu and "Permission to use" in docs["Lib/uu.py"].text
    # files without a license header keep every line
    assert results["Lib/bisect.py"].text.strip() == docs["Lib/bisect.py"].text.strip()
    # a comment block that is not a license stays
    assert results["Lib/_compat_pickle.py"].text.startswith("# This module is used to map the old Python 2")


def test_code_cleaner_heuristics():
    cleaner = get_cleaner("code")
    body = "int add(int a, int b) {\n    return a + b;\n}\n"
    header = "/*\n * Copyright (c) 2020 Someone\n * Licensed under the MIT License.\n */\n\n"
    assert cleaner(_doc(header + body)).text == body.strip()
    # preprocessor lines are code, not part of a comment header
    c_file = "#include <stdio.h>\n// Copyright 2020 X. All rights reserved.\n\nint main(void) { return 0; }\n"
    assert cleaner(_doc(c_file)).text == c_file.strip()
    assert cleaner(_doc("var a=" + "1," * 2000 + "0;\n")).reason == "long_lines"
    assert cleaner(_doc("x = 1\n" + "#" * 80 + "\n" + "{}[]();:+-*/=<>!|&" * 4 + "\n")).reason == "low_alnum"
    assert cleaner(_doc("// Code generated by protoc-gen-go. DO NOT EDIT.\npackage pb\n")).reason == "generated"
    assert cleaner(_doc("\n\n")).reason == "empty"


# ----------------------------------------------------------------------------------------- wikipedia

WIKITEXT = """{{Short description|Large cat}}
{{Infobox animal
| name = Lion
| image = {{Nested|template}}
}}
The '''lion''' (''Panthera leo'') is a large [[Felidae|cat]] of the genus [[Panthera]].<ref>{{cite web|url=x}}</ref>
It lives in [[Africa]]n grasslands<ref name="a" /> and [[India|western India]].[[File:Lion.jpg|thumb|A [[lion]] resting]]

== Behaviour ==
Lions are [http://example.org social animals] that live in prides.<!-- hidden comment --><br />
A pride's range is {{convert|20|km2|sqmi}} or more; in French, {{lang|fr|lion}}.
{| class="wikitable"
|-
| row || cell
|}
* Prides have up to 20 members.

[[Category:Big cats]]
__NOTOC__
"""


def test_wikitext_markup_is_stripped():
    text = get_cleaner("wikipedia")(_doc(WIKITEXT)).text
    assert text == (
        "The lion (Panthera leo) is a large cat of the genus Panthera.\n"
        "It lives in African grasslands and western India.\n\n"
        "Behaviour\n"
        "Lions are social animals that live in prides.\n"
        "A pride's range is 20 km2 or more; in French, lion.\n\n"
        "Prides have up to 20 members."
    )


def test_plain_wikipedia_text_passes_through(shared):
    cleaner = get_cleaner("wikipedia")
    path = shared("raw", "wikipedia", "wikipedia_vital4_summaries_en.jsonl")
    docs = list(read_documents([str(path)], "jsonl", source="wikipedia"))[:500]
    assert all(cleaner(d).text == d.text.strip() for d in docs if d.text.strip())
    assert get_cleaner("wikipedia", min_words=5)(_doc("Too short.")).reason == "too_few_words"


# --------------------------------------------------------------------------------------------- arxiv

LATEX = r"""\documentclass{article}
\usepackage{amsmath}
\newcommand{\R}{\mathbb{R}}
\newcommand{\norm}[1]{\left\lVert #1 \right\rVert}
\renewcommand{\vec}[2][n]{(#2_1, \dots, #2_#1)}
\def\eps{\varepsilon}
\def\pair#1#2{\langle #1, #2 \rangle}
\newcommand*\both{\norm{\eps}}
\DeclareMathOperator{\Tr}{Tr}
\providecommand{\half}{\frac{1}{2}}
\title{A paper}
\begin{document}
\maketitle
\begin{abstract} We study things. \end{abstract}
\section{Introduction}
% a full-line comment
Let $x \in \R$ and $\norm{x} < \eps$. % trailing comment
A 50\% share of $\pair{a}{b}$ and $\vec{x}$ or $\vec[m]{y}$; also $\both$.
$\Tr A = \half$, $\Tr\R$.
\section*{Results}
See \cite{k}.
\bibliographystyle{plain}
\bibliography{refs}
\begin{thebibliography}{9}
\bibitem{k} Knuth.
\end{thebibliography}
\end{document}
trailing junk
"""


def test_latex_cleaning_and_macro_expansion():
    text = get_cleaner("arxiv")(_doc(LATEX)).text
    assert text == (
        "\\section{Introduction}\n"
        "Let $x \\in \\mathbb{R}$ and $\\left\\lVert x \\right\\rVert < \\varepsilon$.\n"
        "A 50\\% share of $\\langle a, b \\rangle$ and $(x_1, \\dots, x_n)$ or $(y_1, \\dots, y_m)$; "
        "also $\\left\\lVert \\varepsilon \\right\\rVert$.\n"
        "$\\operatorname{Tr} A = \\frac{1}{2}$, $\\operatorname{Tr}\\mathbb{R}$.\n"
        "\\section*{Results}\n"
        "See \\cite{k}."
    )
    assert get_cleaner("arxiv")(_doc("\\begin{document}no sections\\end{document}")).reason == "no_section"


# ------------------------------------------------------------------------------------- stackexchange


def test_stackexchange_threads_sorted_by_score(shared):
    """JSONL threads whose answers arrive in any order come out best answer first, HTML-free."""
    path = shared("raw", "stackexchange", "stackexchange_qa_threads.jsonl")
    cleaner = get_cleaner("stackexchange")
    checked = 0
    for doc in read_documents([str(path)], "jsonl", source="se"):
        if len(doc.meta["answers"]) < 3:
            continue
        expected = doc.text
        doc.meta["answers"] = doc.meta["answers"][::-1]  # worst first
        out = cleaner(doc).text
        assert out == expected
        positions = [out.index(a["text"]) for a in sorted(doc.meta["answers"], key=lambda a: (-a["score"], a["answer_id"]))]
        assert positions == sorted(positions)
        checked += 1
    assert checked > 100


def test_stackexchange_html_and_min_answers():
    doc = _doc("", title="Q?", question="<p>Why &amp; how?</p>",
               answers=[{"answer_id": 1, "score": 0, "text": "<p>meh</p>"},
                        {"answer_id": 2, "score": 7, "text": "<p>Because <code>x</code>.</p><pre><code>a\n b\n</code></pre>"}])
    out = get_cleaner("stackexchange")(doc).text
    assert out == "Title: Q?\n\nWhy & how?\n\nAnswer:\nBecause x.\n\n```\na\n b\n```\n\nAnswer:\nmeh"
    doc.meta["answers"] = []
    assert get_cleaner("stackexchange", min_answers=1)(doc).reason == "too_few_answers"
    assert get_cleaner("stackexchange")(_doc("<div><p>Just</p><p>HTML</p></div>")).text == "Just\n\nHTML"


def test_unknown_kind_and_option_errors():
    with pytest.raises(ValueError, match="unknown cleaner"):
        get_cleaner("pdf")
    with pytest.raises(ValueError, match="'web' cleaner"):
        get_cleaner("web", colour="red")
    assert get_cleaner("none")(_doc("  keep me  ")).text == "  keep me  "
    assert json.dumps(get_cleaner("none")(_doc("")).reason) == '"empty"'
