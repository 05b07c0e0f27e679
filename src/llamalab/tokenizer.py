"""SentencePiece tokenizer (Meta's ``tokenizer.model`` or one trained by llamalab with LLaMA's settings)."""

from __future__ import annotations

import io
import os
import random
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import sentencepiece as spm

# Meta's trainer_spec and normalizer_spec, as stored in LLaMA's tokenizer.model (BPE, digits split, unknown
# characters fall back to UTF-8 bytes, no normalization, whitespace kept as is); vocab_size is the caller's.
LLAMA_TRAINER_SETTINGS = dict(
    model_type="bpe",
    character_coverage=0.99995,
    split_digits=True,
    byte_fallback=True,
    normalization_rule_name="identity",
    add_dummy_prefix=True,
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
    max_sentencepiece_length=16,
    max_sentence_length=4192,
    split_by_unicode_script=True,
    split_by_whitespace=True,
    split_by_number=True,
    treat_whitespace_as_suffix=False,
    seed_sentencepiece_size=1_000_000,
    shrinking_factor=0.75,
    num_sub_iterations=2,
    vocabulary_output_piece_score=True,
    hard_vocab_limit=True,
    use_all_vocab=False,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    unk_surface=" \u2047 ",
)
# Characters per training sentence: SentencePiece skips sentences over max_sentence_length (4192) bytes.
SENTENCE_CHARS = 1000
TOKENIZER_FILE = "tokenizer.model"  # what ``train_tokenizer`` writes into its output folder


class Tokenizer:
    """Thin wrapper over a SentencePiece model with LLaMA's conventions: BOS prepended, EOS optional."""

    def __init__(self, model_path: str | Path):
        """``model_path``: a SentencePiece model file, or a folder holding ``tokenizer.model``."""
        self.path = Path(model_path)
        if self.path.is_dir():
            self.path = self.path / "tokenizer.model"
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such file; expected a SentencePiece tokenizer.model "
                                    "or a folder holding one")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(self.path))
        except Exception as exc:  # sentencepiece raises a bare OSError/RuntimeError with no file name
            raise ValueError(f"{self.path}: not a SentencePiece model ({exc})") from exc
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.pad_id: int = self.sp.pad_id()
        self.unk_id: int = self.sp.unk_id()

    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self.sp.EncodeAsIds(text)
        if bos and self.bos_id >= 0:
            ids = [self.bos_id] + ids
        if eos and self.eos_id >= 0:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.IdToPiece(int(i))

    def special_ids(self) -> dict[str, int]:
        return {"bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id, "unk_id": self.unk_id}


def iter_sentences(texts: Iterable[str], max_chars: int = SENTENCE_CHARS) -> Iterator[str]:
    """Training sentences of documents: their non-empty lines, long lines cut at whitespace into pieces of at
    most ``max_chars`` characters (SentencePiece would silently skip them otherwise)."""
    for text in texts:
        for line in text.split("\n"):
            line = line.rstrip("\r")
            while len(line) > max_chars:
                cut = line.rfind(" ", max_chars // 2, max_chars)
                cut = cut if cut > 0 else max_chars
                yield line[:cut]
                line = line[cut:]
            if line.strip():
                yield line


def sample_sentences(texts: Iterable[str], max_sentences: int, seed: int = 0) -> list[str]:
    """A uniform sample of at most ``max_sentences`` sentences (reservoir sampling: one pass, bounded memory)."""
    rng = random.Random(seed)
    sample: list[str] = []
    for n, sentence in enumerate(iter_sentences(texts)):
        if n < max_sentences:
            sample.append(sentence)
        else:
            j = rng.randrange(n + 1)
            if j < max_sentences:
                sample[j] = sentence
    return sample


def sample_sources(sources: Mapping[str, Iterable[str]], max_sentences: int, seed: int = 0) -> dict[str, list[str]]:
    """Per-source samples so that every source is represented: each gets an equal cap of the sentence budget
    (a small source gives everything it has)."""
    if not sources:
        raise ValueError("no sources to sample tokenizer training text from")
    cap = max(1, max_sentences // len(sources))
    return {name: sample_sentences(texts, cap, seed=seed + i) for i, (name, texts) in enumerate(sources.items())}


def train_tokenizer(texts: Iterable[str], vocab_size: int, output_dir: str | os.PathLike, *,
                    max_sentences: int = 2_000_000, seed: int = 0, num_threads: int | None = None,
                    force: bool = False, **overrides) -> Path:
    """Train a SentencePiece BPE model with LLaMA's settings on (a sample of) ``texts``; returns the path of
    the written ``tokenizer.model``.

    ``texts`` are documents: they are split into lines and at most ``max_sentences`` lines are kept by
    seeded reservoir sampling. ``overrides`` replace entries of :data:`LLAMA_TRAINER_SETTINGS`."""
    unknown = set(overrides) - set(LLAMA_TRAINER_SETTINGS)
    if unknown:
        raise ValueError(f"unknown trainer settings: {', '.join(sorted(unknown))}")
    sentences = sample_sentences(texts, max_sentences, seed=seed)
    if not sentences:
        raise ValueError("no training text for the tokenizer (all documents were empty)")
    from .fs import atomic_write_bytes, check_output_folder

    output_dir = Path(output_dir)
    check_output_folder(output_dir, (TOKENIZER_FILE, f".{TOKENIZER_FILE}.tmp-*"), "tokenizer folder", force=force)
    output_dir.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    settings = {**LLAMA_TRAINER_SETTINGS, **overrides}
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
            input_sentence_size=0, shuffle_input_sentence=False,  # sampled above
            num_threads=num_threads or min(os.cpu_count() or 1, 16), minloglevel=2, **settings,
        )
    except RuntimeError as exc:  # e.g. "Vocabulary size is smaller than required_chars. 300 vs 400."
        raise ValueError(f"tokenizer training failed with vocab_size={vocab_size} on {len(sentences)} "
                         f"sentences: {exc}") from exc
    return atomic_write_bytes(output_dir / TOKENIZER_FILE, model.getvalue())


def model_settings(model_path: str | os.PathLike) -> dict:
    """The trainer and normalizer settings stored in a SentencePiece model file (needs ``protobuf``)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_path).read_bytes())
    t, n = proto.trainer_spec, proto.normalizer_spec
    return {
        "model_type": sentencepiece_model_pb2.TrainerSpec.ModelType.Name(t.model_type).lower(),
        "vocab_size": len(proto.pieces),
        "character_coverage": round(t.character_coverage, 6),
        **{k: getattr(t, k) for k in (
            "split_digits", "byte_fallback", "allow_whitespace_only_pieces",
            "max_sentencepiece_length", "split_by_unicode_script", "split_by_whitespace", "split_by_number",
            "unk_id", "bos_id", "eos_id", "pad_id")},
        "normalization_rule_name": n.name,
        "add_dummy_prefix": n.add_dummy_prefix,
        "remove_extra_whitespaces": n.remove_extra_whitespaces,
    }
