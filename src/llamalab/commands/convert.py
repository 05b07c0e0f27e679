"""``llamalab convert SRC DST --to FORMAT``: between native, Hugging Face, Meta, llama2.c and GGUF.

Every conversion goes through a native folder (the importer writes it, the exporter reads it), so each format
needs one reader and one writer. The source format is detected from the files unless ``--from`` names it.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from ..convert.detect import FORMATS, detect_format
from ..convert.hf import DEFAULT_MAX_SHARD_SIZE
from ..fs import OutputFolderError, merge_into, staging_dir

FILE_FORMATS = ("llama2c", "gguf")  # written as one file; the others as a folder
DTYPE_HELP = ("native/hf/meta: f32, f16 or bf16 (default: as stored); gguf: f32, f16 or q8_0 (default f32); "
              "llama2c: f32 only")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llamalab convert", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=(
                                    "examples:\n"
                                    "  llamalab convert stories260K.bin out/stories --to native --tokenizer tok512.bin\n"
                                    "  llamalab convert out/stories out/stories-hf --to hf\n"
                                    "  llamalab convert llama-13b/ out/13b --to native --dtype bf16\n"
                                    "  llamalab convert out/stories stories.gguf --to gguf --dtype q8_0\n"
                                    "  llamalab convert runs/x/checkpoints/step-00001000 out/x --to native  # any layout"))
    p.add_argument("src", help="checkpoint to read (folder or file)")
    p.add_argument("dst", help="folder (native, hf, meta) or file (llama2c .bin, .gguf) to write")
    p.add_argument("--to", required=True, choices=[f for f in FORMATS if f != "dcp"], help="format to write")
    p.add_argument("--from", dest="src_format", choices=FORMATS, help="source format (default: detected)")
    p.add_argument("--dtype", help=DTYPE_HELP)
    p.add_argument("--shards", type=int, default=1, help="meta: number of model-parallel files (default 1)")
    p.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
                   help=f"hf: split model.safetensors above this (default {DEFAULT_MAX_SHARD_SIZE})")
    p.add_argument("--tokenizer", help="llama2c/meta/dcp source: tok*.bin or SentencePiece .model (llama2c: default beside it)")
    p.add_argument("--force", action="store_true",
                   help="write into a DST folder that holds other files (none of them is deleted), or replace a "
                        "DST file of another format")
    p.add_argument("--max-seq-len", type=int, default=2048,
                   help="meta source: context length to record (params.json has none; default 2048)")
    return p


def to_native(src: Path, fmt: str, out: Path, args) -> Path:
    from ..convert.common import parse_dtype

    dtype = parse_dtype(args.dtype) if args.to == "native" else None
    if fmt == "hf":
        from ..convert.hf import import_hf

        return import_hf(src, out, dtype=dtype)
    if fmt == "meta":
        from ..convert.meta import import_meta

        return import_meta(src, out, dtype=dtype, tokenizer=args.tokenizer, max_seq_len=args.max_seq_len)
    if fmt == "llama2c":
        from ..convert.llama2c import import_llama2c

        return import_llama2c(src, out, tokenizer=args.tokenizer, dtype=dtype)
    if fmt == "dcp":
        from ..convert.dcp import export_native

        return export_native(src, out, tokenizer_path=args.tokenizer, dtype=dtype)
    if fmt == "gguf":
        from ..convert.gguf import import_gguf

        if src.is_dir():
            found = sorted(src.glob("*.gguf"))
            if not found:
                raise FileNotFoundError(f"{src}: no .gguf file in this folder")
            src = found[0]
        return import_gguf(src, out, dtype=dtype)
    from ..checkpoint import save_pretrained
    from ..convert.common import read_native

    native = read_native(src, dtype)  # native -> native: a copy, possibly in another dtype
    return save_pretrained(out, native.model, tokenizer_path=native.tokenizer_path, special_ids=native.special_ids)


def from_native(native: Path, dst: Path, args) -> Path:
    if args.to == "hf":
        from ..convert.hf import export_hf

        return export_hf(native, dst, dtype=args.dtype, max_shard_size=args.max_shard_size)
    if args.to == "meta":
        from ..convert.meta import export_meta

        return export_meta(native, dst, shards=args.shards, dtype=args.dtype)
    if args.to == "llama2c":
        from ..convert.common import parse_dtype
        from ..convert.llama2c import export_llama2c

        if args.dtype and parse_dtype(args.dtype) != parse_dtype("f32"):
            raise ValueError(f"llama2.c's legacy format stores float32 only, not {args.dtype}")
        return export_llama2c(native, dst)
    from ..convert.gguf import export_gguf

    return export_gguf(native, dst, dtype=(args.dtype or "f32").lower())


def describe(path: Path) -> str:
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    size = sum(f.stat().st_size for f in files)
    names = ", ".join(f.name for f in files[:8]) + (" ..." if len(files) > 8 else "")
    return f"{path} ({size / 1e6:.1f} MB: {names})"


def convert(src: Path, dst: Path, args) -> Path:
    fmt = args.src_format or detect_format(src)
    print(f"reading {src} as {fmt}")
    if args.to == "native":
        return to_native(src, fmt, dst, args)
    if fmt == "native":
        return from_native(src, dst, args)
    with tempfile.TemporaryDirectory(prefix="llamalab-convert-") as tmp:
        return from_native(to_native(src, fmt, Path(tmp) / "native", args), dst, args)


def check_output_file(dst: Path, fmt: str, force: bool) -> None:
    """A file output replaces only a file of its own format (or anything, with ``force``); never a folder."""
    if dst.is_dir():
        raise OutputFolderError(f"{dst}: is a folder; --to {fmt} writes one file")
    if dst.exists() and not force:
        try:
            same = detect_format(dst) == fmt
        except ValueError:
            same = False
        if not same:
            raise OutputFolderError(f"{dst}: exists and is not a {fmt} file; choose another name, or pass --force "
                                    "to replace it")


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    src, dst = Path(args.src), Path(args.dst)
    if args.to in FILE_FORMATS:
        check_output_file(dst, args.to, args.force)
        out = convert(src, dst, args)
    elif args.force and dst.is_dir() and any(dst.iterdir()):  # write aside, then move in beside what is there
        staged = staging_dir(dst)
        try:
            convert(src, staged / "out", args)
            merge_into(staged / "out", dst)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        out = dst
    else:
        out = convert(src, dst, args)
    print(f"wrote {args.to}: {describe(out)}")
    return 0
