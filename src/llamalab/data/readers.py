"""Streaming readers that turn raw source files into :class:`Document` objects.

Every reader holds at most one record (or, for ``Posts.xml``, the questions still waiting for answers) in
memory, so arbitrarily large inputs stream in constant memory. A bad record (malformed JSON, invalid UTF-8, a
missing or non-string text field) is reported through ``on_error(location, reason)`` and skipped, or raised
as :class:`BadRecord` with ``strict=True``; the location always names the file and line (or row). A compressed
or Parquet file that is cut short or corrupt is reported the same way, once, with the file as the location;
the documents read from it before the damage are kept (they have already streamed on).
"""

from __future__ import annotations

import bz2
import glob
import gzip
import io
import json
import logging
import lzma
import os
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from .text import answer_order, format_thread, html_to_text

log = logging.getLogger(__name__)

FORMATS = ("text", "jsonl", "parquet", "stackexchange", "gutenberg")
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd", ".zstd": "zstd"}
READ_SIZE = 1 << 17  # bytes a compressed file is read and buffered by (8 KiB halves the speed)


@dataclass
class Document:
    text: str
    source: str
    doc_id: str
    location: str  # "path:line" or "path#row", for error messages and provenance
    meta: dict = field(default_factory=dict)


class BadRecord(UserError, ValueError):
    """A record that cannot be read; the message names the file and line (or row)."""

    def __init__(self, location: str, reason: str):
        super().__init__(f"{location}: {reason}")
        self.location = location
        self.reason = reason


class DamagedFile(BadRecord):
    """A compressed or Parquet file that ends early or does not decode; the location is the file."""


def expand_paths(paths: str | Iterable[str]) -> list[Path]:
    """Files named by ``paths`` (plain paths or globs, ``**`` allowed), in a stable order.

    A path that does not exist, or a glob that matches no file, raises FileNotFoundError naming it."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for pattern in map(str, paths):
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise FileNotFoundError(f"no file matches {pattern!r}")
            files += map(Path, matches)
        elif os.path.isfile(pattern):
            files.append(Path(pattern))
        else:
            raise FileNotFoundError(f"input file not found: {pattern}")
    return files


def open_binary(path: Path) -> io.BufferedIOBase:
    """Open a file for streaming, decompressing it by its suffix (see :data:`COMPRESSIONS`).

    A compressed file that is cut short or corrupt raises :class:`DamagedFile` when the reading gets there,
    after the intact data before it."""
    kind = COMPRESSIONS.get(path.suffix.lower())
    if kind is None:
        return open(path, "rb")
    if kind == "zstd":
        stream = _ZstdFrames(open(path, "rb"))
    else:
        stream = {"gzip": gzip.open, "bz2": bz2.open, "xz": lzma.open}[kind](path, "rb")
    return io.BufferedReader(_CheckedDecompression(stream, path, kind), buffer_size=READ_SIZE)


class _ZstdFrames(io.RawIOBase):
    """zstd frames decompressed one after another. Unlike ``zstandard``'s stream reader, which just stops
    when the file does, it raises EOFError (as gzip, bz2 and lzma do) when the file ends inside a frame."""

    def __init__(self, raw: io.BufferedIOBase):
        import zstandard

        self._raw = raw
        self._new_frame = zstandard.ZstdDecompressor().decompressobj
        self._frame = None  # the decompressor of the frame being read; None between frames
        self._out = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._out:
            data = self._raw.read(READ_SIZE)
            if not data:
                if self._frame is not None:
                    raise EOFError("Compressed file ended before the end-of-stream marker was reached")
                return 0
            self._out = memoryview(self._decompress(data))
        n = min(len(buffer), len(self._out))
        buffer[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def _decompress(self, data: bytes) -> bytes:
        """All the output of ``data``, which may end one frame and start the next."""
        out = []
        while data:
            if self._frame is None:
                self._frame = self._new_frame()
            out.append(self._frame.decompress(data))
            data = b""
            if self._frame.eof:
                data, self._frame = self._frame.unused_data, None
        return b"".join(out)

    def close(self) -> None:
        self._raw.close()
        super().close()


class _CheckedDecompression(io.RawIOBase):
    """A decompressing stream whose truncation or corruption errors become :class:`DamagedFile`, naming the
    file, the format and how far decompression got."""

    def __init__(self, stream, path: Path, kind: str):
        import zstandard

        self._stream, self._path, self._kind = stream, path, kind
        self._errors = (EOFError, OSError, zlib.error, lzma.LZMAError, zstandard.ZstdError)
        self._delivered = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        try:
            n = self._stream.readinto(buffer)
        except self._errors as exc:
            why = ("the file ends before the end-of-stream marker: it is incomplete" if isinstance(exc, EOFError)
                   else " ".join(str(exc).split()))
            raise DamagedFile(str(self._path), f"truncated or corrupt {self._kind} stream after "
                              f"{self._delivered:,} bytes of data ({why})") from exc
        self._delivered += n
        return n

    def close(self) -> None:
        self._stream.close()
        super().close()


def decode_gutenberg(data: bytes) -> tuple[str, str]:
    """Decode a Project Gutenberg text: UTF-8 (BOM stripped), else Latin-1; CRLF/CR become LF."""
    try:
        text, encoding = data.decode("utf-8-sig"), "utf-8"
    except UnicodeDecodeError:
        text, encoding = data.decode("latin-1"), "latin-1"
    return text.replace("\r\n", "\n").replace("\r", "\n"), encoding


def read_documents(
    paths: str | list[str],
    fmt: str,
    *,
    source: str,
    text_field: str = "text",
    strict: bool = False,
    on_error: Callable[[str, str], None] | None = None,
    paragraphs: bool = False,
) -> Iterator[Document]:
    """Stream documents from ``paths`` (files or globs) in format ``fmt`` (see :data:`FORMATS`); text, JSONL
    and Gutenberg files may be compressed (see :data:`COMPRESSIONS`).

    ``text_field`` names the text column of JSONL and Parquet records (other fields go to ``meta``);
    ``paragraphs=True`` makes the plain-text reader yield one document per blank-line separated paragraph
    instead of one per file."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown input format {fmt!r}; expected one of {', '.join(FORMATS)}")
    files = expand_paths(paths)

    def bad(location: str, reason: str) -> None:
        if strict:
            raise BadRecord(location, reason)
        if on_error is not None:
            on_error(location, reason)
        else:
            log.warning("skipping bad record %s: %s", location, reason)

    reader = _READERS[fmt]
    for path in files:
        try:
            yield from reader(path, source=source, text_field=text_field, bad=bad, paragraphs=paragraphs)
        except DamagedFile as exc:  # the file's reader stopped there; its later records are lost
            bad(exc.location, exc.reason)


def _read_text(path: Path, *, source, bad, paragraphs, **_) -> Iterator[Document]:
    if not paragraphs:
        with open_binary(path) as f:
            data = f.read()
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            bad(f"{path}:{line}", f"invalid UTF-8 at byte {exc.start}")
            return
        text = text.replace("\r\n", "\n")
        yield Document(text, source, f"{path.name}", f"{path}:1", {"path": str(path)})
        return
    lines: list[str] = []
    start, broken = 0, False
    with open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                bad(f"{path}:{lineno}", f"invalid UTF-8 at byte {exc.start} of the line")
                broken, line = True, "x"  # the paragraph is dropped when it ends
            if line.strip():
                if not lines and not broken:
                    start = lineno
                lines.append(line)
                continue
            if lines and not broken:
                yield Document("\n".join(lines), source, f"{path.name}:{start}", f"{path}:{start}",
                               {"path": str(path)})
            lines, broken = [], False
    if lines and not broken:
        yield Document("\n".join(lines), source, f"{path.name}:{start}", f"{path}:{start}", {"path": str(path)})


def _read_gutenberg(path: Path, *, source, **_) -> Iterator[Document]:
    with open_binary(path) as f:
        text, encoding = decode_gutenberg(f.read())
    yield Document(text, source, path.name, f"{path}:1", {"path": str(path), "encoding": encoding})


def _read_jsonl(path: Path, *, source, text_field, bad, **_) -> Iterator[Document]:
    with open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            location = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                bad(location, f"invalid UTF-8 at byte {exc.start} of the line")
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                bad(location, f"malformed JSON ({exc.msg} at column {exc.colno})")
                continue
            if not isinstance(record, dict):
                bad(location, f"expected a JSON object, got {type(record).__name__}")
                continue
            text = record.pop(text_field, None)
            if not isinstance(text, str):
                what = "missing" if text is None else f"not a string ({type(text).__name__})"
                bad(location, f"text field {text_field!r} {what}")
                continue
            doc_id = str(record.get("id", f"{path.name}:{lineno}"))
            yield Document(text, source, doc_id, location, record)


def _read_parquet(path: Path, *, source, text_field, bad, **_) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow's errors do not name the file
        raise DamagedFile(str(path), f"not a Parquet file, or a truncated one ({exc})") from exc
    if text_field not in pf.schema_arrow.names:
        bad(f"{path}#0", f"text field {text_field!r} missing (columns: {', '.join(pf.schema_arrow.names)})")
        return
    row = 0
    for batch in _parquet_batches(pf, path):
        for record in batch.to_pylist():
            location = f"{path}#{row}"
            row += 1
            text = record.pop(text_field)
            if not isinstance(text, str):
                bad(location, f"text field {text_field!r} is {'null' if text is None else type(text).__name__}")
                continue
            yield Document(text, source, str(record.get("id", f"{path.name}#{row - 1}")), location, record)


def _parquet_batches(pf, path: Path):
    """``pf``'s record batches; a row group that does not decode (a damaged file) raises DamagedFile."""
    import pyarrow as pa

    batches = pf.iter_batches(batch_size=1024)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as exc:
            raise DamagedFile(str(path), f"corrupt Parquet data ({exc})") from exc
        yield batch


def _read_stackexchange(path: Path, *, source, bad, **_) -> Iterator[Document]:
    """Threads from a Stack Exchange ``Posts.xml`` dump: each question with its answers, best score first.

    Posts come in id order and answers follow their question, so a question is emitted as soon as its
    ``AnswerCount`` answers have arrived; only questions still waiting for answers are held in memory. Those
    whose answers never arrive (a partial dump) are emitted at the end with the answers seen."""
    site = path.name.split("_Posts")[0] if "_Posts" in path.name else path.parent.name
    pending: dict[int, dict] = {}  # question id -> question record with its answers so far
    orphans: dict[int, list[dict]] = {}  # answers that arrived before their question

    def thread(q: dict) -> Document:
        answers = answer_order(q["answers"])
        text = format_thread(q["title"], q["question"], [a["text"] for a in answers])
        meta = {k: q[k] for k in ("site", "question_id", "title", "tags", "score", "question")}
        meta["answers"] = [{"answer_id": a["answer_id"], "score": a["score"],
                            "accepted": str(a["answer_id"]) == q["accepted"], "text": a["text"]} for a in answers]
        return Document(text, source, f"{site}/{q['question_id']}", q["location"], meta)

    with open(path, "rb") as f:
        context = ET.iterparse(f, events=("start", "end"))
        try:
            _, root = next(context)
            for event, elem in context:
                if event != "end" or elem.tag != "row":
                    continue
                a = elem.attrib
                root.clear()  # rows are processed one at a time; drop the parsed ones
                kind = a.get("PostTypeId")
                if kind not in ("1", "2"):
                    continue
                try:
                    post_id = int(a["Id"])
                    score = int(a.get("Score", 0))
                    body = html_to_text(a.get("Body", ""))
                except (KeyError, ValueError) as exc:
                    bad(f"{path}#Id={a.get('Id', '?')}", f"bad post attributes ({exc})")
                    continue
                if kind == "1":
                    tags = [t for t in a.get("Tags", "").replace(">", "<").split("<") if t]
                    q = {"site": site, "question_id": post_id, "title": a.get("Title", ""), "tags": tags,
                         "score": score, "question": body, "accepted": a.get("AcceptedAnswerId"),
                         "expected": int(a.get("AnswerCount", 0) or 0), "location": f"{path}#Id={post_id}",
                         "answers": orphans.pop(post_id, [])}
                    if len(q["answers"]) >= q["expected"]:
                        yield thread(q)
                    else:
                        pending[post_id] = q
                else:
                    parent = int(a.get("ParentId", -1))
                    answer = {"answer_id": post_id, "score": score, "text": body}
                    q = pending.get(parent)
                    if q is None:
                        orphans.setdefault(parent, []).append(answer)
                        continue
                    q["answers"].append(answer)
                    if len(q["answers"]) >= q["expected"]:
                        yield thread(pending.pop(parent))
        except ET.ParseError as exc:
            bad(f"{path}:{exc.position[0]}", f"malformed XML ({exc})")
    for q in pending.values():
        yield thread(q)
    if orphans:
        log.info("%s: %d answers whose question is not in the dump were skipped", path,
                 sum(map(len, orphans.values())))


_READERS = {
    "text": _read_text,
    "jsonl": _read_jsonl,
    "parquet": _read_parquet,
    "stackexchange": _read_stackexchange,
    "gutenberg": _read_gutenberg,
}
