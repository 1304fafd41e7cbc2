"""Data: sources, tokenizer, packing and grain input pipelines."""

from gemma_qat.data.corpus import build_python_corpus
from gemma_qat.data.packing import ROW_KEYS, pack_documents
from gemma_qat.data.pipeline import make_eval_batches, make_train_iterator
from gemma_qat.data.sources import SourceSpec, make_source, parse_spec
from gemma_qat.data.tokenizer import Tokenizer, check_vocab, train_sentencepiece

__all__ = [
    "ROW_KEYS", "SourceSpec", "Tokenizer", "build_python_corpus",
    "check_vocab", "make_eval_batches", "make_source", "make_train_iterator",
    "pack_documents", "parse_spec", "train_sentencepiece",
]
