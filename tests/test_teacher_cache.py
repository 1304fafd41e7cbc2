"""Offline distillation: the teacher's top-k cached to ArrayRecord (`cache-teacher`) and read back
by a run with `teacher.cache`: exact round trip and host split, the cache holds the pipeline's rows
and the teacher's top-k, a cached run trains and its first loss is topk_distill_loss of the teacher
on that batch, resume restores the cache iterator, and bad caches fail with one clear error."""

import json

import jax
import numpy as np
import pytest

from gemma_qat.data import Tokenizer, make_train_iterator
from gemma_qat.loss.distill import teacher_topk, topk_distill_loss
from gemma_qat.model.checkpoint import load_model
from gemma_qat.model.transformer import Transformer
from gemma_qat.train import teacher_cache as tc
from gemma_qat.train.loop import train
from gemma_qat.train.signals import StopFlag
from gemma_qat.train.state import perturb_params
from gemma_qat.cli import cache_teacher as cli
from train_helpers import base_config, data_files, teacher_checkpoint

ONE = jax.devices()[:1]
QUIET = dict(devices=ONE, print_fn=lambda s: None)
K, SEQ, BATCH = 64, 32, 4
CACHED, STEPS = 8, 16  # batches in the cache; the run goes over it twice


def _cfg(run_dir, *extra):
    return base_config(run_dir, f"data.global_batch_size={BATCH}", f"optimizer.total_steps={STEPS}",
                       "checkpoint.every_steps=4", *extra)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """Built through the CLI entry point (float32 log-probs, so the loss check below is tight)."""
    train_file, tok = data_files()
    out = tmp_path_factory.mktemp("cache") / "tiny-k64"
    assert cli.main(["--teacher", teacher_checkpoint("tiny-e2b"), "--data", f"jsonl:{train_file}",
                     "--tokenizer", tok, "--out", str(out), "--seq-len", str(SEQ), "--batch", str(BATCH),
                     "--num-batches", str(CACHED), "--k", str(K), "--dtype", "float32",
                     "--compute-dtype", "float32", "--chunk-size", "16"]) == 0
    return out


@pytest.fixture(scope="module")
def cached_run(cache_dir, tmp_path_factory):
    return train(_cfg(tmp_path_factory.mktemp("run"), f"teacher.cache={cache_dir}"), **QUIET)


def _rows(n, k=5, t=6, seed=0):
    rng = np.random.default_rng(seed)
    ints = lambda *s: rng.integers(0, 1000, s, dtype=np.int32)
    return [{"tokens": ints(t), "targets": ints(t), "loss_mask": ints(t) % 2, "segment_ids": ints(t),
             "positions": ints(t), "topk_logprobs": rng.standard_normal((t, k)).astype(np.float16),
             "topk_ids": ints(t, k)} for _ in range(n)]


def test_round_trip_is_exact_and_hosts_split_each_global_batch(tmp_path):
    rows = _rows(10)  # 3 files of <= 4 rows; global batch 4 → 2 full batches, 2 rows dropped
    meta = tc.write_cache(tmp_path / "c", rows, {"temperature": 1.0, "vocab_size": 1000}, rows_per_file=4)
    assert meta["files"] == ["rows-00000.array_record", "rows-00001.array_record", "rows-00002.array_record"]
    cache = tc.TeacherCache(tmp_path / "c")
    one = cache.make_iterator(4)
    hosts = [cache.make_iterator(4, shard_index=i, shard_count=2) for i in range(2)]
    for b in range(3):  # the third batch is the second epoch: rows repeat in cache order
        full = next(one)
        want = {key: np.stack([r[key] for r in rows[4 * (b % 2):4 * (b % 2) + 4]]) for key in rows[0]}
        parts = [next(h) for h in hosts]
        for key in want:
            assert full[key].dtype == want[key].dtype
            np.testing.assert_array_equal(full[key], want[key])
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), want[key])
    # The iterator is checkpointable: a fresh one set to a saved state continues identically.
    state = json.loads(json.dumps(hosts[1].get_state()))
    again = cache.make_iterator(4, shard_index=1, shard_count=2)
    again.set_state(state)
    np.testing.assert_array_equal(next(again)["topk_logprobs"], next(hosts[1])["topk_logprobs"])


def test_cache_holds_the_pipeline_rows_and_the_teacher_topk(cache_dir):
    meta = json.loads((cache_dir / "cache.json").read_text())
    assert (meta["rows"], meta["k"], meta["seq_len"], meta["dtype"]) == (BATCH * CACHED, K, SEQ, "float32")
    train_file, tok = data_files()
    pipeline = make_train_iterator(f"jsonl:{train_file}", Tokenizer.load(tok), seq_len=SEQ, global_batch_size=BATCH,
                                   seed=0, shard_index=0, shard_count=1, num_threads=1)
    config, teacher = load_model(teacher_checkpoint("tiny-e2b"))
    cached = tc.TeacherCache(cache_dir).make_iterator(BATCH)
    for _ in range(2):
        want, got = next(pipeline), next(cached)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
        h, e = Transformer(config).apply({"params": teacher}, want["tokens"], want["positions"], want["segment_ids"],
                                         return_hidden=True)
        lp, ids = teacher_topk(h, e, k=K, softcap=config.final_softcap, chunk_size=16)
        # The cache was computed FSDP-sharded over 4 devices: equal up to reduction order. Near-ties
        # may swap places in the top-k, so ids are compared on the clear (gap > 1e-4) ranks.
        np.testing.assert_allclose(got["topk_logprobs"], lp, rtol=2e-5, atol=1e-5)  # measured: rel 4e-6
        gap = np.abs(np.diff(np.asarray(lp), axis=-1, append=-np.inf)) > 1e-4
        clear = gap & np.concatenate([np.ones_like(gap[..., :1]), gap[..., :-1]], -1)
        assert clear.mean() > 0.95
        np.testing.assert_array_equal(got["topk_ids"][clear], np.asarray(ids)[clear])


def test_cached_run_trains_and_first_loss_is_topk_kl_of_the_teacher(cached_run):
    # The second epoch sees the same 8 batches again: the loss fell on every one of them.
    first, second = (np.array([cached_run.losses[s + e * CACHED] for s in range(1, CACHED + 1)]) for e in (0, 1))
    assert np.all(second < first) and second.mean() < 0.8 * first.mean(), (first, second)
    # Independently: teacher forward → top-k → topk_distill_loss against the initial student.
    train_file, tok = data_files()
    batch = next(make_train_iterator(f"jsonl:{train_file}", Tokenizer.load(tok), seq_len=SEQ,
                                     global_batch_size=BATCH, seed=0, shard_index=0, shard_count=1, num_threads=1))
    config, teacher = load_model(teacher_checkpoint("tiny-e2b"))
    student = perturb_params(jax.tree.map(lambda w: w + 0, teacher), seed=0, noise=0.5)  # base_config's init
    apply = lambda p: Transformer(config).apply({"params": p}, batch["tokens"], batch["positions"],
                                                batch["segment_ids"], return_hidden=True)
    lp, ids = teacher_topk(*apply(teacher), k=K, softcap=config.final_softcap, chunk_size=16)
    want, _ = topk_distill_loss(*apply(student), lp, ids, softcap=config.final_softcap, mask=batch["loss_mask"],
                                chunk_size=16)
    assert cached_run.losses[1] == pytest.approx(float(want), rel=1e-5)


def test_resume_restores_the_cache_iterator(cache_dir, cached_run, tmp_path):
    flag = StopFlag()
    # Stop at 10, in the cache's second epoch: the iterator state must carry the wrap-around too.
    stop_at_10 = lambda step, m: flag.request("test") if step == 9 else None  # metrics are one step late
    first = train(_cfg(tmp_path, f"teacher.cache={cache_dir}"), stop=flag, on_step=stop_at_10, **QUIET)
    assert first.stopped_early and max(first.losses) == 10
    second = train(_cfg(tmp_path, f"teacher.cache={cache_dir}"), **QUIET)
    assert second.resumed_from == 10
    resumed = {**first.losses, **second.losses}
    assert [resumed[s] for s in range(1, STEPS + 1)] == [cached_run.losses[s] for s in range(1, STEPS + 1)]
    # A checkpoint of a cached run is not resumed by an online run (different data iterators).
    with pytest.raises(ValueError, match="teacher.cache switched on/off"):
        train(_cfg(tmp_path), **QUIET)


def test_bad_cache_is_one_clear_error(cache_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"teacher.cache '.*nope' is not a directory; build one with "
                                                r"`gemma-qat cache-teacher`"):
        train(_cfg(tmp_path, f"teacher.cache={tmp_path}/nope"), **QUIET)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no cache.json: not a teacher cache"):
        train(_cfg(tmp_path, f"teacher.cache={tmp_path}/empty"), **QUIET)
    with pytest.raises(ValueError, match=r"does not fit this run: data.seq_len=64 but the cache has rows of 32; "
                                         r"distill.temperature=2.0 but the cache holds log-probs at T=1.0"):
        train(_cfg(tmp_path, f"teacher.cache={cache_dir}", "data.seq_len=64", "distill.temperature=2"), **QUIET)
    with pytest.raises(ValueError, match=r"teacher.cache needs distill.schedule = 'constant'.*teacher.cache needs "
                                         r"distill.alpha = 0"):
        _cfg(tmp_path, f"teacher.cache={cache_dir}", "distill.schedule=linear", "distill.alpha=0.5")
