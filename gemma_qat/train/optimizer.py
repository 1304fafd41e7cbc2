"""AdamW with linear warmup and cosine decay, global-norm clipping, frozen buffers and gradient
accumulation, all as one optax transformation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from gemma_qat.model.params import BUFFER_SUFFIXES
from gemma_qat.train.config import OptimizerSection


def lr_schedule(o: OptimizerSection) -> optax.Schedule:
    """Learning rate as a function of the *train step* (not the optimizer-update count)."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=o.lr, warmup_steps=o.warmup_steps,
        decay_steps=max(o.total_steps, o.warmup_steps + 1), end_value=o.lr * o.end_lr_fraction)


def is_frozen(path: tuple[str, ...]) -> bool:
    # `skip_scale` is a buffer in the reference architecture (HF `layer_scalar`): never trained.
    return path[-1].endswith(BUFFER_SUFFIXES)


def trainable_labels(params: dict) -> dict:
    """Same tree as params: 'train' or 'frozen' per leaf."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: "frozen" if is_frozen(k) else "train" for k in flat})


def _decay_mask(params: dict) -> dict:
    # Decay matrices only; norm scales and per-expert scalars are gains that decay would pull to 0.
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(o: OptimizerSection) -> optax.GradientTransformation:
    sched = lr_schedule(o)
    k = o.grad_accum_steps
    # optax counts optimizer updates; with accumulation the n-th update happens at train step n·k.
    update_lr = (lambda n: sched(n * k)) if k > 1 else sched
    adamw = optax.adamw(update_lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=_decay_mask)
    train = optax.chain(optax.clip_by_global_norm(o.grad_clip), adamw) if o.grad_clip > 0 else adamw
    tx = optax.multi_transform({"train": train, "frozen": optax.set_to_zero()}, trainable_labels)
    return optax.MultiSteps(tx, every_k_schedule=k) if k > 1 else tx


def trainable_grad_norm(grads: dict) -> jax.Array:
    """Global norm of the gradients that reach the optimizer (frozen buffers excluded)."""
    flat = traverse_util.flatten_dict(grads)
    squares = [jnp.sum(jnp.square(g.astype(jnp.float32))) for path, g in flat.items() if not is_frozen(path)]
    return jnp.sqrt(sum(squares))
