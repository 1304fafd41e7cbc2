"""One jitted distillation step: frozen teacher forward, quantized student forward and backward,
chunked KL(+CE) loss, optax update. Pure: (state, teacher params, batch) → (state, metrics).
`make_cached_step_fn` is the offline variant: the teacher's top-k comes with the batch."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gemma_qat.loss.distill import DistillSchedule, chunked_ce_loss, chunked_distill_loss, topk_distill_loss
from gemma_qat.model.transformer import Transformer
from gemma_qat.train.optimizer import trainable_grad_norm
from gemma_qat.train.state import TrainState

Batch = dict[str, jax.Array]  # tokens, targets, loss_mask, segment_ids, positions: each [B, T] int32
BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
# Offline distillation adds the teacher's top-k: log-probs [B, T, k] float, ids [B, T, k] int32.
CACHED_BATCH_KEYS = BATCH_KEYS + ("topk_logprobs", "topk_ids")


def _hidden(model: Transformer, params, batch: Batch, **kw):
    # Returns (h [B, T, D] after the final norm, table [V, D] as the quant policy presents it).
    return model.apply({"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"],
                       return_hidden=True, **kw)


def _make(loss_of: Callable, tx: optax.GradientTransformation, schedule: DistillSchedule, lr_fn: Callable,
          grad_accum_steps: int):
    """The step around `loss_of(teacher_params, batch, temperature, alpha, quant_rng)`, which does
    any teacher work (outside the gradient) and returns `loss_fn(params) -> (loss, aux)`."""

    def step_fn(state: TrainState, teacher_params, batch: Batch):
        rng, step_rng = jax.random.split(state.rng)
        temperature, alpha = schedule(state.step)
        loss_fn = loss_of(teacher_params, batch, temperature, alpha, step_rng)
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # The rate of the update this step belongs to (with accumulation: the one it completes).
        update_step = state.step // grad_accum_steps * grad_accum_steps
        metrics = {
            "loss": loss, "kl": aux["kl"], "ce": aux["ce"], "top1_agree": aux["top1_agree"],
            "loss_tokens": aux["tokens"], "grad_norm": trainable_grad_norm(grads),
            "lr": jnp.asarray(lr_fn(update_step), jnp.float32), "temperature": temperature, "alpha": alpha,
        }
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
        return new_state, metrics

    return step_fn


def make_step_fn(student: Transformer, teacher: Transformer, tx: optax.GradientTransformation,
                 schedule: DistillSchedule, lr_fn: Callable, *, grad_accum_steps: int, chunk_size: int,
                 loss_impl: str = "auto", ce_only: bool = False):
    """The un-jitted step (tests call it eagerly; `jit_step` compiles it with shardings). `ce_only`: the
    schedule's α is 1 at every step, so the KL term has weight 0 and the teacher's forward is not run
    (the loss is the labels' cross-entropy; kl and top1_agree are reported as 0)."""
    softcap = student.config.final_softcap

    def loss_of(teacher_params, batch, temperature, alpha, step_rng):
        if ce_only:
            def ce_fn(params):
                s_h, s_table = _hidden(student, params, batch, rngs={"quant": step_rng})
                ce, aux = chunked_ce_loss(s_h, s_table, batch["targets"], softcap=softcap, mask=batch["loss_mask"],
                                          chunk_size=chunk_size, loss_impl=loss_impl)
                zero = jnp.zeros((), jnp.float32)
                return ce, {**aux, "kl": zero, "top1_agree": zero}
            return ce_fn

        # The teacher never gets a gradient; stop_gradient also lets XLA drop its backward entirely.
        t_h, t_table = jax.lax.stop_gradient(_hidden(teacher, teacher_params, batch))

        def loss_fn(params):
            # 'quant' rng: for stochastic policies (e.g. stochastic rounding); NoQuant ignores it.
            s_h, s_table = _hidden(student, params, batch, rngs={"quant": step_rng})
            return chunked_distill_loss(s_h, t_h, s_table, t_table, softcap=softcap, temperature=temperature,
                                        alpha=alpha, labels=batch["targets"], mask=batch["loss_mask"],
                                        chunk_size=chunk_size, loss_impl=loss_impl)
        return loss_fn

    return _make(loss_of, tx, schedule, lr_fn, grad_accum_steps)


def make_cached_step_fn(student: Transformer, tx: optax.GradientTransformation, schedule: DistillSchedule,
                        lr_fn: Callable, *, grad_accum_steps: int, chunk_size: int):
    """Offline distillation (`teacher.cache`): the batch carries the teacher's top-k log-probs, so
    there is no teacher forward; the loss is topk_distill_loss (KL over the top-k plus the rest
    bucket). `teacher_params` is unused ({}), kept so both steps share one signature."""
    softcap = student.config.final_softcap

    def loss_of(teacher_params, batch, temperature, alpha, step_rng):
        del teacher_params, alpha  # alpha is 0 by config validation: this loss has no CE term

        def loss_fn(params):
            s_h, s_table = _hidden(student, params, batch, rngs={"quant": step_rng})
            return topk_distill_loss(s_h, s_table, batch["topk_logprobs"], batch["topk_ids"], softcap=softcap,
                                     temperature=temperature, mask=batch["loss_mask"], chunk_size=chunk_size)
        return loss_fn

    return _make(loss_of, tx, schedule, lr_fn, grad_accum_steps)


def jit_step(step_fn, state_sh: TrainState, teacher_sh, batch_sh: NamedSharding, mesh: Mesh,
             keys: tuple[str, ...] = BATCH_KEYS):
    """Shardings pin where everything lives, so XLA never guesses a layout and nothing is resharded
    between steps; the state is donated so old and new weights never coexist in memory. Metrics are
    replicated scalars. Call (and trace) it inside `sharding.activate(mesh, recipe)`."""
    batch_shardings = {k: batch_sh for k in keys}  # [B, T] and [B, T, k] alike: batch over its axes
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(step_fn, in_shardings=(state_sh, teacher_sh, batch_shardings),
                   out_shardings=(state_sh, replicated), donate_argnums=(0,))


_COMPILED: dict = {}
_MAX_COMPILED = 4


def cached(key, build: Callable[[], Callable]) -> Callable:
    """`build()` once per hashable `key` (a few kept). A jitted function compiles once per function
    object, so repeated runs in one process (resume, tests, sweeps) reuse the compiled step only if
    they reuse the object; an unhashable key (e.g. a custom policy without __hash__) just builds."""
    try:
        hash(key)
    except TypeError:
        return build()
    if key not in _COMPILED:
        if len(_COMPILED) >= _MAX_COMPILED:
            _COMPILED.pop(next(iter(_COMPILED)))
        _COMPILED[key] = build()
    return _COMPILED[key]


def global_batch(host_batch: dict, batch_sh: NamedSharding) -> Batch:
    """This host's numpy rows → global jax.Arrays laid out over the batch axes (works unchanged from
    one process to many: each host contributes its own rows). Every key is converted: BATCH_KEYS
    from the data pipeline, CACHED_BATCH_KEYS from a teacher cache."""
    return {k: jax.make_array_from_process_local_data(batch_sh, v) for k, v in host_batch.items()}
