"""Readers: every format streams documents, bad records are skipped with file:line or raised in strict mode."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from llamalab.data.readers import BadRecord, read_documents


def _collect(paths, fmt, **kw):
    errors = []
    docs = list(read_documents(paths, fmt, source="s", on_error=lambda loc, why: errors.append((loc, why)), **kw))
    return docs, errors


def _jsonl_bytes(records) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


@pytest.mark.parametrize("suffix", ["", ".gz", ".zst"])
def test_jsonl_plain_and_compressed(tmp_path, suffix):
    data = _jsonl_bytes([{"body": "first doc", "id": "a"}, {"body": "second doc", "lang": "en"}])
    path = tmp_path / f"x.jsonl{suffix}"
    if suffix == ".gz":
        data = gzip.compress(data)
    elif suffix == ".zst":
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    docs, errors = _collect([str(path)], "jsonl", text_field="body")
    assert [d.text for d in docs] == ["first doc", "second doc"]
    assert docs[0].doc_id == "a" and docs[1].meta == {"lang": "en"}
    assert docs[1].location == f"{path}:2" and not errors


def test_jsonl_bad_records_are_skipped_with_location(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(
        b'{"text": "ok one"}\n'
        b'{"text": "broken\n'  # malformed JSON
        b'{"text": "caf\xe9"}\n'  # Latin-1 byte: invalid UTF-8
        b'{"title": "no text"}\n'
        b'{"text": 5}\n'
        b"\n"
        b'{"text": "ok two"}\n'
    )
    docs, errors = _collect([str(path)], "jsonl")
    assert [d.text for d in docs] == ["ok one", "ok two"]
    assert [loc for loc, _ in errors] == [f"{path}:{n}" for n in (2, 3, 4, 5)]
    reasons = [why for _, why in errors]
    assert "malformed JSON" in reasons[0] and "invalid UTF-8" in reasons[1]
    assert "'text' missing" in reasons[2] and "not a string" in reasons[3]

    with pytest.raises(BadRecord, match=rf"{path}:2: malformed JSON"):
        list(read_documents([str(path)], "jsonl", source="s", strict=True))


def test_missing_files_and_empty_globs_are_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        list(read_documents([str(tmp_path / "nope.jsonl")], "jsonl", source="s"))
    with pytest.raises(FileNotFoundError, match=r"\*\.txt"):
        list(read_documents([str(tmp_path / "*.txt")], "text", source="s"))
    with pytest.raises(ValueError, match="unknown input format"):
        list(read_documents([str(tmp_path)], "csv", source="s"))


def test_text_files_globs_and_paragraphs(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfPara one\r\nline two\r\n\r\n\r\nPara two\r\n")
    (tmp_path / "b.txt").write_text("Only one\n")
    docs, _ = _collect([str(tmp_path / "*.txt")], "text")
    assert [d.text for d in docs] == ["Para one\nline two\n\n\nPara two\n", "Only one\n"]
    paras, _ = _collect([str(tmp_path / "*.txt")], "text", paragraphs=True)
    assert [d.text for d in paras] == ["Para one\nline two", "Para two", "Only one"]
    assert paras[1].location == f"{tmp_path / 'a.txt'}:5"


def test_compressed_text_files(tmp_path):
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(b"One\n\nTwo\n"))
    (tmp_path / "b.txt.zst").write_bytes(zstandard.ZstdCompressor().compress("caf\u00e9".encode("latin-1")))
    paras, _ = _collect([str(tmp_path / "a.txt.gz")], "text", paragraphs=True)
    assert [d.text for d in paras] == ["One", "Two"]
    (book,) = read_documents([str(tmp_path / "b.txt.zst")], "gutenberg", source="b")
    assert book.text == "caf\u00e9" and book.meta["encoding"] == "latin-1"


def test_text_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"good\nalso good\nbad \xff here\n\nnext para\n")
    docs, errors = _collect([str(path)], "text")
    assert docs == [] and errors[0][0] == f"{path}:3"
    paras, errors = _collect([str(path)], "text", paragraphs=True)
    assert [d.text for d in paras] == ["next para"] and errors[0][0] == f"{path}:3"


def test_parquet_streams_batches_and_reports_nulls(tmp_path):
    path = tmp_path / "x.parquet"
    texts = [f"document number {i}" for i in range(2500)]
    texts[1700] = None
    pq.write_table(pa.table({"content": texts, "n": list(range(2500))}), path, row_group_size=1000)
    docs, errors = _collect([str(path)], "parquet", text_field="content")
    assert len(docs) == 2499 and docs[-1].text == "document number 2499" and docs[-1].meta == {"n": 2499}
    assert errors == [(f"{path}#1700", "text field 'content' is null")]
    _, errors = _collect([str(path)], "parquet")
    assert "'text' missing" in errors[0][1]


def test_gutenberg_decoding(shared):
    pride = shared("raw", "books", "pg1342_pride_and_prejudice.txt")
    caesar = shared("raw", "books", "nltk_gutenberg", "shakespeare-caesar.txt")  # Latin-1
    (doc,) = read_documents([str(pride)], "gutenberg", source="books")
    assert doc.text.startswith("The Project Gutenberg EBook of Pride and Prejudice")  # BOM gone
    assert "\r" not in doc.text and doc.meta["encoding"] == "utf-8"
    (doc,) = read_documents([str(caesar)], "gutenberg", source="books")
    assert doc.meta["encoding"] == "latin-1" and doc.text.startswith("[The Tragedie of Julius Caesar")
    with pytest.raises(UnicodeDecodeError):
        caesar.read_bytes().decode("utf-8")


@pytest.mark.slow
def test_stackexchange_posts_match_the_published_threads(shared):
    """Posts.xml threads (question + answers by score) equal the dataset's own derived thread file."""
    folder = shared("raw", "stackexchange")
    docs = list(read_documents([str(folder / "*_Posts.xml")], "stackexchange", source="se"))
    reference = {}
    with open(folder / "stackexchange_qa_threads.jsonl") as f:
        for line in f:
            r = json.loads(line)
            reference[r["site"], r["question_id"]] = r
    assert len(docs) == len(reference) == 1145
    for doc in docs:
        ref = reference[doc.meta["site"], doc.meta["question_id"]]
        scores = [a["score"] for a in doc.meta["answers"]]
        assert scores == sorted(scores, reverse=True)
        assert [a["answer_id"] for a in doc.meta["answers"]] == [a["answer_id"] for a in ref["answers"]]
        assert [a["accepted"] for a in doc.meta["answers"]] == [a["accepted"] for a in ref["answers"]]
        # HTML to text agrees up to runs of whitespace (HTML collapses them, the reference kept them)
        assert doc.text.split() == ref["text"].split()
        assert "<p>" not in doc.text and "&lt;" not in doc.text


def test_stackexchange_answers_sorted_and_html_stripped(tmp_path):
    xml = """\ufeff<?xml version="1.0" encoding="utf-8"?>
<posts>
  <row Id="1" PostTypeId="1" AcceptedAnswerId="3" Score="5" Title="Why?" Tags="&lt;a&gt;&lt;b&gt;"
       Body="&lt;p&gt;Question &amp;amp; body&lt;/p&gt;&lt;pre&gt;&lt;code&gt;x = 1&#xA;  y&lt;/code&gt;&lt;/pre&gt;" AnswerCount="3" />
  <row Id="2" PostTypeId="2" ParentId="1" Score="1" Body="&lt;p&gt;low&lt;/p&gt;" />
  <row Id="3" PostTypeId="2" ParentId="1" Score="10" Body="&lt;p&gt;high &lt;b&gt;bold&lt;/b&gt;&lt;/p&gt;" />
  <row Id="4" PostTypeId="5" Body="tag wiki" />
  <row Id="5" PostTypeId="1" Score="0" Title="Unanswered" Body="&lt;p&gt;Q2&lt;/p&gt;" AnswerCount="0" />
  <row Id="6" PostTypeId="2" ParentId="1" Score="4" Body="&lt;ul&gt;&lt;li&gt;one&lt;/li&gt;&lt;li&gt;two&lt;/li&gt;&lt;/ul&gt;" />
</posts>
"""
    path = tmp_path / "site_Posts.xml"
    path.write_text(xml, encoding="utf-8")
    docs, _ = _collect([str(path)], "stackexchange")
    assert [d.meta["question_id"] for d in docs] == [5, 1]  # a thread is emitted once all its answers arrived
    assert docs[1].text == (
        "Title: Why?\n\nQuestion & body\n\n```\nx = 1\n  y\n```\n\n"
        "Answer:\nhigh bold\n\nAnswer:\n- one\n- two\n\nAnswer:\nlow"
    )
    assert docs[1].meta["tags"] == ["a", "b"] and docs[1].meta["answers"][0]["accepted"] is True


def test_readers_stream_lazily(tmp_path):
    """Documents come out before the rest of the file is read: a bad last line only fails when reached."""
    path = tmp_path / "big.jsonl.gz"
    with gzip.open(path, "wb") as f:
        f.write(_jsonl_bytes({"text": f"doc {i}"} for i in range(20000)))
        f.write(b"not json\n")
    docs = read_documents([str(path)], "jsonl", source="s", strict=True)
    assert next(docs).text == "doc 0" and next(docs).text == "doc 1"
    with pytest.raises(BadRecord, match=r"big.jsonl.gz:20001: malformed JSON"):
        for _ in docs:
            pass
