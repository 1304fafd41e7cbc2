"""Grain input pipelines: documents -> tokens -> packed [B, T] int32 batches.

Train:  source -> shuffle(seed, reshuffled every epoch) -> host shard
        -> repeat -> (weighted mix) -> tokenize(+bos, +eos) -> chunk
        -> first-fit pack -> batch(global_batch_size // shard_count)

Sharding is a strided slice of the *globally* shuffled document order, with
the same seed on every host, so hosts see disjoint documents whose union per
epoch is the whole source. Everything is a pure function of (spec, seed,
shard), and the returned grain `DatasetIterator` checkpoints exactly via
`get_state()` / `set_state()`.

Batch dict (numpy int32, all [B, T]): tokens, targets, loss_mask,
segment_ids, positions (see packing.py for semantics).
"""

from __future__ import annotations

import functools
import itertools
from typing import Sequence

import grain
import numpy as np

from gemma_qat.data import packing
from gemma_qat.data.sources import SourceSpec, make_source, parse_spec
from gemma_qat.data.tokenizer import Tokenizer, check_vocab

Batch = dict[str, np.ndarray]  # each [B, T] int32


class _Tokenize:
    """Picklable map fn (grain may ship transforms to worker processes)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> np.ndarray:
        ids = self.tokenizer.encode(text, add_bos=True, add_eos=True)
        return np.asarray(ids, np.int32)  # [L]


def _non_empty(text: str) -> bool:
    return bool(text.strip())


def _resolve_shard(shard_index: int | None, shard_count: int | None
                   ) -> tuple[int, int]:
    if shard_index is None or shard_count is None:
        import jax  # Lazy: tests and CPU tools pass the shard explicitly.
        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} not in [0, {shard_count})")
    return shard_index, shard_count


def _per_host_batch(global_batch_size: int, shard_count: int) -> int:
    if global_batch_size <= 0 or global_batch_size % shard_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} is not divisible by the "
            f"host count shard_count={shard_count}")
    return global_batch_size // shard_count


def _sharded_docs(spec: SourceSpec, *, index: int, seed: int | None,
                  shard_index: int, shard_count: int) -> grain.MapDataset:
    """One source as a MapDataset[str]: optionally shuffled, then host-sharded."""
    ds = grain.MapDataset.source(make_source(spec))
    if len(ds) < shard_count:
        raise ValueError(f"{spec.scheme}:{spec.path} has {len(ds)} documents, "
                         f"fewer than shard_count={shard_count}")
    if seed is not None:
        # Distinct seed per mixture component so equal-sized sources don't get
        # the same permutation; ShuffleMapDataset reseeds each epoch itself.
        ds = ds.shuffle(seed=(seed + 7919 * index) % 2**32)
    return ds[shard_index::shard_count]


def doc_dataset(spec, *, seed: int | None, shard_index: int, shard_count: int,
                num_epochs: int | None) -> grain.MapDataset:
    """Documents (str) for this host; weighted mix when spec has >1 source.

    num_epochs counts passes over each source (None = infinite). A finite
    mixture ends when its first component runs out (grain mix semantics).
    seed=None disables shuffling and, for mixtures, concatenates instead of
    mixing (evaluation reads every document exactly once).
    """
    specs = parse_spec(spec)
    parts = [_sharded_docs(s, index=i, seed=seed, shard_index=shard_index,
                           shard_count=shard_count) for i, s in enumerate(specs)]
    if num_epochs != 1:
        parts = [p.repeat(num_epochs) for p in parts]
    if len(parts) == 1:
        return parts[0]
    if seed is None:
        return grain.MapDataset.concatenate(parts)
    return grain.MapDataset.mix(parts, weights=[s.weight for s in specs])


def make_train_dataset(
    spec: str | SourceSpec | Sequence[SourceSpec],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    shard_index: int | None = None,
    shard_count: int | None = None,
    num_epochs: int | None = None,
    num_packing_bins: int | None = None,
    num_threads: int = 4,
    model_vocab_size: int | None = None,
) -> grain.IterDataset:
    """The training IterDataset (see make_train_iterator); exposed so callers
    can append grain stages, e.g. `.mp_prefetch(...)` (which interleaves
    worker outputs, so batch order differs from the in-process iterator)."""
    if model_vocab_size is not None:
        check_vocab(tokenizer, model_vocab_size)
    shard_index, shard_count = _resolve_shard(shard_index, shard_count)
    batch_size = _per_host_batch(global_batch_size, shard_count)
    docs = doc_dataset(spec, seed=seed, shard_index=shard_index,
                       shard_count=shard_count, num_epochs=num_epochs)
    # Filter + tokenize on the MapDataset so grain's read threads parallelise
    # them; filtered elements become None and are skipped by to_iter_dataset.
    ids = docs.filter(_non_empty).map(_Tokenize(tokenizer))
    it_ds = ids.to_iter_dataset(grain.ReadOptions(
        num_threads=num_threads, prefetch_buffer_size=max(64, 4 * num_threads)))
    # One open bin per batch row is a good padding/latency trade-off.
    bins = batch_size if num_packing_bins is None else num_packing_bins
    rows = packing.pack_dataset(it_ds, seq_len, num_packing_bins=bins, seed=seed)
    return _batch(rows, batch_size, seq_len)


def _batch(rows: grain.IterDataset, batch_size: int, seq_len: int
           ) -> grain.IterDataset:
    # A finite stream's last batch is zero-padded rather than dropped: no
    # document is lost and shapes stay static (no recompilation).
    return rows.batch(batch_size, batch_fn=functools.partial(
        packing.stack_rows, batch_size=batch_size, seq_len=seq_len))


def make_train_iterator(
    spec: str | SourceSpec | Sequence[SourceSpec],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    shard_index: int | None = None,
    shard_count: int | None = None,
    num_epochs: int | None = None,
    num_packing_bins: int | None = None,
    num_threads: int = 4,
    model_vocab_size: int | None = None,
) -> grain.DatasetIterator:
    """Checkpointable iterator of this host's batches, each [B_host, T] int32.

    B_host = global_batch_size // shard_count (ValueError if not divisible).
    shard_index / shard_count default to jax.process_index() / process_count().
    With finite num_epochs the last batch is zero-padded (inert rows).
    model_vocab_size, if given, is checked with check_vocab.
    Save with `state = it.get_state()` (a JSON-serialisable dict) and resume
    with `it.set_state(state)` on a freshly built iterator with the same args.
    """
    return iter(make_train_dataset(
        spec, tokenizer, seq_len=seq_len, global_batch_size=global_batch_size,
        seed=seed, shard_index=shard_index, shard_count=shard_count,
        num_epochs=num_epochs, num_packing_bins=num_packing_bins,
        num_threads=num_threads, model_vocab_size=model_vocab_size))


def make_eval_batches(
    spec: str | SourceSpec | Sequence[SourceSpec],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    global_batch_size: int,
    shard_index: int = 0,
    shard_count: int = 1,
    num_batches: int | None = None,
    num_packing_bins: int | None = None,
) -> list[Batch]:
    """Deterministic eval batches: no shuffle, one pass, all docs once.

    The last batch is zero-padded to full size (inert rows: loss_mask 0).
    num_batches, if given, truncates or appends all-zero batches so every host
    runs the same number of eval steps (needed for multi-host collectives).
    """
    shard_index, shard_count = _resolve_shard(shard_index, shard_count)
    batch_size = _per_host_batch(global_batch_size, shard_count)
    docs = doc_dataset(spec, seed=None, shard_index=shard_index,
                       shard_count=shard_count, num_epochs=1)
    ids = docs.filter(_non_empty).map(_Tokenize(tokenizer))
    bins = batch_size if num_packing_bins is None else num_packing_bins
    rows = packing.pack_dataset(ids.to_iter_dataset(), seq_len,
                                num_packing_bins=bins)
    batches = list(itertools.islice(iter(_batch(rows, batch_size, seq_len)),
                                    num_batches))
    while num_batches is not None and len(batches) < num_batches:
        batches.append(packing.stack_rows([], batch_size, seq_len))
    return batches
