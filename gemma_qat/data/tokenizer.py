"""Tokenizer wrapper (SentencePiece, optionally HF tokenizer.json) + trainer.

Gemma ships a SentencePiece model with byte fallback and the id convention
pad=0, eos=1, bos=2, unk=3. `train_sentencepiece` reproduces that convention
for small stand-in tokenizers so the rest of the pipeline never special-cases
"real" vs "toy" vocabularies.
"""

from __future__ import annotations

import io
import itertools
import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import sentencepiece as spm

START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"
CHAT_SYMBOLS = (START_OF_TURN, END_OF_TURN)
# Gemma's id convention; asserted by train_sentencepiece's output.
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3


class Tokenizer:
    """Thin, picklable wrapper exposing the ids the data pipeline needs.

    Holds either a SentencePieceProcessor or a `tokenizers.Tokenizer`. Pickling
    goes through the serialized model so grain worker processes can receive it.
    """

    def __init__(self, *, sp_proto: bytes | None = None,
                 hf_json: str | None = None, name: str = "<memory>"):
        if (sp_proto is None) == (hf_json is None):
            raise ValueError("Pass exactly one of sp_proto / hf_json.")
        self.name = name
        self._sp_proto, self._hf_json = sp_proto, hf_json
        self._sp = self._hf = None
        if sp_proto is not None:
            self._sp = spm.SentencePieceProcessor()
            try:
                self._sp.LoadFromSerializedProto(sp_proto)
            except Exception as e:  # SP raises RuntimeError/OSError variants.
                raise ValueError(
                    f"{name} is not a valid SentencePiece model: {e}") from e
        else:
            import tokenizers  # Local: only needed for tokenizer.json files.
            try:
                self._hf = tokenizers.Tokenizer.from_str(hf_json)
            except Exception as e:
                raise ValueError(f"{name} is not a valid tokenizer.json: {e}") from e

    # ---- construction -------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Loads `tokenizer.model` (SentencePiece) or `tokenizer.json` (HF)."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"Tokenizer file not found: {p}")
        if p.suffix == ".json":
            return cls(hf_json=p.read_text(encoding="utf-8"), name=str(p))
        return cls(sp_proto=p.read_bytes(), name=str(p))

    def __getstate__(self):
        return {"sp_proto": self._sp_proto, "hf_json": self._hf_json,
                "name": self.name}

    def __setstate__(self, state):
        self.__init__(**state)

    def __repr__(self):
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size})"

    # ---- ids ----------------------------------------------------------------
    def _hf_id(self, *pieces: str) -> int:
        for piece in pieces:
            i = self._hf.token_to_id(piece)
            if i is not None:
                return i
        return -1

    @property
    def vocab_size(self) -> int:
        if self._sp is not None:
            return self._sp.get_piece_size()
        return self._hf.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id() if self._sp is not None else self._hf_id("<bos>")

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id() if self._sp is not None else self._hf_id("<eos>")

    @property
    def pad_id(self) -> int:
        pid = self._sp.pad_id() if self._sp is not None else self._hf_id("<pad>")
        # Models without a pad piece: 0 is always a valid id and padding is
        # identified by segment_ids == 0 anyway, never by the token value.
        return pid if pid >= 0 else 0

    def piece_to_id(self, piece: str) -> int:
        if self._sp is not None:
            i = self._sp.piece_to_id(piece)
            return -1 if i == self._sp.unk_id() and piece != "<unk>" else i
        return self._hf_id(piece)

    # ---- text <-> ids -------------------------------------------------------
    def encode(self, text: str, *, add_bos: bool = False,
               add_eos: bool = False) -> list[int]:
        if self._sp is not None:
            ids = self._sp.encode(text)
        else:
            ids = self._hf.encode(text, add_special_tokens=False).ids
        if add_bos:
            ids = [self.bos_id] + ids
        if add_eos:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if self._sp is not None:
            return self._sp.decode(ids)  # Drops control ids (pad/bos/eos).
        drop = {self.bos_id, self.eos_id, self.pad_id}
        return self._hf.decode([i for i in ids if i not in drop],
                               skip_special_tokens=False)


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """Raises ValueError if the tokenizer can emit ids >= the model's vocab.

    A model vocab *larger* than the tokenizer is fine (Gemma pads its
    embedding table); the reverse would index out of the embedding.
    """
    if tokenizer.vocab_size > model_vocab_size:
        raise ValueError(
            f"Tokenizer {tokenizer.name} has vocab_size={tokenizer.vocab_size} "
            f"but the model vocab_size={model_vocab_size}; token ids would "
            "index past the embedding table.")


def _iter_lines(text_files: Iterable[str | os.PathLike], texts: Iterable[str],
                *, text_field: str) -> Iterator[str]:
    """Yields non-empty lines from files (.jsonl: `text_field`) then `texts`.

    SentencePiece treats each input item as one "sentence"; lines keep items
    under its max_sentence_length so nothing is silently dropped.
    """
    def from_files():
        for item in text_files:
            p = Path(item)
            if not p.is_file():
                raise FileNotFoundError(f"Tokenizer training file not found: {p}")
            if p.suffix == ".jsonl":
                with open(p, encoding="utf-8") as f:
                    for l in f:
                        if l.strip():
                            yield json.loads(l).get(text_field, "")
            else:
                yield p.read_text(encoding="utf-8")

    for chunks in (from_files(), texts):
        for t in chunks:
            for line in t.split("\n"):
                if line.strip():
                    yield line


def train_sentencepiece(
    text_files: Iterable[str | os.PathLike],
    out_prefix: str | os.PathLike,
    *,
    vocab_size: int,
    texts: Iterable[str] = (),
    model_type: str = "bpe",
    text_field: str = "text",
    max_sentences: int = 2_000_000,
    num_threads: int = 2,
    user_defined_symbols: Sequence[str] = CHAT_SYMBOLS,
    seed: int = 0,
) -> Path:
    """Trains a Gemma-convention SentencePiece model; returns `<prefix>.model`.

    `text_files` are plain-text files, or .jsonl read via `text_field`;
    `texts` are extra raw strings. Each non-empty line is one SP sentence.
    Deterministic for identical inputs: input order is kept (no sentence
    shuffling) and the SP RNG is seeded.

    Normalisation is disabled (identity, no dummy prefix, whitespace kept) so
    decode(encode(s)) == s for any string, like Gemma's own tokenizer; unseen
    characters fall back to <0xNN> byte pieces.
    """
    min_vocab = 4 + len(user_defined_symbols) + 256 + 1
    if vocab_size < min_vocab:
        raise ValueError(f"vocab_size={vocab_size} too small; byte fallback "
                         f"alone needs >= {min_vocab} pieces")
    lines = list(itertools.islice(
        _iter_lines(text_files, texts, text_field=text_field), max_sentences))
    if not lines:
        raise ValueError("No training text found in inputs.")
    spm.set_random_generator_seed(seed)
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    model_path = out_prefix.with_name(out_prefix.name + ".model")
    # Train into memory so a failed run never leaves a truncated .model behind.
    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=writer,
            model_type=model_type, vocab_size=vocab_size,
            byte_fallback=True, character_coverage=0.9995,
            pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=UNK_ID,
            pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
            unk_piece="<unk>",
            # User-defined (not control) so the literal text "<start_of_turn>"
            # in a rendered chat becomes one id, as in Gemma's tokenizer.
            user_defined_symbols=list(user_defined_symbols),
            normalization_rule_name="identity", add_dummy_prefix=False,
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
            split_digits=True, input_sentence_size=max_sentences,
            shuffle_input_sentence=False, num_threads=num_threads,
            minloglevel=2)
    except RuntimeError as e:  # e.g. "Vocabulary size too high" for tiny inputs
        raise ValueError(f"SentencePiece training for {model_path} failed "
                         f"(vocab_size={vocab_size}, {len(lines)} lines): {e}") from e
    model_path.write_bytes(writer.getvalue())
    return model_path
