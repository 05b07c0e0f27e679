"""SentencePiece ``ModelProto`` helpers: read one, or build one from a vocabulary (llama2.c, GGUF).

A tokenizer that only exists as pieces and scores (llama2.c's ``tok*.bin``, GGUF metadata) becomes a real
``tokenizer.model`` the way ``tok512.reconstructed.model`` was built: BPE, byte fallback, identity
normaliser, dummy prefix, ``<unk>``/``<s>``/``</s>`` at 0/1/2 and ``<0x00>``..``<0xFF>`` as byte pieces.
"""

from __future__ import annotations

import re
from pathlib import Path

from sentencepiece import sentencepiece_model_pb2 as pb

ModelProto = pb.ModelProto
SentencePiece = pb.ModelProto.SentencePiece
BYTE_PIECE = re.compile(r"^<0x[0-9A-F]{2}>$")


def load_proto(path: str | Path) -> pb.ModelProto:
    proto = pb.ModelProto()
    try:
        proto.ParseFromString(Path(path).read_bytes())
    except Exception as exc:  # protobuf's DecodeError names no file
        raise ValueError(f"{path}: not a SentencePiece model ({exc})") from None
    return proto


def piece_type(piece: str, index: int, unk_id: int, bos_id: int, eos_id: int) -> int:
    if index == unk_id:
        return SentencePiece.UNKNOWN
    if index in (bos_id, eos_id):
        return SentencePiece.CONTROL
    if BYTE_PIECE.match(piece):
        return SentencePiece.BYTE
    return SentencePiece.NORMAL


def build_proto(pieces: list[str], scores: list[float], types: list[int] | None = None, *,
                unk_id: int = 0, bos_id: int = 1, eos_id: int = 2, pad_id: int = -1) -> pb.ModelProto:
    """A BPE ModelProto with LLaMA's trainer and normaliser settings over the given vocabulary."""
    if len(pieces) != len(scores) or (types is not None and len(types) != len(pieces)):
        raise ValueError(f"vocabulary lengths differ: {len(pieces)} pieces, {len(scores)} scores"
                         + ("" if types is None else f", {len(types)} types"))
    proto = pb.ModelProto()
    spec = proto.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.vocab_size = len(pieces)
    spec.self_test_sample_size = 0
    spec.input_format = "text"
    spec.character_coverage = 1.0
    spec.split_digits = True
    spec.allow_whitespace_only_pieces = True
    spec.byte_fallback = any(BYTE_PIECE.match(p) for p in pieces)
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = unk_id, bos_id, eos_id, pad_id
    spec.unk_surface = " \u2047 "
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = True
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    for i, (piece, score) in enumerate(zip(pieces, scores)):
        entry = proto.pieces.add()
        entry.piece = piece
        entry.score = score
        entry.type = types[i] if types is not None else piece_type(piece, i, unk_id, bos_id, eos_id)
    return proto
