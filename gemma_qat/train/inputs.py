"""The run's data: resolve `[data]` into a source spec and tokenizer (building the stdlib corpus for
`python-corpus`), check every file before any compilation, and build this host's iterator."""

from __future__ import annotations

import logging
from pathlib import Path

import grain
import jax
from jax.experimental import multihost_utils

from gemma_qat.data import Tokenizer, build_python_corpus, make_source, make_train_iterator, parse_spec
from gemma_qat.data import train_sentencepiece
from gemma_qat.train.config import PYTHON_CORPUS, RunConfig

log = logging.getLogger(__name__)


def _build_python_corpus(cfg: RunConfig, model_vocab: int) -> tuple[str, Path]:
    """<run_dir>/data/{train,valid}.jsonl and tokenizer.model, built once and reused on resume (both
    are deterministic, so a resumed run on a fresh machine rebuilds identical files)."""
    d = cfg.data
    data_dir = Path(cfg.run_dir) / "data"
    train = data_dir / "train.jsonl"
    tok = Path(d.tokenizer) if d.tokenizer else data_dir / "tokenizer.model"
    if jax.process_index() == 0:
        if not train.is_file():
            log.info("building the Python corpus (%d bytes%s) in %s", d.corpus_bytes,
                     ", stdlib then site-packages" if d.corpus_site_packages else "", data_dir)
            build_python_corpus(data_dir, max_bytes=d.corpus_bytes, site_packages=d.corpus_site_packages)
        if not tok.is_file():
            vocab = min(d.tokenizer_vocab, model_vocab)
            log.info("training a %d-piece SentencePiece tokenizer on %s", vocab, train)
            train_sentencepiece([train], data_dir / "tokenizer", vocab_size=vocab)
    if jax.process_count() > 1:  # other hosts read what process 0 wrote (shared file system)
        multihost_utils.sync_global_devices("gemma_qat.python_corpus")
    return f"jsonl:{train}", tok


def resolve(cfg: RunConfig, model_vocab: int) -> tuple[str, Tokenizer]:
    """(spec, tokenizer), with every data file and the tokenizer checked now: a typo should fail in
    a second, not after minutes of compilation."""
    if cfg.data.spec == PYTHON_CORPUS:
        spec, tok_path = _build_python_corpus(cfg, model_vocab)
    else:
        spec, tok_path = cfg.data.spec, Path(cfg.data.tokenizer)
    for one in parse_spec(spec):
        try:
            make_source(one)  # opens the files / globs; tfds builds its reader
        except FileNotFoundError as e:
            raise FileNotFoundError(f"data.spec {spec!r}: {e}") from None
    if not tok_path.is_file():
        raise FileNotFoundError(f"data.tokenizer {str(tok_path)!r} does not exist")
    return spec, Tokenizer.load(tok_path)


def make_iterator(cfg: RunConfig, spec: str, tokenizer: Tokenizer, model_vocab: int) -> grain.DatasetIterator:
    """This host's batches [global_batch_size / process_count, seq_len]; endless (epochs repeat)."""
    d = cfg.data
    return make_train_iterator(
        spec, tokenizer, seq_len=d.seq_len, global_batch_size=d.global_batch_size, seed=d.seed,
        shard_index=jax.process_index(), shard_count=jax.process_count(), num_threads=d.num_threads,
        model_vocab_size=model_vocab)
