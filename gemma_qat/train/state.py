"""Train state and frozen teacher, created directly on their devices.

Nothing is ever materialised on one device and then scattered: the state's shapes come from
`jax.eval_shape`, its shardings from the model's logical axes, and a jitted init writes each shard
where it lives (the nanodo / flax-lm1b recipe).
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gemma_qat import sharding
from gemma_qat.model import checkpoint
from gemma_qat.model.config import VARIANTS, ModelConfig, get_config
from gemma_qat.model.params import abstract_params, init_params, logical_axes
from gemma_qat.train.optimizer import is_frozen


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: train steps (batches) done
    params: Any  # fp32 master weights of the student
    opt_state: Any
    rng: jax.Array  # uint32 [2]; split every step for stochastic quant policies


def param_shardings(config: ModelConfig, mesh: Mesh, parallelism: str, *, param_dtype=jnp.float32):
    return sharding.tree_shardings(abstract_params(config, param_dtype=param_dtype), logical_axes(config),
                                   mesh, parallelism)


def _dict_path(keypath) -> tuple[str, ...]:
    return tuple(k.key for k in keypath if isinstance(k, jax.tree_util.DictKey))


def state_shardings(abstract_state: TrainState, p_shardings, mesh: Mesh) -> TrainState:
    """Optimizer moments take their parameter's sharding (matched by the parameter's dict path at the
    end of the moment's key path, and by shape); counters and the rng are replicated."""
    by_path = {tuple(k): s for k, s in traverse_util.flatten_dict(p_shardings).items()}
    shapes = {tuple(k): a.shape for k, a in traverse_util.flatten_dict(abstract_state.params).items()}
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(keypath, leaf):
        path = _dict_path(keypath)
        for start in range(len(path)):
            tail = path[start:]
            if tail in by_path and shapes[tail] == leaf.shape:
                return by_path[tail]
        return replicated

    opt = jax.tree_util.tree_map_with_path(one, abstract_state.opt_state)
    return TrainState(step=replicated, params=p_shardings, opt_state=opt, rng=replicated)


def _perturb_leaf(w: jax.Array, rms: float, rng: np.random.Generator, noise: float) -> jax.Array:
    # The noise is drawn on the host with numpy: threefry over every leaf takes XLA many seconds to
    # compile on CPU, and this is a demo/test feature on small models. Every process draws the same
    # full-size noise and perturbs only the shards it holds, so multi-host runs agree.
    eps = rng.standard_normal(w.shape, dtype=np.float32) * np.float32(noise * rms)
    shards = [jax.device_put((np.asarray(s.data, np.float32) + eps[s.index]).astype(w.dtype), s.device)
              for s in w.addressable_shards]
    return jax.make_array_from_single_device_arrays(w.shape, w.sharding, shards)


def is_variant(name: str) -> bool:
    return name.lower() in VARIANTS


def student_config(name: str) -> ModelConfig:
    """A variant name, or the model config stored in a checkpoint folder."""
    return get_config(name) if is_variant(name) else checkpoint.load_config(name)


def init_student_params(name: str, config: ModelConfig, mesh: Mesh, parallelism: str, *, seed: int,
                        param_dtype=jnp.float32):
    """Sharded initial weights: random (variant name) or restored (checkpoint folder)."""
    if is_variant(name):
        return _jitted_init(config, param_dtype, mesh, parallelism)(jax.random.PRNGKey(seed))
    shardings = param_shardings(config, mesh, parallelism, param_dtype=param_dtype)
    _, params = checkpoint.load_model(name, dtype=param_dtype, shardings=shardings)
    return params


@functools.lru_cache(maxsize=8)
def _jitted_init(config: ModelConfig, param_dtype, mesh: Mesh, parallelism: str):
    # Random init takes XLA seconds to compile on CPU; repeated runs in one process (tests, sweeps,
    # notebooks) with the same model and mesh reuse one compiled initialiser.
    shardings = param_shardings(config, mesh, parallelism, param_dtype=param_dtype)
    return jax.jit(lambda r: init_params(config, r, param_dtype=param_dtype), out_shardings=shardings)


def perturb_params(params: dict, *, seed: int, noise: float) -> dict:
    """The student's start away from the teacher: w + noise · rms(w) · N(0, 1) per tensor, same
    shardings; frozen buffers untouched."""
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(params)
    rms = jax.device_get(jax.jit(lambda p: {k: jnp.sqrt(jnp.mean(jnp.square(w.astype(jnp.float32))))
                                             for k, w in p.items()})(flat))  # one compile for all leaves
    out = {path: w if is_frozen(path) else _perturb_leaf(w, float(rms[path]), rng, noise)
           for path, w in sorted(flat.items())}
    return traverse_util.unflatten_dict(out)


def create_train_state(params: dict, tx: optax.GradientTransformation, mesh: Mesh, *,
                       seed: int) -> tuple[TrainState, TrainState]:
    """(state, its shardings). `params` are already sharded; the optimizer state is created sharded."""
    p_shardings = jax.tree.map(lambda a: a.sharding, params)
    rng = jax.random.PRNGKey(seed + 1)

    def init(p):
        # An explicit copy: the train step donates the state, so its buffers must never be the
        # caller's (e.g. the teacher's under `teacher = "same"`), whatever jit forwards.
        p = jax.tree.map(jnp.copy, p)
        return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p), rng=rng)

    abstract = jax.eval_shape(init, params)
    shardings = state_shardings(abstract, p_shardings, mesh)
    state = jax.jit(init, out_shardings=shardings)(params)
    return state, shardings


def abstract_state(state_sh: TrainState, like: TrainState) -> TrainState:
    """ShapeDtypeStructs carrying the target shardings: what Orbax restores into."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), like, state_sh)


def load_teacher(source: str, student_cfg: ModelConfig, student_params: dict, mesh: Mesh, parallelism: str, *,
                 dtype) -> tuple[ModelConfig, dict]:
    """Frozen teacher weights in `dtype`, sharded by the same rules as the student.

    `same`: a copy of the student's initial weights (the usual QAT setup: the float model distills
    into its own quantized self). A folder: any architecture, as long as the logits are comparable.
    """
    if source == "same":
        cfg = student_cfg
        shardings = jax.tree.map(lambda a: a.sharding, student_params)
        # Copied even when the dtype matches: the student's buffers get donated to the train step.
        params = jax.jit(lambda p: jax.tree.map(lambda w: jnp.copy(w.astype(dtype)), p),
                         out_shardings=shardings)(student_params)
        return cfg, params
    cfg = checkpoint.load_config(source)
    check_teacher(cfg, student_cfg, source)
    _, params = checkpoint.load_model(source, dtype=dtype,
                                      shardings=param_shardings(cfg, mesh, parallelism, param_dtype=dtype))
    return cfg, params


def check_teacher(teacher: ModelConfig, student: ModelConfig, source: str) -> None:
    if teacher.vocab_size != student.vocab_size:
        raise ValueError(f"teacher {source} has vocab_size {teacher.vocab_size} but the student "
                         f"{student.name!r} has {student.vocab_size}; distillation compares logits over one "
                         "vocabulary, so they must match")
    if teacher.final_softcap != student.final_softcap:
        raise ValueError(f"teacher {source} has final_softcap {teacher.final_softcap} but the student has "
                         f"{student.final_softcap}; the loss applies one softcap to both")
