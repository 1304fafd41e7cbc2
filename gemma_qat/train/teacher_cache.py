"""Offline distillation: the teacher's top-k log-probs, computed once and read back in training.

When the teacher forward dominates the step (a 31B teacher for an E2B student), run it once over
the training rows (`gemma-qat cache-teacher`, `build_teacher_cache`); a run with
`teacher.cache = DIR` then reads rows and top-k from DIR and trains on loss/distill.py's topk_distill_loss
with no teacher in memory.

DIR/cache.json                 k, seq_len, temperature, dtype, vocab, rows, teacher, data, files
DIR/rows-NNNNN.array_record    one record per packed row (np.savez bytes, read with allow_pickle=False):
    tokens, targets, loss_mask, segment_ids, positions [T] int32
    topk_logprobs [T, k] float16|float32 = top-k of log_softmax(teacher_logits / T), full vocab
    topk_ids      [T, k] int32

Rows, not batches: a training run with global batch G reads rows b·G ... (b+1)·G − 1 as global batch
b, and host i of n reads its G/n consecutive rows of each (the layout
make_array_from_process_local_data gives). So one cache serves any batch size and host count, and the
global batches never depend on how many hosts read them.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np

from gemma_qat import sharding
from gemma_qat.data import Tokenizer, make_train_iterator
from gemma_qat.data.packing import ROW_KEYS
from gemma_qat.loss import distill
from gemma_qat.model import checkpoint

log = logging.getLogger(__name__)

FORMAT = 1
META_FILE = "cache.json"
TOPK_KEYS = ("topk_logprobs", "topk_ids")
DTYPES = ("float16", "float32")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# ---------------------------------------------------------------------------------------- records
def encode_row(row: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **row)  # uncompressed: top-k log-probs barely compress, and reads stay cheap
    return buf.getvalue()


def decode_row(raw: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(raw), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def write_cache(out_dir, rows: Iterable[dict[str, np.ndarray]], meta: dict, *, rows_per_file: int = 4096,
                force: bool = False) -> dict:
    """Writes `rows` (dicts of ROW_KEYS + TOPK_KEYS) as ArrayRecord files plus cache.json into a
    temporary folder that replaces `out_dir` only once complete (an interrupted build leaves no
    half cache behind). Returns the metadata written."""
    from array_record.python.array_record_module import ArrayRecordWriter

    with checkpoint.atomic_dir(out_dir, force=force) as tmp:
        files, n, writer, shape = [], 0, None, None
        for row in rows:
            _check_row(row, shape)
            shape = row["topk_ids"].shape
            if n % rows_per_file == 0:
                if writer is not None:
                    writer.close()
                files.append(f"rows-{len(files):05d}.array_record")
                writer = ArrayRecordWriter(str(tmp / files[-1]), "group_size:1")  # 1: cheap random access
            writer.write(encode_row(row))
            n += 1
        if writer is not None:
            writer.close()
        if n == 0:
            raise ValueError("no rows to cache")
        meta = {**meta, "format": FORMAT, "rows": n, "seq_len": shape[0], "k": shape[1], "files": files}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    return meta


def _check_row(row: dict, shape) -> None:
    missing = set(ROW_KEYS + TOPK_KEYS) - set(row)
    if missing:
        raise ValueError(f"cache row lacks {sorted(missing)}")
    t, k = row["topk_ids"].shape
    if shape is not None and (t, k) != shape:
        raise ValueError(f"cache rows differ in shape: {(t, k)} after {shape}")
    if row["topk_logprobs"].shape != (t, k) or any(row[key].shape != (t,) for key in ROW_KEYS):
        raise ValueError(f"cache row shapes disagree: { {key: v.shape for key, v in row.items()} }")


# ---------------------------------------------------------------------------------------- build
def build_teacher_cache(teacher_ckpt, data_spec: str, tokenizer, out_dir, *, k: int = 64, seq_len: int,
                        batch: int, num_batches: int, temperature: float = 1.0, seed: int = 0,
                        dtype: str = "float16", compute_dtype: str = "bfloat16", chunk_size: int = 256,
                        num_threads: int = 2, devices: Sequence[jax.Device] | None = None,
                        force: bool = False) -> dict:
    """Runs the teacher over the first `num_batches` batches of [batch, seq_len] packed rows that
    the training pipeline makes from `data_spec` (same seed ⇒ the same rows a run would read) and
    caches each row with its top-k. One process; the teacher is FSDP-sharded over `devices` (all
    local devices by default, as many as divide `batch`). Returns the metadata."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} must be one of {list(DTYPES)}")
    if min(k, seq_len, batch, num_batches) <= 0 or temperature <= 0:
        raise ValueError("k, seq_len, batch, num_batches and temperature must be > 0")
    cfg = checkpoint.load_config(teacher_ckpt)
    if k > cfg.vocab_size:
        raise ValueError(f"k={k} exceeds the teacher's vocab_size {cfg.vocab_size}")
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.load(tokenizer)

    from gemma_qat.model.transformer import Transformer
    from gemma_qat.train import state as state_lib

    devs = list(devices or jax.local_devices())
    n_dev = max(d for d in range(1, len(devs) + 1) if batch % d == 0)  # batch rows split evenly
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=n_dev), devs[:n_dev])
    _, params = checkpoint.load_model(teacher_ckpt, shardings=state_lib.param_shardings(cfg, mesh, "fsdp"))
    model = Transformer(cfg, dtype=_DTYPES[compute_dtype], param_dtype=jax.tree.leaves(params)[0].dtype)
    batch_sh = sharding.batch_sharding(mesh, "fsdp")

    @jax.jit
    def topk(p, b):
        h, table = model.apply({"params": p}, b["tokens"], b["positions"], b["segment_ids"], return_hidden=True)
        return distill.teacher_topk(h, table, k=k, softcap=cfg.final_softcap, temperature=temperature,
                                    chunk_size=chunk_size)

    it = make_train_iterator(data_spec, tok, seq_len=seq_len, global_batch_size=batch, seed=seed, shard_index=0,
                             shard_count=1, num_threads=num_threads, model_vocab_size=cfg.vocab_size)

    def rows() -> Iterator[dict]:
        pending = None  # fetch batch i while batch i+1 computes: the host never stalls the device
        with sharding.activate(mesh, "fsdp"):
            for i in range(num_batches + 1):
                nxt = None
                if i < num_batches:
                    host = next(it)
                    nxt = host, topk(params, {key: jax.device_put(host[key], batch_sh) for key in ROW_KEYS})
                if pending is not None:
                    host, (lp, ids) = pending
                    lp, ids = np.asarray(lp).astype(dtype), np.asarray(ids, np.int32)
                    for r in range(batch):
                        yield {**{key: host[key][r] for key in ROW_KEYS}, "topk_logprobs": lp[r], "topk_ids": ids[r]}
                    log.info("cached batch %d/%d", i, num_batches)
                pending = nxt

    meta = {"temperature": float(temperature), "dtype": dtype, "vocab_size": cfg.vocab_size,
            "final_softcap": cfg.final_softcap, "teacher": str(Path(teacher_ckpt).absolute()), "data": data_spec,
            "tokenizer": tok.name, "seed": seed, "batch": batch, "num_batches": num_batches}
    return write_cache(out_dir, rows(), meta, force=force)


# ---------------------------------------------------------------------------------------- read
class _HostBatches:
    """Random access: b → this host's rows of global batch b, stacked. A plain source, so grain
    gives the iterator exact checkpointable state (the batch index) and threaded prefetch."""

    def __init__(self, paths: list[str], num_rows: int, global_batch: int, shard_index: int, shard_count: int):
        self._src = grain.sources.ArrayRecordDataSource(paths)
        self._g, self._per_host = global_batch, global_batch // shard_count
        self._first = shard_index * self._per_host
        self._len = num_rows // global_batch

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, b: int) -> dict[str, np.ndarray]:
        start = b * self._g + self._first
        rows = [decode_row(r) for r in self._src.__getitems__(list(range(start, start + self._per_host)))]
        return {key: np.stack([r[key] for r in rows]) for key in rows[0]}


class TeacherCache:
    """A cache folder, checked on open: missing folder or metadata, or a missing row file, is a
    FileNotFoundError naming the folder; an unknown format a ValueError."""

    def __init__(self, directory):
        self.directory = Path(directory).absolute()
        hint = "build one with `gemma-qat cache-teacher`"
        if not self.directory.is_dir():
            raise FileNotFoundError(f"teacher.cache {str(self.directory)!r} is not a directory; {hint}")
        meta_path = self.directory / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"teacher.cache {str(self.directory)!r} has no {META_FILE}: not a teacher "
                                    f"cache; {hint}")
        try:
            self.meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"teacher.cache {meta_path} is corrupt: {e}") from None
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"teacher.cache {self.directory} has format {self.meta.get('format')!r}; this "
                             f"version reads format {FORMAT}: rebuild it")
        self.paths = [str(self.directory / f) for f in self.meta["files"]]
        lost = [p for p in self.paths if not Path(p).is_file()]
        if lost:
            raise FileNotFoundError(f"teacher.cache {self.directory} is incomplete: {lost} missing")

    @property
    def num_rows(self) -> int:
        return int(self.meta["rows"])

    def check(self, *, seq_len: int, temperature: float, vocab_size: int, global_batch_size: int) -> None:
        """The run must match what was cached; one ValueError listing every mismatch."""
        m, problems = self.meta, []
        if m["seq_len"] != seq_len:
            problems.append(f"data.seq_len={seq_len} but the cache has rows of {m['seq_len']}")
        if not np.isclose(m["temperature"], temperature):
            problems.append(f"distill.temperature={temperature} but the cache holds log-probs at T={m['temperature']}")
        if m["vocab_size"] != vocab_size:
            problems.append(f"the student's vocab_size is {vocab_size} but the teacher's was {m['vocab_size']}")
        if m["rows"] < global_batch_size:
            problems.append(f"data.global_batch_size={global_batch_size} exceeds the cache's {m['rows']} rows")
        if problems:
            raise ValueError(f"teacher.cache {self.directory} does not fit this run: " + "; ".join(problems))

    def make_iterator(self, global_batch_size: int, *, shard_index: int = 0, shard_count: int = 1,
                      num_threads: int = 2) -> grain.DatasetIterator:
        """Endless, checkpointable iterator of this host's batches [global_batch_size / shard_count, ...].
        Epochs repeat the rows in cache order; a partial last global batch is dropped."""
        if global_batch_size % shard_count:
            raise ValueError(f"global_batch_size={global_batch_size} is not divisible by {shard_count} hosts")
        src = _HostBatches(self.paths, self.num_rows, global_batch_size, shard_index, shard_count)
        if len(src) == 0:
            raise ValueError(f"teacher.cache {self.directory} has {self.num_rows} rows, fewer than one batch")
        ds = grain.MapDataset.source(src).repeat(None)
        read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(4, 2 * num_threads))
        return iter(ds.to_iter_dataset(read))
