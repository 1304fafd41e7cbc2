"""The one place a run config becomes a jitted train step. The training loop and `preflight` both
call `build_step`, so what preflight compiles for a topology is exactly what `gemma-qat train` runs.

    RunConfig + student/teacher ModelConfig + policy + optax tx + shardings ─► jit(step) (cached)

`teacher_config=None` means offline distillation (`teacher.cache`): the batch carries the teacher's
top-k and there is no teacher forward.
"""

from __future__ import annotations

import jax.numpy as jnp

from gemma_qat import sharding
from gemma_qat.loss import distill
from gemma_qat.model.transformer import Transformer
from gemma_qat.train import optimizer as optim, step as step_lib
from gemma_qat.train.config import DistillSection, RunConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def distill_schedule(d: DistillSection, total_steps: int) -> distill.DistillSchedule:
    if d.schedule == "constant":
        return distill.DistillSchedule(d.temperature, d.alpha)
    ramp = distill.linear if d.schedule == "linear" else distill.cosine
    steps = d.schedule_steps or total_steps
    t_end = d.temperature if d.temperature_end is None else d.temperature_end
    a_end = d.alpha if d.alpha_end is None else d.alpha_end
    return distill.DistillSchedule(ramp(d.temperature, t_end, steps), ramp(d.alpha, a_end, steps))


def check_batch_layout(cfg: RunConfig, mesh) -> None:
    """The global batch must split evenly over the parallelism's batch axes (a Mesh or an AbstractMesh)."""
    spec = sharding.batch_sharding(mesh, cfg.mesh.parallelism).spec[0]
    axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
    shards = 1
    for a in axes:
        shards *= mesh.shape[a]
    if cfg.data.global_batch_size % shards:
        raise ValueError(f"data.global_batch_size={cfg.data.global_batch_size} must be a multiple of the "
                         f"{shards} batch shards of mesh axes {axes} (mesh.parallelism {cfg.mesh.parallelism!r})")


def build_step(cfg: RunConfig, student_config, teacher_config, policy, tx, state_sh, teacher_sh, batch_sh, mesh):
    """jit(step) with the shardings pinned (train/step.py jit_step). Built once per distinct set of
    what the compiled program depends on (step.cached), so a resume or a second preflight in one
    process reuses it; the shardings follow from the configs, the mesh and its parallelism."""
    o = cfg.optimizer
    offline = teacher_config is None
    key = (student_config, teacher_config, policy, o, cfg.distill, cfg.remat, cfg.attention, cfg.grouped, cfg.scan_layers,
           cfg.teacher.param_dtype,
           mesh, cfg.mesh.parallelism, cfg.data.global_batch_size, cfg.data.seq_len)

    def build():
        compute = DTYPES[o.compute_dtype]
        student = Transformer(student_config, quant=policy, dtype=compute, param_dtype=DTYPES[o.param_dtype],
                              remat=cfg.remat, attention=cfg.attention, grouped=cfg.grouped, scan_layers=cfg.scan_layers)
        common = dict(grad_accum_steps=o.grad_accum_steps, chunk_size=cfg.distill.chunk_size)
        schedule, lr_fn = distill_schedule(cfg.distill, o.total_steps), optim.lr_schedule(o)
        if offline:
            fn = step_lib.make_cached_step_fn(student, tx, schedule, lr_fn, **common)
            return step_lib.jit_step(fn, state_sh, teacher_sh, batch_sh, mesh, keys=step_lib.CACHED_BATCH_KEYS)
        teacher = Transformer(teacher_config, dtype=compute, param_dtype=DTYPES[cfg.teacher.param_dtype],
                              attention=cfg.attention, grouped=cfg.grouped, scan_layers=cfg.scan_layers)
        # α = 1 at every step: pure cross-entropy, the teacher's forward would be computed for nothing.
        ce_only = cfg.distill.schedule == "constant" and cfg.distill.alpha == 1.0
        fn = step_lib.make_step_fn(student, teacher, tx, schedule, lr_fn, loss_impl=cfg.distill.loss_impl,
                                   ce_only=ce_only, **common)
        return step_lib.jit_step(fn, state_sh, teacher_sh, batch_sh, mesh)

    return step_lib.cached(key, build)
