"""A tiny Gemma-shaped tokenizer.json for GGUF tests, trained with the `tokenizers` library.

Shape of Gemma's own: BPE on raw UTF-8 with `▁` for spaces, byte fallback to `<0x00>`..`<0xFF>`
pieces, ids pad=0 eos=1 bos=2 unk=3. The byte pieces live in the model vocabulary (not as added
tokens), as in Gemma's tokenizer.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, trainers

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
BYTES = [f"<0x{b:02X}>" for b in range(256)]

TRAIN_TEXT = """The quick brown fox jumps over the lazy dog.
Quantization aware training keeps the student close to its teacher.
llama.cpp runs GGUF files on the CPU, one block of thirty-two weights at a time.
She sells sea shells by the sea shore; the shells she sells are surely sea shells.
In the beginning the model saw random tokens, then it learned the patterns of text.
Numbers like 12345 and 67890 are split into digits by many tokenizers.
"""


def train_tokenizer(vocab_size: int = 512) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS + BYTES, show_progress=False,
                                  min_frequency=1)
    tok.train_from_iterator([TRAIN_TEXT * 4], trainer=trainer)
    # byte pieces are ordinary vocabulary entries in Gemma's tokenizer.json, not added tokens
    j = json.loads(tok.to_str())
    j["added_tokens"] = [a for a in j["added_tokens"] if a["content"] in SPECIALS]
    return Tokenizer.from_str(json.dumps(j))


def write_tokenizer(out: Path, vocab_size: int = 512) -> Path:
    path = Path(out) / "tokenizer.json"
    path.write_text(train_tokenizer(vocab_size).to_str(), encoding="utf-8")
    return path
