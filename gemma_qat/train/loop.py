"""The training loop: set everything up sharded, resume if possible, step, log, checkpoint, stop
cleanly on SIGTERM.

    cfg ─► mesh ─► student (init or checkpoint) ─► TrainState (sharded) ─┐
                └► teacher ("same" or checkpoint), frozen, sharded ─────┤
    data iterator (grain, checkpointable) ─────────────────────────────┤
                                                                        ▼
    restore newest readable checkpoint ─► loop { step ─► metrics (one step late) ─► save? ─► stop? }

Nothing non-finite is ever saved (train/guard.py): the metrics are read one step late, except at a
step that saves, where they are read (and the parameters checked) before the checkpoint is written.

With `teacher.cache` set there is no teacher: the iterator reads packed rows plus the teacher's
top-k log-probs from the cache (train/teacher_cache.py) and the step minimises the top-k KL.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from gemma_qat import sharding
from gemma_qat.data import make_eval_batches
from gemma_qat.model import checkpoint
from gemma_qat.model.checkpoint import SCALES_JSON, load_quant_scales, save_quant_scales
from gemma_qat.model.layers import QuantPolicy
from gemma_qat.quant.policy import RecipePolicy, calibrate, check_q4_0_blocks
from gemma_qat.train import inputs, metrics as metrics_lib, optimizer as optim, state as state_lib, step as step_lib
from gemma_qat.train import build, guard as guard_lib, teacher_cache
from gemma_qat.train.checkpointing import RunCheckpointer
from gemma_qat.train.config import RunConfig
from gemma_qat.train.policy import resolve_policy
from gemma_qat.train.signals import StopFlag, install_handlers

log = logging.getLogger(__name__)
_DTYPES = build.DTYPES


@dataclasses.dataclass
class TrainResult:
    state: step_lib.TrainState
    losses: dict[int, float]  # steps done → loss of that step
    resumed_from: int | None
    stopped_early: bool  # a stop was requested (SIGTERM) before total_steps
    run_dir: Path


def _make_mesh(cfg: RunConfig, devices: Sequence[jax.Device] | None):
    try:
        return sharding.make_mesh(cfg.mesh, devices)
    except ValueError as e:
        raise ValueError(f"[mesh] does not fit the devices: {e}") from None


@dataclasses.dataclass
class _Run:
    """Everything `train` sets up before the first step."""
    state: step_lib.TrainState
    teacher_params: dict
    jstep: Callable
    batch_sharding: jax.sharding.NamedSharding
    iterator: object  # grain.DatasetIterator
    ckpt: RunCheckpointer
    logger: metrics_lib.MetricsLogger
    mesh: jax.sharding.Mesh
    resumed_from: int | None
    model_config: object  # ModelConfig of the student
    policy: QuantPolicy
    tokenizer: str


def _setup(cfg: RunConfig, quant_policy: QuantPolicy | None, devices, print_fn) -> _Run:
    run_dir = Path(cfg.run_dir)
    _check_writable(run_dir)
    mesh = _make_mesh(cfg, devices)
    build.check_batch_layout(cfg, mesh)
    parallelism, o = cfg.mesh.parallelism, cfg.optimizer
    param_dtype = _DTYPES[o.param_dtype]
    teacher_dtype = _DTYPES[cfg.teacher.param_dtype]

    s_cfg = state_lib.student_config(cfg.model.name)
    cache = None
    if cfg.teacher.cache:  # offline distillation: data and teacher top-k from the cache, no teacher
        cache = teacher_cache.TeacherCache(cfg.teacher.cache)
        cache.check(seq_len=cfg.data.seq_len, temperature=cfg.distill.temperature, vocab_size=s_cfg.vocab_size,
                    global_batch_size=cfg.data.global_batch_size)
        tokenizer_name = cache.meta["tokenizer"]
        print_fn(f"offline distillation from {cache.directory} ({cache.num_rows} rows, top-{cache.meta['k']} "
                 f"of {cache.meta['teacher']})")
    else:
        if cfg.teacher.checkpoint != "same":  # before any heavy work: a wrong teacher fails fast
            state_lib.check_teacher(checkpoint.load_config(cfg.teacher.checkpoint), s_cfg, cfg.teacher.checkpoint)
        spec, tokenizer = inputs.resolve(cfg, s_cfg.vocab_size)
        tokenizer_name = tokenizer.name
    q = cfg.quant
    policy = quant_policy if quant_policy is not None else resolve_policy(q.recipe, s_cfg, q.q4_0_impl, q.backend)
    if jax.process_index() == 0:
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    tx = optim.make_optimizer(o)
    # Set-up runs outside `sharding.activate`: unboxing logical-axis metadata eagerly under active
    # rules would try to constrain arrays that have no sharding yet; out_shardings place everything.
    params = state_lib.init_student_params(cfg.model.name, s_cfg, mesh, parallelism, seed=cfg.model.init_seed,
                                           param_dtype=param_dtype)
    t_cfg, t_params = (None, {}) if cache else state_lib.load_teacher(cfg.teacher.checkpoint, s_cfg, params,
                                                                      mesh, parallelism, dtype=teacher_dtype)
    if cfg.model.init_noise > 0:  # after the teacher copy: "same" means the clean initial weights
        params = state_lib.perturb_params(params, seed=cfg.model.init_seed, noise=cfg.model.init_noise)
    state, state_sh = state_lib.create_train_state(params, tx, mesh, seed=cfg.model.init_seed)
    if isinstance(policy, RecipePolicy):  # a Q4_0 block split across devices would not be Q4_0
        check_q4_0_blocks(policy.resolution, s_cfg, state_sh.params)
        if policy.act_int8 and policy.static_scales is None:
            policy = _with_static_scales(cfg, policy, s_cfg, params, None if cache else (spec, tokenizer), print_fn)
    del params  # the state holds its own copy
    t_sh = jax.tree.map(lambda a: a.sharding, t_params)
    batch_sh = sharding.batch_sharding(mesh, parallelism)

    if cache:
        iterator = cache.make_iterator(cfg.data.global_batch_size, shard_index=jax.process_index(),
                                       shard_count=jax.process_count(), num_threads=cfg.data.num_threads)
    else:
        iterator = inputs.make_iterator(cfg, spec, tokenizer, s_cfg.vocab_size)
    ckpt = RunCheckpointer(cfg.checkpoint_dir, keep=cfg.checkpoint.keep, keep_every=cfg.checkpoint.keep_every,
                           async_save=cfg.checkpoint.async_save)
    restored = ckpt.restore(state_lib.abstract_state(state_sh, state), iterator, cfg.to_dict())
    resumed_from = None
    if restored is not None:
        resumed_from, state = restored
        log.info("resumed from step %d in %s", resumed_from, ckpt.directory)
        print_fn(f"resumed from checkpoint step {resumed_from}")

    logger = metrics_lib.MetricsLogger(
        run_dir, total_steps=o.total_steps, tokens_per_step=cfg.data.global_batch_size * cfg.data.seq_len,
        flops_per_token=metrics_lib.flops_per_token(s_cfg, t_cfg, cfg.data.seq_len),  # t_cfg None: cached
        peak_flops=cfg.logging.peak_flops_per_device * mesh.size, tensorboard=cfg.logging.tensorboard,
        is_writer=jax.process_index() == 0, resumed_from=resumed_from or 0, print_fn=print_fn)
    jstep = build.build_step(cfg, s_cfg, t_cfg, policy, tx, state_sh, t_sh, batch_sh, mesh)
    return _Run(state=state, teacher_params=t_params, jstep=jstep, batch_sharding=batch_sh, iterator=iterator,
                ckpt=ckpt, logger=logger, mesh=mesh, resumed_from=resumed_from, model_config=s_cfg, policy=policy,
                tokenizer=tokenizer_name)


def _check_writable(run_dir: Path) -> None:
    """The run dir exists (made here) and takes files: a read-only or misplaced one is one line now,
    not an OSError when the first checkpoint or metric is written."""
    probe = run_dir / f".write-test-{jax.process_index()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"run_dir {run_dir} is not writable ({e.strerror or e}); choose another run_dir or "
                         "fix its permissions") from None


def train(cfg: RunConfig, *, quant_policy: QuantPolicy | None = None,
          devices: Sequence[jax.Device] | None = None, stop: StopFlag | None = None,
          on_step: Callable[[int, dict], None] | None = None, print_fn=print) -> TrainResult:
    """Runs (or resumes) `cfg` up to optimizer.total_steps, or until a stop is requested.

    quant_policy: overrides `cfg.quant.recipe` (any object with the QuantPolicy methods).
    devices: the devices the mesh spans (default all).
    stop: a StopFlag to request a clean stop from another thread (SIGTERM/SIGINT set it too).
    on_step(step, metrics): called on the host with each step's metrics, one step late.
    """
    run = _setup(cfg, quant_policy, devices, print_fn)
    total, state, losses = cfg.optimizer.total_steps, run.state, {}
    guard = guard_lib.Guard(cfg.guard, run.resumed_from, print_fn)

    def process(step: int, device_metrics: dict) -> None:
        host = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        dt = run.logger.step_done()
        guard.check_step(step, host)
        losses[step] = host["loss"]
        if step % cfg.logging.every_steps == 0 or step == total:
            run.logger.log(step, host, dt)
        if on_step is not None:
            on_step(step, host)

    flag = stop or StopFlag()
    step = int(jax.device_get(state.step))
    pending, stopped = None, False
    try:
        with install_handlers(flag), sharding.activate(run.mesh, cfg.mesh.parallelism):
            while step < total:
                batch = step_lib.global_batch(next(run.iterator), run.batch_sharding)
                state, device_metrics = run.jstep(state, run.teacher_params, batch)
                step += 1
                # Read the previous step's metrics while this one runs: the host never stalls the device.
                if pending is not None:
                    process(*pending)
                pending = (step, device_metrics)
                stopped = _agreed_stop(flag)
                if step % cfg.checkpoint.every_steps == 0 or step == total or stopped:
                    process(*pending)  # this step's metrics before its state is saved (guard.py)
                    pending = None
                    guard.check_state(step, state)
                    run.ckpt.save(step, state, run.iterator.get_state(), cfg.to_dict())
                    guard.saved(step)
                if stopped:
                    print_fn(f"stop requested ({flag.reason}): saved step {step}, exiting")
                    break
            if pending is not None:
                process(*pending)
    finally:
        run.ckpt.wait()
        run.ckpt.close()
        run.logger.close()
    if step >= total:
        save_final_model(cfg, run, state)
    return TrainResult(state=state, losses=losses, resumed_from=run.resumed_from,
                       stopped_early=stopped and step < total, run_dir=Path(cfg.run_dir))


FINAL_MODEL_DIR = "model"


def _with_static_scales(cfg: RunConfig, policy: RecipePolicy, s_cfg, params, data, print_fn) -> RecipePolicy:
    """Static int8 activation scales are calibrated once (absmax/127 over a few batches) on the
    initial student and then frozen for the run; <run_dir>/quant_scales.json keeps them so a resumed
    run uses the same scales, and the final model carries them to export."""
    path = Path(cfg.run_dir) / SCALES_JSON
    if path.is_file():
        scales = load_quant_scales(cfg.run_dir)
    else:
        if data is None:
            raise ValueError(f"recipe {policy.resolution.recipe.name!r} calibrates static activation scales on "
                             "text; runs with teacher.cache do not support that yet — use the online teacher")
        spec, tokenizer = data
        batches = make_eval_batches(spec, tokenizer, seq_len=cfg.data.seq_len, global_batch_size=4,
                                    shard_index=0, shard_count=1, num_batches=4)
        scales = jax.device_get(calibrate(s_cfg, params, policy.resolution, batches))
        if jax.process_index() == 0:
            save_quant_scales(cfg.run_dir, scales)
        print_fn(f"calibrated {len(jax.tree.leaves(scales))} static activation scales → {path}")
    return RecipePolicy(policy.resolution, backend=policy.backend, static_scales=scales,
                        q4_0_impl=policy.q4_0_impl)


def save_final_model(cfg: RunConfig, run: _Run, state) -> Path:
    """<run_dir>/model: the trained student as a model checkpoint (params, config, and in meta the
    recipe it was trained under and the tokenizer), which export, eval and a next run start from."""
    recipe = getattr(run.policy, "resolution", None)
    meta = checkpoint.CheckpointMeta(
        kind="qat" if recipe is not None else "float", step=int(jax.device_get(state.step)),
        param_dtype=cfg.optimizer.param_dtype, tokenizer=run.tokenizer, run_config=cfg.to_dict(),
        recipe=recipe.recipe.to_dict() if recipe is not None else None)
    out = Path(cfg.run_dir) / FINAL_MODEL_DIR
    checkpoint.save_model(out, state.params, run.model_config, meta=meta, force=True)
    scales = getattr(run.policy, "static_scales", None)
    if scales is not None and jax.process_index() == 0:
        save_quant_scales(out, scales)
    return out


def _agreed_stop(flag: StopFlag) -> bool:
    """Every process must save the same step, so a stop seen by any host is a stop for all."""
    if jax.process_count() == 1:
        return flag.is_set()
    # A numpy value, not jnp: under `sharding.activate` (jax.set_mesh) a jnp scalar is a global array
    # over the mesh, which process_allgather rejects ("non-fully-addressable ... tiled=True").
    return bool(multihost_utils.process_allgather(np.int32(flag.is_set())).max())
